"""The extract step: experience database -> curated SFT dataset on the shared volume.

One statement reads the table once, as Arrow: every row comes with its verdict, which the
funnel counts; the candidates' scores are judged, and they are rendered, deduplicated, split
and written while the database keeps reading. With preference pairs the same scan brings
the rows a filter removed, marked by their verdict, and the pairs are chosen from it; only
the few rows that end up in a pair are read again, by id, for their texts.
"""

from __future__ import annotations

import datetime as dt
import gc
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa

from saige_k8s import __version__, console
from saige_k8s.dataset.curate import (
    EXAMPLE_SOURCES,
    OUTPUT_SCHEMA,
    STAGE_INVALID,
    Judged,
    Prompts,
    SeenSet,
    StageCounts,
    as_examples,
    in_eval,
    judge_rows,
    prompts_of,
)
from saige_k8s.dataset.formats import DEFAULT_SYSTEM_PROMPT, FORMATS, FormatName
from saige_k8s.dataset.kto import KTO_PART, UndesirableRows
from saige_k8s.dataset.pairs import PAIRS_PART, PairBuilder
from saige_k8s.dataset.stats import DatasetStats, value_counts
from saige_k8s.dataset.suite import load_suite
from saige_k8s.dataset.writer import DATASETS, MANIFEST, DatasetWriter, check_dataset_id, new_dataset_id
from saige_k8s.errors import InputError, NoExamplesError, RuntimeFailure
from saige_k8s.experiences.filters import Filters
from saige_k8s.experiences.query import (
    CANDIDATE,
    HARM_IN_RANGE,
    VERDICT,
    WEIGHTED_IN_RANGE,
    Judgement,
    rows_of,
    rows_query,
    verdict_codes,
)
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
    #: Preference pairs beside the examples (pairs-{train,eval}.parquet): what the evaluate step scores.
    pairs: bool = True
    #: The KTO part (kto-{train,eval}.parquet): only ``train --method kto`` reads it, and on a
    #: real log it is about as large as the examples themselves, so it is written when asked for.
    kto: bool = False
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
    # What is loaded by now outlives the scan: the collector's full passes need not walk it
    # again and again while the scan allocates.
    gc.freeze()
    try:
        return _extract(request, started)
    finally:
        gc.unfreeze()


def _extract(request: ExtractRequest, started: float) -> ExtractResult:
    url = resolve_url(request.db)
    source = open_source(url, request.table, request.columns, request.db_schema)
    judgement = source.judge(request.filters)
    excluded = pa.array(sorted(load_suite(request.suite).prompts(FORMATS[request.format], request.system_prompt)))
    dataset_id = request.dataset_id or new_dataset_id()
    try:
        with DatasetWriter(
            request.data_root, dataset_id, OUTPUT_SCHEMA, request.eval_fraction > 0, request.csv_path
        ) as writer:
            read = _write_candidates(request, source, judgement, writer, excluded)
            check_stop()
            manifest = _manifest(request, source, dataset_id, read, writer, started)
            _check(request, source, judgement, manifest, read)
            path = writer.publish(manifest, request.before_publish)
    except OSError as exc:  # pyarrow's I/O errors are OSErrors too
        check_stop()
        where = exc.filename or request.data_root / DATASETS
        raise RuntimeFailure(f"cannot write the dataset ({where}): {exc.strerror or exc}; nothing published") from None
    return ExtractResult(path, manifest)


@dataclass
class _Funnel:
    """The database's side, counted from the scan: rows per verdict label, and statistics of the whole table."""

    labels: tuple[str, ...]
    verdicts: np.ndarray = field(init=False)
    rows: int = 0
    harm: list[float] = field(default_factory=lambda: [0, 0.0])
    weighted: list[float] = field(default_factory=lambda: [0, 0.0])
    alignment: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ALIGNMENT_LEVELS, 0))

    def __post_init__(self) -> None:
        self.verdicts = np.zeros(len(self.labels), dtype=np.int64)

    def add(self, batch: pa.RecordBatch, verdict: np.ndarray, flags: np.ndarray) -> None:
        """``verdict``: each row's label; ``flags``: the VERDICT column's (which numbers are in range)."""
        self.rows += len(batch)
        self.verdicts += np.bincount(verdict, minlength=len(self.labels))
        for total, name, flag in (
            (self.harm, "actual_harm", HARM_IN_RANGE),
            (self.weighted, "buddhist_weighted_score", WEIGHTED_IN_RANGE),
        ):
            in_range = (flags & flag) != 0
            total[0] += int(in_range.sum())
            # The column with the others masked, not filtered: the same sum, in the same order.
            total[1] += pc.sum(pc.if_else(pa.array(in_range), batch.column(name), None)).as_py() or 0.0
        for value, n in zip(*value_counts(_as_bytes(batch.column("buddhist_alignment"))), strict=True):
            label = value.decode("utf-8", "replace") if value is not None else None
            if label in self.alignment:
                self.alignment[label] += n

    def count(self, label: str) -> int:
        return int(self.verdicts[self.labels.index(label)])

    @property
    def counts(self) -> dict[str, int]:
        return {label: int(n) for label, n in zip(self.labels, self.verdicts, strict=True)}


def _as_bytes(values: pa.Array) -> pa.Array:
    """A label column as bytes: SQLite may hand any bytes, or a number, as a rejected row's label."""
    if pa.types.is_string(values.type):
        return values.view(pa.binary())
    if pa.types.is_large_string(values.type):
        return values.view(pa.large_binary())
    if pa.types.is_binary(values.type) or pa.types.is_large_binary(values.type):
        return values
    return values.cast(pa.string()).view(pa.binary())


@dataclass
class _Read:
    """What the scan produced: with the funnel's counts, every scanned row is accounted for."""

    funnel: _Funnel
    stage: StageCounts = field(default_factory=StageCounts)
    stats: DatasetStats = field(default_factory=DatasetStats)
    #: Candidates read and judged (those past --limit are not).
    fetched: int = 0
    duplicates: int = 0
    #: Candidates whose prompt is an evaluation suite scenario's.
    suite: int = 0
    #: Rows given a place in id order so far (the pairs' tie-break).
    streamed: int = 0
    #: Preference pairs written, by split.
    pairs: dict[str, int] = field(default_factory=lambda: {"train": 0, "eval": 0})
    #: Undesirable examples of the KTO part written, by split (None: no KTO part asked for).
    kto: dict[str, int] | None = None
    #: Candidates read, judged and unique, but past --limit.
    cut: int = 0
    reached_limit: bool = False


class ValidRows(Protocol):
    """What receives every row the database and the Arrow stage find usable (preference pairs)."""

    def add(self, judged: Judged, prompts: Prompts) -> None:
        """``judged``: its usable rows are the valid ones, ``seq`` their place in id order, and
        ``passes`` says which the database and the Arrow stage kept; ``prompts``: of every row."""


def _write_candidates(
    request: ExtractRequest, source: SourceTable, judgement: Judgement, writer: DatasetWriter, excluded: pa.Array
) -> _Read:
    """Scan the table once: every row's verdict feeds the funnel, candidates become examples.

    With preference data, every usable row, kept or removed by a filter, reaches the pair
    builder and the KTO part through ``ValidRows.add`` (``valid_rows`` below). Past --limit
    the scan goes on for the funnel and the preference data, the candidates uncounted: the
    stage's counts stay those of a read that stopped there.
    """
    fmt = FORMATS[request.format]
    read = _Read(_Funnel(judgement.labels))
    seen = SeenSet()
    progress = console.progress(
        "rows", " rows", source.estimated_rows, enabled=request.progress, log=log, unit_scale=True, leave=False
    )
    pairs = PairBuilder(fmt, request.system_prompt) if request.pairs else None
    kto = _undesirable_rows(request, writer) if request.kto else None
    valid_rows: list[ValidRows] = [consumer for consumer in (pairs, kto) if consumer is not None]
    first_needed = judgement.first_valid if valid_rows else judgement.candidate
    # Removed rows' responses are only checked, unless the KTO part writes them.
    query = rows_query(judgement, source.id_is_integer, brief_removed=source.brief_removed and not request.kto)
    with stream(source.url, query, request.adbc) as batches:
        for raw in batches:
            check_stop()
            progress.update(len(raw))
            flags = raw.column(VERDICT).to_numpy(zero_copy_only=False)
            verdict = verdict_codes(flags)
            read.funnel.add(raw, verdict, flags)
            if read.reached_limit and not valid_rows:
                continue
            needed = verdict >= first_needed
            if not needed.any():
                continue
            candidate = verdict == judgement.candidate
            rows = raw
            if valid_rows:
                rows = rows.append_column("seq", pa.array(np.arange(read.streamed, read.streamed + len(rows))))
                read.streamed += len(rows)
            counted = np.zeros(len(rows), dtype=bool) if read.reached_limit else candidate
            read.fetched += int(counted.sum())
            judged = judge_rows(rows, request.filters, read.stage, counted, alive=needed)
            judged = judged._replace(passes=judged.passes & candidate)
            # One rendering of each prompt serves the examples, the pairs and the KTO part.
            prompts = prompts_of(judged.batch, fmt, request.system_prompt, excluded)
            for consumer in valid_rows:
                consumer.add(judged, prompts)
            if read.reached_limit or (request.strict and read.stage.first_invalid):
                continue  # --strict fails anyway: judge the rest only to report the true count
            # The examples' copies below carry only what examples are made of.
            kept, passes = judged.batch.select(EXAMPLE_SOURCES), judged.passes
            if not passes.all():
                kept, prompts = kept.filter(pa.array(passes)), prompts.filter(passes)
            _keep_examples(request, writer, read, seen, kept, prompts)
    progress.close()
    if pairs is not None:  # a reduction over the whole table: known only at its end
        table, keys = pairs.pairs(lambda ids: _read_again(request, source, judgement, ids))
        read.pairs = writer.write_part(PAIRS_PART, table, in_eval(keys, request.eval_fraction))
    read.kto = None if kto is None else writer.part_rows(KTO_PART)
    return read


def _read_again(request: ExtractRequest, source: SourceTable, judgement: Judgement, ids: pa.Array) -> pa.Table:
    """The rows of ``ids``, judged as the scan judged them (their counts are the scan's already).

    ADBC on SQLite; elsewhere through SQLAlchemy, whose driver binds a list of values as they
    are, where ADBC's would set one session value per id on PostgreSQL (see ``source``)."""
    sqlite = source.dialect == "sqlite"
    judged: list[pa.RecordBatch] = []
    for where in rows_of(judgement, ids.to_pylist(), source.dialect, source.id_is_integer):
        check_stop()
        query = rows_query(judgement, source.id_is_integer, where)
        with stream(source.url, query, request.adbc and sqlite) as batches:
            for batch in batches:
                judged.append(judge_rows(batch, request.filters, StageCounts()).usable_rows())
    if not judged:  # every row gone since the scan
        return pa.table({"id": ids.slice(0, 0)})
    # A column NULL throughout one read comes back typed NULL through SQLAlchemy.
    return pa.concat_tables([pa.Table.from_batches([b]) for b in judged], promote_options="permissive")


def _undesirable_rows(request: ExtractRequest, writer: DatasetWriter) -> UndesirableRows:
    """The KTO part, written as it comes, like the examples."""
    writer.add_part(KTO_PART, OUTPUT_SCHEMA)

    def write(examples: pa.RecordBatch, keys: np.ndarray) -> None:
        writer.write(examples, in_eval(keys, request.eval_fraction), part=KTO_PART)

    return UndesirableRows(FORMATS[request.format], request.system_prompt, request.filters, write)


def _keep_examples(
    request: ExtractRequest, writer: DatasetWriter, read: _Read, seen: SeenSet, judged: pa.RecordBatch, prompts: Prompts
) -> None:
    """Candidates that passed every check become examples, up to --limit."""
    examples, keys, duplicates, suite = as_examples(
        judged, FORMATS[request.format], request.system_prompt, seen, prompts
    )
    read.duplicates += duplicates
    read.suite += suite
    limit = request.filters.limit
    if limit is not None and read.stats.rows + len(examples) >= limit:
        keep = limit - read.stats.rows
        read.cut = len(examples) - keep
        read.reached_limit = True
        examples, keys = examples.slice(0, keep), keys[:keep]
    writer.write(examples, in_eval(keys, request.eval_fraction))
    read.stats.add(examples)


def _manifest(
    request: ExtractRequest,
    source: SourceTable,
    dataset_id: str,
    read: _Read,
    writer: DatasetWriter,
    started: float,
) -> dict[str, Any]:
    """Counts that add up: scanned = kept + invalid per reason + removed per filter + duplicates + beyond limit."""
    funnel = read.funnel
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
    unread = funnel.count(CANDIDATE) - read.fetched
    beyond_limit = read.cut + unread
    duplicates = read.duplicates
    stats = read.stats
    scanned = funnel.rows
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
        "kto": read.kto,
        "funnel": funnel_steps,
        "stats": stats.as_dict(),
        "source_stats": source_stats,
        "duration_seconds": elapsed,
        "rows_per_second": scanned / elapsed if elapsed > 0 else None,
    }


def _source_stats(funnel: _Funnel) -> dict[str, Any]:
    """Harm and virtue of *all* experiences in the table, to track over time (seed's "metrics")."""
    labels = dict(funnel.alignment)
    labelled = sum(labels.values())
    (harm_count, harm_sum), (weighted_count, weighted_sum) = funnel.harm, funnel.weighted
    return {
        "rows": funnel.rows,
        "mean_harm": harm_sum / harm_count if harm_count else None,
        "mean_weighted_score": weighted_sum / weighted_count if weighted_count else None,
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
    query = (
        sa.select(judgement.columns["id"], judgement.verdict)
        .where(judgement.verdict < judgement.first_valid)
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
