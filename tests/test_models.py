"""moesim.models: HF config ingestion, presets, parameter and memory counts."""

from __future__ import annotations

import json
import re

import pytest

from moesim.errors import InputError, UnknownNameError
from moesim.models import (
    activation_bytes,
    from_hf_config,
    kv_bytes,
    kv_bytes_per_token,
    list_presets,
    load_model,
    param_counts,
    weight_bytes,
)
from moesim.models.hf import load_config

PRESETS = [
    "arctic", "dbrx", "deepseek-v2", "deepseek-v2-lite", "deepseek-v3", "gpt-oss-120b", "gpt-oss-20b",
    "grok-1", "kimi-k2", "llama-4-maverick", "llama-4-scout", "mixtral-8x22b", "mixtral-8x7b",
    "olmoe-1b-7b", "phi-3.5-moe", "qwen1.5-moe-a2.7b", "qwen2-57b-a14b", "qwen3-235b-a22b",
    "qwen3-30b-a3b", "switch-base-128",
]

# Published figures the architecture cannot reach within 1% (or the figure's own rounding), each
# with the tolerance it gets and why. Everything else must meet the general rule.
EXCEPTIONS = {
    ("qwen3-30b-a3b", "active"): (0.02, "computes 3.353B; Qwen's card says 3.3B (its 29.9B non-embedding "
                                        "total matches ours to 0.1%), i.e. truncated, not rounded"),
    ("deepseek-v2-lite", "active"): (0.025, "computes 2.451B under DeepSeek's convention (output head in, "
                                            "embedding out), the one that reproduces V3's published 36.6B; "
                                            "the paper truncates to 2.4B"),
    ("grok-1", "active"): (0.03, "~86B is not an xAI figure (xAI: 2 of 8 experts per token); 2 experts + "
                                 "attention + the tied embedding give 83.8B"),
    ("kimi-k2", "total"): (0.015, "the released config (61 layers, 1 dense, 384 x 2048 experts, 64 MLA heads) "
                                  "gives 1.026T; the model card says 1T, the technical report 1.04T"),
}

_SCALE = {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}


def _half_unit(written: str) -> float:
    """Half a unit in the last digit of a figure as written ("37B" -> 0.5e9, "1.04T" -> 5e9):
    the most a correctly rounded figure can differ from the exact count."""
    match = re.fullmatch(r"~?([0-9]+)(?:\.([0-9]+))?([KMBT])", written)
    assert match, written
    return 0.5 * 10.0 ** -len(match.group(2) or "") * _SCALE[match.group(3)]


@pytest.mark.parametrize("name", PRESETS)
def test_preset_matches_published_parameter_counts(name):
    arch = load_model(name)
    counts = param_counts(arch)
    written = arch.extra["published"]
    for kind, published in (("total", arch.published_total), ("active", arch.published_active)):
        if published is None:
            continue
        error = abs(counts[kind] - published)
        if (name, kind) in EXCEPTIONS:
            tolerance, why = EXCEPTIONS[(name, kind)]
            assert error <= tolerance * published, f"{name} {kind}: {counts[kind]:.4g} vs {published:.4g} ({why})"
        else:
            # Within 1%, or as close as the vendor's own rounding of the figure allows ("17B").
            allowed = max(0.01 * published, _half_unit(written[kind]))
            assert error <= allowed, f"{name} {kind}: computed {counts[kind]:.4g}, published {written[kind]}"


def test_switch_active_count_is_a_sane_fraction():
    counts = param_counts(load_model("switch-base-128"))
    assert 0 < counts["active"] < 0.05 * counts["total"]


def test_list_presets_has_every_preset_and_they_ship_in_the_package():
    assert list_presets() == sorted(PRESETS)


def test_alias_loads_the_same_architecture():
    r1, v3 = load_model("deepseek-r1"), load_model("DeepSeek-V3")
    assert r1.layers == v3.layers and r1.moe == v3.moe and r1.attention == v3.attention


def test_misspelt_preset_suggests_the_right_one():
    with pytest.raises(UnknownNameError) as caught:
        load_model("mixtral-8x7")
    assert "mixtral-8x7b" in str(caught.value)
    with pytest.raises(UnknownNameError, match="qwen3-235b-a22b"):
        load_model("qwen3-235b-a2b")


def test_load_model_from_a_file_or_a_folder(tmp_path):
    folder = tmp_path / "Mixtral-mini"
    folder.mkdir()
    config = {"model_type": "mixtral", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4,
              "num_experts_per_tok": 2, "vocab_size": 100}
    (folder / "config.json").write_text(json.dumps(config))
    for target in (folder, folder / "config.json"):
        arch = load_model(str(target))
        assert arch.name == "Mixtral-mini" and arch.moe.num_experts == 4 and arch.num_layers == 2
    with pytest.raises(InputError, match="file not found"):
        load_model(str(tmp_path / "absent" / "config.json"))


def test_unknown_family_names_the_model_type_and_the_known_ones():
    with pytest.raises(InputError) as caught:
        from_hf_config({"model_type": "foo", "hidden_size": 8}, "foo")
    message = str(caught.value)
    assert message.startswith("config.json: model_type 'foo' is not a known MoE family; known: ")
    assert "mixtral" in message and "deepseek_v3" in message


def test_missing_keys_are_all_named():
    with pytest.raises(InputError) as caught:
        from_hf_config({"model_type": "mixtral", "hidden_size": 4096, "num_hidden_layers": 2,
                        "num_attention_heads": 32, "vocab_size": 32000, "intermediate_size": 14336},
                       "broken", source="broken/config.json")
    assert str(caught.value) == ("broken/config.json: model_type 'mixtral': missing keys "
                                 "num_local_experts, num_experts_per_tok")
    with pytest.raises(InputError, match="missing keys ffn_config.moe_top_k"):
        config = json.loads(json.dumps(_preset_config("dbrx")))
        del config["ffn_config"]["moe_top_k"]
        from_hf_config(config, "dbrx")


def test_malformed_value_is_an_input_error():
    config = _preset_config("mixtral-8x7b") | {"hidden_size": "big"}
    with pytest.raises(InputError, match="model_type 'mixtral': a value has the wrong type"):
        from_hf_config(config, "bad")


def _preset_config(name):
    from moesim.models.presets import _index

    raw = json.loads(_index()[name].read_text())
    return {key: value for key, value in raw.items() if not key.startswith("_")}


SHARED_CONFIGS = ["deepseek", "deepseek2", "grin", "jetmoe", "llamamoe2", "minicpm", "mixtral", "olmoe",
                  "openmoe", "phi", "powermoe", "qwen", "qwen2", "qwen3", "switch", "xverse"]


@pytest.mark.parametrize("stem", SHARED_CONFIGS)
def test_every_shared_config_parses(shared_dir, stem):
    path = shared_dir / "data" / "model-configs" / f"{stem}.json"
    arch = from_hf_config(load_config(path), stem, str(path))
    assert arch.is_moe and param_counts(arch)["total"] > 0


@pytest.mark.parametrize("stem", SHARED_CONFIGS)
def test_shared_configs_match_the_moe_lrc_parameter_counts(shared_dir, stem):
    """moe-lrc lists each model's parameter count (in billions) beside its config."""
    if stem == "openmoe":
        pytest.xfail("OpenMoE per its modelling code (MoE every 6th layer plus an extra MLP) gives 9.3B; "
                     "moe-lrc lists 11.86B, not reconciled")
    folder = shared_dir / "data" / "model-configs"
    listed = {row["key"]: row["num_params"] * 1e9
              for row in map(json.loads, (folder / "moe-lrc-models.jsonl").read_text().splitlines()) if row}
    arch = from_hf_config(load_config(folder / f"{stem}.json"), stem)
    assert param_counts(arch)["total"] == pytest.approx(listed[stem], rel=0.01)


def test_layer_layouts():
    v3 = load_model("deepseek-v3")
    assert v3.moe_layers == tuple(range(3, 61)) and v3.layers[0].dense_inter == 18432
    maverick = load_model("llama-4-maverick")
    assert maverick.moe_layers == tuple(range(1, 48, 2)) and maverick.layers[0].dense_inter == 16384
    assert maverick.moe.shared_inter == 8192 and maverick.vision_params > 0
    oss = load_model("gpt-oss-120b")
    assert [layer.window for layer in oss.layers[:4]] == [128, None, 128, None]
    switch = load_model("switch-base-128")
    assert sum(layer.encoder for layer in switch.layers) == 12
    assert sum(layer.cross_attention for layer in switch.layers) == 12
    assert switch.moe_layers == (1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23)
    assert not switch.moe.gated and not switch.dense_gated
    arctic = load_model("arctic")
    assert arctic.dense_residual_inter == 7168 and arctic.attention.num_kv_heads == 8


def test_kv_bytes_per_token_gqa_mixtral():
    assert kv_bytes_per_token(load_model("mixtral-8x7b")) == 32 * 2 * 8 * 128 * 2 == 131072


def test_kv_bytes_per_token_mla_deepseek_v3():
    v3 = load_model("deepseek-v3")
    assert kv_bytes_per_token(v3) == (512 + 64) * 61 * 2
    assert kv_bytes_per_token(v3, "fp8") == (512 + 64) * 61


def test_kv_bytes_caps_sliding_layers_at_their_window():
    oss = load_model("gpt-oss-120b")
    per_layer_token = 2 * 8 * 64 * 2
    assert kv_bytes_per_token(oss) == 36 * per_layer_token
    assert kv_bytes(oss, 100) == 36 * 100 * per_layer_token  # shorter than the window: no cap yet
    assert kv_bytes(oss, 100_000) == (18 * 100_000 + 18 * 128) * per_layer_token
    switch = load_model("switch-base-128")
    assert kv_bytes_per_token(switch) == 12 * 2 * 12 * 64 * 2  # decoder self-attention only


def test_weight_bytes():
    mixtral = load_model("mixtral-8x7b")
    bf16 = weight_bytes(mixtral)
    assert bf16["total"] == pytest.approx(93.4e9, rel=0.001)
    assert bf16["total"] == pytest.approx(bf16["expert"] + bf16["non_expert"])
    assert bf16["expert"] == 2 * param_counts(mixtral)["breakdown"]["routed_experts"]
    # fp8 with one fp32 scale per 128x128 block; norms and routers stay 16-bit.
    fp8 = weight_bytes(mixtral, "fp8")
    assert fp8["expert"] == pytest.approx(bf16["expert"] / 2 * (1 + 4 / 128**2))
    # MXFP4 experts (GPT-OSS's checkpoint): half a byte plus one scale byte per 32 weights.
    oss = load_model("gpt-oss-120b")
    mixed = weight_bytes(oss, "bf16", expert_dtype=oss.expert_dtype)
    assert oss.expert_dtype == "fp4"
    assert mixed["expert"] == pytest.approx(param_counts(oss)["breakdown"]["routed_experts"] * (0.5 + 1 / 32))
    with pytest.raises(InputError, match="unknown dtype 'fp3'"):
        weight_bytes(mixtral, "fp3")


def test_activation_bytes_peak_working_set():
    mixtral = load_model("mixtral-8x7b")
    tokens, h, inter = 4096, 4096, 14336
    # residual stream + MoE working set: normed input, per routed copy the dispatched input,
    # gate/up outputs, activated product and expert output, and fp32 router logits.
    moe = tokens * ((h + 2 * (2 * h + 3 * inter)) * 2 + 8 * 4)
    assert activation_bytes(mixtral, tokens, logit_tokens=1) == tokens * h * 2 + moe
    assert activation_bytes(mixtral, 0) == 0
    # one decode step of 8 sequences of GPT-OSS: its 201k-entry fp32 logits are the largest
    oss = load_model("gpt-oss-20b")
    assert activation_bytes(oss, 8) == 8 * 2880 * 2 + 8 * (201088 * 4 + 2880 * 2)


def test_tied_embeddings_count_once():
    grok = param_counts(load_model("grok-1"))
    assert grok["breakdown"]["lm_head"] == 0
    assert grok["breakdown"]["embedding"] == grok["active_breakdown"]["embedding"] == 131072 * 6144
