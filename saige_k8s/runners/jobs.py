"""Pure builders: a PipelineSpec and a run id in, typed ``kubernetes.client`` Jobs out.

Nothing here talks to a cluster, so ``saige-k8s render`` and the tests see exactly the
objects ``submit`` creates. Each step's container runs the command the local runner runs
(``runners.commands``), reads the spec from a file projected from the pod's own annotation
(no ConfigMap to create, clean up or grant RBAC for), and uses the shared volume as its data
root and working directory.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import yaml
from kubernetes import client

from saige_k8s import __version__
from saige_k8s.errors import CandidateRejected, ConfigError
from saige_k8s.experiences.credentials import refuse_credentials
from saige_k8s.runners.backend import Run
from saige_k8s.spec import (
    KubernetesSpec,
    PipelineSpec,
    PodSpec,
    Programs,
    Step,
    StepContext,
    TrainPodSpec,
)
from saige_k8s.spec import (
    step as spec_step,
)

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
#: Set by the Job controller on an Indexed Job's pods (and read from the downward API here).
INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
INDEX_ENV = "JOB_COMPLETION_INDEX"
#: Node 0's torchrun hosts the group's rendezvous store on this port.
RENDEZVOUS_PORT = 29500
TERMINATION_LOG = "/dev/termination-log"
#: Exit code of configuration and input errors: retrying cannot help, so the Job fails at once.
CONFIG_ERROR_EXIT = 2
#: Exit code of a candidate the gate rejected: an outcome, never retried.
REJECTED_EXIT = CandidateRejected.exit_code


def job_name(run_id: str, step: str) -> str:
    name = f"{run_id}-{step}"
    if len(name) > MAX_NAME:
        raise ConfigError(f"Job name {name!r} is longer than {MAX_NAME} characters: use a shorter run id or spec name")
    return name


def pipeline_jobs(run: Run) -> list[client.V1Job]:
    """Every Job of the run, in the order the controller creates them."""
    check_secret_free(run.spec)
    return [construct_step_job(run, step.name) for step in run.steps]


def pipeline_objects(run: Run) -> list[client.V1Job | client.V1Service]:
    """The run's Jobs, each multi-node one followed by its headless Service (what ``render`` prints)."""
    objects: list[client.V1Job | client.V1Service] = []
    for job, step in zip(pipeline_jobs(run), run.steps, strict=True):
        objects.append(job)
        if step_nodes(run, step) > 1:
            objects.append(construct_step_service(run, step.name))
    return objects


def step_nodes(run: Run, step: Step) -> int:
    """Pods of one run of the step: more than one form a torchrun group (an Indexed Job)."""
    return step.nodes(run.spec) if step.nodes else 1


def step_context(run: Run, step: Step) -> StepContext:
    """How a step's command line reads in its pod: the image's programs, the mounted spec and volume.

    A multi-node step's pod takes its node rank from its completion index, and finds node 0
    at its stable name under the headless Service (``JOB-0.JOB``).
    """
    kube = run.spec.kubernetes
    name = job_name(run.run_id, step.name)
    return StepContext(
        spec=run.spec,
        programs=Programs.image(),
        spec_path=f"{SPEC_DIR}/{SPEC_FILE}",
        data_root=kube.data_mount_path,
        run_id=run.run_id,
        processes=max(1, step.gpus(run.spec)) if step.gpus else 1,
        summary_file=TERMINATION_LOG if step.reports else None,
        node_rank=f"$({INDEX_ENV})",
        master_addr=f"{name}-0.{name}",
        master_port=RENDEZVOUS_PORT,
    )


def run_dir(run: Run) -> str:
    """The run directory on the shared volume, as the pods see it."""
    return step_context(run, run.steps[0]).run_dir


def construct_step_job(run: Run, name: str) -> client.V1Job:
    """The Job of the step of that name (an unknown name is an error, never another step's Job)."""
    spec, kube, step = run.spec, run.spec.kubernetes, spec_step(name)
    pod = kube.pod(step.name)
    nodes = step_nodes(run, step)
    if nodes > 1:
        _check_group_names(run, step, nodes)
    labels = _labels(run, step.name)
    job_labels = {**labels, KUEUE_LABEL: kube.kueue_queue} if kube.kueue_queue else labels
    context = step_context(run, step)
    container = _container(run, step, pod, context)
    volumes = _volumes(run, step, pod)
    prepare = step.prepare(context)
    init_containers = [_prepare_container(run, step, prepare)] if prepare else None
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
        tolerations=_tolerations(pod, step.name),
        affinity=_typed(pod.affinity, "V1Affinity", f"kubernetes.{step.name}.affinity") if pod.affinity else None,
        runtime_class_name=pod.runtime_class_name,
        priority_class_name=pod.priority_class_name,
    )
    job_spec = client.V1JobSpec(
        backoff_limit=pod.backoff_limit,
        active_deadline_seconds=pod.active_deadline_seconds,
        ttl_seconds_after_finished=kube.ttl_seconds_after_finished,
        pod_failure_policy=_failure_policy(step.name, rejects=step.rejects),
        template=client.V1PodTemplateSpec(
            metadata=client.V1ObjectMeta(labels=labels, annotations={SPEC_ANNOTATION: spec_document(spec)}),
            spec=pod_spec,
        ),
    )
    if nodes > 1:
        _make_group(job_spec, step, nodes, service=job_name(run.run_id, step.name))
    return client.V1Job(
        api_version="batch/v1",
        kind="Job",
        metadata=client.V1ObjectMeta(name=job_name(run.run_id, step.name), namespace=kube.namespace, labels=job_labels),
        spec=job_spec,
    )


def _make_group(job_spec: client.V1JobSpec, step: Step, nodes: int, service: str) -> None:
    """One torchrun group: N indexed pods started together, which succeed or fail together.

    A group cannot survive a lost member: the others' collectives fail (gloo at once, NCCL at
    its timeout) and a replacement could not join the running group. So the first failed pod
    fails the whole Job (``backoffLimit: 0``), which stops the other pods at once instead of
    leaving them to hang; an evicted or preempted pod ends it too, rather than being replaced
    into a group that no longer exists. A rerun starts a fresh group that resumes from the
    newest checkpoint on the shared volume.
    """
    job_spec.completion_mode = "Indexed"
    job_spec.completions = job_spec.parallelism = nodes
    job_spec.backoff_limit = 0
    rules = job_spec.pod_failure_policy.rules
    job_spec.pod_failure_policy.rules = [rule for rule in rules if rule.action != "Ignore"]
    pod_spec = job_spec.template.spec
    pod_spec.subdomain = service
    index = client.V1EnvVar(
        name=INDEX_ENV,
        value_from=client.V1EnvVarSource(
            field_ref=client.V1ObjectFieldSelector(field_path=f"metadata.annotations['{INDEX_LABEL}']")
        ),
    )
    container = next(c for c in pod_spec.containers if c.name == step.name)
    # Declared first: the command line spells the node rank $(JOB_COMPLETION_INDEX).
    container.env = [index, *(container.env or [])]
    container.ports = [client.V1ContainerPort(name="rendezvous", container_port=RENDEZVOUS_PORT)]


def construct_step_service(run: Run, name: str, owner: client.V1Job | None = None) -> client.V1Service:
    """The headless Service that gives a multi-node step's pods their stable names (``JOB-K.JOB``).

    It publishes pods before they are ready, so node 0's name resolves while the group is
    still gathering. With ``owner`` (the created Job), it is deleted with that Job: by
    ``cancel``, or by the TTL controller once the Job has finished.
    """
    kube, step = run.spec.kubernetes, spec_step(name)
    service = job_name(run.run_id, step.name)
    owners = None
    if owner is not None:
        owners = [
            client.V1OwnerReference(
                api_version="batch/v1",
                kind="Job",
                name=owner.metadata.name,
                uid=owner.metadata.uid,
                controller=True,
                block_owner_deletion=True,
            )
        ]
    return client.V1Service(
        api_version="v1",
        kind="Service",
        metadata=client.V1ObjectMeta(
            name=service, namespace=kube.namespace, labels=_labels(run, step.name), owner_references=owners
        ),
        spec=client.V1ServiceSpec(
            cluster_ip="None",
            publish_not_ready_addresses=True,
            selector={RUN_LABEL: run.run_id, STEP_LABEL: step.name},
            ports=[client.V1ServicePort(name="rendezvous", port=RENDEZVOUS_PORT, target_port="rendezvous")],
        ),
    )


def _check_group_names(run: Run, step: Step, nodes: int) -> None:
    """Each pod is named JOB-INDEX in DNS, and the Service JOB must start with a letter."""
    name = job_name(run.run_id, step.name)
    if not name[0].isalpha():
        raise ConfigError(f"a multi-node run id must start with a letter ({name!r} also names a Service)")
    host = f"{name}-{nodes - 1}"
    if len(host) > MAX_NAME:
        raise ConfigError(
            f"pod host name {host!r} is longer than {MAX_NAME} characters: use a shorter run id or spec name"
        )


def _volumes(run: Run, step: Step | None, pod: PodSpec) -> list[client.V1Volume]:
    kube = run.spec.kubernetes
    volumes = [
        client.V1Volume(
            name="data", persistent_volume_claim=client.V1PersistentVolumeClaimVolumeSource(claim_name=kube.claim_name)
        ),
        client.V1Volume(name="tmp", empty_dir=client.V1EmptyDirVolumeSource()),
        _spec_volume(),
    ]
    if step is not None and step.gpus is not None:
        assert isinstance(pod, TrainPodSpec)
        shm = client.V1EmptyDirVolumeSource(medium="Memory", size_limit=pod.shm_size)
        volumes.append(client.V1Volume(name="shm", empty_dir=shm))
    return volumes


def _spec_volume() -> client.V1Volume:
    """The spec as a file, projected from the pod's own annotation (no ConfigMap to manage)."""
    return client.V1Volume(
        name="spec",
        downward_api=client.V1DownwardAPIVolumeSource(
            items=[
                client.V1DownwardAPIVolumeFile(
                    path=SPEC_FILE,
                    field_ref=client.V1ObjectFieldSelector(field_path=f"metadata.annotations['{SPEC_ANNOTATION}']"),
                )
            ]
        ),
    )


def _tolerations(pod: PodSpec, step: str) -> list[client.V1Toleration] | None:
    where = f"kubernetes.{step}.tolerations"
    return [_typed(item, "V1Toleration", f"{where}[{i}]") for i, item in enumerate(pod.tolerations)] or None


#: The controller pod is light: it creates the step Jobs and waits for them.
CONTROLLER_RESOURCES = {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "512Mi"}}
#: A whole run's deadline, unless its steps' own deadlines add up to more.
CONTROLLER_DEADLINE_SECONDS = 72 * 3600
CONTROLLER_CONTAINER = "controller"


def construct_controller_job(run: Run) -> client.V1Job:
    """``submit --no-wait``: the controller itself runs in the cluster, so the laptop can go.

    It is the pod the Helm chart's CronJob runs (a test renders both and compares them); a
    pod lost to a drained node is replaced and resumes the run (the step Jobs are found by
    name), while a controller that failed is not retried: it would start over.
    """
    check_secret_free(run.spec)
    kube = run.spec.kubernetes
    labels = {**_labels(run, CONTROLLER), "app.kubernetes.io/component": "controller"}
    steps_deadline = sum(kube.pod(step.name).active_deadline_seconds or 0 for step in run.steps) + 3600
    env = [client.V1EnvVar(name="HOME", value="/tmp")]
    if kube.pushgateway_url:
        env.append(client.V1EnvVar(name="SAIGE_PUSHGATEWAY_URL", value=kube.pushgateway_url))
    container = client.V1Container(
        name=CONTROLLER_CONTAINER,
        image=kube.images.extract,
        image_pull_policy=kube.images.pull_policy,
        command=[*Programs.image().cli, "submit", "--in-cluster", "-f", f"{SPEC_DIR}/{SPEC_FILE}", "--run", run.run_id],
        env=env,
        resources=client.V1ResourceRequirements(**CONTROLLER_RESOURCES),
        volume_mounts=[
            client.V1VolumeMount(name="spec", mount_path=SPEC_DIR, read_only=True),
            client.V1VolumeMount(name="tmp", mount_path="/tmp"),
        ],
        security_context=_container_security(kube),
        termination_message_policy="FallbackToLogsOnError",
    )
    return client.V1Job(
        api_version="batch/v1",
        kind="Job",
        metadata=client.V1ObjectMeta(name=job_name(run.run_id, CONTROLLER), namespace=kube.namespace, labels=labels),
        spec=client.V1JobSpec(
            backoff_limit=0,
            active_deadline_seconds=max(CONTROLLER_DEADLINE_SECONDS, steps_deadline),
            ttl_seconds_after_finished=kube.ttl_seconds_after_finished,
            pod_failure_policy=_failure_policy(CONTROLLER_CONTAINER, rejects=True),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(
                    labels=labels, annotations={SPEC_ANNOTATION: spec_document(run.spec, with_kubernetes=True)}
                ),
                spec=client.V1PodSpec(
                    restart_policy="Never",
                    containers=[container],
                    volumes=[
                        _spec_volume(),
                        client.V1Volume(name="tmp", empty_dir=client.V1EmptyDirVolumeSource(size_limit="256Mi")),
                    ],
                    security_context=_pod_security(kube),
                    service_account_name=kube.controller_service_account,
                    # It calls the API server; the chart's ServiceAccount mounts no token by default.
                    automount_service_account_token=True,
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


def _container(run: Run, step: Step, pod: PodSpec, context: StepContext) -> client.V1Container:
    kube = run.spec.kubernetes
    mounts = [
        client.V1VolumeMount(name="data", mount_path=kube.data_mount_path),
        client.V1VolumeMount(name="tmp", mount_path="/tmp"),
        client.V1VolumeMount(name="spec", mount_path=SPEC_DIR, read_only=True),
    ]
    resources = _resources(pod)
    if step.gpus is not None:
        assert isinstance(pod, TrainPodSpec)
        mounts.append(client.V1VolumeMount(name="shm", mount_path="/dev/shm"))
        if step.gpus(run.spec) > 0:
            gpus = str(step.gpus(run.spec))
            resources.requests = {**(resources.requests or {}), pod.gpu_resource: gpus}
            resources.limits = {**(resources.limits or {}), pod.gpu_resource: gpus}
    return client.V1Container(
        name=step.name,
        image=step.image(run.spec),
        image_pull_policy=kube.images.pull_policy,
        command=step.command(context),
        working_dir=kube.data_mount_path,
        env=_env(run, step, pod) or None,
        resources=resources,
        volume_mounts=mounts,
        security_context=_container_security(kube),
        termination_message_path=TERMINATION_LOG,
        termination_message_policy="FallbackToLogsOnError",
    )


def _prepare_container(run: Run, step: Step, command: list[str]) -> client.V1Container:
    """What a step needs first (the demo database, created once on the volume), as an init container."""
    kube = run.spec.kubernetes
    return client.V1Container(
        name=f"{step.name}-prepare",
        image=step.image(run.spec),
        image_pull_policy=kube.images.pull_policy,
        command=command,
        working_dir=kube.data_mount_path,
        resources=_resources(kube.pod(step.name)),
        volume_mounts=[
            client.V1VolumeMount(name="data", mount_path=kube.data_mount_path),
            client.V1VolumeMount(name="tmp", mount_path="/tmp"),
        ],
        security_context=_container_security(kube),
    )


def _env(run: Run, step: Step, pod: PodSpec) -> list[client.V1EnvVar]:
    kube = run.spec.kubernetes
    plain = {**pod.env, **step.env(run.spec)}
    env = [client.V1EnvVar(name=name, value=value) for name, value in plain.items()]
    if step.uses_models:
        # Models download once onto the shared volume, not into each pod's read-only filesystem.
        env.append(client.V1EnvVar(name="HF_HOME", value=f"{kube.data_mount_path.rstrip('/')}/.cache/huggingface"))
    if step.pushes_metrics and kube.pushgateway_url:
        env.append(client.V1EnvVar(name="SAIGE_PUSHGATEWAY_URL", value=kube.pushgateway_url))
    env += [
        client.V1EnvVar(
            name=name,
            value_from=client.V1EnvVarSource(
                secret_key_ref=client.V1SecretKeySelector(name=ref.name, key=ref.key, optional=ref.optional or None)
            ),
        )
        for name, ref in step.secret_env(run.spec).items()
        if ref is not None
    ]
    return env


def _resources(pod: PodSpec) -> client.V1ResourceRequirements:
    return client.V1ResourceRequirements(
        requests=dict(pod.resources.requests) or None, limits=dict(pod.resources.limits) or None
    )


def _failure_policy(container: str, rejects: bool = False) -> client.V1PodFailurePolicy:
    """Not retried: a configuration error, or a rejected candidate (where the container can reject one)."""
    disrupted = client.V1PodFailurePolicyOnPodConditionsPattern(type="DisruptionTarget", status="True")
    return client.V1PodFailurePolicy(
        rules=[
            client.V1PodFailurePolicyRule(
                action="FailJob",
                on_exit_codes=client.V1PodFailurePolicyOnExitCodesRequirement(
                    container_name=container,
                    operator="In",
                    values=[CONFIG_ERROR_EXIT, REJECTED_EXIT] if rejects else [CONFIG_ERROR_EXIT],
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
        privileged=False,
        capabilities=client.V1Capabilities(drop=["ALL"]),
        read_only_root_filesystem=True,
        run_as_non_root=True,
        run_as_user=kube.run_as_user,
        run_as_group=kube.run_as_user,
        seccomp_profile=client.V1SeccompProfile(type="RuntimeDefault"),
    )


def _labels(run: Run, step: str) -> dict[str, str]:
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
    typed = api.deserialize(json.dumps(dict(value)), klass, "application/json")
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
