"""Calibrate a routing profile to target statistics.

Targets are what a recorded trace shows or a paper reports: load imbalance (max / mean tokens
per expert at a batch size), the repeat rate (how often a token reuses one of the previous
token's experts), the first-choice repeat and overlap rates of Mixtral's routing analysis, LRU
hit rates at given cache sizes, cross-layer mutual information. The fit
adjusts ``skew``, ``locality`` and ``affinity`` (one value for every layer) to minimise the
summed squared relative error, by coordinate-wise golden-section search.

Each candidate profile is evaluated on traces drawn with the same seed: moesim's generator
hashes (seed, token, layer, slot, draw), so two nearby parameter values see the same random
numbers and the objective changes smoothly with the parameters instead of jumping with noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from moesim.routing import stats
from moesim.routing.generate import generate_tokens
from moesim.routing.profile import RoutingProfile
from moesim.routing.trace import tokens_per_expert

BOUNDS = {"skew": (0.0, 3.0), "locality": (0.0, 0.95), "affinity": (0.0, 0.95)}


@dataclass
class Targets:
    """Statistics to match. ``hit_rate`` maps a cache size in experts to the LRU hit rate;
    ``batch`` is the tokens per step for ``imbalance``; ``srp`` maps a segment length to SRP;
    ``sch`` maps a cache size as a multiple of ``top_k`` to SCH with ``sch_future`` tokens of
    lookahead (both as in Liang et al., 2025, averaged over layers)."""

    imbalance: float | None = None
    batch: int = 1024
    repeat_rate: float | None = None
    first_choice_repeat: float | None = None
    overlap_rate: float | None = None
    hit_rate: dict[int, float] = field(default_factory=dict)
    mutual_information: float | None = None
    srp: dict[int, float] = field(default_factory=dict)
    sch: dict[float, float] = field(default_factory=dict)
    sch_future: int = 16

    def values(self) -> dict[str, float]:
        out = {n: getattr(self, n) for n in _SCALARS if getattr(self, n) is not None}
        out.update({f"hit_rate@{c}": v for c, v in sorted(self.hit_rate.items())})
        out.update({f"srp@{m}": v for m, v in sorted(self.srp.items())})
        out.update({f"sch@{rho:g}k,m={self.sch_future}": v for rho, v in sorted(self.sch.items())})
        return out


_SCALARS = ("imbalance", "repeat_rate", "first_choice_repeat", "overlap_rate", "mutual_information")
_LOCAL = {"repeat_rate": stats.repeat_rate, "first_choice_repeat": stats.first_choice_repeat, "overlap_rate": stats.overlap_rate}


def measure(ids: np.ndarray, num_experts: int, targets: Targets) -> dict[str, float]:
    """The statistics named in ``targets``, measured on a token-level trace (mean over layers)."""
    out: dict[str, float] = {}
    if targets.imbalance is not None:
        out["imbalance"] = float(np.mean(stats.imbalance(tokens_per_expert(ids, num_experts, targets.batch))))
    for name, statistic in _LOCAL.items():
        if getattr(targets, name) is not None:
            out[name] = float(np.mean(statistic(ids)))
    if targets.mutual_information is not None:
        mi = stats.affinity(ids, num_experts)[1]
        out["mutual_information"] = float(mi.mean()) if mi.size else 0.0
    if targets.hit_rate:
        curve = stats.hit_rate_curve(ids, num_experts, "lru").mean(axis=0)
        out.update({f"hit_rate@{c}": float(curve[min(c, num_experts)]) for c in sorted(targets.hit_rate)})
    for m in sorted(targets.srp):
        out[f"srp@{m}"] = float(np.mean(stats.srp(ids, num_experts, m)))
    if targets.sch:
        curve = stats.hit_rate_curve(ids, num_experts, "sch", future=targets.sch_future).mean(axis=0)
        k = ids.shape[2]
        for rho in sorted(targets.sch):
            out[f"sch@{rho:g}k,m={targets.sch_future}"] = float(curve[min(num_experts, max(1, round(rho * k)))])
    return out


def targets_from_trace(ids: np.ndarray, num_experts: int, *, batch: int = 1024, cache_sizes: tuple[int, ...] = ()) -> Targets:
    """Targets taken from a recorded token-level trace."""
    probe = Targets(imbalance=1.0, batch=batch, repeat_rate=0.0, hit_rate={c: 0.0 for c in cache_sizes},
                    mutual_information=0.0 if ids.shape[1] > 1 else None)
    got = measure(ids, num_experts, probe)
    return Targets(imbalance=got["imbalance"], batch=batch, repeat_rate=got["repeat_rate"],
                   hit_rate={c: got[f"hit_rate@{c}"] for c in cache_sizes}, mutual_information=got.get("mutual_information"))


@dataclass
class FitResult:
    profile: RoutingProfile
    targets: dict[str, float]
    achieved: dict[str, float]
    error: float
    evaluations: int

    def table(self) -> list[tuple[str, float, float]]:
        return [(name, self.targets[name], self.achieved[name]) for name in self.targets]


def fit(base: RoutingProfile, targets: Targets, *, params: tuple[str, ...] | None = None, tokens: int = 20_000,
        seed: int = 0, rounds: int = 3, tolerance: float = 1e-3) -> FitResult:
    """Fit ``params`` of ``base`` to ``targets``; by default the parameters the targets can
    inform (imbalance and hit rates: skew; repeat rate and hit rates: locality; mutual
    information: affinity)."""
    wanted = targets.values()
    if not wanted:
        raise ValueError("no target statistics to fit")
    if params is None:
        chosen = set()
        local = any(getattr(targets, n) is not None for n in _LOCAL)
        caching = bool(targets.hit_rate or targets.srp or targets.sch)
        if targets.imbalance is not None or caching or targets.first_choice_repeat is not None:
            chosen.add("skew")
        if local or caching:
            chosen.add("locality")
        if targets.mutual_information is not None:
            chosen.add("affinity")
        params = tuple(p for p in BOUNDS if p in chosen)
    evaluations = 0
    cache: dict[tuple, tuple[float, dict]] = {}

    def objective(values: dict[str, float]) -> tuple[float, dict[str, float]]:
        nonlocal evaluations
        key = tuple(round(values[p], 9) for p in params)
        if key not in cache:
            evaluations += 1
            profile = base.model_copy(update=values)
            got = measure(generate_tokens(profile, tokens, seed), profile.num_experts, targets)
            error = sum(((got[n] - v) / max(abs(v), 1e-3)) ** 2 for n, v in wanted.items())
            cache[key] = (error, got)
        return cache[key]

    current = {p: float(np.mean(base.per_layer(p))) for p in params}
    golden = (math.sqrt(5) - 1) / 2
    for _ in range(rounds):
        before = objective(current)[0]
        for p in params:
            low, high = BOUNDS[p]
            a, b = low, high
            c, d = b - golden * (b - a), a + golden * (b - a)
            fc, fd = objective(current | {p: c})[0], objective(current | {p: d})[0]
            while b - a > tolerance * (high - low):
                if fc <= fd:
                    b, d, fd = d, c, fc
                    c = b - golden * (b - a)
                    fc = objective(current | {p: c})[0]
                else:
                    a, c, fc = c, d, fd
                    d = a + golden * (b - a)
                    fd = objective(current | {p: d})[0]
            best = (a + b) / 2
            if objective(current | {p: best})[0] <= objective(current)[0]:
                current[p] = best
        if before - objective(current)[0] < 1e-9:
            break
    error, achieved = objective(current)
    return FitResult(profile=base.model_copy(update=current), targets=wanted, achieved=achieved, error=error,
                     evaluations=evaluations)
