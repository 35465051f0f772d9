"""Publishing a dataset on the shared volume so that no reader sees half of one.

Files go into a hidden temporary directory beside the datasets; the manifest is written
last; one rename publishes the directory; ``LATEST`` is replaced atomically after that. A
run killed at any point leaves the previous dataset and ``LATEST`` as they were.

A run holds an flock on ``.lock`` in its temporary directory while it lives (see
saige_k8s.temporaries): the sweep of leftovers never takes a live run's directory.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import re
import secrets
import shutil
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from saige_k8s import lifecycle
from saige_k8s.errors import ConfigError, InputError
from saige_k8s.temporaries import LOCK, fsync_path, hold_lock, remove_stale_temporaries

log = logging.getLogger(__name__)

DATASETS = "datasets"
LATEST = "LATEST"
MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-"
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_MAX_PENDING = 2
CSV_COLUMNS = ("id", "text", "format", "actual_harm", "buddhist_weighted_score", "buddhist_alignment", "difficulty")


#: Columns of few distinct values (labels, roles, the format): dictionary-encoded in Parquet.
#: The others (texts, ids, numbers) are nearly all distinct: a dictionary is only built to be
#: dropped once it outgrows its page.
LOW_CARDINALITY = frozenset({"format", "buddhist_alignment", "difficulty", "principle", "component", "role"})


def parquet_options(schema: pa.Schema) -> dict[str, Any]:
    """How the dataset's Parquet files are encoded, chosen by measurement (README, Performance).

    Writing 412k examples: dictionaries only for the few-valued columns, and min/max
    statistics only for numbers and times (never read for texts), took 0.15-0.2 CPU-s less
    than pyarrow's defaults for 5 % more bytes; zstd level 1 is kept, as lz4 saved 0.3 CPU-s
    but wrote 1.5 times the bytes. Physical encodings only: every reader sees the schema's types.
    """
    leaves = _leaf_paths(schema)
    return {
        "compression": "zstd",
        "compression_level": 1,
        "use_dictionary": [path for path in leaves if path.rsplit(".", 1)[-1] in LOW_CARDINALITY],
        "write_statistics": [path for path, kind in leaves.items() if not pa.types.is_string(kind)],
    }


def _leaf_paths(schema: pa.Schema) -> dict[str, pa.DataType]:
    """Parquet's dotted column paths (``messages.list.element.role``) and their Arrow types."""
    paths: dict[str, pa.DataType] = {}

    def visit(path: str, kind: pa.DataType) -> None:
        if pa.types.is_list(kind):
            visit(f"{path}.list.element", kind.value_type)
        elif pa.types.is_struct(kind):
            for child in kind:
                visit(f"{path}.{child.name}", child.type)
        else:
            paths[path] = kind

    for column in schema:
        visit(column.name, column.type)
    return paths


def new_dataset_id(now: dt.datetime | None = None) -> str:
    now = now or dt.datetime.now(dt.UTC)
    return f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def check_dataset_id(dataset_id: str) -> str:
    """Dataset ids name a directory under ``datasets/``: nothing that could name another path."""
    if not _ID.fullmatch(dataset_id) or dataset_id in {".", ".."} or dataset_id == LATEST:
        raise ConfigError(
            f"invalid dataset id {dataset_id!r}: use letters, digits, '.', '_' and '-' (max 128), "
            "not starting with '.' or '-'"
        )
    return dataset_id


def resolve_dataset(data_root: Path, ref: str) -> Path:
    """``LATEST``, an id, a directory or a CSV file -> the dataset (a directory must be complete)."""
    candidate = Path(ref)
    if candidate.suffix == ".csv" and candidate.is_file():
        return candidate  # the seed's CSV; training reads it directly
    if ref == LATEST:
        latest = data_root / DATASETS / LATEST
        if not latest.is_file():
            raise InputError(f"no dataset published yet under {data_root / DATASETS} (no {LATEST} file)")
        candidate = data_root / DATASETS / check_dataset_id(latest.read_text().strip())
    elif not candidate.is_dir():
        candidate = data_root / DATASETS / check_dataset_id(ref)
    if not (candidate / MANIFEST).is_file():
        raise InputError(f"not a complete dataset (no {MANIFEST}): {candidate}")
    return candidate


class DatasetWriter:
    """Streams batches into train/eval Parquet files of an unpublished dataset directory."""

    def __init__(
        self, data_root: Path, dataset_id: str, schema: pa.Schema, with_eval: bool, csv_path: Path | None = None
    ) -> None:
        self.dataset_id = check_dataset_id(dataset_id)
        self.datasets = data_root / DATASETS
        self.final = self.datasets / dataset_id
        if self.final.exists():
            raise ConfigError(f"dataset {dataset_id!r} already exists in {self.datasets}")
        self.tmp = self.datasets / f"{TMP_PREFIX}{dataset_id}-{os.getpid()}"
        self._latest_tmp = self.datasets / f"{TMP_PREFIX}{LATEST}-{os.getpid()}"
        self.csv_path = csv_path
        self._csv_tmp: Path | None = None
        self._csv = None
        self._lock: int | None = None
        self._latest_lock: int | None = None
        self._csv_lock: int | None = None
        #: Open Parquet files, by file name: ``train.parquet``, ``eval.parquet`` and the parts' files.
        self._files: dict[str, pq.ParquetWriter] = {}
        self._forced_exit = contextlib.ExitStack()
        self._forced_exit.enter_context(lifecycle.remove_on_forced_exit(self._remove_temporaries))
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="parquet")
        self._pending: deque[Future[None]] = deque()
        # The CSV first: an unusable --csv path fails before anything is created under the data root.
        if csv_path is not None:
            self._csv_tmp = csv_path.with_name(f".{csv_path.name}.{os.getpid()}.tmp")
            try:
                remove_stale_temporaries(csv_path.parent, f".{csv_path.name}.*.tmp")
                self._csv_lock = hold_lock(self._csv_tmp)
                self._csv = pcsv.CSVWriter(self._csv_tmp, schema=_csv_schema(schema))
            except (OSError, pa.ArrowException) as exc:
                self.abort()
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
                raise InputError(f"CSV output not writable: {csv_path} ({reason})") from None
        try:
            self.datasets.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.datasets, f"{TMP_PREFIX}*")
            self.tmp.mkdir()
            self._lock = hold_lock(self.tmp / LOCK)
        except OSError as exc:
            self.abort()
            raise InputError(f"output directory not writable: {self.datasets} ({exc.strerror})") from None
        self.rows = {"train": 0, "eval": 0}
        #: Other files of the dataset (preference pairs, the KTO part): name -> rows.
        self.extra: dict[str, int] = {}
        self._splits = ("train", "eval") if with_eval else ("train",)
        # Parquet encoding runs on its own thread (it releases the GIL) while the next batch is
        # prepared; at most _MAX_PENDING batches wait, so memory stays bounded.
        self._open(None, schema)

    def add_part(self, stem: str, schema: pa.Schema) -> None:
        """``STEM-train.parquet`` (and ``STEM-eval.parquet``), streamed into by ``write(..., part=STEM)``."""
        self._open(stem, schema)
        self.extra.update(dict.fromkeys(self._names(stem).values(), 0))

    def _names(self, part: str | None) -> dict[str, str]:
        return {split: f"{split}.parquet" if part is None else f"{part}-{split}.parquet" for split in self._splits}

    def _open(self, part: str | None, schema: pa.Schema) -> None:
        try:
            for name in self._names(part).values():
                self._files[name] = pq.ParquetWriter(self.tmp / name, schema, **parquet_options(schema))
        except BaseException:
            self.abort()
            raise

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is not None:
            self.abort()

    def write(self, batch: pa.RecordBatch | pa.Table, in_eval: np.ndarray, part: str | None = None) -> None:
        """Examples (``part`` None; the CSV gets them too) or a part's rows, each to its split's file."""
        names = self._names(part)
        evaluated = int(in_eval.sum()) if "eval" in names else 0
        split_rows = {"train": len(batch) - evaluated, "eval": evaluated}
        for split, name in names.items():
            if part is None:
                self.rows[split] += split_rows[split]
            else:
                self.extra[name] += split_rows[split]
        while len(self._pending) >= _MAX_PENDING:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(self._write_splits, batch, in_eval, names, part is None))

    def _write_splits(
        self, batch: pa.RecordBatch | pa.Table, in_eval: np.ndarray, names: dict[str, str], examples: bool
    ) -> None:
        """On the Parquet thread: the split's copies too, off the thread that prepares the next batch."""
        if "eval" in names and in_eval.any():
            pieces = {names["train"]: batch.filter(pa.array(~in_eval)), names["eval"]: batch.filter(pa.array(in_eval))}
        else:
            pieces = {names["train"]: batch}
        for name, piece in pieces.items():
            if len(piece):
                self._files[name].write(piece)
        if self._csv is not None and examples:  # the CSV holds the examples only
            self._csv.write(batch.select(list(CSV_COLUMNS)))

    def write_part(self, stem: str, table: pa.Table, in_eval: np.ndarray) -> dict[str, int]:
        """A part known whole at once (the pairs, at the end of the read): rows per split."""
        self.add_part(stem, table.schema)
        self.write(table, in_eval, part=stem)
        return self.part_rows(stem)

    def part_rows(self, stem: str) -> dict[str, int]:
        """Rows written so far to ``STEM-train.parquet`` and ``STEM-eval.parquet`` (0 where there is no such file)."""
        return {split: self.extra.get(f"{stem}-{split}.parquet", 0) for split in ("train", "eval")}

    def _drain(self) -> None:
        if not hasattr(self, "_pool"):
            return
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True)

    def publish(self, manifest: dict[str, Any], before: Callable[[dict[str, Any], Path], object] | None = None) -> Path:
        """Close the files, write the manifest, rename into place, then point LATEST at it.

        ``before(manifest, directory)`` may add files (metrics.prom) while the directory is unpublished.
        Everything that needs space is written before the rename: a full volume fails the run
        with nothing published and LATEST as it was.
        """
        self._drain()
        for writer in self._files.values():
            writer.close()
        if self._csv is not None:
            self._csv.close()
        rows = {name: self.rows[split] for split, name in self._names(None).items()} | self.extra
        manifest = {
            **manifest,
            "files": {name: {"rows": n, "bytes": (self.tmp / name).stat().st_size} for name, n in rows.items()},
        }
        if before is not None:
            before(manifest, self.tmp)
        _write_synced(self.tmp / MANIFEST, json.dumps(manifest, indent=2, default=str) + "\n")
        for name in rows:
            fsync_path(self.tmp / name)
        self._latest_lock = hold_lock(self._latest_tmp)
        _write_synced(self._latest_tmp, self.dataset_id + "\n")
        (self.tmp / LOCK).unlink()
        with lifecycle.commit():
            os.rename(self.tmp, self.final)
            try:
                os.replace(self._latest_tmp, self.datasets / LATEST)
            except OSError:
                os.rename(self.final, self.tmp)  # unpublish: LATEST never pointed at it
                raise
            with contextlib.suppress(OSError):  # published; durability is the volume's business now
                fsync_path(self.datasets)
            if self._csv_tmp is not None and self.csv_path is not None:
                try:
                    os.replace(self._csv_tmp, self.csv_path)
                except OSError as exc:
                    log.warning("dataset published, but the CSV could not be moved to %s: %s", self.csv_path, exc)
        self._release_locks()
        self._forced_exit.close()
        return self.final

    def abort(self) -> None:
        """Remove everything this run wrote; the published datasets are untouched."""
        with contextlib.suppress(Exception):
            self._drain()
        for writer in [*self._files.values(), *([self._csv] if self._csv is not None else [])]:
            with contextlib.suppress(OSError, pa.ArrowException):
                writer.close()
        self._remove_temporaries()
        self._release_locks()
        self._forced_exit.close()

    def _remove_temporaries(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        for path in (self._latest_tmp, self._csv_tmp):
            if path is not None:
                with contextlib.suppress(OSError):
                    path.unlink(missing_ok=True)

    def _release_locks(self) -> None:
        for fd in (self._lock, self._csv_lock, self._latest_lock):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._lock = self._csv_lock = self._latest_lock = None


def _csv_schema(schema: pa.Schema) -> pa.Schema:
    return pa.schema([schema.field(name) for name in CSV_COLUMNS])


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
