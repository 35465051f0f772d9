"""PipelineSpec: one YAML document that says what a pipeline run does, validated on load.

The same document is a ``jobs/*.yaml`` file, the Helm values' ``pipeline:`` block, and what
the CLI builds from flags; flags given on the command line override the spec's values.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from saige_k8s.dataset.formats import DEFAULT_SYSTEM_PROMPT, FormatName
from saige_k8s.errors import CandidateRejected, ConfigError, InputError
from saige_k8s.evaluation.gate import GateSpec
from saige_k8s.experiences import is_sqlite_path
from saige_k8s.experiences.filters import PRESETS, Filters, PresetName, refuse_bool
from saige_k8s.yamlfile import message, read_yaml, validate_document


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """``epochs: true`` is a mistake, not 1: pydantic would coerce it, so numbers refuse booleans."""
        annotation = cls.model_fields[info.field_name].annotation if info.field_name else None
        if isinstance(value, dict) and _numeric(_dict_values(annotation)):
            for item in value.values():
                refuse_bool(item)
        elif _numeric(annotation):
            refuse_bool(value)
        return value


def _leaves(annotation: Any) -> set[Any]:
    """The plain types in an annotation (through Optional, unions and Annotated)."""
    args = get_args(annotation)
    if get_origin(annotation) in (Annotated, Union, UnionType):
        return set().union(*(_leaves(a) for a in (args[:1] if get_origin(annotation) is Annotated else args)))
    return {annotation}


def _numeric(annotation: Any) -> bool:
    leaves = _leaves(annotation)
    return bool(leaves & {int, float}) and bool not in leaves


def _dict_values(annotation: Any) -> Any:
    for leaf in _leaves(annotation):
        if get_origin(leaf) is dict:
            return get_args(leaf)[1]
    return None


class SourceSpec(_Strict):
    #: SQLAlchemy URL or SQLite path. Leave unset to read $SAIGE_DB_URL (how Secrets arrive).
    url: str | None = None
    table: str = "experiences"
    db_schema: str | None = Field(default=None, alias="schema")
    #: Logical column -> the table's column, for tables that name them differently.
    columns: dict[str, str] = Field(default_factory=dict)
    demo: DemoSourceSpec | None = None


class _FilterSpecBase(_Strict):
    """A preset, and any thresholds that differ from it."""

    preset: PresetName = "default"

    @model_validator(mode="after")
    def _resolvable(self) -> _FilterSpecBase:
        """Cross-field checks (weights) at load time, so the error carries the spec path."""
        Filters.from_preset(self.preset, **self.model_dump(exclude={"preset"}, exclude_none=True))
        return self

    def resolve(self, **flags: object) -> Filters:
        """The effective filters: preset, then this spec's values, then command-line ``flags``."""
        values = self.model_dump(exclude={"preset"}, exclude_none=True)
        values.update({k: v for k, v in flags.items() if v is not None and k != "preset"})
        preset = flags.get("preset") or self.preset
        try:
            return Filters.from_preset(preset, **values)  # type: ignore[arg-type]  # a flag's choice: a PresetName
        except ValidationError as exc:
            # The spec's own values were checked on load: what fails here came from a flag.
            first = exc.errors()[0]
            flag = "--" + str(first["loc"][0]).replace("_", "-") if first["loc"] else "filters"
            raise ConfigError(f"{flag}: {message(first)}") from None


def _optional(annotation: Any, constraints: list[Any]) -> Any:
    return (Annotated[annotation, *constraints] if constraints else annotation) | None


#: Every threshold of ``Filters``, optional: what a spec leaves out comes from its preset.
if TYPE_CHECKING:  # the checker sees the base; the fields are made from Filters' own
    FilterSpec = _FilterSpecBase
else:
    FilterSpec = create_model(
        "FilterSpec",
        __base__=_FilterSpecBase,
        __doc__=_FilterSpecBase.__doc__,
        **{
            name: (_optional(field.annotation, field.metadata), Field(None, description=field.description))
            for name, field in Filters.model_fields.items()
        },
    )


class ExtractSpec(_Strict):
    filters: FilterSpec = Field(default_factory=FilterSpec)
    format: FormatName = "tinyllama"
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    eval_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.05
    strict: bool = False
    #: A dataset with fewer examples is not worth training on; the controller stops there.
    min_examples: Annotated[int, Field(ge=1)] = 100


class DemoSourceSpec(_Strict):
    """Create ``source.url`` as a demo database first when it does not exist (local runs)."""

    rows: Annotated[int, Field(ge=1)] = 2000
    seed: int = 0


class TrainSpec(_Strict):
    """Fine-tuning settings; the ``saige-k8s train`` flags of the same names override them."""

    model: str = "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
    #: sft: learn the kept answers; dpo: prefer each pair's chosen answer to its rejected one;
    #: kto: kept answers are desirable, the extraction's poor/harmful ones undesirable.
    method: Literal["sft", "dpo", "kto"] = "sft"
    #: dpo/kto: how far the adapter may move from the base model (the reference); larger stays closer.
    beta: Annotated[float, Field(gt=0)] = 0.1
    #: dpo's loss: sigmoid is the DPO paper's.
    dpo_loss: Literal["sigmoid"] = "sigmoid"
    #: kto: weights of the desirable and undesirable examples' losses (balance a lopsided dataset).
    desirable_weight: Annotated[float, Field(gt=0)] = 1.0
    undesirable_weight: Annotated[float, Field(gt=0)] = 1.0
    #: sft: scale each example's loss by its weighted score (relative to the mean); unset: unweighted.
    sample_weights: Literal["weighted_score"] | None = None
    epochs: Annotated[float, Field(gt=0)] = 3.0
    batch_size: Annotated[int, Field(ge=1)] = 4
    gradient_accumulation: Annotated[int, Field(ge=1)] = 1
    learning_rate: Annotated[float, Field(gt=0)] = 2e-4
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: Annotated[float, Field(ge=0, le=1)] = 0.03
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    #: Gradients are clipped to this norm (0: no clipping).
    max_grad_norm: Annotated[float, Field(ge=0)] = 1.0
    max_seq_len: Annotated[int, Field(ge=16)] = 1024
    max_steps: Annotated[int, Field(ge=1)] | None = None
    max_eval_examples: Annotated[int, Field(ge=0)] | None = None
    lora_rank: Annotated[int, Field(ge=1)] = 16
    lora_alpha: Annotated[int, Field(ge=1)] | None = None
    lora_dropout: Annotated[float, Field(ge=0, le=1)] = 0.05
    #: Module names, ["all-linear"], or unset for PEFT's default per architecture.
    target_modules: list[str] | None = None
    quantization: Literal["4bit", "8bit"] | None = None
    gradient_checkpointing: bool = False
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    seed: int = 42
    save_steps: Annotated[int, Field(ge=1)] = 50
    logging_steps: Annotated[int, Field(ge=1)] = 10
    trust_remote_code: bool = False
    #: GPUs per training pod; more than one launches one process per GPU.
    gpus: Annotated[int, Field(ge=0)] = 1
    #: Machines: with more than one, the train step is one torchrun group of this many pods
    #: (an Indexed Job; locally, as many launchers on loopback), train.gpus on each.
    nodes: Annotated[int, Field(ge=1, le=99)] = 1
    #: Seconds the nodes wait for each other at the start (pods of a group may start minutes apart).
    rendezvous_timeout: Annotated[int, Field(ge=10)] = 900
    #: Merge the adapter into the base model and write an Ollama Modelfile after training.
    export: bool = False

    @model_validator(mode="after")
    def _method_fits(self) -> TrainSpec:
        """Settings that cannot work together are refused before any model is loaded."""
        if self.sample_weights is not None and self.method != "sft":
            raise ValueError(f"sample_weights applies to method sft; {self.method} has its own objective")
        if self.method == "kto" and self.batch_size < 2:
            raise ValueError("method kto needs batch_size 2 or more: its reference KL is estimated within a batch")
        return self


#: A Kubernetes object name (DNS-1123 label).
DNS_LABEL = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
DnsLabel = Annotated[str, Field(pattern=f"^{DNS_LABEL}$")]
#: The API server's quantity grammar (number, then a binary or decimal SI suffix, or a decimal
#: exponent: "500m", "8Gi", "1e3", "250u", "+1", ".5"), less the minus sign: a negative request,
#: limit or size is refused by the API server anyway.
QUANTITY_PATTERN = r"^\+?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+|[numkMGTPE]|[KMGTPE]i)?$"


def _quantity(value: str) -> str:
    if not re.fullmatch(QUANTITY_PATTERN, value):
        raise ValueError("not a Kubernetes quantity (e.g. 500m, 8Gi, 1e3, 250u)")
    return value


#: A Kubernetes resource quantity ("500m", "8Gi", 2); the pattern also goes into the chart's schema.
Quantity = Annotated[str, AfterValidator(_quantity), Field(json_schema_extra={"pattern": QUANTITY_PATTERN})]


class SecretRef(_Strict):
    """One key of a Kubernetes Secret, delivered to the pod as an environment variable."""

    name: DnsLabel
    key: Annotated[str, Field(pattern=r"^[-._a-zA-Z0-9]+$")]
    optional: bool = False


class SecretsSpec(_Strict):
    #: The database URL ($SAIGE_DB_URL in the pod); leave unset when source.url needs no secret.
    db_url: SecretRef | None = None
    #: A Hugging Face token ($HF_TOKEN) for gated models.
    hf_token: SecretRef | None = None


class ResourcesSpec(_Strict):
    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)

    requests: dict[str, Quantity] = Field(default_factory=dict)
    limits: dict[str, Quantity] = Field(default_factory=dict)


class PodSpec(_Strict):
    """Scheduling and limits of one step's pod; the Kubernetes-shaped keys pass through as written."""

    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    node_selector: dict[str, str] = Field(default_factory=dict)
    #: Kubernetes tolerations, as in a pod spec (camelCase keys).
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    #: A Kubernetes affinity, as in a pod spec (camelCase keys).
    affinity: dict[str, Any] | None = None
    runtime_class_name: DnsLabel | None = None
    priority_class_name: DnsLabel | None = None
    #: Pod retries for failures other than configuration errors (exit code 2) and evictions.
    backoff_limit: Annotated[int, Field(ge=0)] = 2
    active_deadline_seconds: Annotated[int, Field(gt=0)] | None = None
    #: Extra plain environment variables (never secrets: use kubernetes.secrets).
    env: dict[str, str] = Field(default_factory=dict)


def _merged(defaults: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(defaults)
    for key, value in given.items():
        base = merged.get(key)
        merged[key] = _merged(base, value) if isinstance(base, dict) and isinstance(value, dict) else value
    return merged


class TrainPodSpec(PodSpec):
    #: Size of the in-memory /dev/shm (NCCL and data loader workers need more than the default 64 MB).
    shm_size: Quantity = "8Gi"
    #: The extended resource that requests GPUs (train.gpus of them).
    gpu_resource: str = "nvidia.com/gpu"


class ImagesSpec(_Strict):
    #: Has no torch: runs extract, the demo database and the controller itself.
    extract: str = "ghcr.io/saige-k8s/saige-k8s-extract:0.1.0"
    #: Runs train and export (CUDA, torch, bitsandbytes).
    train: str = "ghcr.io/saige-k8s/saige-k8s-train:0.1.0"
    pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    pull_secrets: list[DnsLabel] = Field(default_factory=list)


class KubernetesSpec(_Strict):
    """How the steps run as Jobs; ignored by the local runner."""

    #: Default: the kubeconfig context's namespace, or the pod's own in the cluster.
    namespace: DnsLabel | None = None
    images: ImagesSpec = Field(default_factory=ImagesSpec)
    #: The PersistentVolumeClaim shared by all steps, mounted at data_mount_path.
    claim_name: DnsLabel = "saige-data"
    #: Where the volume is mounted in every pod (the steps' data root and working directory).
    data_mount_path: Annotated[str, Field(pattern=r"^/")] = "/data"
    secrets: SecretsSpec = Field(default_factory=SecretsSpec)
    #: The steps' pods' service account (they never call the API; their token is not mounted).
    service_account_name: DnsLabel | None = None
    #: The service account `submit --no-wait` runs the controller as, in the cluster: it needs the
    #: Role the Helm chart creates (jobs, pods, pods/log). Default: the chart's, "saige".
    controller_service_account: DnsLabel = "saige"
    #: Steps push their metrics here ($SAIGE_PUSHGATEWAY_URL in the pods).
    pushgateway_url: str | None = None
    #: Kueue LocalQueue for the Jobs (the kueue.x-k8s.io/queue-name label); Kueue admits them.
    kueue_queue: DnsLabel | None = None
    ttl_seconds_after_finished: Annotated[int, Field(ge=0)] = 7 * 24 * 3600
    #: Numeric user and group of every container (the images create user 10001).
    run_as_user: Annotated[int, Field(ge=1)] = 10001
    extract: PodSpec = Field(default_factory=lambda: _default_pod("extract"))
    train: TrainPodSpec = Field(default_factory=lambda: _default_pod("train"))
    evaluate: TrainPodSpec = Field(default_factory=lambda: _default_pod("evaluate"))
    export: PodSpec = Field(default_factory=lambda: _default_pod("export"))
    collect: PodSpec = Field(default_factory=lambda: _default_pod("collect"))

    @model_validator(mode="before")
    @classmethod
    def _step_defaults(cls, data: Any) -> Any:
        """A step block that sets only tolerations keeps the step's default resources and deadline."""
        if not isinstance(data, dict):
            return data
        return {
            key: _merged(STEP_TABLE[key].pod_defaults, value)
            if key in STEP_TABLE and isinstance(value, dict)
            else value
            for key, value in data.items()
        }

    def pod(self, step: StepName) -> PodSpec:
        """The step's pod block (every step has one, named after it)."""
        pod: PodSpec = getattr(self, step)
        return pod


class CollectSpec(_Strict):
    """An optional first step that gathers new experiences (the seed's trainer.js episodes).

    On Kubernetes it runs ``image`` with ``command``; locally ``command`` runs as a subprocess.
    """

    image: str
    command: Annotated[list[str], Field(min_length=1)]
    env: dict[str, str] = Field(default_factory=dict)
    #: Environment variables from Secrets (NAME: {name, key}).
    secret_env: dict[str, SecretRef] = Field(default_factory=dict)


class EvaluateSpec(_Strict):
    """The candidate against the champion (or the base model, for a first run), and the gate."""

    #: Off: no evaluation, and every trained run is exported as before.
    enabled: bool = True
    gate: GateSpec = Field(default_factory=GateSpec)
    #: More scenario files (the shipped suite's format) appended to the shipped suite.
    suite: list[str] = Field(default_factory=list)
    #: At most this many of the dataset's held-out preference pairs (they cost two forward passes each).
    max_pairs: Annotated[int, Field(ge=0)] | None = 500
    #: The bootstrap's seed: the same items give the same intervals.
    seed: int = 0
    batch_size: Annotated[int, Field(ge=1)] = 8


class PipelineSpec(_Strict):
    #: At most 38 characters, so that NAME-YYYYMMDD-HHMMSS-evaluate (the longest step) fits Kubernetes' 63.
    name: Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9]{0,36}[a-z0-9])?$")] = "saige"
    #: The shared volume: datasets/ and runs/ live under it.
    data_root: str = "./saige-data"
    source: SourceSpec = Field(default_factory=SourceSpec)
    extract: ExtractSpec = Field(default_factory=ExtractSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    evaluate: EvaluateSpec = Field(default_factory=EvaluateSpec)
    collect: CollectSpec | None = None
    kubernetes: KubernetesSpec = Field(default_factory=KubernetesSpec)


# -- The pipeline's steps ----------------------------------------------------------------------
#
# Each step is declared once, below: its command line, image, GPU use, when it runs, what it
# hands the steps after it, and its pod defaults. Both runners (local processes, Kubernetes
# Jobs) read this table, so a step runs with the same arguments wherever it runs.

StepName = Literal["collect", "extract", "train", "evaluate", "export"]

#: Where every step finds the shared volume when no flag names it.
DATA_ROOT_ENV = "SAIGE_DATA_ROOT"


def resolve_data_root(given: Path | None, spec: PipelineSpec | None = None) -> Path:
    """A flag wins, then $SAIGE_DATA_ROOT, then the spec's data_root (./saige-data by default)."""
    return given or Path(os.environ.get(DATA_ROOT_ENV) or (spec.data_root if spec else PipelineSpec().data_root))


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


@dataclass(frozen=True)
class StepContext:
    """What a step's command line is made of where it runs (this machine, or a pod)."""

    spec: PipelineSpec
    programs: Programs
    spec_path: str
    data_root: str
    run_id: str
    #: Processes of a GPU step: one per GPU it gets.
    processes: int = 1
    #: Where a step that reports writes its one-line JSON summary.
    summary_file: str | None = None
    #: This node's rank in a multi-node step, as its launcher reads it (a pod: its completion index).
    node_rank: str = "0"
    #: Where the other nodes of a multi-node step find node 0's rendezvous.
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @property
    def dataset_id(self) -> str:
        return self.run_id

    @property
    def run_dir(self) -> str:
        return f"{self.data_root.rstrip('/')}/runs/{self.run_id}"


def _always(spec: PipelineSpec) -> bool:
    return True


def _nothing(spec: PipelineSpec) -> dict[str, Any]:
    return {}


def _no_preparation(context: StepContext) -> list[str] | None:
    return None


@dataclass(frozen=True, eq=False)
class Step:
    """One pipeline step, as both runners see it."""

    name: StepName
    command: Callable[[StepContext], list[str]]
    image: Callable[[PipelineSpec], str]
    #: Resources and deadline of its pod (a spec's own values merge over them key by key).
    pod_defaults: Mapping[str, Any]
    enabled: Callable[[PipelineSpec], bool] = _always
    #: GPUs of its pod (None: a CPU step); a GPU step also gets an in-memory /dev/shm, and one
    #: process per GPU when it has several.
    gpus: Callable[[PipelineSpec], int] | None = None
    #: Writes a one-line JSON summary (to StepContext.summary_file) that the steps after it need.
    reports: bool = False
    #: Looks at that summary before the next step starts, and raises to end the run there.
    check: Callable[[PipelineSpec, dict[str, Any]], None] | None = None
    #: May end with a rejection (exit 3, its summary says why): an outcome its Job never retries.
    rejects: bool = False
    #: The summary in one line, for the run's progress messages.
    describe: Callable[[dict[str, Any]], str] = lambda summary: "succeeded"
    #: A command that runs first, in the same place (an init container on Kubernetes).
    prepare: Callable[[StepContext], list[str] | None] = _no_preparation
    #: Plain environment variables of the step's process.
    env: Callable[[PipelineSpec], dict[str, str]] = _nothing
    #: Environment variables that come from Kubernetes Secrets (locally: already in the environment).
    secret_env: Callable[[PipelineSpec], dict[str, SecretRef | None]] = _nothing
    #: Downloads models: the Hugging Face cache goes on the shared volume, and it gets $HF_TOKEN.
    uses_models: bool = False
    #: Pushes its own metrics (gets $SAIGE_PUSHGATEWAY_URL).
    pushes_metrics: bool = False
    #: Machines of one run of the step (None: always one); more than one form one torchrun group.
    nodes: Callable[[PipelineSpec], int] | None = None


def new_run_id(name: str, now: dt.datetime | None = None) -> str:
    """NAME-YYYYMMDD-HHMMSS (UTC): also the run's dataset id and its Jobs' name prefix."""
    now = now or dt.datetime.now(dt.UTC)
    return f"{name}-{now:%Y%m%d-%H%M%S}"


def check_min_examples(summary: dict[str, Any], min_examples: int) -> None:
    """Training on too few examples wastes GPU time and teaches little: the run stops here."""
    if summary["kept"] < min_examples:
        raise InputError(
            f"dataset {summary['dataset_id']} has {summary['kept']} examples, below extract.min_examples "
            f"({min_examples}); not training (collect more experiences or relax the filters)"
        )


def demo_db_command(programs: Programs, target: str, rows: int, seed: int) -> list[str]:
    """Creates the demo database once (``--if-missing``), so a demo pipeline runs anywhere."""
    command = [*programs.cli, "demo-db", "--db", target, "--rows", str(rows), "--seed", str(seed)]
    return [*command, "--if-missing"]


def extract_command(
    programs: Programs, spec_path: str, data_root: str, dataset_id: str, summary_file: str | None = None
) -> list[str]:
    """Writes a one-line JSON summary (dataset id and counts) into ``summary_file`` and prints the
    extraction report (statistics, funnel, samples) for the log; without a file, the JSON goes
    to stdout instead.

    A rerun of the same run finds its dataset published and reports it (``--reuse-existing``).
    """
    command = [*programs.cli, "extract", "-f", spec_path, "--data-root", data_root, "--dataset-id", dataset_id]
    command += ["--reuse-existing"]
    return [*command, "--summary-file", summary_file] if summary_file else [*command, "--json"]


@dataclass(frozen=True)
class Group:
    """Where a multi-node step's launcher finds the others: node 0 hosts the rendezvous."""

    nodes: int
    #: This launcher's node rank: a number, or how its pod spells one (``$(JOB_COMPLETION_INDEX)``).
    rank: str
    master_addr: str
    master_port: int
    timeout: int


def train_command(
    programs: Programs,
    spec_path: str,
    data_root: str,
    dataset_id: str,
    run_dir: str,
    processes: int = 1,
    group: Group | None = None,
) -> list[str]:
    """One process, ``processes`` of them under torchrun (one per GPU), or one torchrun per node of a ``group``.

    A group uses torchrun's static rendezvous: the node rank is given (a pod's completion
    index), node 0 hosts the store, and no member can be replaced while the others run
    (``--max-restarts 0``): a lost member ends the group, and a rerun resumes it from the
    newest checkpoint.
    """
    args = ["train", "-f", spec_path, "--data-root", data_root, "--dataset", dataset_id, "--output-dir", run_dir]
    if group is not None and group.nodes > 1:
        launch = ["--nnodes", str(group.nodes), "--node-rank", group.rank, "--nproc-per-node", str(processes)]
        launch += ["--master-addr", group.master_addr, "--master-port", str(group.master_port)]
        launch += ["--rdzv-conf", f"timeout={group.timeout}", "--max-restarts", "0"]
        return [*programs.distributed, *launch, "-m", "saige_k8s", *args]
    if processes > 1:
        return [*programs.distributed, "--standalone", "--nproc_per_node", str(processes), "-m", "saige_k8s", *args]
    return [*programs.cli, *args]


def _train_step_command(context: StepContext) -> list[str]:
    train = context.spec.train
    group = Group(train.nodes, context.node_rank, context.master_addr, context.master_port, train.rendezvous_timeout)
    return train_command(
        context.programs,
        context.spec_path,
        context.data_root,
        context.dataset_id,
        context.run_dir,
        max(1, context.processes),
        group,
    )


def evaluate_command(
    programs: Programs, spec_path: str, data_root: str, run_dir: str, summary_file: str | None = None
) -> list[str]:
    """Writes RUN_DIR/eval.json; exits 3 when the gate rejects the candidate (an outcome, not a failure)."""
    command = [*programs.cli, "evaluate", run_dir, "-f", spec_path, "--data-root", data_root]
    return [*command, "--summary-file", summary_file] if summary_file else command


def check_verdict(summary: dict[str, Any]) -> None:
    """Export only a promoted candidate: a rejected one ends the run here, as a rejection."""
    if summary.get("verdict") != "promoted":
        reasons = "; ".join(summary.get("reasons") or []) or "no reason given"
        raise CandidateRejected(f"candidate {summary.get('candidate')} rejected: {reasons}")


def export_command(programs: Programs, run_dir: str) -> list[str]:
    return [*programs.cli, "export", run_dir]


def _prepare_demo_db(context: StepContext) -> list[str] | None:
    source = context.spec.source
    if source.demo is None or not is_sqlite_path(source.url):
        return None
    assert source.url is not None
    return demo_db_command(context.programs, source.url, source.demo.rows, source.demo.seed)


def _collect_command(context: StepContext) -> list[str]:
    assert context.spec.collect is not None
    return list(context.spec.collect.command)


def _collect_image(spec: PipelineSpec) -> str:
    assert spec.collect is not None
    return spec.collect.image


def _extract_image(spec: PipelineSpec) -> str:
    return spec.kubernetes.images.extract


def _train_image(spec: PipelineSpec) -> str:
    return spec.kubernetes.images.train


def _pod_defaults(hours: int, cpu: str, memory: str, memory_limit: str) -> dict[str, Any]:
    return {
        "resources": {"requests": {"cpu": cpu, "memory": memory}, "limits": {"memory": memory_limit}},
        "active_deadline_seconds": hours * 3600,
    }


#: The steps, in the order a run takes them.
STEPS: tuple[Step, ...] = (
    Step(
        name="collect",
        command=_collect_command,
        image=_collect_image,
        pod_defaults=_pod_defaults(6, "1", "1Gi", "2Gi"),
        enabled=lambda spec: spec.collect is not None,
        env=lambda spec: dict(spec.collect.env) if spec.collect else {},
        secret_env=lambda spec: dict(spec.collect.secret_env) if spec.collect else {},
    ),
    Step(
        name="extract",
        command=lambda c: extract_command(c.programs, c.spec_path, c.data_root, c.dataset_id, c.summary_file),
        image=_extract_image,
        pod_defaults=_pod_defaults(2, "1", "2Gi", "4Gi"),
        reports=True,
        check=lambda spec, summary: check_min_examples(summary, spec.extract.min_examples),
        describe=lambda s: f"dataset {s['dataset_id']}: {s['kept']} examples of {s['scanned']} rows",
        prepare=_prepare_demo_db,
        secret_env=lambda spec: {"SAIGE_DB_URL": spec.kubernetes.secrets.db_url},
        pushes_metrics=True,
    ),
    Step(
        name="train",
        command=_train_step_command,
        image=_train_image,
        pod_defaults=_pod_defaults(48, "4", "24Gi", "32Gi"),
        gpus=lambda spec: spec.train.gpus,
        nodes=lambda spec: spec.train.nodes,
        secret_env=lambda spec: {"HF_TOKEN": spec.kubernetes.secrets.hf_token},
        uses_models=True,
        pushes_metrics=True,
    ),
    Step(
        name="evaluate",
        command=lambda c: evaluate_command(c.programs, c.spec_path, c.data_root, c.run_dir, c.summary_file),
        image=_train_image,
        pod_defaults=_pod_defaults(6, "2", "16Gi", "32Gi"),
        enabled=lambda spec: spec.evaluate.enabled,
        rejects=True,
        gpus=lambda spec: min(1, spec.train.gpus),
        reports=True,
        check=lambda spec, summary: check_verdict(summary),
        describe=lambda s: f"candidate {s['candidate']} {s['verdict']} against {s['baseline'] or 'the base model'}",
        secret_env=lambda spec: {"HF_TOKEN": spec.kubernetes.secrets.hf_token},
        uses_models=True,
        pushes_metrics=True,
    ),
    Step(
        name="export",
        command=lambda c: export_command(c.programs, c.run_dir),
        image=_train_image,
        pod_defaults=_pod_defaults(2, "2", "16Gi", "32Gi"),
        enabled=lambda spec: spec.train.export,
        secret_env=lambda spec: {"HF_TOKEN": spec.kubernetes.secrets.hf_token},
        uses_models=True,
    ),
)
STEP_TABLE: dict[str, Step] = {step.name: step for step in STEPS}
STEP_NAMES: tuple[StepName, ...] = get_args(StepName)


def step(name: str) -> Step:
    """The step of that name; an unknown name is an error, never another step."""
    try:
        return STEP_TABLE[name]
    except KeyError:
        raise ConfigError(f"unknown step {name!r} (the steps: {', '.join(STEP_TABLE)})") from None


def enabled_steps(spec: PipelineSpec) -> tuple[Step, ...]:
    return tuple(s for s in STEPS if s.enabled(spec))


def _default_pod(name: StepName) -> Any:
    model = TrainPodSpec if STEP_TABLE[name].gpus is not None else PodSpec
    return model(**STEP_TABLE[name].pod_defaults)


def override_train(train: TrainSpec, flags: dict[str, Any]) -> TrainSpec:
    """``train`` with the command-line values that were given (None: not given)."""
    values = {**train.model_dump(), **{k: v for k, v in flags.items() if v is not None}}
    try:
        return TrainSpec.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        flag = "--" + str(first["loc"][0]).replace("_", "-") if first["loc"] else "train"
        raise ConfigError(f"{flag}: {message(first)}") from None


def load_spec(path: Path | str) -> PipelineSpec:
    path = Path(path)
    data = read_yaml(path, "spec")
    return parse_spec(data if data is not None else {}, str(path))


def parse_spec(data: Any, origin: str = "spec") -> PipelineSpec:
    return validate_document(PipelineSpec, data, origin)


__all__ = [
    "PRESETS",
    "CollectSpec",
    "DemoSourceSpec",
    "ExtractSpec",
    "FilterSpec",
    "KubernetesSpec",
    "PipelineSpec",
    "SourceSpec",
    "TrainSpec",
    "load_spec",
    "parse_spec",
]
