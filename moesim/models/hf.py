"""Read a Hugging Face ``config.json`` of a Mixture-of-Experts model into a :class:`ModelArch`.

Every family spells the same facts differently (``num_local_experts``, ``num_experts``,
``n_routed_experts``, ``moe_num_experts`` ...), so each has one small function that maps its
keys; :data:`_FAMILIES` finds it by ``model_type``. Sizes stay element counts, as in
:mod:`moesim.models.arch`. A family's defaults for keys a config may leave out are the ones its
``transformers`` configuration class uses, so a bare config means what it means to HF.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from moesim.errors import InputError
from moesim.files import load_json
from moesim.models.arch import Attention, Layer, ModelArch, MoE

_TORCH_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}

# Configs that carry no model_type (MiniCPM-MoE) are known by their architecture class.
_ARCHITECTURES = {"MiniCPMForCausalLM": "minicpm", "XverseForCausalLM": "xverse"}


class _Config:
    """A config mapping whose lookups name every missing key in one error.

    A key may be dotted (``ffn_config.moe_top_k``) to reach into a nested mapping, or give
    alternative spellings separated by ``|`` (``experts_per_token|num_experts_per_tok``); a
    key that is present but null counts as missing, as HF treats it.
    """

    def __init__(self, raw: dict, model_type: str, source: str):
        self.raw = raw
        self.model_type = model_type
        self.source = source

    def get(self, key: str, default: Any = None) -> Any:
        for spelling in key.split("|"):
            value: Any = self.raw
            for part in spelling.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            if value is not None:
                return value
        return default

    def require(self, *keys: str) -> None:
        missing = [key.replace("|", " or ") for key in keys if self.get(key) is None]
        if missing:
            raise InputError(
                f"model_type {self.model_type!r}: missing keys {', '.join(missing)}", source=self.source
            )

    def __getitem__(self, key: str) -> Any:
        self.require(key)
        return self.get(key)


def load_config(path: str | Path) -> dict:
    """Read a ``config.json`` (or the one inside a model folder) into a dict."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    config = load_json(path)
    if not isinstance(config, dict):
        raise InputError("expected a JSON object at the top level", source=str(path))
    return config


def from_hf_config(config: dict, name: str, source: str = "") -> ModelArch:
    """The :class:`ModelArch` of the MoE model a HF ``config.json`` (as a dict) describes.

    ``name`` becomes the model's name and ``source`` (a path or a repository) is kept on it and
    names it in errors. An unknown ``model_type`` or a missing key raises :class:`InputError`.
    """
    where = source or "config.json"
    if not isinstance(config, dict):
        raise InputError("expected a JSON object at the top level", source=where)
    config = _unwrap_text_config(config)
    model_type = _model_type(config)
    parse = _FAMILIES.get(model_type)
    if parse is None:
        known = ", ".join(sorted(_FAMILIES))
        shown = repr(model_type) if model_type else "(none)"
        raise InputError(f"model_type {shown} is not a known MoE family; known: {known}", source=where)
    try:
        return parse(_Config(config, model_type, where), name, source)
    except InputError:
        raise
    except (TypeError, ValueError, ZeroDivisionError) as exc:  # e.g. "hidden_size": "big", or 0 heads
        raise InputError(f"model_type {model_type!r}: a value has the wrong type or size ({exc})",
                         source=where) from None


def _unwrap_text_config(config: dict) -> dict:
    """Multimodal configs (Llama-4, Kimi-K2.5) nest the language model under ``text_config``;
    lift it, keeping the outer ``vision_config`` and the outer ``tie_word_embeddings``, which
    is where ``Llama4Config`` reads it."""
    text = config.get("text_config")
    if not isinstance(text, dict) or "hidden_size" in config:
        return config
    lifted = dict(text)
    lifted["model_type"] = text.get("model_type") or config.get("model_type")
    for key in ("vision_config", "tie_word_embeddings", "quantization_config"):
        if key in config:
            lifted[key] = config[key]
    return lifted


def _model_type(config: dict) -> str:
    model_type = config.get("model_type")
    if isinstance(model_type, str) and model_type:
        return model_type.lower()
    for architecture in config.get("architectures") or ():
        if architecture in _ARCHITECTURES:
            return _ARCHITECTURES[architecture]
    return ""


# --- pieces shared by the families -------------------------------------------------------


def _gqa(c: _Config, hidden: int, heads_key: str = "num_attention_heads", kv_key: str = "num_key_value_heads",
         head_dim: int | None = None, **fields: Any) -> Attention:
    """Multi-head or grouped-query attention; no kv-head count means one per query head."""
    heads = int(c[heads_key])
    kv_heads = int(c.get(kv_key, heads))
    head_dim = int(head_dim or c.get("head_dim") or hidden // heads)
    kind = "mha" if kv_heads == heads else "gqa"
    return Attention(kind=kind, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, **fields)


def _window(c: _Config) -> int | None:
    """A sliding window that actually binds: set, switched on, and shorter than the context
    (Phi-3.5-MoE sets one equal to its 128k context, which changes nothing)."""
    window = c.get("sliding_window")
    context = c.get("max_position_embeddings")
    if not window or not c.get("use_sliding_window", True):
        return None
    return int(window) if context is None or int(window) < int(context) else None


def _dtypes(c: _Config) -> tuple[str, str | None]:
    """Storage types of the checkpoint: (everything, routed experts if different)."""
    base = _TORCH_DTYPES.get(str(c.get("torch_dtype|dtype", "bfloat16")), "bf16")
    method = c.get("quantization_config.quant_method")
    if method == "fp8":  # DeepSeek-V3 / Kimi-K2: e4m3 weights in 128x128 blocks
        return "fp8", None
    if method == "mxfp4":  # GPT-OSS: experts in MXFP4, attention / router / embeddings bf16
        return base, "fp4"
    return base, None


def _decoder(c: _Config, name: str, family: str, source: str, *, hidden: int, attention: Attention,
             moe: MoE, moe_flags: list[bool], dense_inter: int = 0, windows: list[int | None] | None = None,
             tie_default: bool, **fields: Any) -> ModelArch:
    """A decoder-only model whose layer i is MoE when ``moe_flags[i]`` (else a dense FFN of
    ``dense_inter``) and attends within ``windows[i]`` tokens (None: the whole context)."""
    windows = windows or [None] * len(moe_flags)
    layers = tuple(
        Layer(moe=flag, dense_inter=0 if flag else int(dense_inter), window=window)
        for flag, window in zip(moe_flags, windows)
    )
    dtype, expert_dtype = _dtypes(c)
    fields.setdefault("max_context", int(c.get("max_position_embeddings|max_seq_len|n_positions", 4096)))
    return ModelArch(
        name=name, family=family, hidden=hidden, vocab=int(c["vocab_size"]), attention=attention,
        moe=moe, layers=layers, tie_embeddings=bool(c.get("tie_word_embeddings", tie_default)),
        dtype=dtype, expert_dtype=expert_dtype, source=source, **fields,
    )


def _every(n: int) -> list[bool]:
    return [True] * n


# --- the families ---------------------------------------------------------------------------

_COMMON = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def _mixtral(c: _Config, name: str, source: str) -> ModelArch:
    """Mixtral (and LLaMA-MoE-v2, which ships as model_type mixtral), Granite-MoE (PowerMoE),
    Phi-3.5-MoE and GRIN-MoE: every layer MoE, ``intermediate_size`` is one expert's."""
    c.require(*_COMMON, "intermediate_size", "num_local_experts", "num_experts_per_tok")
    hidden, n = int(c["hidden_size"]), int(c["num_hidden_layers"])
    phi = c.model_type in ("phimoe", "grinmoe")
    # PhiMoE puts attention_bias on q, k, v and o alike; Mixtral and Granite have none.
    bias = bool(c.get("attention_bias", False))
    moe = MoE(num_experts=int(c["num_local_experts"]), top_k=int(c["num_experts_per_tok"]),
              expert_inter=int(c["intermediate_size"]))
    return _decoder(
        c, name, c.model_type, source, hidden=hidden, attention=_gqa(c, hidden, bias=bias, out_bias=bias and phi),
        moe=moe, moe_flags=_every(n), windows=[_window(c)] * n,
        tie_default=c.model_type == "granitemoe", norm="layernorm" if phi else "rmsnorm",
        lm_head_bias=bool(c.get("lm_head_bias", False)),
    )


def _qwen_windows(c: _Config, n: int) -> list[int | None]:
    """Qwen2/3 slide only when use_sliding_window, and only from layer max_window_layers on."""
    window = _window(c) if c.get("use_sliding_window", False) else None
    first = int(c.get("max_window_layers", 0))
    return [window if i >= first else None for i in range(n)]


def _qwen_moe(c: _Config, name: str, source: str) -> ModelArch:
    """Qwen1.5/2-MoE (shared expert behind a sigmoid gate, q/k/v biases) and Qwen3-MoE (no shared
    expert, per-head q/k RMSNorm). ``decoder_sparse_step`` and ``mlp_only_layers`` choose the
    MoE layers; the others are dense with ``intermediate_size``."""
    c.require(*_COMMON, "moe_intermediate_size", "num_experts", "num_experts_per_tok")
    hidden, n = int(c["hidden_size"]), int(c["num_hidden_layers"])
    qwen3 = c.model_type == "qwen3_moe"
    step = int(c.get("decoder_sparse_step", 1))
    dense_only = set(c.get("mlp_only_layers", []))
    flags = [i not in dense_only and (i + 1) % step == 0 for i in range(n)]
    shared = int(c.get("shared_expert_intermediate_size", 0))
    moe = MoE(num_experts=int(c["num_experts"]), top_k=int(c["num_experts_per_tok"]),
              expert_inter=int(c["moe_intermediate_size"]), shared_inter=shared,
              num_shared_experts=1 if shared else 0, shared_gate=bool(shared))
    attention = _gqa(c, hidden, bias=bool(c.get("attention_bias", False)) if qwen3 else True,
                     qk_norm="head" if qwen3 else "none")
    return _decoder(c, name, c.model_type, source, hidden=hidden, attention=attention, moe=moe,
                    moe_flags=flags, dense_inter=int(c.get("intermediate_size", 0)),
                    windows=_qwen_windows(c, n), tie_default=False)


def _olmoe(c: _Config, name: str, source: str) -> ModelArch:
    """OLMoE: every layer MoE; q and k normalised over the whole projection."""
    c.require(*_COMMON, "intermediate_size", "num_experts", "num_experts_per_tok")
    hidden, n = int(c["hidden_size"]), int(c["num_hidden_layers"])
    moe = MoE(num_experts=int(c["num_experts"]), top_k=int(c["num_experts_per_tok"]),
              expert_inter=int(c["intermediate_size"]))
    attention = _gqa(c, hidden, bias=bool(c.get("attention_bias", False)), qk_norm="full")
    return _decoder(c, name, "olmoe", source, hidden=hidden, attention=attention, moe=moe,
                    moe_flags=_every(n), tie_default=False)


def _deepseek(c: _Config, name: str, source: str) -> ModelArch:
    """DeepSeekMoE (v1, MHA), DeepSeek-V2/V3 and Kimi-K2 (MLA): the first
    ``first_k_dense_replace`` layers are dense, then every ``moe_layer_freq``-th is MoE, with
    ``n_shared_experts`` shared experts of ``moe_intermediate_size`` each. V3's ``noaux_tc``
    routing adds a per-expert score-correction bias to the router."""
    c.require(*_COMMON, "intermediate_size", "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok")
    hidden, n = int(c["hidden_size"]), int(c["num_hidden_layers"])
    if c.get("kv_lora_rank") is not None:
        c.require("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
        heads, nope, rope = int(c["num_attention_heads"]), int(c["qk_nope_head_dim"]), int(c["qk_rope_head_dim"])
        q_lora = c.get("q_lora_rank")
        attention = Attention(
            kind="mla", num_heads=heads, num_kv_heads=heads, head_dim=nope + rope,
            q_lora_rank=int(q_lora) if q_lora else None, kv_lora_rank=int(c["kv_lora_rank"]),
            qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=int(c["v_head_dim"]),
            bias=bool(c.get("attention_bias", False)),
        )
    else:
        attention = _gqa(c, hidden)
    first_dense, freq = int(c.get("first_k_dense_replace", 0)), int(c.get("moe_layer_freq", 1))
    flags = [i >= first_dense and i % freq == 0 for i in range(n)]
    inter, shared = int(c["moe_intermediate_size"]), int(c.get("n_shared_experts") or 0)
    moe = MoE(num_experts=int(c["n_routed_experts"]), top_k=int(c["num_experts_per_tok"]), expert_inter=inter,
              shared_inter=shared * inter, num_shared_experts=shared,
              n_group=int(c.get("n_group") or 1), topk_group=int(c.get("topk_group") or 1),
              scoring=c.get("scoring_func", "softmax"), router_bias=c.get("topk_method") == "noaux_tc")
    mtp = int(c.get("num_nextn_predict_layers", 0))
    notes = (f"{mtp} multi-token-prediction module(s) ship in the checkpoint but are not counted: "
             "the vendor's total excludes them" if mtp else "")
    return _decoder(c, name, c.model_type, source, hidden=hidden, attention=attention, moe=moe,
                    moe_flags=flags, dense_inter=int(c["intermediate_size"]), tie_default=False,
                    # DeepSeek quotes V2/V3 active parameters with the output head but without the
                    # embedding table (README_WEIGHTS: 36.6B incl. 0.9B head); DeepSeekMoE (v1)
                    # counted both. Kimi-K2 is the V3 architecture.
                    active_counts_embedding=c.model_type == "deepseek", notes=notes,
                    extra={"mtp_layers": mtp} if mtp else {})


def _dbrx(c: _Config, name: str, source: str) -> ModelArch:
    """DBRX: ``d_model``/``n_heads``/``n_layers``, the MoE in ``ffn_config``, kv heads in
    ``attn_config``; LayerNorm (without bias; counted with one, a 0.0004% difference)."""
    c.require("d_model", "n_heads", "n_layers", "vocab_size", "ffn_config.ffn_hidden_size",
              "ffn_config.moe_num_experts", "ffn_config.moe_top_k", "attn_config.kv_n_heads")
    hidden, n = int(c["d_model"]), int(c["n_layers"])
    attention = _gqa(c, hidden, heads_key="n_heads", kv_key="attn_config.kv_n_heads")
    moe = MoE(num_experts=int(c["ffn_config.moe_num_experts"]), top_k=int(c["ffn_config.moe_top_k"]),
              expert_inter=int(c["ffn_config.ffn_hidden_size"]))
    # Databricks' 36B active matches the count without the embedding table (35.9B) within 1%,
    # with it (36.5B) only to its rounding; no breakdown was published.
    return _decoder(c, name, "dbrx", source, hidden=hidden, attention=attention, moe=moe, moe_flags=_every(n),
                    tie_default=False, norm="layernorm", active_counts_embedding=False)


def _gpt_oss(c: _Config, name: str, source: str) -> ModelArch:
    """GPT-OSS: every layer MoE with biased experts and router; ``layer_types`` alternates
    128-token sliding and full attention; every head has a learned sink logit."""
    c.require(*_COMMON, "num_key_value_heads", "intermediate_size", "num_local_experts",
              "experts_per_token|num_experts_per_tok")
    hidden, n = int(c["hidden_size"]), int(c["num_hidden_layers"])
    # transformers' GptOssConfig default when layer_types is absent: sliding on even layers.
    types = c.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    if len(types) != n:
        raise InputError(f"layer_types has {len(types)} entries for {n} layers", source=c.source, field="layer_types")
    window = int(c.get("sliding_window", 128))
    bias = bool(c.get("attention_bias", True))
    attention = _gqa(c, hidden, bias=bias, out_bias=bias, sinks=True)
    moe = MoE(num_experts=int(c["num_local_experts"]), top_k=int(c["experts_per_token|num_experts_per_tok"]),
              expert_inter=int(c["intermediate_size"]), expert_bias=True, router_bias=True)
    # OpenAI's model card counts the unembedding but not the embedding in the 5.1B active.
    return _decoder(c, name, "gpt_oss", source, hidden=hidden, attention=attention, moe=moe, moe_flags=_every(n),
                    windows=[window if t == "sliding_attention" else None for t in types],
                    tie_default=False, active_counts_embedding=False)


def _llama4(c: _Config, name: str, source: str) -> ModelArch:
    """Llama-4: MoE every ``interleave_moe_layer_step``-th layer (or as ``moe_layers`` lists),
    one shared expert of ``intermediate_size`` beside the routed ones, dense layers of
    ``intermediate_size_mlp``; sigmoid router. RoPE layers use chunked attention
    (``attention_chunk_size``), modelled as a window of that size: a token never looks further
    back, so no more KV is needed; the NoPE layers (every fourth) attend to everything."""
    c.require(*_COMMON, "intermediate_size", "num_local_experts|num_experts_local", "num_experts_per_tok")
    hidden, n = int(c["hidden_size"]), int(c["num_hidden_layers"])
    step = int(c.get("interleave_moe_layer_step", 1))
    moe_layers = set(c.get("moe_layers") or range(step - 1, n, step))
    inter = int(c["intermediate_size"])
    interval = int(c.get("no_rope_layer_interval", 4))
    rope = c.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(n)]
    chunk = c.get("attention_chunk_size")
    moe = MoE(num_experts=int(c["num_local_experts|num_experts_local"]), top_k=int(c["num_experts_per_tok"]),
              expert_inter=inter, shared_inter=inter, num_shared_experts=1, scoring="sigmoid")
    return _decoder(c, name, "llama4", source, hidden=hidden, attention=_gqa(c, hidden), moe=moe,
                    moe_flags=[i in moe_layers for i in range(n)],
                    dense_inter=int(c.get("intermediate_size_mlp", inter)),
                    windows=[int(chunk) if chunk and rope[i] else None for i in range(n)],
                    tie_default=False, vision_params=_llama4_vision_params(c.get("vision_config"), hidden, c.source))


def _llama4_vision_params(vision: dict | None, text_hidden: int, source: str) -> int:
    """Parameters of Llama-4's ViT, its pixel-shuffle adapter and the projector into the text
    model, from ``vision_config`` (0 without one). Layer norms and linear layers carry biases,
    the patch projection and the projector do not."""
    if not vision:
        return 0
    v = _Config(vision, "llama4 vision_config", source)
    v.require("hidden_size", "intermediate_size", "num_hidden_layers", "patch_size", "image_size",
              "projector_input_dim", "projector_output_dim", "vision_output_dim")
    h, inter = int(v["hidden_size"]), int(v["intermediate_size"])
    patch, channels = int(v["patch_size"]), int(v.get("num_channels", 3))
    positions = (int(v["image_size"]) // patch) ** 2 + 1  # one per patch plus the class token
    embeddings = channels * patch * patch * h + h + positions * h
    layer = 4 * (h * h + h) + (h * inter + inter) + (inter * h + h) + 2 * 2 * h
    shuffled = int(h / float(v.get("pixel_shuffle_ratio", 0.5)) ** 2)  # pixel shuffle folds 2x2 patches
    adapter = shuffled * int(v["projector_input_dim"]) + int(v["projector_input_dim"]) * int(v["projector_output_dim"])
    projector = int(v["vision_output_dim"]) * text_hidden + (text_hidden if v.get("multi_modal_projector_bias") else 0)
    return embeddings + 2 * 2 * h + int(v["num_hidden_layers"]) * layer + adapter + projector


def _grok_ffn(hidden: int, widening: float) -> int:
    """Grok-1's expert size from its widening factor: 2/3 of widening x hidden, rounded up to a
    multiple of 8 (as xai-org/grok-1's ``ffn_size``): 8 x 6144 gives 32768."""
    size = int(widening * hidden) * 2 // 3
    return size + (-size) % 8


def _grok(c: _Config, name: str, source: str) -> ModelArch:
    """Grok-1: 8 experts, top-2, gated-GELU experts (three matrices), tied embeddings; the
    expert size is ``intermediate_size`` or follows from ``widening_factor``."""
    c.require(*_COMMON, "num_experts", "num_experts_per_tok", "intermediate_size|widening_factor")
    hidden, n = int(c["hidden_size"]), int(c["num_hidden_layers"])
    inter = c.get("intermediate_size") or _grok_ffn(hidden, float(c["widening_factor"]))
    moe = MoE(num_experts=int(c["num_experts"]), top_k=int(c["num_experts_per_tok"]), expert_inter=int(inter))
    return _decoder(c, name, "grok-1", source, hidden=hidden, attention=_gqa(c, hidden), moe=moe,
                    moe_flags=_every(n), tie_default=True)


def _arctic(c: _Config, name: str, source: str) -> ModelArch:
    """Snowflake Arctic: MoE every ``moe_layer_frequency``-th layer (1: all), each with a dense
    residual MLP of ``hidden_size`` (sic: ArcticMLP(is_residual_mlp=True) uses hidden_size, not
    intermediate_size) beside it when ``use_residual``."""
    c.require(*_COMMON, "intermediate_size", "num_local_experts", "num_experts_per_tok")
    hidden, n = int(c["hidden_size"]), int(c["num_hidden_layers"])
    freq = int(c.get("moe_layer_frequency", 2))
    inter = int(c["intermediate_size"])
    moe = MoE(num_experts=int(c["num_local_experts"]), top_k=int(c["num_experts_per_tok"]), expert_inter=inter)
    return _decoder(c, name, "arctic", source, hidden=hidden, attention=_gqa(c, hidden), moe=moe,
                    moe_flags=[(i + 1) % freq == 0 for i in range(n)], dense_inter=inter, tie_default=False,
                    dense_residual_inter=hidden if c.get("use_residual", False) else 0)


def _sparse_flags(layers: int, step: int) -> list[bool]:
    """Switch's sparse layers (transformers' SwitchTransformersStack): every ``step``-th
    starting at layer 1, or all for step 1, none for 0."""
    if step <= 0:
        return [False] * layers
    return [step == 1 or i % step == 1 for i in range(layers)]


def _switch(c: _Config, name: str, source: str) -> ModelArch:
    """Switch Transformers (T5 encoder-decoder): ReLU FFNs of two matrices, top-1 routing with
    an ``expert_capacity``; decoder blocks add cross-attention. T5's relative-position bias
    (buckets x heads, 384 parameters per stack) is not counted."""
    c.require("d_model", "num_layers", "num_heads", "d_kv", "d_ff", "vocab_size", "num_experts")
    hidden, heads = int(c["d_model"]), int(c["num_heads"])
    enc, dec = int(c["num_layers"]), int(c.get("num_decoder_layers", c["num_layers"]))

    def step(side: str, count: int) -> int:
        if c.get(f"{side}_sparse_step") is not None:
            return int(c.get(f"{side}_sparse_step"))
        sparse = int(c.get(f"num_sparse_{side}_layers", 0))
        return count // sparse if sparse else 0

    gated = bool(c.get("is_gated_act", False))
    layers = tuple(Layer(moe=f, dense_inter=0 if f else int(c["d_ff"]), encoder=True)
                   for f in _sparse_flags(enc, step("encoder", enc)))
    layers += tuple(Layer(moe=f, dense_inter=0 if f else int(c["d_ff"]), cross_attention=True)
                    for f in _sparse_flags(dec, step("decoder", dec)))
    moe = MoE(num_experts=int(c["num_experts"]), top_k=int(c.get("num_selected_experts", 1)),
              expert_inter=int(c["d_ff"]), gated=gated, router_bias=bool(c.get("router_bias", False)))
    dtype, _ = _dtypes(c)
    return ModelArch(
        name=name, family="switch_transformers", hidden=hidden, vocab=int(c["vocab_size"]),
        attention=Attention(kind="mha", num_heads=heads, num_kv_heads=heads, head_dim=int(c["d_kv"])),
        moe=moe, layers=layers, tie_embeddings=bool(c.get("tie_word_embeddings", True)), dense_gated=gated,
        max_context=int(c.get("n_positions", 512)), dtype=dtype, source=source,
        extra={"expert_capacity": c.get("expert_capacity")},
    )


def _jetmoe(c: _Config, name: str, source: str) -> ModelArch:
    """JetMoE: a mixture of attention heads (``moe_num_experts`` q/o experts of
    ``num_key_value_heads x kv_channels``, top ``moe_top_k``) and a MoE FFN of the same count."""
    c.require("hidden_size", "num_layers|num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "kv_channels", "vocab_size", "ffn_hidden_size", "moe_num_experts", "moe_top_k")
    hidden, n = int(c["hidden_size"]), int(c["num_layers|num_hidden_layers"])
    experts, top_k = int(c["moe_num_experts"]), int(c["moe_top_k"])
    attention = _gqa(c, hidden, head_dim=int(c["kv_channels"]), moa_experts=experts)
    moe = MoE(num_experts=experts, top_k=top_k, expert_inter=int(c["ffn_hidden_size"]), gated=bool(c.get("glu", True)))
    return _decoder(c, name, "jetmoe", source, hidden=hidden, attention=attention, moe=moe,
                    moe_flags=_every(n), tie_default=True)


def _minicpm(c: _Config, name: str, source: str) -> ModelArch:
    """MiniCPM-MoE: every layer MoE, ``intermediate_size`` per expert, tied embeddings (its
    config leaves both model_type and tie_word_embeddings out)."""
    c.require(*_COMMON, "intermediate_size", "num_experts", "num_experts_per_tok")
    hidden, n = int(c["hidden_size"]), int(c["num_hidden_layers"])
    moe = MoE(num_experts=int(c["num_experts"]), top_k=int(c["num_experts_per_tok"]),
              expert_inter=int(c["intermediate_size"]))
    return _decoder(c, name, "minicpm", source, hidden=hidden, attention=_gqa(c, hidden), moe=moe,
                    moe_flags=_every(n), tie_default=True)


def _xverse(c: _Config, name: str, source: str) -> ModelArch:
    """XVERSE-MoE: every layer MoE with ``num_shared_experts`` shared experts of
    ``intermediate_size`` each beside the routed ones."""
    c.require(*_COMMON, "intermediate_size", "num_experts", "moe_top_k")
    hidden, n = int(c["hidden_size"]), int(c["num_hidden_layers"])
    inter, shared = int(c["intermediate_size"]), int(c.get("num_shared_experts", 0))
    moe = MoE(num_experts=int(c["num_experts"]), top_k=int(c["moe_top_k"]), expert_inter=inter,
              shared_inter=shared * inter, num_shared_experts=shared)
    return _decoder(c, name, "xverse", source, hidden=hidden, attention=_gqa(c, hidden), moe=moe,
                    moe_flags=_every(n), tie_default=False)


def _openmoe(c: _Config, name: str, source: str) -> ModelArch:
    """OpenMoE: every ``moe_layer_interval``-th layer is MoE and also runs an "extra" dense MLP
    after it; the rest are dense. Tokens beyond the eval capacity factor are dropped."""
    c.require(*_COMMON, "intermediate_size", "num_experts", "router_topk", "moe_layer_interval")
    hidden, n = int(c["hidden_size"]), int(c["num_hidden_layers"])
    inter, interval = int(c["intermediate_size"]), int(c["moe_layer_interval"])
    gated = bool(c.get("mlp_gated", True))
    capacity = c.get("router_capacity_factor_eval") if c.get("router_drop_tks") else None
    moe = MoE(num_experts=int(c["num_experts"]), top_k=int(c["router_topk"]), expert_inter=inter, gated=gated,
              capacity_factor=float(capacity) if capacity else None)
    return _decoder(c, name, "openmoe", source, hidden=hidden, attention=_gqa(c, hidden), moe=moe,
                    moe_flags=[(i + 1) % interval == 0 for i in range(n)], dense_inter=inter,
                    tie_default=False, dense_gated=gated, dense_residual_inter=inter)


_FAMILIES: dict[str, Callable[[_Config, str, str], ModelArch]] = {
    "mixtral": _mixtral,
    "granitemoe": _mixtral,
    "phimoe": _mixtral,
    "grinmoe": _mixtral,
    "qwen2_moe": _qwen_moe,
    "qwen3_moe": _qwen_moe,
    "olmoe": _olmoe,
    "deepseek": _deepseek,
    "deepseek_v2": _deepseek,
    "deepseek_v3": _deepseek,
    "kimi_k2": _deepseek,
    "dbrx": _dbrx,
    "gpt_oss": _gpt_oss,
    "llama4": _llama4,
    "llama4_text": _llama4,
    "grok-1": _grok,
    "grok1": _grok,
    "arctic": _arctic,
    "switch_transformers": _switch,
    "jetmoe": _jetmoe,
    "minicpm": _minicpm,
    "xverse": _xverse,
    "openmoe": _openmoe,
}
