"""The promotion gate: a candidate replaces the champion only if nothing it was judged on got worse.

Every test is one-sided against regressions and asks for evidence before rejecting: a noisy but
harmless retrain should not be thrown away, and a real regression on one principle should not be
hidden by gains elsewhere (each principle and component is gated on its own).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from saige_k8s.errors import ConfigError
from saige_k8s.evaluation.compare import Comparison, GroupComparison
from saige_k8s.experiences.filters import NotBool

VerdictName = Literal["promoted", "rejected"]


class GateSpec(BaseModel):
    """When a candidate counts as worse than its baseline. Defaults suit a few hundred items."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Default 0.05 (margins are per-token log-likelihood differences, so 0.05 nats is small).
    #: A group regresses when the upper end of its mean-margin delta interval is below minus this:
    #: it is then worse by more than the tolerance with 95% confidence, not merely by noise.
    margin_tolerance: Annotated[float, Field(ge=0.0), NotBool] = 0.05
    #: Default 5: an interval over fewer items is too coarse to trust (four items have 35 resampled means).
    #: Smaller principle/component groups are reported but do not gate; fewer items overall rejects
    #: (there is nothing to judge the candidate on).
    min_items: Annotated[int, Field(ge=1), NotBool] = 5
    #: Default 0.0 (no drop). The overall win rate "falls" only when both its point estimate is lower
    #: than the baseline's by more than this share and the drop is significant (exact McNemar test on
    #: the items one model wins and the other loses, p < alpha): a flip of two items is not a fall.
    max_win_rate_drop: Annotated[float, Field(ge=0.0, le=1.0), NotBool] = 0.0
    #: Default 0.05, the conventional level; only the win-rate test uses it (intervals are 95%).
    alpha: Annotated[float, Field(gt=0.0, lt=1.0), NotBool] = 0.05
    #: Default 0.02 (2%), a share: rejected when the candidate's eval loss exceeds the baseline's by
    #: more than this (loss > baseline × 1.02): overfitting shows there before margins move.
    #: Skipped when either loss is unknown (the base model of a first run has none).
    max_eval_loss_rise: Annotated[float, Field(ge=0.0, le=1.0), NotBool] = 0.02

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> GateSpec:
        """A gate from a spec's mapping, with a ConfigError naming the first bad field."""
        try:
            return cls.model_validate(dict(data or {}))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "gate"
            raise ConfigError(f"gate.{where}: {first['msg']}") from None


@dataclass(frozen=True)
class Verdict:
    """``reasons`` explain the verdict (failures when rejected, what passed when promoted)."""

    verdict: VerdictName
    reasons: list[str]
    #: What did not take part in the decision and why (too-small groups, an eval loss not compared).
    notes: list[str] = field(default_factory=list)
    #: Key figures for the history line: overall statistics, eval losses, regressed groups.
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def promoted(self) -> bool:
        return self.verdict == "promoted"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def decide(
    comparison: Comparison,
    gate: GateSpec,
    candidate_eval_loss: float | None = None,
    baseline_eval_loss: float | None = None,
) -> Verdict:
    """Promote unless some gated group regressed, the overall win rate fell, or eval loss rose."""
    level = f"{comparison.confidence * 100:g}%"
    overall = comparison.overall
    failures: list[str] = []
    notes: list[str] = []
    regressed: list[str] = []
    gated = 0

    if overall.n < gate.min_items:
        failures.append(
            f"only {overall.n} items were evaluated, fewer than min_items {gate.min_items}: too few to judge"
        )
    for group in comparison.groups():
        if group.n < gate.min_items:
            if group.kind != "overall":
                notes.append(f"{group.name} not gated: {group.n} items, fewer than min_items {gate.min_items}")
            continue
        gated += group.kind != "overall"
        if group.mean_margin_delta_ci.high < -gate.margin_tolerance:
            regressed.append(group.name)
            failures.append(f"{group.name} regressed: {_margins(group, level)}")

    win_fell = (
        overall.n >= gate.min_items
        and overall.win_rate_delta < -gate.max_win_rate_drop
        and overall.win_sign_test_p < gate.alpha
    )
    if win_fell:
        failures.append(
            f"overall win rate fell: {_wins(overall, level)}; {overall.wins_lost} items lost, "
            f"{overall.wins_gained} gained, McNemar p={_p(overall.win_sign_test_p)} < alpha {gate.alpha:g}"
        )

    loss_outcome, loss_sentence = _eval_loss(candidate_eval_loss, baseline_eval_loss, gate)
    if loss_outcome == "failed":
        failures.append(loss_sentence)
    elif loss_outcome == "skipped":
        notes.append(loss_sentence)

    figures = _figures(overall, candidate_eval_loss, baseline_eval_loss, regressed)
    if failures:
        return Verdict("rejected", failures, notes, figures)
    reasons = [
        f"overall: {_wins(overall, level)}; {_margins(overall, level)}",
        f"no principle or component regressed by more than the tolerance {gate.margin_tolerance:g} ({gated} gated)",
    ]
    if overall.win_rate_delta < -gate.max_win_rate_drop:
        reasons.append(
            f"the win-rate drop is not significant (McNemar p={_p(overall.win_sign_test_p)} ≥ alpha {gate.alpha:g})"
        )
    if loss_outcome == "passed":
        reasons.append(loss_sentence)
    return Verdict("promoted", reasons, notes, figures)


def _eval_loss(
    candidate: float | None, baseline: float | None, gate: GateSpec
) -> tuple[Literal["failed", "passed", "skipped"], str]:
    if candidate is None or baseline is None:
        missing = "candidate" if candidate is None else "baseline"
        return "skipped", f"eval loss not compared: the {missing} has none"
    if not math.isfinite(candidate):
        return "failed", f"candidate eval loss is {candidate} (training diverged)"
    if not math.isfinite(baseline) or baseline <= 0:
        return "skipped", f"eval loss not compared: the baseline's is {baseline}"
    rise = candidate / baseline - 1
    allowed = f"at most {gate.max_eval_loss_rise:+.1%} allowed"
    figures = f"{candidate:.4g} vs {baseline:.4g} ({rise:+.1%}, {allowed})"
    if candidate > baseline * (1 + gate.max_eval_loss_rise):
        return "failed", f"eval loss rose: {figures}"
    return "passed", f"eval loss {figures}"


def _margins(group: GroupComparison, level: str) -> str:
    ci = group.mean_margin_delta_ci
    return (
        f"mean margin {group.candidate_mean_margin:+.2f} vs {group.baseline_mean_margin:+.2f} "
        f"(delta {group.mean_margin_delta:+.2f}, {level} CI {ci.low:+.2f} to {ci.high:+.2f}, n={group.n})"
    )


def _wins(group: GroupComparison, level: str) -> str:
    ci = group.win_rate_delta_ci
    return (
        f"win rate {group.candidate_win_rate:.2f} vs {group.baseline_win_rate:.2f} "
        f"(delta {group.win_rate_delta:+.2f}, {level} CI {ci.low:+.2f} to {ci.high:+.2f}, n={group.n})"
    )


def _p(p: float) -> str:
    return f"{p:.2g}" if p >= 0.001 else f"{p:.1e}"


def _figures(
    overall: GroupComparison, candidate_loss: float | None, baseline_loss: float | None, regressed: list[str]
) -> dict[str, Any]:
    return {
        "n": overall.n,
        "candidate_win_rate": overall.candidate_win_rate,
        "baseline_win_rate": overall.baseline_win_rate,
        "win_rate_delta": overall.win_rate_delta,
        "win_rate_delta_ci": [overall.win_rate_delta_ci.low, overall.win_rate_delta_ci.high],
        "candidate_mean_margin": overall.candidate_mean_margin,
        "baseline_mean_margin": overall.baseline_mean_margin,
        "mean_margin_delta": overall.mean_margin_delta,
        "mean_margin_delta_ci": [overall.mean_margin_delta_ci.low, overall.mean_margin_delta_ci.high],
        "win_sign_test_p": overall.win_sign_test_p,
        "margin_sign_test_p": overall.margin_sign_test_p,
        "candidate_eval_loss": candidate_loss,
        "baseline_eval_loss": baseline_loss,
        "regressed": regressed,
    }
