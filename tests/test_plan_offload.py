"""The offload-policy MILP (moesim.plan.offload) and `moesim plan offload`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moesim.cli import main
from moesim.errors import InputError
from moesim.plan.offload import OffloadProblem, Prefetcher, plan_offload, step_statistics
from moesim.plan.recommend import read_plan
from moesim.scenario.build import build
from moesim.scenario.schema import load_scenario

GB = 1e9


def _trace(shares: list[float], layers: int = 2, tokens: int = 400, seed: int = 0) -> np.ndarray:
    """``[tokens, layers, 1]``: each token picks expert e with probability shares[e] (top-1)."""
    rng = np.random.default_rng(seed)
    return rng.choice(len(shares), size=(tokens, layers, 1), p=shares).astype(np.int64)


def _problem(trace, **over) -> OffloadProblem:
    """One GB experts, a 10 GB/s link (0.1 s a copy), GPU experts 1 ms, CPU experts 50 ms."""
    experts = int(trace.max()) + 1
    kw = dict(trace=trace, experts=experts, expert_bytes=1 * GB, hbm_room=100 * GB, kv_bytes_per_sequence=0.1 * GB,
              dram_bytes=1000 * GB, ssd_bytes=0.0, h2d=10 * GB, d2h=10 * GB, link_latency=1e-5, ssd_read=0.0,
              ssd_latency=0.0, dram_bandwidth=50 * GB, hidden=1024, gpu_expert_s=np.array([0.0, 1e-3, 1.1e-3]),
              cpu_expert_s=np.array([0.0, 0.05, 0.06]), layer_s={1: 2e-3, 2: 2.5e-3}, tail_s={1: 1e-3, 2: 1e-3})
    kw.update(over)
    return OffloadProblem(**kw)


def test_everything_fits_pins_every_used_expert():
    trace = _trace([0.4, 0.3, 0.2, 0.1])
    policy = plan_offload(_problem(trace))
    assert policy.pinned == [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert policy.on_miss == "wait" and policy.batch == 1
    assert policy.predicted["hit_rate"] == pytest.approx(1.0)
    # no misses: each layer is its non-expert time and one GPU expert; the step adds the tail
    assert policy.predicted["tpot_s"] == pytest.approx(2 * (2e-3 + 1e-3) + 1e-3, rel=1e-6)
    assert policy.solver["status"] == "Optimal" and policy.solver["gap"] <= 1e-4


def test_capacity_pins_the_most_popular_expert_of_each_layer():
    trace = _trace([0.7, 0.2, 0.05, 0.05])
    policy = plan_offload(_problem(trace, hbm_limit=2 * GB))
    assert policy.pinned == [[0], [0]]  # two slots: the most used expert of each layer
    assert policy.predicted["hbm_expert_bytes"] <= 2 * GB


def test_kv_cache_and_hbm_room_bound_the_pinned_experts():
    trace = _trace([0.4, 0.3, 0.2, 0.1])
    # 3.5 GB for experts and the KV cache of one sequence (0.1 GB): three experts fit
    policy = plan_offload(_problem(trace, hbm_room=3.5 * GB))
    assert sum(len(p) for p in policy.pinned) == 3


def test_no_hbm_streams_or_runs_on_the_cpu():
    trace = _trace([0.4, 0.3, 0.2, 0.1])
    # the CPU (50 ms) is slower than a copy (0.1 s + 1 ms)? no: faster, so misses run there
    cpu = plan_offload(_problem(trace, hbm_limit=0.0))
    assert cpu.pinned == [[], []] and cpu.on_miss == "cpu"
    # a slow CPU: every miss is copied and waited for (streamed)
    stream = plan_offload(_problem(trace, hbm_limit=0.0, cpu_expert_s=np.array([0.0, 1.0, 1.0])))
    assert stream.pinned == [[], []] and stream.on_miss == "wait"
    # no CPU experts at all
    none = plan_offload(_problem(trace, hbm_limit=0.0, cpu_expert_s=np.zeros(0)))
    assert none.on_miss == "wait"
    assert none.predicted["tpot_s"] == pytest.approx(2 * (2e-3 + 0.1 + 1e-5 + 1e-3) + 1e-3, rel=1e-3)


def test_throughput_objective_picks_the_batch_with_most_tokens_per_second():
    trace = _trace([0.4, 0.3, 0.2, 0.1], tokens=800)
    latency = plan_offload(_problem(trace, hbm_limit=0.0, cpu_expert_s=np.zeros(0)))
    throughput = plan_offload(_problem(trace, hbm_limit=0.0, cpu_expert_s=np.zeros(0)), "throughput")
    assert latency.batch == 1 and throughput.batch == 2  # two tokens share most copies
    assert throughput.predicted["tokens_per_s"] > latency.predicted["tokens_per_s"]
    assert {c["max_running"] for c in throughput.candidates} == {1, 2}


def test_prefetch_statistics_and_a_perfect_pregate():
    trace = _trace([0.4, 0.3, 0.2, 0.1])
    stats = step_statistics(trace, 4, 1, Prefetcher("pregated", None, 1.0))
    # an exact pre-gate guesses every used expert of layers 1.. and nothing else (top-1)
    np.testing.assert_allclose(stats["prefetch_hit"][1], stats["used"][1])
    assert stats["prefetch_hit"][0].sum() == 0 and stats["prefetch_waste"].sum() == 0
    np.testing.assert_allclose(stats["used"].sum(axis=1), 1.0)
    policy = plan_offload(_problem(trace, hbm_limit=0.0, cpu_expert_s=np.zeros(0),
                                   prefetchers=(Prefetcher(), Prefetcher("pregated", None, 1.0))))
    assert policy.prefetcher.name == "pregated"  # layer 1's copy overlaps layer 0


def test_infeasible_inputs_name_the_constraint():
    trace = _trace([0.4, 0.3, 0.2, 0.1])
    with pytest.raises(InputError, match="DRAM \\+ SSD capacity"):
        plan_offload(_problem(trace, dram_bytes=4 * GB, ssd_bytes=2 * GB, ssd_read=GB))
    with pytest.raises(InputError, match="no SSD"):
        plan_offload(_problem(trace, dram_bytes=4 * GB, ssd_bytes=10 * GB))
    with pytest.raises(InputError, match="HBM capacity"):
        plan_offload(_problem(trace, hbm_room=0.05 * GB))
    with pytest.raises(InputError, match="objective"):
        plan_offload(_problem(trace), "cheapest")


# -- the command and the simulator ----------------------------------------------------------------


def _scenario(tmp_path, **offload) -> str:
    raw = {"name": "plan-off", "model": "mixtral-8x7b", "cluster": "rtx-a5000-workstation", "parallel": {"tp": 1},
           "workload": {"arrivals": "batch", "batch": 1, "prompt": 1, "output": 96},
           "routing": {"distribution": "profile", "level": "token", "seed": 3},
           "dtypes": {"weights": "int4", "experts": "int3_hqq", "kv_cache": "fp16"},
           "scheduler": {"max_running": 1, "max_batched_tokens": 1024},
           "offload": {"residency": "lru", "cache_experts": 2} | offload,
           "outputs": {"perfetto": False, "figures": False, "timeline_steps": []}}
    path = tmp_path / "plan-off.yaml"
    path.write_text(json.dumps(raw))
    return str(path)


def test_cli_writes_the_same_plan_twice_and_the_simulator_runs_it(tmp_path, capsys):
    scenario = _scenario(tmp_path)
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    assert main(["plan", "offload", "--scenario", scenario, "--hbm", "3 GiB", "-o", str(a)]) == 0
    assert main(["plan", "offload", "--scenario", scenario, "--hbm", "3 GiB", "-o", str(b)]) == 0
    assert a.read_bytes() == b.read_bytes()
    assert "tokens/s" in capsys.readouterr().out
    rec = read_plan(a, "offload")
    d = rec.decision
    assert d["residency"] == "static" and len(d["pinned"]) == 32 and d["max_running"] == 1
    assert d["cache_memory"] <= 3 * 2**30
    assert rec.solver["status"] == "Optimal" and "fingerprint" in rec.inputs["trace"]
    # the decision is the scenario's offload section: run it
    scn, path = load_scenario(scenario)
    offload = scn.offload.model_dump() | {k: v for k, v in d.items() if k != "max_running"}
    sim = build(scn.model_validate(scn.model_dump() | {"offload": offload}), path)
    _, m = sim.run()
    pinned = sum(len(p) for p in d["pinned"])
    assert m["offload"]["tiers"]["experts_in_hbm"] == pinned
    # static residency with no prefetch: the hit rate is the pinned experts' share of the uses
    if d["prefetch"] == "none":
        assert m["offload"]["hit_rate"] == pytest.approx(rec.predicted["hit_rate"], abs=0.02)


def test_cli_infeasible_and_bad_input_exit_2(tmp_path, capsys):
    assert main(["plan", "offload", "--scenario", "mixtral-8x7b-h100", "-o", str(tmp_path / "p.yaml")]) == 2
    assert "offload" in capsys.readouterr().err
    scenario = _scenario(tmp_path)
    assert main(["plan", "offload", "--scenario", scenario, "--hbm", "lots", "-o", str(tmp_path / "p.yaml")]) == 2
    assert "--hbm" in capsys.readouterr().err
    # the weights fit a 24 GB GPU, but not beside 23 GiB reserved: no HBM for even one sequence
    big = _scenario(tmp_path, reserve="23 GiB")
    assert main(["plan", "offload", "--scenario", big, "-o", str(tmp_path / "p.yaml")]) == 2
    assert "leave no HBM" in capsys.readouterr().err
    assert not (tmp_path / "p.yaml").exists()


def test_pinned_lists_are_checked(tmp_path):
    scn, path = load_scenario(_scenario(tmp_path, residency="static", cache_experts=None, pinned=[[0]] * 31))
    with pytest.raises(InputError, match="32 MoE layers"):
        build(scn, path)
    scn, path = load_scenario(_scenario(tmp_path, residency="lru", cache_experts=None, pinned=[[0]] * 32))
    with pytest.raises(InputError, match="static"):
        build(scn, path)
