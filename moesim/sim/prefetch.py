"""Prefetch policies: which experts to start copying to HBM before a layer asks for them.

A prefetcher sees the step's routing (:class:`StepRouting`) and returns, for every MoE layer
``m``, the experts to copy for it; the copies for layer ``m`` are issued when layer ``m - 1``'s
router has run (for the first MoE layer, when the step starts), so they overlap layer
``m - 1``'s experts and layer ``m``'s attention. Where a policy guesses, each expert the layer
really uses is recognised with probability ``accuracy`` and the remaining guesses go to the
layer's most popular experts. Found by name in :data:`PREFETCH`:

- ``none``: load on demand.
- ``pregated``: Pre-gated MoE: a pre-gate in block ``m - 1`` picks block ``m``'s experts, so
  they are known one layer ahead (``accuracy`` 1 when the pre-gate *is* the routing, as in the
  paper; lower for a retrofitted predictor).
- ``speculative``: mixtral-offloading's speculative loading: layer ``m``'s gate applied to the
  hidden state after layer ``m - 1`` guesses ``top_n`` experts per token.
- ``affinity``: Fate-like cross-layer prediction: the experts chosen at layer ``m - 1`` vote for
  layer ``m``'s through the trace's affinity P(b at m | a at m - 1)
  (:func:`moesim.routing.stats.affinity`, measured on the first ``profile_tokens`` tokens of the
  trace, as Fate profiles offline); the ``top_n`` per token with the most votes are copied.
- ``activation``: MoE-Infinity-like activation-aware prefetch: each request keeps its expert
  activation matrix (tokens per expert per layer so far); a step copies, for every layer, the
  ``top_n`` experts per token its requests used most (the layer's popularity breaks ties, and
  stands in for a request that has not started).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.routing.stats import affinity


@dataclass
class StepRouting:
    """What a prefetcher may read of one step: ``need`` ``[layers, experts]`` (the experts the
    step's tokens use), ``counts`` (tokens per expert), ``ids`` ``[tokens, layers, k]`` the
    tokens' choices (-1 none) and ``requests`` ``[tokens]`` whose tokens they are."""

    need: np.ndarray
    counts: np.ndarray
    ids: np.ndarray
    requests: np.ndarray

    @property
    def tokens(self) -> int:
        return int(self.ids.shape[0])


class Prefetch:
    name = "none"

    def __init__(self, *, layers: int, experts: int, top_k: int, popularity: np.ndarray, top_n: int | None = None,
                 accuracy: float = 1.0, seed: int = 0, trace: np.ndarray | None = None, profile_tokens: int = 4096):
        self.layers, self.experts, self.top_k = layers, experts, top_k
        self.top_n = top_n or top_k
        self.accuracy = accuracy
        self.popularity = popularity
        # ranks in [0, 1): the most popular expert of a layer ranks highest
        order = np.argsort(np.argsort(popularity, axis=1, kind="stable"), axis=1, kind="stable")
        self.prior = order / experts
        self.rng = np.random.default_rng([seed, 0xFE7C])

    def predict(self, step: StepRouting) -> np.ndarray:
        """``[layers, experts]``: the experts to copy for each layer."""
        return np.zeros((self.layers, self.experts), dtype=bool)

    def observe(self, step: StepRouting) -> None:
        """Learn from the step that just ran."""

    def _guesses(self, step: StepRouting) -> int:
        return min(self.experts, self.top_n * max(step.tokens, 1))

    def _top(self, score: np.ndarray, n: int) -> np.ndarray:
        out = np.zeros(score.shape, dtype=bool)
        top = np.argsort(-score, axis=1, kind="stable")[:, :n]
        np.put_along_axis(out, top, True, axis=1)
        return out

    def _noisy(self, need: np.ndarray, n: int) -> np.ndarray:
        """Layers 1.. of ``need``: each used expert recognised with probability ``accuracy``;
        the other guesses go by popularity."""
        known = need & (self.rng.random(need.shape) < self.accuracy)
        return self._top(known * 2.0 + self.prior[1:], n)


class PreGated(Prefetch):
    name = "pregated"

    def predict(self, step):
        out = np.zeros_like(step.need)
        n = max(int(step.need.sum(axis=1).max()), 1)  # the pre-gate picks as many as the gate
        out[1:] = self._noisy(step.need[1:], n)
        return out


class Speculative(Prefetch):
    name = "speculative"

    def predict(self, step):
        out = np.zeros_like(step.need)
        out[1:] = self._noisy(step.need[1:], self._guesses(step))
        return out


class Affinity(Prefetch):
    name = "affinity"

    def __init__(self, *, trace: np.ndarray | None = None, profile_tokens: int = 4096, **kw):
        super().__init__(**kw)
        if trace is None:
            raise ValueError("affinity prefetch needs a token-level trace")
        self.conditional = affinity(trace[:profile_tokens], self.experts)[0]  # [layers - 1, E, E]

    def predict(self, step):
        out = np.zeros_like(step.need)
        votes = np.einsum("le,lef->lf", step.counts[:-1].astype(np.float64), self.conditional)
        out[1:] = self._top(votes + 1e-9 * self.prior[1:], self._guesses(step))
        return out


class Activation(Prefetch):
    name = "activation"

    def __init__(self, **kw):
        super().__init__(**kw)
        self.matrices: dict[int, np.ndarray] = {}  # request -> [layers, experts] tokens so far

    def predict(self, step):
        score = np.zeros((self.layers, self.experts))
        for q in np.unique(step.requests):
            eam = self.matrices.get(int(q))
            if eam is not None:
                score += eam / max(eam[0].sum(), 1)
        return self._top(score + 1e-3 * self.prior, self._guesses(step))

    def observe(self, step):
        ids = step.ids
        layer = np.broadcast_to(np.arange(self.layers)[None, :, None], ids.shape)
        for q in np.unique(step.requests):
            mine = step.requests == q
            chosen = ids[mine]
            valid = chosen >= 0
            eam = self.matrices.setdefault(int(q), np.zeros((self.layers, self.experts)))
            np.add.at(eam, (layer[mine][valid], chosen[valid]), 1.0)


PREFETCH = {cls.name: cls for cls in (Prefetch, PreGated, Speculative, Affinity, Activation)}
