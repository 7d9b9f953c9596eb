"""The routing generator: Numba equals the NumPy reference, and each behaviour does what its
parameter says."""

import numpy as np
import pytest

from moesim.routing.generate import drop_over_capacity, generate_tokens
from moesim.routing.trace import tokens_per_expert
from moesim.routing.profile import RoutingProfile, _vose, alias_tables, draw_without_replacement

CASES = {
    "token_choice": dict(num_experts=8, top_k=2, num_layers=4, skew=1.0, locality=0.3, affinity=0.4),
    "mixture_drift": dict(num_experts=64, top_k=6, num_layers=3, skew=[0.5, 1.0, 1.5], locality=0.5, affinity=0.2,
                          domains=3, drift=0.3, drift_interval=100),
    "group_limited": dict(num_experts=256, top_k=8, num_layers=3, algorithm="group_limited", n_group=8, topk_group=4,
                          skew=1.2, locality=0.2, affinity=0.3),
    # above 12 groups the subset table is too large: groups are picked one at a time
    "group_limited_many_groups": dict(num_experts=128, top_k=8, num_layers=2, algorithm="group_limited", n_group=16,
                                      topk_group=4, skew=1.0, locality=0.2, affinity=0.3),
    "grouped": dict(num_experts=64, top_k=8, num_layers=3, algorithm="grouped", n_group=8, skew=1.0, locality=0.4, affinity=0.3),
    "dynamic_k": dict(num_experts=32, top_k=4, num_layers=3, algorithm="dynamic_k", dynamic_threshold=0.3, skew=1.5, null_rate=0.1),
    "capacity": dict(num_experts=16, top_k=2, num_layers=2, skew=3.0, locality=0.9, capacity_factor=1.0, capacity_batch=64),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_numba_kernel_equals_numpy_reference(name):
    profile = RoutingProfile(seq_len=40, **CASES[name])
    fast = generate_tokens(profile, 1500, seed=11, impl="numba")
    slow = generate_tokens(profile, 1500, seed=11, impl="numpy")
    assert np.array_equal(fast, slow)
    valid = fast[fast >= 0]
    assert valid.size and valid.max() < profile.num_experts
    padded = np.where(fast >= 0, fast, -np.arange(1, fast.shape[2] + 1))
    assert not (np.diff(np.sort(padded, axis=2), axis=2) == 0).any()  # no expert twice in one token


def test_same_seed_same_trace_other_seed_other_trace():
    profile = RoutingProfile(**CASES["token_choice"])
    a = generate_tokens(profile, 4000, seed=1)
    assert np.array_equal(a, generate_tokens(profile, 4000, seed=1))
    assert not np.array_equal(a, generate_tokens(profile, 4000, seed=2))


def test_skew_sets_popularity():
    flat = generate_tokens(RoutingProfile(num_experts=64, top_k=1, num_layers=1, skew=0.0), 50_000, seed=0)
    skewed = generate_tokens(RoutingProfile(num_experts=64, top_k=1, num_layers=1, skew=1.2), 50_000, seed=0)
    share = lambda ids: np.sort(np.bincount(ids.ravel(), minlength=64))[::-1] / ids.size
    assert share(flat)[0] < 0.03
    # Zipf 1.2 over 64 experts: the top expert takes 1 / H(64, 1.2) of the mass
    expected = 1 / np.sum(1 / np.arange(1, 65) ** 1.2)
    assert share(skewed)[0] == pytest.approx(expected, rel=0.05)


def test_locality_raises_the_repeat_rate():
    def repeat_rate(locality):
        ids = generate_tokens(RoutingProfile(num_experts=64, top_k=1, num_layers=1, skew=0.5, locality=locality,
                                             seq_len=10_000), 20_000, seed=0)[:, 0, 0]
        return np.mean(ids[1:] == ids[:-1])
    assert repeat_rate(0.0) < 0.1 < 0.5 < repeat_rate(0.6)


def test_affinity_concentrates_the_next_layer():
    def conditional_entropy(affinity):
        ids = generate_tokens(RoutingProfile(num_experts=16, top_k=1, num_layers=2, skew=0.0, affinity=affinity, fanout=2),
                              40_000, seed=0)[:, :, 0]
        joint = np.histogram2d(ids[:, 0], ids[:, 1], bins=16, range=[[0, 16], [0, 16]])[0] + 1e-12
        p = joint / joint.sum()
        return -np.sum(p * np.log2(p / p.sum(axis=1, keepdims=True)))
    assert conditional_entropy(0.0) > 3.9 > 2.5 > conditional_entropy(0.8)


def test_group_limited_uses_at_most_topk_group_groups():
    profile = RoutingProfile(**CASES["group_limited"])
    ids = generate_tokens(profile, 3000, seed=3)
    groups = ids // (256 // 8)
    used = np.array([[len(set(row)) for row in layer] for layer in groups.transpose(1, 0, 2)])
    assert used.max() <= 4


def test_grouped_takes_the_same_count_from_each_group():
    profile = RoutingProfile(**CASES["grouped"])
    ids = generate_tokens(profile, 2000, seed=3)
    counts = np.apply_along_axis(lambda r: np.bincount(r // 8, minlength=8), 2, ids)
    assert np.all(counts == 1)


def test_dynamic_k_and_null_experts_leave_slots_empty():
    profile = RoutingProfile(**CASES["dynamic_k"])
    ids = generate_tokens(profile, 3000, seed=3)
    per_token = (ids >= 0).sum(axis=2)
    assert 1.0 < per_token.mean() < 4.0
    assert per_token.min() >= 0


def test_capacity_drops_over_capacity_assignments():
    ids = np.zeros((8, 1, 2), dtype=np.int16)
    ids[:, 0, 1] = np.arange(1, 9)
    dropped = drop_over_capacity(ids, num_experts=16, capacity_factor=2.0, batch=8)
    # capacity = ceil(2 * 8 * 2 / 16) = 2: expert 0 keeps its first two tokens
    assert dropped[:, 0, 0].tolist() == [0, 0, -1, -1, -1, -1, -1, -1]
    assert np.array_equal(dropped[:, 0, 1], ids[:, 0, 1])
    profile = RoutingProfile(**CASES["capacity"])
    traced = generate_tokens(profile, 2048, seed=0)
    loads = tokens_per_expert(traced, 16, 64)
    assert loads.max() <= np.ceil(1.0 * 64 * 2 / 16)


def test_expert_choice_fills_every_expert_to_capacity():
    profile = RoutingProfile(num_experts=16, top_k=2, num_layers=2, algorithm="expert_choice", skew=1.0, capacity_batch=256)
    ids = generate_tokens(profile, 1024, seed=0)
    assert ids.shape == (1024, 2, 4)
    loads = tokens_per_expert(ids, 16, 256)
    capacity = 256 * 2 // 16
    assert loads.max() <= capacity
    assert loads.mean() > 0.95 * capacity  # only tokens chosen by more than 2k experts lose some


def test_hash_routing_is_a_function_of_the_token_id():
    profile = RoutingProfile(num_experts=32, top_k=2, num_layers=3, algorithm="hash", locality=0.5, vocab=100)
    ids = generate_tokens(profile, 5000, seed=0)
    assert ids.min() >= 0 and ids.max() < 32
    rows = {tuple(r.ravel()) for r in ids}
    assert len(rows) <= 100  # at most one routing per vocabulary entry


def test_alias_tables_draw_the_right_distribution():
    weights = np.array([[0.5, 0.25, 0.125, 0.125], [1.0, 0.0, 0.0, 3.0]])
    prob, alias = alias_tables(weights)
    u = (np.arange(200_000) + 0.5) / 200_000
    for row in range(2):
        x = u * 4
        i = x.astype(int)
        pick = np.where(x - i >= prob[row, i], alias[row, i], i)
        freq = np.bincount(pick, minlength=4) / u.size
        assert np.allclose(freq, weights[row] / weights[row].sum(), atol=1e-3)


def _generators(seed, offset):
    """Two generators in the same state, ``offset`` 32-bit draws in: an odd count leaves half of
    a 64-bit output buffered (PCG64's ``has_uint32``), which the next draws must use alike."""
    pair = [np.random.default_rng([seed, 0x5EED]) for _ in range(2)]
    for rng in pair:
        rng.integers(0, 1000, size=offset)
    return pair


@pytest.mark.parametrize("n", [1, 8, 64, 128, 160, 256, 384])
@pytest.mark.parametrize("seed,offset", [(0, 0), (3, 1), (12345, 7)])
def test_draw_without_replacement_equals_numpy_choice(n, seed, offset):
    for size in sorted({min(s, n) for s in (1, 2, 4, 8, 16, n // 2 or 1, 256, n)}):
        reference, compiled = _generators(seed, offset)
        rows = [reference.choice(n, size=size, replace=False) for _ in range(2 * n + 3)]
        out = np.empty((2 * n + 3, size), dtype=np.int32)
        draw_without_replacement(compiled, out, n)
        assert np.array_equal(out, np.array(rows)), (n, size)
        assert compiled.bit_generator.state == reference.bit_generator.state, (n, size)


@pytest.mark.parametrize("n,size", [(10_001, 200), (10_001, 201), (12_000, 256), (12_000, 12_000)])
def test_draw_without_replacement_follows_numpy_past_ten_thousand(n, size):
    # NumPy shuffles the tail of arange(n) instead when n > 10000 and size > n // 50
    reference, compiled = _generators(1, 1)
    rows = [reference.choice(n, size=size, replace=False) for _ in range(3)]
    out = np.empty((3, size), dtype=np.int32)
    draw_without_replacement(compiled, out, n)
    assert np.array_equal(out, np.array(rows))
    assert compiled.bit_generator.state == reference.bit_generator.state


def test_alias_tables_equal_one_table_per_row():
    weights = np.random.default_rng(2).random((3, 5, 2, 32)) ** 4
    weights[0, 0, 0] = 0.0  # an all-zero row: uniform
    prob, alias = alias_tables(weights)
    assert prob.dtype == np.float64 and alias.dtype == np.int32 and prob.shape == alias.shape == weights.shape
    for index in np.ndindex(weights.shape[:-1]):
        row_prob, row_alias = np.empty(32), np.empty(32, dtype=np.int32)
        _vose(weights[index], row_prob, row_alias)
        assert np.array_equal(prob[index], row_prob) and np.array_equal(alias[index], row_alias)


def test_profile_validation():
    with pytest.raises(ValueError, match="top_k 9 exceeds"):
        RoutingProfile(num_experts=8, top_k=9, num_layers=1)
    with pytest.raises(ValueError, match="lists 2 values for 3 layers"):
        RoutingProfile(num_experts=8, top_k=2, num_layers=3, skew=[1.0, 1.0])
    with pytest.raises(ValueError, match="divisible by n_group"):
        RoutingProfile(num_experts=64, top_k=6, num_layers=1, algorithm="grouped", n_group=4)


@pytest.mark.parametrize("extra", [
    dict(num_experts=64, top_k=6, num_layers=3, skew=1.0, affinity=0.3, domains=3),
    dict(num_experts=256, top_k=8, num_layers=2, algorithm="group_limited", n_group=8, topk_group=4, skew=1.2),
])
def test_count_level_agrees_with_aggregated_token_level(extra):
    from moesim.routing import stats
    from moesim.routing.generate import generate_counts

    profile = RoutingProfile(seq_len=1, **extra)  # every token its own sequence: steps mix domains as counts do
    batch, steps = 256, 200
    counts = generate_counts(profile, steps, batch, seed=3)
    aggregated = tokens_per_expert(generate_tokens(profile, steps * batch, seed=3), profile.num_experts, batch)
    assert counts.shape == aggregated.shape
    assert np.abs(stats.popularity(counts) - stats.popularity(aggregated)).max() < 0.005
    assert stats.imbalance(counts) == pytest.approx(stats.imbalance(aggregated), rel=0.05)
    assert counts.sum(axis=2).max() <= batch * profile.top_k


def test_count_level_locality_correlates_steps_and_caps_hold():
    from moesim.routing.generate import generate_counts

    def step_correlation(locality):
        profile = RoutingProfile(num_experts=32, top_k=2, num_layers=1, skew=0.3, locality=locality, seq_len=10_000)
        loads = generate_counts(profile, 300, 64, seed=0)[:, 0, :].astype(float)
        centred = loads - loads.mean(axis=0)
        return np.mean(np.sum(centred[1:] * centred[:-1], axis=1) / np.sqrt(np.sum(centred[1:] ** 2, axis=1) * np.sum(centred[:-1] ** 2, axis=1)))
    assert step_correlation(0.9) > step_correlation(0.0) + 0.5
    capped = RoutingProfile(num_experts=16, top_k=2, num_layers=1, skew=2.0, capacity_factor=1.25)
    assert generate_counts(capped, 50, 128, seed=0).max() <= np.ceil(1.25 * 128 * 2 / 16)
    chooser = RoutingProfile(num_experts=16, top_k=2, num_layers=2, algorithm="expert_choice")
    assert np.all(generate_counts(chooser, 3, 128, seed=0) == 16)
