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
total. A 58-layer, 256-expert step then costs two small Gaussian draws instead of 15,000
binomials; smaller steps draw the exact process, compiled (:func:`exact_step`): the repeats
by NumPy's binomial algorithm on the same generator, the fresh slots one uniform each through
a layer's alias table, so a step of a few tokens costs its slots rather than the ~15,000
conditional binomials of a multinomial over every layer's experts.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from moesim.routing.generate import _inclusion
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


@numba.njit(cache=True)
def _normal_step(rng, noise, rho, keep, root, share, slots, tokens, counts):
    """:func:`normal_step_reference` in place, its ``z`` drawn from ``rng`` as it goes (the same
    normals as NumPy's ``rng.standard_normal(noise.shape)``, at a third of the cost: NumPy's fill
    took 140 us of a step's 195): ``noise`` moves on, ``counts`` is written; ``keep`` =
    sqrt(1 - rho^2), ``root`` = sqrt(share)."""
    L, E = noise.shape
    row = np.empty(E)
    spread = math.sqrt(slots)
    for l in range(L):
        for e in range(E):
            noise[l, e] = rho[l] * noise[l, e] + keep[l] * rng.standard_normal()
            row[e] = root[l, e] * noise[l, e]
        projected = 0.0 + _pairwise_sum(row, 0, E)
        for e in range(E):
            value = slots * share[l, e] + spread * (row[e] - share[l, e] * projected)
            row[e] = max(value, 0.0)
        # round_to_total: systematic rounding of the running sum, keeping the row's total
        scale = slots / max(0.0 + _pairwise_sum(row, 0, E), 1e-300)
        edge = running = 0.0
        for e in range(E):
            running += row[e] * scale
            upper = slots if e == E - 1 else math.floor(running + 0.5)
            counts[l, e] = min(int(upper - edge), int(tokens))
            edge = upper


def exact_step_reference(rng: np.random.Generator, previous: np.ndarray | None, keep: np.ndarray, share: np.ndarray,
                         slots: int, tokens: int) -> np.ndarray:
    """One exact-regime step in NumPy (the reference :func:`exact_step` is tested against): each
    of the previous step's slots ``[layers, experts]`` repeats its expert with probability
    ``keep`` ``[layers]``, the rest of the ``slots`` draw their experts from ``share``, one
    uniform a slot through the layer's alias table (:func:`alias_tables` of ``share``), and a
    token picks an expert at most once (counts capped at ``tokens``)."""
    L, E = share.shape
    kept = np.zeros((L, E), dtype=np.int64)
    if previous is not None:
        kept = rng.binomial(previous, np.clip(keep, 0, 1)[:, None])
    fresh = np.maximum(slots - kept.sum(axis=1), 0)
    prob, alias = alias_tables(share)
    counts = kept.copy()
    for l in range(L):
        scaled = rng.random(fresh[l]) * E
        column = scaled.astype(np.int64)
        drawn = np.where(scaled - column < prob[l, column], column, alias[l, column])
        counts[l] += np.bincount(drawn, minlength=E)
    return np.minimum(counts, tokens)


@numba.njit(inline="always", cache=True)
def _inversion(rng, n, p, q, qn, bound):
    """NumPy's ``random_binomial_inversion`` (``p <= 0.5``, ``n * p <= 30``) with its set-up
    ``qn = q**n`` and ``bound`` passed in: the same uniforms, so the same draw."""
    x = 0
    px = qn
    u = rng.random()
    while u > px:
        x += 1
        if x > bound:
            x = 0
            px = qn
            u = rng.random()
        else:
            u -= px
            px = ((n - x + 1) * p * px) / (x * q)
    return x


@numba.njit(inline="always", cache=True)
def _inversion_setup(n, small):
    """NumPy's set-up of :func:`_inversion` for ``n`` trials of probability ``small`` <= 0.5:
    (q, q**n, bound)."""
    q = 1.0 - small
    mean = n * small
    return q, math.exp(n * math.log(q)), int(min(n, mean + 10.0 * math.sqrt(mean * q + 1)))


_NO_PREVIOUS = np.zeros((0, 0), dtype=np.int64)


@numba.njit(cache=True)
def _repeats(rng, previous, keep, slots, counts):
    """The kept part of :func:`exact_step_reference` into ``counts`` (``previous`` empty: none),
    drawing the same binomials from ``rng`` in the same order, row by row (one probability a
    layer, so each distinct count's set-up is worked out once a layer). Returns the slots left
    to draw afresh per layer."""
    L, E = counts.shape
    counts[:] = 0
    if previous.size:
        largest = 0
        for l in range(L):
            for e in range(E):
                largest = max(largest, previous[l, e])
        qn_of = np.empty(largest + 1)
        bound_of = np.empty(largest + 1, dtype=np.int64)
        for l in range(L):
            p = min(max(keep[l], 0.0), 1.0)
            if p == 0.0:
                continue
            small = p if p <= 0.5 else 1.0 - p
            qn_of[:] = -1.0  # set-up not worked out yet for this layer
            for e in range(E):
                n = previous[l, e]
                if n == 0:
                    continue
                if small * n > 30.0:
                    counts[l, e] = rng.binomial(n, p)
                    continue
                if qn_of[n] < 0.0:
                    _, qn_of[n], bound_of[n] = _inversion_setup(n, small)
                x = _inversion(rng, n, small, 1.0 - small, qn_of[n], bound_of[n])
                counts[l, e] = x if p <= 0.5 else n - x
    fresh = np.empty(L, dtype=np.int64)
    for l in range(L):
        left = slots
        for e in range(E):
            left -= counts[l, e]
        fresh[l] = max(left, 0)
    return fresh


@numba.njit(cache=True)
def _fresh(uniforms, fresh, prob, alias, tokens, counts):
    """The fresh part of :func:`exact_step_reference`: layer ``l``'s next ``fresh[l]`` of the
    ``uniforms`` each add a slot to the expert its alias table (``prob``, ``alias``) gives; then
    the cap at ``tokens``. A layer's experts are drawn first and counted after: incrementing a
    count whose index was just computed stalls the CPU on every repeat of an expert (a store to
    an address known late), and a popular expert repeats often; the choice between an entry
    and its alias is a bit mask, not a branch taken at random."""
    L, E = prob.shape
    drawn = np.empty(fresh.max(), dtype=np.int64)
    at = 0
    for l in range(L):
        p_row, a_row, row = prob[l], alias[l], counts[l]
        for i in range(fresh[l]):
            scaled = uniforms[at + i] * E
            column = np.int64(scaled)
            other = np.int64(a_row[column])
            drawn[i] = other ^ ((column ^ other) & -np.int64(scaled - column < p_row[column]))
        for i in range(fresh[l]):
            row[drawn[i]] += 1
        at += fresh[l]
        for e in range(E):
            row[e] = min(row[e], tokens)


def exact_step(rng: np.random.Generator, previous: np.ndarray | None, keep: np.ndarray, prob: np.ndarray,
               alias: np.ndarray, slots: int, tokens: int, uniforms: np.ndarray | None = None) -> np.ndarray:
    """:func:`exact_step_reference`, compiled, drawing the same numbers from ``rng`` in the same
    order, with the layers' alias tables of the share passed in: the repeats by NumPy's binomial
    algorithm, then every layer's fresh slots from one NumPy fill of uniforms (one a slot, so a
    step of few tokens costs its slots, not its layers times experts). ``uniforms``: a float64
    buffer of at least ``slots`` per layer to fill (a stream keeps one: the fresh pages of a new
    megabyte each step cost as much as the draws)."""
    counts = np.empty(prob.shape, dtype=np.int64)
    fresh = _repeats(rng, _NO_PREVIOUS if previous is None else previous, keep, slots, counts)
    total = int(fresh.sum())
    if uniforms is None or uniforms.size < total:
        uniforms = np.empty(total)
    rng.random(out=uniforms[:total])
    _fresh(uniforms, fresh, prob, alias, tokens, counts)
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
        self.alias_prob, self.alias_idx = alias_tables(self.share)
        # the exact regime's uniforms: at most one a slot of every layer below the normal regime
        self.uniforms = np.empty(profile.num_layers * math.ceil(NORMAL_REGIME * E))
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
            if E <= PAIRWISE_MAX:
                counts = np.empty((L, E), dtype=np.int64)
                _normal_step(self.rng, self.noise, rho, np.sqrt(1.0 - rho**2), self.root, self.share, float(slots),
                             float(tokens), counts)
            else:
                z = self.rng.standard_normal((L, E))
                self.noise, counts = normal_step_reference(self.noise, z, rho, self.share, slots, tokens)
        else:
            previous = self.previous if carry > 0 else None
            counts = exact_step(self.rng, previous, self.locality * carry, self.alias_prob, self.alias_idx, slots, tokens,
                                self.uniforms)
        self.previous, self.last_tokens = counts, tokens
        return counts
