"""Graceful stop on SIGTERM (what a preempted or deleted pod receives).

The handler only records the request; long-running steps call ``check_stop`` between units
of work and unwind from there, so cleanup never starts in the middle of a library call.
"""

from __future__ import annotations

import signal
import threading

from saige_k8s.errors import Interrupted

_stop = threading.Event()


def install_sigterm_handler() -> None:
    signal.signal(signal.SIGTERM, lambda signum, frame: _stop.set())


def check_stop() -> None:
    if _stop.is_set():
        raise Interrupted("stopped by SIGTERM; partial output removed")


def stop_requested() -> bool:
    """For loops that must checkpoint before they stop (training)."""
    return _stop.is_set()
