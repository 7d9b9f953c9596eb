import pytest

from moesim.routing.fit import Targets, fit, targets_from_trace
from moesim.routing.generate import generate_tokens
from moesim.routing.profile import RoutingProfile


def test_round_trip_recovers_known_parameters():
    truth = RoutingProfile(num_experts=16, top_k=2, num_layers=4, skew=0.9, locality=0.35, affinity=0.4, seq_len=4096)
    recorded = generate_tokens(truth, 20_000, seed=123)  # the "recorded" trace: another seed than the fit's
    targets = targets_from_trace(recorded, 16, batch=256, cache_sizes=(4,))
    result = fit(RoutingProfile(num_experts=16, top_k=2, num_layers=4, seq_len=4096), targets, tokens=10_000, seed=7)
    assert result.profile.skew == pytest.approx(0.9, abs=0.1)
    assert result.profile.locality == pytest.approx(0.35, abs=0.05)
    assert result.profile.affinity == pytest.approx(0.4, abs=0.05)
    for _, target, achieved in result.table():
        assert achieved == pytest.approx(target, rel=0.02)


def test_fit_to_published_style_targets():
    result = fit(RoutingProfile(num_experts=8, top_k=2, num_layers=2), Targets(imbalance=1.5, batch=256, hit_rate={4: 0.7}),
                 tokens=8000)
    assert result.achieved["imbalance"] == pytest.approx(1.5, rel=0.02)
    assert result.achieved["hit_rate@4"] == pytest.approx(0.7, abs=0.01)
    with pytest.raises(ValueError, match="no target"):
        fit(RoutingProfile(num_experts=8, top_k=2, num_layers=2), Targets())
