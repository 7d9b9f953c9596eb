"""Compiled inner loops of a simulated step (Numba), each with a plain reference kept for tests.

:func:`two_microbatch_end`: the end of DeepSeek's two-micro-batch overlap over a step's MoE
layers, the loop :meth:`moesim.sim.step.StepModel._two_microbatch` runs in Python when it also
records spans (the reference); :func:`segment_maxima`: the slowest replica's compute before each
MoE layer; :func:`scaled_floor`: a micro-batch's share of a step's counts.
"""

from __future__ import annotations

import math

import numba
import numpy as np


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
def segment_maxima(compute: np.ndarray, shared: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """``[segments]``: the largest over replicas of ``compute + shared`` ``[layers, replicas]``
    summed over each segment of layers (segment ``m`` from ``starts[m]`` to the next start, the
    last to the end), in one pass instead of NumPy's sum, segment sums and maxima."""
    L, R = compute.shape
    out = np.empty(starts.size)
    for m in range(starts.size):
        stop = starts[m + 1] if m + 1 < starts.size else L
        largest = -np.inf
        for r in range(R):
            total = 0.0
            for l in range(starts[m], stop):
                total += compute[l, r] + shared[l, r]
            largest = max(largest, total)
        out[m] = largest
    return out
