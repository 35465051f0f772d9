"""The comparison statistics against known answers, and the promotion gate's decisions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from saige_k8s.evaluation.compare import labels_from_targets, paired_comparison, sign_test

# --- sign test -----------------------------------------------------------------------------------


def test_sign_test_nine_of_ten_is_exactly_22_over_1024() -> None:
    assert sign_test([1.0] * 9 + [-1.0]) == 22 / 1024 == 0.021484375
    assert sign_test([-0.5] * 9 + [0.5]) == 0.021484375


def test_sign_test_balanced_and_ties() -> None:
    assert sign_test([1.0] * 5 + [-1.0] * 5) == 1.0
    assert sign_test([0.0] * 10) == 1.0
    assert sign_test([]) == 1.0
    # Ties are dropped, not counted: 9 of 10 non-zero plus any number of zeros.
    assert sign_test([1.0] * 9 + [-1.0] + [0.0] * 7) == 0.021484375


def test_sign_test_extremes_and_large_n() -> None:
    assert sign_test([1.0] * 10) == 2 / 1024
    assert sign_test([1.0]) == 1.0
    # Large n stays exact integer arithmetic and does not overflow.
    p = sign_test([1.0] * 2600 + [-1.0] * 2400)
    assert 0.0 < p < 0.01


# --- bootstrap -----------------------------------------------------------------------------------


def test_bootstrap_is_deterministic_per_seed() -> None:
    rng = np.random.default_rng(1)
    cand, base = rng.normal(0.1, 1, 60), rng.normal(0, 1, 60)
    first = paired_comparison(cand, base, seed=7, resamples=2000)
    again = paired_comparison(cand, base, seed=7, resamples=2000)
    other = paired_comparison(cand, base, seed=8, resamples=2000)
    assert first == again
    assert first.overall.mean_margin_delta_ci != other.overall.mean_margin_delta_ci
    assert first.overall.mean_margin_delta == other.overall.mean_margin_delta


@pytest.mark.parametrize("d", [0.25, 0.1, -0.3, 0.0])
def test_constant_difference_gives_a_point_interval(d: float) -> None:
    exact = paired_comparison(np.full(40, d), np.zeros(40), resamples=500).overall
    assert exact.mean_margin_delta == d
    assert (exact.mean_margin_delta_ci.low, exact.mean_margin_delta_ci.high) == (d, d)


def test_bootstrap_width_matches_normal_theory() -> None:
    rng = np.random.default_rng(42)
    n, sigma, mu = 4000, 1.5, 0.2
    base = rng.normal(0, 1, n)
    cand = base + rng.normal(mu, sigma, n)
    result = paired_comparison(cand, base, seed=3, resamples=4000).overall
    ci = result.mean_margin_delta_ci
    assert mu in ci
    expected = 2 * 1.96 * sigma / np.sqrt(n)
    assert abs((ci.high - ci.low) - expected) / expected < 0.10


@pytest.mark.parametrize("seed", range(12))
def test_interval_holds_the_point_estimate(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 40))
    maker = [rng.normal, rng.standard_cauchy, rng.exponential][seed % 3]
    base = rng.normal(0, 1, n)
    cand = base + maker(size=n) * rng.choice([-1, 1])
    result = paired_comparison(cand, base, seed=seed, resamples=300)
    for g in result.groups():
        assert g.mean_margin_delta_ci.low <= g.mean_margin_delta <= g.mean_margin_delta_ci.high
        assert g.win_rate_delta_ci.low <= g.win_rate_delta <= g.win_rate_delta_ci.high
        assert -1.0 <= g.win_rate_delta_ci.low <= g.win_rate_delta_ci.high <= 1.0


def test_large_inputs_are_drawn_in_blocks_with_bounded_memory() -> None:
    rng = np.random.default_rng(0)
    cand, base = rng.normal(0, 1, 30_000), rng.normal(0, 1, 30_000)
    result = paired_comparison(cand, base, resamples=1000).overall
    assert result.n == 30_000
    assert result.mean_margin_delta in result.mean_margin_delta_ci


# --- groups and figures --------------------------------------------------------------------------


def test_groups_figures_and_json() -> None:
    cand = np.array([0.5, 0.2, -0.1, 0.4, 0.3, -0.2])
    base = np.array([0.1, -0.3, -0.2, 0.5, -0.1, 0.1])
    principles = ["karuna", "karuna", "sacca", None, "karuna", "sacca"]
    components = [None, "harshness", "harshness", "deception", None, None]
    result = paired_comparison(cand, base, principles=principles, components=components, resamples=200)
    assert list(result.principles) == ["sacca", "karuna"]  # schema order, only groups with items
    assert list(result.components) == ["deception", "harshness"]
    karuna = result.principles["karuna"]
    assert karuna.n == 3
    assert karuna.candidate_win_rate == 1.0
    assert karuna.baseline_win_rate == pytest.approx(1 / 3)
    assert karuna.candidate_mean_margin == pytest.approx(1.0 / 3)
    assert karuna.mean_margin_delta == pytest.approx((0.4 + 0.5 + 0.4) / 3)
    assert karuna.win_rate_delta == pytest.approx(2 / 3)
    assert (karuna.wins_gained, karuna.wins_lost) == (2, 0)
    overall = result.overall
    assert overall.n == 6
    assert (overall.margin_improved, overall.margin_worsened) == (4, 2)
    assert overall.margin_sign_test_p == sign_test(cand - base)
    assert [g.name for g in result.groups()] == ["overall", "sacca", "karuna", "deception", "harshness"]
    as_json = json.loads(json.dumps(result.as_dict()))
    assert as_json["principles"]["karuna"]["mean_margin_delta_ci"].keys() == {"low", "high"}
    assert as_json["overall"]["n"] == 6


def test_scenario_targets_split_into_principles_and_components() -> None:
    principles, components = labels_from_targets(["karuna", "deception", None])
    assert principles == ["karuna", None, None]
    assert components == [None, "deception", None]
    with pytest.raises(ValueError, match="unknown scenario target 'kindness'"):
        labels_from_targets(["kindness"])


def test_bad_inputs_are_value_errors() -> None:
    with pytest.raises(ValueError, match="candidate has 3 margins, baseline 2"):
        paired_comparison([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="no items"):
        paired_comparison([], [])
    with pytest.raises(ValueError, match="finite"):
        paired_comparison([1.0, float("nan")], [0.0, 0.0])
    with pytest.raises(ValueError, match="principles has 1 labels for 2 items"):
        paired_comparison([1, 2], [0, 0], principles=["karuna"])
    with pytest.raises(ValueError, match="unknown components: kindness"):
        paired_comparison([1, 2], [0, 0], components=["kindness", None])
