"""Publishing a dataset on the shared volume so that no reader sees half of one.

Files go into a hidden temporary directory beside the datasets; the manifest is written
last; one rename publishes the directory; ``LATEST`` is replaced atomically after that. A
run killed at any point leaves the previous dataset and ``LATEST`` as they were.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import secrets
import shutil
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from saige_k8s.errors import ConfigError, InputError

DATASETS = "datasets"
LATEST = "LATEST"
MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-"
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
#: Temporary directories older than this are leftovers of killed runs.
STALE_AFTER_S = 6 * 3600
_MAX_PENDING = 2
CSV_COLUMNS = ("id", "text", "format", "actual_harm", "buddhist_weighted_score", "buddhist_alignment", "difficulty")


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
        self._writers: dict[str, pq.ParquetWriter] = {}
        self._pending: deque[Future[None]] = deque()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="parquet")
        # The CSV first: an unusable --csv path fails before anything is created under the data root.
        self.csv_path = csv_path
        self._csv_tmp = None
        self._csv = None
        if csv_path is not None:
            self._csv_tmp = csv_path.with_name(f".{csv_path.name}.{os.getpid()}.tmp")
            try:
                self._csv = pcsv.CSVWriter(self._csv_tmp, schema=_csv_schema(schema))
            except (OSError, pa.ArrowException) as exc:
                self.abort()
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
                raise InputError(f"CSV output not writable: {csv_path} ({reason})") from None
        try:
            self.datasets.mkdir(parents=True, exist_ok=True)
            _remove_stale_temporaries(self.datasets)
            self.tmp.mkdir()
        except OSError as exc:
            self.abort()
            raise InputError(f"output directory not writable: {self.datasets} ({exc.strerror})") from None
        self.rows = {"train": 0, "eval": 0}
        #: Other files of the dataset (preference pairs): name -> rows.
        self.extra: dict[str, int] = {}
        self._with_eval = with_eval
        # Parquet encoding runs on its own thread (it releases the GIL) while the next batch is
        # prepared; at most _MAX_PENDING batches wait, so memory stays bounded.
        self._writers = {
            split: pq.ParquetWriter(self.tmp / f"{split}.parquet", schema, compression="zstd", compression_level=1)
            for split in (("train", "eval") if with_eval else ("train",))
        }

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is not None:
            self.abort()

    def write(self, batch: pa.RecordBatch, in_eval: np.ndarray) -> None:
        if "eval" in self._writers and in_eval.any():
            parts = {"train": batch.filter(pa.array(~in_eval)), "eval": batch.filter(pa.array(in_eval))}
        else:
            parts = {"train": batch}
        for split, part in parts.items():
            self.rows[split] += len(part)
        while len(self._pending) >= _MAX_PENDING:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(self._write_parts, parts, batch))

    def _write_parts(self, parts: dict[str, pa.RecordBatch], batch: pa.RecordBatch) -> None:
        for split, part in parts.items():
            if len(part):
                self._writers[split].write_batch(part)
        if self._csv is not None:
            self._csv.write_batch(batch.select(list(CSV_COLUMNS)))

    def write_pairs(self, pairs: pa.Table, in_eval: np.ndarray) -> dict[str, int]:
        """``pairs-train.parquet`` (and ``pairs-eval.parquet`` with an eval split) into the unpublished directory."""
        parts = {"train": pairs.filter(pa.array(~in_eval)), "eval": pairs.filter(pa.array(in_eval))}
        counts = {}
        for split, part in parts.items():
            counts[split] = len(part)
            if split == "eval" and not self._with_eval:
                continue
            name = f"pairs-{split}.parquet"
            pq.write_table(part, self.tmp / name, compression="zstd", compression_level=1)
            self.extra[name] = len(part)
        return counts

    def _drain(self) -> None:
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True)

    def publish(self, manifest: dict[str, Any]) -> Path:
        """Close the files, write the manifest, rename into place, then point LATEST at it."""
        self._drain()
        for writer in self._writers.values():
            writer.close()
        manifest = {
            **manifest,
            "files": {
                f"{split}.parquet": {"rows": self.rows[split], "bytes": (self.tmp / f"{split}.parquet").stat().st_size}
                for split in self._writers
            }
            | {name: {"rows": rows, "bytes": (self.tmp / name).stat().st_size} for name, rows in self.extra.items()},
        }
        _write_synced(self.tmp / MANIFEST, json.dumps(manifest, indent=2, default=str) + "\n")
        for name in [*(f"{split}.parquet" for split in self._writers), *self.extra]:
            _fsync(self.tmp / name)
        os.rename(self.tmp, self.final)
        _fsync(self.datasets)
        latest_tmp = self.datasets / f"{TMP_PREFIX}{LATEST}-{os.getpid()}"
        _write_synced(latest_tmp, self.dataset_id + "\n")
        os.replace(latest_tmp, self.datasets / LATEST)
        _fsync(self.datasets)
        if self._csv is not None and self._csv_tmp is not None and self.csv_path is not None:
            self._csv.close()
            os.replace(self._csv_tmp, self.csv_path)
        return self.final

    def abort(self) -> None:
        """Remove everything this run wrote; the published datasets are untouched."""
        with contextlib.suppress(Exception):
            self._drain()
        for writer in [*self._writers.values(), *([self._csv] if self._csv is not None else [])]:
            with contextlib.suppress(OSError, pa.ArrowException):
                writer.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
        if self._csv_tmp is not None:
            # On a read-only file system even removing a file that is not there fails (EROFS).
            with contextlib.suppress(OSError):
                self._csv_tmp.unlink(missing_ok=True)


def _csv_schema(schema: pa.Schema) -> pa.Schema:
    return pa.schema([schema.field(name) for name in CSV_COLUMNS])


def _remove_stale_temporaries(datasets: Path) -> None:
    cutoff = time.time() - STALE_AFTER_S
    for entry in datasets.glob(f"{TMP_PREFIX}*"):
        try:
            if entry.stat().st_mtime < cutoff:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        except OSError:
            continue


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync(path: Path) -> None:
    """Flush a file's or a directory's entries to disk (a rename is durable once its directory is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
