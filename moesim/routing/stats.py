"""Statistics of routing traces: load balance, popularity, locality, caching, affinity.

Load statistics take count-level loads ``[steps, layers, experts]``; locality and cache
statistics take a token-level trace ``[tokens, layers, k]`` (-1 = no expert).

Expert caches are per layer, and their sizes are counted in experts (report them as multiples
of the ``k`` active experts). The hit-rate curves for every cache size come from one pass over
the trace: LRU, LFU and Belady's optimal policy are priority *stack algorithms* (Mattson et al.,
1970), so a cache of ``C`` experts always holds the top ``C`` entries of one priority-ordered
stack, and an access hits a cache of size ``C`` exactly when its stack depth is below ``C``.
A token's ``k`` accesses are judged against the stack as it was before the token.

SRP and SCH follow "Not All Models Suit Expert Offloading" (Liang et al., 2025):

- SRP (segment routing best performance), for segments of ``m`` consecutive tokens: a fixed
  group of experts is predicted for all ``m`` tokens, namely those activated at least ``c``
  times in the segment; pooled over all segments, F1 = 2 matches / (predictions + activations),
  and SRP is the best F1 over the threshold ``c``.
- SCH (segment cache best hit rate), with ``f`` tokens of lookahead: a cache that keeps the
  experts used most in the next ``f`` tokens (ties: most recent) and may fill free slots ahead
  of use, so an expert's first access counts at the depth of the experts seen so far.
"""

from __future__ import annotations

import numba
import numpy as np

POLICIES = ("lru", "lfu", "belady", "sch")
_MODE = {"lru": 0, "lfu": 1, "belady": 2, "sch": 3}


# ---------------------------------------------------------------------------------------------
# Load balance and popularity (count level)
# ---------------------------------------------------------------------------------------------


def imbalance(loads: np.ndarray) -> np.ndarray:
    """Per layer, the mean over steps of max / mean tokens per expert (1 = perfectly even)."""
    loads = np.asarray(loads, dtype=np.float64)
    mean = loads.mean(axis=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(mean > 0, loads.max(axis=2) / mean, np.nan)
    return np.nanmean(ratio, axis=0)


def balancedness(loads: np.ndarray, ep: int) -> np.ndarray:
    """SGLang's balancedness per layer: mean GPU load / max GPU load with experts laid out
    contiguously, ``num_experts / ep`` per GPU, averaged over steps (1 = perfectly even)."""
    loads = np.asarray(loads, dtype=np.float64)
    steps, layers, experts = loads.shape
    if experts % ep:
        raise ValueError(f"EP {ep} does not divide {experts} experts")
    gpu = loads.reshape(steps, layers, ep, experts // ep).sum(axis=3)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(gpu.max(axis=2) > 0, gpu.mean(axis=2) / gpu.max(axis=2), np.nan)
    return np.nanmean(ratio, axis=0)


def popularity(loads: np.ndarray) -> np.ndarray:
    """``[layers, experts]`` share of each layer's routed tokens that went to each expert."""
    total = np.asarray(loads, dtype=np.float64).sum(axis=0)
    sums = total.sum(axis=1, keepdims=True)
    return np.divide(total, sums, out=np.zeros_like(total), where=sums > 0)


# ---------------------------------------------------------------------------------------------
# Stack-algorithm cache passes (token level)
# ---------------------------------------------------------------------------------------------


@numba.njit(cache=True)
def _next_use(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """For each access ``ids[t, j]``, the next token that uses the same expert (a large number
    when none does)."""
    tokens, k = ids.shape
    nxt = np.empty((tokens, k), dtype=np.int64)
    seen = np.full(num_experts, np.int64(2**62), dtype=np.int64)
    for t in range(tokens - 1, -1, -1):
        for j in range(k):
            e = ids[t, j]
            if e >= 0:
                nxt[t, j] = seen[e]
        for j in range(k):
            e = ids[t, j]
            if e >= 0:
                seen[e] = t
    return nxt


@numba.njit(inline="always", cache=True)
def _keeps(a, b, mode, last, freq, nuse, fut):
    """True when expert ``a`` has a higher retention priority than ``b``."""
    if mode == 1:  # LFU, ties to the more recent
        if freq[a] != freq[b]:
            return freq[a] > freq[b]
    elif mode == 2:  # Belady: the sooner next use
        if nuse[a] != nuse[b]:
            return nuse[a] < nuse[b]
    elif mode == 3:  # SCH: more uses ahead in the window
        if fut[a] != fut[b]:
            return fut[a] > fut[b]
    return last[a] > last[b]


@numba.njit(cache=True)
def _lru_depths(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """LRU stack depths in O(log n) each: an expert's depth is the number of experts used more
    recently, counted with a Fenwick tree over access timestamps that marks each expert's
    latest access."""
    tokens, k = ids.shape
    size = tokens * k + 1
    tree = np.zeros(size + 1, dtype=np.int64)
    last = np.full(num_experts, -1, dtype=np.int64)
    out = np.zeros(num_experts + 1, dtype=np.int64)
    live = 0
    clock = 0
    for t in range(tokens):
        for j in range(k):
            e = ids[t, j]
            if e < 0:
                continue
            if last[e] < 0:
                out[num_experts] += 1
            else:
                i = last[e]
                upto = 0
                while i > 0:
                    upto += tree[i]
                    i -= i & -i
                out[live - upto] += 1
        for j in range(k):
            e = ids[t, j]
            if e < 0:
                continue
            clock += 1
            if last[e] >= 0:
                i = last[e]
                while i <= size:
                    tree[i] -= 1
                    i += i & -i
            else:
                live += 1
            i = clock
            while i <= size:
                tree[i] += 1
                i += i & -i
            last[e] = clock
    return out


@numba.njit(cache=True)
def stack_depths(ids: np.ndarray, num_experts: int, mode: int, future: int) -> np.ndarray:
    """Histogram of stack depths of every access of one layer's ``ids`` ``[tokens, k]``:
    ``out[d]`` counts accesses found at depth ``d`` (a hit for any cache larger than ``d``);
    ``out[num_experts]`` counts first accesses, which miss in every demand cache. Under SCH
    (``mode`` 3) a first access counts at the number of experts seen so far instead."""
    if mode == 0:
        return _lru_depths(ids, num_experts)
    tokens, k = ids.shape
    E = num_experts
    out = np.zeros(E + 1, dtype=np.int64)
    stack = np.empty(E, dtype=np.int64)
    pos = np.full(E, -1, dtype=np.int64)
    size = 0
    last = np.zeros(E, dtype=np.int64)
    freq = np.zeros(E, dtype=np.int64)
    nuse = np.zeros(E, dtype=np.int64)
    fut = np.zeros(E, dtype=np.int64)
    nxt = _next_use(ids, E) if mode == 2 else np.zeros((1, 1), dtype=np.int64)
    if mode == 3:
        for t in range(min(future, tokens)):
            for j in range(k):
                if ids[t, j] >= 0:
                    fut[ids[t, j]] += 1
    clock = 0
    for t in range(tokens):
        for j in range(k):  # judge the token against the stack as it was before it
            e = ids[t, j]
            if e < 0:
                continue
            if pos[e] >= 0:
                out[pos[e]] += 1
            elif mode == 3:
                out[min(size, E)] += 1
            else:
                out[E] += 1
        for j in range(k):
            x = ids[t, j]
            if x < 0:
                continue
            clock += 1
            depth = pos[x] if pos[x] >= 0 else size
            if pos[x] < 0:
                size += 1
            if depth > 0:
                carry = stack[0]
                for i in range(1, depth):
                    y = stack[i]
                    if _keeps(carry, y, mode, last, freq, nuse, fut):
                        stack[i] = carry
                        pos[carry] = i
                        carry = y
                stack[depth] = carry
                pos[carry] = depth
            stack[0] = x
            pos[x] = 0
            last[x] = clock
            freq[x] += 1
            if mode == 2:
                nuse[x] = nxt[t, j]
            if mode == 3:
                fut[x] -= 1
        if mode == 3 and t + future < tokens:
            for j in range(k):
                if ids[t + future, j] >= 0:
                    fut[ids[t + future, j]] += 1
    return out


def hit_rate_curve(ids: np.ndarray, num_experts: int, policy: str = "lru", *, future: int = 16) -> np.ndarray:
    """``[layers, num_experts + 1]``: hit rate of a per-layer cache of ``C`` experts, for
    ``C`` = 0 .. ``num_experts``, under ``policy`` (lru, lfu, belady, sch with ``future``
    tokens of lookahead)."""
    if policy not in _MODE:
        raise ValueError(f"unknown cache policy {policy!r}; expected one of {', '.join(POLICIES)}")
    ids = np.asarray(ids)
    layers = ids.shape[1]
    curve = np.zeros((layers, num_experts + 1))
    for layer in range(layers):
        column = np.ascontiguousarray(ids[:, layer, :], dtype=np.int64)
        depths = stack_depths(column, num_experts, _MODE[policy], future)
        total = depths.sum()
        if total:
            curve[layer, 1:] = np.cumsum(depths[:num_experts]) / total
    return curve


def reuse_distance(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """``[layers, num_experts + 1]`` histogram of LRU stack distances (distinct experts used
    since this expert's last use; the last bin counts first uses)."""
    ids = np.asarray(ids)
    return np.stack([stack_depths(np.ascontiguousarray(ids[:, l, :], dtype=np.int64), num_experts, 0, 0)
                     for l in range(ids.shape[1])])


# ---------------------------------------------------------------------------------------------
# SRP, affinity, co-activation
# ---------------------------------------------------------------------------------------------


def repeat_rate(ids: np.ndarray) -> np.ndarray:
    """Per layer, the share of choices that repeat one of the previous token's choices."""
    ids = np.asarray(ids)
    repeats = (ids[1:, :, :, None] == ids[:-1, :, None, :]).any(axis=3) & (ids[1:] >= 0)
    valid = (ids[1:] >= 0).sum(axis=(0, 2))
    return repeats.sum(axis=(0, 2)) / np.maximum(valid, 1)


def first_choice_repeat(ids: np.ndarray) -> np.ndarray:
    """Per layer, how often a token's first choice (slot 0) is the previous token's first
    choice: the "first choice" column of Mixtral's Table 5 (Jiang et al., 2024)."""
    ids = np.asarray(ids)
    valid = (ids[1:, :, 0] >= 0) & (ids[:-1, :, 0] >= 0)
    same = (ids[1:, :, 0] == ids[:-1, :, 0]) & valid
    return same.sum(axis=0) / np.maximum(valid.sum(axis=0), 1)


def overlap_rate(ids: np.ndarray) -> np.ndarray:
    """Per layer, how often a token shares at least one expert with the previous token: the
    "first or second choice" column of Mixtral's Table 5 (1 - C(E-k, k) / C(E, k) at random)."""
    ids = np.asarray(ids)
    shared = ((ids[1:, :, :, None] == ids[:-1, :, None, :]) & (ids[1:, :, :, None] >= 0)).any(axis=(2, 3))
    return shared.mean(axis=0)


def srp(ids: np.ndarray, num_experts: int, segment: int) -> np.ndarray:
    """Per layer SRP for segments of ``segment`` tokens (see the module docstring)."""
    ids = np.asarray(ids)
    tokens, layers, _ = ids.shape
    if segment > tokens:
        raise ValueError(f"segment {segment} is longer than the trace ({tokens} tokens)")
    out = np.zeros(layers)
    for layer in range(layers):
        onehot = np.zeros((tokens + 1, num_experts), dtype=np.int32)
        rows, cols = np.nonzero(ids[:, layer, :] >= 0)
        np.add.at(onehot, (rows + 1, ids[rows, layer, cols].astype(np.int64)), 1)
        prefix = np.cumsum(onehot, axis=0)
        window = prefix[segment:] - prefix[:-segment]  # [segments, experts] activations per segment
        hist = np.stack([np.bincount(window[:, e], minlength=segment + 1) for e in range(num_experts)]).sum(axis=0)
        levels = np.arange(segment + 1)
        matches = np.cumsum((hist * levels)[::-1])[::-1]
        predictions = np.cumsum(hist[::-1])[::-1] * segment
        activations = matches[0]
        f1 = 2 * matches / np.maximum(predictions + activations, 1)
        out[layer] = f1.max()
    return out


def affinity(ids: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """Cross-layer affinity between consecutive layers: ``conditional[l, a, b]`` is
    P(expert ``b`` at layer ``l + 1`` | expert ``a`` at layer ``l``), each token contributing
    every pair of its choices equally, and ``mutual_information[l]`` in bits."""
    ids = np.asarray(ids)
    tokens, layers, k = ids.shape
    conditional = np.zeros((max(layers - 1, 0), num_experts, num_experts))
    mi = np.zeros(max(layers - 1, 0))
    for layer in range(layers - 1):
        a = ids[:, layer, :, None].repeat(k, axis=2).reshape(tokens, -1)
        b = ids[:, layer + 1, None, :].repeat(k, axis=1).reshape(tokens, -1)
        ok = (a >= 0) & (b >= 0)
        joint = np.zeros((num_experts, num_experts))
        np.add.at(joint, (a[ok].astype(np.int64), b[ok].astype(np.int64)), 1.0)
        total = joint.sum()
        if total == 0:
            continue
        p = joint / total
        pa = p.sum(axis=1, keepdims=True)
        pb = p.sum(axis=0, keepdims=True)
        conditional[layer] = np.divide(joint, joint.sum(axis=1, keepdims=True), out=np.zeros_like(joint),
                                       where=joint.sum(axis=1, keepdims=True) > 0)
        nz = p > 0
        mi[layer] = float(np.sum(p[nz] * np.log2(p[nz] / (pa @ pb)[nz])))
    return conditional, mi


def coactivation(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """``[layers, experts, experts]``: how many tokens chose both experts at that layer."""
    ids = np.asarray(ids)
    tokens, layers, k = ids.shape
    out = np.zeros((layers, num_experts, num_experts), dtype=np.int64)
    for layer in range(layers):
        for i in range(k):
            for j in range(i + 1, k):
                a, b = ids[:, layer, i].astype(np.int64), ids[:, layer, j].astype(np.int64)
                ok = (a >= 0) & (b >= 0)
                np.add.at(out[layer], (a[ok], b[ok]), 1)
                np.add.at(out[layer], (b[ok], a[ok]), 1)
    return out


def summary(trace, *, batch: int, ep: int, multiples: list[float], segment: int) -> tuple[dict, dict[str, np.ndarray]]:
    """The statistics ``moesim trace stats`` reports for a :class:`Trace`, as plain data, and the
    full hit-rate curves per policy (token-level traces only). Load statistics use steps of
    ``batch`` tokens; cache sizes are ``multiples`` of the active experts; ``segment`` is SRP's
    segment length and SCH's lookahead."""
    E = trace.num_experts
    loads = trace.loads(batch)
    result = {
        "level": trace.level, "layers": trace.num_layers, "experts": E, "top_k": trace.top_k,
        "imbalance": imbalance(loads).tolist(),
        "balancedness": balancedness(loads, ep).tolist(),
        "popularity_top_share": popularity(loads).max(axis=1).tolist(),
    }
    curves: dict[str, np.ndarray] = {}
    if trace.topk_ids is None:
        return result, curves
    ids = np.asarray(trace.topk_ids)
    k = trace.top_k
    sizes = sorted({min(E, max(1, int(round(m * k)))) for m in multiples})
    result["cache_sizes"] = sizes
    for policy in POLICIES:
        curves[policy] = hit_rate_curve(ids, E, policy, future=segment)
        result[f"hit_rate_{policy}"] = {str(c): float(curves[policy][:, c].mean()) for c in sizes}
    result["srp"] = srp(ids, E, min(segment, ids.shape[0])).tolist()
    result["affinity_mutual_information_bits"] = affinity(ids, E)[1].tolist()
    result["repeat_rate"] = repeat_rate(ids).tolist()
    result["first_choice_repeat"] = first_choice_repeat(ids).tolist()
    result["overlap_rate"] = overlap_rate(ids).tolist()
    return result, curves
