"""The presets' routing profiles: every preset has one, the bundled fits are what the fitting
script measured, and the Mixtral repetition statistics behave as the paper's table defines."""

import numpy as np
import pytest

from moesim.models.presets import list_presets, load_model
from moesim.routing import stats
from moesim.routing.fit import Targets, measure
from moesim.routing.generate import generate_tokens
from moesim.routing.profile import PROFILES_DIR, model_profile

FITTED = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


@pytest.mark.parametrize("name", [n for n in list_presets() if load_model(n).is_moe])
def test_every_moe_preset_has_a_profile_of_its_shape(name):
    arch = load_model(name)
    profile = model_profile(arch)
    assert (profile.num_experts, profile.top_k, profile.num_layers) == (arch.moe.num_experts, arch.moe.top_k, len(arch.moe_layers))
    assert profile.source, "a profile says what it was fitted to, or that it was not"
    if name not in FITTED:
        assert profile.source.startswith("not fitted")


def test_deepseek_v3_profile_keeps_group_limited_routing():
    profile = model_profile(load_model("deepseek-v3"))
    assert (profile.algorithm, profile.n_group, profile.topk_group) == ("group_limited", 8, 4)
    assert "borrows the fit of deepseek-v2-lite" in profile.source


@pytest.mark.parametrize("name", FITTED)
def test_fitted_statistics_lie_near_their_published_targets(name):
    profile = model_profile(load_model(name))
    fitted = {k: r for k, r in profile.fitted_to.items() if not r.held_out}
    if not fitted:  # a borrowed fit
        assert "borrows the fit of" in profile.source
        return
    for key, record in fitted.items():
        assert record.achieved == pytest.approx(record.target, rel=0.12), key


def test_bundled_mixtral_fit_is_reproduced_by_the_generator():
    # The fitting script evaluates candidates on 20,000 tokens of four MoE layers, seed 0.
    profile = model_profile(load_model("mixtral-8x7b"))
    ids = generate_tokens(profile.model_copy(update={"num_layers": 4}), 20_000, seed=0)
    targets = Targets(srp={16: 0.0}, sch={2: 0.0}, first_choice_repeat=0.0, overlap_rate=0.0)
    got = measure(ids, profile.num_experts, targets)
    for key, value in got.items():
        assert value == pytest.approx(profile.fitted_to[key].achieved, abs=0.01), key


def test_repetition_rates_match_the_random_baselines_of_mixtral_table5():
    # Jiang et al. (2024), Table 5: 1/8 for the first choice, 1 - (6/8)(5/7) for either choice
    profile = model_profile(load_model("mixtral-8x7b")).model_copy(update={"skew": 0.0, "locality": 0.0, "num_layers": 2})
    ids = generate_tokens(profile, 50_000, seed=3)
    assert stats.first_choice_repeat(ids) == pytest.approx(np.full(2, 1 / 8), abs=0.01)
    assert stats.overlap_rate(ids) == pytest.approx(np.full(2, 1 - 6 / 8 * 5 / 7), abs=0.01)
