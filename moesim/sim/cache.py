"""Residency policies: which experts of each MoE layer are in HBM when a step needs them.

Each MoE layer has its own set of HBM slots (``capacity`` experts). A step touches every layer
once: the experts its prefetcher brought for the layer are inserted first, then the experts the
step's tokens need are judged against the slots as they were (hit or miss), then the misses the
miss policy loads onto the GPU are inserted. Found by name in :data:`RESIDENCY`:

- ``static``: the ``capacity`` most popular experts stay pinned (per layer, or the most popular
  (layer, expert) pairs of the whole model, or whole layers); a miss is loaded into a transient
  buffer for the step and dropped after it (mixtral-offloading's ``buffer_size``, Fiddler's and
  llama.cpp's fixed placement).
- ``lru``, ``lfu``, ``belady``: an expert cache that evicts the expert with the lowest retention
  priority. The priority is the one :mod:`moesim.routing.stats` defines for its stack-algorithm
  hit-rate curves (:func:`moesim.routing.stats._keeps`; LFU counts every access and breaks ties
  to the more recent, Belady keeps the expert used soonest again), so with no prefetching the
  simulated hit rate of a cache of ``C`` experts equals ``hit_rate_curve(...)[:, C]`` on the same
  accesses (a test shows it). Belady is the oracle upper bound: it reads the next use of each
  expert from the routing trace.

Accesses inside a step are ordered token by token and slot by slot, as the trace lists them,
so recency ties break the way the stack pass breaks them.
"""

from __future__ import annotations

import numba
import numpy as np

from moesim.routing.stats import _MODE, _keeps

NEVER = np.int64(2**62)


@numba.njit(cache=True)
def _victim(res, mode, last, freq, nuse, fut):
    """The resident expert with the lowest retention priority (``res`` lists residents)."""
    worst = res[0]
    for i in range(1, res.size):
        if _keeps(worst, res[i], mode, last, freq, nuse, fut):
            worst = res[i]
    return worst


@numba.njit(cache=True)
def _insert(resident, x, capacity, mode, last, freq, nuse, fut, keep):
    """Put ``x`` in the layer's slots, evicting the lowest-priority expert that ``keep`` does not
    protect when all ``capacity`` slots are taken. Returns the evicted expert, -1 when nothing
    was evicted, -2 when there was no slot to take."""
    if resident[x]:
        return -1
    if capacity <= 0:
        return -2
    count = 0
    for e in range(resident.size):
        if resident[e]:
            count += 1
    evicted = -1
    if count >= capacity:
        cand = np.empty(count, dtype=np.int64)
        n = 0
        for e in range(resident.size):
            if resident[e] and not keep[e]:
                cand[n] = e
                n += 1
        if n == 0:
            return -2  # every slot holds an expert this layer still needs: no room
        evicted = _victim(cand[:n], mode, last, freq, nuse, fut)
        resident[evicted] = False
    resident[x] = True
    return evicted


@numba.njit(cache=True)
def _judge(resident, order, predicted, capacity, mode, last, freq, nuse, fut, clock, pred_nuse):
    """One step at every layer, before the misses are placed: insert each layer's prefetched
    experts, then judge the needed ones (``order[m]``, -1 padded). Returns ``hit`` and
    ``fetched`` (experts the prefetch brought in) as ``[layers, experts]`` masks."""
    M, E = resident.shape
    hit = np.zeros((M, E), dtype=np.bool_)
    fetched = np.zeros((M, E), dtype=np.bool_)
    keep = np.zeros(E, dtype=np.bool_)
    for m in range(M):
        for e in range(E):
            keep[e] = predicted[m, e]  # one prefetched expert must not push out another
        for e in range(E):
            if predicted[m, e] and not resident[m, e]:
                # a prefetched expert has not been used yet: it counts as recent, with its next
                # use still ahead, and its use count unchanged
                clock[0] += 1
                last[m, e] = clock[0]
                nuse[m, e] = pred_nuse[m, e]
                if _insert(resident[m], e, capacity, mode, last[m], freq[m], nuse[m], fut, keep) >= -1:
                    fetched[m, e] = True
        for i in range(order.shape[1]):
            e = order[m, i]
            if e >= 0 and resident[m, e]:
                hit[m, e] = True
    return hit, fetched


@numba.njit(cache=True)
def _touch(resident, order, admit, capacity, mode, last, freq, nuse, fut, clock, next_use):
    """After the judgement: every needed expert (in ``order``) is used, so its recency, count
    and next use advance, and the misses in ``admit`` take a slot."""
    M, E = resident.shape
    # An expert used earlier in the step may be evicted by a later miss of the same step (it has
    # been computed by then): the stack pass of moesim.routing.stats does the same.
    keep = np.zeros(E, dtype=np.bool_)
    for m in range(M):
        for i in range(order.shape[1]):
            e = order[m, i]
            if e < 0:
                continue
            clock[0] += 1
            last[m, e] = clock[0]
            freq[m, e] += 1
            nuse[m, e] = next_use[m, i]
            if admit[m, e]:
                _insert(resident[m], e, capacity, mode, last[m], freq[m], nuse[m], fut, keep)


class Residency:
    """Base of the residency policies: per-layer slots and the statistics the priority reads."""

    name = ""
    dynamic = True  # misses loaded onto the GPU take a slot

    def __init__(self, layers: int, experts: int, capacity: int, popularity: np.ndarray, **_):
        self.layers, self.experts, self.capacity = layers, experts, capacity
        self.resident = np.zeros((layers, experts), dtype=np.bool_)
        self.last = np.zeros((layers, experts), dtype=np.int64)
        self.freq = np.zeros((layers, experts), dtype=np.int64)
        self.nuse = np.full((layers, experts), NEVER, dtype=np.int64)
        self.fut = np.zeros(experts, dtype=np.int64)
        self.clock = np.zeros(1, dtype=np.int64)
        self.mode = _MODE.get(self.name, 0)
        self.popularity = popularity

    def judge(self, order: np.ndarray, predicted: np.ndarray, pred_nuse: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Insert the prefetched experts and judge the needed ones: ``(hit, fetched)``."""
        return _judge(self.resident, order, predicted, self.capacity, self.mode, self.last, self.freq, self.nuse,
                      self.fut, self.clock, pred_nuse)

    def touch(self, order: np.ndarray, admit: np.ndarray, next_use: np.ndarray) -> None:
        """Record the step's uses and place the admitted misses."""
        _touch(self.resident, order, admit, self.capacity, self.mode, self.last, self.freq, self.nuse, self.fut,
               self.clock, next_use)


class LRU(Residency):
    name = "lru"


class LFU(Residency):
    name = "lfu"


class Belady(Residency):
    name = "belady"
    needs_future = True


class Static(Residency):
    """The most popular experts pinned: ``scope`` ``layer`` (the top ``capacity`` of each layer),
    ``global`` (the top ``budget`` (layer, expert) pairs of the model) or ``layers``
    (whole layers from the last one down, as llama.cpp's ``--n-cpu-moe N`` keeps the experts of
    the first N layers on the CPU); or ``pinned``, a ``[layers, experts]`` mask chosen elsewhere
    (the offload planner's lists), which replaces the popularity rule."""

    name = "static"
    dynamic = False

    def __init__(self, layers: int, experts: int, capacity: int, popularity: np.ndarray, *, scope: str = "layer",
                 budget: int | None = None, pinned: np.ndarray | None = None, **_):
        super().__init__(layers, experts, capacity, popularity)
        budget = capacity * layers if budget is None else budget
        if pinned is not None:
            self.resident[:] = pinned
        elif scope == "layer":
            top = np.argsort(-popularity, axis=1, kind="stable")[:, :capacity]
            np.put_along_axis(self.resident, top, True, axis=1)
        elif scope == "global":
            flat = np.argsort(-popularity.ravel(), kind="stable")[:budget]
            self.resident.ravel()[flat] = True
        elif scope == "layers":
            whole = min(budget // experts, layers)
            if whole:
                self.resident[layers - whole:] = True
        else:
            raise ValueError(f"unknown static scope {scope!r}")
        self.pinned = self.resident.copy()

    def judge(self, order, predicted, pred_nuse):
        hit = np.zeros_like(self.resident)
        rows, slots = np.nonzero(order >= 0)
        chosen = order[rows, slots]
        pinned = self.pinned[rows, chosen]
        fetched = predicted & ~self.pinned
        hit[rows[pinned], chosen[pinned]] = True
        hit[rows, chosen] |= fetched[rows, chosen]
        return hit, fetched

    def touch(self, order, admit, next_use):
        pass


RESIDENCY = {cls.name: cls for cls in (Static, LRU, LFU, Belady)}
