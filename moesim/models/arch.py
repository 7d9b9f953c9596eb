"""``ModelArch``: the shape of a (Mixture-of-Experts) transformer, as the cost model needs it.

Every size is a count of elements (not bytes); bytes come from a dtype at the point of use.
Layers are listed one by one because MoE models mix kinds: DeepSeek-V3 has three dense layers
before 58 MoE ones, Llama-4-Maverick alternates, GPT-OSS alternates sliding-window and full
attention, Switch has an encoder and a decoder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

AttentionKind = Literal["mha", "gqa", "mla"]


@dataclass(frozen=True)
class Attention:
    """Self-attention of one layer (every layer of a model shares it unless noted)."""

    kind: AttentionKind
    num_heads: int
    num_kv_heads: int
    head_dim: int
    bias: bool = False
    # Multi-head latent attention (DeepSeek-V2/V3, Kimi-K2): low-rank query and joint KV.
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    v_head_dim: int | None = None
    # Per-head learned attention sinks (GPT-OSS): num_heads extra parameters.
    sinks: bool = False
    # ``bias`` is the q/k/v projection bias; ``out_bias`` the output projection's (Phi-MoE and
    # GPT-OSS have both, Qwen2-MoE only the first).
    out_bias: bool = False
    # RMSNorm on queries and keys: "head" normalises each head (head_dim weights each for q and
    # k: Qwen3), "full" the whole projection (OLMoE), "none" no norm or a weightless one (Llama-4).
    qk_norm: Literal["none", "head", "full"] = "none"
    # Mixture of attention heads (JetMoE): the q and o projections are ``moa_experts`` experts of
    # num_kv_heads * head_dim each, a token using num_heads // num_kv_heads of them. 0 = plain.
    moa_experts: int = 0


@dataclass(frozen=True)
class MoE:
    """The routed-expert block of a MoE layer.

    ``expert_inter`` is one routed expert's intermediate size; ``shared_inter`` the total
    intermediate size of the shared expert(s) (0 when none), computed by every token.
    ``gated`` experts have three matrices (gate, up, down: SwiGLU / GeGLU), otherwise two.
    """

    num_experts: int
    top_k: int
    expert_inter: int
    shared_inter: int = 0
    num_shared_experts: int = 0
    shared_gate: bool = False  # Qwen2-MoE scales the shared expert by a sigmoid gate (hidden x 1)
    gated: bool = True
    expert_bias: bool = False  # GPT-OSS experts carry biases
    router_bias: bool = False
    n_group: int = 1  # group-limited routing (DeepSeek-V2/V3): tokens pick topk_group of n_group
    topk_group: int = 1
    scoring: Literal["softmax", "sigmoid"] = "softmax"
    capacity_factor: float | None = None  # Switch-style capacity; None = no token dropping


@dataclass(frozen=True)
class Layer:
    """One transformer block.

    ``moe`` True: the FFN is the model's MoE block; otherwise a dense FFN of ``dense_inter``.
    ``window`` is the sliding-attention window in tokens (None = full attention).
    ``cross_attention`` marks decoder blocks of an encoder-decoder model.
    """

    moe: bool
    dense_inter: int = 0
    window: int | None = None
    cross_attention: bool = False
    encoder: bool = False


@dataclass(frozen=True)
class ModelArch:
    """A model's architecture.

    ``layers`` lists every block in execution order (encoder first for encoder-decoder
    models). ``dense_residual_inter`` is the intermediate size of a dense MLP that every MoE
    layer runs in addition to its MoE block (Arctic's residual MLP runs beside it, OpenMoE's "extra"
    MLP after it: the same parameters and FLOPs either way). ``published_total`` /
    ``published_active`` are the vendor's parameter counts (for checking), in parameters.

    ``vision_params`` are the parameters of a vision encoder and projector outside ``layers``
    (Llama-4): part of the total, never of a text token's active count. ``active_counts_embedding``
    says whether the vendor's active-parameter figure includes the input embedding table:
    DeepSeek and OpenAI count only the output head (a lookup reads one row of the table).
    ``dtype`` / ``expert_dtype`` are the checkpoint's storage types (``expert_dtype`` None: same
    as ``dtype``); GPT-OSS ships MXFP4 experts beside bf16 attention.
    """

    name: str
    family: str
    hidden: int
    vocab: int
    attention: Attention
    moe: MoE | None
    layers: tuple[Layer, ...]
    tie_embeddings: bool = False
    dense_gated: bool = True
    dense_residual_inter: int = 0
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    max_context: int = 4096
    dtype: str = "bf16"
    lm_head_bias: bool = False
    vision_params: int = 0
    active_counts_embedding: bool = True
    expert_dtype: str | None = None
    published_total: float | None = None
    published_active: float | None = None
    source: str = ""
    notes: str = ""
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """Indices of the MoE layers."""
        return tuple(i for i, layer in enumerate(self.layers) if layer.moe)

    @property
    def is_moe(self) -> bool:
        return self.moe is not None and bool(self.moe_layers)
