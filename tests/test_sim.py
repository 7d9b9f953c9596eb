"""The serving simulator: correctness properties of runs and of single steps."""

from __future__ import annotations

import json

import numpy as np
import pytest
import simpy

from moesim.cli import main
from moesim.cost.estimate import Workload, estimate
from moesim.cost.layout import make_layout
from moesim.errors import InputError
from moesim.hardware import catalog
from moesim.hardware.topology import accelerators, topology
from moesim.models.presets import load_model
from moesim.routing.counts import balanced_counts
from moesim.scenario.build import build
from moesim.scenario.schema import Scenario, bundled_scenarios, load_scenario
from moesim.sim.dispatch import DISPATCH
from moesim.sim.placement import contiguous, make_placement
from moesim.sim.resources import SharedLink
from moesim.sim.step import StepLoad, StepModel


def _scenario(tmp_path, **overrides) -> tuple[Scenario, object]:
    raw = {"name": "t", "model": "qwen3-30b-a3b", "cluster": "dgx-h100", "parallel": {"tp": 1, "dp": 4, "ep": 4},
           "workload": {"arrivals": "poisson", "rate": 20.0, "requests": 40, "prompt": {"mean": 300, "cv": 0.5, "max": 1000},
                        "output": {"mean": 40, "cv": 0.5, "max": 200}},
           "routing": {"distribution": "profile", "seed": 3}, "scheduler": {"max_running": 16, "max_batched_tokens": 1024},
           "outputs": {"timeline_steps": [2]}}
    for key, value in overrides.items():
        raw[key] = raw[key] | value if isinstance(value, dict) and isinstance(raw.get(key), dict) else value
    path = tmp_path / "s.yaml"
    path.write_text(json.dumps(raw))
    return load_scenario(str(path))


def _run(tmp_path, **overrides):
    scn, path = _scenario(tmp_path, **overrides)
    return build(scn, path).run()


def test_shared_link_splits_bandwidth_fairly():
    env = simpy.Environment()
    link = SharedLink(env, 100.0)
    ends = {}

    def flow(name, delay, nbytes):
        yield env.timeout(delay)
        yield from link.transfer(nbytes)
        ends[name] = env.now

    env.process(flow("a", 0, 100))
    env.process(flow("b", 0, 100))
    env.process(flow("c", 0.5, 25))
    env.run()
    # a and b share 100 B/s; c joins at 0.5 s and takes a third for 0.75 s
    assert ends == pytest.approx({"c": 1.25, "a": 2.25, "b": 2.25})


@pytest.mark.parametrize("model, cluster, kw", [("deepseek-v3", "h100-8node", dict(tp=1, ep=64, dp=64)),
                                                ("mixtral-8x7b", "dgx-h100", dict(tp=2)),
                                                ("qwen3-30b-a3b", "dgx-h100", dict(tp=1, ep=4, dp=4))])
def test_balanced_step_equals_the_analytical_estimate(model, cluster, kw):
    arch, spec = load_model(model), catalog.cluster(cluster)
    layout = make_layout(arch, **kw)
    work = Workload(batch=64 * layout.dp, prompt=1024, output=256)
    est = estimate(arch, spec, layout, work)
    devices = accelerators(topology(spec))[: layout.devices]
    placement = contiguous(arch.moe.num_experts, layout.ep) if layout.ep > 1 else None
    step = StepModel(arch, spec, layout, devices, dtype=est.dtype, expert_dtype=est.expert_dtype, kv_dtype=est.kv_dtype,
                     placement=placement, dispatch=DISPATCH["static"]())
    R = layout.dp
    kv = work.prompt + work.output // 2
    counts = np.tile(balanced_counts(work.batch, arch.moe.num_experts, arch.moe.top_k), (len(arch.moe_layers), 1))
    load = StepLoad(np.full(R, 64), np.full(R, kv), np.zeros(R, dtype=np.int64), [], counts)
    assert step.cost(load).duration == pytest.approx(est.decode_step, rel=1e-9)


def test_run_conserves_tokens_and_time_moves_forward(tmp_path):
    log, m = _run(tmp_path, policies={"dispatch": "capacity", "capacity_factor": 1.0})
    steps = {k: np.asarray(v) for k, v in log.steps.items()}
    assert m["preemptions"] == 0
    # every prompt token prefilled once; every output token after the first decoded once
    assert steps["prefill_tokens"].sum() == log.prompt.sum()
    assert steps["decode_tokens"].sum() == (log.output - 1).sum()
    # every routed slot computed by a rank or counted as dropped
    computed = sum(sum(g["rank_slots"]) for g in m["groups"].values())
    assert computed + m["dropped_slots"] == m["routed_slots"]
    assert m["dropped_slots"] > 0  # capacity factor 1 drops some of a skewed profile's slots
    assert np.all(np.diff(steps["start"]) > 0) and np.all(steps["duration"] > 0)
    assert np.all(log.first_token >= log.arrival) and np.all(log.finish >= log.first_token)


def test_littles_law_holds(tmp_path):
    log, m = _run(tmp_path, workload={"requests": 120, "rate": 10.0})
    wait = np.mean(log.finish - log.arrival)
    rate = log.arrival.size / m["simulated_s"]
    assert m["mean_requests_in_engine"] == pytest.approx(rate * wait, rel=0.1)


def test_same_seed_same_metrics(tmp_path):
    first = _run(tmp_path)[1]
    second = _run(tmp_path)[1]
    assert json.dumps(first, sort_keys=True) == json.dumps(second, sort_keys=True)


def test_skewed_routing_is_slower_than_balanced(tmp_path):
    work = {"arrivals": "batch", "batch": 64, "prompt": 256, "output": 32}
    fast_log, fast = _run(tmp_path, workload=work, routing={"distribution": "balanced"})
    slow_log, slow = _run(tmp_path, workload=work, routing={"distribution": "power_law:1.5"})
    assert slow["simulated_s"] > fast["simulated_s"]

    # prefill steps (every expert busy either way): the overloaded rank sets the step. Small
    # decode steps can be faster when skewed: fewer experts' weights are read.
    def prefill_step(log):
        steps = {k: np.asarray(v) for k, v in log.steps.items()}
        return steps["duration"][steps["decode_tokens"] == 0].mean()

    assert prefill_step(slow_log) > prefill_step(fast_log)


@pytest.mark.parametrize("overlap", ["shared_expert", "two_microbatch"])
def test_overlap_policies_never_slower_than_sequential(tmp_path, overlap):
    model = {"model": "deepseek-v2-lite", "parallel": {"tp": 1, "dp": 8, "ep": 8}}
    base = _run(tmp_path, **model)[1]
    overlapped = _run(tmp_path, **model, policies={"overlap": overlap})[1]
    assert overlapped["simulated_s"] <= base["simulated_s"] * 1.02


def test_disaggregated_run_moves_every_kv_cache(tmp_path):
    log, m = _run(tmp_path, parallel={"tp": 1, "ep": 1}, disaggregation={"prefill": {"tp": 1, "dp": 4, "ep": 4},
                                                                          "decode": {"tp": 1, "dp": 4, "ep": 4}})
    multi = int((log.output > 1).sum())
    assert m["kv_transfers"] == multi
    assert all(end > start for _, start, end, _ in log.transfers)
    assert np.isfinite(log.finish).all()


def test_token_level_routing_counts_each_token(tmp_path):
    log, m = _run(tmp_path, routing={"distribution": "profile", "level": "token"})
    k = 8
    layers = 48
    tokens = log.prompt.sum() + (log.output - 1).sum()
    assert m["routed_slots"] == tokens * k * layers


def test_placement_file_errors_name_the_field(tmp_path):
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps({"physical_to_logical_map": [[0, 1, 2, 3]]}))
    with pytest.raises(InputError, match="physical_to_logical_map.*multiple of EP"):
        make_placement(str(bad), 8, 3, 1)
    bad.write_text(json.dumps({"physical_to_logical_map": [[0, 1, 2, 2]]}))
    with pytest.raises(InputError, match="no replica of experts \\[3\\]"):
        make_placement(str(bad), 4, 2, 1)


def test_replicated_placement_splits_tokens_by_weight(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"physical_to_logical_map": [[0, 1, 2, 3, 0, 0]]}))
    placement = make_placement(str(path), 4, 2, 1)
    split = placement.split(np.array([[9, 1, 1, 1]]))
    assert split.tolist() == [[3, 1, 1, 1, 3, 3]]


def test_bundled_scenarios_build():
    for name in bundled_scenarios():
        scn, path = load_scenario(name)
        sim = build(scn, path, requests=5)
        assert sim.groups and sim.memory


def test_cli_simulate_writes_outputs(tmp_path, capsys):
    scn, path = _scenario(tmp_path)
    out = tmp_path / "out"
    assert main(["simulate", "--scenario", str(path), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["requests"] == 40 and metrics["throughput"]["output_tokens_per_s"] > 0
    trace = json.loads((out / "trace.json").read_text())
    kinds = {e["ph"] for e in trace["traceEvents"]}
    assert {"M", "X", "C"} <= kinds
    assert any(e.get("name") == "experts" for e in trace["traceEvents"])
    assert (out / "latency_cdf.png").stat().st_size > 0 and (out / "timeline_serve.png").exists()


def test_cli_rejects_an_impossible_layout(tmp_path, capsys):
    scn, path = _scenario(tmp_path, parallel={"tp": 1, "dp": 4, "ep": 3})
    assert main(["simulate", "--scenario", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "s.yaml" in err[0] and "parallel" in err[0]
    assert not (tmp_path / "o").exists()


# -- compiled step pieces against their NumPy / Python references --------------------------------

@pytest.mark.parametrize("experts", [8, 60, 128, 256, 384, 1000])
def test_compiled_count_stream_step_equals_numpy_bit_for_bit(experts):
    from moesim.routing.stream import _normal_step, normal_step_reference, standard_normals

    rng = np.random.default_rng(experts)
    for _ in range(20):
        L = 58
        share = rng.dirichlet(np.full(experts, 0.5), size=L)
        noise, rho = rng.standard_normal((L, experts)), rng.random(L) * 0.9
        tokens = int(rng.integers(300, 9000))
        key = int(rng.integers(0, 2**63))
        ref_noise, ref_counts = normal_step_reference(noise.copy(), standard_normals(key, L * experts).reshape(L, experts),
                                                      rho, share, tokens * 8, tokens)
        counts = np.empty((L, experts), dtype=np.int64)
        _normal_step(np.uint64(key), noise, rho, np.sqrt(1.0 - rho**2), np.sqrt(share), share, float(tokens * 8),
                     float(tokens), counts)
        assert np.array_equal(noise, ref_noise) and np.array_equal(counts, ref_counts)
        assert (counts.sum(axis=1) <= tokens * 8).all() and counts.min() >= 0


def test_the_normal_regimes_draws_are_standard_normal():
    """The ziggurat's layers all have the base layer's area (the top one's, computed last, to
    1e-9), and 2,000,000 draws pass the Kolmogorov-Smirnov test with the normal's mean, variance,
    tail mass beyond the base layer's edge (the tail sampler) and conditional shape in that tail."""
    import math

    from scipy import stats

    from moesim.routing.stream import _ZIGGURAT_F, _ZIGGURAT_R, _ZIGGURAT_X, standard_normals

    x, f = _ZIGGURAT_X, _ZIGGURAT_F
    area = x[0] * f[1]
    assert x[1] == _ZIGGURAT_R and x[-1] == 0.0 and np.all(np.diff(x) < 0)
    assert x[-2] * (1.0 - f[-2]) == pytest.approx(area, rel=1e-9)
    assert area * (x.size - 1) > math.sqrt(math.pi / 2)  # the layers cover the half density
    z = np.concatenate([standard_normals(key, 1_000_000) for key in (1, 2**63 + 7)])
    n = z.size
    assert abs(z.mean()) < 4 / math.sqrt(n) and abs(z.var() - 1) < 4 * math.sqrt(2 / n)
    assert stats.kstest(z, "norm").pvalue > 1e-3
    expected = 2 * stats.norm.sf(_ZIGGURAT_R) * n  # ~516 draws in the tail
    tail = np.abs(z[np.abs(z) > _ZIGGURAT_R])
    assert abs(tail.size - expected) < 4 * math.sqrt(expected)
    assert stats.kstest(tail, lambda t: 1 - stats.norm.sf(t) / stats.norm.sf(_ZIGGURAT_R)).pvalue > 1e-3
    assert np.array_equal(standard_normals(5, 1000), standard_normals(5, 1000))  # a key gives its draws again


@pytest.mark.parametrize("experts", [8, 60, 256])
def test_compiled_exact_count_step_draws_the_references_counts(experts):
    """Same generator state in, same counts and same generator state out, over kept fractions
    of 0, 1 and between, odd and even numbers of previous and fresh slots, previous steps from
    the normal regime (more slots than this step's) and steps without a previous step."""
    from moesim.routing.generate import alias_thresholds
    from moesim.routing.profile import alias_tables
    from moesim.routing.stream import exact_step, exact_step_reference

    rng = np.random.default_rng(experts)
    L = 58
    for trial in range(30):
        share = rng.dirichlet(np.full(experts, 0.3), size=L)
        tokens = int(rng.integers(1, 256 if trial % 5 else 4000))
        keep = rng.uniform(0.0, 1.0, L) * (trial % 4 != 1)
        keep[:3] = [0.0, 1.0, 0.5]
        before = tokens * (8 if trial % 7 else 20)
        previous = None if trial % 3 == 0 else np.stack([rng.multinomial(before, row) for row in share])
        ours, theirs = np.random.default_rng([experts, trial]), np.random.default_rng([experts, trial])
        expected = exact_step_reference(theirs, previous, keep, share, tokens * 8, tokens)
        prob, alias = alias_tables(share)
        counts = exact_step(ours, previous, keep, alias_thresholds(prob), alias, tokens * 8, tokens)
        assert np.array_equal(counts, expected)
        assert ours.bit_generator.state == theirs.bit_generator.state


def test_exact_count_step_is_the_multinomial_of_the_share():
    """Without repeats a step's counts are a multinomial of the slots over the share: mean
    ``slots * p`` and variance ``slots * p * (1 - p)`` per expert (counts below the token cap)."""
    from moesim.routing.generate import alias_thresholds
    from moesim.routing.profile import alias_tables
    from moesim.routing.stream import exact_step

    rng = np.random.default_rng(7)
    share = rng.dirichlet(np.full(60, 0.5), size=2)
    prob, alias = alias_tables(share)
    slots, steps = 400, 4000
    draws = np.stack([exact_step(rng, None, np.zeros(2), alias_thresholds(prob), alias, slots, slots) for _ in range(steps)])
    assert (draws.sum(axis=2) == slots).all()
    mean, var = slots * share, slots * share * (1 - share)
    assert np.abs(draws.mean(axis=0) - mean).max() < 5 * np.sqrt(var.max() / steps)
    assert np.allclose(draws.var(axis=0), var, rtol=0.15, atol=0.05)


def test_exact_count_step_repeats_a_binomial_of_the_previous_slots():
    """Thinning the previous slots keeps ``Binomial(previous, keep)`` of each expert's: with a
    share on one expert, the others' counts are only the kept ones (mean ``n * keep``, variance
    ``n * keep * (1 - keep)``), on each side of 1/2 and for counts from 1 to 300."""
    from moesim.routing.generate import alias_thresholds
    from moesim.routing.profile import alias_tables
    from moesim.routing.stream import exact_step

    rng = np.random.default_rng(11)
    E, steps = 8, 4000
    share = np.tile(np.eye(E)[0], (2, 1))
    prob, alias = alias_tables(share)
    previous = np.array([[0, 1, 2, 5, 17, 40, 120, 300]] * 2)
    keep = np.array([0.2166, 0.8])
    slots = int(previous.sum(axis=1).max())
    draws = np.stack([exact_step(rng, previous, keep, alias_thresholds(prob), alias, slots, slots) for _ in range(steps)])
    kept = draws[:, :, 1:]
    n, p = previous[:, 1:], keep[:, None]
    mean, var = n * p, n * p * (1 - p)
    assert np.all(np.abs(kept.mean(axis=0) - mean) < 5 * np.sqrt(var / steps))
    assert np.allclose(kept.var(axis=0), var, rtol=0.15)
    assert (draws[:, :, 0] == slots - kept.sum(axis=2)).all()  # the rest drawn afresh, all on expert 0


def test_micro_batch_counts_are_numpys_floor_of_the_share():
    from moesim.sim.step import _scaled

    rng = np.random.default_rng(4)
    for trial in range(200):
        counts = rng.integers(0, 10 ** int(rng.integers(1, 12)), size=(int(rng.integers(1, 60)), int(rng.integers(1, 300))))
        share = float(rng.random()) if trial % 3 else int(rng.integers(1, 1000)) / int(rng.integers(1000, 2000))
        for offset in (0.5, 0.0):
            assert np.array_equal(_scaled(counts, share, offset), np.floor(counts * np.float64(share) + offset).astype(np.int64))
    assert _scaled(np.arange(24).reshape(2, 3, 4)[:, ::2], 0.5, 0.0).shape == (2, 2, 4)  # a strided source


def test_compiled_two_microbatch_recurrence_equals_the_traced_loop(tmp_path):
    scn, path = _scenario(tmp_path, policies={"overlap": "two_microbatch"})
    sim = build(scn, path)
    model = sim.groups[0].model
    rng = np.random.default_rng(1)
    R, L, E = model.replicas, len(model.arch.moe_layers), model.arch.moe.num_experts
    for decode in (1, 7, 40):
        tokens = decode * R
        counts = np.stack([rng.multinomial(tokens * model.arch.moe.top_k, rng.dirichlet(np.ones(E))) for _ in range(L)])
        load = StepLoad(np.full(R, decode), rng.integers(100, 900, R), np.zeros(R, dtype=np.int64), [], np.minimum(counts, tokens))
        fast = model.cost(load)
        traced = model.cost(load, detail=True)  # the Python loop, recording spans
        assert fast.duration == traced.duration and traced.spans


def test_two_micro_batches_costed_together_equal_each_alone(tmp_path):
    scn, path = _scenario(tmp_path, policies={"overlap": "two_microbatch", "dispatch": "least_loaded"})
    model = build(scn, path).groups[0].model
    rng = np.random.default_rng(2)
    R, L, E = model.replicas, len(model.arch.moe_layers), model.arch.moe.num_experts
    counts = np.stack([rng.multinomial(64 * R * model.arch.moe.top_k, rng.dirichlet(np.full(E, 0.3))) for _ in range(L)])
    load = StepLoad(np.full(R, 64), np.full(R, 500), np.zeros(R, dtype=np.int64), [], np.minimum(counts, 64 * R))
    halves = [load.half(True), load.half(False)]
    together = model._phases_many(halves)
    for i, half in enumerate(halves):
        alone = model._phases(half)
        for key in ("A", "S", "X", "D", "C", "head", "comm", "rank_slots"):
            np.testing.assert_allclose(together[key][i], alone[key], rtol=1e-12)
        assert together["dropped"][i] == alone["dropped"] and together["slots"][i] == alone["slots"]


@pytest.mark.parametrize("variant", ["chunked", "whole prompts", "token level", "disaggregated"])
def test_compiled_engine_passes_equal_the_per_request_references(tmp_path, monkeypatch, variant):
    """The compiled scheduler, advance and token-level counting give the same run as their
    per-request references, preemptions (short of KV blocks) and KV handoffs included."""
    from dataclasses import replace

    from moesim.sim import engine
    from moesim.sim.routing import TokenSource

    extra = {"whole prompts": {"scheduler": {"max_running": 16, "max_batched_tokens": 1024, "chunked_prefill": False}},
             "token level": {"routing": {"distribution": "profile", "level": "token", "seed": 3}},
             "disaggregated": {"parallel": {"tp": 1, "ep": 1},
                               "disaggregation": {"prefill": {"tp": 1, "dp": 2, "ep": 2}, "decode": {"tp": 1, "dp": 4, "ep": 4}}},
             }.get(variant, {})
    scn, path = _scenario(tmp_path, **({"scheduler": {"max_running": 16, "max_batched_tokens": 1024}} | extra),
                          workload={"rate": 100.0, "output": {"mean": 150, "cv": 0.5, "max": 400}})
    sim = build(scn, path)
    sim.groups = [replace(g, kv_blocks=100) for g in sim.groups]  # short of KV blocks: decodes preempt
    fast_log, fast = sim.run()
    monkeypatch.setattr(engine._Group, "_schedule", engine._Group._schedule_reference)
    monkeypatch.setattr(engine._Group, "_advance", engine._Group._advance_reference)
    monkeypatch.setattr(TokenSource, "step", TokenSource._step_reference)
    ref_log, ref = sim.run()
    assert ref["preemptions"] > 0 and fast == ref
    assert fast_log.steps == ref_log.steps and fast_log.counters == ref_log.counters
    assert fast_log.transfers == ref_log.transfers
    for key in ("finish", "first_token", "preemptions"):
        np.testing.assert_array_equal(getattr(fast_log, key), getattr(ref_log, key))
    if variant == "disaggregated":
        assert fast["kv_transfers"] > 0


def test_segment_maxima_are_numpys_segment_sums_then_maxima():
    from moesim.sim.kernels import segment_maxima

    rng = np.random.default_rng(5)
    for loads, layers, replicas in ((2, 61, 64), (1, 4, 1), (3, 30, 8)):
        A, S = rng.random((loads, layers, replicas)), rng.random((loads, layers, replicas)) * (rng.random((loads, layers, 1)) < 0.5)
        starts = np.unique(np.concatenate([[0], rng.integers(1, layers - 1, size=layers // 3)])).astype(np.int64)
        stop = layers - 1  # the layers after the last segment are not summed
        expected = [np.add.reduceat((A + S)[i, :stop], starts, axis=0).max(axis=1) for i in range(loads)]
        np.testing.assert_allclose(segment_maxima(A, S, starts, stop), expected, rtol=1e-13)


def test_busy_seconds_are_numpys_sums():
    from moesim.sim.kernels import busy_seconds

    rng = np.random.default_rng(6)
    # one replica or rank: NumPy sums the layers pairwise; several: one layer after another
    for loads, layers, replicas, ranks, moe_layers in ((2, 61, 64, 64, 58), (1, 32, 1, 1, 32), (2, 94, 1, 8, 94),
                                                       (1, 130, 3, 1, 7), (2, 0, 2, 2, 0)):
        A, S = rng.random((loads, layers, replicas)) * 1e-3, rng.random((loads, layers, replicas))
        head, X = rng.random((loads, replicas)), rng.random((loads, moe_layers, ranks))
        attention, experts = busy_seconds(A, S, head, X)
        assert np.array_equal(attention, A.sum(axis=0).sum(axis=0) + S.sum(axis=0).sum(axis=0) + head.sum(axis=0))
        assert np.array_equal(experts, X.sum(axis=0).sum(axis=0))


def test_expert_parallel_reductions_are_numpys():
    """The compiled slots per rank and all-to-all maxima give NumPy's figures bit for bit."""
    from moesim.sim.kernels import exchange_maxima, rank_slots

    rng = np.random.default_rng(6)
    n, M, ep, per = 2, 58, 64, 4
    rows = rng.integers(0, 5, size=(n * M, ep, per)) * (rng.random((n * M, ep, 1)) < 0.8)
    X = rng.random((n * M, ep))
    expected_x = np.where(rows.sum(axis=2) > 0, X, 0.0)
    recv = rank_slots(rows, X)
    assert np.array_equal(recv, rows.sum(axis=2).astype(np.float64)) and np.array_equal(X, expected_x)
    recv[:3] = 0.0  # layers where nothing moves: no latency
    d_rank, c_rank = rng.random((n * M, ep)), rng.random((n * M, ep))
    D, C, busy, received = exchange_maxima(d_rank, c_rank, recv, 3e-6, n)
    sent = recv.sum(axis=1) > 0
    assert np.array_equal(D, d_rank.max(axis=1) + np.where(sent, 3e-6, 0.0))
    assert np.array_equal(C, c_rank.max(axis=1) + np.where(sent, 3e-6, 0.0))
    for i in range(n):
        part = slice(i * M, (i + 1) * M)
        assert np.array_equal(busy[i], (d_rank + c_rank)[part].sum(axis=0))
        assert np.array_equal(received[i], recv[part].sum(axis=0))
