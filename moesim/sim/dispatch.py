"""Dispatch policies: which physical expert computes each routed slot.

Every policy takes the slots per physical expert that static placement gives
(:meth:`Placement.split`: each logical expert's slots split over its replicas by weight) and
returns what each physical expert computes, the slots dropped, and any expert weights moved
between ranks for the step. Found by name in :data:`DISPATCH`:

- ``static``: as placed.
- ``capacity``: each physical expert computes at most ``capacity_factor * slots / physical``
  slots (GShard / Switch capacity); the rest are dropped (the token skips that expert).
- ``reroute``: like ``capacity``, but overflow slots go to the physical experts with room, in
  proportion to their room (token rerouting to under-used experts); only what finds no room is
  dropped.
- ``least_loaded``: LLEP-style (least-loaded expert parallelism): while a rank holds more than
  ``1 + tolerance`` times the mean load, the heaviest expert of the heaviest rank gives slots to
  the least-loaded rank, which first receives that expert's weights.
"""

from __future__ import annotations

import numpy as np

from moesim.routing.stream import round_to_total


class Dispatch:
    name = "static"

    def __init__(self, capacity_factor: float = 1.25, tolerance: float = 0.1):
        self.capacity_factor, self.tolerance = capacity_factor, tolerance

    def assign(self, physical: np.ndarray, ranks: int, expert_bytes: float) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """``physical``: ``[layers, physical experts]`` slots. Returns the slots computed (same
        shape), the slots dropped per layer, and the weight bytes moved ``[layers, ranks, ranks]``
        (``None`` when nothing moves)."""
        return physical, np.zeros(physical.shape[0], dtype=np.int64), None

    def _cap(self, physical: np.ndarray) -> np.ndarray:
        total = physical.sum(axis=1, keepdims=True)
        return np.ceil(self.capacity_factor * total / physical.shape[1]).astype(np.int64)


class Capacity(Dispatch):
    name = "capacity"

    def assign(self, physical, ranks, expert_bytes):
        kept = np.minimum(physical, self._cap(physical))
        return kept, (physical - kept).sum(axis=1), None


class Reroute(Dispatch):
    name = "reroute"

    def assign(self, physical, ranks, expert_bytes):
        cap = self._cap(physical)
        kept = np.minimum(physical, cap)
        overflow = (physical - kept).sum(axis=1)
        room = cap - kept
        moved = np.minimum(overflow, room.sum(axis=1))
        extra = round_to_total(room.astype(np.float64), moved) if moved.any() else 0
        return kept + extra, overflow - moved, None


class LeastLoaded(Dispatch):
    name = "least_loaded"

    def assign(self, physical, ranks, expert_bytes):
        L, P = physical.shape
        per_rank = P // ranks
        out = physical.copy()
        moved = np.zeros((L, ranks, ranks))
        helpers: list[tuple[int, int, int, int]] = []  # (layer, slot, helper rank, slots)
        for layer in range(L):
            loads = out[layer].reshape(ranks, per_rank).sum(axis=1).astype(np.float64)
            limit = (1 + self.tolerance) * loads.mean()
            for _ in range(ranks):
                heavy, light = int(loads.argmax()), int(loads.argmin())
                if loads[heavy] <= limit or heavy == light:
                    break
                slot = heavy * per_rank + int(out[layer, heavy * per_rank : (heavy + 1) * per_rank].argmax())
                give = int(min(out[layer, slot], (loads[heavy] - loads[light]) // 2, loads[heavy] - limit + 1))
                if give <= 0:
                    break
                out[layer, slot] -= give
                loads[heavy] -= give
                loads[light] += give
                moved[layer, heavy, light] += expert_bytes
                helpers.append((layer, slot, light, give))
        # a helper computes its borrowed slots with the expert's weights: count them on one of
        # its own slots' rows (the grouped GEMM sees one more expert's rows)
        computed = out
        if helpers:
            extra = np.zeros((L, ranks), dtype=np.int64)
            for layer, _, rank, give in helpers:
                extra[layer, rank] += give
            computed = np.concatenate([out.reshape(L, ranks, per_rank), extra[:, :, None]], axis=2).reshape(L, -1)
        return computed, np.zeros(L, dtype=np.int64), (moved if helpers else None)


DISPATCH = {cls.name: cls for cls in (Dispatch, Capacity, Reroute, LeastLoaded)}
