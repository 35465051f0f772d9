"""The extract step: experience database -> curated SFT dataset on the shared volume.

Two queries run side by side: the funnel (every row's verdict, counted by the database) on
a worker thread, and the rows (streamed as Arrow) on this one, which judges the candidates'
scores, renders, deduplicates, splits and writes them while the database keeps reading. With
preference pairs the same stream also brings the rows a filter removed, marked by their
verdict, so the pairs cost no second read of the table.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa

from saige_k8s import __version__, lifecycle
from saige_k8s.dataset.curate import (
    OUTPUT_SCHEMA,
    STAGE_INVALID,
    SeenSet,
    StageCounts,
    as_examples,
    in_eval,
    judge_texts,
    score_rows,
)
from saige_k8s.dataset.formats import DEFAULT_SYSTEM_PROMPT, FORMATS, FormatName
from saige_k8s.dataset.kto import UndesirableRows
from saige_k8s.dataset.pairs import PairBuilder
from saige_k8s.dataset.stats import DatasetStats
from saige_k8s.dataset.suite import load_suite
from saige_k8s.dataset.writer import DATASETS, MANIFEST, DatasetWriter, check_dataset_id, new_dataset_id
from saige_k8s.errors import InputError, NoExamplesError, RuntimeFailure
from saige_k8s.experiences.filters import Filters
from saige_k8s.experiences.query import CANDIDATE, Judgement, funnel_query, rows_query
from saige_k8s.experiences.schema import ALIGNMENT_LEVELS
from saige_k8s.experiences.source import SourceTable, open_source, redact, resolve_url, stream
from saige_k8s.lifecycle import check_stop

log = logging.getLogger(__name__)
#: The removal step of rows whose prompt is an evaluation suite scenario's (counted with the filters').
SUITE_PROMPT = "suite_prompt"


@dataclass(frozen=True)
class ExtractRequest:
    db: str | None
    data_root: Path
    table: str = "experiences"
    db_schema: str | None = None
    columns: Mapping[str, str] = field(default_factory=dict)
    filters: Filters = field(default_factory=Filters)
    format: FormatName = "tinyllama"
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    eval_fraction: float = 0.0
    dataset_id: str | None = None
    csv_path: Path | None = None
    strict: bool = False
    progress: bool = False
    #: False forces SQLAlchemy's cursor instead of ADBC (any database; slower).
    adbc: bool = True
    #: Called with the manifest and the unpublished directory, to add files (metrics.prom).
    before_publish: Callable[[dict[str, Any], Path], object] | None = None
    #: Preference data beside the examples: pairs (pairs-{train,eval}.parquet) and the KTO part (kto-*.parquet).
    pairs: bool = True
    #: Scenario files added to the shipped evaluation suite: their prompts are never trained on either.
    suite: tuple[Path, ...] | list[Path] = ()


@dataclass
class ExtractResult:
    path: Path
    manifest: dict[str, Any]

    @property
    def summary(self) -> dict[str, Any]:
        """One line's worth: what a controller reads from the pod's termination message."""
        counts = self.manifest["counts"]
        return {
            "dataset_id": self.manifest["dataset_id"],
            **{k: counts[k] for k in ("scanned", "kept", "train", "eval")},
        }


def existing_dataset(data_root: Path, dataset_id: str) -> ExtractResult | None:
    """The published dataset of that id, if any: a retried extract pod reports it instead of failing."""
    path = data_root / DATASETS / check_dataset_id(dataset_id)
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise InputError(f"dataset {dataset_id} exists but its {MANIFEST} cannot be read: {exc}") from None
    return ExtractResult(path, manifest)


def extract(request: ExtractRequest) -> ExtractResult:
    started = time.perf_counter()
    url = resolve_url(request.db)
    source = open_source(url, request.table, request.columns, request.db_schema)
    judgement = source.judge(request.filters)
    excluded = pa.array(sorted(load_suite(request.suite).prompts(FORMATS[request.format], request.system_prompt)))
    dataset_id = request.dataset_id or new_dataset_id()
    try:
        with DatasetWriter(
            request.data_root, dataset_id, OUTPUT_SCHEMA, request.eval_fraction > 0, request.csv_path
        ) as writer:
            funnel_future = _in_background(_run_funnel, source, judgement, request.adbc)
            try:
                read = _write_candidates(request, source, judgement, writer, excluded)
                funnel = funnel_future.result()
            except BaseException:
                lifecycle.cancel_running()  # the funnel's query, if it still runs
                raise
            check_stop()
            manifest = _manifest(request, source, dataset_id, funnel, read, writer, started)
            _check(request, source, judgement, manifest, read)
            path = writer.publish(manifest, request.before_publish)
    except OSError as exc:  # pyarrow's I/O errors are OSErrors too
        check_stop()
        where = exc.filename or request.data_root / DATASETS
        raise RuntimeFailure(f"cannot write the dataset ({where}): {exc.strerror or exc}; nothing published") from None
    return ExtractResult(path, manifest)


def _in_background(function: Callable[..., Any], *args: Any) -> Future[Any]:
    """A daemon thread, unlike an executor's: one stuck in a query cannot hold the exit up."""
    future: Future[Any] = Future()

    def run() -> None:
        try:
            future.set_result(function(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            future.set_exception(exc)

    threading.Thread(target=run, name="funnel", daemon=True).start()
    return future


@dataclass(frozen=True)
class _Funnel:
    """The database's side: rows per verdict label, and aggregates over the whole table."""

    counts: dict[str, int]
    aggregates: dict[str, Any]

    def rows(self, label: str) -> int:
        return self.counts.get(label, 0)


def _run_funnel(source: SourceTable, judgement: Judgement, adbc: bool) -> _Funnel:
    with stream(source.url, funnel_query(judgement, source.dialect), adbc) as batches:
        rows = [row for batch in batches for row in batch.to_pylist()]
    aggregates = rows[0] if rows else {}
    counts = {label: int(aggregates.get(f"verdict_{code}") or 0) for code, label in enumerate(judgement.labels)}
    return _Funnel(counts, aggregates)


@dataclass
class _Read:
    """What the candidate stream produced; with the funnel, every scanned row is accounted for."""

    stage: StageCounts = field(default_factory=StageCounts)
    stats: DatasetStats = field(default_factory=DatasetStats)
    fetched: int = 0
    duplicates: int = 0
    #: Candidates whose prompt is an evaluation suite scenario's.
    suite: int = 0
    #: Rows streamed in all (with pairs, the rows filters removed too).
    streamed: int = 0
    #: Preference pairs written, by split.
    pairs: dict[str, int] = field(default_factory=lambda: {"train": 0, "eval": 0})
    #: Undesirable examples of the KTO part written, by split.
    kto: dict[str, int] = field(default_factory=lambda: {"train": 0, "eval": 0})
    #: Candidates read, judged and unique, but past --limit.
    cut: int = 0
    reached_limit: bool = False


def _write_candidates(
    request: ExtractRequest, source: SourceTable, judgement: Judgement, writer: DatasetWriter, excluded: pa.Array
) -> _Read:
    """Stream the rows once: candidates become examples; with pairs, every valid row feeds the pairs too.

    Past --limit the stream goes on for pairs only, uncounted: the counts stay those of a
    read that stopped there.
    """
    fmt = FORMATS[request.format]
    read = _Read()
    seen = SeenSet()
    limit = request.filters.limit
    progress = _progress(request.progress)
    pairs = PairBuilder(fmt, request.system_prompt, excluded) if request.pairs else None
    kto = UndesirableRows(fmt, request.system_prompt, request.filters, excluded)
    uncounted = StageCounts()  # rows judged for pairs only: their counts are the funnel's or past the limit
    query = rows_query(judgement, source.id_is_integer, with_removed=pairs is not None)
    with stream(source.url, query, request.adbc) as batches:
        for raw in batches:
            check_stop()
            progress.update(len(raw))
            candidates = raw
            if pairs is not None:
                raw = raw.append_column("seq", pa.array(np.arange(read.streamed, read.streamed + len(raw))))  # noqa: PLW2901
                read.streamed += len(raw)
                passed = pc.equal(raw.column("verdict"), judgement.candidate)
                candidates = raw.filter(passed)
                _add_pairs(pairs, kto, raw.filter(pc.invert(passed)), request, uncounted, None)
                if read.reached_limit:
                    _add_pairs(pairs, kto, candidates, request, uncounted, True)
                    continue
            read.fetched += len(candidates)
            scored, passes = score_rows(judge_texts(candidates, read.stage), request.filters, read.stage)
            if pairs is not None:
                pairs.add(scored, passes)
                kto.add(scored, passes)
            judged = scored if passes.all() else scored.filter(pa.array(passes))
            if request.strict and read.stage.first_invalid:
                continue  # failing anyway: judge the rest only to report the true count
            examples, keys, duplicates, suite = as_examples(judged, fmt, request.system_prompt, seen, excluded)
            read.duplicates += duplicates
            read.suite += suite
            if limit is not None and read.stats.rows + len(examples) >= limit:
                keep = limit - read.stats.rows
                read.cut = len(examples) - keep
                read.reached_limit = True
                _write(writer, read.stats, examples.slice(0, keep), in_eval(keys[:keep], request.eval_fraction))
                if pairs is None:
                    break
                continue
            _write(writer, read.stats, examples, in_eval(keys, request.eval_fraction))
    progress.close()
    if pairs is not None:
        table, keys = pairs.pairs()
        read.pairs = writer.write_pairs(table, in_eval(keys, request.eval_fraction))
        table, keys = kto.table(OUTPUT_SCHEMA)
        read.kto = writer.write_part("kto", table, in_eval(keys, request.eval_fraction))
    return read


def _add_pairs(
    pairs: PairBuilder,
    kto: UndesirableRows,
    rows: pa.RecordBatch,
    request: ExtractRequest,
    counts: StageCounts,
    kept: bool | None,
) -> None:
    """Judge rows for the preference data only.

    ``kept`` None: removed by a filter in SQL (none passes), else by the filters here.
    """
    scored, passes = score_rows(judge_texts(rows, counts), request.filters, counts)
    passes = passes if kept else np.zeros(len(scored), dtype=bool)
    pairs.add(scored, passes)
    kto.add(scored, passes)


def _write(writer: DatasetWriter, stats: DatasetStats, examples: pa.RecordBatch, held_out: np.ndarray) -> None:
    writer.write(examples, held_out)
    stats.add(examples)


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(enabled: bool):
    if not (enabled and sys.stderr.isatty()):
        return _NoProgress()
    from tqdm import tqdm

    return tqdm(desc="candidates", unit=" rows", unit_scale=True, file=sys.stderr, leave=False)


def _manifest(
    request: ExtractRequest,
    source: SourceTable,
    dataset_id: str,
    funnel: _Funnel,
    read: _Read,
    writer: DatasetWriter,
    started: float,
) -> dict[str, Any]:
    """Counts that add up: scanned = kept + invalid per reason + removed per filter + duplicates + beyond limit."""
    sql_candidates = funnel.rows(CANDIDATE)
    invalid = {label.split(":", 1)[1]: n for label, n in funnel.counts.items() if label.startswith("invalid:")}
    for reason in STAGE_INVALID:  # empty_* are counted by both stages
        invalid[reason] = invalid.get(reason, 0) + read.stage.invalid[reason]
    removed = dict.fromkeys(request.filters.filter_names(), 0)
    for label, n in funnel.counts.items():
        if label.startswith("filter:"):
            removed[label.split(":", 1)[1]] += n
    for name, n in read.stage.removed.items():
        removed[name] += n
    removed[SUITE_PROMPT] = read.suite
    unread = max(sql_candidates - read.fetched, 0) if read.reached_limit else 0
    if not read.reached_limit and read.fetched != sql_candidates:
        log.warning(
            "the table changed during extraction (%d candidates counted, %d read); counts use what was read",
            sql_candidates,
            read.fetched,
        )
    beyond_limit = read.cut + unread
    duplicates = read.duplicates
    stats = read.stats
    scanned = sum(n for label, n in funnel.counts.items() if label != CANDIDATE) + read.fetched + unread
    elapsed = time.perf_counter() - started
    source_stats = _source_stats(funnel)
    funnel_steps = []
    remaining = scanned
    for step, n in (
        ("invalid", sum(invalid.values())),
        *removed.items(),
        ("duplicates", duplicates),
        ("limit", beyond_limit),
    ):
        remaining -= n
        funnel_steps.append({"step": step, "removed": n, "remaining": remaining})
    return {
        "schema_version": 1,
        "dataset_id": dataset_id,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "saige_k8s_version": __version__,
        "format": request.format,
        "system_prompt": request.system_prompt,
        "eval_fraction": request.eval_fraction,
        "source": {
            "url": redact(source.url),
            "dialect": source.dialect,
            "table": source.table.name,
            "columns": {k: v for k, v in source.mapping.items() if v is not None},
        },
        "filters": request.filters.model_dump(),
        "counts": {
            "scanned": scanned,
            "kept": stats.rows,
            "train": writer.rows["train"],
            "eval": writer.rows["eval"],
            "duplicates": duplicates,
            "beyond_limit": beyond_limit,
            "invalid_total": sum(invalid.values()),
            "removed_total": sum(removed.values()),
        },
        "invalid": invalid,
        "removed": removed,
        "pairs": dict(read.pairs),
        "kto": dict(read.kto),
        "funnel": funnel_steps,
        "stats": stats.as_dict(),
        "source_stats": source_stats,
        "duration_seconds": elapsed,
        "rows_per_second": scanned / elapsed if elapsed > 0 else None,
    }


def _source_stats(funnel: _Funnel) -> dict[str, Any]:
    """Harm and virtue of *all* experiences in the table, to track over time (seed's "metrics")."""
    agg = funnel.aggregates
    labels = {level: int(agg.get(f"alignment_{level}") or 0) for level in ALIGNMENT_LEVELS}
    labelled = sum(labels.values())
    return {
        "rows": int(agg.get("rows") or 0),
        "mean_harm": agg["harm_sum"] / agg["harm_count"] if agg.get("harm_count") else None,
        "mean_weighted_score": agg["weighted_sum"] / agg["weighted_count"] if agg.get("weighted_count") else None,
        "alignment": labels,
        "alignment_ratio": {k: (v / labelled if labelled else None) for k, v in labels.items()},
    }


def _check(
    request: ExtractRequest, source: SourceTable, judgement: Judgement, manifest: dict[str, Any], read: _Read
) -> None:
    if request.strict and manifest["counts"]["invalid_total"]:
        kinds = ", ".join(f"{r}={n}" for r, n in manifest["invalid"].items() if n)
        # Past --limit the JSON and texts of candidates were not read: more may be unusable.
        bound = "at least " if read.reached_limit else ""
        raise InputError(
            f"--strict: {bound}{manifest['counts']['invalid_total']} unusable row(s) ({kinds}); "
            f"{_first_unusable(source, judgement, read)}; fix the rows or drop --strict to skip and count them"
        )
    if manifest["counts"]["kept"] == 0:
        steps = ", ".join(f"{s['step']} -{s['removed']}" for s in manifest["funnel"] if s["removed"]) or "table empty"
        hint = request.filters.relax_hint(manifest["removed"])
        scanned = manifest["counts"]["scanned"]
        raise NoExamplesError(f"no experiences passed the filters ({scanned} scanned; {steps}); {hint}")


def _first_unusable(source: SourceTable, judgement: Judgement, read: _Read) -> str:
    """The lowest id among the rows the database and the Arrow stage found unusable, with its reason."""
    found = []
    if read.stage.first_invalid:
        reason, row_id = read.stage.first_invalid
        found.append((row_id, reason))
    invalid_codes = sum(label.startswith("invalid:") for label in judgement.labels)
    query = (
        sa.select(judgement.columns["id"], judgement.verdict)
        .where(judgement.verdict < invalid_codes)
        .order_by(judgement.columns["id"])
        .limit(1)
    )
    with stream(source.url, query, adbc=False) as batches:
        for batch in batches:
            if len(batch):
                label = judgement.labels[int(batch.column(1)[0].as_py())]
                found.insert(0, (str(batch.column(0)[0].as_py()), label.split(":", 1)[1]))
    if len(found) == 2 and not source.id_is_integer:  # text ids: the database's order is its own
        return "e.g. " + " and ".join(f"id {i} ({r})" for i, r in found)
    if not found:
        return "first: unknown"
    row_id, reason = min(found, key=_id_order)
    return f"first: id {row_id} ({reason})"


def _id_order(found: tuple[str, str]) -> tuple[int, int]:
    try:
        return (0, int(found[0]))
    except ValueError:  # a NULL id
        return (1, 0)
