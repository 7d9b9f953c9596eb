"""Routing trace generators: token-level ``[tokens, layers, k]`` and count-level
``[steps, layers, experts]``, from a :class:`RoutingProfile`.

Every random number is a counter-based hash of (seed, token, layer, slot, draw), not a draw
from a stateful generator. So the Numba kernel (parallel over sequences) and the NumPy reference
(vectorised over sequences) give bit-identical traces, the result does not depend on the number
of threads, and the same seed always gives the same trace.

Under group-limited routing a (token, layer) first chooses its ``topk_group`` groups: picked
one at a time by mass without replacement, drawn as one set from the tabulated distribution of
those picks (see ``group_subsets``). Then its choices, slot by slot:

1. locality: with probability ``locality`` repeat the previous token's choice in this slot;
2. affinity: otherwise, with probability ``affinity``, take a successor of this token's choice
   in this slot at the previous layer;
3. otherwise draw from the popularity of the token's domain at this layer and drift epoch,
   restricted to the allowed experts (chosen groups, or the slot's group under MoGE), retrying
   on a repeat up to ``_TRIES`` times and then taking the lowest allowed unchosen expert;
4. with probability ``null_rate`` the choice is a null expert (recorded -1); under dynamic-k
   the remaining slots are left empty (-1) once the chosen mass reaches the threshold.
"""

from __future__ import annotations

import numba
import numpy as np

from moesim.routing.profile import RoutingProfile, Tables, alias_tables, build_tables
from moesim.routing.trace import tokens_per_expert

_TRIES = 16
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)

# Draw numbers inside one (token, layer, slot): draw 0's 64 bits hold the locality test (bits
# 0-15), the affinity test (bits 16-31), the successor pick (bits 32-39, so ``fanout`` <= 256)
# and the expert of the first popularity attempt (bits 40-63); the null test and the later
# popularity attempts take a draw of their own (draw _D_POP + attempt). A popularity attempt
# reads the expert (an alias draw in integers) from bits 40-63 of its hash and, under
# group-limited routing, the chosen group from bits 0-23: two independent fields, where one
# uniform rescaled after the group pick cost a chain of float operations on every draw. The
# first attempt's group field is 16 bits of draw 1 + j // 4 of slot _GROUP_SLOT, shared by
# four slots (see ``_first_pop_hash``). The group selection of a (token, layer) is one 53-bit
# uniform of slot _GROUP_SLOT (an alias draw over the sets of groups), or, above
# ``_SUBSET_MAX_GROUPS`` groups, 16-bit fields of the draws of slot _GROUP_SLOT + i // 4. One
# hash (and a quarter under group limits) thus serves the common path of a slot, which sets
# the kernel's speed.
_D_TESTS, _D_NULL, _D_POP = 0, 3, 4
_SHIFT_LOCAL, _SHIFT_AFFINE, _SHIFT_SUCC, _SHIFT_POP = 0, 16, 32, 40
_POP_BITS = 24  # bits of each popularity field (group, expert)
_POP_MASK = (1 << _POP_BITS) - 1
_GROUP_SLOT = 200  # slot numbers from here on are group-selection draws

ALGORITHM_CODES = {"token_choice": 0, "group_limited": 1, "grouped": 2, "dynamic_k": 3}


@numba.njit(inline="always", cache=True, error_model="numpy")
def _fixed_group(j, per_group, group_size):
    """Grouped experts (MoGE): slot ``j``'s group and its expert range ``[lo, hi)``."""
    g = j // per_group
    lo = g * group_size
    return g, lo, lo + group_size


@numba.njit(inline="always", cache=True, error_model="numpy")
def _hash(seed, token, layer, slot, draw):
    key = (np.uint64(layer) * np.uint64(256) + np.uint64(slot)) * np.uint64(256) + np.uint64(draw)
    x = np.uint64(seed) * _GOLDEN ^ np.uint64(token) * _MIX1 ^ key * _MIX2
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


@numba.njit(inline="always", cache=True, error_model="numpy")
def _field(h, shift):
    """A 16-bit uniform in [0, 1) from bits ``shift``.. of hash ``h``."""
    return float(np.int64((h >> np.uint64(shift)) & np.uint64(0xFFFF))) * (1.0 / 65536.0)


def hash_np(seed: int, token: np.ndarray, layer: int, slot: int, draw: int) -> np.ndarray:
    """The same hash as the Numba kernel's, vectorised over ``token``."""
    with np.errstate(over="ignore"):  # the hash relies on uint64 wrap-around
        key = (np.uint64(layer) * np.uint64(256) + np.uint64(slot)) * np.uint64(256) + np.uint64(draw)
        return mix_np(np.uint64(seed) * _GOLDEN ^ np.asarray(token, dtype=np.uint64) * _MIX1 ^ key * _MIX2)


def mix_np(x: np.ndarray) -> np.ndarray:
    """The kernel's ``_mix`` (SplitMix64's finaliser) over an array of uint64."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * _MIX1
        x = (x ^ (x >> np.uint64(27))) * _MIX2
        return x ^ (x >> np.uint64(31))


def uniform_np(seed: int, token: np.ndarray, layer: int, slot: int, draw: int) -> np.ndarray:
    return (hash_np(seed, token, layer, slot, draw) >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)


def field_np(h: np.ndarray, shift: int) -> np.ndarray:
    return ((h >> np.uint64(shift)) & np.uint64(0xFFFF)).astype(np.float64) * (1.0 / 65536.0)


def succ_field_np(h: np.ndarray) -> np.ndarray:
    return ((h >> np.uint64(_SHIFT_SUCC)) & np.uint64(0xFF)).astype(np.float64) * (1.0 / 256.0)


def alias_thresholds(prob: np.ndarray) -> np.ndarray:
    """Alias tables' keep-probabilities as integer thresholds for a ``_POP_BITS``-bit fraction
    ``f``: ``f / 2**24 < prob`` exactly when ``f < ceil(prob * 2**24)`` (scaling by a power of
    two is exact)."""
    return np.ceil(prob * float(1 << _POP_BITS)).astype(np.int32)


def alias_bits_np(bits: np.ndarray, n: int, thr: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """The integer alias draw of ``_alias_bits`` for ``_POP_BITS``-bit uniforms ``bits``;
    ``thr`` / ``idx``: the tables' rows, one per entry of ``bits``, ``[len(bits), n]``."""
    x = bits.astype(np.int64) * n
    i = x >> _POP_BITS
    rows = np.arange(x.size)
    return np.where((x & _POP_MASK) >= thr[rows, i], idx[rows, i], i)


# ---------------------------------------------------------------------------------------------
# Group-limited routing: the choice of topk_group groups as one draw
# ---------------------------------------------------------------------------------------------

# Picking groups one at a time costs a dependent chain of searches per (token, layer). Up to this
# many groups, the distribution of the chosen *set* under those picks is tabulated once per
# (epoch, domain, layer) instead, over every partial pick (2**n_group states), and a token draws
# its set from an alias table in one step. Larger group counts keep the one-at-a-time picks.
_SUBSET_MAX_GROUPS = 12


@numba.njit(cache=True, error_model="numpy")
def _subset_weights(group_mass, topk_group, subsets, popcount):
    """``[rows, len(subsets)]``: the probability that picking ``topk_group`` groups one at a time
    by mass, without replacement, ends with each set (bitmask) in ``subsets``. Masks grow by
    one bit, so visiting them in increasing order reaches every set after all its subsets."""
    rows, n = group_mass.shape
    out = np.empty((rows, subsets.size))
    reach = np.empty(1 << n)
    for r in range(rows):
        m = group_mass[r]
        reach[:] = 0.0
        reach[0] = 1.0
        for mask in range(1 << n):
            c = popcount[mask]
            if c >= topk_group or reach[mask] == 0.0:
                continue
            rem = 0.0  # summed, not 1 - picked, so that the last open groups get exact shares
            for g in range(n):
                if not (mask >> g) & 1:
                    rem += m[g]
            for g in range(n):
                if not (mask >> g) & 1:
                    share = m[g] / rem if rem > 0.0 else 1.0 / (n - c)  # no mass left: any open group
                    reach[mask | (1 << g)] += reach[mask] * share
        for s in range(subsets.size):
            out[r, s] = reach[subsets[s]]
    return out


def group_subsets(n_group: int, topk_group: int, group_mass: np.ndarray):
    """Alias tables ``[epoch, domain, layer, set]`` over the sets of ``topk_group`` chosen
    groups, with the groups of each set in increasing order ``[set, topk_group]``; ``None``
    above ``_SUBSET_MAX_GROUPS`` groups."""
    if n_group > _SUBSET_MAX_GROUPS:
        return None
    popcount = np.array([m.bit_count() for m in range(1 << n_group)], dtype=np.int64)
    subsets = np.flatnonzero(popcount == topk_group).astype(np.int64)
    members = np.array([[g for g in range(n_group) if m >> g & 1] for m in subsets], dtype=np.int64)
    weights = _subset_weights(group_mass.reshape(-1, n_group), topk_group, subsets, popcount)
    prob, idx = alias_tables(weights)
    shape = (*group_mass.shape[:-1], subsets.size)
    return prob.reshape(shape), idx.reshape(shape), members


# ---------------------------------------------------------------------------------------------
# Numba kernel
# ---------------------------------------------------------------------------------------------
#
# The kernel reads flat views of the tables: a row (epoch, domain, layer) starts at a base
# computed once per (token, layer), so an entry is a base plus an offset, read through an
# unsigned index (``_u``). Indexing the many-dimensional arrays instead costs a stride multiply
# and a negative-index fix-up per dimension, a sizeable share of a slot's instructions.


@numba.njit(inline="always", cache=True, error_model="numpy")
def _u(i):
    """``i`` as an unsigned index: Numba then skips the fix-up for negative indices, a few
    instructions on every table read of the kernel (every index here is >= 0)."""
    return np.uint64(i)


@numba.njit(inline="always", cache=True, error_model="numpy")
def _mix(x):
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


@numba.njit(inline="always", cache=True, error_model="numpy")
def _draw_hash(token_key, layer_key, slot, draw):
    """``_hash`` with the token's part (``seed * _GOLDEN ^ token * _MIX1``) and the layer's
    (``layer * 65536``) worked out once by the caller."""
    return _mix(token_key ^ (layer_key + np.uint64(slot * 256 + draw)) * _MIX2)


@numba.njit(inline="always", cache=True, error_model="numpy")
def _unit(h):
    return float(np.int64(h >> np.uint64(11))) * (1.0 / 9007199254740992.0)


@numba.njit(inline="always", cache=True, error_model="numpy")
def _alias_at(u, n, prob, idx, base):
    """Outcome of the alias table of ``n`` entries at ``prob[base:]`` / ``idx[base:]`` for
    uniform ``u``, as a select rather than a branch."""
    x = u * n
    i = int(x)
    other = np.int64(x - i >= prob[_u(base + i)])
    return i + other * (np.int64(idx[_u(base + i)]) - i)


# Fixed length of the padded list of chosen groups searched by a group-limited popularity draw:
# a search of constant length is unrolled, where one of ``topk_group`` steps became a vectorised
# loop with run-time checks. Unused entries hold +inf, so they are never counted.
_SEL_PAD = 8


@numba.njit(inline="always", cache=True, error_model="numpy")
def _first_pop_hash(h, gh, j):
    """The bits of slot ``j``'s first group-limited popularity attempt: its expert field (bits
    40-63) from the slot's draw-0 hash ``h``, its group field (bits 0-23) the slot's 16-bit field
    of the (token, layer)'s group hash ``gh`` (four slots a hash), placed as the top 16 bits."""
    field = (gh >> np.uint64(16 * (j % 4))) & np.uint64(0xFFFF)
    return (h & ~np.uint64(_POP_MASK)) | (field << np.uint64(_POP_BITS - 16))


@numba.njit(inline="always", cache=True, error_model="numpy")
def _alias_bits(bits, n, thr, idx, base):
    """Outcome of the alias table of ``n`` entries at ``thr[base:]`` / ``idx[base:]`` (integer
    thresholds, see ``alias_thresholds``) for a ``_POP_BITS``-bit uniform ``bits``: ``bits * n``
    holds the entry above bit 24 and the fraction below, so the draw needs no float
    conversions."""
    x = np.int64(bits) * n
    i = x >> _POP_BITS
    other = np.int64((x & _POP_MASK) >= thr[_u(base + i)])
    return i + other * (np.int64(idx[_u(base + i)]) - i)


@numba.njit(inline="always", cache=True, error_model="numpy")
def _popularity_draw(h, algo, sel_mass, n_sel, sel_g, sel_before, g, group_size, alias_thr, alias_idx, row_e):
    """The expert that hash ``h`` picks from the popularity of the allowed experts: under
    group-limited routing first a chosen group by mass from bits 0-23 (``sel_g``: the chosen
    groups in index order, ``sel_before``: the mass of the chosen groups before each, then
    +inf), then, from bits 40-63, an expert inside the group ``g`` by its alias table (the
    layer's tables start at ``row_e``). The group is found by counting, not by a loop that
    exits at a random point (a mispredicted branch per draw)."""
    if algo == 1:
        target = float(np.int64(h & np.uint64(_POP_MASK))) * (1.0 / (1 << _POP_BITS)) * sel_mass
        si = 0
        if n_sel <= 4:  # DeepSeek-V3's top-4 groups: a shorter fixed search (always the same way)
            for q in range(1, 4):
                si += sel_before[_u(q)] <= target
        elif n_sel <= _SEL_PAD:
            for q in range(1, _SEL_PAD):
                si += sel_before[_u(q)] <= target
        else:
            for q in range(1, n_sel):
                si += sel_before[_u(q)] <= target
        g = sel_g[_u(si)]
    return g * group_size + _alias_bits(h >> np.uint64(_SHIFT_POP), group_size, alias_thr, alias_idx, row_e + g * group_size)


@numba.njit(inline="always", cache=True, error_model="numpy")
def _untaken(c, small, used, taken_at, stamp):
    """Expert ``c`` (>= 0) is not yet chosen by this (token, layer)."""
    if small:
        return (used >> np.uint64(c)) & np.uint64(1) == np.uint64(0)
    return taken_at[_u(c)] != stamp


@numba.njit(inline="always", cache=True, error_model="numpy")
def _allowed(c, small, gmask, group_at, group_of, stamp, algo, g_lo, g_hi):
    """Expert ``c`` (>= 0) is in a chosen group (group-limited) and in the slot's group (grouped)."""
    if small:
        ok = (~gmask >> np.uint64(c)) & np.uint64(1) == np.uint64(0)
    else:
        ok = (algo != 1) | (group_at[_u(group_of[_u(c)])] == stamp)
    return ok & (g_lo <= c) & (c < g_hi)


@numba.njit(inline="always", cache=True, error_model="numpy")
def _pick_groups_one_by_one(h_seed, t, layer, gmass, row_g, n_group, topk_group, group_sel, sel_g, sel_before, cum):
    """Group-limited routing above ``_SUBSET_MAX_GROUPS`` groups: ``topk_group`` picks by mass
    without replacement. ``cum[g]``: the open mass of groups 0..g; a pick is the number of
    groups whose cum lies at or below the target (independent compares, not a chain of
    dependent adds), and picking a group takes its mass off the groups from it on. Returns the
    chosen mass."""
    acc = 0.0
    for g in range(n_group):
        acc += gmass[row_g + g]
        cum[g] = acc
    hg = np.uint64(0)
    for i in range(topk_group):
        if i % 4 == 0:
            hg = _hash(h_seed, t, layer, _GROUP_SLOT + i // 4, 0)
        target = _field(hg, 16 * (i % 4)) * cum[n_group - 1]
        pick = 0
        for g in range(n_group):
            pick += cum[g] <= target
        if pick >= n_group or group_sel[pick]:  # rounding: the first open group past the target, else the last open one
            pick = -1
            for g in range(n_group):
                if not group_sel[g]:
                    pick = g
                    if cum[g] > target:
                        break
        group_sel[pick] = True
        m = gmass[row_g + pick]
        for g in range(pick, n_group):
            cum[g] -= m
        cum[pick] = cum[pick - 1] if pick > 0 else 0.0
    acc = 0.0
    n_sel = 0
    for g in range(n_group):
        if group_sel[g]:
            sel_g[n_sel] = g
            sel_before[n_sel] = acc
            acc += gmass[row_g + g]
            n_sel += 1
    return acc


@numba.njit(parallel=True, cache=True, error_model="numpy")
def _generate_kernel(seed, dims, cdf, gmass, sub_prob, sub_idx, sub_groups, alias_thr, alias_idx, successors, seq_start,
                     seq_domain, interval, locality, affinity, null_rate, threshold, out, algo_tag, small_tag, k_tag, size_tag, sel_tag):
    """``out``: the flat ``[tokens, layers, k]`` trace. ``dims``: experts, layers, domains,
    epochs, k, algorithm code, n_group, topk_group, number of group sets (0: pick groups one
    at a time), successors per expert. The tables come flat (see ``generate_tokens``).

    ``algo_tag``, ``small_tag``, ``k_tag``, ``size_tag``, ``sel_tag``: tuples whose lengths give
    the algorithm code (plus one), whether there are at most 64 experts (length 2), k, the
    experts per group and (group-limited) topk_group. A tuple's length is part of its type, so
    each combination is a build of its own with these as constants: the slot loop then carries
    no tests of them and unrolls, an alias draw's ``bits * group_size`` and a group's first
    expert are shifts for groups of 2**n experts, and the group search of a popularity draw has
    a fixed length (constant group size and topk_group: +8% for DeepSeek-V3, best of five).
    ``numba.literally`` would do the same but re-enters the compiler on every call. Up to 64
    experts, the chosen and the allowed experts of a (token, layer) are bits of registers, so a
    slot's test does not wait on the previous slot's store to memory."""
    E, L, D, epochs, k, algo, n_group, topk_group, n_sets, fan = (dims[0], dims[1], dims[2], dims[3], dims[4], dims[5], dims[6],
                                                                  dims[7], dims[8], dims[9])
    group_size = E // n_group
    per_group = k // n_group if algo == 2 else 1
    group_of = np.arange(E) // group_size  # read-only, shared by every sequence
    n_pad = max(n_group, _SEL_PAD)
    # up to 64 experts the chosen ones are bits of a register; a group's experts as a mask
    small = E <= 64
    group_bits = np.zeros(n_group, dtype=np.uint64)
    if small:
        for e in range(E):
            group_bits[group_of[e]] |= np.uint64(1) << np.uint64(e)
    for s in numba.prange(seq_start.size - 1):
        # again inside the parallel loop: there the lengths stay constants, whereas values from
        # outside it come in as run-time arguments
        algo = len(algo_tag) - 1
        small = len(small_tag) == 2
        k = len(k_tag)
        group_size = len(size_tag)
        if algo == 1:
            topk_group = len(sel_tag)
        t0 = seq_start[s]
        n = seq_start[s + 1] - t0
        # Layer by layer, token by token inside the sequence: a (token, layer) needs the previous
        # token at the same layer (locality) and the same token at the layer before (affinity),
        # both already made in this order, and a layer's tables then stay in the L1 cache for
        # the whole sequence. The draws are hashes of (token, layer, slot), so the order does
        # not change them. ``here`` holds this layer's choices [token, slot], ``below`` the
        # layer before's, as int16 (expert ids), so that both stay in the L1 cache with the tables.
        here_c = np.full(n * k, -1, dtype=np.int16)
        below = np.full(n * k, -1, dtype=np.int16)
        # Stamps instead of per-(token, layer) sets: the expert (group) is taken (chosen) by the
        # current (token, layer) when its entry equals ``stamp``, which goes up by one per
        # (token, layer). Nothing is cleared between layers, and a test is one load and compare.
        taken_at = np.zeros(E, dtype=np.int64)
        group_at = np.zeros(n_group, dtype=np.int64)
        stamp = 0
        group_sel = np.zeros(n_group, dtype=np.bool_)
        sel_g = np.zeros(n_pad, dtype=np.int64)
        sel_before = np.full(n_pad, np.inf)
        cum = np.zeros(n_group)
        cand_loc = np.empty(k, dtype=np.int64)
        cand_aff = np.empty(k, dtype=np.int64)
        cand_pop = np.empty(k, dtype=np.int64)
        pre_loc = np.empty(k, dtype=np.bool_)
        pre_aff = np.empty(k, dtype=np.bool_)
        hs = np.empty(k, dtype=np.uint64)
        hps = np.empty(k, dtype=np.uint64)
        ghs = np.empty((k + 3) // 4, dtype=np.uint64)
        dom = seq_domain[s]
        for layer in range(L):
            here_c, below = below, here_c
            ep = min(t0 // interval, epochs - 1)
            next_epoch = (t0 // interval + 1) * interval
            # the tests as integer compares of 16-bit fields: v / 2**16 < p exactly when
            # v < ceil(p * 2**16) (scaling by a power of two is exact)
            loc = np.int64(np.ceil(locality[layer] * 65536.0))
            aff = np.int64(np.ceil(affinity[layer] * 65536.0)) if layer > 0 else 0
            succ_row = max(layer - 1, 0) * E
            layer_key = np.uint64(layer * 65536)
            for t in range(t0, t0 + n):
                if t == next_epoch:  # no division per token
                    ep = min(ep + 1, epochs - 1)
                    next_epoch += interval
                token_key = np.uint64(seed) * _GOLDEN ^ np.uint64(t) * _MIX1
                stamp += 1
                row = (ep * D + dom) * L + layer
                row_e = row * E
                sel_mass = 0.0
                n_sel = 0
                gmask = ~np.uint64(0)
                if algo == 1:
                    gmask = np.uint64(0)
                    if n_sets > 0:
                        # one alias draw over the sets of chosen groups (see ``group_subsets``)
                        st = _alias_at(_unit(_draw_hash(token_key, layer_key, _GROUP_SLOT, 0)), n_sets, sub_prob, sub_idx, row * n_sets)
                        for q in range(topk_group):
                            g = sub_groups[_u(st * topk_group + q)]
                            group_at[_u(g)] = stamp
                            gmask |= group_bits[_u(g)]
                            sel_g[_u(q)] = g
                            sel_before[_u(q)] = sel_mass
                            sel_mass += gmass[_u(row * n_group + g)]
                    else:
                        for g in range(n_group):
                            group_sel[g] = False
                        sel_mass = _pick_groups_one_by_one(seed, t, layer, gmass, row * n_group, n_group, topk_group, group_sel,
                                                           sel_g, sel_before, cum)
                        for q in range(topk_group):
                            group_at[_u(sel_g[q])] = stamp
                            gmask |= group_bits[_u(sel_g[q])]
                    n_sel = topk_group
                here = (t - t0) * k  # this token's slots in ``here_c`` and ``below``
                back = here - k  # the previous token's (none for the first)
                used = np.uint64(0)
                ob = (t * L + layer) * k
                mass = 0.0
                g_fix = 0
                g_lo = 0
                g_hi = E
                # Phase 1: every slot's candidates, which need nothing of the other slots' choices,
                # so the slots' hash and table look-ups run side by side. Phase 2 then takes them
                # slot by slot; its tests wait only on the choices before, so a repeated draw is
                # found (and its branch resolved) early, not at the end of a look-up chain. Phase 1
                # is a loop per kind of candidate, not one loop doing all: each then holds its few
                # values in registers (one loop spilled to the stack), 12% faster for DeepSeek-V3.
                for j in range(k):
                    hs[_u(j)] = _draw_hash(token_key, layer_key, j, _D_TESTS)
                if algo == 1:
                    for i in range((k + 3) // 4):
                        ghs[_u(i)] = _draw_hash(token_key, layer_key, _GROUP_SLOT, 1 + i)
                for j in range(k):
                    hps[_u(j)] = _first_pop_hash(hs[_u(j)], ghs[_u(j // 4)], j) if algo == 1 else hs[_u(j)]
                for j in range(k):
                    if algo == 2:
                        g_fix = j // per_group
                    cand_pop[_u(j)] = _popularity_draw(hps[_u(j)], algo, sel_mass, n_sel, sel_g, sel_before, g_fix, group_size, alias_thr,
                                                       alias_idx, row_e)
                for j in range(k):
                    if algo == 2:
                        g_fix, g_lo, g_hi = _fixed_group(j, per_group, group_size)
                    h = hs[_u(j)]
                    c_loc = here_c[_u(back + j)] if back >= 0 else -1  # temporal locality
                    cand_loc[_u(j)] = c_loc
                    pre_loc[_u(j)] = ((c_loc >= 0) & (np.int64((h >> np.uint64(_SHIFT_LOCAL)) & np.uint64(0xFFFF)) < loc)
                                      & _allowed(max(c_loc, 0), small, gmask, group_at, group_of, stamp, algo, g_lo, g_hi))
                for j in range(k):
                    if algo == 2:
                        g_fix, g_lo, g_hi = _fixed_group(j, per_group, group_size)
                    h = hs[_u(j)]
                    up = below[_u(here + j)]  # cross-layer affinity; layer 0: the buffer's -1 (its affinity is 0)
                    c_aff = np.int64(successors[_u((succ_row + max(up, 0)) * fan
                                                   + ((np.int64(h >> np.uint64(_SHIFT_SUCC)) & 0xFF) * fan >> 8))])
                    cand_aff[_u(j)] = c_aff
                    pre_aff[_u(j)] = ((up >= 0) & (np.int64((h >> np.uint64(_SHIFT_AFFINE)) & np.uint64(0xFFFF)) < aff)
                                      & _allowed(c_aff, small, gmask, group_at, group_of, stamp, algo, g_lo, g_hi))
                for j in range(k):
                    if algo == 2:
                        g_fix, g_lo, g_hi = _fixed_group(j, per_group, group_size)
                    # the first candidate that may be taken is selected without a branch: the
                    # locality and affinity tests are coin flips, mispredicted as branches
                    c_loc = cand_loc[_u(j)]
                    ok_loc = pre_loc[_u(j)] & _untaken(max(c_loc, 0), small, used, taken_at, stamp)
                    c_aff = cand_aff[_u(j)]
                    ok_aff = pre_aff[_u(j)] & _untaken(c_aff, small, used, taken_at, stamp)
                    c_pop = cand_pop[_u(j)]
                    ok_pop = _untaken(c_pop, small, used, taken_at, stamp)
                    pick = c_loc if ok_loc else (c_aff if ok_aff else c_pop)
                    if not (ok_loc | ok_aff | ok_pop):
                        # the first draw repeats a choice: redraw, then the lowest allowed free expert
                        pick = -1
                        for attempt in range(1, _TRIES):
                            cand = _popularity_draw(_draw_hash(token_key, layer_key, j, _D_POP + attempt), algo, sel_mass, n_sel, sel_g,
                                                    sel_before, g_fix, group_size, alias_thr, alias_idx, row_e)
                            if _untaken(cand, small, used, taken_at, stamp):
                                pick = cand
                                break
                        if pick < 0:
                            for cand in range(g_lo, g_hi):
                                if (_allowed(cand, small, gmask, group_at, group_of, stamp, algo, g_lo, g_hi)
                                        & _untaken(cand, small, used, taken_at, stamp)):
                                    pick = cand
                                    break
                    if pick >= 0:
                        if small:
                            used |= np.uint64(1) << np.uint64(pick)
                        else:
                            taken_at[_u(pick)] = stamp
                    here_c[_u(here + j)] = pick
                    if null_rate > 0.0 and _unit(_draw_hash(token_key, layer_key, j, _D_NULL)) < null_rate:
                        out[_u(ob + j)] = -1
                    else:
                        out[_u(ob + j)] = pick
                    if algo == 3:
                        mass += cdf[row_e + pick] - (cdf[row_e + pick - 1] if pick > 0 else 0.0)
                        if mass >= threshold:
                            for i in range(j + 1, k):  # the remaining slots stay empty
                                out[ob + i] = -1
                                here_c[here + i] = -1
                            break


# ---------------------------------------------------------------------------------------------
# NumPy reference (vectorised over sequences; kept for tests and the benchmark's ratio)
# ---------------------------------------------------------------------------------------------


def _reference(profile: RoutingProfile, tables: Tables, seed: int, tokens: int) -> np.ndarray:
    E, L, k = profile.num_experts, profile.num_layers, profile.top_k
    algo = ALGORITHM_CODES[profile.algorithm]
    n_group = profile.n_group if algo in (1, 2) else 1
    group_size = E // n_group
    cdf, succ = tables.cdf, tables.successors
    fan = succ.shape[2]
    starts, ends = tables.seq_start[:-1], tables.seq_start[1:]
    out = np.full((tokens, L, k), -1, dtype=np.int16)
    prev = np.full((starts.size, L, k), -1, dtype=np.int64)
    epochs = cdf.shape[0]
    subsets = group_subsets(n_group, profile.topk_group, tables.group_mass) if algo == 1 else None
    thr = alias_thresholds(tables.alias_prob)
    for pos in range(int((ends - starts).max())):
        seqs = np.flatnonzero(ends - starts > pos)
        t = starts[seqs] + pos
        n = t.size
        epoch = np.minimum(t // profile.drift_interval, epochs - 1)
        dom = tables.seq_domain[seqs]
        above = np.full((n, k), -1, dtype=np.int64)
        for layer in range(L):
            rows = cdf[epoch, dom, layer]  # [n, E]
            lo_of = np.concatenate([np.zeros((n, 1)), rows], axis=1)  # lo_of[:, i] = cdf before expert i
            group_sel = np.ones((n, n_group), dtype=bool)
            sel_mass = np.zeros(n)
            if algo == 1:
                group_sel[:] = False
                gmass = tables.group_mass[epoch, dom, layer]  # [n, groups]
                each = np.arange(n)
                if subsets is not None:
                    sub_prob, sub_idx, members = subsets
                    x = uniform_np(seed, t, layer, _GROUP_SLOT, 0) * members.shape[0]
                    i = x.astype(np.int64)
                    s = np.where(x - i >= sub_prob[epoch, dom, layer, i], sub_idx[epoch, dom, layer, i], i)
                    group_sel[each[:, None], members[s]] = True
                else:
                    cum = np.cumsum(gmass, axis=1)
                    for i in range(profile.topk_group):
                        target = field_np(hash_np(seed, t, layer, _GROUP_SLOT + i // 4, 0), 16 * (i % 4)) * cum[:, -1]
                        pick = (cum <= target[:, None]).sum(axis=1)
                        odd = pick >= n_group
                        odd[~odd] = group_sel[each[~odd], pick[~odd]]
                        for r in np.flatnonzero(odd):  # rounding: the first open group past the target, else the last open one
                            open_ = np.flatnonzero(~group_sel[r])
                            past = open_[cum[r, open_] > target[r]]
                            pick[r] = past[0] if past.size else open_[-1]
                        group_sel[each, pick] = True
                        m = gmass[each, pick]
                        cum -= np.where(np.arange(n_group)[None, :] >= pick[:, None], m[:, None], 0.0)
                        cum[each, pick] = np.where(pick > 0, cum[each, np.maximum(pick - 1, 0)], 0.0)
                sel_mass = np.cumsum(np.where(group_sel, gmass, 0.0), axis=1)[:, -1]  # in index order, as the kernel adds
            chosen = np.full((n, k), -1, dtype=np.int64)
            result = np.full((n, k), -1, dtype=np.int64)
            mass = np.zeros(n)
            done = np.zeros(n, dtype=bool)
            per_group = k // n_group
            for j in range(k):
                if algo == 2:
                    g_lo = np.full(n, (j // per_group) * group_size)
                else:
                    g_lo = np.zeros(n, dtype=np.int64)
                g_hi = g_lo + (group_size if algo == 2 else E)

                def allowed(cand):
                    if algo == 1:
                        return group_sel[np.arange(n), np.clip(cand, 0, E - 1) // group_size] & (cand >= 0)
                    return (cand >= g_lo) & (cand < g_hi)

                def taken(cand):
                    return (chosen[:, :j] == cand[:, None]).any(axis=1) if j else np.zeros(n, dtype=bool)

                pick = np.full(n, -1, dtype=np.int64)
                h = hash_np(seed, t, layer, j, _D_TESTS)
                cand = prev[seqs, layer, j]
                ok = (cand >= 0) & (field_np(h, _SHIFT_LOCAL) < tables.locality[layer])
                ok &= allowed(cand) & ~taken(cand)
                pick = np.where(ok, cand, pick)
                aff = tables.affinity[layer] if layer > 0 else 0.0
                need = pick < 0
                base = np.clip(above[:, j], 0, E - 1)
                cand = succ[max(layer - 1, 0), base, (succ_field_np(h) * fan).astype(np.int64)]
                ok = need & (above[:, j] >= 0) & (field_np(h, _SHIFT_AFFINE) < aff)
                ok &= allowed(cand) & ~taken(cand)
                pick = np.where(ok, cand, pick)
                for attempt in range(_TRIES):
                    need = pick < 0
                    if not need.any():
                        break
                    if attempt:
                        hp = hash_np(seed, t, layer, j, _D_POP + attempt)
                    elif algo == 1:
                        hp = _first_pop_hash(h, hash_np(seed, t, layer, _GROUP_SLOT, 1 + j // 4), j)
                    else:
                        hp = h
                    if algo == 1:
                        u = (hp & np.uint64(_POP_MASK)).astype(np.float64) * (1.0 / (1 << _POP_BITS))
                        target = u * sel_mass
                        gm = np.where(group_sel, tables.group_mass[epoch, dom, layer], 0.0)
                        hit = (np.cumsum(gm, axis=1) > target[:, None]) & group_sel
                        last_sel = n_group - 1 - np.argmax(group_sel[:, ::-1], axis=1)
                        g = np.where(hit.any(axis=1), np.argmax(hit, axis=1), last_sel)
                    else:
                        g = g_lo // group_size
                    cand = g * group_size + alias_bits_np(hp >> np.uint64(_SHIFT_POP), group_size, thr[epoch, dom, layer, g],
                                                          tables.alias_idx[epoch, dom, layer, g])
                    ok = need & ~taken(cand)
                    pick = np.where(ok, cand, pick)
                need = pick < 0
                if need.any():
                    experts = np.arange(E)[None, :]
                    if algo == 1:
                        allow = np.repeat(group_sel, group_size, axis=1)
                    else:
                        allow = (experts >= g_lo[:, None]) & (experts < g_hi[:, None])
                    used = (chosen[:, :j, None] == experts[:, None, :]).any(axis=1) if j else np.zeros((n, E), dtype=bool)
                    free = allow & ~used
                    pick = np.where(need, np.argmax(free, axis=1), pick)
                active = ~done
                chosen[:, j] = np.where(active, pick, chosen[:, j])
                null = (uniform_np(seed, t, layer, j, _D_NULL) < profile.null_rate) if profile.null_rate > 0 else np.zeros(n, bool)
                result[:, j] = np.where(active & ~null, pick, -1)
                if algo == 3:
                    mass = mass + np.where(active, rows[np.arange(n), pick] - lo_of[np.arange(n), pick], 0.0)
                    done = done | (mass >= profile.dynamic_threshold)
            out[t, layer] = result
            prev[seqs, layer] = chosen
            above = chosen
    return out


# ---------------------------------------------------------------------------------------------
# Post-processing and the algorithms that are not per-token sequential
# ---------------------------------------------------------------------------------------------


def drop_over_capacity(ids: np.ndarray, num_experts: int, capacity_factor: float, batch: int) -> np.ndarray:
    """Capacity factor with token dropping: in each step of ``batch`` consecutive tokens, an
    expert keeps its first ``ceil(capacity_factor * batch * k / num_experts)`` assignments in
    token order; the rest become -1."""
    tokens, layers, k = ids.shape
    out = ids.copy()
    for start in range(0, tokens, batch):
        block = out[start : start + batch]
        cap = int(np.ceil(capacity_factor * block.shape[0] * k / num_experts))
        for layer in range(layers):
            flat = block[:, layer, :].reshape(-1)
            valid = flat >= 0
            order = np.argsort(np.where(valid, flat, num_experts), kind="stable")
            sorted_ids = flat[order]
            first = np.searchsorted(sorted_ids, sorted_ids, side="left")
            rank = np.arange(sorted_ids.size) - first
            drop = np.zeros(flat.size, dtype=bool)
            drop[order] = (rank >= cap) & (sorted_ids < num_experts)
            flat[drop] = -1
            block[:, layer, :] = flat.reshape(-1, k)
    return out


def _expert_choice(profile: RoutingProfile, tables: Tables, seed: int, tokens: int) -> np.ndarray:
    """Expert choice: in each step of ``capacity_batch`` tokens every expert takes the
    ``batch * top_k / num_experts`` tokens with the highest score (log popularity of the token's
    domain plus Gumbel noise). A token may get 0 to ``2 * top_k`` experts (more are cut)."""
    E, L, k = profile.num_experts, profile.num_layers, profile.top_k
    width = 2 * k
    out = np.full((tokens, L, width), -1, dtype=np.int16)
    seq_of = np.searchsorted(tables.seq_start, np.arange(tokens), side="right") - 1
    dom = tables.seq_domain[seq_of]
    epoch = np.minimum(np.arange(tokens) // profile.drift_interval, tables.cdf.shape[0] - 1)
    for start in range(0, tokens, profile.capacity_batch):
        t = np.arange(start, min(start + profile.capacity_batch, tokens))
        cap = max(1, int(round(t.size * k / E)))
        for layer in range(L):
            rows = tables.cdf[epoch[t], dom[t], layer]
            p = np.diff(np.concatenate([np.zeros((t.size, 1)), rows], axis=1), axis=1)
            u = np.stack([uniform_np(seed, t, layer, e % 256, 64 + e // 256) for e in range(E)], axis=1)
            score = np.log(np.maximum(p, 1e-300)) - np.log(-np.log(np.clip(u, 1e-300, 1.0 - 1e-16)))
            top_tokens = np.argsort(-score, axis=0, kind="stable")[:cap]  # [cap, E]
            picked = np.zeros((t.size, E), dtype=bool)
            picked[top_tokens, np.arange(E)[None, :]] = True
            order = np.argsort(~picked, axis=1, kind="stable")[:, :width]
            ids = np.where(np.take_along_axis(picked, order, axis=1), order, -1)
            out[t, layer] = ids
    return out


def _hash_routing(profile: RoutingProfile, tables: Tables, seed: int, tokens: int) -> np.ndarray:
    """Hash routing: token ids come from a Zipf vocabulary (repeating the previous token's id
    with probability ``locality``); choice ``j`` at a layer is a fixed hash of (id, layer, j)."""
    E, L, k = profile.num_experts, profile.num_layers, profile.top_k
    t = np.arange(tokens)
    ranks = np.arange(1, profile.vocab + 1, dtype=np.float64)
    vocab_cdf = np.cumsum(1.0 / ranks ** 1.1)
    vocab_cdf /= vocab_cdf[-1]
    ids = np.searchsorted(vocab_cdf, uniform_np(seed, t, 0, 0, 250), side="right").clip(0, profile.vocab - 1)
    repeat = uniform_np(seed, t, 0, 0, 251) < float(tables.locality[0])
    first = np.isin(t, tables.seq_start[:-1])
    for i in np.flatnonzero(repeat & ~first):  # a repeated id copies its (already final) predecessor
        ids[i] = ids[i - 1]
    out = np.empty((tokens, L, k), dtype=np.int16)
    for layer in range(L):
        for j in range(k):
            h = uniform_np(0xC0FFEE, ids, layer, j, 252)
            out[:, layer, j] = (h * E).astype(np.int64) % E
    # a hash can collide inside one token: move repeats to the next free expert
    for layer in range(L):
        for j in range(1, k):
            for _ in range(k):
                clash = (out[:, layer, :j] == out[:, layer, j : j + 1]).any(axis=1)
                if not clash.any():
                    break
                out[clash, layer, j] = (out[clash, layer, j] + 1) % E
    return out


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------


def generate_tokens(profile: RoutingProfile, tokens: int, seed: int = 0, *, impl: str = "numba",
                    tables: Tables | None = None) -> np.ndarray:
    """A token-level trace ``[tokens, layers, k]`` (int16, -1 for no expert); expert choice
    gives ``2 * top_k`` columns. ``impl`` 'numba' (parallel) or 'numpy' (the reference)."""
    if tokens < 1:
        raise ValueError("tokens must be >= 1")
    tables = tables or build_tables(profile, tokens, seed)
    if profile.algorithm == "expert_choice":
        return _expert_choice(profile, tables, seed, tokens)
    if profile.algorithm == "hash":
        ids = _hash_routing(profile, tables, seed, tokens)
    elif impl == "numpy":
        ids = _reference(profile, tables, seed, tokens)
    elif impl == "numba":
        algo = ALGORITHM_CODES[profile.algorithm]
        ids = np.empty((tokens, profile.num_layers, profile.top_k), dtype=np.int16)
        n_group = profile.n_group if algo in (1, 2) else 1
        subsets = group_subsets(n_group, profile.topk_group, tables.group_mass) if algo == 1 else None
        if subsets is None:  # no set tables: the kernel picks groups one at a time
            subsets = (np.zeros(0), np.zeros(0, dtype=np.int32), np.zeros((0, 1), dtype=np.int64))
        sub_prob, sub_idx, members = subsets
        epochs, domains, _, num_experts = tables.cdf.shape
        dims = np.array([num_experts, profile.num_layers, domains, epochs, profile.top_k, algo, n_group, profile.topk_group,
                         members.shape[0], tables.successors.shape[2]], dtype=np.int64)
        # ravel: views of the (contiguous) tables, not copies
        _generate_kernel(np.uint64(seed), dims, tables.cdf.ravel(), tables.group_mass.ravel(), sub_prob.ravel(), sub_idx.ravel(),
                         members.ravel(), alias_thresholds(tables.alias_prob).ravel(), tables.alias_idx.ravel(),
                         tables.successors.ravel(), tables.seq_start, tables.seq_domain, profile.drift_interval, tables.locality,
                         tables.affinity, profile.null_rate, profile.dynamic_threshold, ids.reshape(-1),
                         (0,) * (algo + 1), (0,) * (2 if num_experts <= 64 else 1), (0,) * profile.top_k,
                         (0,) * (num_experts // n_group), (0,) * (profile.topk_group if algo == 1 else 0))
    else:
        raise ValueError(f"unknown implementation {impl!r}; expected numba or numpy")
    if profile.capacity_factor is not None:
        ids = drop_over_capacity(ids, profile.num_experts, profile.capacity_factor, profile.capacity_batch)
    return ids



def _inclusion(profile: RoutingProfile, seed: int, sample: int) -> np.ndarray:
    """``[domains, layers, experts]``: the share of a token's choices that each expert takes,
    measured on a token-level sample of the same profile (so group limits, affinity and
    dynamic-k shape it exactly as in token-level traces)."""
    base = profile.model_copy(update={"drift": 0.0, "capacity_factor": None})
    tables = build_tables(base, sample, seed)
    ids = generate_tokens(base, sample, seed, tables=tables)
    seq_of = np.searchsorted(tables.seq_start, np.arange(sample), side="right") - 1
    dom = tables.seq_domain[seq_of]
    E = profile.num_experts
    share = np.full((profile.domains, profile.num_layers, E), 1.0 / E)
    for d in range(profile.domains):
        mine = ids if profile.domains == 1 else ids[dom == d]  # one domain: no copy of the whole sample
        if mine.shape[0] == 0:
            continue
        counts = tokens_per_expert(mine, E, mine.shape[0])[0].astype(np.float64)
        share[d] = (counts + 0.5) / (counts + 0.5).sum(axis=1, keepdims=True)  # a half-count prior: never exactly 0
    return share


def generate_counts(profile: RoutingProfile, steps: int, batch: int, seed: int = 0, *, sample: int | None = None) -> np.ndarray:
    """Count-level loads ``[steps, layers, experts]`` for steps of ``batch`` concurrent
    sequences, one token each (a decode batch), without drawing every token.

    Each expert's share of the choices is measured once on a token-level sample of the same
    profile; each step draws the batch's fresh choices from it (per domain of the sequences in
    the batch), while a choice repeats the previous step's with probability ``locality`` when its
    sequence goes on (sequences end at rate ``1 / seq_len``). Drift rescales the shares by each
    epoch's popularity; expert choice fills every expert to capacity; a capacity factor caps
    each expert's count. Aggregated token-level traces agree with these loads in the mean
    share of each expert and in the per-step imbalance (a test shows it).
    """
    if steps < 1 or batch < 1:
        raise ValueError("steps and batch must be >= 1")
    E, L, k, D = profile.num_experts, profile.num_layers, profile.top_k, profile.domains
    if profile.algorithm == "expert_choice":
        cap = max(1, int(round(batch * k / E)))
        return np.full((steps, L, E), cap, dtype=np.int32)
    rng = np.random.default_rng([seed, 0xC0C0])
    share = _inclusion(profile, seed, sample or max(20_000, 50 * E))
    tables = build_tables(profile, steps * batch, seed)
    popularity = np.diff(tables.cdf, axis=-1, prepend=0.0)  # [epochs, domains, layers, experts]
    locality = profile.per_layer("locality")
    per_token = share.copy()
    slot_domain = rng.integers(0, D, size=batch)
    out = np.zeros((steps, L, E), dtype=np.int32)
    previous = np.zeros((L, E), dtype=np.int64)
    cap = int(np.ceil(profile.capacity_factor * batch * k / E)) if profile.capacity_factor else None
    for step in range(steps):
        epoch = min(step * batch // profile.drift_interval, popularity.shape[0] - 1)
        if profile.drift and epoch:
            ratio = popularity[epoch] / np.maximum(popularity[0], 1e-300)
            per_token = share * ratio
            per_token /= per_token.sum(axis=2, keepdims=True)
        ended = rng.random(batch) < 1.0 / profile.seq_len
        slot_domain = np.where(ended, rng.integers(0, D, size=batch), slot_domain)
        continuing = 1.0 - ended.mean() if step else 0.0
        in_domain = np.bincount(slot_domain, minlength=D)
        for layer in range(L):
            kept = rng.binomial(previous[layer], locality[layer] * continuing) if step else np.zeros(E, dtype=np.int64)
            fresh_total = max(0, batch * k - int(kept.sum()))
            mix = (in_domain[:, None] * per_token[:, layer, :]).sum(axis=0)
            fresh = rng.multinomial(fresh_total, mix / mix.sum())
            counts = np.minimum(kept + fresh, batch)  # a token picks an expert at most once
            if cap is not None:
                counts = np.minimum(counts, cap)
            out[step, layer] = counts
            previous[layer] = counts
    return out
