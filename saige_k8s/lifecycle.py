"""Stopping on SIGTERM (a deleted or preempted pod) and SIGINT (Ctrl-C) within seconds.

Python runs a signal handler only between bytecodes of the main thread, so a main thread
stuck in a driver call (a connect to a silent server, a query waiting on a lock) never runs
it. The C-level handler also writes the signal number to a wakeup socket, and a watcher
thread reading it cancels the database work registered with ``cancel_on_stop``; if the
process is still there ``GRACE_S`` later, it removes the registered temporaries and exits.

The main thread's handler raises Interrupted at once, except while a loop that saves a
checkpoint polls ``stop_requested`` itself (``poll_stop``), and once the output is being
or has been published (``commit``): a run that got that far finishes and exits 0.

Stdlib only: the entry points install this before anything heavy is imported.
"""

from __future__ import annotations

import _thread
import atexit
import contextlib
import itertools
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

from saige_k8s.errors import Interrupted

#: Seconds from the signal to a forced exit, for a main thread that cannot unwind in time.
GRACE_S = 4.0
#: While a training loop polls (it saves a checkpoint first; Kubernetes waits 30 s by default).
POLL_GRACE_S = 25.0
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}

_lock = threading.RLock()
_stop = threading.Event()
_signum: int | None = None
_raised = False
_polling = False
_commit = "no"  # "no" | "running" | "done"
_commit_done = threading.Event()
_ids = itertools.count()
_cancels: dict[int, Callable[[], object]] = {}
_cleanups: dict[int, Callable[[], object]] = {}
_installed = False
_watching = threading.Event()
_retries = 0
_OWN_THREADS = ("signals", "stop-deadline")


def install() -> None:
    """Handle SIGTERM and SIGINT from here on (main thread; a second call does nothing)."""
    global _installed  # noqa: PLW0603
    if _installed or threading.current_thread() is not threading.main_thread():
        return
    _installed = True
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    threading.Thread(target=_watch, args=(reader, writer), name="signals", daemon=True).start()
    sys.unraisablehook = _unraisable
    for signum in EXIT_CODES:
        signal.signal(signum, _handle)


def installed() -> bool:
    return _installed


def reason() -> str:
    return "interrupted" if _signum == signal.SIGINT else "stopped by SIGTERM"


def exit_code() -> int | None:
    """The exit code of the signal that stopped this process, or None (no signal)."""
    return EXIT_CODES.get(_signum) if _signum is not None else None  # type: ignore[call-overload]


def check_stop() -> None:
    if _stop.is_set():
        raise Interrupted(f"{reason()}; partial output removed")


def stop_requested() -> bool:
    """For loops that must checkpoint before they stop (training)."""
    return _stop.is_set()


def poll_stop(enabled: bool) -> None:
    """From here on (True) the caller polls ``stop_requested`` and the handler only records."""
    global _polling  # noqa: PLW0603
    _polling = enabled
    if not enabled:
        check_stop()


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A stop during the block is raised when it ends, not inside it: native code that calls back
    into Python (torch's import) aborts the process when an exception is raised through it."""
    global _polling  # noqa: PLW0603
    before = _polling
    _polling = True
    try:
        yield
    finally:
        _polling = before
    if not before:
        check_stop()


@contextlib.contextmanager
def commit() -> Iterator[None]:
    """The step that makes the output visible: a signal before it stops the run, one during or
    after it lets the run finish (its output is complete)."""
    global _commit  # noqa: PLW0603
    with _lock:
        check_stop()
        _commit = "running"
    try:
        yield
    except BaseException:
        _commit = "no"
        raise
    else:
        _commit = "done"
    finally:
        _commit_done.set()


def committed() -> bool:
    return _commit == "done"


def settle() -> None:
    """The outcome is decided (an error is being reported): a signal no longer interrupts."""
    global _raised  # noqa: PLW0603
    _raised = True


def cancel_running() -> None:
    """Cancel the registered database work now (a failed step stops its other queries)."""
    _cancel_all()


def stopped(message: str, code: int) -> NoReturn:
    """Report a stop that came before the command line could (it was still being imported)."""
    settle()
    with contextlib.suppress(Exception):
        sys.stderr.write(f"saige-k8s: error: {message}\n")
    exit_process(exit_code() or code)


def exit_process(code: int | str | None) -> NoReturn:
    """End the process with ``code``, no signal can turn it into another.

    Signals are ignored from here. The interpreter's teardown of its modules is skipped (about
    0.3 s of every command with SQLAlchemy, pyarrow and pandas loaded): every file and
    connection is closed by its own block by now, and the exit callbacks still run. After a
    stop, or while a worker thread is still inside a driver call, they do not: a daemon thread
    returning from C code meanwhile could abort the process. A live non-daemon thread gets the
    ordinary exit, which waits for it.
    """
    settle()
    if isinstance(code, str):
        sys.stderr.write(code + "\n")
        code = 1
    code = code or 0
    if threading.current_thread() is threading.main_thread():
        for signum in EXIT_CODES:
            signal.signal(signum, signal.SIG_IGN)
    others = [t for t in threading.enumerate() if t is not threading.current_thread() and t.is_alive()]
    busy = any(t.daemon and t.name not in _OWN_THREADS for t in others)
    if not (_stop.is_set() or busy):
        if any(not t.daemon for t in others):
            sys.exit(code)
        atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


@contextlib.contextmanager
def cancel_on_stop(cancel: Callable[[], object]) -> Iterator[None]:
    """Call ``cancel`` (from another thread) if a stop comes while this block runs."""
    key = next(_ids)
    _cancels[key] = cancel
    try:
        if _stop.is_set():
            _quietly(cancel)
        yield
    finally:
        _cancels.pop(key, None)


@contextlib.contextmanager
def remove_on_forced_exit(remove: Callable[[], object]) -> Iterator[None]:
    """Run ``remove`` if the process has to exit without unwinding (see ``GRACE_S``)."""
    key = next(_ids)
    _cleanups[key] = remove
    try:
        yield
    finally:
        _cleanups.pop(key, None)


def _record(signum: int) -> bool:
    """True for the first stop request."""
    global _signum  # noqa: PLW0603
    with _lock:
        first = _signum is None
        if first:
            _signum = signum
        _stop.set()
    return first


def _handle(signum: int, frame: object) -> None:
    global _raised  # noqa: PLW0603
    _record(signum)
    if not _watching.is_set():  # no watcher thread: cancel from here
        _cancel_all()
    if _raised or _polling or _commit != "no":
        return
    _raised = True
    raise Interrupted(f"{reason()}; partial output removed")


def _unraisable(unraisable: Any) -> None:
    """Python prints and drops an exception raised where it cannot propagate (``__del__``, a
    weakref callback): when that is the stop, raise it again a moment later instead."""
    global _raised, _retries  # noqa: PLW0603
    if isinstance(unraisable.exc_value, Interrupted) and _signum is not None:
        with _lock:
            _raised = False
            _retries += 1
        threading.Timer(0.02, _thread.interrupt_main, args=(_signum,)).start()
        return
    _previous_unraisablehook(unraisable)


_previous_unraisablehook = sys.unraisablehook


def _watch(reader: socket.socket, writer: socket.socket) -> None:
    global _retries  # noqa: PLW0603
    _watching.set()
    deliveries = 0
    while True:
        try:
            data = reader.recv(64)
        except OSError:  # pragma: no cover
            return
        for signum in data:
            if signum not in EXIT_CODES:
                continue
            with _lock:
                retry = _retries > 0
                if retry:  # our own repeat of a signal that came during a finalizer
                    _retries -= 1
            if retry:
                continue
            deliveries += 1
            _record(signum)
            if deliveries == 1:
                _cancel_all()
                grace = POLL_GRACE_S if _polling else GRACE_S
                threading.Thread(target=_deadline, args=(grace,), name="stop-deadline", daemon=True).start()
            else:  # asked twice: do not wait for the unwinding
                _force_exit()


def _cancel_all() -> None:
    for cancel in list(_cancels.values()):
        _quietly(cancel)


def _deadline(grace: float) -> None:
    time.sleep(grace)
    _force_exit()


def _force_exit() -> None:
    """The main thread did not unwind in time: remove what it registered, exit with the code."""
    if _commit == "running":  # let a publish that has started finish (a rename and an fsync)
        _commit_done.wait(GRACE_S)
    if _commit == "done":
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        os._exit(0)
    for remove in list(_cleanups.values()):
        _quietly(remove)
    with contextlib.suppress(Exception):
        sys.stderr.write(f"saige-k8s: error: {reason()}; partial output removed\n")
        sys.stderr.flush()
    os._exit(exit_code() or 143)


def _quietly(call: Callable[[], object]) -> None:
    with contextlib.suppress(Exception):
        call()
