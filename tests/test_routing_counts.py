import numpy as np
import pytest

from moesim.errors import InputError
from moesim.routing import counts as C
from moesim.routing.trace import Trace, save_trace


def _give_back_reference(counts, ep, remaining, step, cap):
    """The one-token-at-a-time definition the closed form must reproduce."""
    per = counts.reshape(ep, -1).copy()
    while remaining > 0:
        moved = False
        for rank in range(ep):
            local = per[rank]
            valid = np.flatnonzero(local < cap) if step > 0 else np.flatnonzero(local > 0)
            if valid.size == 0:
                continue
            pick = valid[np.argmin(local[valid])] if step > 0 else valid[np.argmax(local[valid])]
            local[pick] += step
            remaining -= 1
            moved = True
            if remaining == 0:
                break
        if not moved:
            break
    return per.reshape(-1)


def test_give_back_closed_form_matches_reference():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        ep = int(rng.choice([1, 2, 4, 8]))
        experts = ep * int(rng.integers(1, 6))
        cap = int(rng.integers(3, 20))
        counts = rng.integers(0, cap + 1, experts)
        remaining = int(rng.integers(0, 80))
        step = int(rng.choice([1, -1]))
        got = C._give_back(counts.copy(), ep, remaining, step, cap)
        want = _give_back_reference(counts.copy(), ep, remaining, step, cap)
        assert np.array_equal(got, want), (ep, experts, cap, counts, remaining, step)


@pytest.mark.parametrize("tokens, experts, k", [(1, 8, 2), (5, 8, 2), (16, 8, 2), (3, 256, 8), (1000, 128, 8), (7, 6, 4), (4096, 256, 8)])
def test_balanced_counts_are_the_strided_pattern(tokens, experts, k):
    ids = C.balanced_ids(tokens, experts, k)
    assert ids.shape == (tokens, k)
    assert np.array_equal(C.balanced_counts(tokens, experts, k), np.bincount(ids.ravel(), minlength=experts))


def test_balanced_spreads_one_token_over_ranks():
    # Mixtral (8 experts, top-2), one token: experts 0 and 4, as in the measured tables.
    assert np.flatnonzero(C.balanced_counts(1, 8, 2)).tolist() == [0, 4]
    assert np.all(C.balanced_counts(64, 8, 2) == 16)


@pytest.mark.parametrize("tokens, experts, k, ep", [(1, 8, 2, 1), (64, 8, 2, 4), (1024, 256, 8, 8), (16384, 128, 8, 16), (3, 384, 8, 1)])
def test_power_law_conserves_slots_caps_experts_and_puts_the_heaviest_rank_first(tokens, experts, k, ep):
    counts = C.power_law_counts(tokens, experts, k, 1.2, ep=ep, rng=np.random.default_rng(3))
    assert counts.sum() == tokens * k
    assert counts.max() <= tokens and counts.min() >= 0
    per_rank = counts.reshape(ep, -1).sum(axis=1)
    assert per_rank[0] == per_rank.max()


def test_power_law_is_skewed_and_seeded():
    a = C.power_law_counts(8192, 256, 8, 1.2, rng=np.random.default_rng(1))
    b = C.power_law_counts(8192, 256, 8, 1.2, rng=np.random.default_rng(1))
    assert np.array_equal(a, b)
    assert a.max() / a.mean() > 3  # alpha 1.2 is strongly skewed
    flat = C.power_law_counts(8192, 256, 8, 1.01, rng=np.random.default_rng(1))
    assert flat.sum() == a.sum()


def test_parse_routing_specs(tmp_path):
    assert C.parse_routing("balanced", 16, 8, 2).sum() == 32
    assert C.parse_routing("power_law:1.2", 16, 8, 2).sum() == 32
    ids = np.random.default_rng(0).integers(0, 8, size=(100, 4, 2))
    path = tmp_path / "trace.npz"
    save_trace(path, Trace(num_experts=8, topk_ids=ids))
    counts = C.parse_routing(str(path), 50, 8, 2)
    assert counts.sum() == 100 and counts.max() <= 50


@pytest.mark.parametrize("spec", ["zipf", "power_law:abc", "trace.csv"])
def test_parse_routing_rejects_unknown_specs(spec):
    with pytest.raises(InputError, match="--routing"):
        C.parse_routing(spec, 16, 8, 2)


def test_corrupt_and_mismatched_traces_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(InputError, match="not a readable .npz"):
        C.counts_from_trace(bad, 8)
    bare = tmp_path / "bare.npz"
    np.savez(bare, topk_ids=np.zeros((4, 2, 2)))
    with pytest.raises(InputError, match="no 'metadata' record"):
        C.counts_from_trace(bare, 8)
    wrong = tmp_path / "wrong.npz"
    save_trace(wrong, Trace(num_experts=16, counts=np.ones((3, 2, 16))))
    with pytest.raises(InputError, match="16 experts"):
        C.counts_from_trace(wrong, 8)


def test_random_topk_counts_every_token_k_distinct_experts_same_seed_same_counts():
    counts = C.random_topk_counts(1000, 8, 2, np.random.default_rng(3))
    assert counts.sum() == 2000 and counts.max() <= 1000
    assert np.array_equal(counts, C.random_topk_counts(1000, 8, 2, np.random.default_rng(3)))
    # balanced on average, not in one batch: each expert's count is Binomial(1000, 1/4), sd 13.7
    assert np.all(np.abs(counts - 250) < 6 * 13.7) and counts.std() > 0
    assert np.array_equal(C.random_topk_counts(5, 4, 4, np.random.default_rng(0)), [5, 5, 5, 5])
    with pytest.raises(InputError, match="top-k 3"):
        C.random_topk_counts(5, 2, 3, np.random.default_rng(0))


def test_random_routing_of_benchmark_moe_rows_fills_rank_0_only():
    from moesim.validate.compare import moe_counts

    counts = moe_counts("random", 64, 16, 2, 4, draw=1)
    assert counts.sum() == 128 and counts[4:].sum() == 0
    assert np.array_equal(counts, moe_counts("random", 64, 16, 2, 4, draw=1))
