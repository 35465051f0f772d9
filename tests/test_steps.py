"""The step table and the runner protocol: one declaration per step, the same loop on both backends,
and status / logs / cancel for local runs from the data root."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import get_args

import pytest

from saige_k8s.errors import ConfigError, RuntimeFailure
from saige_k8s.runners.backend import Run
from saige_k8s.runners.jobs import construct_step_job
from saige_k8s.spec import STEP_TABLE, STEPS, KubernetesSpec, PipelineSpec, StepName, parse_spec, step
from tests.conftest import run_cli, wait_for


def test_every_step_name_has_one_entry_and_one_pod_block() -> None:
    assert [s.name for s in STEPS] == list(get_args(StepName))
    assert set(STEP_TABLE) <= set(KubernetesSpec.model_fields)
    for entry in STEPS:
        assert KubernetesSpec().pod(entry.name).active_deadline_seconds == entry.pod_defaults["active_deadline_seconds"]


def test_an_unknown_step_is_an_error_not_another_steps_command() -> None:
    with pytest.raises(ConfigError, match="unknown step 'judge'"):
        step("judge")
    with pytest.raises(ConfigError, match="unknown step 'judge'"):
        construct_step_job(Run(PipelineSpec(), "r1"), "judge")


def test_the_spec_decides_which_steps_run() -> None:
    names = lambda spec: [s.name for s in Run(spec, "r1").steps]  # noqa: E731
    assert names(PipelineSpec()) == ["extract", "train", "evaluate"]
    with_all = parse_spec({"collect": {"image": "x", "command": ["true"]}, "train": {"export": True}})
    assert names(with_all) == ["collect", "extract", "train", "evaluate", "export"]
    assert names(parse_spec({"evaluate": {"enabled": False}})) == ["extract", "train"]


def test_the_longest_step_name_fits_the_job_name_limit() -> None:
    from saige_k8s.runners.jobs import job_name

    longest = "a" * 38
    for entry in STEPS:
        job_name(f"{longest}-20261201-000000", entry.name)  # NAME-YYYYMMDD-HHMMSS-STEP within 63
    with pytest.raises(ValueError):
        PipelineSpec(name="a" * 39)


def _spec_file(tmp_path: Path, db: str, command: list[str], **kubernetes: object) -> Path:
    spec = {
        "name": "local",
        "source": {"url": db},
        "extract": {"min_examples": 10**6},
        "collect": {"image": "unused-locally", "command": command},
        "kubernetes": kubernetes,
    }
    path = tmp_path / "spec.yaml"
    path.write_text(json.dumps(spec))
    return path


def _run(spec: Path, root: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "saige_k8s", "run", "-f", str(spec), "--data-root", str(root)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_status_and_logs_answer_for_a_local_run(tmp_path: Path, demo_sqlite: str) -> None:
    root = tmp_path / "root"
    spec = _spec_file(tmp_path, demo_sqlite, [sys.executable, "-c", "print('gathered 7 episodes')"])
    done = _run(spec, root)
    _, stderr = done.communicate(timeout=300)
    assert done.returncode == 2, stderr  # the dataset is below min_examples: the run stops after extract
    run_id = stderr.split("run ", 1)[1].split()[0]
    assert "gathered 7 episodes" in stderr  # a step's output reaches the terminal...

    status = run_cli("status", "--data-root", root, "-o", "json")
    assert status.exit_code == 0, status.stderr
    rows = json.loads(status.stdout)
    assert [(r["run_id"], r["step"], r["state"]) for r in rows] == [
        (run_id, "collect", "Succeeded"),
        (run_id, "extract", "Succeeded"),
    ]
    table = run_cli("status", "--local", run_id, env={"SAIGE_DATA_ROOT": str(root)})
    assert table.stdout.splitlines()[0].split() == ["RUN", "STEP", "STATE", "STARTED", "FINISHED", "JOB"]

    collect_log = run_cli("logs", "--data-root", root, run_id, "--step", "collect")
    assert collect_log.exit_code == 0, collect_log.stderr
    assert collect_log.stdout.splitlines() == ["gathered 7 episodes"]  # ...and to its log
    latest = run_cli("logs", "--data-root", root, run_id)
    assert "high-quality experiences (of 4000 scanned)" in latest.stdout  # the latest step, extract: its report
    missing = run_cli("logs", "--data-root", root, "nope-1")
    assert missing.exit_code == 2
    assert "no run 'nope-1' in data root" in missing.stderr


def test_cancel_stops_a_local_runs_running_step(tmp_path: Path, demo_sqlite: str) -> None:
    root = tmp_path / "root"
    spec = _spec_file(tmp_path, demo_sqlite, [sys.executable, "-c", "import time; time.sleep(120)"])
    started = time.monotonic()
    running = _run(spec, root)
    assert wait_for(lambda: '"Running"' in "".join(p.read_text() for p in root.glob("pipelines/*/collect.json")), 30)
    run_id = next(root.glob("pipelines/*")).name
    stopped = run_cli("cancel", "--data-root", root, run_id)
    assert stopped.exit_code == 0, stopped.stderr
    assert stopped.stdout.startswith("stopped step collect (process ")
    _, stderr = running.communicate(timeout=60)
    assert running.returncode == 1
    assert "step collect failed with exit code" in stderr
    assert time.monotonic() - started < 60
    rows = json.loads(run_cli("status", "--data-root", root, "-o", "json").stdout)
    assert [(r["step"], r["state"]) for r in rows] == [("collect", "Failed")]
    assert not (root / "datasets").exists()


def test_a_local_step_past_its_deadline_is_stopped(tmp_path: Path, demo_sqlite: str) -> None:
    root = tmp_path / "root"
    slow = [sys.executable, "-c", "import time; time.sleep(120)"]
    spec = _spec_file(tmp_path, demo_sqlite, slow, collect={"active_deadline_seconds": 2})
    started = time.monotonic()
    running = _run(spec, root)
    _, stderr = running.communicate(timeout=90)
    assert running.returncode == 1
    assert "step collect ran past its deadline of 2 s and was stopped" in stderr
    assert time.monotonic() - started < 60


def test_waiting_for_a_job_ends_at_its_timeout(kube) -> None:
    from saige_k8s.runners.kubernetes import Cluster

    kube.put(
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "stuck", "namespace": "default"},
            "spec": {"template": {"spec": {"containers": []}}},
        }
    )
    cluster = Cluster(kube.api_client(), "default")
    started = time.monotonic()
    with pytest.raises(RuntimeFailure, match="gave up waiting for Job stuck after 2 s"):
        cluster.wait_job("stuck", lambda job: False, timeout=2)
    assert time.monotonic() - started < 15
