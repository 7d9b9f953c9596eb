"""Routing for a running simulation: tokens per expert of each step, step by step.

The serving simulator asks, for every step, how a batch of ``tokens`` new tokens (some of them
decode tokens of sequences that routed last step too) spreads over the experts of every MoE
layer. :class:`CountStream` answers at count level, from the same model as
:func:`moesim.routing.generate.generate_counts`: each expert's share of the choices is measured
once on a token-level sample of the profile (group limits, affinity and dynamic-k shape it), and
a continuing token repeats its previous choice with the profile's ``locality``.

Large batches are drawn in the normal regime: when the mean count per expert is at least
:data:`NORMAL_REGIME`, a layer's counts are the share's mean plus Gaussian noise with the
multinomial covariance, correlated with the previous step's noise by ``locality`` times the
share of tokens that continue (an AR(1) process with the same mean, variance and lag-one
correlation as the exact repeat-or-redraw process), and rounded to integers that keep the
total. A 58-layer, 256-expert step then costs one Gaussian draw a (layer, expert) instead of
15,000 binomials; smaller steps draw the exact process, compiled (:func:`exact_step`): each of
the previous step's slots is kept or not with one uniform (so an expert keeps a binomial of its
slots), and each fresh slot takes one uniform through a layer's alias table, so a step of a few
tokens costs its slots (one to two nanoseconds each) rather than a binomial per (layer, expert) or
the ~15,000 conditional binomials of a multinomial over every layer's experts. Both regimes
draw from a SplitMix64 sequence (``moesim.routing.generate``'s finaliser) keyed each step by one
output of the stream's generator: the exact regime's uniforms are 24-bit fields of its words
(hashed where they are used, where NumPy filling a buffer of doubles cost twice as much a slot),
the normal regime's Gaussians come from its words through a ziggurat (:func:`standard_normals`).
"""

from __future__ import annotations

import math

import numba
import numpy as np

from moesim.routing.generate import (_GOLDEN, _POP_BITS, _POP_MASK, _alias_bits, _inclusion, _mix, _unit, alias_thresholds,
                                     mix_np)
from moesim.routing.profile import RoutingProfile, alias_tables

NORMAL_REGIME = 8.0  # mean slots per expert from which a step's counts are drawn by the normal approximation


def round_to_total(values: np.ndarray, totals: np.ndarray) -> np.ndarray:
    """Non-negative integers per row of ``values`` (``[rows, experts]``) scaled to sum to
    ``totals``: systematic rounding of the running sum, so each count is within one of its
    scaled value and every row keeps its total exactly."""
    values = np.maximum(values, 0.0)
    scale = totals / np.maximum(values.sum(axis=1), 1e-300)
    edges = np.floor(np.cumsum(values * scale[:, None], axis=1) + 0.5)
    edges[:, -1] = totals
    return np.diff(edges, axis=1, prepend=0.0).astype(np.int64)


def normal_step_reference(noise: np.ndarray, z: np.ndarray, rho: np.ndarray, share: np.ndarray, slots: int,
                          tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """One normal-regime step in NumPy (the reference :func:`_normal_step` is tested against):
    the AR(1) noise ``[layers, experts]`` moved on by the standard normal draws ``z`` with
    lag-one correlation ``rho`` ``[layers]``, and the counts it gives. Returns (noise, counts)."""
    rho = rho[:, None]
    noise = rho * noise + np.sqrt(1.0 - rho**2) * z
    # multinomial covariance: diag(p) - p p^T, through the centred sqrt(p) projection
    root = np.sqrt(share)
    centred = root * noise - share * (root * noise).sum(axis=1, keepdims=True)
    mean = slots * share
    counts = round_to_total(mean + np.sqrt(slots) * centred, np.full(share.shape[0], slots))
    return noise, np.minimum(counts, tokens)


@numba.njit(cache=True)
def _block_sum(a, lo, n):
    """``a[lo:lo+n].sum()`` for ``n <= 128`` in NumPy's order (eight running sums, then the
    rest), so the compiled step gives NumPy's counts bit for bit."""
    if n < 8:
        res = 0.0
        for i in range(lo, lo + n):
            res += a[i]
        return res
    r0, r1, r2, r3 = a[lo], a[lo + 1], a[lo + 2], a[lo + 3]
    r4, r5, r6, r7 = a[lo + 4], a[lo + 5], a[lo + 6], a[lo + 7]
    i = lo + 8
    stop = lo + n - n % 8
    while i < stop:
        r0 += a[i]
        r1 += a[i + 1]
        r2 += a[i + 2]
        r3 += a[i + 3]
        r4 += a[i + 4]
        r5 += a[i + 5]
        r6 += a[i + 6]
        r7 += a[i + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < lo + n:
        res += a[i]
        i += 1
    return res


# NumPy sums a longer row pairwise: halves (cut at a multiple of 8) until blocks of 128. Numba
# cannot cache a recursive function, so each level of halving is its own function; four cover
# rows of up to PAIRWISE_MAX elements (experts of one layer).
PAIRWISE_MAX = 2048


@numba.njit(cache=True)
def _pairwise_256(a, lo, n):
    if n <= 128:
        return _block_sum(a, lo, n)
    half = n // 2 - (n // 2) % 8
    return _block_sum(a, lo, half) + _block_sum(a, lo + half, n - half)


@numba.njit(cache=True)
def _pairwise_512(a, lo, n):
    if n <= 128:
        return _block_sum(a, lo, n)
    half = n // 2 - (n // 2) % 8
    return _pairwise_256(a, lo, half) + _pairwise_256(a, lo + half, n - half)


@numba.njit(cache=True)
def _pairwise_1024(a, lo, n):
    if n <= 128:
        return _block_sum(a, lo, n)
    half = n // 2 - (n // 2) % 8
    return _pairwise_512(a, lo, half) + _pairwise_512(a, lo + half, n - half)


@numba.njit(cache=True)
def _pairwise_sum(a, lo, n):
    """``a[lo:lo+n].sum()`` as NumPy adds it, for ``n <= PAIRWISE_MAX``."""
    if n <= 128:
        return _block_sum(a, lo, n)
    half = n // 2 - (n // 2) % 8
    return _pairwise_1024(a, lo, half) + _pairwise_1024(a, lo + half, n - half)


# The normal regime's Gaussians: Marsaglia & Tsang's ziggurat (J. Stat. Softw. 5(8), 2000) over
# 256 layers of equal area under f(x) = exp(-x^2 / 2), fed by a SplitMix64 sequence keyed each
# step by one output of the stream's generator (as the exact regime's uniforms are). A normal
# costs one hash, two table reads and a compare 98.5% of the time; Numba's port of NumPy's
# generator, one indirect call into the bit generator a draw, cost three times that.
_ZIGGURAT_R = 3.6541528853610088  # the base layer's right edge for 256 layers (Marsaglia & Tsang, table 1)


def _ziggurat_tables(layers: int = 256, r: float = _ZIGGURAT_R) -> tuple[np.ndarray, np.ndarray]:
    """The layers' right edges ``x[0..layers]`` (decreasing; ``x[0]``: the width of a rectangle
    of the base layer's area, rectangle and tail together, at height ``f(r)``; ``x[layers]`` =
    0) and ``f`` at each. Every layer has the base layer's area, each edge following from the
    one below it."""
    def density(x):
        return math.exp(-0.5 * x * x)
    area = r * density(r) + math.sqrt(math.pi / 2) * math.erfc(r / math.sqrt(2))
    x = np.empty(layers + 1)
    x[0], x[1] = area / density(r), r
    for i in range(2, layers):
        x[i] = math.sqrt(-2.0 * math.log(area / x[i - 1] + density(x[i - 1])))
    x[layers] = 0.0
    return x, np.exp(-0.5 * x * x)


_ZIGGURAT_X, _ZIGGURAT_F = _ziggurat_tables()


@numba.njit(inline="always", cache=True, error_model="numpy")
def _gaussian(word, state):
    """One standard normal from the 64-bit ``word``: its low 8 bits pick the layer, bit 8 the sign
    and its top 53 the uniform (separate bits, as Doornik, "An improved ziggurat method", 2005,
    advises); a rejected point draws again from the SplitMix64 sequence at ``state``. Returns
    (the normal, the state after the words it took)."""
    x, f = _ZIGGURAT_X, _ZIGGURAT_F
    while True:
        layer = np.int64(word & np.uint64(255))
        negative = (word >> np.uint64(8)) & np.uint64(1)
        z = _unit(word) * x[layer]
        if z >= x[layer + 1]:  # outside the part of the layer under the curve at every height
            if layer == 0:  # the tail beyond r (Marsaglia, 1964)
                while True:
                    state += _GOLDEN
                    a = 1.0 - _unit(_mix(state))  # (0, 1]
                    state += _GOLDEN
                    b = 1.0 - _unit(_mix(state))
                    tail = -math.log(a) / x[1]
                    if -2.0 * math.log(b) > tail * tail:
                        break
                z = x[1] + tail
            else:  # the wedge: a uniform height between the layer's bottom and top edges
                state += _GOLDEN
                if f[layer] + _unit(_mix(state)) * (f[layer + 1] - f[layer]) >= math.exp(-0.5 * z * z):
                    state += _GOLDEN
                    word = _mix(state)
                    continue
        return (-z if negative else z), state


@numba.njit(cache=True, error_model="numpy")
def _fill_normals(key, out):
    """``out`` (1-D) filled with standard normals from the SplitMix64 sequence at ``key``: the
    ``i``-th from word ``i + 1``, a rejected point's redraws from the words after ``out.size``.
    The words are hashed in a loop of their own (independent, so several at once) and the
    ziggurat's common case is inlined here, its rare rest left to :func:`_gaussian`."""
    n = out.size
    words = np.empty(n, dtype=np.uint64)
    for i in range(n):
        words[i] = _mix(key + np.uint64(i + 1) * _GOLDEN)
    state = key + np.uint64(n) * _GOLDEN
    x = _ZIGGURAT_X
    for i in range(n):
        word = words[i]
        layer = np.int64(word & np.uint64(255))
        z = _unit(word) * x[layer]
        if z < x[layer + 1]:
            out[i] = -z if (word >> np.uint64(8)) & np.uint64(1) else z
        else:
            out[i], state = _gaussian(word, state)


def standard_normals(key: int, n: int) -> np.ndarray:
    """``n`` standard normals keyed by ``key`` (a 64-bit integer): the normal regime's draws."""
    out = np.empty(n)
    _fill_normals(np.uint64(key), out)
    return out


@numba.njit(cache=True)
def _normal_step(key, noise, rho, keep, root, share, slots, tokens, counts):
    """:func:`normal_step_reference` in place, its ``z`` the normals :func:`standard_normals`
    draws from ``key``: ``noise`` moves on, ``counts`` is written; ``keep`` = sqrt(1 - rho^2),
    ``root`` = sqrt(share)."""
    L, E = noise.shape
    z = np.empty(L * E)
    _fill_normals(key, z)
    row, edges = np.empty(E), np.empty(E)
    spread = math.sqrt(slots)
    for l in range(L):
        for e in range(E):
            noise[l, e] = rho[l] * noise[l, e] + keep[l] * z[l * E + e]
        for e in range(E):
            row[e] = root[l, e] * noise[l, e]
        projected = 0.0 + _pairwise_sum(row, 0, E)
        for e in range(E):
            value = slots * share[l, e] + spread * (row[e] - share[l, e] * projected)
            row[e] = max(value, 0.0)
        # round_to_total: systematic rounding of the running sum, keeping the row's total; only
        # the running sum is a chain, the rounding and differences are loops of their own
        scale = slots / max(0.0 + _pairwise_sum(row, 0, E), 1e-300)
        running = 0.0
        for e in range(E):
            running += row[e] * scale
            edges[e] = running
        for e in range(E):
            edges[e] = math.floor(edges[e] + 0.5)
        edges[E - 1] = slots
        counts[l, 0] = min(np.int64(edges[0]), np.int64(tokens))
        for e in range(1, E):
            counts[l, e] = min(np.int64(edges[e] - edges[e - 1]), np.int64(tokens))


def _words(key: int, start: int, n: int) -> np.ndarray:
    """Words ``start`` .. ``start + n - 1`` of the SplitMix64 sequence from state ``key``."""
    with np.errstate(over="ignore"):
        state = np.uint64(key) + (np.arange(start + 1, start + n + 1, dtype=np.uint64) * _GOLDEN)
    return mix_np(state)


def exact_step_reference(rng: np.random.Generator, previous: np.ndarray | None, keep: np.ndarray, share: np.ndarray,
                         slots: int, tokens: int) -> np.ndarray:
    """One exact-regime step in NumPy (the reference :func:`exact_step` is tested against): each
    of the previous step's slots ``[layers, experts]`` repeats its expert with probability
    ``keep`` ``[layers]`` (thinning every slot, so an expert keeps a binomial of its slots), the
    rest of the ``slots`` draw their experts from ``share`` through the layer's alias table
    (:func:`alias_tables` of ``share``), and a token picks an expert at most once (counts capped
    at ``tokens``). Every slot, kept or fresh, takes one 24-bit uniform: the top bits of the next
    word of a SplitMix64 sequence keyed by one raw output of ``rng``'s generator, layer by
    layer, a layer's previous slots (expert by expert) before its fresh ones."""
    L, E = share.shape
    key = int(rng.bit_generator.random_raw())
    prob, alias = alias_tables(share)
    threshold = alias_thresholds(prob)
    counts = np.zeros((L, E), dtype=np.int64)
    at = 0
    for l in range(L):
        if previous is not None:
            n = int(previous[l].sum())
            expert = np.repeat(np.arange(E), previous[l])
            stays = (_words(key, at, n) >> np.uint64(64 - _POP_BITS)) < np.ceil(np.clip(keep[l], 0, 1) * float(1 << _POP_BITS))
            counts[l] = np.bincount(expert[stays], minlength=E)
            at += n
        fresh = max(slots - int(counts[l].sum()), 0)
        scaled = (_words(key, at, fresh) >> np.uint64(64 - _POP_BITS)).astype(np.int64) * E
        column = scaled >> _POP_BITS
        drawn = np.where((scaled & _POP_MASK) < threshold[l, column], column, alias[l, column])
        counts[l] += np.bincount(drawn, minlength=E)
        at += fresh
    return np.minimum(counts, tokens)


@numba.njit(cache=True)
def _fields(state, n, out):
    """The top ``_POP_BITS`` bits of the next ``n`` words of the SplitMix64 sequence at
    ``state`` into ``out``; returns the state after them. A loop of its own: the hashes of a
    run are independent, so they are computed several at once, which they are not when each
    feeds its draw in the same loop (2.0 -> 1.6 ns a fresh slot, hash and alias draw)."""
    for i in range(n):
        out[i] = np.int64(_mix(state + np.uint64(i + 1) * _GOLDEN) >> np.uint64(64 - _POP_BITS))
    return state + np.uint64(n) * _GOLDEN


_NO_PREVIOUS = np.zeros((0, 0), dtype=np.int64)


@numba.njit(cache=True)
def _exact_step(key, previous, keep, threshold, alias, slots, tokens, counts):
    """:func:`exact_step_reference` into ``counts`` (``previous`` empty: none). Loops without
    branches taken at random: an expert's kept slots are the difference of a running count of
    kept slots at the ends of its run (a loop over each expert's few slots mispredicted its end
    at every expert), and a layer's fresh experts are drawn first and counted after
    (incrementing a count whose index was just computed stalls the CPU on every repeat of an
    expert: a store to an address known late)."""
    L, E = counts.shape
    offset = np.empty(E + 1, dtype=np.int64)
    field = np.empty(slots, dtype=np.int64)
    run = np.empty(slots + 1, dtype=np.int64)
    drawn = np.empty(slots, dtype=np.int64)
    flat_threshold, flat_alias = threshold.ravel(), alias.ravel()
    state = np.uint64(key)
    for l in range(L):
        row = counts[l]
        left = slots
        if previous.size:
            offset[0] = 0
            for e in range(E):
                offset[e + 1] = offset[e] + previous[l, e]
            n = offset[E]
            if n > field.size:  # a normal-regime step before: more slots than this one's
                field, run = np.empty(n, dtype=np.int64), np.empty(n + 1, dtype=np.int64)
            state = _fields(state, n, field)
            below = math.ceil(min(max(keep[l], 0.0), 1.0) * float(1 << _POP_BITS))
            kept = 0
            run[0] = 0
            for i in range(n):
                kept += field[i] < below
                run[i + 1] = kept
            for e in range(E):
                row[e] = run[np.uint64(offset[e + 1])] - run[np.uint64(offset[e])]
            left -= kept
        else:
            row[:] = 0
        fresh = max(left, 0)
        state = _fields(state, fresh, field)
        for i in range(fresh):
            drawn[i] = _alias_bits(field[i], E, flat_threshold, flat_alias, l * E)
        for i in range(fresh):
            row[drawn[i]] += 1
        for e in range(E):
            row[e] = min(row[e], tokens)


def exact_step(rng: np.random.Generator, previous: np.ndarray | None, keep: np.ndarray, threshold: np.ndarray,
               alias: np.ndarray, slots: int, tokens: int) -> np.ndarray:
    """:func:`exact_step_reference`, compiled: the same counts from the same generator state,
    which it leaves in the same state, with the layers' alias tables of the share passed in
    (``threshold``: :func:`alias_thresholds` of their probabilities). A step costs its slots,
    previous and fresh, at one to two nanoseconds each (one hash a uniform, a layer's at a
    time): NumPy's generator filling a buffer of doubles cost more than that alone, and one
    binomial per (layer, expert) of the previous step took 20 ns."""
    counts = np.empty(threshold.shape, dtype=np.int64)
    key = np.uint64(rng.bit_generator.random_raw())
    _exact_step(key, _NO_PREVIOUS if previous is None else previous, keep, threshold, alias, slots, tokens, counts)
    return counts


class CountStream:
    """Tokens per expert ``[layers, experts]`` for successive steps of a serving run.

    ``step(tokens, continuing)``: ``tokens`` new tokens in the step, of which ``continuing``
    belong to sequences that also routed in the previous step (decode tokens).
    """

    def __init__(self, profile: RoutingProfile, seed: int = 0, *, sample: int | None = None):
        self.profile = profile
        E = profile.num_experts
        share = _inclusion(profile, seed, sample or max(20_000, 50 * E))  # [domains, layers, experts]
        self.share = share.mean(axis=0)  # the workload mixes the domains evenly
        self.root = np.sqrt(self.share)
        prob, self.alias_idx = alias_tables(self.share)
        self.alias_threshold = alias_thresholds(prob)
        self.locality = profile.per_layer("locality")
        self.rng = np.random.default_rng([seed, 0x57E9])
        self.previous = None  # last step's counts
        self.noise = np.zeros_like(self.share)  # normal regime: last step's standardised deviation
        self.last_tokens = 0

    def step(self, tokens: int, continuing: int = 0) -> np.ndarray:
        p = self.profile
        E, L, k = p.num_experts, p.num_layers, p.top_k
        slots = tokens * k
        if tokens <= 0:
            return np.zeros((L, E), dtype=np.int64)
        carry = continuing / max(self.last_tokens, tokens) if self.previous is not None else 0.0
        carry = min(1.0, carry)
        if slots / E >= NORMAL_REGIME:
            rho = self.locality * carry
            key = np.uint64(self.rng.bit_generator.random_raw())
            if E <= PAIRWISE_MAX:
                counts = np.empty((L, E), dtype=np.int64)
                _normal_step(key, self.noise, rho, np.sqrt(1.0 - rho**2), self.root, self.share, float(slots),
                             float(tokens), counts)
            else:
                z = standard_normals(key, L * E).reshape(L, E)
                self.noise, counts = normal_step_reference(self.noise, z, rho, self.share, slots, tokens)
        else:
            previous = self.previous if carry > 0 else None
            counts = exact_step(self.rng, previous, self.locality * carry, self.alias_threshold, self.alias_idx, slots, tokens)
        self.previous, self.last_tokens = counts, tokens
        return counts
