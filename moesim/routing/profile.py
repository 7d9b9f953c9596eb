"""Routing profiles: the parameters of moesim's generative model of a router, and the tables
both generator implementations (Numba and the NumPy reference) draw from.

The model, per MoE layer and token:

- **popularity**: each layer ranks its experts in a random order and gives rank ``r`` a weight
  ``1 / (r + 1) ** skew`` (Zipf); ``skew`` 0 is uniform. A workload mixes ``domains``; each
  domain keeps the layer's top ``committee`` share of experts in place (the "standing
  committee" that takes most of the routing mass across domains) and reshuffles the rest.
  Popularity ``drift``s: every ``drift_interval`` tokens the log-weights take a Gaussian step.
- **temporal locality**: with probability ``locality`` a token's ``j``-th choice repeats the
  previous token's ``j``-th choice at that layer (same sequence).
- **cross-layer affinity**: with probability ``affinity`` the ``j``-th choice at layer ``l + 1``
  is one of ``fanout`` preferred successors of the token's ``j``-th expert at layer ``l``.
- **routing algorithm**: token-choice top-k; group-limited top-k (``n_group`` groups of
  contiguous experts, each token first picks ``topk_group`` groups by their mass); grouped
  experts (MoGE: ``top_k / n_group`` experts from every group); dynamic-k (stop once the chosen
  experts hold ``dynamic_threshold`` of the mass); null experts (a choice is a zero-compute
  expert with probability ``null_rate``); capacity factor with dropping; expert choice; hash.

Traces mark "no expert" (dropped, null, or an unused dynamic-k slot) as -1.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numba
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from moesim.files import load_yaml
from moesim.models.arch import ModelArch

Algorithm = Literal["token_choice", "group_limited", "grouped", "dynamic_k", "expert_choice", "hash"]


class FitRecord(BaseModel):
    """One statistic a profile was fitted to (or checked against, ``held_out``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target: float
    achieved: float
    held_out: bool = False


class RoutingProfile(BaseModel):
    """Parameters of the generative routing model (see the module docstring).

    Per-layer parameters (``skew``, ``locality``, ``affinity``) take one value for every layer
    or a list with one value per MoE layer.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "custom"
    num_experts: int = Field(gt=0)
    top_k: int = Field(gt=0)
    num_layers: int = Field(gt=0, description="MoE layers")
    algorithm: Algorithm = "token_choice"
    skew: float | list[float] = Field(1.0, description="Zipf exponent of expert popularity (0 = uniform)")
    locality: float | list[float] = Field(0.0, description="probability a choice repeats the previous token's")
    affinity: float | list[float] = Field(0.0, description="probability a choice follows the previous layer's expert")
    fanout: int = Field(4, gt=0, le=256, description="preferred successors per expert")
    domains: int = Field(1, gt=0)
    committee: float = Field(0.25, ge=0, le=1, description="share of top experts every domain keeps")
    drift: float = Field(0.0, ge=0, description="std of the log-popularity step per drift interval")
    drift_interval: int = Field(10_000, gt=0, description="tokens between popularity steps")
    seq_len: int = Field(512, gt=0, description="mean tokens per sequence (geometric)")
    n_group: int = Field(1, gt=0)
    topk_group: int = Field(1, gt=0)
    dynamic_threshold: float = Field(0.5, gt=0, le=1)
    null_rate: float = Field(0.0, ge=0, lt=1)
    capacity_factor: float | None = Field(None, gt=0)
    capacity_batch: int = Field(1024, gt=0, description="tokens per step for capacity and expert choice")
    num_shared: int = Field(0, ge=0, description="shared experts: always active, not in the trace")
    vocab: int = Field(32_000, gt=0, description="hash routing: token ids drawn from a Zipf vocabulary")
    source: str = ""
    fitted_to: dict[str, FitRecord] = Field(default_factory=dict, description="statistic: published target and achieved value")

    @model_validator(mode="after")
    def _consistent(self):
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k {self.top_k} exceeds num_experts {self.num_experts}")
        for name in ("skew", "locality", "affinity"):
            value = getattr(self, name)
            if isinstance(value, list) and len(value) != self.num_layers:
                raise ValueError(f"{name} lists {len(value)} values for {self.num_layers} layers")
            values = value if isinstance(value, list) else [value]
            if name != "skew" and any(not 0 <= v <= 1 for v in values):
                raise ValueError(f"{name} must lie in [0, 1]")
            if name == "skew" and any(v < 0 for v in values):
                raise ValueError("skew must be >= 0")
        if self.algorithm in ("group_limited", "grouped"):
            if self.num_experts % self.n_group:
                raise ValueError(f"n_group {self.n_group} does not divide {self.num_experts} experts")
            if self.algorithm == "grouped" and self.top_k % self.n_group:
                raise ValueError(f"grouped routing needs top_k divisible by n_group ({self.top_k} / {self.n_group})")
            if self.algorithm == "group_limited":
                if self.topk_group > self.n_group:
                    raise ValueError(f"topk_group {self.topk_group} exceeds n_group {self.n_group}")
                if self.topk_group * (self.num_experts // self.n_group) < self.top_k:
                    raise ValueError("the chosen groups hold fewer experts than top_k")
        return self

    def per_layer(self, name: str) -> np.ndarray:
        value = getattr(self, name)
        return np.asarray(value if isinstance(value, list) else [value] * self.num_layers, dtype=np.float64)

    def metadata(self) -> dict:
        return self.model_dump()


PROFILES_DIR = Path(__file__).parent / "profiles"
_FITTED = ("skew", "locality", "affinity", "seq_len", "source", "fitted_to")


def model_profile(arch: ModelArch) -> RoutingProfile:
    """The routing profile of a model: its router's shape (experts, top-k, MoE layers, shared
    experts, group-limited routing) and, for the presets, the parameters fitted to published
    statistics (``moesim/routing/profiles/<preset>.yaml``, written by
    ``validation/fit_routing_profiles.py``). A model without one gets the generator's defaults
    and says so in ``source``."""
    if not arch.is_moe:
        raise ValueError(f"{arch.name} has no MoE layers")
    moe = arch.moe
    shape = {"name": arch.name, "num_experts": moe.num_experts, "top_k": moe.top_k, "num_layers": len(arch.moe_layers),
             "num_shared": moe.num_shared_experts,
             "source": "not fitted: no published routing statistics of this model (generator defaults)"}
    if moe.n_group > 1 and moe.topk_group < moe.n_group:
        shape |= {"algorithm": "group_limited", "n_group": moe.n_group, "topk_group": moe.topk_group}
    path = PROFILES_DIR / f"{arch.name}.yaml"
    if path.is_file():
        fitted = load_yaml(path)
        shape |= {key: fitted[key] for key in _FITTED if key in fitted}
    return RoutingProfile.model_validate(shape)


@dataclass(frozen=True)
class Tables:
    """What the samplers read, built once from a profile and a seed.

    ``cdf[epoch, domain, layer, :]`` is the cumulative popularity (last entry 1);
    ``successors[layer, expert, :]`` the preferred experts at ``layer + 1``;
    ``seq_start`` the first token of each sequence (plus the total at the end) and
    ``seq_domain`` each sequence's domain. ``alias_prob`` / ``alias_idx``
    ``[epoch, domain, layer, group, expert in group]`` are Vose alias tables of the popularity
    inside each group of contiguous experts (one group for ungrouped routing), so a draw costs
    one comparison whatever the number of experts. ``group_mass[epoch, domain, layer, group]``
    is each group's popularity mass, read off the CDF.
    """

    cdf: np.ndarray
    group_mass: np.ndarray
    alias_prob: np.ndarray
    alias_idx: np.ndarray
    successors: np.ndarray
    seq_start: np.ndarray
    seq_domain: np.ndarray
    locality: np.ndarray
    affinity: np.ndarray


def _zipf_weights(n: int, skew: float) -> np.ndarray:
    return 1.0 / np.arange(1, n + 1, dtype=np.float64) ** skew


def build_tables(profile: RoutingProfile, tokens: int, seed: int) -> Tables:
    """Popularity CDFs per (drift epoch, domain, layer), successor lists, and the split of
    ``tokens`` into sequences with their domains, all drawn from ``seed``."""
    rng = np.random.default_rng([seed, 0x5EED])
    E, L, D = profile.num_experts, profile.num_layers, profile.domains
    skew = profile.per_layer("skew")
    keep = int(round(profile.committee * E))
    log_w = np.empty((D, L, E))
    for layer in range(L):
        ranks = rng.permutation(E)  # ranks[i]: the expert holding popularity rank i
        weights = np.log(_zipf_weights(E, skew[layer]))
        for domain in range(D):
            order = ranks.copy()
            if domain and keep < E:
                order[keep:] = rng.permutation(order[keep:])
            log_w[domain, layer, order] = weights
    epochs = max(1, -(-tokens // profile.drift_interval)) if profile.drift else 1
    steps = rng.normal(0.0, profile.drift, size=(epochs, D, L, E)) if profile.drift else np.zeros((epochs, D, L, E))
    steps[0] = 0.0
    walk = log_w[None] + np.cumsum(steps, axis=0)
    p = np.exp(walk - walk.max(axis=-1, keepdims=True))
    cdf = np.cumsum(p / p.sum(axis=-1, keepdims=True), axis=-1)
    cdf[..., -1] = 1.0
    successors = np.empty((max(L - 1, 1), E, min(profile.fanout, E)), dtype=np.int32)
    draw_without_replacement(rng, successors.reshape(-1, successors.shape[2]), E)
    lengths = []
    total = 0
    while total < tokens:
        length = int(min(rng.geometric(1.0 / profile.seq_len), tokens - total))
        lengths.append(length)
        total += length
    seq_start = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    seq_domain = rng.integers(0, D, size=len(lengths)).astype(np.int32)
    groups = profile.n_group if profile.algorithm in ("group_limited", "grouped") else 1
    weights = np.diff(cdf, axis=-1, prepend=0.0).reshape(*cdf.shape[:-1], groups, E // groups)
    alias_prob, alias_idx = alias_tables(weights)
    size = E // groups
    below = np.concatenate([np.zeros((*cdf.shape[:-1], 1)), cdf[..., :-1]], axis=-1)
    group_mass = np.ascontiguousarray(cdf[..., size - 1 :: size] - below[..., 0:E:size])
    return Tables(cdf=np.ascontiguousarray(cdf), group_mass=group_mass, alias_prob=alias_prob, alias_idx=alias_idx, successors=successors,
                  seq_start=seq_start, seq_domain=seq_domain,
                  locality=profile.per_layer("locality"), affinity=profile.per_layer("affinity"))


@numba.njit(cache=True)
def _shuffle_from(rng, data, first):
    """NumPy's ``_shuffle_int`` (numpy/random/_generator.pyx): swaps ``data[i]`` with
    ``data[j]``, ``j`` drawn as ``random_bounded_uint64(0, i)``, for ``i`` from the last index
    down to ``first``."""
    for i in range(data.size - 1, first - 1, -1):
        j = rng.integers(0, i, endpoint=True)
        data[i], data[j] = data[j], data[i]


@numba.njit(cache=True)
def draw_without_replacement(rng, out, n):
    """Fills each row of ``out`` ``[rows, size]`` with ``rng.choice(n, size, replace=False)``,
    row after row: the same values, and the generator left in the same state, as that NumPy
    call in a loop (14,592 calls for DeepSeek-V3's successor lists: 0.1 s of Python and
    NumPy overhead; a test compares the two). NumPy (``Generator.choice`` without ``p``,
    numpy/random/_generator.pyx) tail-shuffles ``arange(n)`` when ``n > 10000`` and
    ``size > n // 50``; otherwise it runs Floyd's algorithm, drawing ``random_bounded_uint64(0,
    j)`` (what ``integers(0, j, endpoint=True)`` draws) for ``j`` from ``n - size`` to ``n - 1``
    and keeping ``j`` when the draw was already taken (a hash set there, a flag per value
    here: the same decisions), then shuffles the result."""
    rows, size = out.shape
    tail = n > 10000 and size > n // 50
    taken = np.zeros(n, dtype=np.bool_)
    idx = np.empty(n if tail else size, dtype=np.int64)
    for r in range(rows):
        if tail:
            for i in range(n):
                idx[i] = i
            _shuffle_from(rng, idx, max(n - size, 1))
            out[r] = idx[n - size :]
            continue
        for j in range(n - size, n):
            value = rng.integers(0, j, endpoint=True)
            if taken[value]:
                value = j
            taken[value] = True
            idx[j - n + size] = value
        _shuffle_from(rng, idx, 1)
        for i in range(size):
            out[r, i] = idx[i]
            taken[idx[i]] = False


@numba.njit(cache=True)
def _vose(weights, prob, alias):
    """Vose's alias method for one row of non-negative ``weights``: drawing ``u`` in [0, 1),
    ``i = int(u * n)``, ``f = u * n - i``, the outcome is ``i`` if ``f < prob[i]`` else
    ``alias[i]``, with probability proportional to ``weights``."""
    n = weights.size
    total = weights.sum()
    scaled = weights * (n / total) if total > 0 else np.ones(n)
    small = np.empty(n, dtype=np.int64)
    large = np.empty(n, dtype=np.int64)
    ns = 0
    nl = 0
    for i in range(n):
        if scaled[i] < 1.0:
            small[ns] = i
            ns += 1
        else:
            large[nl] = i
            nl += 1
    while ns > 0 and nl > 0:
        ns -= 1
        s = small[ns]
        nl -= 1
        big = large[nl]
        prob[s] = scaled[s]
        alias[s] = big
        scaled[big] = scaled[big] + scaled[s] - 1.0
        if scaled[big] < 1.0:
            small[ns] = big
            ns += 1
        else:
            large[nl] = big
            nl += 1
    for i in range(nl):
        prob[large[i]] = 1.0
        alias[large[i]] = large[i]
    for i in range(ns):
        prob[small[i]] = 1.0
        alias[small[i]] = small[i]


@numba.njit(cache=True)
def _vose_rows(rows, prob, alias):
    # one compiled call for every row: a call from Python per row cost more than its table
    for r in range(rows.shape[0]):
        _vose(rows[r], prob[r], alias[r])


def alias_tables(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Alias tables over the last axis of ``weights`` (any leading shape)."""
    rows = np.ascontiguousarray(weights, dtype=np.float64).reshape(-1, weights.shape[-1])
    prob = np.empty(rows.shape)
    alias = np.empty(rows.shape, dtype=np.int32)
    _vose_rows(rows, prob, alias)
    return prob.reshape(weights.shape), alias.reshape(weights.shape)
