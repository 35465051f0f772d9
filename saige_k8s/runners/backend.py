"""One pipeline loop over one runner protocol: where a step runs is the backend's only say.

The loop takes the spec's steps in order, hands each step's summary to the step's own check
(the extract step's minimum dataset size), and afterwards, success or failure, records the
run's pipeline metrics. A backend runs one step and reports it; the local one runs a
process on this machine, the Kubernetes one a Job.
"""

from __future__ import annotations

import abc
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saige_k8s import metrics as prometheus
from saige_k8s.errors import ConfigError, InputError, SaigeError
from saige_k8s.spec import DNS_LABEL, STEP_NAMES, PipelineSpec, Step, StepName, enabled_steps

Say = Callable[[str], None]


@dataclass(frozen=True)
class Run:
    """One pipeline run: the Jobs' names, the dataset id and the run directory derive from its id."""

    spec: PipelineSpec
    run_id: str

    def __post_init__(self) -> None:
        # Also a label value and the dataset's directory name, so a DNS label like the Jobs' names.
        if not re.fullmatch(DNS_LABEL, self.run_id):
            raise ConfigError(
                f"run id {self.run_id!r}: use lowercase letters, digits and '-', starting and ending alphanumeric"
            )

    @property
    def steps(self) -> tuple[Step, ...]:
        return enabled_steps(self.spec)

    @property
    def dataset_id(self) -> str:
        return self.run_id


class StepFailed(SaigeError):
    """A step failed; a configuration or input error in the step (exit code 2) keeps its exit code."""

    def __init__(self, step: str, message: str, exit_code: int) -> None:
        super().__init__(f"step {step} {message}")
        self.step = step
        self.exit_code = exit_code


@dataclass(frozen=True)
class StepStatus:
    run_id: str
    pipeline: str
    step: str
    #: The Kubernetes Job, or the local process id.
    job: str
    state: str
    started: str
    finished: str
    #: A multi-node step's state per node (its completion index): "0" -> "Running", ...
    indexes: dict[str, str] = field(default_factory=dict)


@dataclass
class Outcome:
    run_id: str
    #: Where it ran: the namespace, or the data root.
    where: str
    finished: list[StepName] = field(default_factory=list)
    #: What each reporting step said (its one-line JSON summary).
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def dataset(self) -> dict[str, Any]:
        return self.summaries.get("extract", {})


class Backend(abc.ABC):
    """Runs a run's steps somewhere, and answers status, logs and cancel for its runs."""

    #: Shown in messages: the namespace, or the data root.
    where: str

    @abc.abstractmethod
    def run_step(self, run: Run, step: Step, say: Say) -> dict[str, Any] | None:
        """Runs the step to its end; its JSON summary when it reports one. Raises StepFailed."""

    @abc.abstractmethod
    def status(self, run_id: str | None = None) -> list[StepStatus]:
        """The steps of one run, or of every run, in run then pipeline order."""

    @abc.abstractmethod
    def logs(
        self, run_id: str, step: StepName | None, follow: bool, index: int | None = None
    ) -> tuple[str, Iterable[str]]:
        """Whose log it is, and its lines: the given step's, else the run's latest step's.

        ``index`` picks one node of a multi-node step (default: node 0, the one that reports).
        """

    @abc.abstractmethod
    def cancel(self, run_id: str) -> list[str]:
        """Stops the run's steps; what was stopped."""

    @staticmethod
    def ordered(rows: list[StepStatus]) -> list[StepStatus]:
        """Run, then pipeline order; the controller's own row first."""
        order = {name: i for i, name in enumerate(("submit", *STEP_NAMES))}
        return sorted(rows, key=lambda row: (row.run_id, order.get(row.step, len(order))))

    def pick(self, run_id: str, step: StepName | None) -> StepStatus:
        """The row whose log ``logs`` shows: the step asked for, else the run's latest."""
        rows = self.status(run_id)
        if not rows:
            raise InputError(f"no run {run_id!r} in {self.where} (saige-k8s status lists the runs)")
        chosen = next((row for row in rows if row.step == step), None) if step else rows[-1]
        if chosen is None:
            raise InputError(f"run {run_id} has no {step} step (it has: {', '.join(row.step for row in rows)})")
        return chosen

    def metrics_dir(self) -> Path | None:
        """Where the pipeline's metrics are also written as a text file (None: pushed only)."""
        return None


def run_pipeline(backend: Backend, run: Run, say: Say, pushgateway: str | None = None) -> Outcome:
    """Runs the spec's steps in order, each after the previous one succeeded.

    Afterwards, success or failure, the run's pipeline metrics are written and pushed (a
    failure still raises its own error).
    """
    started, succeeded = time.time(), False
    outcome = Outcome(run.run_id, backend.where)
    try:
        for step in run.steps:
            summary = backend.run_step(run, step, say)
            outcome.finished.append(step.name)
            if summary is None:
                say(f"{step.name}: succeeded")
                continue
            outcome.summaries[step.name] = summary
            say(f"{step.name}: {step.describe(summary)}")
            if step.check is not None:
                step.check(run.spec, summary)
        succeeded = True
        return outcome
    finally:
        prometheus.record_pipeline_result(
            run.spec.name, backend.metrics_dir(), pushgateway, succeeded, started, time.time()
        )
