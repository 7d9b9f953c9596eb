"""Routing sources of a simulated run: the tokens per expert of each step.

Count level (``[moe layers, experts]`` per step, for large batches and wide EP):

- ``balanced``: every step spread as evenly as possible;
- ``power_law:ALPHA``: each layer's expert shares drawn once from the power law of
  :func:`moesim.routing.counts.power_law_counts`, each step a multinomial draw from them;
- ``profile``: the model's routing profile (or a named / YAML one) through
  :class:`moesim.routing.stream.CountStream` (popularity, locality across decode steps);
- a recorded ``.npz`` trace: each step's counts follow the trace's loads, step after step
  (cycled), rescaled to the step's tokens.

Token level (``level: token``): every request owns a run of rows of a generated token-level
trace (``[tokens, layers, top_k]``; its prompt then its output), so a step's counts are the
exact choices of the tokens it computes, per DP replica too, with the profile's locality inside
each sequence. Used for small runs and for caching studies.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moesim.errors import InputError
from moesim.routing.counts import balanced_counts, power_law_alpha, power_law_counts
from moesim.routing.generate import generate_tokens
from moesim.routing.profile import RoutingProfile
from moesim.routing.stream import CountStream, round_to_total
from moesim.routing.trace import load_trace
from moesim.sim.kernels import token_sources


class CountSource:
    def __init__(self, layers: int, experts: int, top_k: int, *, shares: np.ndarray | None = None,
                 stream: CountStream | None = None, loads: np.ndarray | None = None, seed: int = 0):
        self.layers, self.experts, self.top_k = layers, experts, top_k
        self.shares, self.stream, self.loads = shares, stream, loads
        self.rng = np.random.default_rng([seed, 0xD15])
        self.index = 0

    def step(self, group, decode_ids, chunks, tokens: int, continuing: int):
        L, E, k = self.layers, self.experts, self.top_k
        if self.stream is not None:
            return self.stream.step(tokens, continuing), None
        if self.loads is not None:
            row = self.loads[self.index % self.loads.shape[0]].astype(np.float64)
            self.index += 1
            return np.minimum(round_to_total(row, np.full(L, tokens * k)), tokens), None
        if self.shares is not None:
            counts = self.rng.multinomial(np.full(L, tokens * k), self.shares)
            return np.minimum(counts, tokens), None
        return np.broadcast_to(balanced_counts(tokens, E, k), (L, E)).copy(), None


class TokenSource:
    """Exact per-token routing from a token-level trace; request ``i`` reads rows
    ``offset[i] + position``."""

    def __init__(self, ids: np.ndarray, offset: np.ndarray, experts: int):
        self.ids, self.offset, self.experts = ids, offset, experts

    def step(self, group, decode_ids, chunks, tokens: int, continuing: int):
        """The step's routed slots ``[layers, experts]`` and per replica ``[replicas, layers,
        experts]``: its decodes' next rows, then each prompt chunk's ``[n, 4]`` (replica,
        request, tokens, context) rows, counted in one compiled pass
        (:func:`moesim.sim.kernels.token_sources`); keeps the rows and their requests (the
        expert-offloading model reads them)."""
        source, counts, self.rows, self.row_requests = token_sources(
            self.ids, self.offset, group.context, group.replica, decode_ids, chunks, group.R, self.experts)
        return counts, source

    def _step_reference(self, group, decode_ids, chunks, tokens: int, continuing: int):
        """:meth:`step` in NumPy, one chunk at a time (the reference the tests compare it with)."""
        R, L, E = group.R, self.ids.shape[1], self.experts
        rows = [self.offset[decode_ids] + group.context[decode_ids]]
        replicas = [group.replica[decode_ids]]
        for r, q, take, ctx in chunks.tolist():
            rows.append(self.offset[q] + ctx + np.arange(take))
            replicas.append(np.full(take, r))
        rows = np.minimum(np.concatenate(rows), self.ids.shape[0] - 1)
        rep = np.concatenate(replicas)
        self.rows = rows
        self.row_requests = np.concatenate([np.asarray(decode_ids, dtype=np.int64)] +
                                           [np.full(take, q, dtype=np.int64) for _, q, take, _ in chunks.tolist()])
        chosen = self.ids[rows].astype(np.int64)  # [n, L, k]
        key = (rep[:, None, None] * L + np.arange(L)[None, :, None]) * E + chosen
        valid = chosen >= 0  # null experts (-1) are not computed
        source = np.bincount(key[valid], minlength=R * L * E).reshape(R, L, E)
        return source.sum(axis=0), source


def routing_source(spec: str, level: str, profile: RoutingProfile, *, seed: int, prompt: np.ndarray,
                   output: np.ndarray, base_dir=".") -> CountSource | TokenSource:
    """The routing source a scenario's ``routing`` section names (see the module docstring)."""
    L, E, k = profile.num_layers, profile.num_experts, profile.top_k
    if level == "token":
        if spec != "profile":
            raise InputError("token-level routing is generated from a profile; set routing.distribution: profile",
                             field="routing.level")
        lengths = prompt + output
        offset = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        ids = generate_tokens(profile, int(lengths.sum()), seed=seed)
        return TokenSource(ids, offset, E)
    if spec == "balanced":
        return CountSource(L, E, k, seed=seed)
    if spec == "profile":
        return CountSource(L, E, k, stream=CountStream(profile, seed))
    if spec.startswith("power_law"):
        alpha = power_law_alpha(spec, field="routing.distribution")
        rng = np.random.default_rng([seed, 0xA1FA])
        shares = np.stack([power_law_counts(4096, E, k, alpha, rng=rng) for _ in range(L)]).astype(np.float64)
        return CountSource(L, E, k, shares=shares / shares.sum(axis=1, keepdims=True), seed=seed)
    if spec.endswith(".npz"):
        path = Path(spec) if Path(spec).is_absolute() else Path(base_dir) / spec
        trace = load_trace(path)
        if trace.num_experts != E or trace.num_layers != L:
            raise InputError(f"trace has {trace.num_layers} layers x {trace.num_experts} experts; the model routes "
                             f"{L} x {E}", source=str(path), field="routing.distribution")
        return CountSource(L, E, k, loads=np.asarray(trace.loads(batch=1024)), seed=seed)
    raise InputError(f"cannot read {spec!r}: expected balanced, power_law:ALPHA, profile or a .npz trace",
                     field="routing.distribution")
