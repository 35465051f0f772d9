"""The controller end to end through the official client, against kmock's emulated API server.

The test thread plays the cluster's controllers (it completes Jobs and writes pods'
termination messages); every object the controller sends is validated against the official
schemas, strictly, since the emulator itself validates nothing.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from saige_k8s.errors import ConfigError, InputError
from saige_k8s.runners import controller
from saige_k8s.runners.jobs import Run
from saige_k8s.runners.kubernetes import Cluster
from saige_k8s.spec import parse_spec
from tests.conftest import run_cli, wait_for
from tests.kube_emulator import KubeEmulator

NS = "default"
RUN = "demo-20261125-130000"
VERSIONS = ("1.30", kubernetes_validate.latest_version())


def _spec(evaluate: bool = False, **train: Any) -> Any:
    return parse_spec(
        {
            "name": "demo",
            "extract": {"min_examples": 10},
            "evaluate": {"enabled": evaluate},
            "train": {"gpus": 1, **train},
            "kubernetes": {"secrets": {"db_url": {"name": "saige-db", "key": "url"}}},
        }
    )


class Submission:
    """``controller.submit`` on a thread: it blocks the way it blocks a laptop's terminal."""

    def __init__(self, cluster: Cluster, run: Run, pushgateway: str | None = None) -> None:
        self.messages: list[str] = []
        self.outcome: controller.Outcome | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, args=(cluster, run, pushgateway), daemon=True)
        self.thread.start()

    def _main(self, cluster: Cluster, run: Run, pushgateway: str | None) -> None:
        try:
            self.outcome = controller.submit(cluster, run, self.messages.append, pushgateway=pushgateway)
        except BaseException as exc:
            self.error = exc

    def join(self) -> None:
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), self.messages


def _job(kube: KubeEmulator, name: str) -> dict | None:
    return next((job for job in kube.objects("jobs", NS) if job["metadata"]["name"] == name), None)


def _finish(kube: KubeEmulator, job: str, step: str, exit_code: int = 0, message: str = "") -> None:
    """What the Job controller and kubelet do: a pod that ran and ended, then the Job's condition."""
    kube.put(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": f"{job}-x7k2p",
                "namespace": NS,
                "labels": {"batch.kubernetes.io/job-name": job, "job-name": job},
            },
            "spec": {"containers": [{"name": step, "image": "img"}]},
            "status": {
                "phase": "Succeeded" if exit_code == 0 else "Failed",
                "containerStatuses": [
                    {
                        "name": step,
                        "ready": False,
                        "restartCount": 0,
                        "image": "img",
                        "imageID": "",
                        "state": {"terminated": {"exitCode": exit_code, "message": message, "reason": "Completed"}},
                    }
                ],
            },
        }
    )
    condition = (
        {"type": "Complete", "status": "True"}
        if exit_code == 0
        else {"type": "Failed", "status": "True", "reason": "PodFailurePolicy", "message": "exit code 2"}
    )
    kube.patch_status("jobs", NS, job, {"conditions": [condition]})


def _sent_objects(kube: KubeEmulator) -> list[dict]:
    return [sent.body for sent in kube.requests() if sent.method == "POST" and isinstance(sent.body, dict)]


def _summary(kept: int) -> str:
    return json.dumps({"dataset_id": RUN, "scanned": 5000, "kept": kept, "train": kept - 5, "eval": 5})


def test_submit_runs_extract_then_train_with_its_dataset_and_status_logs_cancel_behave(kube):
    cluster = Cluster(kube.api_client(), NS)
    submission = Submission(cluster, Run(_spec(), RUN))
    assert wait_for(lambda: _job(kube, f"{RUN}-extract") is not None, 10), submission.messages
    assert _job(kube, f"{RUN}-train") is None  # nothing trains before the dataset is known
    _finish(kube, f"{RUN}-extract", "extract", message=_summary(kept=480))
    assert wait_for(lambda: _job(kube, f"{RUN}-train") is not None, 10), submission.messages
    train = _job(kube, f"{RUN}-train")
    command = train["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[command.index("--dataset") + 1] == RUN
    _finish(kube, f"{RUN}-train", "train")
    submission.join()
    assert submission.error is None, submission.error
    assert submission.outcome.dataset["kept"] == 480
    assert submission.outcome.finished == ["extract", "train"]
    sent = _sent_objects(kube)
    assert [obj["metadata"]["name"] for obj in sent] == [f"{RUN}-extract", f"{RUN}-train"]
    for obj in sent:
        for version in VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)
    # The watch API, not polling: one list per Job, then a watch from the list's version.
    gets = [s for s in kube.requests() if s.method == "GET" and s.path.endswith("/jobs")]
    watches = [s for s in gets if s.params.get("watch") == "true"]
    assert watches and all(w.params["resourceVersion"] for w in watches)
    assert len(gets) - len(watches) <= 2

    rows = controller.KubernetesBackend(cluster).status(RUN)
    assert [(row.step, row.state) for row in rows] == [("extract", "Succeeded"), ("train", "Succeeded")]
    kube.set_log(NS, f"{RUN}-train-x7k2p", "step 10 loss 2.1\nstep 20 loss 1.7\n")
    pod, lines = controller.KubernetesBackend(cluster).logs(RUN, None, follow=False)
    assert pod == f"{RUN}-train-x7k2p"
    assert list(lines) == ["step 10 loss 2.1", "step 20 loss 1.7"]
    assert controller.KubernetesBackend(cluster).cancel(RUN) == [f"{RUN}-extract", f"{RUN}-train"]
    deletes = [s for s in kube.requests() if s.method == "DELETE"]
    assert all(s.body.get("propagationPolicy") == "Background" for s in deletes)
    assert kube.objects("jobs", NS) == []
    with pytest.raises(InputError, match="no run"):
        controller.KubernetesBackend(cluster).cancel(RUN)


def test_a_dataset_below_the_minimum_stops_before_training(kube):
    cluster = Cluster(kube.api_client(), NS)
    submission = Submission(cluster, Run(_spec(), RUN))
    assert wait_for(lambda: _job(kube, f"{RUN}-extract") is not None, 10)
    _finish(kube, f"{RUN}-extract", "extract", message=_summary(kept=7))
    submission.join()
    assert isinstance(submission.error, InputError)
    assert submission.error.exit_code == 2
    assert "7 examples, below extract.min_examples (10)" in str(submission.error)
    assert _job(kube, f"{RUN}-train") is None


def test_a_step_failing_on_its_configuration_fails_the_run_with_exit_code_2_and_its_last_line(kube):
    cluster = Cluster(kube.api_client(), NS)
    submission = Submission(cluster, Run(_spec(), RUN))
    assert wait_for(lambda: _job(kube, f"{RUN}-extract") is not None, 10)
    log_tail = "loading spec\nsaige-k8s: error: table 'experiences' not found in the database"
    _finish(kube, f"{RUN}-extract", "extract", exit_code=2, message=log_tail)
    submission.join()
    assert isinstance(submission.error, controller.StepFailed)
    assert submission.error.exit_code == 2
    assert "step extract failed (PodFailurePolicy" in str(submission.error)
    assert str(submission.error).endswith("table 'experiences' not found in the database")


def test_watch_expiry_is_survived_by_listing_again(kube):
    cluster = Cluster(kube.api_client(), NS)
    submission = Submission(cluster, Run(_spec(), RUN))
    assert wait_for(lambda: _job(kube, f"{RUN}-extract") is not None, 10)
    watching = lambda: any(s.params.get("watch") in ("true", "1", "True") for s in kube.requests())  # noqa: E731
    assert wait_for(watching, 10)
    lists_before = sum(1 for s in kube.requests() if s.method == "GET" and "watch" not in s.params)
    kube.expire_watch("jobs")
    assert wait_for(
        lambda: sum(1 for s in kube.requests() if s.method == "GET" and "watch" not in s.params) > lists_before, 10
    ), "the controller did not list again after 410 Gone"
    _finish(kube, f"{RUN}-extract", "extract", message=_summary(kept=480))
    assert wait_for(lambda: _job(kube, f"{RUN}-train") is not None, 10), submission.messages
    _finish(kube, f"{RUN}-train", "train")
    submission.join()
    assert submission.error is None, submission.error


def test_resubmitting_a_run_adopts_its_jobs_and_creates_no_duplicates(kube):
    cluster = Cluster(kube.api_client(), NS)
    first = Submission(cluster, Run(_spec(), RUN))
    assert wait_for(lambda: _job(kube, f"{RUN}-extract") is not None, 10)
    _finish(kube, f"{RUN}-extract", "extract", message=_summary(kept=480))
    assert wait_for(lambda: _job(kube, f"{RUN}-train") is not None, 10)
    # The laptop went away; the run is submitted again while training runs.
    second = Submission(Cluster(kube.api_client(), NS), Run(_spec(), RUN))
    assert wait_for(lambda: any("exists already" in m for m in second.messages if "train" in m), 10), second.messages
    _finish(kube, f"{RUN}-train", "train")
    first.join()
    second.join()
    assert first.error is None and second.error is None, (first.error, second.error)
    assert sorted(job["metadata"]["name"] for job in kube.objects("jobs", NS)) == [f"{RUN}-extract", f"{RUN}-train"]
    # A Job of that name from another run is not adopted.
    other = Run(_spec(), RUN)
    kube.patch_status("jobs", NS, f"{RUN}-extract", {})
    job = _job(kube, f"{RUN}-extract")
    job["metadata"]["labels"]["saige.io/pipeline-run"] = "someone-else"
    kube.put(job)
    with pytest.raises(InputError, match="not part of run"):
        controller.submit(cluster, other, lambda _: None)


def test_forbidden_names_the_verb_and_resource(kube):
    kube.forbid("create", "jobs")
    with pytest.raises(ConfigError, match=r"forbidden: cannot create jobs in namespace 'default'"):
        controller.submit(Cluster(kube.api_client(), NS), Run(_spec(), RUN), lambda _: None)


def test_an_unknown_namespace_is_one_clear_error(kube):
    with pytest.raises(ConfigError, match=r"namespace 'nowhere' not found"):
        controller.submit(Cluster(kube.api_client(), "nowhere"), Run(_spec(), RUN), lambda _: None)


def test_throttling_and_server_errors_are_retried_and_create_one_job(kube):
    kube.fail_next("create", "jobs", status=429, times=1, retry_after=0)
    kube.fail_next("create", "jobs", status=503, times=1)
    cluster = Cluster(kube.api_client(), NS)
    submission = Submission(cluster, Run(_spec(), RUN))
    assert wait_for(lambda: _job(kube, f"{RUN}-extract") is not None, 20), submission.messages
    creates = [s for s in kube.requests() if s.method == "POST"]
    assert len(creates) == 3  # 429, 503, then created
    assert len(kube.objects("jobs", NS)) == 1
    _finish(kube, f"{RUN}-extract", "extract", message=_summary(kept=7))
    submission.join()


def test_persistent_server_errors_end_as_a_runtime_failure(kube):
    kube.fail_next("create", "jobs", status=500, times=10)
    cluster = Cluster(kube.api_client(), NS, attempts=2)
    with pytest.raises(Exception, match=r"create jobs failed with HTTP 500") as caught:
        controller.submit(cluster, Run(_spec(), RUN), lambda _: None)
    assert caught.value.exit_code == 1


def _kubeconfig(tmp_path: Path, server: str, namespace: str = NS) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "emu", "cluster": {"server": server}}],
                "users": [{"name": "dev", "user": {"token": "not-a-real-token"}}],
                "contexts": [{"name": "emu", "context": {"cluster": "emu", "user": "dev", "namespace": namespace}}],
                "current-context": "emu",
            }
        )
    )
    return path


def test_cli_submit_no_wait_starts_the_controller_in_the_cluster_and_status_shows_it(kube, tmp_path):
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(_spec().model_dump(mode="json", by_alias=True, exclude_none=True)))
    env = {"KUBECONFIG": str(_kubeconfig(tmp_path, kube.url))}
    result = run_cli("submit", "-f", spec_path, "--run", RUN, "--no-wait", env=env)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == RUN
    controller_job = _job(kube, f"{RUN}-submit")
    for version in VERSIONS:
        kubernetes_validate.validate(controller_job, version, strict=True)
    assert controller_job["spec"]["template"]["spec"]["serviceAccountName"] == "saige"
    table = run_cli("status", env=env)
    assert table.exit_code == 0, table.stderr
    assert table.stdout.splitlines()[0].split() == ["RUN", "STEP", "STATE", "STARTED", "FINISHED", "JOB"]
    assert table.stdout.splitlines()[1].split()[:3] == [RUN, "submit", "Pending"]
    rendered = run_cli("status", "-o", "json", env=env)
    assert json.loads(rendered.stdout)[0]["job"] == f"{RUN}-submit"
    # The kubeconfig's token never reaches the output.
    assert "not-a-real-token" not in result.stdout + result.stderr + table.stdout


def test_cli_errors_without_a_kubeconfig_and_for_an_unknown_run(kube, tmp_path):
    missing = run_cli("status", env={"KUBECONFIG": str(tmp_path / "absent")})
    assert missing.exit_code == 2
    assert missing.stderr.startswith(f"saige-k8s: error: no kubeconfig: none at {tmp_path / 'absent'}")
    assert "Traceback" not in missing.stderr
    env = {"KUBECONFIG": str(_kubeconfig(tmp_path, kube.url))}
    unknown = run_cli("logs", "nope-1", env=env)
    assert unknown.exit_code == 2
    assert "no run 'nope-1' in namespace default" in unknown.stderr


def test_a_step_stuck_pending_is_reported_with_the_schedulers_reason(kube, monkeypatch):
    from saige_k8s.runners import kubernetes as api

    monkeypatch.setattr(api, "WATCH_SECONDS", 1)
    cluster = Cluster(kube.api_client(), NS)
    submission = Submission(cluster, Run(_spec(), RUN))
    assert wait_for(lambda: _job(kube, f"{RUN}-extract") is not None, 10)
    kube.put(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": f"{RUN}-extract-abcde",
                "namespace": NS,
                "labels": {"batch.kubernetes.io/job-name": f"{RUN}-extract"},
            },
            "spec": {"containers": [{"name": "extract", "image": "img"}]},
            "status": {
                "phase": "Pending",
                "conditions": [
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
                    }
                ],
            },
        }
    )
    reported = (
        f"pod {RUN}-extract-abcde Pending: Unschedulable: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    )
    assert wait_for(lambda: any(reported in m for m in submission.messages), 10), submission.messages
    _finish(kube, f"{RUN}-extract", "extract", message=_summary(kept=7))
    submission.join()


def _verdict(verdict: str, reasons: list[str]) -> str:
    return json.dumps(
        {
            "dataset_id": RUN,
            "candidate": RUN,
            "baseline": "demo-20261118-130000",
            "verdict": verdict,
            "reasons": reasons,
        }
    )


def _through_training(kube: KubeEmulator, submission: Submission) -> None:
    assert wait_for(lambda: _job(kube, f"{RUN}-extract") is not None, 10), submission.messages
    _finish(kube, f"{RUN}-extract", "extract", message=_summary(kept=480))
    assert wait_for(lambda: _job(kube, f"{RUN}-train") is not None, 10), submission.messages
    _finish(kube, f"{RUN}-train", "train")
    assert wait_for(lambda: _job(kube, f"{RUN}-evaluate") is not None, 10), submission.messages


def test_a_promoted_candidate_is_exported_after_its_evaluation(kube):
    cluster = Cluster(kube.api_client(), NS)
    submission = Submission(cluster, Run(_spec(evaluate=True, export=True), RUN))
    _through_training(kube, submission)
    evaluate = _job(kube, f"{RUN}-evaluate")
    pod = evaluate["spec"]["template"]["spec"]
    assert pod["containers"][0]["command"][:3] == ["saige-k8s", "evaluate", f"/data/runs/{RUN}"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    rules = evaluate["spec"]["podFailurePolicy"]["rules"]
    assert rules[0]["action"] == "FailJob" and rules[0]["onExitCodes"]["values"] == [2, 3]
    assert _job(kube, f"{RUN}-export") is None  # nothing is exported before the verdict
    _finish(kube, f"{RUN}-evaluate", "evaluate", message=_verdict("promoted", ["overall win rate 0.71 vs 0.64"]))
    assert wait_for(lambda: _job(kube, f"{RUN}-export") is not None, 10), submission.messages
    _finish(kube, f"{RUN}-export", "export")
    submission.join()
    assert submission.error is None, submission.error
    assert submission.outcome.finished == ["extract", "train", "evaluate", "export"]
    assert f"evaluate: candidate {RUN} promoted against demo-20261118-130000" in submission.messages
    for obj in _sent_objects(kube):
        for version in VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)


def test_a_rejected_candidate_ends_the_run_as_rejected_and_is_not_exported(kube):
    from saige_k8s.errors import CandidateRejected

    cluster = Cluster(kube.api_client(), NS)
    submission = Submission(cluster, Run(_spec(evaluate=True, export=True), RUN))
    _through_training(kube, submission)
    reasons = ["karuna regressed: mean margin -0.21 vs +0.04 (delta -0.25, 95% CI -0.38 to -0.12, n=14)"]
    _finish(kube, f"{RUN}-evaluate", "evaluate", exit_code=3, message=_verdict("rejected", reasons))
    submission.join()
    assert isinstance(submission.error, CandidateRejected)
    assert submission.error.exit_code == 3
    assert "rejected: karuna regressed" in str(submission.error)
    time.sleep(0.5)
    assert _job(kube, f"{RUN}-export") is None
    assert [job["metadata"]["name"] for job in kube.objects("jobs", NS)][-1] == f"{RUN}-evaluate"


# --- multi-node: an Indexed Job and its headless Service --------------------------------------------


def _node_pod(kube: KubeEmulator, job: dict, index: int, phase: str, exit_code: int | None = None, **ended: str) -> str:
    """What the Job controller and kubelet make of an Indexed Job: pod JOB-INDEX-xxxxx, labelled with its index."""
    name = job["metadata"]["name"]
    state: dict[str, Any] = {"running": {}} if exit_code is None else {"terminated": {"exitCode": exit_code, **ended}}
    pod = f"{name}-{index}-q8z4w"
    kube.put(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": pod,
                "namespace": NS,
                "labels": {
                    "batch.kubernetes.io/job-name": name,
                    "batch.kubernetes.io/controller-uid": job["metadata"]["uid"],
                    "batch.kubernetes.io/job-completion-index": str(index),
                },
                "ownerReferences": [
                    {"apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": job["metadata"]["uid"]}
                ],
            },
            "spec": {"containers": [{"name": "train", "image": "img"}], "hostname": f"{name}-{index}"},
            "status": {
                "phase": phase,
                "containerStatuses": [
                    {"name": "train", "ready": exit_code is None, "restartCount": 0, "image": "img", "imageID": ""}
                    | {"state": state}
                ],
            },
        }
    )
    return pod


def _service(kube: KubeEmulator, name: str) -> dict | None:
    return next((s for s in kube.objects("services", NS) if s["metadata"]["name"] == name), None)


def test_multi_node_train_creates_its_indexed_job_and_service_reports_each_index_and_cancel_cleans_up(kube):
    from saige_k8s.cli import _state

    cluster = Cluster(kube.api_client(), NS)
    backend = controller.KubernetesBackend(cluster)
    submission = Submission(cluster, Run(_spec(nodes=2), RUN))
    assert wait_for(lambda: _job(kube, f"{RUN}-extract") is not None, 10), submission.messages
    _finish(kube, f"{RUN}-extract", "extract", message=_summary(kept=480))
    train_name = f"{RUN}-train"
    assert wait_for(lambda: _service(kube, train_name) is not None, 10), submission.messages
    train, service = _job(kube, train_name), _service(kube, train_name)
    assert train["spec"]["completionMode"] == "Indexed" and train["spec"]["completions"] == 2
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    # The Service belongs to the Job that was created: whatever deletes the Job deletes it.
    assert service["metadata"]["ownerReferences"][0]["uid"] == train["metadata"]["uid"]
    sent = _sent_objects(kube)
    assert [(o["kind"], o["metadata"]["name"]) for o in sent] == [
        ("Job", f"{RUN}-extract"),
        ("Job", train_name),
        ("Service", train_name),
    ]
    for obj in sent:
        for version in VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)
    assert f"train: created headless Service {train_name}" in submission.messages

    # Each index's state: node 0 runs, node 1 waits for its GPUs.
    zero = _node_pod(kube, train, 0, "Running")
    _node_pod(kube, train, 1, "Pending")
    kube.patch_status("jobs", NS, train_name, {"active": 2})
    row = backend.status(RUN)[-1]
    assert (row.step, row.state, row.indexes) == ("train", "Running", {"0": "Running", "1": "Pending"})
    assert _state(row) == "Running [0:Running 1:Pending]"
    # logs: node 0 by default (it reports), any node with --index.
    one = _node_pod(kube, train, 1, "Running")
    kube.set_log(NS, zero, "step 10 loss 2.1\n")
    kube.set_log(NS, one, "rank 1 ready\n")
    assert [list(lines) for _, lines in [backend.logs(RUN, "train", False)]] == [["step 10 loss 2.1"]]
    pod, lines = backend.logs(RUN, "train", False, index=1)
    assert (pod, list(lines)) == (one, ["rank 1 ready"])
    with pytest.raises(InputError, match=r"has no index 2 \(it has indexes 0 to 1\)"):
        backend.logs(RUN, "train", False, index=2)
    with pytest.raises(InputError, match=r"has no index 1 \(it has one pod, no index\)"):
        backend.logs(RUN, "extract", False, index=1)

    # cancel deletes the Job and its Service (and the pods, which the Job owns).
    assert backend.cancel(RUN) == [f"{RUN}-extract", train_name]
    assert wait_for(lambda: submission.error is not None, 10)
    assert "deleted" in str(submission.error)
    assert kube.objects("jobs", NS) == [] and kube.objects("services", NS) == []
    service_calls = [(s.method, s.path.rsplit("/", 1)[-1]) for s in kube.requests() if "/services" in s.path]
    assert service_calls == [("POST", "services"), ("DELETE", train_name)]
    assert [p["metadata"]["name"] for p in kube.objects("pods", NS)] == [f"{RUN}-extract-x7k2p"]


def test_a_failed_index_fails_the_step_naming_it_and_the_ttl_takes_the_service(kube):
    cluster = Cluster(kube.api_client(), NS)
    submission = Submission(cluster, Run(_spec(nodes=3), RUN))
    assert wait_for(lambda: _job(kube, f"{RUN}-extract") is not None, 10), submission.messages
    _finish(kube, f"{RUN}-extract", "extract", message=_summary(kept=480))
    train_name = f"{RUN}-train"
    assert wait_for(lambda: _service(kube, train_name) is not None, 10), submission.messages
    train = _job(kube, train_name)
    # Node 2 ran out of memory first; the Job controller then stopped nodes 0 and 1.
    _node_pod(kube, train, 0, "Failed", 143, finishedAt="2026-12-01T10:00:09Z", message="stopped")
    _node_pod(kube, train, 1, "Failed", 143, finishedAt="2026-12-01T10:00:08Z")
    oom = "step 40 loss 1.2\nsaige-k8s: error: out of memory: try --use-4bit"
    _node_pod(kube, train, 2, "Failed", 1, finishedAt="2026-12-01T10:00:05Z", message=oom)
    failed = {
        "type": "Failed",
        "status": "True",
        "reason": "BackoffLimitExceeded",
        "message": "Job has reached the specified backoff limit",
    }
    kube.patch_status("jobs", NS, train_name, {"conditions": [failed], "completedIndexes": ""})
    submission.join()
    assert isinstance(submission.error, controller.StepFailed)
    assert submission.error.exit_code == 1
    assert str(submission.error) == (
        f"step train failed (BackoffLimitExceeded, Job {train_name}, index 2 exited with 1): "
        "saige-k8s: error: out of memory: try --use-4bit"
    )
    row = controller.KubernetesBackend(cluster).status(RUN)[-1]
    assert (row.state, row.indexes) == ("Failed", {"0": "Failed", "1": "Failed", "2": "Failed"})
    # The TTL controller deletes the finished Job; the Service and pods go with it.
    kube.delete("jobs", NS, train_name)
    assert _service(kube, train_name) is None
    assert not [p for p in kube.objects("pods", NS) if p["metadata"]["name"].startswith(train_name)]


def test_a_config_error_on_one_index_is_exit_code_2_and_completed_indexes_count(kube):
    cluster = Cluster(kube.api_client(), NS)
    submission = Submission(cluster, Run(_spec(nodes=2), RUN))
    assert wait_for(lambda: _job(kube, f"{RUN}-extract") is not None, 10)
    _finish(kube, f"{RUN}-extract", "extract", message=_summary(kept=480))
    train_name = f"{RUN}-train"
    assert wait_for(lambda: _service(kube, train_name) is not None, 10)
    train = _job(kube, train_name)
    _node_pod(kube, train, 0, "Succeeded", 0)
    kube.patch_status("jobs", NS, train_name, {"completedIndexes": "0", "active": 1})
    _node_pod(kube, train, 1, "Running")
    row = controller.KubernetesBackend(cluster).status(RUN)[-1]
    assert row.indexes == {"0": "Succeeded", "1": "Running"}
    _node_pod(kube, train, 1, "Failed", 2, message="saige-k8s: error: dataset has no train split")
    failed = {"type": "Failed", "status": "True", "reason": "PodFailurePolicy", "message": "exit code 2"}
    kube.patch_status("jobs", NS, train_name, {"conditions": [failed], "active": 0})
    submission.join()
    assert isinstance(submission.error, controller.StepFailed)
    assert submission.error.exit_code == 2
    assert "index 1 exited with 2" in str(submission.error)
