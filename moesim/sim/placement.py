"""Where each expert lives: physical expert slots on the expert-parallel ranks.

A placement is SGLang's ``physical_to_logical_map``: ``phy2log[layer, p]`` is the logical expert
held by physical slot ``p``; slot ``p`` sits on EP rank ``p // slots_per_rank``. A logical expert
held by several slots is replicated, and its tokens are split over the replicas by ``weight``.

Placements come by name from :data:`PLACEMENTS` (``contiguous``: experts ``r*E/ep ...`` on rank
``r``, as vLLM and SGLang lay them out by default; ``round_robin``: expert ``e`` on rank
``e % ep``) or from a JSON / YAML file with a ``physical_to_logical_map`` of
``[layers][physical slots]`` (the file SGLang's ``--init-expert-location`` reads), or one row for
every layer, or a placement plan of ``moesim plan placement`` (its ``decision.phy2log`` and
``decision.weight``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from moesim.errors import InputError
from moesim.files import load_yaml


@dataclass(frozen=True)
class Placement:
    phy2log: np.ndarray  # [layers, physical slots] int
    ranks: int
    weight: np.ndarray | None = None  # [layers, physical slots]: share of its logical expert's tokens

    def __post_init__(self):
        if self.weight is None:  # replicas share their expert's tokens equally
            experts = int(self.phy2log.max()) + 1
            replicas = np.stack([np.bincount(row, minlength=experts) for row in self.phy2log])
            object.__setattr__(self, "weight", 1.0 / np.take_along_axis(replicas, self.phy2log, axis=1))

    @cached_property
    def replicated(self) -> bool:
        """Whether any slot shares its expert's tokens (so :meth:`split` must divide counts)."""
        return bool((self.weight != 1.0).any())

    @cached_property
    def in_order(self) -> bool:
        """Whether slot ``p`` holds expert ``p`` on every layer (contiguous placement: :meth:`split`
        gives the counts as they are)."""
        return self.phy2log.shape[1] == self.phy2log.max() + 1 and bool((self.phy2log == np.arange(self.phy2log.shape[1])).all())

    @property
    def slots_per_rank(self) -> int:
        return self.phy2log.shape[1] // self.ranks

    def split(self, counts: np.ndarray) -> np.ndarray:
        """Slots per physical expert ``[layers, physical]`` from slots per logical expert
        ``[layers, experts]``: each replica gets its weight's share (largest remainder, so the
        total is kept)."""
        L = counts.shape[0]
        if self.phy2log.shape[0] == 1 and not self.replicated:  # one slot per expert: a permutation
            return counts if self.in_order else counts[:, self.phy2log[0]]
        phy2log = np.broadcast_to(self.phy2log, (L, self.phy2log.shape[1]))
        raw = np.take_along_axis(counts, phy2log, axis=1) * self.weight
        out = np.floor(raw + 1e-9).astype(np.int64)
        short = counts - np.rint(_per_logical(out, phy2log, counts.shape[1])).astype(np.int64)
        if short.any():
            # the remainder of each logical expert goes to its replicas with the largest fractions
            frac = raw - out
            for layer, expert in zip(*np.nonzero(short)):
                slots = np.flatnonzero(phy2log[layer] == expert)
                order = slots[np.argsort(-frac[layer, slots], kind="stable")]
                out[layer, order[: short[layer, expert]]] += 1
        return out



def _per_logical(physical: np.ndarray, phy2log: np.ndarray, experts: int) -> np.ndarray:
    """``[layers, experts]``: the sum over each logical expert's physical slots."""
    L = physical.shape[0]
    flat = (phy2log + np.arange(L)[:, None] * experts).ravel()
    return np.bincount(flat, weights=physical.ravel(), minlength=L * experts).reshape(L, experts)


def contiguous(experts: int, ranks: int) -> Placement:
    return Placement(np.arange(experts)[None, :], ranks)


def round_robin(experts: int, ranks: int) -> Placement:
    per = experts // ranks
    return Placement(np.array([r + ranks * s for r in range(ranks) for s in range(per)])[None, :], ranks)


PLACEMENTS = {"contiguous": contiguous, "round_robin": round_robin}


def read_placement(path: str | Path, experts: int, ranks: int, layers: int) -> Placement:
    """A placement file: JSON or YAML with ``physical_to_logical_map`` (``[layers][slots]`` or
    one row for all layers) and optionally ``weight`` of the same shape."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text()) if path.suffix == ".json" else load_yaml(path)
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read the placement: {exc}", source=str(path)) from None
    if isinstance(raw, dict) and raw.get("kind") == "placement" and isinstance(raw.get("decision"), dict):
        # a placement plan of `moesim plan placement`: its decision holds the map and the shares
        decision = raw["decision"]
        raw = {key: decision[name] for key, name in (("physical_to_logical_map", "phy2log"), ("weight", "weight"))
               if name in decision}
    if not isinstance(raw, dict) or "physical_to_logical_map" not in raw:
        raise InputError("expected a mapping with physical_to_logical_map: [layers][physical slots]", source=str(path))
    try:
        phy2log = np.atleast_2d(np.asarray(raw["physical_to_logical_map"], dtype=np.int64))
    except (TypeError, ValueError):
        raise InputError("physical_to_logical_map must be a list of lists of expert ids", source=str(path)) from None
    field = "physical_to_logical_map"
    if phy2log.ndim != 2 or phy2log.shape[0] not in (1, layers):
        raise InputError(f"{field} has shape {phy2log.shape}; expected (1 or {layers} MoE layers, physical slots)", source=str(path))
    if phy2log.shape[1] % ranks:
        raise InputError(f"{field} has {phy2log.shape[1]} physical slots, not a multiple of EP {ranks}", source=str(path))
    if phy2log.min() < 0 or phy2log.max() >= experts:
        raise InputError(f"{field} holds expert ids outside [0, {experts})", source=str(path))
    for layer, row in enumerate(phy2log):
        missing = np.setdiff1d(np.arange(experts), row)
        if missing.size:
            raise InputError(f"{field}[{layer}] places no replica of experts {missing[:5].tolist()}", source=str(path))
    weight = None
    if "weight" in raw:
        weight = np.atleast_2d(np.asarray(raw["weight"], dtype=np.float64))
        if weight.shape != phy2log.shape or (weight < 0).any():
            raise InputError(f"weight must be non-negative with the shape of {field} {phy2log.shape}", source=str(path))
        sums = _per_logical(weight, phy2log, experts)
        if not np.allclose(sums, 1.0, atol=1e-6):
            raise InputError("weight of each logical expert's replicas must sum to 1", source=str(path))
    return Placement(phy2log, ranks, weight)


def make_placement(spec: str, experts: int, ranks: int, layers: int, base_dir: str | Path = ".") -> Placement:
    """A placement by policy name or file path (relative to ``base_dir``)."""
    if spec in PLACEMENTS:
        if experts % ranks:
            raise InputError(f"EP {ranks} does not divide the {experts} experts", field="placement")
        return PLACEMENTS[spec](experts, ranks)
    path = Path(spec)
    path = path if path.is_absolute() else Path(base_dir) / path
    if path.suffix in (".json", ".yaml", ".yml"):
        return read_placement(path, experts, ranks, layers)
    raise InputError(f"unknown placement {spec!r}; expected {', '.join(PLACEMENTS)} or a .json / .yaml file", field="placement")
