"""The Job builders: every shipped spec renders Jobs that pass the official schemas strictly."""

from __future__ import annotations

import json
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from saige_k8s.errors import ConfigError
from saige_k8s.runners.jobs import Run, construct_step_job, job_name, pipeline_jobs, spec_document, to_dict
from saige_k8s.spec import PipelineSpec, load_spec, parse_spec
from tests.conftest import run_cli

JOBS_DIR = Path(__file__).resolve().parents[1] / "jobs"
SPECS = sorted(JOBS_DIR.glob("*.yaml"))
#: The oldest Kubernetes the chart supports and the newest schema bundled with kubernetes-validate.
VERSIONS = ("1.30", kubernetes_validate.latest_version())


def _pod(job: dict) -> dict:
    return job["spec"]["template"]["spec"]


@pytest.mark.parametrize("spec_path", SPECS, ids=lambda p: p.name)
def test_every_shipped_spec_renders_strictly_valid_jobs(spec_path: Path):
    spec = load_spec(spec_path)
    jobs = [to_dict(job) for job in pipeline_jobs(Run(spec, f"{spec.name}-20261125-130000"))]
    assert [job["metadata"]["labels"]["saige.io/step"] for job in jobs] == (
        ["extract", "train", "evaluate", "export"] if spec.train.export else ["extract", "train", "evaluate"]
    )
    for job in jobs:
        for version in VERSIONS:
            kubernetes_validate.validate(job, version, strict=True)
        assert len(job["metadata"]["name"]) <= 63


def test_render_tinyllama_train_job_requests_a_gpu_and_memory_backed_shm(tmp_path):
    result = run_cli("render", "-f", JOBS_DIR / "tinyllama.yaml", "--run", "tinyllama-20261125-130000", "-o", "json")
    assert result.exit_code == 0, result.stderr
    items = json.loads(result.stdout)["items"]
    train = next(job for job in items if job["metadata"]["name"].endswith("-train"))
    for job in items:
        for version in VERSIONS:
            kubernetes_validate.validate(job, version, strict=True)
    container = _pod(train)["containers"][0]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    shm_mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm")
    shm = next(v for v in _pod(train)["volumes"] if v["name"] == shm_mount["name"])
    assert shm["emptyDir"]["medium"] == "Memory"
    # The database URL comes from a Secret reference, never a value.
    extract = _pod(items[0])["containers"][0]
    db = next(e for e in extract["env"] if e["name"] == "SAIGE_DB_URL")
    assert db == {"name": "SAIGE_DB_URL", "valueFrom": {"secretKeyRef": {"name": "saige-db", "key": "url"}}}
    # YAML output is the same objects.
    as_yaml = run_cli("render", "-f", JOBS_DIR / "tinyllama.yaml", "--run", "tinyllama-20261125-130000")
    assert list(yaml.safe_load_all(as_yaml.stdout)) == items


def test_pods_are_hardened_and_steps_carry_labels_and_failure_policy():
    spec = load_spec(JOBS_DIR / "llama3-8b-qlora.yaml")
    for job in map(to_dict, pipeline_jobs(Run(spec, "r1"))):
        step = job["metadata"]["labels"]["saige.io/step"]
        pod = _pod(job)
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 10001
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        assert pod["restartPolicy"] == "Never"
        for container in pod["containers"] + pod.get("initContainers", []):
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"] == {"drop": ["ALL"]}
            assert context["readOnlyRootFilesystem"] is True
            assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"])
        assert job["metadata"]["labels"]["saige.io/pipeline-run"] == "r1"
        assert job["metadata"]["labels"]["app.kubernetes.io/component"] == step
        rules = job["spec"]["podFailurePolicy"]["rules"]
        assert rules[0] == {
            "action": "FailJob",
            # 3: the evaluate step's rejected candidate, an outcome
            "onExitCodes": {"containerName": step, "operator": "In", "values": [2, 3] if step == "evaluate" else [2]},
        }
        assert rules[1]["action"] == "Ignore"
        assert rules[1]["onPodConditions"] == [{"type": "DisruptionTarget", "status": "True"}]
        assert job["spec"]["ttlSecondsAfterFinished"] > 0
        assert job["spec"]["activeDeadlineSeconds"] > 0


def test_two_gpus_launch_torchrun_with_two_processes_and_the_spec_reaches_the_pod():
    spec = load_spec(JOBS_DIR / "llama3-8b-qlora.yaml")
    train = to_dict(construct_step_job(Run(spec, "r1"), "train"))
    command = _pod(train)["containers"][0]["command"]
    assert command[:4] == ["torchrun", "--standalone", "--nproc_per_node", "2"]
    assert command[command.index("--dataset") + 1] == "r1"
    assert _pod(train)["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    # The spec file in the pod is the annotation the downward API projects, and parses to the same spec.
    annotation = train["spec"]["template"]["metadata"]["annotations"]["saige.io/spec"]
    projected = next(v for v in _pod(train)["volumes"] if "downwardAPI" in v)
    assert projected["downwardAPI"]["items"][0]["fieldRef"]["fieldPath"] == "metadata.annotations['saige.io/spec']"
    assert parse_spec(yaml.safe_load(annotation)).train == spec.train


def test_passthrough_scheduling_and_kueue_label():
    spec = parse_spec(
        {
            "train": {"gpus": 4},
            "kubernetes": {
                "kueue_queue": "gpu-queue",
                "service_account_name": "trainer",
                "images": {"pull_secrets": ["regcred"]},
                "train": {
                    "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                    "affinity": {
                        "nodeAffinity": {
                            "requiredDuringSchedulingIgnoredDuringExecution": {
                                "nodeSelectorTerms": [
                                    {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["a100"]}]}
                                ]
                            }
                        }
                    },
                    "runtime_class_name": "nvidia",
                    "priority_class_name": "training",
                    "shm_size": "32Gi",
                },
            },
        }
    )
    train = to_dict(construct_step_job(Run(spec, "r2"), "train"))
    pod = _pod(train)
    for version in VERSIONS:
        kubernetes_validate.validate(train, version, strict=True)
    assert train["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert (pod["runtimeClassName"], pod["priorityClassName"]) == ("nvidia", "training")
    assert pod["serviceAccountName"] == "trainer"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    shm = next(v for v in pod["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "32Gi"}
    # Setting only some keys of a step keeps its default resources.
    assert pod["containers"][0]["resources"]["requests"]["memory"] == "24Gi"


def test_a_misspelt_passthrough_key_is_an_error_not_silently_dropped():
    spec = parse_spec({"kubernetes": {"train": {"tolerations": [{"key": "gpu", "opertor": "Exists"}]}}})
    with pytest.raises(ConfigError, match=r"kubernetes\.train\.tolerations\[0\]: unknown field 'opertor'"):
        pipeline_jobs(Run(spec, "r3"))


def test_a_password_in_the_spec_is_refused_and_secret_refs_carry_no_values():
    planted = "PLANTED-s3cret-value"
    spec = parse_spec({"source": {"url": f"postgresql+psycopg://saige:{planted}@db/saige"}})
    with pytest.raises(ConfigError, match=r"kubernetes\.secrets\.db_url") as caught:
        pipeline_jobs(Run(spec, "r4"))
    assert planted not in str(caught.value)
    spec = parse_spec(
        {
            "source": {"url": "postgresql+psycopg://saige@db/saige"},
            "kubernetes": {
                "secrets": {"db_url": {"name": "saige-db", "key": "url"}, "hf_token": {"name": "hf", "key": "t"}}
            },
        }
    )
    rendered = json.dumps([to_dict(job) for job in pipeline_jobs(Run(spec, "r4"))])
    assert planted not in rendered
    train = to_dict(construct_step_job(Run(spec, "r4"), "train"))
    hf = next(e for e in _pod(train)["containers"][0]["env"] if e["name"] == "HF_TOKEN")
    assert hf["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "t"}


def test_names_longer_than_63_characters_are_refused():
    assert job_name("a" * 55, "extract") == "a" * 55 + "-extract"
    with pytest.raises(ConfigError, match="longer than 63"):
        job_name("a" * 56, "extract")
    result = run_cli("render", "-f", JOBS_DIR / "demo.yaml", "--run", "x" * 60)
    assert result.exit_code == 2
    assert "longer than 63" in result.stderr


@pytest.mark.parametrize("run_id", ["Run-1", "run_1", "-run", "run-", "run.1"])
def test_run_ids_that_are_not_dns_labels_are_refused(run_id):
    result = run_cli("render", "-f", JOBS_DIR / "demo.yaml", "--run", run_id)
    assert result.exit_code == 2
    assert f"run id {run_id!r}" in result.stderr
    assert result.stdout == ""


def test_demo_spec_creates_its_database_on_the_volume_and_collect_runs_first():
    spec = load_spec(JOBS_DIR / "demo.yaml")
    extract = to_dict(construct_step_job(Run(spec, "d1"), "extract"))
    init = _pod(extract)["initContainers"][0]
    assert init["command"][:2] == ["saige-k8s", "demo-db"]
    assert "--if-missing" in init["command"]
    assert _pod(extract)["containers"][0]["workingDir"] == "/data"
    assert _pod(extract)["containers"][0]["command"][-2:] == ["--summary-file", "/dev/termination-log"]
    with_collect = parse_spec(
        {
            "collect": {
                "image": "registry.example/saige-trainer:1.2",
                "command": ["node", "trainer.js"],
                "env": {"TRAINING_EPISODES": "50"},
                "secret_env": {"OPENAI_API_KEY": {"name": "llm", "key": "key"}},
            }
        }
    )
    jobs = [to_dict(job) for job in pipeline_jobs(Run(with_collect, "c1"))]
    assert [job["metadata"]["labels"]["saige.io/step"] for job in jobs] == ["collect", "extract", "train", "evaluate"]
    collect = _pod(jobs[0])["containers"][0]
    assert collect["image"] == "registry.example/saige-trainer:1.2"
    assert collect["command"] == ["node", "trainer.js"]
    assert {"name": "TRAINING_EPISODES", "value": "50"} in collect["env"]
    key = next(e for e in collect["env"] if e["name"] == "OPENAI_API_KEY")
    assert key["valueFrom"]["secretKeyRef"] == {"name": "llm", "key": "key"}
    for job in jobs:
        kubernetes_validate.validate(job, VERSIONS[-1], strict=True)


def test_the_pods_spec_omits_unset_values_and_the_kubernetes_block():
    spec = PipelineSpec()
    document = yaml.safe_load(spec_document(spec))
    assert "kubernetes" not in document
    assert "url" not in document["source"]
    assert parse_spec(document) == spec.model_copy(update={"kubernetes": spec.kubernetes})


def test_the_detached_controller_job_runs_submit_in_the_cluster_with_the_full_spec():
    from saige_k8s.runners.jobs import construct_controller_job

    spec = load_spec(JOBS_DIR / "tinyllama.yaml")
    job = to_dict(construct_controller_job(Run(spec, "tinyllama-20261125-130000")))
    for version in VERSIONS:
        kubernetes_validate.validate(job, version, strict=True)
    pod = _pod(job)
    assert job["metadata"]["name"] == "tinyllama-20261125-130000-submit"
    assert pod["serviceAccountName"] == spec.kubernetes.controller_service_account
    # It needs its token to call the API, and the chart's ServiceAccount mounts none by default.
    assert pod["automountServiceAccountToken"] is True
    assert pod["containers"][0]["command"] == [
        "saige-k8s",
        "submit",
        "--in-cluster",
        "-f",
        "/etc/saige/spec.yaml",
        "--run",
        "tinyllama-20261125-130000",
    ]
    assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    document = yaml.safe_load(job["spec"]["template"]["metadata"]["annotations"]["saige.io/spec"])
    assert parse_spec(document) == spec  # the kubernetes block included: it makes the step Jobs


# --- multi-node: an Indexed Job and its headless Service ------------------------------------------


def _multi_node(nodes: int = 3, **kubernetes: object) -> PipelineSpec:
    return parse_spec(
        {
            "name": "big",
            "train": {"nodes": nodes, "gpus": 8, "rendezvous_timeout": 1200},
            "kubernetes": {"kueue_queue": "gpu-queue", **kubernetes},
        }
    )


def test_multi_node_train_is_an_indexed_job_with_a_headless_service_valid_and_restricted():
    from saige_k8s.runners.jobs import construct_step_service, pipeline_objects
    from tests.pod_security import violations

    # NCCL and gloo settings reach every pod of the group through the train pod's env.
    run = Run(_multi_node(train={"env": {"NCCL_DEBUG": "INFO", "NCCL_SOCKET_IFNAME": "eth0"}}), "big-1")
    objects = [to_dict(obj) for obj in pipeline_objects(run)]
    assert [(o["kind"], o["metadata"]["name"]) for o in objects] == [
        ("Job", "big-1-extract"),
        ("Job", "big-1-train"),
        ("Service", "big-1-train"),
        ("Job", "big-1-evaluate"),
    ]
    for obj in objects:
        for version in VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)
        if obj["kind"] == "Job":
            assert violations(_pod(obj), obj["spec"]["template"]["metadata"].get("annotations")) == []
    train, service = objects[1], objects[2]
    spec = train["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 3, 3)
    # A lost member ends the group: no pod is retried or replaced into it.
    assert spec["backoffLimit"] == 0
    assert [rule["action"] for rule in spec["podFailurePolicy"]["rules"]] == ["FailJob"]
    pod = _pod(train)
    assert pod["subdomain"] == service["metadata"]["name"] == "big-1-train"
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    # The Service selects exactly the train pods of this run.
    pod_labels = train["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["selector"]["saige.io/step"] == "train"
    (container,) = pod["containers"]
    command = container["command"]
    assert command[0] == "torchrun"
    option = lambda name: command[command.index(name) + 1]  # noqa: E731
    assert option("--nnodes") == "3"
    assert option("--nproc-per-node") == "8"
    assert option("--node-rank") == "$(JOB_COMPLETION_INDEX)"
    assert option("--master-addr") == "big-1-train-0.big-1-train"  # index 0, under the Service
    assert option("--master-port") == str(service["spec"]["ports"][0]["port"])
    assert option("--rdzv-conf") == "timeout=1200"
    assert option("--max-restarts") == "0"
    env = {e["name"]: e for e in container["env"]}
    # The variable the command line expands is declared in the container, before it is used.
    assert container["env"][0]["name"] == "JOB_COMPLETION_INDEX"
    assert env["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )
    assert env["NCCL_DEBUG"]["value"] == "INFO" and env["NCCL_SOCKET_IFNAME"]["value"] == "eth0"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    # Kueue admits the Job as one workload of all its pods.
    assert train["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    # Once created, the Service belongs to its Job: deleting the Job (cancel, TTL) deletes it.
    from kubernetes import client

    created = client.V1Job(metadata=client.V1ObjectMeta(name="big-1-train", uid="0f6c5b0e-1111-2222-3333-444455556666"))
    owned = to_dict(construct_step_service(run, "train", owner=created))
    assert owned["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "name": "big-1-train",
            "uid": "0f6c5b0e-1111-2222-3333-444455556666",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    for version in VERSIONS:
        kubernetes_validate.validate(owned, version, strict=True)


def test_one_node_keeps_the_plain_job_and_its_retries():
    spec = parse_spec({"train": {"gpus": 2}})
    train = to_dict(construct_step_job(Run(spec, "r1"), "train"))
    assert "completionMode" not in train["spec"] and "subdomain" not in _pod(train)
    assert train["spec"]["backoffLimit"] == 2
    assert [rule["action"] for rule in train["spec"]["podFailurePolicy"]["rules"]] == ["FailJob", "Ignore"]
    assert _pod(train)["containers"][0]["command"][:2] == ["torchrun", "--standalone"]


def test_multi_node_names_must_fit_dns_and_the_render_command_prints_the_service(tmp_path):
    # NAME-YYYYMMDD-HHMMSS-train-INDEX with the longest spec name still fits 63 characters.
    longest = f"{'a' * 38}-20261201-000000"
    construct_step_job(Run(_multi_node(nodes=99).model_copy(update={"name": "a" * 38}), longest), "train")
    with pytest.raises(ConfigError, match="must start with a letter"):
        construct_step_job(Run(_multi_node(), "9big-1"), "train")
    with pytest.raises(ConfigError, match=r"pod host name '.*-train-98' is longer than 63"):
        construct_step_job(Run(_multi_node(nodes=99), "a" * 55), "train")
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump({"name": "big", "train": {"nodes": 2}}))
    result = run_cli("render", "-f", spec_path, "--run", "big-2", "-o", "json")
    assert result.exit_code == 0, result.stderr
    kinds = [(item["kind"], item["metadata"]["name"]) for item in json.loads(result.stdout)["items"]]
    assert ("Service", "big-2-train") in kinds
    refused = run_cli("render", "-f", spec_path, "--run", "2big")
    assert refused.exit_code == 2 and "must start with a letter" in refused.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"train": {"nodes": 0}}))
    invalid = run_cli("render", "-f", bad)
    assert invalid.exit_code == 2 and "train.nodes" in invalid.stderr


def test_every_pipeline_pod_passes_pod_security_restricted_and_the_checker_catches_violations():
    from tests.pod_security import violations

    for spec_path in SPECS:
        spec = load_spec(spec_path)
        for job in map(to_dict, pipeline_jobs(Run(spec, f"{spec.name}-1"))):
            assert violations(_pod(job)) == [], (spec_path.name, job["metadata"]["name"])
    pod = _pod(to_dict(construct_step_job(Run(_multi_node(), "big-1"), "train")))
    container = pod["containers"][0]
    broken = {
        **pod,
        "hostNetwork": True,
        "volumes": [*pod["volumes"], {"name": "host", "hostPath": {"path": "/"}}],
        "containers": [
            {
                **container,
                "ports": [{"containerPort": 29500, "hostPort": 29500}],
                "securityContext": {
                    **container["securityContext"],
                    "allowPrivilegeEscalation": True,
                    "capabilities": {"add": ["SYS_ADMIN"]},
                    "seccompProfile": {"type": "Unconfined"},
                },
            }
        ],
    }
    found = "\n".join(violations(broken))
    for control in (
        "host namespaces: hostNetwork",
        "HostPath volumes: host",
        "host ports",
        "privilege escalation",
        "does not drop ALL",
        "adds ['SYS_ADMIN']",
        "seccomp: train has Unconfined",
    ):
        assert control in found
