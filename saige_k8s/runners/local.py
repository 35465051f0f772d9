"""The local backend: the pipeline's steps as processes on this machine.

Each step runs the command a Kubernetes pod would run (the spec's step table); steps hand
over through the data root only. What a pod's status and log are to ``status`` and ``logs``
on a cluster, ``DATA_ROOT/pipelines/RUN/STEP.json`` and ``STEP.log`` are here, so those
commands answer for local runs too, from another terminal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
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
            master_port=_free_port(),
        )
        env = {**os.environ, **step.env(run.spec)}
        if step.pushes_metrics and self.pushgateway:
            env[prometheus.PUSHGATEWAY_ENV] = self.pushgateway
        deadline = run.spec.kubernetes.pod(step.name).active_deadline_seconds or NO_DEADLINE_SECONDS
        state = _State(state_dir / f"{step.name}.json", run, step.name)
        summary_file.unlink(missing_ok=True)
        nodes = step.nodes(run.spec) if step.nodes else 1
        if nodes > 1 and "OMP_NUM_THREADS" not in env:
            # The "machines" share this one's cores (torchrun only splits them among one node's processes).
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // (nodes * context.processes)))
        code = 0
        with contextlib.ExitStack() as files:
            logs: list[IO[bytes]] = [
                files.enter_context(node_log(state_dir, step.name, k).open("ab")) for k in range(nodes)
            ]
            prepare = step.prepare(context)
            if prepare:
                say(f"{step.name}: {' '.join(prepare)}")
                code = self._process(state, [prepare], env, logs[:1], deadline, rejects=step.rejects)
            # The nodes of a group: the same command line, each with its rank, on loopback.
            commands = [step.command(dataclasses.replace(context, node_rank=str(k))) for k in range(nodes)]
            for command in commands:
                say(f"{step.name}: {' '.join(command)}")
            code = self._process(state, commands, env, logs, deadline, rejects=step.rejects)
        state.finish("Succeeded" if code == 0 else "Rejected", code)
        if not step.reports:
            return None
        try:
            summary: dict[str, Any] = json.loads(summary_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise RuntimeFailure(f"step {step.name} succeeded but left no summary in {summary_file}") from None
        return summary

    def _process(
        self,
        state: _State,
        commands: list[list[str]],
        env: dict[str, str],
        logs: list[IO[bytes]],
        limit: int,
        rejects: bool,
    ) -> int:
        """The exit code of the processes (one, or a group's nodes): 0, or a rejection from a step that reports.

        A group succeeds or fails together, like its Indexed Job: the first node that fails
        stops the others. Each node is its own process group, so stopping or killing one
        takes its workers along, as losing a machine would.
        """
        group = len(commands) > 1
        processes = _spawn(state, commands, env, group)
        state.start([process.pid for process in processes])
        lock = threading.Lock()
        copies = [
            threading.Thread(target=_tee, args=(stream, log, lock, k == 0), daemon=True)
            for k, (process, log) in enumerate(zip(processes, logs, strict=True))
            for stream in (process.stdout, process.stderr)
        ]
        for copy in copies:
            copy.start()
        # A stop is passed on to the step (it checkpoints and exits); this loop polls for it.
        lifecycle.poll_stop(True)
        try:
            with lifecycle.cancel_on_stop(lambda: _signal_all(processes, signal.SIGTERM, group)):
                failed, code = _wait(processes, limit, group)
        except BaseException:  # Ctrl-C reached the step too; record how it ended
            for process in processes:
                _stop(process, group)
            state.finish("Cancelled", processes[0].returncode)
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
            where = f"node {failed} " if group else ""
            hint = f"its log: saige-k8s logs --local RUN --index {failed}" if group else "its error is above"
            raise StepFailed(state.step, f"{where}failed with exit code {code} ({hint})", code if code in (1, 2) else 1)
        return code

    # -- status, logs, cancel -----------------------------------------------------------------

    def status(self, run_id: str | None = None) -> list[StepStatus]:
        root = self.data_root / PIPELINES_DIR
        pattern = f"{run_id}/*.json" if run_id else "*/*.json"
        rows = [_row(path) for path in root.glob(pattern) if not path.name.endswith(".summary.json")]
        return self.ordered([row for row in rows if row is not None])

    def logs(
        self, run_id: str, step: StepName | None, follow: bool, index: int | None = None
    ) -> tuple[str, Iterable[str]]:
        chosen = self.pick(run_id, step)
        if index is not None and str(index) not in chosen.indexes:
            nodes = f"nodes 0 to {len(chosen.indexes) - 1}" if chosen.indexes else "one process, no index"
            raise InputError(f"step {chosen.step} of run {run_id} has no index {index} (it has {nodes})")
        path = node_log(self._run_dir(run_id), chosen.step, index or 0)
        if not path.exists():
            raise InputError(f"step {chosen.step} of run {run_id} has no log yet (state: {chosen.state})")
        return str(path), _read_log(path, self._run_dir(run_id) / f"{chosen.step}.json", follow)

    def cancel(self, run_id: str) -> list[str]:
        rows = self.status(run_id)
        if not rows:
            raise InputError(f"no run {run_id!r} in {self.where} (saige-k8s status --local lists the runs)")
        stopped = []
        for row in rows:
            if row.indexes:  # a group: each node with its workers
                for index, pid in _node_pids(self._run_dir(run_id) / f"{row.step}.json").items():
                    if pid_alive(pid):
                        os.killpg(pid, signal.SIGTERM)
                        stopped.append(f"step {row.step} node {index} (process {pid})")
            elif row.state == "Running" and row.job.isdigit() and pid_alive(int(row.job)):
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

    def start(self, pids: list[int]) -> None:
        """Running as these processes (a group's nodes, in rank order; each leads its process group)."""
        self._write(state="Running", pid=pids[0], **({"nodes": pids} if len(pids) > 1 else {}))

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


def _wait(processes: list[subprocess.Popen[bytes]], limit: int, group: bool) -> tuple[int, int | None]:
    """Which process ended the wait and its exit code (None: past ``limit`` seconds, all stopped).

    The first to fail, or the first stopped by a signal, ends the others' run too; a SIGTERM
    to the runner is passed on to the step, which checkpoints and exits.
    """
    ended = time.monotonic() + limit
    while True:
        codes = [process.poll() for process in processes]
        failed = next((k for k, code in enumerate(codes) if code not in (None, 0)), None)
        if failed is not None or all(code == 0 for code in codes):
            break
        if stop_requested() or time.monotonic() >= ended:
            for process in processes:
                _stop(process, group)
            return 0, None if not stop_requested() else processes[0].returncode
        with contextlib.suppress(subprocess.TimeoutExpired):
            next(p for p in processes if p.returncode is None).wait(timeout=0.5)
    for process in processes:  # the group ends with its first failed node
        _stop(process, group)
    if failed is None:
        return 0, 0
    return failed, processes[failed].returncode


def _spawn(state: _State, commands: list[list[str]], env: dict[str, str], group: bool) -> list[subprocess.Popen[bytes]]:
    """The processes started; none left running if one cannot start."""
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for command in commands:
            processes.append(
                subprocess.Popen(
                    command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=group
                )
            )
    except OSError as exc:
        for started in processes:
            _stop(started, group)
        state.finish("Failed", None)
        raise RuntimeFailure(f"step {state.step} could not start: {exc}") from None
    return processes


def _signal_all(processes: list[subprocess.Popen[bytes]], sig: int, group: bool) -> None:
    for process in processes:
        _signal(process, sig, group)


def _signal(process: subprocess.Popen[bytes], sig: int, group: bool) -> None:
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig) if group else process.send_signal(sig)


def _stop(process: subprocess.Popen[bytes], group: bool = False) -> None:
    _signal(process, signal.SIGTERM, group)
    try:
        process.wait(timeout=GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        _signal(process, signal.SIGKILL, group)
        process.wait()


def _free_port() -> int:
    """A loopback port for a local group's rendezvous (node 0's torchrun listens on it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def node_log(state_dir: Path, step: str, index: int) -> Path:
    """STEP.log, and STEP.node-K.log for node K > 0 of a multi-node step."""
    return state_dir / (f"{step}.log" if index == 0 else f"{step}.node-{index}.log")


def _tee(stream: IO[bytes] | None, log_file: IO[bytes], lock: threading.Lock, show: bool = True) -> None:
    """The step's output to its log, and to our stderr as it comes (progress bars too; a group's node 0 only)."""
    if stream is None:
        return
    for chunk in iter(lambda: stream.read1(65536), b""):  # type: ignore[attr-defined]
        with lock:
            log_file.write(chunk)
            log_file.flush()
            if show:
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
    nodes = _node_pids(path, values)
    alive = {k: pid_alive(node) for k, node in nodes.items()}
    if state == "Running" and not (any(alive.values()) if nodes else isinstance(pid, int) and pid_alive(pid)):
        state = "Failed"  # the runner died with its step (killed, machine restarted)
    ended = "Failed" if state == "Running" else state  # a node gone while its group runs has failed
    indexes = {k: "Running" if running else ended for k, running in alive.items()}
    return StepStatus(
        run_id=values.get("run_id", path.parent.name),
        pipeline=values.get("pipeline", "?"),
        step=values.get("step", path.stem),
        job=str(pid) if pid else "",
        state=state,
        started=values.get("started", ""),
        finished=values.get("finished", ""),
        indexes=indexes,
    )


def _node_pids(path: Path, values: dict[str, Any] | None = None) -> dict[str, int]:
    """A group's node processes by index, from its state file (empty for a single process)."""
    if values is None:
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
    return {str(k): pid for k, pid in enumerate(values.get("nodes") or []) if isinstance(pid, int)}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
