"""The local backend: the pipeline's steps as processes on this machine.

Each step runs the command a Kubernetes pod would run (the spec's step table); steps hand
over through the data root only. What a pod's status and log are to ``status`` and ``logs``
on a cluster, ``DATA_ROOT/pipelines/RUN/STEP.json`` and ``STEP.log`` are here, so those
commands answer for local runs too, from another terminal.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from saige_k8s import lifecycle
from saige_k8s import metrics as prometheus
from saige_k8s.errors import CandidateRejected, InputError, Interrupted, RuntimeFailure
from saige_k8s.lifecycle import stop_requested
from saige_k8s.runners.backend import Backend, Outcome, Run, Say, StepFailed, StepStatus, run_pipeline
from saige_k8s.spec import PipelineSpec, Programs, Step, StepContext, StepName
from saige_k8s.temporaries import pid_alive
from saige_k8s.training.devices import local_gpus

log = logging.getLogger(__name__)

#: Under the data root: the pipeline's metrics.prom-style file, pipeline-NAME.prom.
METRICS_DIR = "metrics"
#: Under the data root: each local run's step states and logs.
PIPELINES_DIR = "pipelines"
#: A step whose spec sets no deadline still stops after this long.
NO_DEADLINE_SECONDS = 7 * 24 * 3600
#: How long a step has to exit after SIGTERM before it is killed (within the runner's own
#: grace, after which it exits whatever its step does).
GRACE_SECONDS = int(lifecycle.POLL_GRACE_S) - 5

_FINISHED = ("Succeeded", "Failed", "Cancelled", "Rejected")
REJECTED_EXIT = CandidateRejected.exit_code


class LocalBackend(Backend):
    def __init__(self, data_root: Path, spec_path: Path | None = None, pushgateway: str | None = None) -> None:
        self.data_root = data_root
        self.spec_path = spec_path
        self.pushgateway = pushgateway
        self.where = f"data root {data_root}"

    def metrics_dir(self) -> Path:
        return self.data_root / METRICS_DIR

    # -- running ------------------------------------------------------------------------------

    def run_step(self, run: Run, step: Step, say: Say) -> dict[str, Any] | None:
        if self.spec_path is None:
            raise RuntimeFailure("this local backend was made without a spec file and cannot run steps")
        state_dir = self._run_dir(run.run_id)
        state_dir.mkdir(parents=True, exist_ok=True)
        summary_file = state_dir / f"{step.name}.summary.json"
        context = StepContext(
            spec=run.spec,
            programs=Programs.local(),
            spec_path=str(self.spec_path),
            data_root=str(self.data_root),
            run_id=run.run_id,
            processes=max(1, min(step.gpus(run.spec), local_gpus())) if step.gpus else 1,
            summary_file=str(summary_file) if step.reports else None,
        )
        env = {**os.environ, **step.env(run.spec)}
        if step.pushes_metrics and self.pushgateway:
            env[prometheus.PUSHGATEWAY_ENV] = self.pushgateway
        deadline = run.spec.kubernetes.pod(step.name).active_deadline_seconds or NO_DEADLINE_SECONDS
        state = _State(state_dir / f"{step.name}.json", run, step.name)
        summary_file.unlink(missing_ok=True)
        code = 0
        with (state_dir / f"{step.name}.log").open("ab") as log_file:
            for command in filter(None, (step.prepare(context), step.command(context))):
                say(f"{step.name}: {' '.join(command)}")
                code = self._process(state, command, env, log_file, deadline, rejects=step.rejects)
        state.finish("Succeeded" if code == 0 else "Rejected", code)
        if not step.reports:
            return None
        try:
            summary: dict[str, Any] = json.loads(summary_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise RuntimeFailure(f"step {step.name} succeeded but left no summary in {summary_file}") from None
        return summary

    def _process(
        self, state: _State, command: list[str], env: dict[str, str], log_file: IO[bytes], limit: int, rejects: bool
    ) -> int:
        """The process's exit code: 0, or a rejection from a step that reports its outcome."""
        try:
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        except OSError as exc:
            state.finish("Failed", None)
            raise RuntimeFailure(f"step {state.step} could not start: {exc}") from None
        state.start(process.pid)
        lock = threading.Lock()
        copies = [
            threading.Thread(target=_tee, args=(stream, log_file, lock), daemon=True)
            for stream in (process.stdout, process.stderr)
        ]
        for copy in copies:
            copy.start()
        # A stop is passed on to the step (it checkpoints and exits); this loop polls for it.
        lifecycle.poll_stop(True)
        try:
            with lifecycle.cancel_on_stop(process.terminate):
                code = _wait(process, limit)
        except BaseException:  # Ctrl-C reached the step too; record how it ended
            _stop(process)
            state.finish("Cancelled", process.returncode)
            raise
        finally:
            if not stop_requested():
                lifecycle.poll_stop(False)
        for copy in copies:
            copy.join(timeout=5)
        if code is None:
            state.finish("Failed", None)
            raise StepFailed(state.step, f"ran past its deadline of {limit} s and was stopped", 1)
        if stop_requested():
            state.finish("Cancelled", code)
            raise Interrupted(f"stopped by SIGTERM during step {state.step}")
        if code == REJECTED_EXIT and rejects:
            return code  # its summary says why; the pipeline's check on it ends the run
        if code != 0:
            state.finish("Failed", code)
            raise StepFailed(
                state.step, f"failed with exit code {code} (its error is above)", code if code in (1, 2) else 1
            )
        return code

    # -- status, logs, cancel -----------------------------------------------------------------

    def status(self, run_id: str | None = None) -> list[StepStatus]:
        root = self.data_root / PIPELINES_DIR
        pattern = f"{run_id}/*.json" if run_id else "*/*.json"
        rows = [_row(path) for path in root.glob(pattern) if not path.name.endswith(".summary.json")]
        return self.ordered([row for row in rows if row is not None])

    def logs(self, run_id: str, step: StepName | None, follow: bool) -> tuple[str, Iterable[str]]:
        chosen = self.pick(run_id, step)
        path = self._run_dir(run_id) / f"{chosen.step}.log"
        if not path.exists():
            raise InputError(f"step {chosen.step} of run {run_id} has no log yet (state: {chosen.state})")
        return str(path), _read_log(path, self._run_dir(run_id) / f"{chosen.step}.json", follow)

    def cancel(self, run_id: str) -> list[str]:
        rows = self.status(run_id)
        if not rows:
            raise InputError(f"no run {run_id!r} in {self.where} (saige-k8s status --local lists the runs)")
        stopped = []
        for row in rows:
            if row.state == "Running" and row.job.isdigit() and pid_alive(int(row.job)):
                os.kill(int(row.job), signal.SIGTERM)
                stopped.append(f"step {row.step} (process {row.job})")
        return stopped

    def _run_dir(self, run_id: str) -> Path:
        return self.data_root / PIPELINES_DIR / run_id


class _State:
    """A step's state file, replaced whole on each change so a reader never sees half of one."""

    def __init__(self, path: Path, run: Run, step: StepName) -> None:
        self.path, self.step = path, step
        self.values: dict[str, Any] = {"run_id": run.run_id, "pipeline": run.spec.name, "step": step}
        self._write(state="Pending", pid=None, started=_now(), finished="", exit_code=None)

    def start(self, pid: int) -> None:
        self._write(state="Running", pid=pid)

    def finish(self, state: str, exit_code: int | None) -> None:
        self._write(state=state, exit_code=exit_code, finished=_now())

    def _write(self, **values: Any) -> None:
        self.values.update(values)
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(self.values) + "\n", encoding="utf-8")
        temporary.replace(self.path)


def run_local(
    spec: PipelineSpec, spec_path: Path, data_root: Path, run_id: str, say: Say, pushgateway: str | None = None
) -> Outcome:
    """The pipeline on this machine; its steps push their metrics to ``pushgateway`` too."""
    data_root.mkdir(parents=True, exist_ok=True)
    return run_pipeline(LocalBackend(data_root, spec_path, pushgateway), Run(spec, run_id), say, pushgateway)


def _wait(process: subprocess.Popen[bytes], limit: int) -> int | None:
    """The step's exit code, or None when it ran past ``limit`` seconds (it is stopped then).

    A SIGTERM to the runner is passed on to the step, which checkpoints and exits.
    """
    ended = time.monotonic() + limit
    while process.poll() is None:
        if stop_requested():
            _stop(process)
            return process.returncode
        if time.monotonic() >= ended:
            _stop(process)
            return None
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=0.5)
    return process.returncode


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _tee(stream: IO[bytes] | None, log_file: IO[bytes], lock: threading.Lock) -> None:
    """The step's output to our stderr as it comes (progress bars too), and to its log."""
    if stream is None:
        return
    for chunk in iter(lambda: stream.read1(65536), b""):  # type: ignore[attr-defined]
        with lock:
            log_file.write(chunk)
            log_file.flush()
            sys.stderr.write(chunk.decode("utf-8", errors="replace"))
            sys.stderr.flush()


def _read_log(path: Path, state_path: Path, follow: bool) -> Iterator[str]:
    with path.open(encoding="utf-8", errors="replace") as lines:
        while True:
            line = lines.readline()
            if line:
                yield line.rstrip("\n")
                continue
            if not follow or _finished(state_path):
                rest = lines.read()
                yield from rest.splitlines()
                return
            time.sleep(0.5)


def _finished(state_path: Path) -> bool:
    try:
        return json.loads(state_path.read_text(encoding="utf-8")).get("state") in _FINISHED
    except (OSError, ValueError):
        return True


def _row(path: Path) -> StepStatus | None:
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    state = values.get("state", "?")
    pid = values.get("pid")
    if state == "Running" and not (isinstance(pid, int) and pid_alive(pid)):
        state = "Failed"  # the runner died with its step (killed, machine restarted)
    return StepStatus(
        run_id=values.get("run_id", path.parent.name),
        pipeline=values.get("pipeline", "?"),
        step=values.get("step", path.stem),
        job=str(pid) if pid else "",
        state=state,
        started=values.get("started", ""),
        finished=values.get("finished", ""),
    )


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
