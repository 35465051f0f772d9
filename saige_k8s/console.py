"""Progress on a terminal, log lines elsewhere: a bar needs a terminal with a width; pod logs,
pipes and files get periodic log lines instead (never carriage-return bars)."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Protocol

#: tqdm reads its TQDM_* defaults once, when it is imported.
TQDM_DISABLE = "TQDM_DISABLE"


def interactive() -> bool:
    """Whether stderr is a terminal a bar can be drawn on (a TTY that reports a width)."""
    try:
        return sys.stderr.isatty() and os.get_terminal_size(sys.stderr.fileno()).columns > 0
    except (AttributeError, OSError, ValueError):
        return False


def bars_only_on_a_terminal() -> None:
    """Off a terminal, turn off every tqdm bar, the libraries' too (transformers' weight loading,
    GGUF de-quantising), which would otherwise write carriage returns into a pod's log.

    Call it before anything imports tqdm; the variable reaches the steps a runner starts too."""
    if not interactive():
        os.environ.setdefault(TQDM_DISABLE, "1")


class Progress(Protocol):
    #: Whether a bar is drawn (a caller's own log lines would break it).
    on_screen: bool

    def update(self, n: int) -> None: ...

    def set_postfix(self, **values: Any) -> None: ...

    def close(self) -> None: ...


class _Silent:
    on_screen = False

    def update(self, n: int) -> None:
        pass

    def set_postfix(self, **values: Any) -> None:
        pass

    def close(self) -> None:
        pass


class _Bar:
    """tqdm, with a total that is only an estimate: past it, the total grows with the count."""

    on_screen = True

    def __init__(self, bar: Any) -> None:
        self._bar = bar

    def update(self, n: int) -> None:
        if self._bar.total is not None and self._bar.n + n > self._bar.total:
            self._bar.total = self._bar.n + n
        self._bar.update(n)

    def set_postfix(self, **values: Any) -> None:
        self._bar.set_postfix(**values)

    def close(self) -> None:
        self._bar.refresh()  # the final count, which the last update may have skipped (mininterval)
        self._bar.close()


class _LogLines(_Silent):
    """Off a terminal: a log line every ``every_s`` seconds, with the rate and, given a total, the time left."""

    def __init__(self, log: logging.Logger, desc: str, unit: str, total: int | None, every_s: float) -> None:
        self._log, self._desc, self._unit, self._total, self._every_s = log, desc, unit, total, every_s
        self._started = self._last = time.monotonic()
        self._n = 0

    def update(self, n: int) -> None:
        self._n += n
        now = time.monotonic()
        if now - self._last < self._every_s:
            return
        self._last = now
        rate = self._n / max(now - self._started, 1e-9)
        if self._total and self._n < self._total:
            left = (self._total - self._n) / rate if rate else float("inf")
            self._log.info(
                "%s: %s of about %s %s (%.0f %%), %s/s, about %s left",
                *(self._desc, f"{self._n:,}", f"{self._total:,}", self._unit, 100 * self._n / self._total),
                *(f"{rate:,.0f}", _duration(left)),
            )
        else:
            self._log.info("%s: %s %s, %s/s", self._desc, f"{self._n:,}", self._unit, f"{rate:,.0f}")


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "unknown time"
    minutes, s = divmod(round(seconds), 60)
    return f"{minutes} min {s} s" if minutes else f"{s} s"


def progress(
    desc: str,
    unit: str,
    total: int | None = None,
    *,
    enabled: bool = True,
    log: logging.Logger | None = None,
    every_s: float = 30.0,
    **bar_options: Any,
) -> Progress:
    """A bar on a terminal (with an ETA when ``total`` is known, even roughly); elsewhere, log
    lines through ``log`` every ``every_s`` seconds, or nothing where the caller logs its own."""
    if not enabled:
        return _Silent()
    if interactive():
        from tqdm import tqdm

        return _Bar(tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, **bar_options))
    if log is not None:
        return _LogLines(log, desc, unit.strip(), total, every_s)
    return _Silent()
