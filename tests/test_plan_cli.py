"""`moesim plan placement` end to end: plan -> plan.yaml -> exports checked against their formats'
rules -> simulate with the plan; the same seed gives the same file byte for byte; infeasible
inputs exit 2 naming the constraint; plans of each kind applied to a scenario."""

import json

import numpy as np
import pytest
import yaml

from moesim.cli import main
from moesim.errors import InputError
from moesim.plan.export import _megatron_stages, eplb_arrays, launch_flags, sglang_location, vllm_ascend_map
from moesim.plan.recommend import Recommendation, read_plan, write_plan
from moesim.scenario.build import build
from moesim.scenario.plan import apply_plan
from moesim.scenario.schema import Scenario, load_scenario

EXPERTS, LAYERS, GPUS = 32, 2, 16

# a Qwen3-MoE shaped model small enough to simulate in seconds: 2 MoE layers x 32 experts, top-4
CONFIG = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 1024, "intermediate_size": 3072,
          "moe_intermediate_size": 512, "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 64,
          "num_experts": EXPERTS, "num_experts_per_tok": 4, "num_hidden_layers": LAYERS, "decoder_sparse_step": 1,
          "mlp_only_layers": [], "vocab_size": 32000, "max_position_embeddings": 4096, "norm_topk_prob": True,
          "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plan")
    model = folder / "tiny-moe" / "config.json"
    model.parent.mkdir()
    model.write_text(json.dumps(CONFIG))
    # 16 GPUs on two H100 nodes: DP attention and EP over both, so the placement has nodes to weigh
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny-ep16", "model": str(model), "cluster": "h100-2node", "parallel": {"tp": 1, "dp": GPUS, "ep": GPUS},
        "workload": {"arrivals": "batch", "batch": 32, "prompt": 64, "output": 8},
        "routing": {"distribution": "profile", "seed": 3, "level": "token"},
        "scheduler": {"max_running": 8}, "outputs": {"perfetto": False, "figures": False}}))
    return path


def _plan(scenario, out, *extra):
    return main(["plan", "placement", "--scenario", str(scenario), "--tokens", "2000", "-o", str(out), *extra])


def test_plan_export_and_simulate(scenario, tmp_path, capsys):
    plan = tmp_path / "plan.yaml"
    assert _plan(scenario, plan, "--method", "ilp", "--redundant", "16", "--export", str(tmp_path / "ex")) == 0
    shown = capsys.readouterr().out
    assert "eplb_global" in shown and "eplb_hierarchical" in shown and "ilp (plan)" in shown
    rec = read_plan(plan, "placement")
    d = rec.decision
    assert (d["layers"], d["experts"], d["slots"], d["gpus"], d["nodes"]) == (LAYERS, EXPERTS, 48, GPUS, 2)
    phy2log, weight = np.array(d["phy2log"]), np.array(d["weight"])
    assert phy2log.shape == weight.shape == (LAYERS, 48)
    for layer in range(LAYERS):
        assert set(phy2log[layer]) == set(range(EXPERTS))
        np.testing.assert_allclose(np.bincount(phy2log[layer], weights=weight[layer]), 1.0, atol=1e-8)
    # predicted: the plan's figures and EPLB's two policies on the same loads; inputs fingerprinted
    p = rec.predicted
    assert p["imbalance"] <= p["worst_imbalance"] and p["inter_node_bytes_per_token"] > 0 and p["expert_s_per_layer"] > 0
    assert set(p["baselines"]) == {"eplb_hierarchical", "eplb_global", "current"}
    assert p["imbalance"] <= min(b["imbalance"] for b in p["baselines"].values() if b) + 1e-9
    for key in ("model", "cluster", "trace", "layout", "current"):
        assert rec.inputs[key]["fingerprint"].startswith("sha256:")
    assert rec.inputs["redundant"] == 16 and rec.inputs["seed"] == 3
    assert rec.solver["status"] and 0 <= rec.solver["gap"] <= 1

    # SGLang --init-expert-location: only physical_to_logical_map, num_hidden_layers x slots, ints in range
    sglang = tmp_path / "loc.json"
    assert main(["plan", "export", str(plan), "--format", "sglang", "-o", str(sglang)]) == 0
    location = json.loads(sglang.read_text())
    assert list(location) == ["physical_to_logical_map"]
    rows = np.array(location["physical_to_logical_map"])
    assert rows.shape == (LAYERS, 48) and rows.dtype.kind == "i" and rows.min() >= 0 and rows.max() < EXPERTS
    assert all(set(row) == set(range(EXPERTS)) for row in rows)
    assert json.loads((tmp_path / "ex" / "expert_location.json").read_text()) == location

    # EPLB arrays: phy2log, log2phy padded with -1, logcnt, as rebalance_experts returns them
    npz = tmp_path / "eplb.npz"
    assert main(["plan", "export", str(plan), "--format", "npz", "-o", str(npz)]) == 0
    arrays = np.load(npz)
    np.testing.assert_array_equal(arrays["phy2log"], phy2log)
    assert (arrays["logcnt"].sum(axis=1) == 48).all()
    for layer in range(LAYERS):
        for expert in range(EXPERTS):
            slots = arrays["log2phy"][layer, expert]
            slots = slots[slots >= 0]
            assert slots.size == arrays["logcnt"][layer, expert] and (phy2log[layer, slots] == expert).all()

    # launch flags name the layout, the redundancy and the location file
    flags = tmp_path / "launch.sh"
    assert main(["plan", "export", str(plan), "--format", "flags", "-o", str(flags)]) == 0
    text = flags.read_text()
    assert "--ep-num-redundant-experts 16" in text and "--init-expert-location" in text
    assert "--enable-expert-parallel" in text and '"num_redundant_experts": 16' in text
    assert "--expert-model-parallel-size 16" in text

    # the simulator runs the plan: its placement is the plan's map and token shares
    scn, path = load_scenario(str(scenario))
    placement = build(scn.model_copy(update={"plan": str(plan)}), path, requests=4).groups[0].model.placement
    np.testing.assert_array_equal(placement.phy2log, phy2log)
    np.testing.assert_allclose(placement.weight, weight)
    out = tmp_path / "run"
    assert main(["simulate", "--scenario", str(scenario), "--plan", str(plan), "--requests", "16", "--out", str(out),
                 "--json"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["output_tokens"] == 16 * 8 and metrics["throughput"]["output_tokens_per_s"] > 0


def test_vllm_ascend_map_rules(scenario, tmp_path):
    plan = tmp_path / "plan.yaml"
    assert _plan(scenario, plan, "--method", "eplb_global", "--redundant", "16") == 0
    rec = read_plan(plan)
    phy2log = np.array(rec.decision["phy2log"])
    per_gpu = phy2log.reshape(LAYERS, GPUS, -1)
    if any(np.unique(row).size < row.size for layer in per_gpu for row in layer):
        with pytest.raises(InputError, match="twice"):
            vllm_ascend_map(rec)
        return
    m = vllm_ascend_map(rec)
    assert m["moe_layer_count"] == LAYERS and [layer["layer_id"] for layer in m["layer_list"]] == list(range(LAYERS))
    for layer, entry in zip(per_gpu, m["layer_list"]):
        assert entry["device_count"] == GPUS and len(entry["device_list"]) == GPUS
        assert [dev["device_expert"] for dev in entry["device_list"]] == layer.tolist()


def test_same_seed_same_plan_file(scenario, tmp_path):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    assert _plan(scenario, first, "--redundant", "16") == 0
    assert _plan(scenario, second, "--redundant", "16") == 0
    assert first.read_bytes() == second.read_bytes()


@pytest.mark.parametrize("args, says", [
    (["--redundant", "3"], "do not split evenly over the 16 EP ranks"),
    (["--redundant", "-4"], "every expert needs a slot"),
    (["--method", "contiguous", "--redundant", "16"], "no redundant experts"),
])
def test_infeasible_placements_exit_2(scenario, tmp_path, capsys, args, says):
    assert _plan(scenario, tmp_path / "p.yaml", *args) == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "p.yaml").exists()


def test_experts_above_hbm_exit_2(tmp_path, capsys):
    path = tmp_path / "ds.yaml"
    path.write_text(yaml.safe_dump({"name": "ds", "model": "deepseek-v3", "cluster": "h100-2node",
                                    "parallel": {"tp": 1, "dp": 16, "ep": 16}, "dtypes": {"weights": "fp8", "experts": "fp8_block"},
                                    "workload": {"batch": 16, "prompt": 64, "output": 8}}))
    assert _plan(path, tmp_path / "p.yaml", "--redundant", "256") == 2
    err = capsys.readouterr().err
    assert "expert memory" in err and "32 slots x 58 layers" in err and "exceed" in err


def _scenario(**extra) -> Scenario:
    return Scenario.model_validate({"name": "s", "model": "qwen3-30b-a3b", "cluster": "dgx-h100", "parallel": {"tp": 1, "dp": 8, "ep": 8},
                                    "workload": {"batch": 8, "prompt": 16, "output": 4}} | extra)


def test_placement_plan_shapes_are_checked(tmp_path):
    rec = Recommendation("placement", {"method": "eplb", "layers": 2, "experts": 128, "slots": 128, "gpus": 8, "nodes": 1,
                                       "phy2log": [list(range(128))] * 2, "weight": [[1.0] * 128] * 2})
    write_plan(tmp_path / "p.yaml", rec)
    with pytest.raises(InputError, match="qwen3-30b-a3b has 48 MoE layers"):
        apply_plan(_scenario(), tmp_path / "p.yaml")
    rec.decision |= {"layers": 48, "phy2log": [list(range(128))] * 48, "weight": [[1.0] * 128] * 48, "gpus": 4}
    write_plan(tmp_path / "p.yaml", rec)
    with pytest.raises(InputError, match="scenario's EP is 8"):
        apply_plan(_scenario(), tmp_path / "p.yaml")
    with pytest.raises(InputError, match="no expert parallelism"):
        apply_plan(_scenario(parallel={"tp": 8}), tmp_path / "p.yaml")
    rec.decision["gpus"] = 8
    write_plan(tmp_path / "p.yaml", rec)
    applied = apply_plan(_scenario(), tmp_path / "p.yaml")
    assert applied.placement == str((tmp_path / "p.yaml").resolve())


def test_layout_and_offload_plans_apply(tmp_path):
    layout = Recommendation("layout", {"tp": 2, "dp": 4, "pp": 1, "ep": 8, "expert_tp": 1, "micro_batches": 1,
                                       "max_running": 64, "max_batched_tokens": 4096, "stages": [[0, 48]]})
    write_plan(tmp_path / "l.yaml", layout)
    applied = apply_plan(_scenario(), "l.yaml", base_dir=tmp_path)
    assert (applied.parallel.tp, applied.parallel.dp, applied.parallel.ep) == (2, 4, 8)
    assert (applied.scheduler.max_running, applied.scheduler.max_batched_tokens) == (64, 4096)
    offload = Recommendation("offload", {"residency": "lfu", "cache_experts": 24, "prefetch": "affinity", "on_miss": "cpu",
                                         "max_running": 4})
    write_plan(tmp_path / "o.yaml", offload)
    applied = apply_plan(_scenario(), tmp_path / "o.yaml")
    assert (applied.offload.residency, applied.offload.cache_experts, applied.offload.on_miss) == ("lfu", 24, "cpu")
    assert applied.scheduler.max_running == 4
    bad = Recommendation("offload", {"residency": "nope-policy-that-is-long", "cache_experts": -1})
    write_plan(tmp_path / "b.yaml", bad)
    with pytest.raises(InputError, match="b.yaml"):
        apply_plan(_scenario(), tmp_path / "b.yaml")


def test_megatron_pipeline_flags():
    assert _megatron_stages([[0, 8], [8, 16]], 2) == []
    assert _megatron_stages([[0, 6], [6, 16], [16, 26], [26, 30]], 4) == [
        "--decoder-first-pipeline-num-layers", "6", "--decoder-last-pipeline-num-layers", "4"]
    assert _megatron_stages([[0, 5], [5, 12], [12, 20], [20, 30]], 4) == [
        "--pipeline-model-parallel-layout", "E,t*5|t*7|t*8|t*10,L"]
    layout = Recommendation("layout", {"tp": 4, "dp": 1, "pp": 2, "ep": 4, "expert_tp": 1, "stages": [[0, 30], [30, 61]],
                                       "max_running": 32, "max_batched_tokens": 8192, "micro_batches": 4})
    flags = launch_flags(layout)
    assert flags["vllm"][:5] == ["vllm", "serve", "MODEL", "--tensor-parallel-size", "4"]
    assert "--pipeline-parallel-size" in flags["vllm"] and "--max-num-seqs" in flags["vllm"]
    assert "--decoder-first-pipeline-num-layers" in flags["megatron"]
    with pytest.raises(InputError, match="needs a placement plan"):
        sglang_location(layout)
    with pytest.raises(InputError, match="needs a placement plan"):
        eplb_arrays(layout)
