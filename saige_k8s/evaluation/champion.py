"""The champion pointer and its history on the shared volume.

``<data_root>/models/<pipeline>/CHAMPION`` names the run whose adapter serves; ``history.jsonl`` says
how it got there, one verdict per line. Steps in different pods, and people, change these at any
moment and may be killed at any moment, so every change happens under an exclusive ``flock``,
CHAMPION is only ever replaced whole (a reader sees the old id or the new one, never a mix), and a
line torn by a kill mid-append is skipped on reading and cut off before the next append.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

from saige_k8s.errors import InputError, RuntimeFailure
from saige_k8s.temporaries import fsync_path

log = logging.getLogger(__name__)

CHAMPION: Final = "CHAMPION"
HISTORY: Final = "history.jsonl"
LOCK: Final = ".lock"
#: A Kubernetes object name (DNS-1123 label): run ids name Jobs and directories.
DNS_LABEL: Final = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")

HistoryVerdict = Literal["promoted", "rejected", "promote", "rollback"]
By = Literal["evaluate", "human"]
VERDICTS: Final = ("promoted", "rejected", "promote", "rollback")
BY: Final = ("evaluate", "human")
#: Verdicts after which the entry's run is the champion.
_CROWNING: Final = ("promoted", "promote")


class ChampionStore:
    """One pipeline's champion and history; safe to use from several processes at once."""

    def __init__(self, data_root: Path | str, pipeline: str) -> None:
        if not isinstance(pipeline, str) or not DNS_LABEL.fullmatch(pipeline):
            raise InputError(f"pipeline name {pipeline!r} is not a DNS label (lowercase letters, digits, '-')")
        self.pipeline = pipeline
        self.directory = Path(data_root) / "models" / pipeline

    @property
    def champion_path(self) -> Path:
        return self.directory / CHAMPION

    @property
    def history_path(self) -> Path:
        return self.directory / HISTORY

    def champion(self) -> str | None:
        """The serving run id, or None before the first promotion."""
        try:
            text = self.champion_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise RuntimeFailure(f"cannot read {self.champion_path}: {exc}") from exc
        run_id = text.strip()
        if not run_id:
            return None
        if not DNS_LABEL.fullmatch(run_id):
            raise InputError(f"{self.champion_path} holds {run_id[:80]!r}, which is not a run id")
        return run_id

    def history(self) -> list[dict[str, Any]]:
        """Every readable entry, oldest first; a torn or garbled line is skipped with a warning."""
        with self._shared_lock():
            return self._read_history()

    def record(self, entry: Mapping[str, Any]) -> dict[str, Any]:
        """Append one verdict (``run_id`` and ``verdict`` required; the rest defaulted) durably."""
        with self._exclusive_lock():
            full, line = _encode(entry)  # stamped under the lock, so times follow the file's order
            self._append(line)
        return full

    def reject(self, run_id: str, **lineage: Any) -> dict[str, Any]:
        """Record that the gate kept the champion; CHAMPION is left alone (``lineage``: as for ``promote``)."""
        return self.record(_verdict(run_id, "rejected", "evaluate", **lineage))

    def promote(
        self,
        run_id: str,
        *,
        dataset_id: str | None = None,
        base_model: str | None = None,
        reasons: Sequence[str] = (),
        figures: Mapping[str, Any] | None = None,
        by: By = "evaluate",
    ) -> dict[str, Any]:
        """Make ``run_id`` the champion, then record it (``promoted`` by the gate, ``promote`` by a person)."""
        _check_run_id(run_id)
        _check_by(by)
        verdict = "promoted" if by == "evaluate" else "promote"
        entry = _verdict(
            run_id, verdict, by, dataset_id=dataset_id, base_model=base_model, reasons=reasons, figures=figures
        )
        with self._exclusive_lock():
            full, line = _encode(entry)  # a bad entry is refused before CHAMPION changes
            self._swap(run_id)
            self._append(line)
        return full

    def rollback(self, *, reasons: Sequence[str] = (), by: By = "human") -> str:
        """Restore the champion before the current one (rejected runs never were champions)."""
        _check_by(by)
        with self._exclusive_lock():
            current = self.champion()
            if current is None:
                raise InputError(f"pipeline {self.pipeline} has no champion to roll back from")
            target = previous_champion(self._read_history(), current)
            if target is None:
                raise InputError(
                    f"nothing to roll back to: {current} is the first champion of pipeline {self.pipeline}"
                )
            _, line = _encode(
                {
                    "run_id": target,
                    "verdict": "rollback",
                    "reasons": [f"rolled back from {current}", *reasons],
                    "figures": {"from": current},
                    "by": by,
                }
            )
            self._swap(target)
            self._append(line)
        return target

    # --- internals: callers hold the exclusive lock --------------------------------------------

    def _read_history(self) -> list[dict[str, Any]]:
        try:
            data = self.history_path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise RuntimeFailure(f"cannot read {self.history_path}: {exc}") from exc
        return _parse_history(data, self.history_path)

    def _swap(self, run_id: str) -> None:
        """Replace CHAMPION whole: a temporary file, synced, renamed over it, the rename synced."""
        for stale in self.directory.glob(f".{CHAMPION}.*.tmp"):  # left by a killed writer; we hold the lock
            stale.unlink(missing_ok=True)
        tmp = self.directory / f".{CHAMPION}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, f"{run_id}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.champion_path)
        fsync_path(self.directory)

    def _append(self, line: bytes) -> None:
        """One write of one whole line, synced: a kill leaves at most a torn tail, never a spliced line."""
        created = not self.history_path.exists()
        fd = os.open(self.history_path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            self._repair_tail(fd)
            _write_all(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            fsync_path(self.directory)

    def _repair_tail(self, fd: int) -> None:
        """End the file with a newline: a torn line is cut off, so the next entry starts a line of its own."""
        size = os.fstat(fd).st_size
        if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
            return
        data = os.pread(fd, size, 0)
        start = data.rfind(b"\n") + 1
        if _entry(data[start:]) is not None:  # a complete entry that lost only its newline (a hand edit)
            _write_all(fd, b"\n")
            return
        log.warning(
            "%s: cutting off a torn last line (%d bytes) left by an interrupted write", self.history_path, size - start
        )
        os.ftruncate(fd, start)

    @contextmanager
    def _exclusive_lock(self) -> Iterator[None]:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.directory / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RuntimeFailure(f"cannot lock the champion store {self.directory}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            except OSError as exc:
                raise RuntimeFailure(f"cannot update the champion store {self.directory}: {exc}") from exc
        finally:
            os.close(fd)  # closing releases the lock

    @contextmanager
    def _shared_lock(self) -> Iterator[None]:
        """Readers wait for a writer mid-append; a store nobody has written to yet needs no lock."""
        try:
            fd = os.open(self.directory / LOCK, os.O_RDONLY)
        except FileNotFoundError:
            yield
            return
        except OSError as exc:
            raise RuntimeFailure(f"cannot lock the champion store {self.directory}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)


def _verdict(
    run_id: str,
    verdict: str,
    by: str,
    *,
    dataset_id: str | None = None,
    base_model: str | None = None,
    reasons: Sequence[str] = (),
    figures: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "dataset_id": dataset_id,
        "base_model": base_model,
        "verdict": verdict,
        "reasons": list(reasons),
        "figures": dict(figures or {}),
        "by": by,
    }


def previous_champion(history: Sequence[Mapping[str, Any]], current: str) -> str | None:
    """The champion before ``current``, replaying history as a stack (a rollback pops, so two go back two)."""
    stack: list[str] = []
    for entry in history:
        verdict, run_id = entry.get("verdict"), entry.get("run_id")
        if not isinstance(run_id, str):
            continue
        if verdict in _CROWNING and (not stack or stack[-1] != run_id):
            stack.append(run_id)
        elif verdict == "rollback":
            if run_id in stack:
                while stack[-1] != run_id:
                    stack.pop()
            else:
                stack.append(run_id)
    # CHAMPION is replaced before its history line is written: a kill between the two leaves a
    # champion that history does not know, whose predecessor is then the top of the stack.
    while stack and stack[-1] == current:
        stack.pop()
    return stack[-1] if stack else None


def _parse_history(data: bytes, path: Path) -> list[dict[str, Any]]:
    lines = data.split(b"\n")
    torn = lines.pop()  # b"" when the file ends with a newline, as it does unless a write was cut short
    entries = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        entry = _entry(line)
        if entry is None:
            log.warning("%s: skipping line %d, which is not a JSON object", path, number)
        else:
            entries.append(entry)
    if torn.strip():
        entry = _entry(torn)
        if entry is None:
            log.warning("%s: skipping a torn last line (%d bytes) left by an interrupted write", path, len(torn))
        else:
            entries.append(entry)
    return entries


def _entry(line: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except (UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _encode(entry: Mapping[str, Any]) -> tuple[dict[str, Any], bytes]:
    full = _complete(entry)
    try:
        text = json.dumps(full, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InputError(f"a history entry must be plain JSON: {exc}") from None
    return full, (text + "\n").encode()


def _complete(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The entry with every field present, checked, and JSON-safe."""
    if "run_id" not in entry or "verdict" not in entry:
        raise InputError("a history entry needs a run_id and a verdict")
    _check_run_id(entry["run_id"])
    if entry["verdict"] not in VERDICTS:
        raise InputError(f"verdict {entry['verdict']!r} is not one of {', '.join(VERDICTS)}")
    by = entry.get("by", "evaluate")
    _check_by(by)
    reasons = entry.get("reasons") or []
    if isinstance(reasons, str) or not all(isinstance(r, str) for r in reasons):
        raise InputError("a history entry's reasons must be a list of sentences")
    full = {
        "run_id": entry["run_id"],
        "dataset_id": entry.get("dataset_id"),
        "base_model": entry.get("base_model"),
        "verdict": entry["verdict"],
        "reasons": list(reasons),
        "figures": _json_safe(dict(entry.get("figures") or {})),
        "time": entry.get("time") or datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "by": by,
    }
    extra = set(entry) - set(full)
    if extra:
        raise InputError(f"unknown history fields: {', '.join(sorted(extra))}")
    return full


def _json_safe(value: Any) -> Any:
    """NaN and infinity become null (strict JSON readers refuse them); numpy scalars become Python's."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _check_run_id(run_id: object) -> None:
    if not isinstance(run_id, str) or not DNS_LABEL.fullmatch(run_id):
        raise InputError(f"run id {run_id!r} is not a DNS label (lowercase letters, digits, '-'; at most 63)")


def _check_by(by: object) -> None:
    if by not in BY:
        raise InputError(f"by must be one of {', '.join(BY)}, not {by!r}")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
