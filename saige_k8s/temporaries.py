"""Temporary files and directories that say whether their run is still alive.

A run holds an flock on each of its temporaries (on ``.lock`` inside a directory) for as
long as it lives; the kernel drops it when the process ends, SIGKILL included. The sweep of
leftovers removes only temporaries whose lock it can take, so a slow or paused run keeps
its files however old they are.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from pathlib import Path

LOCK = ".lock"
#: Temporaries without a lock (``.tmp-LATEST-PID``, or made by a version that did not lock)
#: older than this are leftovers of killed runs.
STALE_AFTER_S = 6 * 3600
#: SQLite's companions of a temporary database file.
SIDE_FILES = ("-journal", "-wal", "-shm")


def hold_lock(path: Path) -> int:
    """An flock on ``path`` for as long as this process lives or closes the descriptor.

    A new file is created and locked under another name, then renamed: under its own name it
    is never seen unlocked, so an unlocked one is always a leftover.
    """
    if path.exists():
        fd = os.open(path, os.O_RDWR)
    else:
        staging = path.with_name(f".{path.name}.{os.getpid()}.locking")
        fd = os.open(staging, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if not path.exists():
            os.rename(staging, path)
    except OSError:
        os.close(fd)
        raise
    return fd


def _owner_gone(lock: Path) -> bool | None:
    """True: nobody holds ``lock``'s flock (its run ended); None: there is no lock file."""
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def remove_stale_temporaries(directory: Path, pattern: str) -> None:
    """Remove leftovers of runs that ended: locked temporaries whose lock is free, unlocked ones
    older than STALE_AFTER_S. A temporary a live run holds is never touched."""
    cutoff = time.time() - STALE_AFTER_S
    for entry in directory.glob(pattern):
        try:
            if entry.is_dir():
                gone = _owner_gone(entry / LOCK)
                if gone is None:  # a run between its mkdir and its lock, or an old version's
                    gone = entry.stat().st_mtime < cutoff
            else:
                gone = _owner_gone(entry) is True
            if gone:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
                for sibling in SIDE_FILES:
                    Path(f"{entry}{sibling}").unlink(missing_ok=True)
        except OSError:
            continue


_claimed: list[int] = []


def claim(directory: Path, pattern: str) -> bool:
    """Lock ``directory`` for this process's lifetime and remove its ``pattern`` leftovers
    (names without a PID, such as ``checkpoints/.tmp-step-N``): while this process holds the
    lock no other live run uses the directory, so every such leftover is a dead run's. False,
    and nothing removed, when another live process holds it."""
    try:
        fd = hold_lock(directory / LOCK)
    except OSError:
        return False
    _claimed.append(fd)
    for entry in directory.glob(pattern):
        shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
    return True


def pid_alive(pid: int) -> bool:
    """Whether a process of that id exists (one of another user's counts too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's entries to disk (a rename is durable once its directory is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
