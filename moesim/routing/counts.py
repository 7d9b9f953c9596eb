"""Tokens per expert for one MoE layer: balanced, power-law, random top-k, or read from a trace.

These are the count-level distributions the cost model takes (``tokens_per_expert``: an int64
array of length ``num_experts`` summing to ``tokens * top_k``, no expert above ``tokens``).

``power_law_counts`` follows the procedure aiconfigurator's collector uses to draw the skewed
rows of its measured MoE tables (collector/helper.py, ``_generate_power_law_distribution``), so
predictions for those rows compare like with like: per-expert weights drawn by inverse-CDF from a
power law with exponent ``alpha`` on [1, 0.8 * tokens], scaled to ``tokens * top_k`` and rounded,
each expert capped at ``tokens`` (a token picks an expert at most once) with the overflow and
rounding remainder given back one token at a time, round-robin over EP ranks, to each rank's
least-loaded expert, and finally the EP rank with the largest load swapped into rank 0.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moesim.errors import InputError
from moesim.routing.trace import load_trace


def balanced_ids(tokens: int, num_experts: int, top_k: int) -> np.ndarray:
    """``[tokens, top_k]`` expert ids spread as evenly as possible: token ``t``'s ``j``-th choice
    is ``(t + j * stride) % num_experts`` with ``stride = ceil(num_experts / top_k)``; with fewer
    tokens than ``stride`` the tokens are spaced out over the stride instead.

    This is the pattern of aiconfigurator's measured "balanced" rows, so the experts that land on
    each EP rank at small token counts are the same as in those measurements.
    """
    stride = -(-num_experts // top_k)
    t = np.arange(tokens, dtype=np.int64)[:, None]
    j = np.arange(top_k, dtype=np.int64)[None, :]
    start = t if tokens >= stride else (t * stride) // tokens
    return (start + j * stride) % num_experts


def balanced_counts(tokens: int, num_experts: int, top_k: int) -> np.ndarray:
    """Tokens per expert of :func:`balanced_ids`: equal when ``tokens * top_k`` is a multiple of
    ``num_experts``. Counted in closed form for long batches (each choice ``j`` covers whole
    cycles of the experts plus a run of ``tokens % num_experts`` starting at ``j * stride``)."""
    stride = -(-num_experts // top_k)
    if tokens < stride:
        return np.bincount(balanced_ids(tokens, num_experts, top_k).ravel(), minlength=num_experts).astype(np.int64)
    counts = np.full(num_experts, top_k * (tokens // num_experts), dtype=np.int64)
    run = np.arange(tokens % num_experts)
    for j in range(top_k):
        np.add.at(counts, (run + j * stride) % num_experts, 1)
    return counts


def _level(values: np.ndarray, amount: int, cap: int) -> np.ndarray:
    """Add ``amount`` units to ``values`` one at a time, each to the smallest value below ``cap``
    (the lowest index on a tie), in closed form: raise everything below a level ``L`` to ``L``,
    then give the rest one each to the values at ``L`` in index order."""
    values = values.copy()
    room = int(np.clip(cap - values, 0, None).sum())
    amount = min(amount, room)
    if amount <= 0:
        return values
    low, high = int(values.min()), cap
    while low < high:  # the highest level whose fill does not exceed the amount
        mid = (low + high + 1) // 2
        if int(np.clip(mid - values, 0, None).sum()) <= amount:
            low = mid
        else:
            high = mid - 1
    filled = np.maximum(values, low)
    rest = amount - int((filled - values).sum())
    at_level = np.flatnonzero((filled == low) & (filled < cap))
    filled[at_level[:rest]] += 1
    return filled


def _give_back(counts: np.ndarray, ep: int, remaining: int, step: int, cap: int) -> np.ndarray:
    """Add (``step`` = 1) or remove (-1) ``remaining`` tokens one at a time, visiting EP ranks in
    turn and giving each rank's least (adding) or taking from its most (removing) loaded expert
    that can still move. Ranks share the tokens round-robin; inside a rank the one-at-a-time
    rule is applied in closed form by :func:`_level` (removal is adding to the negated loads)."""
    per_rank = counts.reshape(ep, -1).copy()
    room = (np.clip(cap - per_rank, 0, None) if step > 0 else per_rank).sum(axis=1)
    # Whole rounds give one token to every rank with room, until a rank fills up or the
    # tokens run short; a last partial round serves the open ranks in order.
    level = 0
    extra = np.zeros(ep, dtype=np.int64)
    while remaining > 0:
        open_ranks = np.flatnonzero(room > level)
        if open_ranks.size == 0:
            break
        rounds = min(int(room[open_ranks].min()) - level, remaining // open_ranks.size)
        if rounds == 0:
            extra[open_ranks[:remaining]] = 1
            break
        level += rounds
        remaining -= rounds * open_ranks.size
    share = np.minimum(room, level) + extra
    for rank in range(ep):
        if share[rank]:
            if step > 0:
                per_rank[rank] = _level(per_rank[rank], int(share[rank]), cap)
            else:
                per_rank[rank] = -_level(-per_rank[rank], int(share[rank]), 0)
    return per_rank.reshape(-1)


def power_law_counts(
    tokens: int, num_experts: int, top_k: int, alpha: float, *, ep: int = 1, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Skewed tokens per expert with exponent ``alpha`` (> 1 is more skewed), heaviest EP rank
    first. See the module docstring for the procedure."""
    if not np.isfinite(alpha) or alpha <= 0:
        raise InputError(f"power-law exponent must be a positive number, got {alpha}", field="--routing")
    if alpha == 1.0:
        raise InputError("power-law exponent 1.0 is degenerate; use e.g. 1.01", field="--routing")
    if num_experts % ep:
        raise InputError(f"EP {ep} does not divide {num_experts} experts")
    rng = rng or np.random.default_rng(0)
    total = tokens * top_k
    if total > num_experts:
        low, high = 1.0, tokens * 0.8
    else:
        low, high = 0.01, 2.0
    u = rng.random(num_experts)
    a = 1.0 - alpha
    weights = ((high**a - low**a) * u + low**a) ** (1.0 / a)
    counts = np.round(weights / weights.sum() * total).astype(np.int64)
    overflow = int(np.clip(counts - tokens, 0, None).sum())
    counts = np.minimum(counts, tokens)
    if overflow:
        counts = _give_back(counts, ep, overflow, +1, tokens)
    delta = total - int(counts.sum())
    if delta:
        counts = _give_back(counts, ep, abs(delta), 1 if delta > 0 else -1, tokens)
    per_rank = counts.reshape(ep, -1)
    heaviest = int(per_rank.sum(axis=1).argmax())
    if heaviest:
        per_rank[[0, heaviest]] = per_rank[[heaviest, 0]]
    return per_rank.reshape(-1)


def random_topk_counts(tokens: int, num_experts: int, top_k: int, rng: np.random.Generator) -> np.ndarray:
    """Tokens per expert when every token's ``top_k`` experts are the largest of i.i.d. Gaussian
    logits (vLLM benchmark_moe.py's routing: balanced on average, a multinomial-like spread in
    any one batch). Top-k of i.i.d. continuous logits is a uniformly random k-subset, drawn
    here from uniform keys, which has the same law."""
    if not 0 < top_k <= num_experts:
        raise InputError(f"top-k {top_k} must be between 1 and the {num_experts} experts it routes over")
    keys = rng.random((tokens, num_experts))
    chosen = np.argpartition(keys, top_k - 1, axis=1)[:, :top_k]
    return np.bincount(chosen.ravel(), minlength=num_experts).astype(np.int64)


def counts_from_trace(path: str | Path, num_experts: int, *, layer: int | None = None) -> np.ndarray:
    """Mean tokens-per-expert fractions of a native trace file (token or count level), as a
    float array summing to 1. ``layer`` picks one layer; by default all layers are pooled."""
    trace = load_trace(path)
    if trace.num_experts != num_experts:
        raise InputError(f"trace has {trace.num_experts} experts per layer; the model has {num_experts}", source=str(path))
    per_layer = trace.loads().sum(axis=0).astype(np.float64)
    if layer is not None:
        if not 0 <= layer < per_layer.shape[0]:
            raise InputError(f"layer {layer} out of range: the trace has {per_layer.shape[0]}", source=str(path))
        per_layer = per_layer[layer : layer + 1]
    pooled = per_layer.sum(axis=0)
    if pooled.sum() <= 0:
        raise InputError("trace holds no routed tokens", source=str(path))
    return pooled / pooled.sum()


def counts_from_fractions(fractions: np.ndarray, tokens: int, top_k: int) -> np.ndarray:
    """Integer tokens per expert for ``tokens * top_k`` slots split by ``fractions``
    (largest-remainder rounding; no expert above ``tokens``)."""
    total = tokens * top_k
    raw = np.asarray(fractions, dtype=np.float64) * total
    counts = np.minimum(np.floor(raw).astype(np.int64), tokens)
    short = total - int(counts.sum())
    open_experts = np.flatnonzero(counts < tokens)
    largest = open_experts[np.argsort(-(raw - counts)[open_experts], kind="stable")]
    counts[largest[:short]] += 1
    return counts


def power_law_alpha(spec: str, field: str = "--routing") -> float:
    """The exponent of a ``power_law:ALPHA`` spec (1.2 when only ``power_law`` is given)."""
    _, _, value = spec.partition(":")
    try:
        return float(value or 1.2)
    except ValueError:
        raise InputError(f"cannot read {spec!r}: expected power_law:ALPHA, e.g. power_law:1.2", field=field) from None


def parse_routing(spec: str, tokens: int, num_experts: int, top_k: int, *, ep: int = 1, seed: int = 0) -> np.ndarray:
    """Tokens per expert from a command-line routing spec: ``balanced``, ``power_law:ALPHA``
    or a path to a ``.npz`` trace."""
    if spec == "balanced":
        return balanced_counts(tokens, num_experts, top_k)
    if spec.startswith("power_law"):
        alpha = power_law_alpha(spec)
        return power_law_counts(tokens, num_experts, top_k, alpha, ep=ep, rng=np.random.default_rng(seed))
    if spec.endswith(".npz"):
        return counts_from_fractions(counts_from_trace(spec, num_experts), tokens, top_k)
    raise InputError(f"cannot read {spec!r}: expected balanced, power_law:ALPHA or a .npz trace", field="--routing")
