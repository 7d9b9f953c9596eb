"""Placement planners: EPLB reproduces its README, every planner gives a valid placement, the
MILP is no less balanced than either EPLB policy and sends fewer tokens across nodes."""

import numpy as np
import pytest

from moesim.errors import InputError
from moesim.plan.eplb import rebalance_experts
from moesim.plan.placement import PlacementPlan, PlacementProblem, planners, evaluate, gpu_loads
from moesim.routing.generate import generate_tokens
from moesim.routing.profile import RoutingProfile

# github.com/deepseek-ai/EPLB README: 2 layers x 12 experts, 16 replicas, 4 groups, 2 nodes, 8 GPUs
README_WEIGHT = np.array([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                          [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])
README_PHY2LOG = np.array([[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                           [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]])


def test_eplb_reproduces_its_readme_example():
    phy2log, log2phy, count = rebalance_experts(README_WEIGHT, 16, 4, 2, 8)
    np.testing.assert_array_equal(phy2log, README_PHY2LOG)
    assert (count.sum(axis=1) == 16).all()
    for layer in range(2):
        for expert in range(12):
            slots = log2phy[layer, expert][log2phy[layer, expert] >= 0]
            assert slots.size == count[layer, expert]
            assert (phy2log[layer, slots] == expert).all()


@pytest.fixture(scope="module")
def problem():
    profile = RoutingProfile(name="test", num_experts=32, top_k=4, num_layers=2, skew=0.8, locality=0.3, affinity=0.5)
    trace = generate_tokens(profile, 4000, seed=1)
    loads = np.stack([np.bincount(trace[:, layer].ravel(), minlength=32) for layer in range(2)])
    return PlacementProblem(loads, gpus=8, nodes=2, slots=40, trace=trace, token_bytes=7168 * 2.0)


@pytest.mark.parametrize("name", ["greedy", "eplb", "eplb_hierarchical", "eplb_global", "ilp"])
def test_every_planner_places_every_expert_and_splits_its_tokens(problem, name):
    plan = planners()[name]().plan(problem)
    assert plan.phy2log.shape == (2, 40)
    for layer in range(2):
        assert set(plan.phy2log[layer]) == set(range(32))
        shares = np.bincount(plan.phy2log[layer], weights=plan.weight[layer], minlength=32)
        np.testing.assert_allclose(shares, 1.0, rtol=1e-6)
    np.testing.assert_allclose(gpu_loads(problem, plan).sum(axis=1), problem.loads.sum(axis=1), rtol=1e-6)


def test_milp_is_as_balanced_as_eplb_with_less_inter_node_traffic(problem):
    registry = planners()
    eplb = [evaluate(problem, registry[name]().plan(problem)) for name in ("eplb_hierarchical", "eplb_global")]
    plan = registry["ilp"]().plan(problem)
    ilp = evaluate(problem, plan)
    assert ilp["worst_imbalance"] <= min(e["worst_imbalance"] for e in eplb) + 1e-9
    assert ilp["inter_node_bytes_per_token"] < min(e["inter_node_bytes_per_token"] for e in eplb)
    assert plan.solver["status"] and 0.0 <= plan.solver["gap"] <= 1.0


def test_no_migration_from_itself(problem):
    plan = planners()["eplb_global"]().plan(problem)
    same = PlacementProblem(problem.loads, gpus=8, nodes=2, slots=40, current=plan.phy2log, expert_bytes=1e6)
    assert evaluate(same, PlacementPlan("x", plan.phy2log, plan.weight))["migrated_bytes"] == 0.0
    other = PlacementProblem(problem.loads, gpus=8, nodes=2, slots=40, current=np.tile(np.arange(40) % 32, (2, 1)),
                             expert_bytes=1e6)
    assert evaluate(other, plan)["migrated_bytes"] > 0.0


@pytest.mark.parametrize("kwargs, field", [
    (dict(slots=16), "slots"),  # fewer slots than experts
    (dict(slots=36), "slots"),  # not a whole number per GPU
    (dict(nodes=3), "nodes"),
    (dict(groups=5), "groups"),
])
def test_impossible_problems_name_the_constraint(kwargs, field):
    args = dict(loads=np.ones((1, 32)), gpus=8, nodes=2, slots=40) | kwargs
    with pytest.raises(InputError) as error:
        PlacementProblem(**args)
    assert error.value.field == field


def test_contiguous_refuses_redundant_slots(problem):
    with pytest.raises(InputError, match="no redundant experts"):
        planners()["contiguous"]().plan(problem)
