"""Compiled inner loops of a simulated step (Numba), each with a plain reference kept for tests.

:func:`two_microbatch_end`: the end of DeepSeek's two-micro-batch overlap over a step's MoE
layers, the loop :meth:`moesim.sim.step.StepModel._two_microbatch` runs in Python when it also
records spans (the reference); :func:`segment_maxima`: the slowest replica's compute before each
MoE layer; :func:`scaled_floor`: a micro-batch's share of a step's counts; :func:`rank_slots` and
:func:`exchange_maxima`: the expert-parallel layers' per-rank slots and all-to-all maxima;
:func:`busy_seconds`: a step's compute seconds per replica and per rank;
:func:`classify`: the scheduler's view of the running sequences.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from moesim.routing.stream import _pairwise_sum


@numba.njit(cache=True)
def two_microbatch_end(segs: np.ndarray, xs: np.ndarray, dispatch: np.ndarray, combine: np.ndarray) -> float:
    """Seconds until both micro-batches have left the last MoE layer. Arguments ``[2, layers]``:
    each half's compute before the layer's dispatch (the slowest replica), its experts (the
    slowest rank), its dispatch and its combine. One compute and one communication stream;
    a half's dispatch waits for its compute, its experts for its dispatch, its next layer for
    its combine."""
    comp = comm = 0.0
    done0 = done1 = 0.0  # each half's last combine
    for m in range(segs.shape[1]):
        start = max(comp, done0)
        comp = start + segs[0, m]
        comm = max(comm, comp) + dispatch[0, m]
        end0 = comm
        start = max(comp, done1)
        comp = start + segs[1, m]
        comm = max(comm, comp) + dispatch[1, m]
        end1 = comm
        comp = max(comp, end0) + xs[0, m]
        comm = max(comm, comp) + combine[0, m]
        done0 = comm
        comp = max(comp, end1) + xs[1, m]
        comm = max(comm, comp) + combine[1, m]
        done1 = comm
    return max(comp, comm)


@numba.njit(cache=True)
def scaled_floor(counts: np.ndarray, share: float, offset: float, out: np.ndarray) -> None:
    """``out[:] = np.floor(counts * share + offset)`` over 1-D arrays (whole counts in and out),
    with NumPy's roundings (a product, then a sum, neither fused); one pass instead of NumPy's
    four over a step's ~15,000 counts."""
    for i in range(counts.size):
        out[i] = math.floor(counts[i] * share + offset)


@numba.njit(cache=True)
def segment_maxima(compute: np.ndarray, shared: np.ndarray, starts: np.ndarray, stop: int) -> np.ndarray:
    """``[loads, segments]``: for each load, the largest over replicas of ``compute + shared``
    ``[loads, layers, replicas]`` summed over each segment of layers (segment ``m`` from
    ``starts[m]`` to the next start, the last to ``stop``), in one pass instead of NumPy's sum,
    segment sums and maxima."""
    n, _, R = compute.shape
    out = np.empty((n, starts.size))
    for i in range(n):
        for m in range(starts.size):
            end = starts[m + 1] if m + 1 < starts.size else stop
            largest = -np.inf
            for r in range(R):
                total = 0.0
                for l in range(starts[m], end):
                    total += compute[i, l, r] + shared[i, l, r]
                largest = max(largest, total)
            out[i, m] = largest
    return out


@numba.njit(cache=True)
def rank_slots(rows: np.ndarray, experts: np.ndarray) -> np.ndarray:
    """``[layers, ranks]``: the slots each rank computes, from ``rows`` ``[layers, ranks, local
    experts]`` (whole counts); ``experts`` (seconds, same leading shape) is zeroed in place where
    a rank has none."""
    L, R, E = rows.shape
    out = np.empty((L, R))
    for l in range(L):
        for r in range(R):
            total = 0
            for e in range(E):
                total += rows[l, r, e]
            out[l, r] = total
            if total == 0:
                experts[l, r] = 0.0
    return out


@numba.njit(cache=True)
def exchange_maxima(dispatch: np.ndarray, combine: np.ndarray, slots: np.ndarray, latency: float, loads: int):
    """From each rank's dispatch and combine seconds and slots ``[loads * layers, ranks]``: the
    layers' dispatch and combine seconds (the slowest rank, plus ``latency`` where any slot
    moves) ``[loads * layers]``, and per load the seconds each rank's links are busy and its
    slots, summed over the layers in order ``[loads, ranks]``."""
    rows, R = dispatch.shape
    M = rows // loads
    D, C = np.empty(rows), np.empty(rows)
    busy, received = np.zeros((loads, R)), np.zeros((loads, R))
    for i in range(rows):
        load = i // M
        d_max, c_max, moved = -np.inf, -np.inf, 0.0
        for r in range(R):
            d_max = max(d_max, dispatch[i, r])
            c_max = max(c_max, combine[i, r])
            moved += slots[i, r]
            busy[load, r] += dispatch[i, r] + combine[i, r]
            received[load, r] += slots[i, r]
        extra = latency if moved > 0 else 0.0
        D[i], C[i] = d_max + extra, c_max + extra
    return D, C, busy, received


@numba.njit(cache=True)
def classify(ids: np.ndarray, lengths: np.ndarray, prefilled: np.ndarray, target: np.ndarray, context: np.ndarray,
             block_size: int, chunked: bool):
    """The running sequences ``ids`` (replica by replica, ``lengths`` of each) seen by the
    scheduler: each one's replica, whether it decodes this step (its prompt is prefilled;
    without chunked prefill, and no prompt of its replica still waits), whether that decode
    token starts a new KV block (``context`` a multiple of ``block_size`` tokens), the new
    blocks per replica, and whether it still has prompt tokens to prefill."""
    n, R = ids.size, lengths.size
    rep = np.empty(n, dtype=np.int64)
    dec, grow, prefilling = np.empty(n, dtype=np.bool_), np.empty(n, dtype=np.bool_), np.empty(n, dtype=np.bool_)
    grow_per = np.zeros(R, dtype=np.int64)
    i = 0
    for r in range(R):
        start = i
        waiting = False
        for _ in range(lengths[r]):
            q = ids[i]
            rep[i] = r
            prefilling[i] = prefilled[q] < target[q]
            waiting |= prefilling[i]
            i += 1
        for j in range(start, i):
            dec[j] = not prefilling[j] and (chunked or not waiting)
            grow[j] = dec[j] and context[ids[j]] % block_size == 0
            grow_per[r] += grow[j]
    return rep, dec, grow, grow_per, prefilling


@numba.njit(cache=True)
def _add_layer_sums(values: np.ndarray, out: np.ndarray) -> None:
    """Adds to ``out`` ``[columns]`` ``values`` ``[loads, layers, columns]`` summed over its loads
    (first axis), then over its layers, in NumPy's order for ``values.sum(axis=0).sum(axis=0)``:
    layer after layer onto each column (rows read in memory order), pairwise
    (:func:`_pairwise_sum`) when there is one column, a contiguous run."""
    n, L, R = values.shape
    if R == 1:
        per_layer = np.empty(L)
        for l in range(L):
            x = values[0, l, 0]
            for i in range(1, n):
                x += values[i, l, 0]
            per_layer[l] = x
        out[0] += 0.0 + _pairwise_sum(per_layer, 0, L)
        return
    total = np.zeros(R)
    for l in range(L):
        for r in range(R):
            x = values[0, l, r]
            for i in range(1, n):
                x += values[i, l, r]
            total[r] += x
    for r in range(R):
        out[r] += total[r]


@numba.njit(cache=True)
def busy_seconds(compute: np.ndarray, shared: np.ndarray, head: np.ndarray, experts: np.ndarray):
    """A step's seconds of compute outside the routed experts per replica, and of routed experts
    per rank, from its loads' (micro-batches') per-layer seconds ``compute`` and ``shared``
    ``[loads, layers, replicas]``, ``head`` ``[loads, replicas]`` and ``experts`` ``[loads, moe
    layers, ranks]``: the loads summed first, then the layers (:func:`_add_layer_sums`), in one
    pass instead of NumPy's seven, with the same additions in the same order (the same
    roundings)."""
    R = compute.shape[2]
    attention = np.zeros(R)
    _add_layer_sums(compute, attention)
    _add_layer_sums(shared, attention)
    for r in range(R):
        h = head[0, r]
        for i in range(1, head.shape[0]):
            h += head[i, r]
        attention[r] += h
    routed = np.zeros(experts.shape[2])
    _add_layer_sums(experts, routed)
    return attention, routed
