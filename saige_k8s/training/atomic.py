"""Outputs a reader sees whole or not at all, on a shared volume that pods are killed on.

A file or directory is written to a temporary sibling named after the writer's PID
(``.NAME.PID.tmp`` for a file, ``.tmp-NAME-PID`` for a directory), then renamed into place.
A temporary left by a killed process is removed by the next run (``remove_stale``).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

from saige_k8s.errors import RuntimeFailure
from saige_k8s.temporaries import fsync_path, pid_alive

_FILE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$")
_DIR = re.compile(r"^\.tmp-(?P<name>.+)-(?P<pid>\d+)$")
#: The previous version of a directory, moved aside for the moment of the swap.
_ASIDE = ".old"


def temp_file(path: Path, pid: int | None = None) -> Path:
    return path.with_name(f".{path.name}.{pid or os.getpid()}.tmp")


def temp_dir(path: Path, pid: int | None = None) -> Path:
    return path.with_name(f".tmp-{path.name}-{pid or os.getpid()}")


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """An I/O error (a full volume, a lost mount) becomes one line naming what was being written."""
    try:
        yield
    except OSError as exc:
        raise RuntimeFailure(f"cannot write {path}: {exc.strerror or exc}") from None


def write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one rename; a failure leaves the old file and no temporary."""
    tmp = temp_file(path)
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def replacing_dir(path: Path, pid: int | None = None) -> Iterator[Path]:
    """An empty temporary directory to fill; when the block ends without an error it becomes ``path``."""
    tmp = temp_dir(path, pid)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(new: Path, path: Path) -> None:
    """Put directory ``new`` in ``path``'s place: the old one is renamed aside, the new one in, the old removed.

    A reader finds the old directory or the new one (or, for an instant, none), never a mix.
    A kill between the two renames leaves the old one aside; ``remove_stale`` puts it back.
    """
    aside = path.with_name(f".tmp-{path.name}{_ASIDE}-{os.getpid()}")
    _fsync_tree(new)
    shutil.rmtree(aside, ignore_errors=True)
    if path.exists():
        os.rename(path, aside)
    try:
        os.rename(new, path)
    except BaseException:
        if aside.exists() and not path.exists():
            os.rename(aside, path)
        raise
    fsync_path(path.parent)
    shutil.rmtree(aside, ignore_errors=True)


def remove_stale(directory: Path, names: set[str] | None = None) -> list[Path]:
    """Remove temporaries in ``directory`` whose writer is gone (of ``names`` only, if given).

    A temporary carrying this process's own PID is stale too: in a restarted container the
    new process often gets the PID (1) the killed one had. Returns what was removed.
    """
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in sorted(directory.iterdir()):
            match = _FILE.match(entry.name) or _DIR.match(entry.name)
            if match is None:
                continue
            name, pid = match["name"], int(match["pid"])
            original = name.removesuffix(_ASIDE)
            if (names is not None and original not in names) or (pid != os.getpid() and pid_alive(pid)):
                continue
            if name != original and entry.is_dir() and not (directory / original).exists():
                os.rename(entry, directory / original)  # killed mid-swap: the old version comes back
                continue
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def _fsync_tree(root: Path) -> None:
    """Sync every file, and make it readable by the group: a serving pod with another UID that
    shares the volume through ``fsGroup`` must read what was written (safetensors writes 0600)."""
    for path in [root, *root.rglob("*")]:
        mode = path.stat().st_mode
        wanted = mode | stat.S_IRGRP | (stat.S_IXGRP if path.is_dir() else 0)
        if wanted != mode:
            os.chmod(path, stat.S_IMODE(wanted))
        if path.is_file():
            fsync_path(path)
    fsync_path(root)
