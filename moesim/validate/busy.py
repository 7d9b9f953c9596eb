"""Busy time of a device from the intervals its kernels ran in.

Kernels on different streams overlap, so the time a device was busy is the length of the union
of its kernel intervals, not the sum of their durations. Units are whatever the caller's
timestamps are in (Kineto: microseconds, Nsight Systems: nanoseconds).
"""

from __future__ import annotations

import numpy as np


def merge_intervals(starts, ends) -> tuple[np.ndarray, np.ndarray]:
    """The union of the intervals ``[starts[i], ends[i])`` as sorted, disjoint
    ``(starts, ends)`` arrays; touching intervals are joined."""
    starts = np.asarray(starts, dtype=np.float64)
    ends = np.asarray(ends, dtype=np.float64)
    if starts.size == 0:
        return starts.copy(), ends.copy()
    order = np.argsort(starts, kind="stable")
    starts, ends = starts[order], ends[order]
    reach = np.maximum.accumulate(ends)
    # an interval opens a new block when it starts after everything before it has ended
    opens = np.empty(starts.size, dtype=bool)
    opens[0] = True
    opens[1:] = starts[1:] > reach[:-1]
    block = np.cumsum(opens) - 1
    merged_ends = np.full(int(block[-1]) + 1, -np.inf)
    np.maximum.at(merged_ends, block, reach)
    return starts[opens], merged_ends


def busy_time(starts, ends) -> float:
    """Length of the union of the intervals (same unit as the inputs)."""
    merged_starts, merged_ends = merge_intervals(starts, ends)
    return float((merged_ends - merged_starts).sum())


def clip_intervals(starts, ends, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    """The parts of the intervals that lie inside ``[lo, hi]`` (empty parts dropped)."""
    starts = np.clip(np.asarray(starts, dtype=np.float64), lo, hi)
    ends = np.clip(np.asarray(ends, dtype=np.float64), lo, hi)
    keep = ends > starts
    return starts[keep], ends[keep]
