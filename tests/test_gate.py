"""The comparison statistics against known answers, and the promotion gate's decisions."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from saige_k8s.errors import ConfigError
from saige_k8s.evaluation.compare import labels_from_targets, paired_comparison, sign_test
from saige_k8s.evaluation.gate import GateSpec, decide
from saige_k8s.experiences.schema import HARM_COMPONENTS, PRINCIPLES

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


# --- the gate ------------------------------------------------------------------------------------

N_PER_PRINCIPLE = 30


def _items(shift: dict[str, float] | None = None, *, noise: float = 0.05, seed: int = 0):
    """Baseline margins well away from zero; the candidate shifted per principle (default +0.1)."""
    rng = np.random.default_rng(seed)
    principles = [p for p in PRINCIPLES for _ in range(N_PER_PRINCIPLE)]
    components = [HARM_COMPONENTS[i % len(HARM_COMPONENTS)] for i in range(len(principles))]
    base = rng.choice([-1.0, 1.0], len(principles)) * rng.uniform(0.5, 1.5, len(principles))
    deltas = np.array([(shift or {}).get(p, 0.1) for p in principles])
    cand = base + deltas + rng.normal(0, noise, len(principles))
    return cand, base, principles, components


def _compare(cand, base, principles=None, components=None):
    return paired_comparison(cand, base, principles=principles, components=components, resamples=2000)


def test_better_everywhere_is_promoted_with_the_reasons() -> None:
    cand, base, principles, components = _items()
    verdict = decide(_compare(cand, base, principles, components), GateSpec(), 1.10, 1.15)
    assert verdict.verdict == "promoted", verdict.reasons
    assert verdict.reasons[0].startswith("overall: win rate ")
    assert f"(delta {verdict.figures['mean_margin_delta']:+.2f}, 95% CI +0.09 to +0.10, n=150)" in verdict.reasons[0]
    assert verdict.figures["mean_margin_delta"] == pytest.approx(0.1, abs=0.01)
    assert "no principle or component regressed by more than the tolerance 0.05 (9 gated)" in verdict.reasons
    assert verdict.reasons[-1].startswith("eval loss 1.1 vs 1.15 (-4.3%")
    assert verdict.notes == []
    assert verdict.figures["n"] == 150
    assert verdict.figures["regressed"] == []
    json.dumps(verdict.as_dict())


def test_worse_on_one_principle_is_rejected_naming_it() -> None:
    cand, base, principles, components = _items({"karuna": -0.25})
    verdict = decide(_compare(cand, base, principles, components), GateSpec(), None, None)
    assert verdict.verdict == "rejected"
    assert len(verdict.reasons) == 1, verdict.reasons
    assert verdict.reasons[0].startswith("karuna regressed: mean margin ")
    assert re.search(r"\(delta -0\.2\d, 95% CI -0\.2\d to -0\.2\d, n=30\)$", verdict.reasons[0]), verdict.reasons
    assert verdict.reasons[0].endswith(", n=30)")
    assert verdict.figures["regressed"] == ["karuna"]
    assert verdict.notes == ["eval loss not compared: the candidate has none"]


def test_reason_format_matches_the_documented_example() -> None:
    base = np.full(14, 0.04)
    cand = base + np.linspace(-0.38, -0.12, 14)
    verdict = decide(_compare(cand, base, ["karuna"] * 14), GateSpec())
    reason = verdict.reasons[verdict.figures["regressed"].index("karuna")]
    assert reason.startswith("karuna regressed: mean margin -0.21 vs +0.04 (delta -0.25, 95% CI ")
    assert reason.endswith(", n=14)")


def test_worse_but_within_tolerance_passes() -> None:
    cand, base, principles, components = _items({p: -0.03 for p in PRINCIPLES}, noise=0.01)
    comparison = _compare(cand, base, principles, components)
    assert comparison.overall.mean_margin_delta_ci.high < 0  # significantly worse, but by less than 0.05
    verdict = decide(comparison, GateSpec(), None, None)
    assert verdict.verdict == "promoted", verdict.reasons
    # The same regression under a zero tolerance rejects, naming every principle and the overall.
    strict = decide(comparison, GateSpec(margin_tolerance=0.0))
    assert strict.verdict == "rejected"
    assert strict.figures["regressed"][:6] == ["overall", *PRINCIPLES]


def test_a_too_small_group_does_not_gate() -> None:
    cand, base, principles, components = _items()
    small = [p if p != "upekkha" else None for p in principles]
    small[-4:] = ["upekkha"] * 4
    cand[-4:] = base[-4:] - 1.0  # upekkha keeps four items, all far worse
    verdict = decide(_compare(cand, base, small, components), GateSpec())
    assert verdict.verdict == "promoted", verdict.reasons
    assert "upekkha not gated: 4 items, fewer than min_items 5" in verdict.notes
    rejected = decide(_compare(cand, base, small, components), GateSpec(min_items=4))
    assert rejected.verdict == "rejected"
    assert rejected.reasons[0].startswith("upekkha regressed:")


def test_too_few_items_overall_rejects() -> None:
    verdict = decide(_compare([1.0, 1.0, 1.0], [0.5, 0.5, 0.5]), GateSpec())
    assert verdict.verdict == "rejected"
    assert verdict.reasons == ["only 3 items were evaluated, fewer than min_items 5: too few to judge"]


def test_eval_loss_rise_rejects() -> None:
    cand, base, principles, components = _items()
    comparison = _compare(cand, base, principles, components)
    verdict = decide(comparison, GateSpec(), 1.25, 1.20)
    assert verdict.verdict == "rejected"
    assert verdict.reasons == ["eval loss rose: 1.25 vs 1.2 (+4.2%, at most +2.0% allowed)"]
    assert decide(comparison, GateSpec(), 1.22, 1.20).verdict == "promoted"  # +1.7%
    assert decide(comparison, GateSpec(max_eval_loss_rise=0.05), 1.25, 1.20).verdict == "promoted"
    assert decide(comparison, GateSpec(), float("nan"), 1.20).reasons == [
        "candidate eval loss is nan (training diverged)"
    ]
    skipped = decide(comparison, GateSpec(), 1.25, None)
    assert skipped.verdict == "promoted"
    assert skipped.notes == ["eval loss not compared: the baseline has none"]


def test_win_rate_drop_rejects_only_when_significant() -> None:
    rng = np.random.default_rng(5)
    n = 200
    base = rng.uniform(0.05, 0.3, n)  # the baseline wins every item
    # The candidate's margins grow on average (no margin regression) but it loses 30 items.
    cand = base + 0.5
    cand[:30] = -0.01
    comparison = _compare(cand, base)
    assert comparison.overall.mean_margin_delta_ci.low > 0
    verdict = decide(comparison, GateSpec())
    assert verdict.verdict == "rejected"
    assert len(verdict.reasons) == 1
    assert verdict.reasons[0].startswith("overall win rate fell: win rate 0.85 vs 1.00 (delta -0.15, 95% CI ")
    assert "30 items lost, 0 gained, McNemar p=1.9e-09 < alpha 0.05" in verdict.reasons[0]
    # A drop within the allowed share passes; so does a drop that is not significant.
    assert decide(comparison, GateSpec(max_win_rate_drop=0.2)).verdict == "promoted"
    cand[2:30] = base[2:30] + 0.5
    few = decide(_compare(cand, base), GateSpec())
    assert few.verdict == "promoted"
    assert "the win-rate drop is not significant (McNemar p=0.5 ≥ alpha 0.05)" in few.reasons


def test_gate_spec_defaults_and_validation() -> None:
    gate = GateSpec()
    assert (gate.margin_tolerance, gate.min_items, gate.max_win_rate_drop, gate.alpha, gate.max_eval_loss_rise) == (
        0.05,
        5,
        0.0,
        0.05,
        0.02,
    )
    with pytest.raises(ValidationError):
        GateSpec(margin_tolerance=-0.1)
    with pytest.raises(ValidationError):
        gate.alpha = 0.1  # frozen
    for bad, message in [
        ({"alpha": 0}, "gate.alpha: Input should be greater than 0"),
        ({"alpha": 1.0}, "gate.alpha: Input should be less than 1"),
        ({"min_items": 0}, "gate.min_items: Input should be greater than or equal to 1"),
        ({"max_win_rate_drop": 1.5}, "gate.max_win_rate_drop: Input should be less than or equal to 1"),
        ({"max_eval_loss_rise": -0.01}, "gate.max_eval_loss_rise: Input should be greater than or equal to 0"),
        ({"margin_tolerance": True}, "gate.margin_tolerance: Value error, expected a number, not a boolean"),
        ({"min_items": False}, "gate.min_items: Value error, expected a number, not a boolean"),
        ({"tolerance": 0.1}, "gate.tolerance: Extra inputs are not permitted"),
    ]:
        with pytest.raises(ConfigError) as info:
            GateSpec.from_mapping(bad)
        assert str(info.value) == message
    assert GateSpec.from_mapping({"min_items": 10}).min_items == 10
    assert GateSpec.from_mapping(None) == GateSpec()


def test_evaluation_imports_no_torch() -> None:
    code = (
        "import sys, saige_k8s.evaluation.compare, saige_k8s.evaluation.gate, saige_k8s.evaluation.champion; "
        "heavy = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    root = Path(__file__).parent.parent
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(root)})
