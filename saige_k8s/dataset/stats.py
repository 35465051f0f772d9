"""Quality statistics of the kept examples, accumulated batch by batch in bounded memory."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from saige_k8s.experiences.schema import ALIGNMENT_LEVELS, DIFFICULTIES, PRINCIPLES

#: Histogram upper bounds (Prometheus-style ``le`` buckets, +Inf implied).
HARM_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0)
SCORE_BUCKETS = (5.0, 6.0, 6.5, 7.0, 7.5, 8.0, 8.5, 9.0, 9.5, 10.0)
SAMPLE_COUNT = 3


@dataclass
class _Summary:
    count: int = 0
    total: float = 0.0
    low: float = float("inf")
    high: float = float("-inf")

    def add(self, values: np.ndarray) -> None:
        values = values[~np.isnan(values)]
        if len(values):
            self.count += len(values)
            self.total += float(values.sum())
            self.low = min(self.low, float(values.min()))
            self.high = max(self.high, float(values.max()))

    def as_dict(self) -> dict[str, float | None]:
        if not self.count:
            return {"avg": None, "min": None, "max": None}
        return {"avg": self.total / self.count, "min": self.low, "max": self.high}


@dataclass
class DatasetStats:
    rows: int = 0
    harm: _Summary = field(default_factory=_Summary)
    weighted: _Summary = field(default_factory=_Summary)
    principles: dict[str, _Summary] = field(default_factory=lambda: {p: _Summary() for p in PRINCIPLES})
    response_bytes: _Summary = field(default_factory=_Summary)
    alignment: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ALIGNMENT_LEVELS, 0))
    difficulty: dict[str, int] = field(default_factory=lambda: dict.fromkeys((*DIFFICULTIES, "unknown"), 0))
    harm_histogram: np.ndarray = field(default_factory=lambda: np.zeros(len(HARM_BUCKETS) + 1, dtype=np.int64))
    weighted_histogram: np.ndarray = field(default_factory=lambda: np.zeros(len(SCORE_BUCKETS) + 1, dtype=np.int64))
    samples: list[dict[str, Any]] = field(default_factory=list)

    def add(self, batch: pa.RecordBatch) -> None:
        if not len(batch):
            return
        self.rows += len(batch)
        harm = _floats(batch, "actual_harm")
        weighted = _floats(batch, "buddhist_weighted_score")
        self.harm.add(harm)
        self.weighted.add(weighted)
        for p in PRINCIPLES:
            self.principles[p].add(_floats(batch, p))
        self.response_bytes.add(_assistant_lengths(batch))
        for key, counter in (("buddhist_alignment", self.alignment), ("difficulty", self.difficulty)):
            for value, n in zip(*value_counts(batch.column(key)), strict=True):
                label = value if value in counter else "unknown"
                counter[label] = counter.get(label, 0) + n
        self.harm_histogram += np.bincount(
            np.searchsorted(HARM_BUCKETS, harm, side="left"), minlength=len(HARM_BUCKETS) + 1
        )
        self.weighted_histogram += np.bincount(
            np.searchsorted(SCORE_BUCKETS, weighted, side="left"), minlength=len(SCORE_BUCKETS) + 1
        )
        sample_columns = ["id", "buddhist_alignment", "actual_harm", "buddhist_weighted_score", "messages", "text"]
        for row in batch.select(sample_columns).slice(0, SAMPLE_COUNT - len(self.samples)).to_pylist():
            turns = {m["role"]: m["content"] for m in row["messages"]}
            self.samples.append(
                {
                    **{k: row[k] for k in ("id", "buddhist_alignment", "actual_harm", "buddhist_weighted_score")},
                    "user": turns["user"],
                    "response": turns["assistant"],
                    "text": row["text"],
                }
            )

    def as_dict(self) -> dict[str, Any]:
        total = max(self.rows, 1)
        return {
            "rows": self.rows,
            "actual_harm": self.harm.as_dict(),
            "buddhist_weighted_score": self.weighted.as_dict(),
            "principles": {p: s.as_dict()["avg"] for p, s in self.principles.items()},
            "response_bytes": self.response_bytes.as_dict(),
            "alignment": dict(self.alignment),
            "alignment_ratio": {k: v / total for k, v in self.alignment.items()},
            "difficulty": dict(self.difficulty),
            "harm_histogram": {"le": list(HARM_BUCKETS), "counts": self.harm_histogram.tolist()},
            "weighted_histogram": {"le": list(SCORE_BUCKETS), "counts": self.weighted_histogram.tolist()},
            "samples": self.samples,
        }


def _floats(batch: pa.RecordBatch, name: str) -> np.ndarray:
    return batch.column(name).to_numpy(zero_copy_only=False).astype(float)


def _assistant_lengths(batch: pa.RecordBatch) -> np.ndarray:
    """Bytes of each row's response (the last message)."""
    messages = batch.column("messages")
    lengths = pc.binary_length(messages.flatten().field("content")).to_numpy(zero_copy_only=False)
    last = messages.offsets.to_numpy()[1:] - 1 - messages.offsets.to_numpy()[0]
    return lengths[last].astype(float)


def value_counts(values: pa.Array) -> tuple[list, list[int]]:
    """(distinct values, how often each occurs)."""
    counts = pc.value_counts(values)
    return counts.field("values").to_pylist(), counts.field("counts").to_pylist()
