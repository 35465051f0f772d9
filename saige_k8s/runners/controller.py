"""The pipeline on Kubernetes: create each step's Job, wait for it, hand over to the next.

Jobs are named after the run, so submitting a run again adopts the Jobs it already has
instead of creating duplicates, and picks up where it stopped (a laptop that went to sleep,
a controller pod that was rescheduled). The extract step reports its dataset through its
pod's termination message; the controller checks it before it spends GPU time on training.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any, NoReturn

from kubernetes import client

from saige_k8s.errors import InputError, RuntimeFailure
from saige_k8s.runners.backend import Backend, Outcome, Run, Say, StepFailed, StepStatus, run_pipeline
from saige_k8s.runners.jobs import (
    CONFIG_ERROR_EXIT,
    CONTROLLER,
    INDEX_LABEL,
    PIPELINE_LABEL,
    REJECTED_EXIT,
    RUN_LABEL,
    STEP_LABEL,
    construct_controller_job,
    construct_step_job,
    construct_step_service,
    pipeline_jobs,
    step_nodes,
)
from saige_k8s.runners.kubernetes import Cluster
from saige_k8s.spec import Step, StepName

log = logging.getLogger(__name__)

#: How long the controller waits for a Job past its own activeDeadlineSeconds (scheduling, image pulls).
WAIT_SLACK_SECONDS = 3600
#: A step whose spec sets no deadline is still waited for no longer than this.
NO_DEADLINE_SECONDS = 7 * 24 * 3600


class KubernetesBackend(Backend):
    """Each step as a Job in the cluster's namespace; the controller waits for it here."""

    def __init__(self, cluster: Cluster, follow: bool = False) -> None:
        self.cluster = cluster
        self.follow = follow
        self.where = f"namespace {cluster.namespace}"

    def run_step(self, run: Run, step: Step, say: Say) -> dict[str, Any] | None:
        cluster = self.cluster
        job = construct_step_job(run, step.name)
        job.metadata.namespace = cluster.namespace
        current = _ensure(cluster, run, step.name, job, say)
        name = current.metadata.name
        group = step_nodes(run, step) > 1
        if group:
            _ensure_service(cluster, run, step.name, current, say)
        if self.follow:
            _follow(cluster, name, step.name, say)
        deadline = run.spec.kubernetes.pod(step.name).active_deadline_seconds or NO_DEADLINE_SECONDS
        finished = cluster.wait_job(
            name,
            job_finished,
            idle=lambda: _still(cluster, name, step.name, say),
            timeout=deadline + WAIT_SLACK_SECONDS,
        )
        failed = job_state(finished) == "Failed"
        if failed and group:
            _raise_group_failed(step.name, finished, cluster.job_pods(name))
        if not failed and not step.reports:
            return None
        ended, message = _last_termination(cluster, name, step.name)  # the pods are read once
        if failed and not (step.rejects and ended == REJECTED_EXIT):
            _raise_failed(step.name, finished, ended, message)
        return step_summary(name, step.name, ended, message, expected=REJECTED_EXIT if failed else 0)

    def status(self, run_id: str | None = None) -> list[StepStatus]:
        labels = {"app.kubernetes.io/managed-by": "saige-k8s", **({RUN_LABEL: run_id} if run_id else {})}
        rows = []
        for job in self.cluster.list_jobs(labels):
            meta_labels = job.metadata.labels or {}
            started = job.status.start_time if job.status else None
            finished = job.status.completion_time if job.status else None
            indexed = _indexed(job)
            rows.append(
                StepStatus(
                    run_id=meta_labels.get(RUN_LABEL, "?"),
                    pipeline=meta_labels.get(PIPELINE_LABEL, "?"),
                    step=meta_labels.get(STEP_LABEL, "?"),
                    job=job.metadata.name,
                    state=job_state(job),
                    started=started.isoformat(timespec="seconds") if started else "",
                    finished=finished.isoformat(timespec="seconds") if finished else "",
                    indexes=index_states(job, self.cluster.job_pods(job.metadata.name)) if indexed else {},
                )
            )
        return self.ordered(rows)

    def logs(
        self, run_id: str, step: StepName | None, follow: bool, index: int | None = None
    ) -> tuple[str, Iterable[str]]:
        chosen = self.pick(run_id, step)
        pods = self.cluster.job_pods(chosen.job)
        if chosen.indexes or index is not None:
            wanted = str(index or 0)
            if wanted not in chosen.indexes:
                nodes = f"indexes 0 to {len(chosen.indexes) - 1}" if chosen.indexes else "one pod, no index"
                raise InputError(f"step {chosen.step} of run {run_id} has no index {wanted} (it has {nodes})")
            pods = [pod for pod in pods if (pod.metadata.labels or {}).get(INDEX_LABEL) == wanted]
        if not pods:
            raise InputError(f"Job {chosen.job} has no pod yet (state: {chosen.state})")
        pod = pods[-1].metadata.name
        return pod, self.cluster.pod_log(pod, chosen.step, follow=follow)

    def cancel(self, run_id: str) -> list[str]:
        """Deletes the run's Jobs (their pods follow by garbage collection), and a multi-node step's Service."""
        jobs = self.cluster.list_jobs({RUN_LABEL: run_id})
        deleted = [job.metadata.name for job in jobs if self.cluster.delete_job(job.metadata.name)]
        for job in jobs:
            if _indexed(job):
                # Owned by its Job, so the garbage collector would take it too; not left to chance.
                self.cluster.delete_service(job.metadata.name)
        if not deleted:
            raise InputError(f"no run {run_id!r} in {self.where} (saige-k8s status lists the runs)")
        return deleted


def submit(cluster: Cluster, run: Run, say: Say, follow: bool = False, pushgateway: str | None = None) -> Outcome:
    """The pipeline as Jobs, each after the previous one succeeded; every Job is built before any is sent."""
    pipeline_jobs(run)
    return run_pipeline(KubernetesBackend(cluster, follow), run, say, pushgateway)


def submit_detached(cluster: Cluster, run: Run, say: Say) -> str:
    """Starts the controller as a Job in the cluster (the same ``submit``), so nothing waits here."""
    job = construct_controller_job(run)
    job.metadata.namespace = cluster.namespace
    return _ensure(cluster, run, CONTROLLER, job, say).metadata.name


def _ensure(cluster: Cluster, run: Run, step: str, job: client.V1Job, say: Say) -> client.V1Job:
    created = cluster.create_job(job)
    if created is not None:
        say(f"{step}: created Job {job.metadata.name}")
        return created
    existing = cluster.read_job(job.metadata.name)
    if existing is None:  # deleted between our create and read: one more try
        return _ensure(cluster, run, step, job, say)
    if (existing.metadata.labels or {}).get(RUN_LABEL) != run.run_id:
        raise InputError(
            f"a Job named {job.metadata.name} exists in namespace {cluster.namespace} but is not part of run "
            f"{run.run_id}; delete it or choose another --run"
        )
    say(f"{step}: Job {job.metadata.name} exists already; following it")
    return existing


def _ensure_service(cluster: Cluster, run: Run, step: StepName, job: client.V1Job, say: Say) -> None:
    """The group's headless Service, owned by its Job so that whatever deletes the Job deletes it."""
    service = construct_step_service(run, step, owner=job)
    service.metadata.namespace = cluster.namespace
    name = service.metadata.name
    if cluster.create_service(service) is not None:
        say(f"{step}: created headless Service {name}")
        return
    existing = cluster.read_service(name)
    if existing is None:  # deleted between our create and read: one more try
        _ensure_service(cluster, run, step, job, say)
        return
    if (existing.metadata.labels or {}).get(RUN_LABEL) != run.run_id:
        raise InputError(
            f"a Service named {name} exists in namespace {cluster.namespace} but is not part of run "
            f"{run.run_id}; delete it or choose another --run"
        )


def _indexed(job: client.V1Job) -> bool:
    return bool(job.spec and job.spec.completion_mode == "Indexed")


def _current_pods(job: client.V1Job, pods: list[client.V1Pod]) -> list[client.V1Pod]:
    """The pods of this Job, not of an earlier one of the same name (cancelled, then submitted again)."""
    uid = job.metadata.uid
    return [p for p in pods if (p.metadata.labels or {}).get("batch.kubernetes.io/controller-uid", uid) == uid]


def index_states(job: client.V1Job, pods: list[client.V1Pod]) -> dict[str, str]:
    """Each node's state, from its newest pod (a completed index counts as Succeeded)."""
    completions = job.spec.completions or 1
    done = _index_set(job.status.completed_indexes if job.status else None)
    states = {str(i): "Pending" for i in range(completions)}
    for pod in _current_pods(job, pods):  # oldest first: the newest of an index wins
        index = (pod.metadata.labels or {}).get(INDEX_LABEL)
        if index in states:
            states[index] = (pod.status.phase if pod.status else None) or "Pending"
    return {i: "Succeeded" if int(i) in done else state for i, state in states.items()}


def _index_set(ranges: str | None) -> set[int]:
    """``"0,2-3"`` (a Job's completedIndexes) as {0, 2, 3}."""
    found: set[int] = set()
    for part in filter(None, (ranges or "").split(",")):
        first, _, last = part.partition("-")
        found.update(range(int(first), int(last or first) + 1))
    return found


def _raise_group_failed(step: StepName, job: client.V1Job, pods: list[client.V1Pod]) -> None:
    """A failed group, told by the node that failed first (the others were stopped because of it)."""
    failures = []
    for pod in _current_pods(job, pods):
        index = (pod.metadata.labels or {}).get(INDEX_LABEL, "?")
        for status in (pod.status.container_statuses or []) if pod.status else []:
            ended = status.state.terminated if status.state else None
            if status.name == step and ended is not None and ended.exit_code != 0:
                failures.append((ended.finished_at or pod.metadata.creation_timestamp, index, ended))
        if pod.status and pod.status.phase == "Failed" and pod.status.reason:  # evicted: no container ended
            failures.append((pod.metadata.creation_timestamp, index, pod.status))
    if not failures:
        _raise_failed(step, job, None, "")
    failures.sort(key=lambda failure: str(failure[0] or ""))
    _, index, first = failures[0]
    if isinstance(first, client.V1ContainerStateTerminated):
        _raise_failed(step, job, first.exit_code, first.message or "", f"index {index} exited with {first.exit_code}")
    _raise_failed(step, job, None, first.message or "", f"index {index} {first.reason}")


def _still(cluster: Cluster, job_name: str, step: str, say: Say) -> None:
    """A line every few minutes while a step waits, with why its pod is not running if it is not."""
    pods = cluster.job_pods(job_name)
    say(f"{step}: still waiting for Job {job_name} ({pod_report(pods[-1]) if pods else 'no pod yet'})")


def pod_report(pod: client.V1Pod) -> str:
    """The phase, and the scheduler's or kubelet's reason when a pod is stuck (no GPU, image pull...)."""
    status = pod.status
    phase = (status.phase if status else None) or "Pending"
    for condition in (status.conditions or []) if status else []:
        if condition.type == "PodScheduled" and condition.status == "False":
            return f"pod {pod.metadata.name} {phase}: {condition.reason}: {condition.message or ''}".rstrip(": ")
    for container in (status.container_statuses or []) if status else []:
        waiting = container.state.waiting if container.state else None
        if waiting is not None and waiting.reason not in (None, "ContainerCreating"):
            return f"pod {pod.metadata.name} {phase}: {waiting.reason}: {waiting.message or ''}".rstrip(": ")
    return f"pod {pod.metadata.name} {phase}"


def job_finished(job: client.V1Job) -> bool:
    return job_state(job) in ("Succeeded", "Failed")


def job_state(job: client.V1Job) -> str:
    conditions = {c.type: c for c in (job.status.conditions or []) if c.status == "True"} if job.status else {}
    if "Complete" in conditions:
        return "Succeeded"
    if "Failed" in conditions:
        return "Failed"
    if job.status and (job.status.active or 0) > 0:
        return "Running"
    return "Pending"


def _raise_failed(step: StepName, job: client.V1Job, exit_code: int | None, message: str, which: str = "") -> NoReturn:
    failed = next(c for c in job.status.conditions if c.type == "Failed" and c.status == "True")
    reason = failed.reason or "Failed"
    detail = message.strip().splitlines()[-1] if message.strip() else (failed.message or "")
    where = f": {detail}" if detail else ""
    which = f", {which}" if which else ""
    raise StepFailed(
        step,
        f"failed ({reason}, Job {job.metadata.name}{which}){where}",
        2 if exit_code == CONFIG_ERROR_EXIT else 1,
    )


def step_summary(job_name: str, container: StepName, ended: int | None, message: str, expected: int) -> dict[str, Any]:
    """A reporting step's JSON summary, from its pod's termination message (when it ended with ``expected``)."""
    try:
        summary = json.loads(message) if ended == expected else None
    except ValueError:
        summary = None
    if not isinstance(summary, dict) or "dataset_id" not in summary:
        raise RuntimeFailure(
            f"Job {job_name} succeeded but its pod left no dataset summary in its termination message "
            f"(saige-k8s logs RUN --step {container} shows its output)"
        )
    return summary


def _last_termination(cluster: Cluster, job_name: str, container: str) -> tuple[int | None, str]:
    """Exit code and termination message of the Job's newest terminated container of that name."""
    for pod in reversed(cluster.job_pods(job_name)):
        for status in (pod.status.container_statuses or []) if pod.status else []:
            terminated = status.state.terminated if status.state else None
            if status.name == container and terminated is not None:
                return terminated.exit_code, terminated.message or ""
    return None, ""


def _follow(cluster: Cluster, job_name: str, step: StepName, say: Say) -> None:
    """Streams the step's newest pod log once it runs (best effort: a log is not the outcome)."""
    pod = _wait_for_pod(cluster, job_name)
    if pod is None:
        return
    try:
        for line in cluster.pod_log(pod.metadata.name, step, follow=True):
            say(f"[{step}] {line}")
    except RuntimeFailure as exc:
        log.warning("log of %s: %s", pod.metadata.name, exc)


def _wait_for_pod(cluster: Cluster, job_name: str) -> client.V1Pod | None:
    started: list[client.V1Pod] = []

    def pod_started(job: client.V1Job) -> bool:
        if job_finished(job):
            return True
        pods = [p for p in cluster.job_pods(job_name) if p.status and p.status.phase not in (None, "Pending")]
        started.extend(pods[-1:])
        return bool(pods)

    cluster.wait_job(job_name, pod_started)
    return started[-1] if started else None
