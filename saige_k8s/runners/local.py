"""The local runner: the pipeline's steps as subprocesses on this machine.

Each step is the same command a Kubernetes pod would run (``runners.commands``); steps
hand over through the data root only, plus the extract step's one-line JSON summary.
"""

from __future__ import annotations

import json
import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saige_k8s.errors import RuntimeFailure, SaigeError
from saige_k8s.runners.commands import (
    Programs,
    check_min_examples,
    demo_db_command,
    export_command,
    extract_command,
    new_run_id,
    train_command,
)
from saige_k8s.spec import PipelineSpec
from saige_k8s.training.devices import local_gpus

log = logging.getLogger(__name__)


class StepFailed(SaigeError):
    """A step exited non-zero; the pipeline exits with the step's own code."""

    def __init__(self, step: str, code: int) -> None:
        super().__init__(f"step {step} failed with exit code {code} (its error is above)")
        self.exit_code = code if code in (1, 2) else 1


@dataclass(frozen=True)
class LocalRun:
    run_id: str
    dataset: dict[str, Any]
    run_dir: Path
    metrics: dict[str, Any]


def run_local(spec: PipelineSpec, spec_path: Path, data_root: Path, run_id: str | None = None) -> LocalRun:
    programs = Programs.local()
    run_id = run_id or new_run_id(spec.name)
    data_root.mkdir(parents=True, exist_ok=True)
    demo = spec.source.demo
    if demo is not None and spec.source.url and "://" not in spec.source.url:
        target = Path(spec.source.url).expanduser()
        if not target.exists():
            _step("demo-db", demo_db_command(programs, str(target), demo.rows, demo.seed))
    summary = json.loads(
        _step("extract", extract_command(programs, str(spec_path), str(data_root), run_id), capture=True)
        .strip()
        .splitlines()[-1]
    )
    check_min_examples(summary, spec.extract.min_examples)
    run_dir = data_root / "runs" / run_id
    processes = _local_processes(spec.train.gpus)
    _step(
        "train", train_command(programs, str(spec_path), str(data_root), summary["dataset_id"], str(run_dir), processes)
    )
    if spec.train.export:
        _step("export", export_command(programs, str(run_dir)))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return LocalRun(run_id, summary, run_dir, metrics)


def _local_processes(gpus: int) -> int:
    return max(1, min(gpus, local_gpus()))


def _step(name: str, command: list[str], capture: bool = False) -> str:
    log.info("step %s: %s", name, " ".join(command))
    try:
        done = subprocess.run(command, stdout=subprocess.PIPE if capture else None, text=True, check=False)
    except OSError as exc:
        raise RuntimeFailure(f"step {name} could not start: {exc}") from None
    if done.returncode != 0:
        raise StepFailed(name, done.returncode)
    return done.stdout or ""
