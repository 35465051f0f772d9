"""Prometheus metrics of a step, derived from what the step wrote (the manifest).

Batch jobs do not live long enough to be scraped: each step pushes its group to a
Pushgateway (grouping key ``job`` + ``pipeline``, no ``instance``, replace semantics) when
one is configured, and always writes the same series as ``metrics.prom`` next to its
output. Every value comes from the manifest, so Prometheus and the manifest cannot disagree.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest, push_to_gateway
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

PUSHGATEWAY_ENV = "SAIGE_PUSHGATEWAY_URL"
TEXTFILE = "metrics.prom"
EXTRACT_JOB = "saige-extract"


class ExtractionCollector(Collector):
    """The extraction's series, from its manifest: low cardinality, ids only in ``_info``."""

    def __init__(self, manifest: dict[str, Any], finished_at: float) -> None:
        self.manifest = manifest
        self.finished_at = finished_at

    def collect(self) -> Iterator[Metric]:
        m = self.manifest
        counts, stats, source = m["counts"], m["stats"], m["source_stats"]

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=value)

        yield counter(
            "saige_extract_rows_scanned",
            "Rows of the experiences table judged by the last extraction.",
            counts["scanned"],
        )
        yield counter(
            "saige_extract_rows_kept", "Rows kept as training examples by the last extraction.", counts["kept"]
        )
        yield counter(
            "saige_extract_rows_duplicate", "Exact duplicates removed by the last extraction.", counts["duplicates"]
        )
        yield _labelled(
            CounterMetricFamily,
            "saige_extract_rows_invalid",
            "Unusable rows by reason (last extraction).",
            "reason",
            m["invalid"],
        )
        yield _labelled(
            CounterMetricFamily,
            "saige_extract_rows_removed",
            "Rows removed by each filter (last extraction).",
            "filter",
            m["removed"],
        )
        yield _labelled(
            GaugeMetricFamily,
            "saige_dataset_examples",
            "Examples in the newest dataset by split.",
            "split",
            {"train": counts["train"], "eval": counts["eval"]},
        )
        for key, name, doc in (
            ("actual_harm", "saige_dataset_harm", "Harm score (0-1) of the kept examples."),
            (
                "buddhist_weighted_score",
                "saige_dataset_weighted_score",
                "Weighted Buddhist score (0-10) of kept examples.",
            ),
        ):
            summary = stats[key]
            histogram = stats["harm_histogram" if key == "actual_harm" else "weighted_histogram"]
            cumulative, buckets = 0, []
            for bound, n in zip([*histogram["le"], "+Inf"], histogram["counts"], strict=True):
                cumulative += n
                buckets.append((str(bound), cumulative))
            total = (summary["avg"] or 0.0) * stats["rows"]
            yield HistogramMetricFamily(name, doc, buckets=buckets, sum_value=total)
            yield GaugeMetricFamily(f"{name}_mean", f"Mean of {name}.", value=summary["avg"] or 0.0)
        yield _labelled(
            GaugeMetricFamily,
            "saige_dataset_principle_mean",
            "Mean principle score (0-10) of kept examples.",
            "principle",
            stats["principles"],
        )
        yield _labelled(
            GaugeMetricFamily,
            "saige_dataset_alignment_ratio",
            "Share of kept examples per alignment label.",
            "alignment",
            stats["alignment_ratio"],
        )
        yield GaugeMetricFamily("saige_source_rows", "Rows in the experiences table.", value=source["rows"])
        yield GaugeMetricFamily(
            "saige_source_harm_mean", "Mean harm of all experiences (usable values).", value=source["mean_harm"] or 0.0
        )
        yield GaugeMetricFamily(
            "saige_source_weighted_score_mean",
            "Mean stored weighted score of all experiences.",
            value=source["mean_weighted_score"] or 0.0,
        )
        yield _labelled(
            GaugeMetricFamily,
            "saige_source_alignment_ratio",
            "Share of all experiences per label.",
            "alignment",
            source["alignment_ratio"],
        )
        yield GaugeMetricFamily(
            "saige_extract_duration_seconds", "Wall time of the last extraction.", value=m["duration_seconds"]
        )
        yield GaugeMetricFamily(
            "saige_extract_rows_per_second",
            "Scanned rows per second of the last extraction.",
            value=m["rows_per_second"] or 0.0,
        )
        yield GaugeMetricFamily(
            "saige_extract_last_success_timestamp_seconds",
            "When an extraction last published a dataset.",
            value=self.finished_at,
        )
        info = GaugeMetricFamily("saige_dataset_info", "The newest dataset (value 1).", labels=["dataset_id", "format"])
        info.add_metric([m["dataset_id"], m["format"]], 1)
        yield info


def _labelled(kind: type, name: str, doc: str, label: str, values: dict[str, float | None]) -> Metric:
    """One family with a sample per key of ``values`` (None, an undefined ratio, reads as 0)."""
    family = kind(name, doc, labels=[label])
    for key, value in values.items():
        family.add_metric([key], value or 0.0)
    return family


def extraction_registry(manifest: dict[str, Any], finished_at: float | None = None) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ExtractionCollector(manifest, time.time() if finished_at is None else finished_at))
    return registry


def write_textfile(registry: CollectorRegistry, directory: Path) -> Path:
    """``directory/metrics.prom``, replaced atomically."""
    target = directory / TEXTFILE
    tmp = directory / f".{TEXTFILE}.{os.getpid()}"
    tmp.write_bytes(generate_latest(registry))
    os.replace(tmp, target)
    return target


def push(registry: CollectorRegistry, gateway: str | None, job: str, pipeline: str) -> bool:
    """Replace this job's group on the Pushgateway; a failure is a warning, never the step's failure."""
    if not gateway:
        return False
    try:
        push_to_gateway(gateway, job=job, grouping_key={"pipeline": pipeline}, registry=registry, timeout=10)
    except Exception as exc:  # noqa: BLE001 - urllib raises several types; none may fail the step
        log.warning("could not push metrics to the Pushgateway: %s", str(exc).splitlines()[0] if str(exc) else exc)
        return False
    return True
