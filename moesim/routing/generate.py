"""Routing trace generators: token-level ``[tokens, layers, k]`` and count-level
``[steps, layers, experts]``, from a :class:`RoutingProfile`.

Every random number is a counter-based hash of (seed, token, layer, slot, draw), not a draw
from a stateful generator. So the Numba kernel (parallel over sequences) and the NumPy reference
(vectorised over sequences) give bit-identical traces, the result does not depend on the number
of threads, and the same seed always gives the same trace.

Choices at one (token, layer), slot by slot:

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

from moesim.routing.profile import RoutingProfile, Tables, build_tables
from moesim.routing.trace import tokens_per_expert

_TRIES = 16
_BELOW_ONE = 1.0 - 2.0**-53
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)

# Draw numbers inside one (token, layer, slot): draw 0's 64 bits hold the locality test (bits
# 0-15), the affinity test (bits 16-31), the successor pick (bits 32-39, so ``fanout`` <= 256)
# and the first popularity attempt (bits 40-63); the null test and the later popularity
# attempts take a draw of their own. The group selection of a
# (token, layer) takes 16-bit fields of the draws of slot _GROUP_SLOT + i // 4. One hash thus
# serves the common path of a slot, which sets the kernel's speed.
_D_TESTS, _D_NULL, _D_POP = 0, 3, 4
_SHIFT_LOCAL, _SHIFT_AFFINE, _SHIFT_SUCC, _SHIFT_POP = 0, 16, 32, 40
_GROUP_SLOT = 200  # slot numbers from here on are group-selection draws

ALGORITHM_CODES = {"token_choice": 0, "group_limited": 1, "grouped": 2, "dynamic_k": 3}


@numba.njit(inline="always", cache=True, error_model="numpy")
def _hash(seed, token, layer, slot, draw):
    key = (np.uint64(layer) * np.uint64(256) + np.uint64(slot)) * np.uint64(256) + np.uint64(draw)
    x = np.uint64(seed) * _GOLDEN ^ np.uint64(token) * _MIX1 ^ key * _MIX2
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


@numba.njit(inline="always", cache=True, error_model="numpy")
def _uniform(seed, token, layer, slot, draw):
    # through int64: the 53-bit value fits, and a signed conversion is one instruction
    return float(np.int64(_hash(seed, token, layer, slot, draw) >> np.uint64(11))) * (1.0 / 9007199254740992.0)


@numba.njit(inline="always", cache=True, error_model="numpy")
def _field(h, shift):
    """A 16-bit uniform in [0, 1) from bits ``shift``.. of hash ``h``."""
    return float(np.int64((h >> np.uint64(shift)) & np.uint64(0xFFFF))) * (1.0 / 65536.0)


@numba.njit(inline="always", cache=True, error_model="numpy")
def _succ_field(h):
    """An 8-bit uniform in [0, 1) from bits 32-39 of hash ``h``: the successor pick."""
    return float(np.int64((h >> np.uint64(_SHIFT_SUCC)) & np.uint64(0xFF))) * (1.0 / 256.0)


@numba.njit(inline="always", cache=True, error_model="numpy")
def _pop_field(h):
    """A 24-bit uniform in [0, 1) from bits 40-63 of hash ``h``: the first popularity attempt."""
    return float(np.int64(h >> np.uint64(_SHIFT_POP))) * (1.0 / 16777216.0)


def hash_np(seed: int, token: np.ndarray, layer: int, slot: int, draw: int) -> np.ndarray:
    """The same hash as the Numba kernel's, vectorised over ``token``."""
    with np.errstate(over="ignore"):  # the hash relies on uint64 wrap-around
        key = (np.uint64(layer) * np.uint64(256) + np.uint64(slot)) * np.uint64(256) + np.uint64(draw)
        x = np.uint64(seed) * _GOLDEN ^ np.asarray(token, dtype=np.uint64) * _MIX1 ^ key * _MIX2
        x = (x ^ (x >> np.uint64(30))) * _MIX1
        x = (x ^ (x >> np.uint64(27))) * _MIX2
        return x ^ (x >> np.uint64(31))


def uniform_np(seed: int, token: np.ndarray, layer: int, slot: int, draw: int) -> np.ndarray:
    return (hash_np(seed, token, layer, slot, draw) >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)


def field_np(h: np.ndarray, shift: int) -> np.ndarray:
    return ((h >> np.uint64(shift)) & np.uint64(0xFFFF)).astype(np.float64) * (1.0 / 65536.0)


def succ_field_np(h: np.ndarray) -> np.ndarray:
    return ((h >> np.uint64(_SHIFT_SUCC)) & np.uint64(0xFF)).astype(np.float64) * (1.0 / 256.0)


def pop_field_np(h: np.ndarray) -> np.ndarray:
    return (h >> np.uint64(_SHIFT_POP)).astype(np.float64) * (1.0 / 16777216.0)


# ---------------------------------------------------------------------------------------------
# Numba kernel
# ---------------------------------------------------------------------------------------------


@numba.njit(inline="always", cache=True, error_model="numpy")
def _at(cdf, ep, dom, layer, i):
    """Cumulative popularity through expert ``i`` (0 before expert 0)."""
    return 0.0 if i < 0 else cdf[ep, dom, layer, i]


@numba.njit(inline="always", cache=True, error_model="numpy")
def _taken(cand, chosen, j):
    for i in range(j):
        if chosen[i] == cand:
            return True
    return False


@numba.njit(inline="always", cache=True, error_model="numpy")
def _allowed(cand, algo, g_lo, g_hi, group_of, group_sel):
    if algo == 1:
        return group_sel[group_of[cand]]
    return g_lo <= cand < g_hi


@numba.njit(inline="always", cache=True, error_model="numpy")
def _popularity_draw(u, algo, sel_mass, n_sel, sel_list, sel_before, sel_inv, g, group_size, alias_prob, alias_idx, ep, dom, layer):
    """The expert that uniform ``u`` picks from the popularity of the allowed experts: under
    group-limited routing first a chosen group by mass (``sel_before``: the mass of the chosen
    groups before each, ``sel_inv``: the inverse of each one's mass, 0 for none), then an expert inside the group ``g`` by its alias table. The group is found
    by counting, not by a loop that exits at a random point (a mispredicted branch per draw)."""
    if algo == 1:
        target = u * sel_mass
        si = 0
        for q in range(1, n_sel):
            si += sel_before[q] <= target
        g = sel_list[si]
        u = min(max((target - sel_before[si]) * sel_inv[si], 0.0), _BELOW_ONE)
    x = u * group_size
    i = int(x)
    other = np.int64(x - i >= alias_prob[ep, dom, layer, g, i])
    i += other * (alias_idx[ep, dom, layer, g, i] - i)
    return g * group_size + i


@numba.njit(inline="always", cache=True, error_model="numpy")
def _route_one(seed, t, layer, cdf, gmass, alias_prob, alias_idx, ep, dom, k, E, algo, n_group, topk_group, prev, succ, fan,
               locality, affinity, null_rate, threshold, out, chosen, group_sel, gm, cum, sel_list, sel_before, sel_inv, group_of):
    """Route token ``t`` at ``layer``: writes ``out[layer, :k]`` (-1 for no expert) and the
    choices before null-dropping into ``chosen``. ``prev[layer]`` holds the previous token's
    choices at this layer, ``prev[layer - 1]`` already this token's at the layer above."""
    group_size = E // n_group
    sel_mass = 0.0
    n_sel = 0
    if algo == 1:  # group-limited: pick topk_group groups by mass, without replacement
        # cum[g]: the open mass of groups 0..g; a pick is the number of groups whose cum lies
        # at or below the target (independent compares, not a chain of dependent adds), and
        # picking a group takes its mass off the groups from it on.
        acc = 0.0
        for g in range(n_group):
            group_sel[g] = False
            gm[g] = gmass[ep, dom, layer, g]
            acc += gm[g]
            cum[g] = acc
        hg = np.uint64(0)
        for i in range(topk_group):
            if i % 4 == 0:
                hg = _hash(seed, t, layer, _GROUP_SLOT + i // 4, 0)
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
            m = gm[pick]
            sel_mass += m
            for g in range(pick, n_group):
                cum[g] -= m
            cum[pick] = cum[pick - 1] if pick > 0 else 0.0
        acc = 0.0
        for g in range(n_group):  # the chosen groups in index order, for the draws below
            if group_sel[g]:
                sel_list[n_sel] = g
                sel_before[n_sel] = acc
                sel_inv[n_sel] = 1.0 / gm[g] if gm[g] > 0.0 else 0.0
                acc += gm[g]
                n_sel += 1
    for j in range(k):
        chosen[j] = -1
        out[layer, j] = -1
    mass = 0.0
    g_fix = 0
    g_lo = 0
    g_hi = E
    for j in range(k):
        if algo == 2:
            g_fix = j // (k // n_group)
            g_lo = g_fix * group_size
            g_hi = g_lo + group_size
        h = _hash(seed, t, layer, j, _D_TESTS)
        pick = -1
        # 1. temporal locality
        cand = prev[layer, j]
        if locality > 0.0 and cand >= 0 and _field(h, _SHIFT_LOCAL) < locality:
            if _allowed(cand, algo, g_lo, g_hi, group_of, group_sel) and not _taken(cand, chosen, j):
                pick = cand
        # 2. cross-layer affinity
        if pick < 0 and affinity > 0.0 and prev[layer - 1, j] >= 0 and _field(h, _SHIFT_AFFINE) < affinity:
            cand = succ[layer - 1, prev[layer - 1, j], int(_succ_field(h) * fan)]
            if _allowed(cand, algo, g_lo, g_hi, group_of, group_sel) and not _taken(cand, chosen, j):
                pick = cand
        # 3. popularity, the first attempt from the same hash
        if pick < 0:
            for attempt in range(_TRIES):
                u = _pop_field(h) if attempt == 0 else _uniform(seed, t, layer, j, _D_POP + attempt)
                cand = _popularity_draw(u, algo, sel_mass, n_sel, sel_list, sel_before, sel_inv, g_fix, group_size, alias_prob, alias_idx,
                                        ep, dom, layer)
                if not _taken(cand, chosen, j):
                    pick = cand
                    break
            if pick < 0:
                for cand in range(E):
                    if _allowed(cand, algo, g_lo, g_hi, group_of, group_sel) and not _taken(cand, chosen, j):
                        pick = cand
                        break
        chosen[j] = pick
        if null_rate > 0.0 and _uniform(seed, t, layer, j, _D_NULL) < null_rate:
            out[layer, j] = -1
        else:
            out[layer, j] = pick
        if algo == 3:
            mass += cdf[ep, dom, layer, pick] - _at(cdf, ep, dom, layer, pick - 1)
            if mass >= threshold:
                break


@numba.njit(parallel=True, cache=True, error_model="numpy")
def _generate_kernel(seed, cdf, gmass, alias_prob, alias_idx, successors, seq_start, seq_domain, interval, locality, affinity, k,
                     algo, n_group, topk_group, null_rate, threshold, out):
    tokens, L, _ = out.shape
    E = cdf.shape[3]
    epochs = cdf.shape[0]
    fan = successors.shape[2]
    group_of = np.arange(E) // (E // max(n_group, 1))  # read-only, shared by every sequence
    for s in numba.prange(seq_start.size - 1):
        prev = np.full((L, k), -1, dtype=np.int64)  # the previous token's choices, per layer
        chosen = np.empty(k, dtype=np.int64)
        group_sel = np.zeros(max(n_group, 1), dtype=np.bool_)
        gm = np.zeros(max(n_group, 1))
        cum = np.zeros(max(n_group, 1))
        sel_list = np.zeros(max(n_group, 1), dtype=np.int64)
        sel_before = np.zeros(max(n_group, 1))
        sel_inv = np.zeros(max(n_group, 1))
        dom = seq_domain[s]
        for t in range(seq_start[s], seq_start[s + 1]):
            ep = min(t // interval, epochs - 1)
            token_out = out[t]
            for layer in range(L):
                _route_one(seed, t, layer, cdf, gmass, alias_prob, alias_idx, ep, dom, k, E, algo, n_group, topk_group, prev,
                           successors, fan, locality[layer], affinity[layer] if layer > 0 else 0.0,
                           null_rate, threshold, token_out, chosen, group_sel, gm, cum, sel_list, sel_before, sel_inv, group_of)
                for j in range(k):
                    prev[layer, j] = chosen[j]


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
                cum = np.cumsum(gmass, axis=1)
                each = np.arange(n)
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
                    sel_mass += m
                    cum -= np.where(np.arange(n_group)[None, :] >= pick[:, None], m[:, None], 0.0)
                    cum[each, pick] = np.where(pick > 0, cum[each, np.maximum(pick - 1, 0)], 0.0)
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
                    u = uniform_np(seed, t, layer, j, _D_POP + attempt) if attempt else pop_field_np(h)
                    if algo == 1:
                        target = u * sel_mass
                        gm = np.where(group_sel, tables.group_mass[epoch, dom, layer], 0.0)
                        ends_ = np.cumsum(gm, axis=1)
                        before = np.concatenate([np.zeros((n, 1)), ends_[:, :-1]], axis=1)
                        hit = (ends_ > target[:, None]) & group_sel
                        last_sel = n_group - 1 - np.argmax(group_sel[:, ::-1], axis=1)
                        g = np.where(hit.any(axis=1), np.argmax(hit, axis=1), last_sel)
                        m = gm[np.arange(n), g]
                        with np.errstate(divide="ignore"):
                            inv = np.where(m > 0, 1.0 / m, 0.0)
                        u = np.minimum(np.maximum((target - before[np.arange(n), g]) * inv, 0.0), _BELOW_ONE)
                    else:
                        g = g_lo // group_size
                    x = u * group_size
                    i = x.astype(np.int64)
                    alias_p = tables.alias_prob[epoch, dom, layer, g, i]
                    alias_i = tables.alias_idx[epoch, dom, layer, g, i]
                    cand = g * group_size + np.where(x - i >= alias_p, alias_i, i)
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
        _generate_kernel(np.uint64(seed), tables.cdf, tables.group_mass, tables.alias_prob, tables.alias_idx, tables.successors,
                         tables.seq_start, tables.seq_domain,
                         profile.drift_interval, tables.locality, tables.affinity, profile.top_k, algo,
                         n_group, profile.topk_group, profile.null_rate, profile.dynamic_threshold, ids)
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
        mine = ids[dom == d]
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
