"""Parallel-layout search, pipeline-stage ILP and ``moesim plan layout``."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from moesim.cli import main
from moesim.cli.plan_layout import NOT_SIMULATED_PP, _verify
from moesim.cost.estimate import Workload, default_dtypes, estimate, memory_per_device
from moesim.cost.layout import make_layout
from moesim.hardware import catalog
from moesim.models import load_model
from moesim.plan.layout import (MAX_PP, Engine, LayoutSearch, Shape, Targets, enumerate_layouts, rank_key,
                                two_microbatch_step)
from moesim.plan.recommend import read_plan
from moesim.plan.stages import StageProblem, even_split, evaluate_split, solve_stages
from moesim.scenario.schema import load_scenario


@pytest.fixture(scope="module")
def mixtral():
    return load_model("mixtral-8x7b")


@pytest.fixture(scope="module")
def dgx():
    cluster = catalog.cluster("dgx-h100")
    return cluster, catalog.device(cluster.node.accelerators.device)


# -- enumeration ---------------------------------------------------------------------------------

def test_enumeration_gives_only_valid_layouts(mixtral):
    layouts, tried = enumerate_layouts(mixtral, 16, 8)
    assert 0 < len(layouts) <= tried
    seen = set()
    for lay in layouts:
        assert lay.devices <= 16 and lay.tp <= 8 and lay.pp <= MAX_PP
        assert lay.ep * lay.expert_tp == lay.tp * lay.dp
        assert 8 % lay.ep == 0  # Mixtral has 8 experts
        assert make_layout(mixtral, tp=lay.tp, ep=lay.ep, dp=lay.dp, pp=lay.pp, expert_tp=lay.expert_tp) == lay
        seen.add((lay.tp, lay.dp, lay.pp, lay.ep, lay.expert_tp))
    assert len(seen) == len(layouts)
    # the usual deployments are all there; EP 16 is not (8 experts), nor TP across nodes
    assert {(1, 8, 1, 8, 1), (2, 1, 1, 1, 2), (8, 1, 1, 8, 1), (2, 2, 2, 4, 1), (1, 16, 1, 8, 2)} <= seen
    assert not any(lay.ep == 16 or lay.tp == 16 for lay in layouts)


# -- the stage ILP -------------------------------------------------------------------------------

def _brute_force(problem: StageProblem) -> float | None:
    """The best slowest stage over every contiguous partition (small problems only)."""
    L, S = problem.layers, problem.stages
    best = None
    for cuts in itertools.combinations(range(1, L), S - 1):
        bounds = list(zip((0, *cuts), (*cuts, L)))
        part = evaluate_split(problem, bounds)
        if max(part.stage_memory) <= problem.memory_budget and (best is None or part.slowest < best):
            best = part.slowest
    return best


def _random_problem(rng, layers: int, stages: int) -> StageProblem:
    moe = rng.random(layers) < 0.7
    return StageProblem(layer_time=np.where(moe, 2.0, 1.0) * rng.uniform(0.9, 1.1, layers),
                        layer_memory=np.where(moe, 3.0, 1.0), stages=stages, memory_budget=rng.uniform(10, 30),
                        first_time=0.1, first_memory=rng.uniform(0, 4), last_time=rng.uniform(0, 4),
                        last_memory=rng.uniform(0, 4), stage_memory=1.0, hop_time=0.05)


def test_stage_ilp_is_optimal_never_worse_than_even_and_respects_memory():
    rng = np.random.default_rng(7)
    strictly_better = 0
    for trial in range(12):
        problem = _random_problem(rng, layers=int(rng.integers(6, 13)), stages=int(rng.integers(2, 5)))
        part = solve_stages(problem)
        exact = _brute_force(problem)
        if exact is None:
            assert part is None
            continue
        assert part is not None and part.status == "Optimal" and part.gap == 0.0
        assert part.slowest == pytest.approx(exact, rel=1e-6)
        assert part.stages[0][0] == 0 and part.stages[-1][1] == problem.layers
        assert all(a < b for a, b in part.stages) and all(p[1] == q[0] for p, q in zip(part.stages, part.stages[1:]))
        assert max(part.stage_memory) <= problem.memory_budget + 1e-9
        even = evaluate_split(problem, even_split(problem.layers, problem.stages))
        if max(even.stage_memory) <= problem.memory_budget:
            assert part.slowest <= even.slowest + 1e-12
            strictly_better += part.slowest < even.slowest - 1e-9
    assert strictly_better > 0


def test_stage_ilp_moves_layers_off_the_lm_head_stage_and_fits_where_even_does_not():
    # 16 equal layers on 4 stages; the LM head costs 2 layers, the embedding weighs 3 layers
    problem = StageProblem(layer_time=np.ones(16), layer_memory=np.ones(16), stages=4, memory_budget=6.5,
                           last_time=2.0, first_memory=3.0)
    even = evaluate_split(problem, even_split(16, 4))
    assert even.slowest == 6.0 and max(even.stage_memory) == 7.0  # over budget
    part = solve_stages(problem)
    assert part.slowest == pytest.approx(5.0) and part.stages == [(0, 3), (3, 8), (8, 13), (13, 16)]
    assert max(part.stage_memory) <= 6.5
    problem.memory_budget = 3.5  # the first stage cannot hold the embedding and a layer
    assert solve_stages(problem) is None


def test_deepseek_v3_stages_from_the_cost_model_beat_or_equal_even(dgx):
    arch = load_model("deepseek-v3")
    cluster = catalog.cluster("h100-8node")
    device = catalog.device(cluster.node.accelerators.device)
    search = LayoutSearch(arch, cluster, device, Shape(prompt=1024, output=1024))
    lay = make_layout(arch, tp=1, ep=8, dp=8, pp=8)
    c = search.evaluate(lay, "none", 64)
    assert c.partition is not None and c.partition.status == "Optimal"
    assert c.partition.slowest <= c.even.slowest
    assert c.tpot == pytest.approx(8 * c.partition.slowest)
    assert [a for a, _ in c.stages][0] == 0 and c.stages[-1][1] == 61
    # the balanced figure of moesim estimate is a floor for the pipeline's pace
    est = estimate(arch, cluster, lay, Workload(batch=64 * 8, prompt=1024, output=1024))
    assert c.tpot >= est.decode_step * 0.999


# -- the cost of one candidate -------------------------------------------------------------------

@pytest.mark.parametrize("model,cluster,kw", [
    ("mixtral-8x7b", "dgx-h100", {"tp": 2}),
    ("mixtral-8x7b", "dgx-h100", {"tp": 1, "ep": 4, "dp": 4}),
    ("deepseek-v3", "h100-8node", {"tp": 1, "ep": 64, "dp": 64}),
])
def test_single_stage_weights_match_memory_per_device(model, cluster, kw):
    arch, cl = load_model(model), catalog.cluster(cluster)
    device = catalog.device(cl.node.accelerators.device)
    lay = make_layout(arch, **kw)
    search = LayoutSearch(arch, cl, device, Shape(prompt=512, output=128))
    c = search.evaluate(lay, "none", 4)
    dtype, experts = default_dtypes(arch)
    ref = memory_per_device(arch, lay, Workload(batch=4 * lay.dp, prompt=512, output=128), device, dtype, experts, "bf16")
    assert c.memory["weights"] == pytest.approx(ref["weights"], rel=1e-12)
    assert c.memory["kv_cache"] == pytest.approx(ref["kv_cache"], rel=1e-12)


def test_two_batch_overlap_hides_communication(mixtral, dgx):
    cluster, _ = dgx
    lay = make_layout(mixtral, tp=1, ep=8, dp=8)
    half = estimate(mixtral, cluster, lay, Workload(batch=8 * 64, prompt=1024, output=256))
    full = estimate(mixtral, cluster, lay, Workload(batch=8 * 128, prompt=1024, output=256))
    step = two_microbatch_step(mixtral, half)
    comm = sum(p.time for p in half.decode_layers["moe"].parts if p.name in ("dispatch", "combine")) * 32
    assert comm > 0
    # never better than either stream alone, never worse than the two halves one after the other
    assert 2 * comm <= step <= 2 * half.decode_step + 1e-12
    assert step < 2 * half.decode_step
    assert step < full.decode_step * 1.5


# -- the search ----------------------------------------------------------------------------------

def test_ranking_is_monotone_and_every_candidate_meets_what_it_claims(mixtral, dgx):
    cluster, device = dgx
    targets = Targets(ttft=1.0, tpot=0.03)
    search = LayoutSearch(mixtral, cluster, device, Shape(prompt=1024, output=256), Engine(), targets)
    result = search.run(4, 8)
    ranked = result.ranked
    assert len(ranked) >= 5 and result.counts["feasible"] == len(ranked)
    assert ranked == sorted(ranked, key=rank_key)
    per_device = [c.tokens_per_s_per_device for c in ranked]
    dollars = [c.usd_per_million_tokens for c in ranked]
    assert per_device == sorted(per_device, reverse=True)
    assert dollars == sorted(dollars)
    assert any(c.layout.pp > 1 for c in ranked) and any(c.overlap == "two_microbatch" for c in ranked)
    for c in ranked[:6]:
        assert c.fits and c.meets(targets) and c.memory["used"] <= c.memory["budget"]
        sizes = search.batch_sizes(c.layout)
        i = sizes.index(c.max_running)
        if i + 1 < len(sizes):  # the chosen batch is the largest that holds
            bigger = search.evaluate(c.layout, c.overlap, sizes[i + 1])
            assert not (bigger.fits and bigger.meets(targets))
        d = c.decision(4)
        assert {"tp", "dp", "pp", "ep", "expert_tp", "micro_batches", "max_running", "max_batched_tokens",
                "stages"} <= set(d)
        assert d["stages"][0][0] == 0 and d["stages"][-1][1] == mixtral.num_layers and len(d["stages"]) == d["pp"]


def test_a_tighter_tpot_target_never_raises_throughput(mixtral, dgx):
    cluster, device = dgx
    best = []
    for tpot in (None, 0.02, 0.012):
        r = LayoutSearch(mixtral, cluster, device, Shape(prompt=1024, output=256), targets=Targets(tpot=tpot)).run(4, 8)
        assert all(c.tpot <= (tpot or np.inf) for c in r.ranked)
        best.append(r.ranked[0].tokens_per_s_per_device)
    assert best == sorted(best, reverse=True)


# -- the command ---------------------------------------------------------------------------------

SCENARIO = """\
name: layout-test
model: mixtral-8x7b
cluster: dgx-h100
parallel: {tp: 2}
workload: {arrivals: poisson, rate: 20, requests: 40, prompt: 512, output: 32}
routing: {distribution: balanced, seed: 3}
"""


@pytest.fixture()
def scenario(tmp_path):
    path = tmp_path / "layout-test.yaml"
    path.write_text(SCENARIO)
    return path


def test_cli_plan_is_byte_identical_across_runs_and_applies(scenario, tmp_path, capsys):
    args = ["plan", "layout", "--scenario", str(scenario), "--devices", "4", "--tpot-slo", "40ms", "--verify", "1",
            "--verify-requests", "12", "--top", "5"]
    assert main([*args, "-o", str(tmp_path / "a.yaml")]) == 0
    out = capsys.readouterr().out
    assert "layout-test: layouts on up to 4 devices" in out and "best:" in out and "Running HiGHS" not in out
    assert main([*args, "-o", str(tmp_path / "b.yaml")]) == 0
    assert (tmp_path / "a.yaml").read_bytes() == (tmp_path / "b.yaml").read_bytes()
    rec = read_plan(tmp_path / "a.yaml", kind="layout")
    d = rec.decision
    assert d["tp"] * d["dp"] * d["pp"] <= 4 and d["ep"] * d["expert_tp"] == d["tp"] * d["dp"]
    assert rec.predicted["cost_model"]["tpot_s"] <= 0.04
    first = rec.predicted["ranked"][0]
    assert first["tokens_per_s_per_device"] == rec.predicted["cost_model"]["tokens_per_s_per_device"]
    sim = rec.predicted["simulated"]
    assert sim["status"] in ("simulated", NOT_SIMULATED_PP)
    if sim["status"] == "simulated":
        assert sim["requests"] == 12 and sim["tokens_per_s_per_device"] > 0
    assert rec.inputs["model"]["fingerprint"].startswith("sha256:") and rec.solver["search"]["feasible"] > 0
    from moesim.scenario.plan import apply_plan  # helper C's: a scenario runs the plan

    scn, _ = load_scenario(str(scenario))
    applied = apply_plan(scn, tmp_path / "a.yaml")
    assert (applied.parallel.tp, applied.parallel.pp, applied.scheduler.max_running) == (d["tp"], d["pp"], d["max_running"])


def test_pipeline_candidates_are_marked_not_simulated(scenario, mixtral, dgx):
    cluster, device = dgx
    shape = Shape(prompt=512, output=32)
    c = LayoutSearch(mixtral, cluster, device, shape).evaluate(make_layout(mixtral, tp=2, pp=2), "none", 8)
    scn, path = load_scenario(str(scenario))
    assert _verify(scn, path, c, 8, shape) == {"status": NOT_SIMULATED_PP}


@pytest.mark.parametrize("extra,field", [
    (["--tpot-slo", "1us"], "--tpot-slo"),
    (["--ttft-slo", "1us"], "--ttft-slo"),
    (["--devices", "9"], "--devices"),
    (["--tpot-slo", "fast"], "--tpot-slo"),
])
def test_cli_infeasible_targets_and_bad_options_exit_2(scenario, tmp_path, capsys, extra, field):
    code = main(["plan", "layout", "--scenario", str(scenario), "--devices", "2", *extra, "--verify", "0",
                 "-o", str(tmp_path / "p.yaml")])
    err = capsys.readouterr().err
    assert code == 2 and field in err and not (tmp_path / "p.yaml").exists()


def test_cli_model_that_fits_no_layout_exits_2(tmp_path, capsys):
    path = tmp_path / "big.yaml"
    path.write_text(SCENARIO.replace("mixtral-8x7b", "deepseek-v3"))
    code = main(["plan", "layout", "--scenario", str(path), "--devices", "4", "--verify", "0", "-o", str(tmp_path / "p.yaml")])
    err = capsys.readouterr().err
    assert code == 2 and "does not fit any layout of up to 4 devices" in err and "--devices" in err
