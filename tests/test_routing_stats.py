import numpy as np
import pytest

from moesim.routing import stats
from moesim.routing.generate import generate_tokens
from moesim.routing.trace import tokens_per_expert
from moesim.routing.profile import RoutingProfile


def _direct_hit_rate(ids, num_experts, cache, policy, future=16):
    """Simulate one cache size directly: the reference the one-pass stack curves must match."""
    tokens, k = ids.shape
    nxt = stats._next_use(ids.astype(np.int64), num_experts)
    last = np.zeros(num_experts, dtype=np.int64)
    freq = np.zeros(num_experts, dtype=np.int64)
    nuse = np.zeros(num_experts, dtype=np.int64)
    fut = np.zeros(num_experts, dtype=np.int64)
    for t in range(min(future, tokens)):
        for e in ids[t]:
            if e >= 0:
                fut[e] += 1
    held: list[int] = []
    seen: set[int] = set()
    hits = total = clock = 0
    for t in range(tokens):
        for e in ids[t]:
            if e < 0:
                continue
            total += 1
            if e in held:
                hits += 1
            elif policy == "sch" and e not in seen and len(seen) < cache:
                hits += 1  # SCH may fill a free slot ahead of use
        for j, x in enumerate(ids[t]):
            if x < 0:
                continue
            clock += 1
            if policy == "sch" and x not in held and x not in seen and len(held) < cache:
                pass
            if x not in held:
                if len(held) >= cache:
                    def priority(e):
                        if policy == "lfu":
                            return (freq[e], last[e])
                        if policy == "belady":
                            return (-nuse[e], last[e])
                        if policy == "sch":
                            return (fut[e], last[e])
                        return (last[e],)
                    held.remove(min(held, key=priority))
                held.append(int(x))
            seen.add(int(x))
            last[x] = clock
            freq[x] += 1
            nuse[x] = nxt[t, j]
            fut[x] -= 1
        if t + future < tokens:
            for e in ids[t + future]:
                if e >= 0:
                    fut[e] += 1
    return hits / total


@pytest.mark.parametrize("policy", ["lru", "lfu", "belady", "sch"])
def test_one_pass_curves_match_direct_simulation(policy):
    profile = RoutingProfile(num_experts=12, top_k=2, num_layers=1, skew=1.0, locality=0.4, seq_len=10_000)
    ids = generate_tokens(profile, 600, seed=5)
    curve = stats.hit_rate_curve(ids, 12, policy, future=8)[0]
    for cache in (2, 3, 4, 6, 9, 12):
        assert curve[cache] == pytest.approx(_direct_hit_rate(ids[:, 0, :], 12, cache, policy, future=8), abs=1e-12), cache


def test_curves_are_ordered_and_monotone():
    profile = RoutingProfile(num_experts=64, top_k=4, num_layers=2, skew=1.0, locality=0.3)
    ids = generate_tokens(profile, 5000, seed=1)
    lru, lfu, opt = (stats.hit_rate_curve(ids, 64, p) for p in ("lru", "lfu", "belady"))
    for curve in (lru, lfu, opt):
        assert np.all(np.diff(curve, axis=1) >= -1e-12)
    assert np.all(opt[:, 4:] >= lru[:, 4:] - 1e-12)  # Belady is optimal
    assert np.all(opt[:, 4:] >= lfu[:, 4:] - 1e-12)


def test_load_statistics():
    loads = np.array([[[4, 4, 4, 4]], [[8, 0, 8, 0]]])
    assert stats.imbalance(loads)[0] == pytest.approx((1 + 2) / 2)
    assert stats.balancedness(loads, ep=2)[0] == pytest.approx((1 + 1) / 2)
    assert stats.balancedness(np.array([[[8, 8, 0, 0]]]), ep=2)[0] == pytest.approx(0.5)
    assert stats.popularity(loads)[0].tolist() == pytest.approx([12 / 32, 4 / 32, 12 / 32, 4 / 32])


def test_srp_of_a_constant_and_of_a_random_router():
    constant = np.tile(np.array([[[0, 1]]], dtype=np.int16), (64, 1, 1))
    assert stats.srp(constant, 8, 16)[0] == pytest.approx(1.0)
    rng_ids = generate_tokens(RoutingProfile(num_experts=64, top_k=2, num_layers=1, skew=0.0), 4000, seed=0)
    local_ids = generate_tokens(RoutingProfile(num_experts=64, top_k=2, num_layers=1, skew=0.0, locality=0.8,
                                               seq_len=10_000), 4000, seed=0)
    assert stats.srp(local_ids, 64, 16)[0] > stats.srp(rng_ids, 64, 16)[0] + 0.2


def test_affinity_and_coactivation():
    ids = generate_tokens(RoutingProfile(num_experts=16, top_k=2, num_layers=3, skew=0.0, affinity=0.9, fanout=2), 20_000, seed=0)
    conditional, mi = stats.affinity(ids, 16)
    assert conditional.shape == (2, 16, 16)
    assert np.allclose(conditional.sum(axis=2), 1.0)
    independent = generate_tokens(RoutingProfile(num_experts=16, top_k=2, num_layers=3, skew=0.0), 20_000, seed=0)
    assert mi.min() > 5 * stats.affinity(independent, 16)[1].max()
    co = stats.coactivation(ids, 16)
    assert co.shape == (3, 16, 16)
    assert np.array_equal(co, co.transpose(0, 2, 1))
    assert co.sum() == 3 * 20_000 * 2  # one pair per token per layer (k = 2), counted both ways


def test_reuse_distance_counts_every_access():
    ids = generate_tokens(RoutingProfile(num_experts=8, top_k=2, num_layers=2, skew=1.0), 1000, seed=0)
    hist = stats.reuse_distance(ids, 8)
    assert hist.shape == (2, 9) and hist.sum() == ids.size
    assert np.array_equal(tokens_per_expert(ids, 8, 1000).sum(axis=(0, 2)), hist.sum(axis=1))
