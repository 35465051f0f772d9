"""Running benchmark trainers interleaved (A B A B …), each in its own process, and their medians.

On a shared machine the load changes while a benchmark runs; trainers that take turns see
about the same load, and CPU-seconds (what the process itself spent, all threads) beside wall
time show how much of a difference is the machine's. Each child prints one JSON line (``report``)
with the wall and CPU seconds of its training (``timed``) and its peak RSS.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any


@contextmanager
def timed(result: dict[str, Any]) -> Iterator[None]:
    """Wall and CPU seconds of the block, into ``result``."""
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    result["train_seconds"] = time.perf_counter() - wall
    result["train_cpu_seconds"] = time.process_time() - cpu


def report(result: dict[str, Any]) -> None:
    """The child's one JSON line, with its peak RSS in MiB (Linux counts ru_maxrss in KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({**result, "peak_rss_mib": peak}))


def interleaved(kinds: Sequence[str], command: Callable[[str, int], list[str]], rounds: int) -> dict[str, list[dict]]:
    """``rounds`` rounds of every kind in turn, each in a fresh process; per kind, its runs' results."""
    results: dict[str, list[dict]] = {kind: [] for kind in kinds}
    for i in range(rounds):
        for kind in kinds:
            done = subprocess.run(
                command(kind, i), capture_output=True, text=True, check=False, env={**os.environ, "HF_HUB_OFFLINE": "1"}
            )
            if done.returncode != 0:
                sys.exit(f"{kind} failed:\n{done.stderr[-4000:]}")
            results[kind].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"  round {i + 1} {kind}: {results[kind][-1]}", file=sys.stderr, flush=True)
    return results


def median(runs: Sequence[dict[str, Any]], key: str) -> float:
    return statistics.median(float(r[key]) for r in runs)
