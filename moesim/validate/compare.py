"""Predicted against measured: each measured row costed by moesim's cost model, and the
error summarised per operator family and regime.

Every table family has a predictor that turns its rows into the cost model's call with the same
shape (:data:`PREDICTORS`). Conventions that matter for a like-for-like comparison:

- MoE (vLLM fused MoE): the layer after the router on EP rank 0, every rank seeing the whole
  batch; ``power_law_<alpha>`` rows use :func:`moesim.routing.counts.power_law_counts`, which
  follows the collector's procedure (heaviest EP rank placed at rank 0, whose latency the table
  holds). The table's own random draw is not recorded, so the prediction is the mean over a few
  draws; so are ``random`` rows (vLLM benchmark_moe.py's top-k of Gaussian logits, see
  :func:`moe_counts`).
- nccl ``message_size`` is in elements (2 bytes for ``half``, 1 for ``int8``) and is nccl-tests'
  ``size``: the gathered output of all-gather, the input of reduce-scatter, the whole per-rank
  buffer of all-to-all.
- DeepEP low-latency dispatch sends each (token, expert) pair in fp8 with one fp32 scale per 128
  elements, combine returns bf16; normal mode sends each token once to every rank holding one of
  its experts, in bf16 (expected counts under uniform routing over one 8-GPU node).
- MLA rows are DeepSeek-V3's attention (``kv_lora_rank`` 512, rope 64, nope 128, v 128; the
  table's ``num_heads`` are already per GPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb

import numpy as np

from moesim.cost.attention import decode_attention_time, mla_decode_time, mla_prefill_time, prefill_attention_time
from moesim.cost.collectives import all_gather_time, all_reduce_time, all_to_all_time, reduce_scatter_time, uniform_matrix
from moesim.cost.gemm import gemm_time
from moesim.cost.moe import moe_layer_time
from moesim.errors import InputError
from moesim.hardware import catalog
from moesim.hardware.topology import accelerators, topology
from moesim.routing.counts import balanced_counts, power_law_counts, random_topk_counts
from moesim.validate.nccl_tests import COLLECTIVES, TYPE_BYTES
from moesim.validate.tables import Table

# Median / p90 absolute percentage error the issue sets per family on the test split.
TARGETS = {
    "MoE layer": (0.08, 0.20), "GEMM": (0.08, 0.20),
    "attention prefill": (0.10, 0.25), "attention decode": (0.10, 0.25),
    "MLA prefill": (0.10, 0.25), "MLA decode": (0.10, 0.25),
    "NCCL": (0.10, 0.25), "DeepEP": (0.10, 0.25),
}

# DeepSeek-V3's MLA (config.json of deepseek-ai/DeepSeek-V3): the shape of the mla tables.
_MLA = {"kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128}
# One fp32 scale per 128 fp8 elements (DeepEP low-latency fp8 dispatch).
_FP8_SCALE_BYTES = 4 / 128
# nccl_dtype: nccl-tests' type names, and the torch names aiconfigurator's collector writes.
_NCCL_ELEMENT_BYTES = {**TYPE_BYTES, "float16": 2, "float32": 4}


@dataclass
class Cases:
    """Predicted and measured seconds of one quantity of one table, row by row.

    ``family`` is the report's family (a key of :data:`TARGETS`, or another name with no
    target), ``regime`` a label per row, ``size`` the swept size per row (tokens, m, bytes) that
    the error-vs-size figure puts on its x axis, described by ``size_label``.
    """

    family: str
    table: str
    regime: np.ndarray
    size: np.ndarray
    size_label: str
    measured: np.ndarray
    predicted: np.ndarray

    @property
    def ape(self) -> np.ndarray:
        """Absolute percentage error of each row, as a fraction."""
        return np.abs(self.predicted / self.measured - 1.0)


def _ints(table: Table, name: str) -> np.ndarray:
    return table.get(name).astype(np.int64)


def _texts(table: Table, name: str) -> np.ndarray:
    return table.get(name).astype(str)


def _moe_regime(distribution: str, ep: int, tp: int) -> str:
    routing = {"balanced": "balanced", "uniform": "balanced", "random": "random"}.get(distribution, "power-law")
    if tp > 1:
        return f"{routing}, expert TP>1"
    return f"{routing}, EP{ep}" if ep in (1, 8) else f"{routing}, EP other"


def _alpha(distribution: str, source: str) -> float:
    try:
        return float(distribution.removeprefix("power_law_"))
    except ValueError:
        raise InputError(f"unknown distribution {distribution!r}: expected balanced, random or power_law_<alpha>",
                         source=source) from None


def moe_counts(distribution: str, tokens: int, experts: int, top_k: int, ep: int, draw: int, source: str = "") -> np.ndarray:
    """Tokens per expert of one measured row's routing (``draw`` seeds a random draw).

    ``random`` is vLLM benchmark_moe.py's routing: each token's experts are the top-k of
    i.i.d. Gaussian logits over the ``experts / ep`` experts of EP rank 0 (the benchmark's
    expert-parallel mode routes every token among its own rank's experts), drawn with
    :func:`moesim.routing.counts.random_topk_counts` from seed ``draw``; the other ranks'
    experts get none."""
    if distribution in ("balanced", "uniform"):
        return balanced_counts(tokens, experts, top_k)
    if distribution == "random":
        if experts % ep:
            raise InputError(f"EP {ep} does not divide {experts} experts", source=source, field="moe_ep_size")
        local = random_topk_counts(tokens, experts // ep, top_k, np.random.default_rng(draw))
        return np.concatenate([local, np.zeros(experts - local.size, dtype=np.int64)])
    return power_law_counts(tokens, experts, top_k, _alpha(distribution, source), ep=ep, rng=np.random.default_rng(draw))


def predict_moe(table: Table, device, graph=None, *, draws: int = 3, counts_cache: dict | None = None) -> list[Cases]:
    """vLLM fused MoE rows (:mod:`moesim.cost.moe`, router excluded as in the table)."""
    cols = {c: _ints(table, c) for c in ("num_tokens", "hidden_size", "inter_size", "topk", "num_experts",
                                         "moe_tp_size", "moe_ep_size")}
    dist, dtype = _texts(table, "distribution"), _texts(table, "moe_dtype")
    cache = {} if counts_cache is None else counts_cache
    predicted = np.empty(len(table))
    for i in range(len(table)):
        tokens, experts, k, ep = (int(cols[c][i]) for c in ("num_tokens", "num_experts", "topk", "moe_ep_size"))
        n = 1 if dist[i] in ("balanced", "uniform") else draws
        times = []
        for draw in range(n):
            key = (dist[i], tokens, experts, k, ep, draw)
            if key not in cache:
                cache[key] = moe_counts(dist[i], tokens, experts, k, ep, draw, str(table.path))
            times.append(moe_layer_time(device, cache[key], tokens=tokens, hidden=int(cols["hidden_size"][i]),
                                        inter=int(cols["inter_size"][i]), top_k=k, dtype=dtype[i], ep=ep,
                                        expert_tp=int(cols["moe_tp_size"][i]), router=False).time)
        predicted[i] = np.mean(times)
    regime = np.array([_moe_regime(d, e, t) for d, e, t in zip(dist, cols["moe_ep_size"], cols["moe_tp_size"])])
    return [Cases("MoE layer", table.name, regime, cols["num_tokens"].astype(float), "tokens", table.seconds["latency"],
                  predicted)]


def predict_moe_deepep(table: Table, device, graph=None, *, draws: int = 3) -> list[Cases]:
    """SGLang DeepEP MoE expert compute: the rank computes the slots of its own experts only.
    ``num_tokens`` is read as the tokens of the whole EP group, routed over all experts, of
    which rank 0 computes its experts' share (the reading that matches the decode table; taken
    as tokens per rank, the prediction is 3-15x too slow)."""
    tokens, ep = _ints(table, "num_tokens"), _ints(table, "moe_ep_size")
    hidden, inter, k, experts = (int(table.get(c)[0]) for c in ("hidden_size", "inter_size", "topk", "num_experts"))
    dist, dtype = _texts(table, "distribution"), _texts(table, "moe_dtype")
    predicted = np.empty(len(table))
    for i in range(len(table)):
        group = int(tokens[i])
        n = 1 if dist[i] in ("balanced", "uniform") else draws
        times = []
        for draw in range(n):
            counts = moe_counts(dist[i], group, experts, k, int(ep[i]), draw, str(table.path))
            local = counts[: experts // int(ep[i])]
            times.append(moe_layer_time(device, local, tokens=max(int(local.sum()), 1), hidden=hidden, inter=inter,
                                        top_k=1, dtype=dtype[i], router=False).time)
        predicted[i] = np.mean(times)
    phase = "prefill" if "context" in table.name else "decode"
    regime = np.array([f"{phase}, {_moe_regime(d, int(e), 1).split(',')[0]}" for d, e in zip(dist, ep)])
    return [Cases("MoE layer (DeepEP experts)", table.name, regime, tokens.astype(float), "tokens (EP group)",
                  table.seconds["latency"], predicted)]


def predict_gemm(table: Table, device, graph=None, **_) -> list[Cases]:
    m, n, k = (_ints(table, c) for c in ("m", "n", "k"))
    dtype = _texts(table, "gemm_dtype")
    predicted = np.array([gemm_time(device, int(a), int(b), int(c), d).time for a, b, c, d in zip(m, n, k, dtype)])
    return [Cases("GEMM", table.name, dtype, m.astype(float), "m (tokens)", table.seconds["latency"], predicted)]


def _window(value: int) -> int | None:
    return int(value) if value > 0 else None


def _kv_regime(kv: np.ndarray, window: np.ndarray) -> np.ndarray:
    return np.array([f"KV {'fp8' if 'fp8' in d else 'bf16'}{', sliding window' if w > 0 else ''}"
                     for d, w in zip(kv, window)])


def predict_attention_prefill(table: Table, device, graph=None, **_) -> list[Cases]:
    b, s, h, kv, d, w = (_ints(table, c) for c in ("batch_size", "isl", "num_heads", "num_key_value_heads", "head_dim",
                                                    "window_size"))
    kv_dtype = _texts(table, "kv_cache_dtype")
    predicted = np.array([prefill_attention_time(device, int(b[i]), int(s[i]), int(h[i]), int(kv[i]), int(d[i]),
                                                 window=_window(w[i]), kv_dtype=kv_dtype[i]).time
                          for i in range(len(table))])
    return [Cases("attention prefill", table.name, _kv_regime(kv_dtype, w), (b * s).astype(float),
                  "tokens (batch x prompt)", table.seconds["latency"], predicted)]


def predict_attention_decode(table: Table, device, graph=None, **_) -> list[Cases]:
    b, s, h, kv, d, w = (_ints(table, c) for c in ("batch_size", "step", "num_heads", "num_key_value_heads", "head_dim",
                                                    "window_size"))
    kv_dtype = _texts(table, "kv_cache_dtype")
    predicted = np.array([decode_attention_time(device, int(b[i]), int(s[i]), int(h[i]), int(kv[i]), int(d[i]),
                                                window=_window(w[i]), kv_dtype=kv_dtype[i]).time
                          for i in range(len(table))])
    return [Cases("attention decode", table.name, _kv_regime(kv_dtype, w), (b * s).astype(float),
                  "cached tokens (batch x KV length)", table.seconds["latency"], predicted)]


def predict_mla_prefill(table: Table, device, graph=None, **_) -> list[Cases]:
    h, b, s = (_ints(table, c) for c in ("num_heads", "batch_size", "isl"))
    kv_dtype = _texts(table, "kv_cache_dtype")
    predicted = np.array([mla_prefill_time(device, int(b[i]), int(s[i]), int(h[i]), _MLA["qk_nope_head_dim"],
                                           _MLA["qk_rope_head_dim"], _MLA["v_head_dim"], kv_dtype=kv_dtype[i]).time
                          for i in range(len(table))])
    return [Cases("MLA prefill", table.name, _kv_regime(_texts(table, "kv_cache_dtype"), np.zeros(len(table))),
                  (b * s).astype(float), "tokens (batch x prompt)", table.seconds["latency"], predicted)]


def predict_mla_decode(table: Table, device, graph=None, **_) -> list[Cases]:
    h, b, s = (_ints(table, c) for c in ("num_heads", "batch_size", "step"))
    kv_dtype = _texts(table, "kv_cache_dtype")
    predicted = np.array([mla_decode_time(device, int(b[i]), int(s[i]), int(h[i]), _MLA["kv_lora_rank"],
                                          _MLA["qk_rope_head_dim"], kv_dtype=kv_dtype[i]).time for i in range(len(table))])
    return [Cases("MLA decode", table.name, _kv_regime(kv_dtype, np.zeros(len(table))), (b * s).astype(float),
                  "cached tokens (batch x KV length)", table.seconds["latency"], predicted)]


def _group(graph, ranks: int, source: str) -> list[str]:
    members = accelerators(graph)
    if ranks > len(members):
        raise InputError(f"the table has {ranks}-GPU rows; the cluster has {len(members)} accelerators (name a larger one "
                         "with --cluster)", source=source)
    return members[:ranks]


def _collective(graph, op: str, ranks: int, nbytes: float, source: str, device=None) -> float:
    """NCCL's time for one collective (``device``'s NCCL figures; the graph's device when None)."""
    group = _group(graph, ranks, source)
    if op == "all_reduce":
        return all_reduce_time(graph, group, nbytes, device=device).time
    if op == "all_gather":
        return all_gather_time(graph, group, nbytes, device=device).time
    if op == "reduce_scatter":
        return reduce_scatter_time(graph, group, nbytes, device=device).time
    if op in ("alltoall", "all_to_all"):
        return all_to_all_time(graph, group, uniform_matrix(ranks, nbytes), kernel="nccl", device=device).time
    raise InputError(f"unknown collective {op!r}: expected {', '.join(COLLECTIVES)}", source=source)


def predict_nccl(table: Table, device, graph=None, **_) -> list[Cases]:
    op, dtype = _texts(table, "op_name"), _texts(table, "nccl_dtype")
    ranks, size = _ints(table, "num_gpus"), table.get("message_size")
    unknown = sorted(set(dtype) - set(_NCCL_ELEMENT_BYTES))
    if unknown:
        raise InputError(f"unknown nccl_dtype {unknown[0]!r}; expected one of {', '.join(_NCCL_ELEMENT_BYTES)}",
                         source=str(table.path))
    nbytes = size * np.array([_NCCL_ELEMENT_BYTES[d] for d in dtype])
    predicted = np.array([_collective(graph, op[i], int(ranks[i]), float(nbytes[i]), str(table.path), device)
                          for i in range(len(table))])
    regime = np.array([f"{o.replace('alltoall', 'all_to_all')}, {n} GPUs" for o, n in zip(op, ranks)])
    return [Cases("NCCL", table.name, regime, nbytes, "message bytes", table.seconds["latency"], predicted)]


def predict_custom_allreduce(table: Table, device, graph=None, **_) -> list[Cases]:
    ranks, nbytes = _ints(table, "num_gpus"), table.get("message_size") * 2.0  # bf16 elements
    predicted = np.array([_collective(graph, "all_reduce", int(ranks[i]), float(nbytes[i]), str(table.path), device)
                          for i in range(len(table))])
    regime = np.array([f"all_reduce, {b}" for b in _texts(table, "backend")])
    return [Cases("custom all-reduce (vLLM)", table.name, regime, nbytes, "message bytes", table.seconds["latency"],
                  predicted)]


def _ranks_reached(experts: int, top_k: int, ranks: int) -> float:
    """Expected distinct EP ranks a token's ``top_k`` distinct experts (drawn uniformly from
    ``experts`` spread evenly over ``ranks``) land on."""
    per_rank = experts // ranks
    miss = comb(experts - per_rank, top_k) / comb(experts, top_k) if experts - per_rank >= top_k else 0.0
    return ranks * (1.0 - miss)


def _deepep(table: Table, graph, mode: str, device=None) -> list[Cases]:
    hidden, tokens, k, experts = (_ints(table, c) for c in ("hidden_size", "num_token", "num_topk", "num_experts"))
    group = accelerators(graph)[:8]
    ranks = len(group)
    out = []
    for quantity in ("dispatch", "combine"):
        # low latency: fp8 + scales out, bf16 back; normal: bf16 both ways
        element = (1.0 + _FP8_SCALE_BYTES) if mode == "ll" and quantity == "dispatch" else 2.0
        sms = _ints(table, f"{quantity}_sms") if mode == "normal" else np.zeros(len(table), dtype=np.int64)
        predicted = np.empty(len(table))
        for i in range(len(table)):
            if mode == "ll":  # one message per (token, expert)
                per_rank = tokens[i] * k[i] * hidden[i] * element
            else:  # one bf16 copy per destination rank
                per_rank = tokens[i] * _ranks_reached(int(experts[i]), int(k[i]), ranks) * hidden[i] * 2.0
            predicted[i] = all_to_all_time(graph, group, uniform_matrix(ranks, per_rank), kernel=f"deepep_{mode}_{quantity}",
                                           device=device, sms=int(sms[i]), experts=int(experts[i]),
                                           token_bytes=tokens[i] * hidden[i] * element).time
        regime = np.full(len(table), f"{mode} {quantity}")
        if mode == "normal":
            regime = np.array([f"normal {quantity}, {s} SMs" for s in sms])
        out.append(Cases("DeepEP", table.name, regime, tokens.astype(float), "tokens per rank",
                         table.seconds[quantity], predicted))
    return out


def predict_deepep_ll(table: Table, device, graph=None, **_) -> list[Cases]:
    return _deepep(table, graph, "ll", device)


def predict_deepep_normal(table: Table, device, graph=None, **_) -> list[Cases]:
    return _deepep(table, graph, "normal", device)


PREDICTORS = {
    "moe": predict_moe, "moe_deepep": predict_moe_deepep, "gemm": predict_gemm,
    "attention_prefill": predict_attention_prefill, "attention_decode": predict_attention_decode,
    "mla_prefill": predict_mla_prefill, "mla_decode": predict_mla_decode,
    "nccl": predict_nccl, "custom_allreduce": predict_custom_allreduce,
    "deepep_ll": predict_deepep_ll, "deepep_normal": predict_deepep_normal,
}

COMM_FAMILIES = {"nccl", "custom_allreduce", "deepep_ll", "deepep_normal"}


def node_cluster(device) -> str:
    """The catalog's single-node cluster with the most of ``device``: where the measured
    collectives of that GPU ran (an 8-GPU HGX / DGX board)."""
    best = None
    for cluster in catalog.clusters():
        acc = cluster.node.accelerators
        if cluster.nodes == 1 and acc is not None and catalog.device(acc.device).name == device.name:
            if best is None or acc.count > best[0]:
                best = (acc.count, cluster.name)
    if best is None:
        raise InputError(f"no single-node cluster profile holds {device.name}; name one with --cluster",
                         field="--cluster")
    return best[1]


def predict(tables: list[Table], device, *, cluster: str | None = None, draws: int = 3) -> list[Cases]:
    """Cases of every table (collectives on ``cluster``, by default :func:`node_cluster`)."""
    graph = None
    if any(t.family.name in COMM_FAMILIES for t in tables):
        graph = topology(catalog.cluster(cluster, field="--cluster").name if cluster else node_cluster(device))
    out: list[Cases] = []
    for table in tables:
        if len(table):
            out += PREDICTORS[table.family.name](table, device, graph, draws=draws)
    return out


@dataclass
class Summary:
    """One line of the error table: ``family`` / ``regime`` (``all`` for the whole family)."""

    family: str
    regime: str
    rows: int
    median: float
    p90: float
    bias: float  # median of predicted / measured - 1: > 0 means the model is slow
    target: tuple[float, float] | None

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        return self.median <= self.target[0] and self.p90 <= self.target[1]

    def to_dict(self) -> dict:
        return {"family": self.family, "regime": self.regime, "rows": self.rows, "median_ape": self.median,
                "p90_ape": self.p90, "median_bias": self.bias,
                "target_median": self.target[0] if self.target else None,
                "target_p90": self.target[1] if self.target else None, "met": self.met}


def _line(family: str, regime: str, ratio: np.ndarray) -> Summary:
    ape = np.abs(ratio - 1.0)
    return Summary(family, regime, int(ape.size), float(np.median(ape)), float(np.percentile(ape, 90)),
                   float(np.median(ratio - 1.0)), TARGETS.get(family) if regime == "all" else None)


def summarise(cases: list[Cases]) -> list[Summary]:
    """Per family (``all``, with its target) then per regime, in a stable order."""
    families: dict[str, list[Cases]] = {}
    for c in cases:
        families.setdefault(c.family, []).append(c)
    out = []
    for family, group in families.items():
        ratio = np.concatenate([c.predicted / c.measured for c in group])
        regime = np.concatenate([c.regime for c in group])
        out.append(_line(family, "all", ratio))
        for name in sorted(set(regime)):
            out.append(_line(family, str(name), ratio[regime == name]))
    return out
