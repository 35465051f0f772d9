"""The one place that turns a pipeline spec into step command lines.

The local runner and the Kubernetes Job builder both call these functions, so a step runs
with the same arguments wherever it runs; only the program prefix differs (this
interpreter locally, the image's ``saige-k8s`` / ``torchrun`` in a pod).
"""

from __future__ import annotations

import datetime as dt
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from saige_k8s.errors import InputError


@dataclass(frozen=True)
class Programs:
    """How to start the CLI, and how to start it once per GPU."""

    cli: tuple[str, ...]
    distributed: tuple[str, ...]

    @classmethod
    def local(cls) -> Programs:
        return cls((sys.executable, "-m", "saige_k8s"), (sys.executable, "-m", "torch.distributed.run"))

    @classmethod
    def image(cls) -> Programs:
        return cls(("saige-k8s",), ("torchrun",))


def new_run_id(name: str, now: dt.datetime | None = None) -> str:
    """NAME-YYYYMMDD-HHMMSS (UTC): also the run's dataset id and its Jobs' name prefix."""
    now = now or dt.datetime.now(dt.UTC)
    return f"{name}-{now:%Y%m%d-%H%M%S}"


def check_min_examples(summary: dict[str, Any], min_examples: int) -> None:
    """Training on too few examples wastes GPU time and teaches little: both runners stop here."""
    if summary["kept"] < min_examples:
        raise InputError(
            f"dataset {summary['dataset_id']} has {summary['kept']} examples, below extract.min_examples "
            f"({min_examples}); not training (collect more experiences or relax the filters)"
        )


def demo_db_command(programs: Programs, target: str, rows: int, seed: int) -> list[str]:
    return [*programs.cli, "demo-db", "--out", target, "--rows", str(rows), "--seed", str(seed)]


def extract_command(
    programs: Programs, spec_path: str, data_root: str, dataset_id: str, summary_file: str | None = None
) -> list[str]:
    """Prints a one-line JSON summary (dataset id and counts) on stdout, and into ``summary_file``.

    A rerun of the same run finds its dataset published and reports it (``--reuse-existing``).
    """
    command = [*programs.cli, "extract", "-f", spec_path, "--data-root", data_root, "--dataset-id", dataset_id]
    command += ["--reuse-existing", "--json"]
    return [*command, "--summary-file", summary_file] if summary_file else command


def train_command(
    programs: Programs, spec_path: str, data_root: str, dataset_id: str, run_dir: str, processes: int = 1
) -> list[str]:
    """One process, or ``processes`` of them under torchrun (one per GPU)."""
    args: Sequence[str] = [
        "train",
        "-f",
        spec_path,
        "--data-root",
        data_root,
        "--dataset",
        dataset_id,
        "--output-dir",
        run_dir,
    ]
    if processes > 1:
        return [*programs.distributed, "--standalone", "--nproc_per_node", str(processes), "-m", "saige_k8s", *args]
    return [*programs.cli, *args]


def export_command(programs: Programs, run_dir: str) -> list[str]:
    return [*programs.cli, "export", run_dir]
