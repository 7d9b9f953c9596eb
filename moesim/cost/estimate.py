"""``moesim estimate``: will a model fit a layout, and how fast will it serve, from the cost model.

The estimate follows one device of the busiest pipeline stage through one prefill step (every
sequence of its data-parallel replica prefills its prompt at once) and one decode step (every
sequence adds a token, with the KV cache at its mid-generation length). Per layer it sums the
operators that device runs (norms, projections, attention, TP all-reduce, router, dispatch and
combine all-to-all, expert GEMMs on the straggler EP rank, shared experts); layers of one kind
cost the same, so each kind is costed once and multiplied.

Each step advances every sequence by one token (decode) or through its whole prompt (prefill),
so throughput is ``batch / step``. With ``pp`` stages the busiest replica's sequences are cut into
``pp`` micro-batches that keep every stage busy: a round through all stages takes the model time
of one micro-batch plus the stage-to-stage transfers, and every micro-batch advances once per
round. The MoE layers of a stage see the tokens of every DP replica of one micro-batch.
Encoder layers (encoder-decoder models) run in prefill only; cross-attention is not costed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moesim.cost.attention import decode_attention_time, mla_decode_time, prefill_attention_time
from moesim.cost.collectives import all_gather_time, all_reduce_time, all_to_all_time, reduce_scatter_time, transfer_time
from moesim.cost.gemm import gemm_time
from moesim.cost.layout import Layout
from moesim.cost.moe import expert_times, moe_layer_time
from moesim.cost.roofline import OpCost, combine, elementwise, only_where
from moesim.dtypes import canonical_dtype, dtype_bytes, weight_bytes_per_param
from moesim.errors import InputError
from moesim.hardware.specs import Cluster
from moesim.hardware.topology import accelerators, topology
from moesim.models import activation_bytes, kv_bytes, param_counts
from moesim.models.arch import Layer, ModelArch
from moesim.routing.counts import parse_routing

# CUDA context, NCCL buffers and allocator slack a serving engine holds beyond weights, KV and
# activations. Source: ai-dynamo/aiconfigurator systems/h100_sxm.yaml (misc.other_mem 3.5 GiB,
# "increase from 551MB ... for safer deployment") - shared/data/aiconfigurator.
FRAMEWORK_RESERVE = 3.5 * 2**30


@dataclass
class Workload:
    """``batch`` concurrent sequences in all (split over DP replicas), ``prompt`` and ``output``
    tokens each; ``routing`` a spec for :func:`moesim.routing.counts.parse_routing`."""

    batch: int
    prompt: int
    output: int
    routing: str = "balanced"
    seed: int = 0


@dataclass
class Estimate:
    model: str
    cluster: str
    layout: Layout
    workload: Workload
    dtype: str
    expert_dtype: str
    kv_dtype: str
    memory: dict[str, float]
    prefill_layers: dict[str, OpCost]
    decode_layers: dict[str, OpCost]
    layer_counts: dict[str, int]
    prefill_step: float
    decode_step: float
    extras: dict = field(default_factory=dict)

    @property
    def fits(self) -> bool:
        return self.memory["free"] >= 0

    @property
    def ttft(self) -> float:
        return self.prefill_step

    @property
    def tpot(self) -> float:
        return self.decode_step

    @property
    def e2e_latency(self) -> float:
        return self.prefill_step + max(0, self.workload.output - 1) * self.decode_step

    @property
    def decode_tokens_per_s(self) -> float:
        """Generated tokens per second, whole layout, in steady decode."""
        return self.workload.batch / self.decode_step

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.workload.batch * self.workload.prompt / self.prefill_step

    @property
    def per_replica_batch(self) -> int:
        """Sequences on the busiest DP replica."""
        return -(-self.workload.batch // self.layout.dp)

    @property
    def micro_batch(self) -> int:
        """Sequences of the busiest replica in one pipeline micro-batch."""
        return -(-self.per_replica_batch // self.layout.pp)

    def bottleneck(self, phase: str = "decode") -> str:
        """'compute', 'HBM', 'interconnect' or 'launch overhead': what the step's time is mostly
        spent on, summed over its layers."""
        layers = self.decode_layers if phase == "decode" else self.prefill_layers
        totals = {"compute": 0.0, "HBM": 0.0, "interconnect": 0.0, "launch overhead": 0.0}
        label = {"compute": "compute", "memory": "HBM", "communication": "interconnect", "launch": "launch overhead"}
        for kind, cost in layers.items():
            for op in _leaves(cost):
                totals[label[op.bound]] += op.time * self.layer_counts.get(kind, 1)
        return max(totals, key=totals.get)

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "cluster": self.cluster,
            "layout": self.layout.to_dict(),
            "workload": vars(self.workload),
            "dtypes": {"weights": self.dtype, "experts": self.expert_dtype, "kv_cache": self.kv_dtype},
            "fits": self.fits,
            "memory_per_device_bytes": self.memory,
            "layer_counts": self.layer_counts,
            "prefill": {
                "layers": {k: v.to_dict() for k, v in self.prefill_layers.items()},
                "step_s": self.prefill_step,
                "ttft_s": self.ttft,
                "tokens_per_s": self.prefill_tokens_per_s,
                "bottleneck": self.bottleneck("prefill"),
            },
            "micro_batch_sequences": self.micro_batch,
            "decode": {
                "layers": {k: v.to_dict() for k, v in self.decode_layers.items()},
                "step_s": self.decode_step,
                "tpot_s": self.tpot,
                "tokens_per_s": self.decode_tokens_per_s,
                "tokens_per_s_per_device": self.decode_tokens_per_s / self.layout.devices,
                "bottleneck": self.bottleneck("decode"),
            },
            "e2e_latency_s": self.e2e_latency,
            **self.extras,
        }


def _leaves(cost: OpCost):
    if not cost.parts:
        yield cost
    for part in cost.parts:
        yield from _leaves(part)


def _layer_kind(layer: Layer) -> str:
    kind = "moe" if layer.moe else "dense"
    kind = f"{kind}+window{layer.window}" if layer.window else kind
    return f"encoder-{kind}" if layer.encoder else kind


class LayerCosting:
    """What one device of the layout spends on each operator of a layer; holds the shared
    context (the simulator costs its steps with it too)."""

    def __init__(self, arch: ModelArch, cluster: Cluster, layout: Layout, workload: Workload, dtype: str, expert_dtype: str,
                 kv_dtype: str, group_sequences: int, devices: list[str] | None = None):
        self.arch, self.layout, self.workload = arch, layout, workload
        self.group_sequences = group_sequences  # sequences of all DP replicas in one micro-batch
        self.dtype, self.expert_dtype, self.kv_dtype = dtype, expert_dtype, kv_dtype
        self.graph = topology(cluster)
        self.ranks = accelerators(self.graph)
        self.device = self.graph.nodes[self.ranks[0]]["spec"]
        # the devices of one pipeline stage: the cluster's first, unless a device group is given
        # (the simulator's prefill and decode groups of a disaggregated deployment)
        self.stage = list(devices) if devices else self.ranks[: layout.stage_devices]
        self.tp_group = self.stage[: layout.tp]
        att = arch.attention
        self.heads = att.num_heads // layout.tp
        self.kv_heads = max(1, att.num_kv_heads // layout.tp) if att.kind != "mla" else 1
        self.act_bytes = dtype_bytes("bf16")

    # -- dense pieces -------------------------------------------------------------------------
    def _gemm(self, name: str, tokens: int, n: int, k: int, dtype: str | None = None) -> OpCost:
        return gemm_time(self.device, np.maximum(tokens, 1) if np.ndim(tokens) else max(tokens, 1), n, k,
                         dtype or self.dtype, name=name)

    def _tp_all_reduce(self, tokens: int) -> OpCost | None:
        if self.layout.tp == 1:
            return None
        cost = all_reduce_time(self.graph, self.tp_group, tokens * self.arch.hidden * self.act_bytes)
        cost.name = "tp_all_reduce"
        return cost

    def attention(self, layer: Layer, batch: int, new_tokens: int, kv_len: int) -> list[OpCost]:
        """Norm, projections, attention core and TP all-reduce for ``batch`` sequences adding
        ``new_tokens`` each over a cache of ``kv_len`` (prefill: ``kv_len == new_tokens``)."""
        tokens = batch * new_tokens
        if new_tokens > 1:
            before, after = self.projections(tokens, prefill_tokens=tokens)
            core = self.prefill_core(layer, batch, new_tokens)
        else:
            before, after = self.projections(tokens, prefill_tokens=0)
            core = self.decode_core(layer, batch, kv_len)
        return before + [core] + after

    def projections(self, tokens: int, prefill_tokens: int) -> tuple[list[OpCost], list[OpCost]]:
        """The attention block's kernels before and after the attention core, for ``tokens``
        new tokens of which ``prefill_tokens`` are prompt tokens (a mixed batch of chunked
        prefill runs the GEMMs once over all of them). Both may be arrays of the same shape (the
        simulator costs many batches at once): a kernel some of them do not run costs those
        nothing."""
        att, h = self.arch.attention, self.arch.hidden
        decode_tokens = tokens - prefill_tokens
        before = [elementwise(self.device, "input_norm", tokens * h, "bf16", reads=1, writes=1, flops_per_element=4)]
        after = []
        if att.kind == "mla":
            q_dim = att.qk_nope_head_dim + att.qk_rope_head_dim
            if att.q_lora_rank:
                before.append(self._gemm("q_down", tokens, att.q_lora_rank, h))
                before.append(self._gemm("q_up", tokens, self.heads * q_dim, att.q_lora_rank))
            else:
                before.append(self._gemm("q_proj", tokens, self.heads * q_dim, h))
            before.append(self._gemm("kv_down", tokens, att.kv_lora_rank + att.qk_rope_head_dim, h))
            if np.any(prefill_tokens):
                before.append(only_where(self._gemm("kv_up", prefill_tokens, self.heads * (att.qk_nope_head_dim + att.v_head_dim),
                                                    att.kv_lora_rank), np.greater(prefill_tokens, 0)))
            if np.any(decode_tokens):
                # Absorbed decode: queries pass through W_UK per head, outputs through W_UV.
                # one [nope x kv_lora] matrix per head: a batched GEMM, costed as one with every
                # head's weights (FLOP and weight bytes both scale with the heads)
                decoding = np.greater(decode_tokens, 0)
                before.append(only_where(self._gemm("q_absorb", decode_tokens, self.heads * att.kv_lora_rank,
                                                    att.qk_nope_head_dim), decoding))
                after.append(only_where(self._gemm("v_absorb", decode_tokens, self.heads * att.v_head_dim, att.kv_lora_rank),
                                        decoding))
            after.append(self._gemm("o_proj", tokens, h, self.heads * att.v_head_dim))
        else:
            d = att.head_dim
            before.append(self._gemm("qkv_proj", tokens, (self.heads + 2 * self.kv_heads) * d, h))
            after.append(self._gemm("o_proj", tokens, h, self.heads * d))
        reduce = self._tp_all_reduce(tokens)
        return before, after + ([reduce] if reduce else [])

    def prefill_core(self, layer: Layer, batch: int, new_tokens: int, context: int = 0) -> OpCost:
        """Attention over ``batch`` prompt chunks of ``new_tokens`` after ``context`` cached tokens."""
        att = self.arch.attention
        if att.kind == "mla":
            return prefill_attention_time(self.device, batch, new_tokens, self.heads, self.heads,
                                          att.qk_nope_head_dim + att.qk_rope_head_dim, v_head_dim=att.v_head_dim,
                                          efficiency=self.device.efficiency.mla_prefill, context=context, name="mla_prefill")
        return prefill_attention_time(self.device, batch, new_tokens, self.heads, self.kv_heads, att.head_dim,
                                      window=layer.window, kv_dtype=self.kv_dtype, context=context)

    def decode_core(self, layer: Layer, batch, kv_len) -> OpCost:
        """Decode attention of ``batch`` sequences over ``kv_len`` cached tokens (arrays allowed:
        one decode batch per DP replica)."""
        att = self.arch.attention
        if att.kind == "mla":
            return mla_decode_time(self.device, batch, kv_len, self.heads, att.kv_lora_rank, att.qk_rope_head_dim,
                                   kv_dtype=self.kv_dtype)
        return decode_attention_time(self.device, batch, kv_len, self.heads, self.kv_heads, att.head_dim,
                                     window=layer.window, kv_dtype=self.kv_dtype)

    def dense_ffn(self, tokens: int, inter: int, name: str = "dense_ffn") -> list[OpCost]:
        h, tp = self.arch.hidden, self.layout.tp
        shard = inter // tp
        up = 2 * shard if self.arch.dense_gated else shard
        ops = [self._gemm(f"{name}_up", tokens, up, h)]
        ops.append(elementwise(self.device, f"{name}_act", tokens * shard, "bf16", reads=2, writes=1, flops_per_element=4))
        ops.append(self._gemm(f"{name}_down", tokens, h, shard))
        return ops

    # -- MoE -----------------------------------------------------------------------------------
    def moe(self, tokens: int, new_tokens: int) -> list[OpCost]:
        """The MoE block on this stage: ``tokens`` on this device's replica, ``new_tokens`` per
        sequence (the group's tokens are ``group_sequences * new_tokens``)."""
        moe, lay, h = self.arch.moe, self.layout, self.arch.hidden
        ops = self.moe_pre(tokens)
        group_tokens = self.group_sequences * new_tokens
        counts = parse_routing(self.workload.routing, group_tokens, moe.num_experts, moe.top_k, ep=lay.ep, seed=self.workload.seed)
        if lay.ep == 1 and lay.expert_tp > lay.tp:
            # DP attention with experts cut over every device of the stage: gather the replicas'
            # tokens, run each expert's shard on all of them, reduce-scatter the partial sums.
            gather, scatter = self.moe_gather_scatter(group_tokens)
            ops.append(gather)
            ops.append(moe_layer_time(self.device, counts, tokens=group_tokens, hidden=h, inter=moe.expert_inter, top_k=moe.top_k,
                                      dtype=self.expert_dtype, expert_tp=lay.expert_tp, gated=moe.gated, router=False))
            ops.append(scatter)
        elif lay.ep == 1:
            ops.append(moe_layer_time(self.device, counts, tokens=tokens, hidden=h, inter=moe.expert_inter, top_k=moe.top_k,
                                      dtype=self.expert_dtype, expert_tp=lay.expert_tp, gated=moe.gated, router=False))
        else:
            ops.extend(self._expert_parallel(counts, group_tokens))
        return ops + self.moe_shared(tokens)

    def moe_pre(self, tokens: int) -> list[OpCost]:
        """Before the routed experts: the post-attention norm and the router GEMM."""
        h, moe = self.arch.hidden, self.arch.moe
        return [elementwise(self.device, "post_attn_norm", tokens * h, "bf16", reads=1, writes=1, flops_per_element=4),
                self._gemm("router", tokens, moe.num_experts, h, "bf16")]

    def moe_shared(self, tokens: int) -> list[OpCost]:
        """Beside the routed experts: shared experts, a dense residual FFN (Arctic), and the TP
        all-reduce of their partial sums (and of TP-sharded routed experts)."""
        arch, moe, lay = self.arch, self.arch.moe, self.layout
        ops = []
        if moe.shared_inter:
            ops.extend(self.dense_ffn(tokens, moe.shared_inter, "shared_expert"))
        if arch.dense_residual_inter:
            ops.extend(self.dense_ffn(tokens, arch.dense_residual_inter, "dense_residual"))
        if lay.tp > 1 and (moe.shared_inter or arch.dense_residual_inter or (lay.ep == 1 and lay.expert_tp == lay.tp)):
            ops.append(self._tp_all_reduce(tokens))
        return ops

    def moe_gather_scatter(self, group_tokens: int) -> tuple[OpCost, OpCost]:
        """All-gather of the replicas' tokens before experts cut over the whole stage, and the
        reduce-scatter of their partial sums after."""
        nbytes = group_tokens * self.arch.hidden * self.act_bytes
        gather = all_gather_time(self.graph, self.stage, nbytes)
        gather.name = "moe_all_gather"
        scatter = reduce_scatter_time(self.graph, self.stage, nbytes)
        scatter.name = "moe_reduce_scatter"
        return gather, scatter

    def dense_block(self, layer: Layer, tokens: int) -> list[OpCost]:
        """A dense layer's FFN half: norm, FFN and its TP all-reduce."""
        ops = [elementwise(self.device, "post_attn_norm", tokens * self.arch.hidden, "bf16", reads=1, writes=1, flops_per_element=4)]
        ops += self.dense_ffn(tokens, layer.dense_inter)
        reduce = self._tp_all_reduce(tokens)
        return ops + ([reduce] if reduce else [])

    def _expert_parallel(self, counts: np.ndarray, group_tokens: int) -> list[OpCost]:
        """Dispatch, expert compute on the straggler rank, combine (DeepEP-style all-to-all:
        each rank receives only the slots of its own experts)."""
        moe, lay, h = self.arch.moe, self.layout, self.arch.hidden
        per_rank = moe.num_experts // lay.ep
        rank_slots = counts.reshape(lay.ep, per_rank).sum(axis=1).astype(np.float64)
        ep_group = self.ep_group
        # Every source rank holds an equal share of the group's tokens and sends each slot to
        # the rank of its expert; an expert-TP group receives the same slots on each member.
        a2a_bytes = self.dispatch_element_bytes
        dispatch = np.outer(np.full(lay.ep, 1.0 / lay.ep), rank_slots) * h * a2a_bytes
        combine_m = dispatch.T * (dtype_bytes("bf16") / a2a_bytes)
        ops = []
        cost = all_to_all_time(self.graph, ep_group, dispatch, algorithm=self.a2a_algorithm(ep_group))
        cost.name = "dispatch"
        ops.append(cost)
        local = counts.reshape(lay.ep, per_rank)
        times = expert_times(self.device, local, hidden=h, inter=moe.expert_inter, dtype=self.expert_dtype,
                             expert_tp=lay.expert_tp, gated=moe.gated)
        worst_rank = int(times.argmax())
        worst = moe_layer_time(self.device, local[worst_rank], tokens=max(int(local[worst_rank].sum()), 1), hidden=h,
                               inter=moe.expert_inter, top_k=1, dtype=self.expert_dtype, expert_tp=lay.expert_tp,
                               gated=moe.gated, router=False)
        worst.name = "experts"
        worst.info.update(straggler_rank=worst_rank, slots_per_rank_max=float(rank_slots.max()),
                          slots_per_rank_mean=float(rank_slots.mean()))
        ops.append(worst)
        cost = all_to_all_time(self.graph, ep_group, combine_m, algorithm=self.a2a_algorithm(ep_group))
        cost.name = "combine"
        ops.append(cost)
        return ops

    @property
    def ep_group(self) -> list[str]:
        """One device per expert-parallel rank (the first of each expert-TP group)."""
        return self.stage[:: self.layout.expert_tp] if self.layout.expert_tp > 1 else self.stage

    @property
    def dispatch_element_bytes(self) -> int:
        """Bytes per hidden element sent by dispatch: fp8 when the experts take fp8 (DeepEP's
        fp8 dispatch), else bf16; combine always returns bf16."""
        return dtype_bytes("fp8" if canonical_dtype(self.expert_dtype) == "fp8" else "bf16")

    def a2a_algorithm(self, group: list[str]) -> str:
        nodes = {self.graph.nodes[g]["node"] for g in group}
        return "hierarchical" if len(nodes) > 1 else "flat"

    # -- whole layers --------------------------------------------------------------------------
    def layer(self, layer: Layer, batch: int, new_tokens: int, kv_len: int) -> OpCost:
        tokens = batch * new_tokens
        ops = self.attention(layer, batch, new_tokens, kv_len)
        ops += self.moe(tokens, new_tokens) if layer.moe else self.dense_block(layer, tokens)
        return combine(_layer_kind(layer), ops)

    def lm_head(self, batch: int) -> OpCost:
        vocab_shard = -(-self.arch.vocab // self.layout.tp)
        return combine("lm_head", [self._gemm("lm_head", batch, vocab_shard, self.arch.hidden)])


def memory_per_device(arch: ModelArch, layout: Layout, workload: Workload, device, dtype: str, expert_dtype: str, kv_dtype: str) -> dict[str, float]:
    """Bytes per device on the busiest stage."""
    counts = param_counts(arch)
    parts = counts["breakdown"]
    w = weight_bytes_per_param(dtype)
    we = weight_bytes_per_param(expert_dtype)
    per_stage_layers = -(-arch.num_layers // layout.pp)
    stage_share = per_stage_layers / arch.num_layers
    tp = layout.tp
    dense = (parts.get("attention", 0) + parts.get("dense_ffn", 0) + parts.get("shared_experts", 0) + parts.get("norms", 0)) / tp
    experts = parts.get("routed_experts", 0) / (layout.ep * layout.expert_tp)
    router = parts.get("router", 0)
    embed = (parts.get("embedding", 0) + parts.get("lm_head", 0)) / tp
    if layout.pp > 1:
        embed = max(parts.get("embedding", 0), parts.get("lm_head", 0)) / tp
    weights = (dense + router) * stage_share * w + experts * stage_share * we + embed * w
    per_replica = -(-workload.batch // layout.dp)
    context = workload.prompt + workload.output
    att = arch.attention
    kv_split = 1 if att.kind == "mla" else att.num_kv_heads / max(1, att.num_kv_heads // tp)
    kv = per_replica * kv_bytes(arch, context, kv_dtype) * stage_share / kv_split
    # The prefill step is the peak: every prompt token in flight, one row of logits per sequence.
    activations = activation_bytes(arch, per_replica * workload.prompt, "bf16", logit_tokens=per_replica) / tp
    capacity = device.memory.capacity
    used = weights + kv + activations + FRAMEWORK_RESERVE
    return {
        "capacity": capacity,
        "weights": weights,
        "kv_cache": kv,
        "activations": activations,
        "reserved": FRAMEWORK_RESERVE,
        "free": capacity - used,
    }


def default_dtypes(arch: ModelArch) -> tuple[str, str]:
    """The weight and expert dtypes a serving engine loads ``arch`` in by default: the
    checkpoint's own (DeepSeek-V3's fp8, GPT-OSS's fp4 experts), except that fp32 checkpoints
    are served in bf16 (vLLM / SGLang ``--dtype auto``)."""
    weights = "bf16" if canonical_dtype(arch.dtype) in ("fp32", "fp64", "tf32") else arch.dtype
    return weights, arch.expert_dtype or weights


KV_DTYPES = ("bf16", "fp16", "fp8")


def estimate(
    arch: ModelArch,
    cluster: Cluster,
    layout: Layout,
    workload: Workload,
    *,
    dtype: str | None = None,
    expert_dtype: str | None = None,
    kv_dtype: str | None = None,
) -> Estimate:
    """Memory fit, per-layer operator times and step times of ``arch`` on ``cluster`` with
    ``layout`` serving ``workload`` (see the module docstring for what is assumed). Weight dtypes
    default to the checkpoint's (:func:`default_dtypes`); the KV cache to bf16."""
    default_weights, default_experts = default_dtypes(arch)
    dtype = dtype or default_weights
    expert_dtype = expert_dtype or (default_experts if dtype == default_weights else dtype)
    kv_dtype = kv_dtype or "bf16"
    if canonical_dtype(kv_dtype) not in KV_DTYPES:
        raise InputError(f"KV-cache dtype {kv_dtype!r} is not supported; expected one of {', '.join(KV_DTYPES)}",
                         field="--kv-dtype")
    per_replica = -(-workload.batch // layout.dp)
    micro = -(-per_replica // layout.pp)
    costing = LayerCosting(arch, cluster, layout, workload, dtype, expert_dtype, kv_dtype,
                       group_sequences=-(-workload.batch // layout.pp))
    kinds: dict[str, Layer] = {}
    counts: dict[str, int] = {}
    for layer in arch.layers:
        kind = _layer_kind(layer)
        kinds.setdefault(kind, layer)
        counts[kind] = counts.get(kind, 0) + 1
    mid_kv = workload.prompt + max(1, workload.output // 2)
    prefill = {k: costing.layer(l, micro, workload.prompt, workload.prompt) for k, l in kinds.items()}
    decode = {k: costing.layer(l, micro, 1, mid_kv) for k, l in kinds.items() if not l.encoder}
    prefill["lm_head"] = costing.lm_head(micro)
    decode["lm_head"] = costing.lm_head(micro)
    counts["lm_head"] = 1

    def step(layers: dict[str, OpCost], new_tokens: int) -> float:
        model_time = sum(layers[k].time * n for k, n in counts.items() if k in layers)
        hop = 0.0
        if layout.pp > 1:
            hop = transfer_time(costing.graph, costing.ranks[0], costing.ranks[layout.stage_devices],
                                micro * new_tokens * arch.hidden * 2).time
        return model_time + (layout.pp - 1) * hop

    memory = memory_per_device(arch, layout, workload, costing.device, dtype, expert_dtype, kv_dtype)
    return Estimate(
        model=arch.name, cluster=cluster.name, layout=layout, workload=workload,
        dtype=dtype, expert_dtype=expert_dtype, kv_dtype=kv_dtype, memory=memory,
        prefill_layers=prefill, decode_layers=decode, layer_counts=counts,
        prefill_step=step(prefill, workload.prompt), decode_step=step(decode, 1),
        extras={"device": costing.device.name, "price_per_hour": costing.device.price_per_hour * layout.devices},
    )
