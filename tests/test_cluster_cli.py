"""The cluster commands as a user meets them: each way of pointing at no cluster is one clear
line with the right exit code, and the kubectl habits (--kubeconfig, --dry-run, -o yaml|wide)
work against kmock's emulated API server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.conftest import run_cli
from tests.kube_emulator import KubeEmulator
from tests.test_controller import NS, RUN, VERSIONS, _kubeconfig, _spec

ROOT = Path(__file__).resolve().parents[1]


def _spec_file(tmp_path: Path) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(_spec().model_dump(mode="json", by_alias=True, exclude_none=True)))
    return path


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port bound but not listening: connecting to it is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def _saige(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The real entry point in a process of its own: its logging set up as a user's is."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(
        [sys.executable, "-m", "saige_k8s", *args],
        check=False,
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
    )


def test_no_kubeconfig_at_all_says_where_it_looked_and_how_to_pass_one(tmp_path):
    result = run_cli("status", env={"KUBECONFIG": None, "HOME": str(tmp_path)})
    assert result.exit_code == 2
    assert result.stderr == (
        f"saige-k8s: error: no kubeconfig: none at {tmp_path / '.kube' / 'config'} "
        "(pass --kubeconfig FILE or set KUBECONFIG; inside a pod use --in-cluster)\n"
    )


def test_an_unknown_context_is_named_with_the_known_ones(kube, tmp_path):
    config = _kubeconfig(tmp_path, kube.url)
    result = run_cli("status", "--context", "nope", env={"KUBECONFIG": str(config)})
    assert result.exit_code == 2
    assert result.stderr == (
        f"saige-k8s: error: context 'nope' does not exist in the kubeconfig {config} (known contexts: emu)\n"
    )
    assert kube.requests() == []


def test_in_cluster_outside_a_pod_says_so(tmp_path):
    env = {"KUBERNETES_SERVICE_HOST": None, "KUBERNETES_SERVICE_PORT": None}
    result = run_cli("status", "--in-cluster", env=env)
    assert result.exit_code == 2
    assert result.stderr.startswith("saige-k8s: error: --in-cluster: not running in a Kubernetes pod")
    assert len(result.stderr.splitlines()) == 1


def test_a_dead_api_server_is_one_line_at_once_without_urllib3_retry_warnings(tmp_path, closed_port):
    config = _kubeconfig(tmp_path, f"http://127.0.0.1:{closed_port}")
    result = _saige("status", "--kubeconfig", str(config), env={"KUBECONFIG": ""})
    assert result.returncode == 1  # a runtime failure: worth a retry once the server is up
    assert result.stderr.splitlines() == [
        f"saige-k8s: error: cannot reach the Kubernetes API server at http://127.0.0.1:{closed_port} "
        "(connection refused); is the cluster up, and is this the right context?"
    ]


def test_kubeconfig_flag_wins_over_the_environment(kube, tmp_path):
    config = _kubeconfig(tmp_path, kube.url)
    env = {"KUBECONFIG": str(tmp_path / "absent")}
    result = run_cli("status", "--kubeconfig", str(config), env=env)
    assert result.exit_code == 0, result.stderr
    assert f"no saige-k8s runs in namespace {NS}" in result.stderr
    assert any(sent.path == f"/apis/batch/v1/namespaces/{NS}/jobs" for sent in kube.requests())


@pytest.mark.parametrize("wait", [True, False])
def test_submit_dry_run_prints_the_jobs_and_creates_nothing(kube, tmp_path, wait):
    env = {"KUBECONFIG": str(_kubeconfig(tmp_path, kube.url, namespace="default"))}
    args = ["submit", "-f", _spec_file(tmp_path), "--run", RUN, "--dry-run"]
    result = run_cli(*args, *([] if wait else ["--no-wait"]), env=env)
    assert result.exit_code == 0, result.stderr
    documents = list(yaml.safe_load_all(result.stdout))
    names = [doc["metadata"]["name"] for doc in documents]
    assert names == ([f"{RUN}-extract", f"{RUN}-train"] if wait else [f"{RUN}-submit"])
    for document in documents:
        assert document["kind"] == "Job" and document["metadata"]["namespace"] == NS
        for version in VERSIONS:
            kubernetes_validate.validate(document, version, strict=True)
    assert "dry run: nothing was created" in result.stderr
    assert [sent for sent in kube.requests() if sent.method != "GET"] == []
    assert kube.objects("jobs") == []


def _put_job(kube: KubeEmulator, step: str, start: str, end: str | None) -> None:
    status = {"startTime": start, "conditions": []}
    if end:
        status |= {"completionTime": end, "conditions": [{"type": "Complete", "status": "True"}]}
    labels = {"app.kubernetes.io/managed-by": "saige-k8s", "saige.io/pipeline-run": RUN}
    labels |= {"saige.io/pipeline": "demo", "saige.io/step": step}
    kube.put(
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": f"{RUN}-{step}", "namespace": NS, "labels": labels},
            "spec": {"template": {"spec": {"containers": [{"name": step, "image": "img"}]}}},
            "status": status,
        }
    )


def test_status_as_yaml_and_wide(kube, tmp_path):
    _put_job(kube, "extract", "2026-12-01T10:00:00Z", "2026-12-01T10:05:12Z")
    _put_job(kube, "train", "2026-12-01T10:06:00Z", "2026-12-01T12:09:00Z")
    env = {"KUBECONFIG": str(_kubeconfig(tmp_path, kube.url))}
    as_yaml = run_cli("status", "-o", "yaml", env=env)
    assert as_yaml.exit_code == 0, as_yaml.stderr
    records = yaml.safe_load(as_yaml.stdout)
    assert [(r["step"], r["state"], r["job"]) for r in records] == [
        ("extract", "Succeeded", f"{RUN}-extract"),
        ("train", "Succeeded", f"{RUN}-train"),
    ]
    assert records[0]["pipeline"] == "demo"
    wide = run_cli("status", "-o", "wide", env=env).stdout.splitlines()
    assert wide[0].split() == ["RUN", "PIPELINE", "STEP", "STATE", "STARTED", "FINISHED", "DURATION", "JOB"]
    assert [line.split()[1:4] + line.split()[6:7] for line in wide[1:]] == [
        ["demo", "extract", "Succeeded", "5m12s"],
        ["demo", "train", "Succeeded", "2h3m"],
    ]
    table = run_cli("status", env=env).stdout.splitlines()
    assert table[0].split() == ["RUN", "STEP", "STATE", "STARTED", "FINISHED", "JOB"]
    assert all(line == line.rstrip() for line in table)  # no trailing padding in a pipe
    # The columns line up: every row's JOB starts where the header's does.
    at = table[0].index("JOB")
    assert [line[at:] for line in table[1:]] == [f"{RUN}-extract", f"{RUN}-train"]


def test_a_lost_connection_is_retried_only_once_the_server_has_answered(kube, closed_port, caplog):
    from saige_k8s.errors import RuntimeFailure
    from saige_k8s.runners.kubernetes import Cluster

    def lose(cluster: Cluster) -> None:
        cluster.api_client.configuration.host = f"http://127.0.0.1:{closed_port}"
        cluster.api_client.rest_client.pool_manager.clear()

    never = Cluster(kube.api_client(), NS, attempts=3)
    lose(never)
    with caplog.at_level("WARNING"), pytest.raises(RuntimeFailure, match=r"\(connection refused\)"):
        never.list_jobs({})
    assert "retrying" not in caplog.text  # a wrong address or a dead cluster: said at once

    answered = Cluster(kube.api_client(), NS, attempts=3)
    assert answered.list_jobs({}) == []
    lose(answered)
    with caplog.at_level("WARNING"), pytest.raises(RuntimeFailure, match=r"\(connection refused\)"):
        answered.list_jobs({})
    assert "retrying (attempt 3 of 3)" in caplog.text  # a blip in a long run: retried


def test_the_documented_shell_completion_is_served():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert 'eval "$(_SAIGE_K8S_COMPLETE=bash_source saige-k8s)"' in readme
    script = _saige(env={"_SAIGE_K8S_COMPLETE": "bash_source"})
    assert script.returncode == 0, script.stderr
    assert "complete -o nosort -F _saige_k8s_completion saige-k8s" in script.stdout
    words = {"COMP_WORDS": "saige-k8s status -o ", "COMP_CWORD": "3", "_SAIGE_K8S_COMPLETE": "bash_complete"}
    assert _saige(env=words).stdout.split() == ["plain,table", "plain,wide", "plain,json", "plain,yaml"]
