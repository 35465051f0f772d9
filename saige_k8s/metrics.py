"""Prometheus metrics of a step, derived from what the step wrote (manifest, metrics.json).

Batch jobs do not live long enough to be scraped: each step pushes its group to a
Pushgateway (grouping key ``job`` + ``pipeline``, no ``instance``, replace semantics) when
one is configured, and always writes the same series as ``metrics.prom`` next to its
output. Every value comes from the step's own record (the dataset manifest, the run's
``metrics.json``), so Prometheus and those files cannot disagree.

Groups: ``saige-extract`` (the extract step), ``saige-train`` (the train step, rank 0) and
``saige-pipeline`` (whoever orchestrates a run: the local runner, later the controller).
The pipeline group is replaced (PUT) after a successful run; after a failed one it is
updated (POST), which leaves ``saige_pipeline_last_success_timestamp_seconds`` of the last
success in place.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest, push_to_gateway, pushadd_to_gateway
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

PUSHGATEWAY_ENV = "SAIGE_PUSHGATEWAY_URL"
TEXTFILE = "metrics.prom"
EXTRACT_JOB = "saige-extract"
TRAIN_JOB = "saige-train"
EVALUATE_JOB = "saige-evaluate"
PIPELINE_JOB = "saige-pipeline"
LAST_SUCCESS = "saige_pipeline_last_success_timestamp_seconds"


class ExtractionCollector(Collector):
    """The extraction's series, from its manifest: low cardinality, ids only in ``_info``."""

    def __init__(self, manifest: dict[str, Any], finished_at: float, min_examples: int | None = None) -> None:
        self.manifest = manifest
        self.finished_at = finished_at
        self.min_examples = min_examples

    def collect(self) -> Iterator[Metric]:
        m = self.manifest
        counts, stats, source = m["counts"], m["stats"], m["source_stats"]

        # Per-run values (each run replaces the last), so gauges: a counter that "resets" on
        # every push reads as restarts to rate() and increase().
        yield GaugeMetricFamily(
            "saige_extract_rows_scanned",
            "Rows of the experiences table judged by the last extraction.",
            value=counts["scanned"],
        )
        yield GaugeMetricFamily(
            "saige_extract_rows_kept", "Rows kept as training examples by the last extraction.", value=counts["kept"]
        )
        yield GaugeMetricFamily(
            "saige_extract_rows_duplicate",
            "Exact duplicates removed by the last extraction.",
            value=counts["duplicates"],
        )
        yield _labelled(
            GaugeMetricFamily,
            "saige_extract_rows_invalid",
            "Unusable rows by reason (last extraction).",
            "reason",
            m["invalid"],
        )
        yield _labelled(
            GaugeMetricFamily,
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
        yield _labelled(
            GaugeMetricFamily,
            "saige_dataset_pairs",
            "Preference pairs in the newest dataset by split.",
            "split",
            m.get("pairs") or {"train": 0, "eval": 0},
        )
        if self.min_examples is not None:
            yield GaugeMetricFamily(
                "saige_dataset_min_examples",
                "Examples a dataset needs before training runs (the spec's extract.min_examples).",
                value=self.min_examples,
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


def extraction_registry(
    manifest: dict[str, Any], finished_at: float | None = None, min_examples: int | None = None
) -> CollectorRegistry:
    """The extraction's series; ``min_examples`` (the spec's) adds ``saige_dataset_min_examples``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ExtractionCollector(manifest, time.time() if finished_at is None else finished_at, min_examples))
    return registry


#: metrics.json key -> (gauge, help). A key that is absent or null gives no series.
TRAINING_GAUGES = {
    "train_loss": ("saige_train_loss", "Training loss, mean over the last logging window."),
    "eval_loss": ("saige_train_eval_loss", "Eval loss after training."),
    "eval_loss_before": ("saige_train_initial_eval_loss", "Eval loss before training (the untrained adapter)."),
    "tokens_per_second": (
        "saige_train_tokens_per_second",
        "Training tokens (not padding) per second of training wall time, all processes.",
    ),
    "train_seconds": ("saige_train_duration_seconds", "Wall time of the training loop (this process's run)."),
    "trainable_parameters": ("saige_train_trainable_parameters", "Trainable (LoRA) parameters."),
    "parameters": ("saige_train_parameters", "All parameters of the model, adapter included."),
    "steps": ("saige_train_steps", "Optimizer steps done."),
    "train_examples": ("saige_train_examples", "Training examples."),
}


class TrainingCollector(Collector):
    """The train step's series, from its ``metrics.json``; ids only in ``saige_train_info``."""

    def __init__(self, metrics: dict[str, Any], finished_at: float) -> None:
        self.metrics = metrics
        self.finished_at = finished_at

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        for key, (name, doc) in TRAINING_GAUGES.items():
            if m.get(key) is not None:
                yield GaugeMetricFamily(name, doc, value=float(m[key]))
        yield GaugeMetricFamily(
            "saige_train_last_success_timestamp_seconds", "When a training run last finished.", value=self.finished_at
        )
        yield from _preference_series(m)
        info = GaugeMetricFamily(
            "saige_train_info",
            "The newest trained run (value 1).",
            labels=["base_model", "dataset_id", "run_id", "method"],
        )
        ids = [str(m.get(key) or "") for key in ("base_model", "dataset_id", "run_id")]
        info.add_metric([*ids, str(m.get("method") or "sft")], 1)
        yield info


def _preference_series(m: dict[str, Any]) -> Iterator[Metric]:
    """dpo/kto: their rewards (β × log-ratio against the base) on train (last window) and eval."""
    last = m["log"][-1] if m.get("log") else {}
    splits = {"train": last, "eval": m.get("eval_preference") or {}}
    rewards = GaugeMetricFamily(
        "saige_train_rewards",
        "dpo/kto: mean implied reward of the chosen (desirable) and rejected (undesirable) answers, and their margin.",
        labels=["kind", "split"],
    )
    accuracy = GaugeMetricFamily(
        "saige_train_reward_accuracy",
        "dpo: share of pairs whose chosen answer has the higher reward; kto: share of answers on their side.",
        labels=["split"],
    )
    for split, figures in splits.items():
        for kind in ("chosen", "rejected", "margins"):
            if figures.get(f"rewards/{kind}") is not None:
                rewards.add_metric([kind, split], float(figures[f"rewards/{kind}"]))
        if figures.get("rewards/accuracy") is not None:
            accuracy.add_metric([split], float(figures["rewards/accuracy"]))
    if rewards.samples:
        yield rewards
    if accuracy.samples:
        yield accuracy
    if (m.get("eval_preference") or {}).get("loss") is not None:
        yield GaugeMetricFamily(
            "saige_train_eval_preference_loss",
            "dpo/kto: the method's own loss on the eval split after training.",
            value=float(m["eval_preference"]["loss"]),
        )


def training_registry(metrics: dict[str, Any], finished_at: float | None = None) -> CollectorRegistry:
    """The train step's series; the timestamp is ``metrics.json``'s ``finished_at`` when it has one."""
    when = finished_at if finished_at is not None else metrics.get("finished_at")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TrainingCollector(metrics, time.time() if when is None else float(when)))
    return registry


class PipelineCollector(Collector):
    def __init__(self, succeeded: bool, started: float, finished: float, last_success: float | None) -> None:
        self.succeeded, self.started, self.finished, self.last_success = succeeded, started, finished, last_success

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "saige_pipeline_last_run_timestamp_seconds", "When the last pipeline run finished.", value=self.finished
        )
        yield GaugeMetricFamily(
            "saige_pipeline_last_run_success",
            "1 if the last pipeline run succeeded, 0 if it failed.",
            value=1 if self.succeeded else 0,
        )
        yield GaugeMetricFamily(
            "saige_pipeline_last_run_duration_seconds",
            "Wall time of the last pipeline run.",
            value=max(0.0, self.finished - self.started),
        )
        if self.last_success is not None:
            yield GaugeMetricFamily(LAST_SUCCESS, "When a pipeline run last succeeded.", value=self.last_success)


def pipeline_registry(
    succeeded: bool, started: float, finished: float, last_success: float | None = None
) -> CollectorRegistry:
    """A run's pipeline series (epoch seconds). The last-success timestamp is ``finished`` for a
    success; for a failure, ``last_success`` when given (an earlier success), else absent."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PipelineCollector(succeeded, started, finished, finished if succeeded else last_success))
    return registry


def push_pipeline_result(pipeline: str, gateway: str | None, succeeded: bool, started: float, finished: float) -> None:
    """Push a finished run's pipeline group: PUT (replace) after a success; POST after a failure,
    so the Pushgateway keeps the previous ``saige_pipeline_last_success_timestamp_seconds``.
    A failed push is a warning, never an exception."""
    push(pipeline_registry(succeeded, started, finished), gateway, PIPELINE_JOB, pipeline, replace=succeeded)


class EvaluationCollector(Collector):
    """The evaluate step's series, from its ``eval.json``: per group, both models' figures."""

    def __init__(self, result: dict[str, Any], finished_at: float, champion_since: float | None) -> None:
        self.result = result
        self.finished_at = finished_at
        self.champion_since = champion_since

    def collect(self) -> Iterator[Metric]:
        r = self.result
        comparison = r["comparison"]
        groups = [
            ("overall", "overall", comparison["overall"]),
            *(("principle", name, g) for name, g in comparison["principles"].items()),
            *(("component", name, g) for name, g in comparison["components"].items()),
        ]
        by_model = ["kind", "group", "model"]
        win = GaugeMetricFamily(
            "saige_eval_win_rate", "Share of items whose better answer is more likely.", labels=by_model
        )
        margin = GaugeMetricFamily(
            "saige_eval_mean_margin",
            "Mean log-likelihood margin per token, better minus worse answer.",
            labels=by_model,
        )
        delta = GaugeMetricFamily(
            "saige_eval_margin_delta",
            "Paired mean margin, candidate minus baseline.",
            labels=["kind", "group", "bound"],
        )
        items = GaugeMetricFamily("saige_eval_items", "Items compared.", labels=["kind", "group"])
        for kind, name, g in groups:
            for model in ("candidate", "baseline"):
                win.add_metric([kind, name, model], g[f"{model}_win_rate"])
                margin.add_metric([kind, name, model], g[f"{model}_mean_margin"])
            interval = g["mean_margin_delta_ci"]
            for bound, value in (
                ("point", g["mean_margin_delta"]),
                ("lower", interval["low"]),
                ("upper", interval["high"]),
            ):
                delta.add_metric([kind, name, bound], value)
            items.add_metric([kind, name], g["n"])
        yield from (win, margin, delta, items)
        loss = GaugeMetricFamily("saige_eval_loss", "Eval loss on the dataset's eval split.", labels=["model"])
        for model, value in r["eval_loss"].items():
            if value is not None:
                loss.add_metric([model], value)
        yield loss
        verdict = GaugeMetricFamily(
            "saige_eval_verdict", "1 for the last candidate's verdict (promoted or rejected).", labels=["verdict"]
        )
        for name in ("promoted", "rejected"):
            verdict.add_metric([name], 1.0 if r["verdict"] == name else 0.0)
        yield verdict
        regressed = set(r["figures"].get("regressed") or []) - {"overall"}
        yield GaugeMetricFamily(
            "saige_eval_regressions",
            "Principles and harm components the gate found regressed in the last candidate.",
            value=float(len(regressed)),
        )
        flags = GaugeMetricFamily(
            "saige_eval_regressed", "1 where the gate found the group regressed, else 0.", labels=["kind", "group"]
        )
        for kind, name, _ in groups[1:]:
            flags.add_metric([kind, name], 1.0 if name in regressed else 0.0)
        yield flags
        yield GaugeMetricFamily("saige_eval_duration_seconds", "Wall time of the scoring.", value=r["duration_seconds"])
        yield GaugeMetricFamily(
            "saige_eval_last_timestamp_seconds", "When a candidate was last evaluated.", value=self.finished_at
        )
        if self.champion_since is not None:
            yield GaugeMetricFamily(
                "saige_champion_promoted_timestamp_seconds",
                "When the current champion became the champion (its age: time() minus this).",
                value=self.champion_since,
            )
        info = GaugeMetricFamily(
            "saige_eval_info", "The last evaluated candidate (value 1).", labels=["candidate", "baseline", "verdict"]
        )
        info.add_metric([str(r["candidate"]), str(r["baseline"] or "base-model"), r["verdict"]], 1)
        yield info


def evaluation_registry(
    result: dict[str, Any], finished_at: float | None = None, champion_since: float | None = None
) -> CollectorRegistry:
    """The evaluate step's series; ``champion_since`` (epoch seconds) is pushed on every evaluation,
    so the champion's age survives a rejected candidate's push, which replaces the group."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EvaluationCollector(result, time.time() if finished_at is None else finished_at, champion_since))
    return registry


def record_pipeline_result(
    pipeline: str, directory: Path | None, gateway: str | None, succeeded: bool, started: float, finished: float
) -> None:
    """After a run, success or failure: the text file in ``directory`` (when given), then the push.

    Neither may turn a run's outcome into another error: a failure to record is a warning.
    """
    if directory is not None:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            write_pipeline_textfile(directory, pipeline, succeeded, started, finished)
        except OSError as exc:
            log.warning("could not write the pipeline metrics: %s", exc)
    push_pipeline_result(pipeline, gateway, succeeded, started, finished)


def write_pipeline_textfile(directory: Path, pipeline: str, succeeded: bool, started: float, finished: float) -> Path:
    """``directory/pipeline-<name>.prom``; after a failure it keeps the previous file's last success."""
    target = directory / f"pipeline-{pipeline}.prom"
    previous = None if succeeded else _read_value(target, LAST_SUCCESS)
    return write_textfile(pipeline_registry(succeeded, started, finished, previous), directory, pipeline, target.name)


def _read_value(path: Path, name: str) -> float | None:
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = path.read_text()
    except OSError:
        return None
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name:
                    return float(sample.value)
    except ValueError:  # a damaged file: start afresh
        return None
    return None


def exported_metric_names() -> set[str]:
    """Every series name a step can export, as it appears in the exposition (counters with
    ``_total``; histograms as the base name and its ``_bucket``, ``_sum``, ``_count``), read
    from the real registries built from representative records."""
    suffixes = {"counter": ("_total",), "histogram": ("", "_bucket", "_sum", "_count")}
    names: set[str] = set()
    for registry in (
        extraction_registry(_SAMPLE_MANIFEST, finished_at=0.0, min_examples=1),
        training_registry(_SAMPLE_TRAINING, finished_at=0.0),
        pipeline_registry(succeeded=True, started=0.0, finished=1.0),
        evaluation_registry(_SAMPLE_EVALUATION, finished_at=0.0, champion_since=0.0),
    ):
        for family in registry.collect():
            names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
    return names


_SUMMARY = {"avg": 0.5}
_HISTOGRAM = {"le": [0.5], "counts": [1, 0]}
_SAMPLE_MANIFEST: dict[str, Any] = {
    "dataset_id": "sample",
    "format": "tinyllama",
    "counts": {"scanned": 2, "kept": 1, "duplicates": 0, "train": 1, "eval": 0},
    "invalid": {"sample": 1},
    "removed": {"sample": 0},
    "pairs": {"train": 1, "eval": 0},
    "stats": {
        "rows": 1,
        "actual_harm": _SUMMARY,
        "buddhist_weighted_score": _SUMMARY,
        "harm_histogram": _HISTOGRAM,
        "weighted_histogram": _HISTOGRAM,
        "principles": {"sample": 5.0},
        "alignment_ratio": {"good": 1.0},
    },
    "source_stats": {"rows": 2, "mean_harm": 0.5, "mean_weighted_score": 5.0, "alignment_ratio": {"good": 1.0}},
    "duration_seconds": 1.0,
    "rows_per_second": 2.0,
}
_SAMPLE_GROUP = {
    **{f"{m}_{k}": 0.5 for m in ("candidate", "baseline") for k in ("win_rate", "mean_margin")},
    "n": 1,
    "mean_margin_delta": 0.0,
    "mean_margin_delta_ci": {"low": 0.0, "high": 0.0},
}
_SAMPLE_EVALUATION: dict[str, Any] = {
    "candidate": "sample",
    "baseline": None,
    "verdict": "promoted",
    "comparison": {"overall": _SAMPLE_GROUP, "principles": {"sample": _SAMPLE_GROUP}, "components": {}},
    "eval_loss": {"candidate": 1.0, "baseline": 1.0},
    "figures": {"regressed": []},
    "duration_seconds": 1.0,
}
_SAMPLE_TRAINING: dict[str, Any] = {
    **{key: 1.0 for key in TRAINING_GAUGES},
    "method": "dpo",
    "log": [{"step": 1, "loss": 1.0, "rewards/chosen": 1.0, "rewards/accuracy": 1.0}],
    "eval_preference": {"loss": 1.0, "rewards/margins": 1.0, "rewards/accuracy": 1.0},
    "base_model": "sample",
    "dataset_id": "sample",
    "run_id": "sample",
}


def write_textfile(registry: CollectorRegistry, directory: Path, pipeline: str, name: str = TEXTFILE) -> Path:
    """``directory/name`` (``metrics.prom``), replaced atomically.

    Every sample carries ``pipeline="…"``: a textfile collector that scrapes the file adds no
    grouping key, and the dashboard and alerts select by that label."""
    target = directory / name
    tmp = directory / f".{name}.{os.getpid()}"
    labelled = CollectorRegistry(auto_describe=False)
    labelled.register(_WithLabel(registry, "pipeline", pipeline))
    try:
        tmp.write_bytes(generate_latest(labelled))
        os.replace(tmp, target)
    except BaseException:  # a full volume (or a signal) leaves no half file behind
        tmp.unlink(missing_ok=True)
        raise
    return target


class _WithLabel(Collector):
    """A registry's families with one more label on every sample (the Pushgateway's grouping key,
    for a file that has none)."""

    def __init__(self, registry: CollectorRegistry, label: str, value: str) -> None:
        self.registry, self.label, self.value = registry, label, value

    def collect(self) -> Iterator[Metric]:
        for family in self.registry.collect():
            family.samples = [s._replace(labels={self.label: self.value, **s.labels}) for s in family.samples]
            yield family


def push(registry: CollectorRegistry, gateway: str | None, job: str, pipeline: str, replace: bool = True) -> bool:
    """Replace (PUT; ``replace=False``: update, POST) this job's group on the Pushgateway; a
    failure is a warning, never the step's failure."""
    if not gateway:
        return False
    send = push_to_gateway if replace else pushadd_to_gateway
    try:
        send(gateway, job=job, grouping_key={"pipeline": pipeline}, registry=registry, timeout=10)
    except Exception as exc:  # noqa: BLE001 - urllib raises several types; none may fail the step
        log.warning("could not push metrics to the Pushgateway: %s", str(exc).splitlines()[0] if str(exc) else exc)
        return False
    return True
