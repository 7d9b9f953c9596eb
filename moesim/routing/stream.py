"""Routing for a running simulation: tokens per expert of each step, step by step.

The serving simulator asks, for every step, how a batch of ``tokens`` new tokens (some of them
decode tokens of sequences that routed last step too) spreads over the experts of every MoE
layer. :class:`CountStream` answers at count level, from the same model as
:func:`moesim.routing.generate.generate_counts`: each expert's share of the choices is measured
once on a token-level sample of the profile (group limits, affinity and dynamic-k shape it), and
a continuing token repeats its previous choice with the profile's ``locality``.

Large batches are drawn in the normal regime: when the mean count per expert is at least
:data:`NORMAL_REGIME`, a layer's counts are the share's mean plus Gaussian noise with the
multinomial covariance, correlated with the previous step's noise by ``locality`` times the
share of tokens that continue (an AR(1) process with the same mean, variance and lag-one
correlation as the exact repeat-or-redraw process), and rounded to integers that keep the
total. A 58-layer, 256-expert step then costs two small Gaussian draws instead of 15,000
binomials; smaller steps draw the exact process.
"""

from __future__ import annotations

import numpy as np

from moesim.routing.generate import _inclusion
from moesim.routing.profile import RoutingProfile

NORMAL_REGIME = 8.0  # mean slots per expert from which a step's counts are drawn by the normal approximation


def round_to_total(values: np.ndarray, totals: np.ndarray) -> np.ndarray:
    """Non-negative integers per row of ``values`` (``[rows, experts]``) scaled to sum to
    ``totals``: systematic rounding of the running sum, so each count is within one of its
    scaled value and every row keeps its total exactly."""
    values = np.maximum(values, 0.0)
    scale = totals / np.maximum(values.sum(axis=1), 1e-300)
    edges = np.floor(np.cumsum(values * scale[:, None], axis=1) + 0.5)
    edges[:, -1] = totals
    return np.diff(edges, axis=1, prepend=0.0).astype(np.int64)


class CountStream:
    """Tokens per expert ``[layers, experts]`` for successive steps of a serving run.

    ``step(tokens, continuing)``: ``tokens`` new tokens in the step, of which ``continuing``
    belong to sequences that also routed in the previous step (decode tokens).
    """

    def __init__(self, profile: RoutingProfile, seed: int = 0, *, sample: int | None = None):
        self.profile = profile
        E = profile.num_experts
        share = _inclusion(profile, seed, sample or max(20_000, 50 * E))  # [domains, layers, experts]
        self.share = share.mean(axis=0)  # the workload mixes the domains evenly
        self.locality = profile.per_layer("locality")
        self.rng = np.random.default_rng([seed, 0x57E9])
        self.previous = None  # last step's counts
        self.noise = np.zeros_like(self.share)  # normal regime: last step's standardised deviation
        self.last_tokens = 0

    def step(self, tokens: int, continuing: int = 0) -> np.ndarray:
        p = self.profile
        E, L, k = p.num_experts, p.num_layers, p.top_k
        slots = tokens * k
        if tokens <= 0:
            return np.zeros((L, E), dtype=np.int64)
        carry = continuing / max(self.last_tokens, tokens) if self.previous is not None else 0.0
        carry = min(1.0, carry)
        if slots / E >= NORMAL_REGIME:
            rho = (self.locality * carry)[:, None]
            z = self.rng.standard_normal((L, E))
            self.noise = rho * self.noise + np.sqrt(1.0 - rho**2) * z
            # multinomial covariance: diag(p) - p p^T, through the centred sqrt(p) projection
            root = np.sqrt(self.share)
            centred = root * self.noise - self.share * (root * self.noise).sum(axis=1, keepdims=True)
            mean = slots * self.share
            counts = round_to_total(mean + np.sqrt(slots) * centred, np.full(L, slots))
        else:
            kept = np.zeros((L, E), dtype=np.int64)
            if self.previous is not None and carry > 0:
                kept = self.rng.binomial(self.previous, np.clip(self.locality * carry, 0, 1)[:, None])
            fresh = np.maximum(slots - kept.sum(axis=1), 0)
            counts = kept + self.rng.multinomial(fresh, self.share)
        counts = np.minimum(counts, tokens)  # a token picks an expert at most once
        self.previous, self.last_tokens = counts, tokens
        return counts
