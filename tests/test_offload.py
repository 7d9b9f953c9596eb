"""Expert offloading: tiers, residency, prefetch and miss policies, transfers, CPU experts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moesim.cli import main
from moesim.cost.offload import (
    cpu_expert_times,
    expert_bytes,
    host_cpu,
    host_link,
    two_flows,
)
from moesim.hardware import catalog
from moesim.routing.stats import hit_rate_curve
from moesim.routing.trace import Trace, save_trace
from moesim.scenario.build import build
from moesim.scenario.schema import load_scenario
from moesim.sim.routing import routing_source


def _scenario(tmp_path, offload: dict, **overrides):
    raw = {"name": "off", "model": "mixtral-8x7b", "cluster": "rtx-a5000-workstation", "parallel": {"tp": 1},
           "workload": {"arrivals": "batch", "batch": 1, "prompt": 1, "output": 160},
           "routing": {"distribution": "profile", "level": "token", "seed": 7},
           "dtypes": {"weights": "int4", "experts": "int2", "kv_cache": "fp16"},
           "scheduler": {"max_running": 1, "max_batched_tokens": 1024},
           "offload": {"residency": "lru", "cache_experts": 4} | offload,
           "outputs": {"perfetto": False, "figures": False}}
    raw.update(overrides)
    path = tmp_path / "off.yaml"
    path.write_text(json.dumps(raw))
    return load_scenario(str(path))


def _run(tmp_path, offload: dict, **overrides):
    scn, path = _scenario(tmp_path, offload, **overrides)
    sim = build(scn, path)
    return sim, sim.run()[1]


def _trace(sim) -> np.ndarray:
    """The token-level trace the run routed by (the same generator, seed and lengths)."""
    r = sim.requests
    return routing_source("profile", "token", sim.profile, seed=sim.scenario.routing.seed, prompt=r.prompt,
                          output=r.output).ids


# -- the simulated hit rate is the trace statistics' hit rate -------------------------------------


@pytest.mark.parametrize("policy", ["lru", "lfu", "belady"])
@pytest.mark.parametrize("slots", [2, 4])
def test_simulated_hit_rate_equals_hit_rate_curve(tmp_path, policy, slots):
    sim, m = _run(tmp_path, {"residency": policy, "cache_experts": slots})
    output = int(sim.requests.output[0])
    ids = _trace(sim)[:output]  # prompt of one token, then output - 1 decodes: rows 0 .. output - 1
    expected = hit_rate_curve(ids, 8, policy)[:, slots]
    assert m["offload"]["accesses"] == int((ids >= 0).sum())
    assert np.array_equal(np.array(m["offload"]["hit_rate_per_layer"]), expected)


def test_hit_rate_equals_moesim_trace_stats(tmp_path, capsys):
    sim, m = _run(tmp_path, {"residency": "lru", "cache_experts": 4})
    ids = _trace(sim)[: int(sim.requests.output[0])]
    trace_path = tmp_path / "t.npz"
    save_trace(trace_path, Trace(num_experts=8, topk_ids=ids))
    capsys.readouterr()
    assert main(["trace", "stats", str(trace_path), "--multiples", "2", "--batch", "16", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["hit_rate_lru"]["4"] == pytest.approx(m["offload"]["hit_rate"], abs=1e-12)


def test_belady_bounds_lru_and_lfu(tmp_path):
    rates = {p: _run(tmp_path, {"residency": p, "cache_experts": 3})[1]["offload"]["hit_rate"] for p in ("lru", "lfu", "belady")}
    assert rates["belady"] >= rates["lru"] and rates["belady"] >= rates["lfu"]


# -- determinism, prefetch, miss policies -------------------------------------------------------------


def test_same_seed_same_metrics(tmp_path):
    settings = {"prefetch": "speculative", "top_n": 2, "accuracy": 0.7}
    a = _run(tmp_path, settings)[1]
    b = _run(tmp_path, settings)[1]
    a.pop("wall_s", None), b.pop("wall_s", None)
    assert a == b


def test_exact_pregating_hits_every_layer_after_the_first(tmp_path):
    _, none = _run(tmp_path, {"prefetch": "none"})
    _, exact = _run(tmp_path, {"prefetch": "pregated", "accuracy": 1.0})
    per_layer = np.array(exact["offload"]["hit_rate_per_layer"])
    assert np.all(per_layer[1:] == 1.0)  # the first MoE layer has no earlier gate
    assert exact["offload"]["stall_s"] < none["offload"]["stall_s"]
    assert exact["offload"]["prefetch_precision"] == 1.0


@pytest.mark.parametrize("prefetch", ["speculative", "affinity", "activation"])
def test_guessing_prefetchers_issue_copies_and_count_them(tmp_path, prefetch):
    _, m = _run(tmp_path, {"prefetch": prefetch, "top_n": 2, "accuracy": 0.6})
    o = m["offload"]
    assert 0 < o["prefetch_used"] <= o["prefetched"]
    copies = o["prefetched"] + o["demand_copies"]["full_precision"]
    assert o["bytes_moved"]["pcie_h2d_expert_weights"] == pytest.approx(copies * o["tiers"]["expert_bytes"])


def test_low_precision_misses_move_fewer_bytes(tmp_path):
    offload = {"on_miss": "low_precision", "low_precision_dtype": "int2", "cache_experts": 1}
    _, m = _run(tmp_path, offload, dtypes={"weights": "bf16", "experts": "bf16"})
    o = m["offload"]
    low = o["demand_copies"]["low_precision"]
    assert low > 0 and o["demand_copies"]["full_precision"] == 0
    assert o["tiers"]["low_precision_expert_bytes"] == pytest.approx(expert_bytes(4096, 14336, True, "int2"))
    assert o["bytes_moved"]["pcie_h2d_low_precision_weights"] == pytest.approx(low * o["tiers"]["low_precision_expert_bytes"])
    _, full = _run(tmp_path, {"cache_experts": 1}, dtypes={"weights": "bf16", "experts": "bf16"})
    assert m["latency_s"]["tpot"]["mean"] < full["latency_s"]["tpot"]["mean"]


def test_all_experts_on_the_cpu(tmp_path):
    _, m = _run(tmp_path, {"residency": "static", "cache_experts": 0, "on_miss": "cpu"})
    o = m["offload"]
    assert o["hit_rate"] == 0.0 and o["cpu_experts"] == o["accesses"]
    assert o["bytes_moved"]["host_dram_read_by_cpu"] == pytest.approx(o["accesses"] * o["tiers"]["expert_bytes"])
    assert o["bytes_moved"]["pcie_h2d_expert_weights"] == 0.0 and o["cpu_busy_s"] > 0


def test_n_cpu_moe_keeps_whole_layers(tmp_path):
    # 16 slots x 32 layers = the 8 experts of 16 layers: the last 16 layers always hit
    _, m = _run(tmp_path, {"residency": "static", "scope": "layers", "cache_experts": 4, "on_miss": "cpu"})
    per_layer = np.array(m["offload"]["hit_rate_per_layer"])
    assert np.all(per_layer[:16] == 0.0) and np.all(per_layer[16:] == 1.0)


def test_hybrid_runs_decode_misses_on_the_cpu_and_prompt_misses_on_the_gpu(tmp_path):
    _, m = _run(tmp_path, {"residency": "static", "scope": "global", "cache_experts": 2, "on_miss": "hybrid"},
                workload={"arrivals": "batch", "batch": 1, "prompt": 512, "output": 32})
    o = m["offload"]
    assert o["cpu_experts"] > 0 and o["demand_copies"]["full_precision"] > 0


def test_whole_layer_copies_every_missing_expert_of_the_layer(tmp_path):
    _, m = _run(tmp_path, {"residency": "static", "scope": "layers", "cache_experts": 4, "on_miss": "whole_layer"})
    o = m["offload"]
    steps = m["steps"]
    assert o["demand_copies"]["full_precision"] == steps * 16 * 8  # 16 offloaded layers x 8 experts, every step


def test_layer_overhead_adds_to_every_moe_layer(tmp_path):
    # every expert in HBM: no copies to overlap, so each decode step is 32 layers x 5 ms longer
    base = _run(tmp_path, {"residency": "static", "cache_experts": 8})[1]
    slow = _run(tmp_path, {"residency": "static", "cache_experts": 8, "layer_overhead": "5 ms"})[1]
    assert slow["latency_s"]["tpot"]["mean"] - base["latency_s"]["tpot"]["mean"] == pytest.approx(32 * 5e-3, rel=1e-9)


def test_pageable_host_memory_is_slower_than_pinned(tmp_path):
    pinned = _run(tmp_path, {"host_memory": "pinned"})[1]
    pageable = _run(tmp_path, {"host_memory": "pageable"})[1]
    assert pageable["offload"]["stall_s"] > pinned["offload"]["stall_s"]
    assert pageable["throughput"]["output_tokens_per_s"] < pinned["throughput"]["output_tokens_per_s"]


def test_experts_spill_to_the_ssd_when_dram_is_short(tmp_path):
    # bf16 Mixtral's experts (90 GB) exceed the T4 VM's 30 GB of DRAM
    _, m = _run(tmp_path, {"cache_experts": 1}, cluster="t4-vm", dtypes={"weights": "int4", "experts": "bf16"},
                workload={"arrivals": "batch", "batch": 1, "prompt": 1, "output": 24})
    o = m["offload"]
    assert o["tiers"]["experts_on_ssd"] > 0 and o["bytes_moved"]["ssd_read"] > 0
    assert o["tiers"]["host_bytes"]["experts"] <= o["tiers"]["host_bytes"]["capacity"]


# -- bad input: one line, exit code 2 --------------------------------------------------------------


@pytest.mark.parametrize("offload, field", [
    ({"residency": "lru2"}, "offload.residency"),
    ({"prefetch": "magic"}, "offload.prefetch"),
    ({"on_miss": "drop"}, "offload.on_miss"),
    ({"cache_experts": 9}, "offload.cache_experts"),
    ({"cache_experts": 8}, "offload.cache_experts"),  # 8 x 32 bf16 experts: 90 GB in a 24 GB GPU
    ({"cache_experts": None, "cache_memory": "200 GiB"}, "offload.cache_memory"),
    ({"on_miss": "cpu", "prefetch": "none"}, "offload.on_miss"),
    ({"low_precision_dtype": "int7", "on_miss": "low_precision"}, "offload.low_precision_dtype"),
    ({"scope": "model"}, "offload.scope"),
    ({"cpu_sockets": 3}, "offload.cpu_sockets"),
])
def test_bad_offload_settings_exit_2_naming_the_field(tmp_path, capsys, offload, field):
    scn_path = tmp_path / "bad.yaml"
    raw = {"name": "bad", "model": "mixtral-8x7b", "cluster": "rtx-a5000-workstation",
           "workload": {"arrivals": "batch", "batch": 1, "prompt": 8, "output": 8},
           "routing": {"distribution": "profile", "level": "token"}, "dtypes": {"weights": "int4", "experts": "bf16"},
           "offload": {"cache_experts": 1} | offload}
    scn_path.write_text(json.dumps(raw))
    assert main(["simulate", "--scenario", str(scn_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and field in err and str(scn_path) in err


def test_offload_needs_token_level_routing(tmp_path, capsys):
    scn, path = _scenario(tmp_path, {}, routing={"distribution": "profile", "level": "count"})
    with pytest.raises(Exception, match="routing.level"):
        build(scn, path)


# -- transfer and CPU costs ---------------------------------------------------------------------------


def test_host_link_rates_come_from_the_profile():
    link = catalog.link("pcie-gen3-x16")
    pinned, pageable = host_link(link, "pinned"), host_link(link, "pageable")
    assert pinned.h2d == link.h2d_pinned and pageable.h2d == link.h2d_pageable
    assert pinned.duplex == link.duplex_efficiency


def test_two_flows_share_the_link_then_the_survivor_runs_alone():
    # 100 B and 10 B at 10 B/s each way, each keeping half while both run: the short one ends at
    # 2 s having moved 10 B; the long one moved 10 B by then and needs 9 s more at the full rate
    assert two_flows(100.0, 10.0, 10.0, 10.0, 0.5) == pytest.approx((11.0, 2.0))
    assert two_flows(100.0, 0.0, 10.0, 10.0, 0.5) == pytest.approx((10.0, 0.0))


def test_cpu_decode_expert_streams_its_weights_from_dram():
    cpu = catalog.device("xeon-6454s")
    one = cpu_expert_times(cpu, np.array([1]), hidden=7168, inter=2048, dtype="int4")
    two = cpu_expert_times(host_cpu(cpu, 2), np.array([1]), hidden=7168, inter=2048, dtype="int4")
    weights = expert_bytes(7168, 2048, True, "int4")
    bandwidth = cpu.memory.bandwidth * cpu.efficiency.memory
    assert weights / bandwidth < one < 1.05 * weights / bandwidth + 1e-5  # memory-bound
    assert two == pytest.approx(one / 2, rel=0.05)
