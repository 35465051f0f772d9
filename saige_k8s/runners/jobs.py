"""Pure builders: a PipelineSpec and a run id in, typed ``kubernetes.client`` Jobs out.

Nothing here talks to a cluster, so ``saige-k8s render`` and the tests see exactly the
objects ``submit`` creates. Each step's container runs the command the local runner runs
(``runners.commands``), reads the spec from a file projected from the pod's own annotation
(no ConfigMap to create, clean up or grant RBAC for), and uses the shared volume as its data
root and working directory.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import yaml
from kubernetes import client

from saige_k8s import __version__
from saige_k8s.errors import ConfigError
from saige_k8s.experiences.credentials import refuse_credentials
from saige_k8s.runners.commands import (
    Programs,
    demo_db_command,
    export_command,
    extract_command,
    train_command,
)
from saige_k8s.spec import DNS_LABEL, KubernetesSpec, PipelineSpec, PodSpec, SecretRef, TrainPodSpec

Step = Literal["collect", "extract", "train", "export"]
STEPS: tuple[Step, ...] = ("collect", "extract", "train", "export")
#: The step label and Job name suffix of the in-cluster controller (``submit --no-wait``).
CONTROLLER = "submit"

MAX_NAME = 63
SPEC_DIR = "/etc/saige"
SPEC_FILE = "spec.yaml"
SPEC_ANNOTATION = "saige.io/spec"
RUN_LABEL = "saige.io/pipeline-run"
PIPELINE_LABEL = "saige.io/pipeline"
STEP_LABEL = "saige.io/step"
KUEUE_LABEL = "kueue.x-k8s.io/queue-name"
TERMINATION_LOG = "/dev/termination-log"
#: Exit code of configuration and input errors: retrying cannot help, so the Job fails at once.
CONFIG_ERROR_EXIT = 2


@dataclass(frozen=True)
class Run:
    """One pipeline run: the Jobs' names and the dataset id derive from its id."""

    spec: PipelineSpec
    run_id: str

    def __post_init__(self) -> None:
        # Also a label value and the dataset's directory name, so a DNS label like the Jobs' names.
        if not re.fullmatch(DNS_LABEL, self.run_id):
            raise ConfigError(
                f"run id {self.run_id!r}: use lowercase letters, digits and '-', starting and ending alphanumeric"
            )

    def job_name(self, step: Step) -> str:
        return job_name(self.run_id, step)

    @property
    def steps(self) -> tuple[Step, ...]:
        wanted = {"collect": self.spec.collect is not None, "export": self.spec.train.export}
        return tuple(step for step in STEPS if wanted.get(step, True))

    @property
    def dataset_id(self) -> str:
        return self.run_id

    @property
    def run_dir(self) -> str:
        return f"{self.spec.kubernetes.data_mount_path.rstrip('/')}/runs/{self.run_id}"


def job_name(run_id: str, step: str) -> str:
    name = f"{run_id}-{step}"
    if len(name) > MAX_NAME:
        raise ConfigError(f"Job name {name!r} is longer than {MAX_NAME} characters: use a shorter run id or spec name")
    return name


def pipeline_jobs(run: Run) -> list[client.V1Job]:
    """Every Job of the run, in the order the controller creates them."""
    check_secret_free(run.spec)
    return [construct_step_job(run, step) for step in run.steps]


def construct_step_job(run: Run, step: Step) -> client.V1Job:
    spec, kube = run.spec, run.spec.kubernetes
    pod: PodSpec = getattr(kube, step)
    labels = _labels(run, step)
    job_labels = {**labels, KUEUE_LABEL: kube.kueue_queue} if kube.kueue_queue else labels
    container = _container(run, step, pod)
    volumes = _volumes(run, step, pod)
    init_containers = [_demo_db_container(run)] if step == "extract" and _demo_source(spec) else None
    pod_spec = client.V1PodSpec(
        restart_policy="Never",
        containers=[container],
        init_containers=init_containers,
        volumes=volumes,
        security_context=_pod_security(kube),
        # Steps never call the Kubernetes API: no token in the pod.
        automount_service_account_token=False,
        enable_service_links=False,
        service_account_name=kube.service_account_name,
        image_pull_secrets=_pull_secrets(kube),
        node_selector=dict(pod.node_selector) or None,
        tolerations=_tolerations(pod, step),
        affinity=_typed(pod.affinity, "V1Affinity", f"kubernetes.{step}.affinity") if pod.affinity else None,
        runtime_class_name=pod.runtime_class_name,
        priority_class_name=pod.priority_class_name,
    )
    return client.V1Job(
        api_version="batch/v1",
        kind="Job",
        metadata=client.V1ObjectMeta(name=run.job_name(step), namespace=kube.namespace, labels=job_labels),
        spec=client.V1JobSpec(
            backoff_limit=pod.backoff_limit,
            active_deadline_seconds=pod.active_deadline_seconds,
            ttl_seconds_after_finished=kube.ttl_seconds_after_finished,
            pod_failure_policy=_failure_policy(step),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=labels, annotations={SPEC_ANNOTATION: spec_document(spec)}),
                spec=pod_spec,
            ),
        ),
    )


def _volumes(run: Run, step: Step, pod: PodSpec) -> list[client.V1Volume]:
    kube = run.spec.kubernetes
    volumes = [
        client.V1Volume(
            name="data", persistent_volume_claim=client.V1PersistentVolumeClaimVolumeSource(claim_name=kube.claim_name)
        ),
        client.V1Volume(name="tmp", empty_dir=client.V1EmptyDirVolumeSource()),
        client.V1Volume(
            name="spec",
            downward_api=client.V1DownwardAPIVolumeSource(
                items=[
                    client.V1DownwardAPIVolumeFile(
                        path=SPEC_FILE,
                        field_ref=client.V1ObjectFieldSelector(field_path=f"metadata.annotations['{SPEC_ANNOTATION}']"),
                    )
                ]
            ),
        ),
    ]
    if step == "train":
        assert isinstance(pod, TrainPodSpec)
        shm = client.V1EmptyDirVolumeSource(medium="Memory", size_limit=pod.shm_size)
        volumes.append(client.V1Volume(name="shm", empty_dir=shm))
    return volumes


def _tolerations(pod: PodSpec, step: Step) -> list[client.V1Toleration] | None:
    where = f"kubernetes.{step}.tolerations"
    return [_typed(item, "V1Toleration", f"{where}[{i}]") for i, item in enumerate(pod.tolerations)] or None


def construct_controller_job(run: Run) -> client.V1Job:
    """``submit --no-wait``: the controller itself runs in the cluster, so the laptop can go.

    It is the same ``submit`` the Helm chart's CronJob runs; retried pods resume the run (the
    step Jobs are found by name), so a drained node costs nothing.
    """
    check_secret_free(run.spec)
    kube = run.spec.kubernetes
    labels = {**_labels(run, "extract"), "app.kubernetes.io/component": "controller", STEP_LABEL: CONTROLLER}
    deadline = sum(getattr(kube, step).active_deadline_seconds or 0 for step in run.steps) + 3600
    container = client.V1Container(
        name=CONTROLLER,
        image=kube.images.extract,
        image_pull_policy=kube.images.pull_policy,
        command=[*Programs.image().cli, "submit", "--in-cluster", "-f", f"{SPEC_DIR}/{SPEC_FILE}", "--run", run.run_id],
        resources=client.V1ResourceRequirements(requests={"cpu": "50m", "memory": "128Mi"}, limits={"memory": "512Mi"}),
        volume_mounts=[
            client.V1VolumeMount(name="tmp", mount_path="/tmp"),
            client.V1VolumeMount(name="spec", mount_path=SPEC_DIR, read_only=True),
        ],
        security_context=_container_security(kube),
        termination_message_policy="FallbackToLogsOnError",
    )
    return client.V1Job(
        api_version="batch/v1",
        kind="Job",
        metadata=client.V1ObjectMeta(name=job_name(run.run_id, CONTROLLER), namespace=kube.namespace, labels=labels),
        spec=client.V1JobSpec(
            backoff_limit=2,
            active_deadline_seconds=deadline,
            ttl_seconds_after_finished=kube.ttl_seconds_after_finished,
            pod_failure_policy=_failure_policy(CONTROLLER),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(
                    labels=labels, annotations={SPEC_ANNOTATION: spec_document(run.spec, with_kubernetes=True)}
                ),
                spec=client.V1PodSpec(
                    restart_policy="Never",
                    containers=[container],
                    volumes=[v for v in _volumes(run, "extract", kube.extract) if v.name != "data"],
                    security_context=_pod_security(kube),
                    service_account_name=kube.controller_service_account,
                    enable_service_links=False,
                    image_pull_secrets=_pull_secrets(kube),
                ),
            ),
        ),
    )


def spec_document(spec: PipelineSpec, with_kubernetes: bool = False) -> str:
    """The spec as the pods read it: every set value spelled out, so a pod never relies on its image's defaults.

    The ``kubernetes`` block stays out of the steps' copy (how the pods were made, not what they
    do); the controller's copy keeps it, since it makes the pods.
    """
    check_secret_free(spec)  # every copy of the spec in a manifest is made here
    exclude = None if with_kubernetes else {"kubernetes"}
    values = spec.model_dump(mode="json", by_alias=True, exclude_none=True, exclude=exclude)
    return yaml.safe_dump(values, sort_keys=False)


def check_secret_free(spec: PipelineSpec) -> None:
    """The spec travels in the Jobs' annotations: a credential in it would be in every manifest."""
    refuse_credentials(
        spec.source.url,
        "source.url",
        "the Jobs' manifests",
        "put the URL in a Secret and name it in kubernetes.secrets.db_url",
    )


def _container(run: Run, step: Step, pod: PodSpec) -> client.V1Container:
    kube = run.spec.kubernetes
    mounts = [
        client.V1VolumeMount(name="data", mount_path=kube.data_mount_path),
        client.V1VolumeMount(name="tmp", mount_path="/tmp"),
        client.V1VolumeMount(name="spec", mount_path=SPEC_DIR, read_only=True),
    ]
    resources = _resources(pod)
    if step == "train":
        assert isinstance(pod, TrainPodSpec)
        mounts.append(client.V1VolumeMount(name="shm", mount_path="/dev/shm"))
        if run.spec.train.gpus > 0:
            gpus = str(run.spec.train.gpus)
            resources.requests = {**(resources.requests or {}), pod.gpu_resource: gpus}
            resources.limits = {**(resources.limits or {}), pod.gpu_resource: gpus}
    image = run.spec.collect.image if step == "collect" and run.spec.collect else _image(kube, step)
    return client.V1Container(
        name=step,
        image=image,
        image_pull_policy=kube.images.pull_policy,
        command=_command(run, step),
        working_dir=kube.data_mount_path,
        env=_env(run, step, pod) or None,
        resources=resources,
        volume_mounts=mounts,
        security_context=_container_security(kube),
        termination_message_path=TERMINATION_LOG,
        termination_message_policy="FallbackToLogsOnError",
    )


def _image(kube: KubernetesSpec, step: Step) -> str:
    return kube.images.train if step in ("train", "export") else kube.images.extract


def _command(run: Run, step: Step) -> list[str]:
    spec, kube = run.spec, run.spec.kubernetes
    programs, spec_path, root = Programs.image(), f"{SPEC_DIR}/{SPEC_FILE}", kube.data_mount_path
    if step == "collect":
        assert spec.collect is not None
        return list(spec.collect.command)
    if step == "extract":
        return extract_command(programs, spec_path, root, run.dataset_id, summary_file=TERMINATION_LOG)
    if step == "train":
        return train_command(programs, spec_path, root, run.dataset_id, run.run_dir, max(1, spec.train.gpus))
    return export_command(programs, run.run_dir)


def _demo_source(spec: PipelineSpec) -> bool:
    return spec.source.demo is not None and bool(spec.source.url) and "://" not in (spec.source.url or "")


def _demo_db_container(run: Run) -> client.V1Container:
    """Creates the demo database on the volume once, so a demo pipeline runs on a bare cluster."""
    spec, kube = run.spec, run.spec.kubernetes
    assert spec.source.demo is not None and spec.source.url
    command = [
        *demo_db_command(Programs.image(), spec.source.url, spec.source.demo.rows, spec.source.demo.seed),
        "--if-missing",
    ]
    return client.V1Container(
        name="demo-db",
        image=kube.images.extract,
        image_pull_policy=kube.images.pull_policy,
        command=command,
        working_dir=kube.data_mount_path,
        resources=_resources(kube.extract),
        volume_mounts=[
            client.V1VolumeMount(name="data", mount_path=kube.data_mount_path),
            client.V1VolumeMount(name="tmp", mount_path="/tmp"),
        ],
        security_context=_container_security(kube),
    )


def _env(run: Run, step: Step, pod: PodSpec) -> list[client.V1EnvVar]:
    kube = run.spec.kubernetes
    env = [client.V1EnvVar(name=name, value=value) for name, value in pod.env.items()]
    secrets: dict[str, SecretRef | None] = {}
    if step == "collect":
        assert run.spec.collect is not None
        env += [client.V1EnvVar(name=name, value=value) for name, value in run.spec.collect.env.items()]
        secrets.update(run.spec.collect.secret_env)
    if step == "extract":
        secrets["SAIGE_DB_URL"] = kube.secrets.db_url
    if step in ("train", "export"):
        secrets["HF_TOKEN"] = kube.secrets.hf_token
        # Models download once onto the shared volume, not into each pod's read-only filesystem.
        env.append(client.V1EnvVar(name="HF_HOME", value=f"{kube.data_mount_path.rstrip('/')}/.cache/huggingface"))
    if step in ("extract", "train") and kube.pushgateway_url:
        env.append(client.V1EnvVar(name="SAIGE_PUSHGATEWAY_URL", value=kube.pushgateway_url))
    env += [
        client.V1EnvVar(
            name=name,
            value_from=client.V1EnvVarSource(
                secret_key_ref=client.V1SecretKeySelector(name=ref.name, key=ref.key, optional=ref.optional or None)
            ),
        )
        for name, ref in secrets.items()
        if ref is not None
    ]
    return env


def _resources(pod: PodSpec) -> client.V1ResourceRequirements:
    return client.V1ResourceRequirements(
        requests=dict(pod.resources.requests) or None, limits=dict(pod.resources.limits) or None
    )


def _failure_policy(container: str) -> client.V1PodFailurePolicy:
    disrupted = client.V1PodFailurePolicyOnPodConditionsPattern(type="DisruptionTarget", status="True")
    return client.V1PodFailurePolicy(
        rules=[
            client.V1PodFailurePolicyRule(
                action="FailJob",
                on_exit_codes=client.V1PodFailurePolicyOnExitCodesRequirement(
                    container_name=container, operator="In", values=[CONFIG_ERROR_EXIT]
                ),
            ),
            # Preemption, eviction, node drain: not the step's fault, not a retry spent.
            client.V1PodFailurePolicyRule(
                action="Ignore",
                on_pod_conditions=[disrupted],
            ),
        ]
    )


def _pod_security(kube: KubernetesSpec) -> client.V1PodSecurityContext:
    return client.V1PodSecurityContext(
        run_as_non_root=True,
        run_as_user=kube.run_as_user,
        run_as_group=kube.run_as_user,
        fs_group=kube.run_as_user,
        fs_group_change_policy="OnRootMismatch",
        seccomp_profile=client.V1SeccompProfile(type="RuntimeDefault"),
    )


def _pull_secrets(kube: KubernetesSpec) -> list[client.V1LocalObjectReference] | None:
    return [client.V1LocalObjectReference(name=name) for name in kube.images.pull_secrets] or None


def _container_security(kube: KubernetesSpec) -> client.V1SecurityContext:
    return client.V1SecurityContext(
        allow_privilege_escalation=False,
        capabilities=client.V1Capabilities(drop=["ALL"]),
        read_only_root_filesystem=True,
        run_as_non_root=True,
        run_as_user=kube.run_as_user,
        run_as_group=kube.run_as_user,
        seccomp_profile=client.V1SeccompProfile(type="RuntimeDefault"),
    )


def _labels(run: Run, step: Step) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "saige-k8s",
        "app.kubernetes.io/instance": run.spec.name,
        "app.kubernetes.io/component": step,
        "app.kubernetes.io/part-of": "saige",
        "app.kubernetes.io/managed-by": "saige-k8s",
        "app.kubernetes.io/version": __version__,
        PIPELINE_LABEL: run.spec.name,
        RUN_LABEL: run.run_id,
        STEP_LABEL: step,
    }


def _typed(value: Mapping[str, Any], klass: str, where: str) -> Any:
    """A passthrough block as its typed model; a key the model does not know is an error, not dropped."""
    api = client.ApiClient()
    # The public deserialize() changed signature across client releases; this one has not.
    typed = api._ApiClient__deserialize(dict(value), klass)  # type: ignore[attr-defined]
    unknown = _first_unknown(value, api.sanitize_for_serialization(typed))
    if unknown is not None:
        raise ConfigError(f"{where}: unknown field {unknown!r} (Kubernetes keys are camelCase, as in a pod spec)")
    return typed


def _first_unknown(given: Any, kept: Any, path: str = "") -> str | None:
    if isinstance(given, Mapping):
        kept = kept if isinstance(kept, Mapping) else {}
        for key, value in given.items():
            where = f"{path}.{key}" if path else str(key)
            if key not in kept:
                return where
            found = _first_unknown(value, kept[key], where)
            if found:
                return found
    elif isinstance(given, list) and isinstance(kept, list):
        for i, (item, kept_item) in enumerate(zip(given, kept, strict=False)):
            found = _first_unknown(item, kept_item, f"{path}[{i}]")
            if found:
                return found
    return None


def to_dict(obj: Any) -> Any:
    """A typed model as the JSON the API server receives (camelCase keys, no nulls)."""
    return client.ApiClient().sanitize_for_serialization(obj)
