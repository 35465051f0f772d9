"""Progress on a terminal, log lines elsewhere: a bar needs a terminal with a width; pod logs,
pipes and files get periodic log lines instead (never carriage-return bars)."""

from __future__ import annotations

import os
import sys

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
