"""Paired comparison of two models' margins on the same items, overall and per SAIGE group.

Both models are scored on identical items, so every statistic works on per-item differences:
pairing removes the item-to-item spread (some prompts are hard for every model) that would
otherwise swamp a small real change. Intervals come from a seeded bootstrap so that a verdict
can be reproduced exactly from the margins.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from saige_k8s.experiences.schema import HARM_COMPONENTS, PRINCIPLES

GroupKind = Literal["overall", "principle", "component"]

#: Bootstrap index matrices are drawn in blocks of about this many cells, so that memory stays
#: bounded (10,000 resamples of 50,000 items would otherwise be 4 GB of indices).
_BLOCK_CELLS = 2_000_000


@dataclass(frozen=True)
class Interval:
    """A two-sided bootstrap percentile interval."""

    low: float
    high: float

    def __contains__(self, value: float) -> bool:
        return self.low <= value <= self.high


@dataclass(frozen=True)
class GroupComparison:
    """Candidate against baseline on one group of items (all of them, or one principle/component)."""

    name: str
    kind: GroupKind
    n: int
    candidate_win_rate: float
    baseline_win_rate: float
    candidate_mean_margin: float
    baseline_mean_margin: float
    #: Mean over items of candidate margin minus baseline margin.
    mean_margin_delta: float
    mean_margin_delta_ci: Interval
    #: Candidate win rate minus baseline win rate (a win: margin > 0).
    win_rate_delta: float
    win_rate_delta_ci: Interval
    #: Items where the candidate's margin is higher / lower than the baseline's (ties excluded).
    margin_improved: int
    margin_worsened: int
    #: Exact two-sided sign test on the per-item margin differences.
    margin_sign_test_p: float
    #: Items the candidate wins and the baseline loses, and the reverse.
    wins_gained: int
    wins_lost: int
    #: Exact McNemar test (a sign test on the discordant items) for the win-rate change.
    win_sign_test_p: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Comparison:
    """Every group that has items; principles and components in schema order."""

    overall: GroupComparison
    principles: dict[str, GroupComparison] = field(default_factory=dict)
    components: dict[str, GroupComparison] = field(default_factory=dict)
    seed: int = 0
    resamples: int = 10_000
    confidence: float = 0.95

    def groups(self) -> Iterator[GroupComparison]:
        """Overall first, then principles, then components."""
        yield self.overall
        yield from self.principles.values()
        yield from self.components.values()

    def as_dict(self) -> dict[str, Any]:
        return {
            "overall": self.overall.as_dict(),
            "principles": {k: v.as_dict() for k, v in self.principles.items()},
            "components": {k: v.as_dict() for k, v in self.components.items()},
            "seed": self.seed,
            "resamples": self.resamples,
            "confidence": self.confidence,
        }


def sign_test(differences: np.ndarray | Sequence[float]) -> float:
    """Exact two-sided sign test p-value (binomial, p = 1/2); zero differences are ties and dropped.

    Exact integer arithmetic: the normal approximation is poor at the small group sizes gated here.
    """
    diffs = np.asarray(differences, dtype=float)
    return _sign_test_counts(int(np.count_nonzero(diffs > 0)), int(np.count_nonzero(diffs < 0)))


def _sign_test_counts(positive: int, negative: int) -> float:
    n = positive + negative
    if n == 0:
        return 1.0
    k = min(positive, negative)
    tail, term = 0, 1  # term = comb(n, i), updated in place (math.comb per i would be quadratic)
    for i in range(k + 1):
        tail += term
        term = term * (n - i) // (i + 1)
    return min(1.0, 2 * tail / 2**n)


def labels_from_targets(targets: Sequence[str | None]) -> tuple[list[str | None], list[str | None]]:
    """Split scenario targets (each a principle or a component) into principle and component labels."""
    principles: list[str | None] = []
    components: list[str | None] = []
    for target in targets:
        if target is not None and target not in PRINCIPLES and target not in HARM_COMPONENTS:
            raise ValueError(f"unknown scenario target {target!r}: expected one of {PRINCIPLES + HARM_COMPONENTS}")
        principles.append(target if target in PRINCIPLES else None)
        components.append(target if target in HARM_COMPONENTS else None)
    return principles, components


def paired_comparison(
    candidate: np.ndarray | Sequence[float],
    baseline: np.ndarray | Sequence[float],
    *,
    principles: Sequence[str | None] | None = None,
    components: Sequence[str | None] | None = None,
    seed: int = 0,
    resamples: int = 10_000,
    confidence: float = 0.95,
) -> Comparison:
    """Compare per-item margins of two models on the same items, in the same order.

    ``principles[i]`` / ``components[i]`` say which principle and which harm component item ``i``
    counts for (None: neither); an item may count in one of each. Mismatched lengths, unknown labels
    and non-finite margins are programming errors of the caller (ValueError), not bad user input.
    Each group's bootstrap starts from ``default_rng(seed)``: a group's interval depends only on its
    own items, not on which other groups happen to exist.
    """
    cand = np.asarray(candidate, dtype=float)
    base = np.asarray(baseline, dtype=float)
    if cand.ndim != 1 or base.ndim != 1:
        raise ValueError("margins must be one-dimensional, one value per item")
    if cand.shape != base.shape:
        raise ValueError(f"candidate has {cand.size} margins, baseline {base.size}: they must score the same items")
    if cand.size == 0:
        raise ValueError("no items to compare")
    if not (np.isfinite(cand).all() and np.isfinite(base).all()):
        raise ValueError("margins must be finite (a NaN margin means the evaluator failed on an item)")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, not {resamples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), not {confidence}")
    n = cand.size
    p_labels = _labels(principles, n, PRINCIPLES, "principles")
    c_labels = _labels(components, n, HARM_COMPONENTS, "components")

    def group(name: str, kind: GroupKind, mask: np.ndarray | None) -> GroupComparison:
        c, b = (cand, base) if mask is None else (cand[mask], base[mask])
        return _compare_group(name, kind, c, b, seed=seed, resamples=resamples, confidence=confidence)

    return Comparison(
        overall=group("overall", "overall", None),
        principles={p: group(p, "principle", p_labels == p) for p in PRINCIPLES if (p_labels == p).any()},
        components={c: group(c, "component", c_labels == c) for c in HARM_COMPONENTS if (c_labels == c).any()},
        seed=seed,
        resamples=resamples,
        confidence=confidence,
    )


def _labels(labels: Sequence[str | None] | None, n: int, allowed: Sequence[str], what: str) -> np.ndarray:
    if labels is None:
        return np.full(n, None, dtype=object)
    if len(labels) != n:
        raise ValueError(f"{what} has {len(labels)} labels for {n} items")
    unknown = sorted({str(x) for x in labels if x is not None and x not in allowed})
    if unknown:
        raise ValueError(f"unknown {what}: {', '.join(unknown)} (expected {', '.join(allowed)})")
    return np.asarray(labels, dtype=object)


def _compare_group(
    name: str,
    kind: GroupKind,
    cand: np.ndarray,
    base: np.ndarray,
    *,
    seed: int,
    resamples: int,
    confidence: float,
) -> GroupComparison:
    diff = cand - base
    cand_win = cand > 0
    base_win = base > 0
    win_diff = cand_win.astype(float) - base_win.astype(float)
    margin_ci, win_ci = _bootstrap_means((diff, win_diff), seed=seed, resamples=resamples, confidence=confidence)
    improved, worsened = int((diff > 0).sum()), int((diff < 0).sum())
    gained, lost = int((cand_win & ~base_win).sum()), int((base_win & ~cand_win).sum())
    margin_delta, win_delta = _mean(diff), _mean(win_diff)
    return GroupComparison(
        name=name,
        kind=kind,
        n=int(cand.size),
        candidate_win_rate=float(cand_win.mean()),
        baseline_win_rate=float(base_win.mean()),
        candidate_mean_margin=_mean(cand),
        baseline_mean_margin=_mean(base),
        mean_margin_delta=margin_delta,
        mean_margin_delta_ci=_contain(margin_ci, margin_delta),
        win_rate_delta=win_delta,
        win_rate_delta_ci=_contain(win_ci, win_delta),
        margin_improved=improved,
        margin_worsened=worsened,
        margin_sign_test_p=_sign_test_counts(improved, worsened),
        wins_gained=gained,
        wins_lost=lost,
        win_sign_test_p=_sign_test_counts(gained, lost),
    )


def _mean(values: np.ndarray) -> float:
    """The mean, kept within [min, max]: rounding can put the mean of n copies of 0.1 a hair below 0.1."""
    return float(np.clip(values.mean(), values.min(), values.max()))


def _contain(interval: Interval, point: float) -> Interval:
    """A percentile interval of a mean all but always holds the point estimate; make it always."""
    return Interval(min(interval.low, point), max(interval.high, point))


def _bootstrap_means(
    columns: tuple[np.ndarray, ...], *, seed: int, resamples: int, confidence: float
) -> list[Interval]:
    """Percentile intervals of each column's mean over the same item resamples (one index matrix)."""
    n = columns[0].size
    rng = np.random.default_rng(seed)
    block = max(1, _BLOCK_CELLS // n)
    means = [np.empty(resamples) for _ in columns]
    for start in range(0, resamples, block):
        stop = min(start + block, resamples)
        idx = rng.integers(0, n, size=(stop - start, n))
        for column, out in zip(columns, means, strict=True):
            out[start:stop] = column[idx].mean(axis=1)
    tail = (1 - confidence) / 2
    intervals = []
    for column, boot in zip(columns, means, strict=True):
        low, high = np.quantile(boot, [tail, 1 - tail])
        # A resampled mean lies within the values' range; rounding alone can step outside it.
        lo_bound, hi_bound = float(column.min()), float(column.max())
        intervals.append(Interval(float(np.clip(low, lo_bound, hi_bound)), float(np.clip(high, lo_bound, hi_bound))))
    return intervals
