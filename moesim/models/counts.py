"""Parameter and memory counts of a :class:`ModelArch`, computed from its shape.

Counts are in parameters (elements); memory functions return bytes. Nothing here is copied from
a vendor's figure: the presets' published counts only check these.
"""

from __future__ import annotations

from moesim.dtypes import dtype_bytes, weight_bytes_per_param
from moesim.errors import InputError
from moesim.models.arch import Attention, ModelArch

BREAKDOWN = ("embedding", "lm_head", "attention", "dense_ffn", "routed_experts", "shared_experts",
             "router", "norms", "vision")


def _ffn(hidden: int, inter: int, gated: bool, bias: bool = False) -> int:
    """One MLP: gate, up and down matrices when gated (SwiGLU / GeGLU), else up and down."""
    if inter <= 0:
        return 0
    weights = (3 if gated else 2) * hidden * inter
    biases = ((2 if gated else 1) * inter + hidden) if bias else 0
    return weights + biases


def _attention(att: Attention, hidden: int) -> tuple[int, int]:
    """(stored, used per token) parameters of one attention block, its q/k norms included.

    MLA counts DeepSeek's low-rank path: q down- and up-projection (or one q projection without
    q_lora_rank), the joint KV down-projection with the shared RoPE key, its norm, the KV
    up-projection to per-head keys and values, and the output projection.
    """
    heads = att.num_heads
    if att.kind == "mla":
        qk = att.qk_nope_head_dim + att.qk_rope_head_dim
        if att.q_lora_rank:
            q = hidden * att.q_lora_rank + att.q_lora_rank + att.q_lora_rank * heads * qk
        else:
            q = hidden * heads * qk
        kv = (hidden * (att.kv_lora_rank + att.qk_rope_head_dim) + att.kv_lora_rank
              + att.kv_lora_rank * heads * (att.qk_nope_head_dim + att.v_head_dim))
        total = q + kv + heads * att.v_head_dim * hidden
        return total, total
    q_dim, kv_dim = heads * att.head_dim, att.num_kv_heads * att.head_dim
    extra = 2 * hidden * kv_dim  # k and v
    extra += (q_dim + 2 * kv_dim) if att.bias else 0
    extra += hidden if att.out_bias else 0
    extra += heads if att.sinks else 0
    extra += {"none": 0, "head": 2 * att.head_dim, "full": q_dim + kv_dim}[att.qk_norm]
    used_qo = 2 * hidden * q_dim
    if att.moa_experts:
        # JetMoE stores moa_experts q/o experts of kv_dim each and routes to heads/kv_heads of them.
        router = hidden * att.moa_experts
        return 2 * hidden * att.moa_experts * kv_dim + extra + router, used_qo + extra + router
    return used_qo + extra, used_qo + extra


def param_counts(arch: ModelArch) -> dict:
    """Total and per-token active parameters, with a breakdown of each.

    Returns ``{"total", "active", "breakdown", "active_breakdown"}``; the breakdowns have the
    keys of :data:`BREAKDOWN`. ``dense_ffn`` holds dense layers and the dense MLP an MoE layer
    runs in addition to its experts (Arctic, OpenMoE); ``shared_experts`` includes Qwen's shared
    gate; ``router`` includes router biases (GPT-OSS, DeepSeek-V3's score correction).

    Active parameters are those one token's forward pass uses: attention, dense FFNs, shared
    experts, the top-k routed experts, routers, norms and the output head in every layer it
    passes, plus the input embedding table where the vendor counts it
    (``arch.active_counts_embedding``): Mistral, Qwen, OLMoE, Phi, Llama-4, Arctic and Grok
    quote active counts with both embedding and output head; DeepSeek-V2/V3, Kimi-K2 and
    GPT-OSS with the output head only (an embedding lookup reads one row, not the table), and
    DBRX's figure fits only that way. Tied embeddings are one matrix, counted once (as the
    embedding, and as active since it is the output head too). A vision encoder counts in the
    total only. Encoder-decoder models (Switch) count both stacks in ``active``, a sanity figure
    rather than a per-token cost. Multi-token-prediction modules are not modelled.
    """
    total = dict.fromkeys(BREAKDOWN, 0)
    active = dict.fromkeys(BREAKDOWN, 0)
    hidden, moe = arch.hidden, arch.moe
    att_stored, att_used = _attention(arch.attention, hidden)
    norm = hidden * (2 if arch.norm == "layernorm" else 1)

    def add(key: str, stored: int, used: int | None = None) -> None:
        total[key] += stored
        active[key] += stored if used is None else used

    for layer in arch.layers:
        blocks = 2 if layer.cross_attention else 1  # decoder blocks attend to the encoder too
        add("attention", blocks * att_stored, blocks * att_used)
        norms = (blocks + 1) * norm
        if layer.moe:
            if moe is None:
                raise InputError(f"model {arch.name!r} has an MoE layer but no MoE block")
            expert = _ffn(hidden, moe.expert_inter, moe.gated, moe.expert_bias)
            add("routed_experts", moe.num_experts * expert, moe.top_k * expert)
            add("router", hidden * moe.num_experts + (moe.num_experts if moe.router_bias else 0))
            add("shared_experts", _ffn(hidden, moe.shared_inter, moe.gated) + (hidden if moe.shared_gate else 0))
            if arch.dense_residual_inter:
                add("dense_ffn", _ffn(hidden, arch.dense_residual_inter, arch.dense_gated))
                norms += norm  # the residual MLP has its own pre-norm
        else:
            add("dense_ffn", _ffn(hidden, layer.dense_inter, arch.dense_gated))
        add("norms", norms)

    stacks = 2 if any(layer.encoder for layer in arch.layers) else 1
    add("norms", stacks * norm)  # final norm of each stack
    embedding = arch.vocab * hidden
    add("embedding", embedding, embedding if (arch.active_counts_embedding or arch.tie_embeddings) else 0)
    if not arch.tie_embeddings:
        add("lm_head", embedding + (arch.vocab if arch.lm_head_bias else 0))
    add("vision", arch.vision_params, 0)
    return {"total": sum(total.values()), "active": sum(active.values()),
            "breakdown": total, "active_breakdown": active}


def weight_bytes(arch: ModelArch, dtype: str = "bf16", expert_dtype: str | None = None) -> dict:
    """Bytes of the weights stored as ``dtype``, routed experts as ``expert_dtype`` (default
    ``dtype``): ``{"total", "expert", "non_expert"}``.

    Element sizes: fp32 4, bf16/fp16 2, fp8/int8 1, fp6 0.75, int4/fp4 0.5 bytes, plus the
    block scales of quantised formats: fp8 one fp32 per 128x128 block, fp4/fp6 one byte per 32
    (MXFP4/MXFP6), int4 one bf16 per group of 128; int8's per-channel scales are left out.
    Shared experts are non-expert weights (every token uses them). Norms and routers stay in
    16 bits when ``dtype`` is narrower, as quantised checkpoints keep them.
    """
    counts = param_counts(arch)["breakdown"]
    expert = counts["routed_experts"]
    small = counts["norms"] + counts["router"]
    rest = sum(counts.values()) - expert - small
    non_expert = rest * weight_bytes_per_param(dtype) + small * max(dtype_bytes(dtype), 2.0)
    expert_bytes = expert * weight_bytes_per_param(expert_dtype or dtype)
    return {"total": non_expert + expert_bytes, "expert": expert_bytes, "non_expert": non_expert}


def _kv_elements(att: Attention) -> int:
    """KV-cache elements one token stores in one layer: K and V of every kv head, or MLA's
    compressed latent plus its shared RoPE key."""
    if att.kind == "mla":
        return att.kv_lora_rank + att.qk_rope_head_dim
    return 2 * att.num_kv_heads * att.head_dim


def kv_bytes_per_token(arch: ModelArch, dtype: str = "bf16") -> float:
    """KV-cache bytes one token adds across all layers (a sliding-window layer counted in full:
    it keeps the token until the window passes it; see :func:`kv_bytes` for the cap).

    Encoder layers keep no cache; a decoder's cross-attention keys and values grow with the
    encoder's input, not with decoded tokens, and are left out.
    """
    per_layer = _kv_elements(arch.attention) * dtype_bytes(dtype)
    return per_layer * sum(1 for layer in arch.layers if not layer.encoder)


def kv_bytes(arch: ModelArch, context_len: int, dtype: str = "bf16") -> float:
    """KV-cache bytes of one sequence of ``context_len`` tokens: full-attention layers hold
    every token, sliding-window (and Llama-4 chunked) layers at most their window."""
    if context_len < 0:
        raise InputError(f"context length must be >= 0, got {context_len}")
    per_token = _kv_elements(arch.attention) * dtype_bytes(dtype)
    return per_token * sum(min(context_len, layer.window or context_len)
                           for layer in arch.layers if not layer.encoder)


def activation_bytes(arch: ModelArch, tokens: int, dtype: str = "bf16", logit_tokens: int | None = None) -> float:
    """Peak transient activation bytes of one inference forward over ``tokens`` tokens on one
    device (no parallelism: divide by the tensor-parallel degree for sharded blocks).

    The peak is the residual stream (``tokens x hidden``, alive through every layer) plus the
    largest of the working sets below, each held at once within its block:

    - attention: normed input, q, k, v and the attention output; flash attention, so no
      score matrix. MLA holds its latent and, as a prefill does, per-head K and V expanded.
    - dense FFN: normed input, the gate and up outputs (one for an ungated FFN) and their
      activated product.
    - MoE: normed input, fp32 router logits (tokens x experts), and per routed copy
      (tokens x top_k) the dispatched input, gate/up outputs, activated product and expert
      output before the weighted combine; plus shared experts and a dense residual MLP.
    - logits: ``logit_tokens x vocab`` in fp32 (default ``tokens``: a decode step, every token
      the last of its sequence; pass the number of sequences for a prefill).

    Weights, the KV cache and framework workspace are not included.
    """
    if tokens < 0:
        raise InputError(f"token count must be >= 0, got {tokens}")
    size = dtype_bytes(dtype)
    hidden, att, moe = arch.hidden, arch.attention, arch.moe
    if att.kind == "mla":
        heads = att.num_heads
        qkv = (heads * (att.qk_nope_head_dim + att.qk_rope_head_dim) + att.kv_lora_rank + att.qk_rope_head_dim
               + heads * (att.qk_nope_head_dim + att.qk_rope_head_dim) + heads * att.v_head_dim)
        out = heads * att.v_head_dim
    else:
        qkv = (att.num_heads + 2 * att.num_kv_heads) * att.head_dim
        out = att.num_heads * att.head_dim
    sets = [tokens * (hidden + qkv + out) * size]

    def ffn_set(inter: int, gated: bool) -> int:
        return ((2 if gated else 1) + 1) * inter if inter else 0

    for inter in {layer.dense_inter for layer in arch.layers if not layer.moe}:
        sets.append(tokens * (hidden + ffn_set(inter, arch.dense_gated)) * size)
    if moe is not None and arch.moe_layers:
        routed = moe.top_k * (2 * hidden + ffn_set(moe.expert_inter, moe.gated))
        beside = ffn_set(moe.shared_inter, moe.gated) + ffn_set(arch.dense_residual_inter, arch.dense_gated)
        sets.append(tokens * ((hidden + routed + beside) * size + moe.num_experts * 4.0))
    logits = tokens if logit_tokens is None else logit_tokens
    sets.append(logits * (arch.vocab * 4.0 + hidden * size))
    return tokens * hidden * size + max(sets)
