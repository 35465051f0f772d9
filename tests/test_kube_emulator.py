"""Tests of the Kubernetes emulator harness, through the official client only (as the controller uses it)."""

import json
import time

import pytest
from kubernetes import client, watch

from tests import kube_emulator

kube = kube_emulator.kube  # the fixture; other test modules can do the same

NS = "default"


def _job(name: str = "train-1", **labels: str) -> dict:
    container = {"name": "main", "image": "busybox", "command": ["true"]}
    spec = {"template": {"spec": {"containers": [container], "restartPolicy": "Never"}}, "backoffLimit": 0}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "labels": labels}, "spec": spec}


@pytest.fixture
def batch(kube):
    return client.BatchV1Api(kube.api_client())


@pytest.fixture
def core(kube):
    return client.CoreV1Api(kube.api_client())


def test_job_create_list_read_delete(kube, batch):
    created = batch.create_namespaced_job(NS, _job())
    assert created.metadata.namespace == NS and created.metadata.uid and created.metadata.resource_version

    assert [j.metadata.name for j in batch.list_namespaced_job(NS).items] == ["train-1"]
    assert batch.read_namespaced_job("train-1", NS).spec.backoff_limit == 0
    assert [j["metadata"]["name"] for j in kube.objects("jobs", NS)] == ["train-1"]

    batch.delete_namespaced_job("train-1", NS, propagation_policy="Background")
    assert batch.list_namespaced_job(NS).items == []
    with pytest.raises(client.ApiException) as exc:
        batch.read_namespaced_job("train-1", NS)
    assert exc.value.status == 404
    assert json.loads(exc.value.body)["message"] == 'jobs.batch "train-1" not found'


def test_duplicate_create_is_409(batch):
    batch.create_namespaced_job(NS, _job())
    with pytest.raises(client.ApiException) as exc:
        batch.create_namespaced_job(NS, _job())
    assert exc.value.status == 409
    assert json.loads(exc.value.body)["reason"] == "AlreadyExists"


def test_generate_name(batch):
    body = _job()
    body["metadata"] = {"generateName": "train-"}
    name = batch.create_namespaced_job(NS, body).metadata.name
    assert name.startswith("train-") and len(name) == len("train-") + 5


def test_selectors_on_list(batch):
    batch.create_namespaced_job(NS, _job("a", app="saige", step="train"))
    batch.create_namespaced_job(NS, _job("b", app="saige", step="extract"))
    batch.create_namespaced_job(NS, _job("c", app="other"))

    def names(**kwargs):
        return sorted(j.metadata.name for j in batch.list_namespaced_job(NS, **kwargs).items)

    assert names(label_selector="app=saige") == ["a", "b"]
    assert names(label_selector="app=saige,step!=train") == ["b"]
    assert names(label_selector="step in (train, extract)") == ["a", "b"]
    assert names(label_selector="!step") == ["c"]
    assert names(field_selector="metadata.name=b") == ["b"]
    assert names(field_selector="metadata.name!=b") == ["a", "c"]


def test_watch_sees_added_then_modified(kube, batch):
    batch.create_namespaced_job(NS, _job())
    w = watch.Watch()
    seen = []
    for event in w.stream(batch.list_namespaced_job, namespace=NS, timeout_seconds=5):
        seen.append((event["type"], event["object"].status.succeeded if event["object"].status else None))
        if event["type"] == "ADDED":
            complete = {"type": "Complete", "status": "True"}
            kube.patch_status("jobs", NS, "train-1", {"succeeded": 1, "conditions": [complete]})
        else:
            w.stop()
    assert seen == [("ADDED", None), ("MODIFIED", 1)]


def test_watch_from_resource_version_skips_old_objects_and_filters(kube, batch):
    batch.create_namespaced_job(NS, _job("old"))
    rv = batch.list_namespaced_job(NS).metadata.resource_version
    kube.put(_job("new") | {"metadata": {"name": "new", "namespace": NS}})
    kube.put(_job("other") | {"metadata": {"name": "other", "namespace": NS}})
    w = watch.Watch()
    stream = w.stream(
        batch.list_namespaced_job,
        namespace=NS,
        resource_version=rv,
        timeout_seconds=1,
        field_selector="metadata.name=new",
    )
    assert [(e["type"], e["object"].metadata.name) for e in stream] == [("ADDED", "new")]


def test_watch_ends_at_timeout_seconds(batch):
    started = time.monotonic()
    assert list(watch.Watch().stream(batch.list_namespaced_job, namespace=NS, timeout_seconds=1)) == []
    assert 0.9 < time.monotonic() - started < 3


def test_expired_watch_raises_410_when_timeout_seconds_is_given(kube, batch):
    kube.expire_watch("jobs")
    w = watch.Watch()
    with pytest.raises(client.ApiException) as exc:
        list(w.stream(batch.list_namespaced_job, namespace=NS, resource_version="1", timeout_seconds=5))
    assert exc.value.status == 410
    assert exc.value.reason == "Expired: too old resource version"


def test_expired_watch_is_retried_once_without_timeout_seconds(kube, batch):
    batch.create_namespaced_job(NS, _job())
    kube.expire_watch("jobs", times=1)
    w = watch.Watch()
    for event in w.stream(batch.list_namespaced_job, namespace=NS, resource_version="0"):
        assert event["type"] == "ADDED"
        w.stop()
    watches = [r for r in kube.requests() if r.params.get("watch") == "true"]
    assert len(watches) == 2  # the client re-watched after the 410, silently

    kube.expire_watch("jobs", times=2)
    with pytest.raises(client.ApiException) as exc:
        list(watch.Watch().stream(batch.list_namespaced_job, namespace=NS, resource_version="999"))
    assert exc.value.status == 410


def test_expire_an_open_watch(kube, batch):
    batch.create_namespaced_job(NS, _job())
    stream = watch.Watch().stream(batch.list_namespaced_job, namespace=NS, timeout_seconds=5)
    assert next(stream)["type"] == "ADDED"
    kube.expire_watch("jobs", times=0)
    with pytest.raises(client.ApiException) as exc:
        next(stream)
    assert exc.value.status == 410
    assert [e["type"] for e in watch.Watch().stream(batch.list_namespaced_job, namespace=NS, timeout_seconds=1)] == [
        "ADDED"
    ]


def test_forbid_gives_rbac_403(kube, batch):
    kube.forbid("create", "jobs", user="system:serviceaccount:ns:sa")
    with pytest.raises(client.ApiException) as exc:
        batch.create_namespaced_job(NS, _job())
    assert exc.value.status == 403
    body = json.loads(exc.value.body)
    assert body["reason"] == "Forbidden" and body["details"] == {"group": "batch", "kind": "jobs"}
    assert body["message"] == (
        'jobs.batch is forbidden: User "system:serviceaccount:ns:sa" cannot create resource "jobs"'
        ' in API group "batch" in the namespace "default"'
    )
    assert batch.list_namespaced_job(NS).items == []  # other verbs still allowed, nothing created


def test_forbid_watch_raises_before_any_event(kube, batch):
    kube.forbid("watch", "jobs", times=1)
    with pytest.raises(client.ApiException) as exc:
        list(watch.Watch().stream(batch.list_namespaced_job, namespace=NS, timeout_seconds=1))
    assert exc.value.status == 403


@pytest.mark.parametrize("status", [429, 500])
def test_fail_next_then_success(kube, batch, status):
    kube.fail_next("create", "jobs", status=status, times=2, retry_after=3)
    for _ in range(2):
        with pytest.raises(client.ApiException) as exc:
            batch.create_namespaced_job(NS, _job())
        assert exc.value.status == status
    if status == 429:
        assert exc.value.headers["Retry-After"] == "3"
        assert json.loads(exc.value.body)["reason"] == "TooManyRequests"
    assert batch.create_namespaced_job(NS, _job()).metadata.name == "train-1"


def test_pod_log_plain_and_follow(kube, core):
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "train-1-abc", "namespace": NS}}
    pod["metadata"]["labels"] = {"job-name": "train-1"}
    # The official client validates what it reads (pydantic): give the fields a real server always sets.
    terminated = {"exitCode": 137, "reason": "OOMKilled", "message": "OOM"}
    status = {"name": "main", "image": "busybox", "imageID": "", "ready": False, "restartCount": 0}
    pod["status"] = {"phase": "Failed", "containerStatuses": [status | {"state": {"terminated": terminated}}]}
    kube.put(pod)
    kube.set_log(NS, "train-1-abc", 'step 1\nstep 2\n{"loss": 0.5}\n')

    pods = core.list_namespaced_pod(NS, label_selector="job-name=train-1").items
    assert pods[0].status.container_statuses[0].state.terminated.message == "OOM"
    assert core.read_namespaced_pod_log("train-1-abc", NS) == 'step 1\nstep 2\n{"loss": 0.5}\n'
    assert core.read_namespaced_pod_log("train-1-abc", NS, tail_lines=1) == '{"loss": 0.5}\n'
    response = core.read_namespaced_pod_log("train-1-abc", NS, follow=True, _preload_content=False)
    assert b"".join(response.stream()) == b'step 1\nstep 2\n{"loss": 0.5}\n'
    response.release_conn()

    with pytest.raises(client.ApiException) as exc:
        core.read_namespaced_pod_log("missing", NS)
    assert exc.value.status == 404


def test_missing_namespace(kube, core, batch):
    assert core.read_namespace(NS).status.phase == "Active"
    with pytest.raises(client.ApiException) as exc:
        core.read_namespace("nope")
    assert exc.value.status == 404
    with pytest.raises(client.ApiException) as exc:
        batch.create_namespaced_job("nope", _job())
    assert exc.value.status == 404
    assert json.loads(exc.value.body)["message"] == 'namespaces "nope" not found'
    assert batch.list_namespaced_job("nope").items == []  # as on a real server

    core.create_namespace({"metadata": {"name": "nope"}})
    assert batch.create_namespaced_job("nope", _job()).metadata.namespace == "nope"


def test_requests_history_has_json_bodies(kube, batch):
    batch.create_namespaced_job(NS, _job())
    batch.list_namespaced_job(NS, label_selector="app=x")
    create, listing = kube.requests()
    assert (create.method, create.path) == ("POST", "/apis/batch/v1/namespaces/default/jobs")
    assert create.body["spec"]["backoffLimit"] == 0 and "uid" not in create.body["metadata"]
    assert (listing.method, listing.params, listing.body) == ("GET", {"labelSelector": "app=x"}, None)


def test_exit_leaves_no_threads_and_ends_open_watches():
    import threading

    before = set(threading.enumerate())
    with kube_emulator.KubeEmulator() as emu:
        batch = client.BatchV1Api(emu.api_client())
        stream = watch.Watch().stream(batch.list_namespaced_job, namespace=NS)
        emu.put(_job() | {"metadata": {"name": "train-1", "namespace": NS}})
        assert next(stream)["type"] == "ADDED"  # the watch is open when the emulator exits
    assert set(threading.enumerate()) == before
