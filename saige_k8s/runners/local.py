"""The local runner: the pipeline's steps as subprocesses on this machine.

Each step is the same command a Kubernetes pod would run (``runners.commands``); steps
hand over through the data root only, plus the extract step's one-line JSON summary.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saige_k8s import metrics as prometheus
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

#: Under the data root: the pipeline's metrics.prom-style file, pipeline-NAME.prom.
METRICS_DIR = "metrics"


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


def run_local(
    spec: PipelineSpec, spec_path: Path, data_root: Path, run_id: str | None = None, pushgateway: str | None = None
) -> LocalRun:
    """Run the pipeline's steps here; afterwards, success or failure, write and push its
    pipeline metrics (a failure still raises its own error). The steps push their own
    metrics to ``pushgateway`` too (passed on as ``$SAIGE_PUSHGATEWAY_URL``)."""
    started = time.time()
    succeeded = False
    try:
        result = _run(spec, spec_path, data_root, run_id or new_run_id(spec.name), pushgateway)
        succeeded = True
        return result
    finally:
        _record(spec.name, data_root, pushgateway, succeeded, started, time.time())


def _record(
    pipeline: str, data_root: Path, gateway: str | None, succeeded: bool, started: float, finished: float
) -> None:
    try:
        directory = data_root / METRICS_DIR
        directory.mkdir(parents=True, exist_ok=True)
        prometheus.write_pipeline_textfile(directory, pipeline, succeeded, started, finished)
    except OSError as exc:
        log.warning("could not write the pipeline metrics: %s", exc)
    prometheus.push_pipeline_result(pipeline, gateway, succeeded, started, finished)


def _run(spec: PipelineSpec, spec_path: Path, data_root: Path, run_id: str, pushgateway: str | None) -> LocalRun:
    programs = Programs.local()
    env = {**os.environ, prometheus.PUSHGATEWAY_ENV: pushgateway} if pushgateway else None
    data_root.mkdir(parents=True, exist_ok=True)
    if spec.collect is not None:
        # Locally the command runs as given; secret_env values must already be in this environment.
        _step("collect", list(spec.collect.command), env={**os.environ, **(env or {}), **spec.collect.env})
    demo = spec.source.demo
    if demo is not None and spec.source.url and "://" not in spec.source.url:
        target = Path(spec.source.url).expanduser()
        if not target.exists():
            _step("demo-db", demo_db_command(programs, str(target), demo.rows, demo.seed))
    summary = json.loads(
        _step("extract", extract_command(programs, str(spec_path), str(data_root), run_id), capture=True, env=env)
        .strip()
        .splitlines()[-1]
    )
    check_min_examples(summary, spec.extract.min_examples)
    run_dir = data_root / "runs" / run_id
    processes = _local_processes(spec.train.gpus)
    _step(
        "train",
        train_command(programs, str(spec_path), str(data_root), summary["dataset_id"], str(run_dir), processes),
        env=env,
    )
    if spec.train.export:
        _step("export", export_command(programs, str(run_dir)))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return LocalRun(run_id, summary, run_dir, metrics)


def _local_processes(gpus: int) -> int:
    return max(1, min(gpus, local_gpus()))


def _step(name: str, command: list[str], capture: bool = False, env: dict[str, str] | None = None) -> str:
    log.info("step %s: %s", name, " ".join(command))
    try:
        done = subprocess.run(command, stdout=subprocess.PIPE if capture else None, text=True, check=False, env=env)
    except OSError as exc:
        raise RuntimeFailure(f"step {name} could not start: {exc}") from None
    if done.returncode != 0:
        raise StepFailed(name, done.returncode)
    return done.stdout or ""
