"""PipelineSpec: one YAML document that says what a pipeline run does, validated on load.

The same document is a ``jobs/*.yaml`` file, the Helm values' ``pipeline:`` block, and what
the CLI builds from flags; flags given on the command line override the spec's values.
"""

from __future__ import annotations

from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from saige_k8s.dataset.formats import DEFAULT_SYSTEM_PROMPT, FormatName
from saige_k8s.errors import ConfigError
from saige_k8s.experiences.filters import PRESETS, Alignment, Filters, Harm, PresetName, Score, refuse_bool


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


class FilterSpec(_Strict):
    """A preset, and any thresholds that differ from it."""

    preset: PresetName = "default"
    max_harm: Harm | None = None
    min_buddhist: Score | None = None
    min_alignment: Alignment | None = None
    limit: Annotated[int, Field(gt=0)] | None = None
    max_deception: Harm | None = None
    max_harshness: Harm | None = None
    max_omission: Harm | None = None
    max_manipulation: Harm | None = None
    min_ahimsa: Score | None = None
    min_sacca: Score | None = None
    min_karuna: Score | None = None
    min_panna: Score | None = None
    min_upekkha: Score | None = None
    principle_weights: dict[str, Annotated[float, Field(ge=0.0)]] | None = None

    @model_validator(mode="after")
    def _resolvable(self) -> FilterSpec:
        """Cross-field checks (weights) at load time, so the error carries the spec path."""
        Filters.from_preset(self.preset, **self.model_dump(exclude={"preset"}, exclude_none=True))
        return self

    def resolve(self, **flags: object) -> Filters:
        """The effective filters: preset, then this spec's values, then command-line ``flags``."""
        values = self.model_dump(exclude={"preset"}, exclude_none=True)
        values.update({k: v for k, v in flags.items() if v is not None and k != "preset"})
        preset = flags.get("preset") or self.preset
        try:
            return Filters.from_preset(preset, **values)  # type: ignore[arg-type]
        except ValidationError as exc:
            # The spec's own values were checked on load: what fails here came from a flag.
            first = exc.errors()[0]
            flag = "--" + str(first["loc"][0]).replace("_", "-") if first["loc"] else "filters"
            raise ConfigError(f"{flag}: {_message(first)}") from None


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
    #: Merge the adapter into the base model and write an Ollama Modelfile after training.
    export: bool = False


#: A Kubernetes object name (DNS-1123 label).
DNS_LABEL = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
DnsLabel = Annotated[str, Field(pattern=f"^{DNS_LABEL}$")]
#: A Kubernetes resource quantity ("500m", "8Gi", 2).
Quantity = Annotated[str, Field(pattern=r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$")]


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


#: Each step's pod defaults; a spec's own values are merged over them key by key (as Helm merges values).
STEP_POD_DEFAULTS: dict[str, dict[str, Any]] = {
    "collect": {
        "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
        "active_deadline_seconds": 6 * 3600,
    },
    "extract": {
        "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "4Gi"}},
        "active_deadline_seconds": 2 * 3600,
    },
    "train": {
        "resources": {"requests": {"cpu": "4", "memory": "24Gi"}, "limits": {"memory": "32Gi"}},
        "active_deadline_seconds": 48 * 3600,
    },
    "export": {
        "resources": {"requests": {"cpu": "2", "memory": "16Gi"}, "limits": {"memory": "32Gi"}},
        "active_deadline_seconds": 2 * 3600,
    },
}


def _merged(defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
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
    extract: PodSpec = Field(default_factory=lambda: PodSpec(**STEP_POD_DEFAULTS["extract"]))
    train: TrainPodSpec = Field(default_factory=lambda: TrainPodSpec(**STEP_POD_DEFAULTS["train"]))
    export: PodSpec = Field(default_factory=lambda: PodSpec(**STEP_POD_DEFAULTS["export"]))
    collect: PodSpec = Field(default_factory=lambda: PodSpec(**STEP_POD_DEFAULTS["collect"]))

    @model_validator(mode="before")
    @classmethod
    def _step_defaults(cls, data: Any) -> Any:
        """A step block that sets only tolerations keeps the step's default resources and deadline."""
        if not isinstance(data, dict):
            return data
        return {
            key: _merged(STEP_POD_DEFAULTS[key], value)
            if key in STEP_POD_DEFAULTS and isinstance(value, dict)
            else value
            for key, value in data.items()
        }


class CollectSpec(_Strict):
    """An optional first step that gathers new experiences (the seed's trainer.js episodes).

    On Kubernetes it runs ``image`` with ``command``; locally ``command`` runs as a subprocess.
    """

    image: str
    command: Annotated[list[str], Field(min_length=1)]
    env: dict[str, str] = Field(default_factory=dict)
    #: Environment variables from Secrets (NAME: {name, key}).
    secret_env: dict[str, SecretRef] = Field(default_factory=dict)


class PipelineSpec(_Strict):
    #: At most 39 characters, so that NAME-YYYYMMDD-HHMMSS-extract fits Kubernetes' 63.
    name: Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9]{0,37}[a-z0-9])?$")] = "saige"
    #: The shared volume: datasets/ and runs/ live under it.
    data_root: str = "./saige-data"
    source: SourceSpec = Field(default_factory=SourceSpec)
    extract: ExtractSpec = Field(default_factory=ExtractSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    collect: CollectSpec | None = None
    kubernetes: KubernetesSpec = Field(default_factory=KubernetesSpec)


def override_train(train: TrainSpec, flags: dict[str, Any]) -> TrainSpec:
    """``train`` with the command-line values that were given (None: not given)."""
    values = {**train.model_dump(), **{k: v for k, v in flags.items() if v is not None}}
    try:
        return TrainSpec.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        flag = "--" + str(first["loc"][0]).replace("_", "-") if first["loc"] else "train"
        raise ConfigError(f"{flag}: {_message(first)}") from None


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first: int) -> None:
        super().__init__(f"duplicate key {key!r} at line {line} (first at line {first})")


class _SpecLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys; a spec that says two things is refused instead."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # "<<" merges are meant to be overridden
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                duplicate = key in seen
            except TypeError:
                continue  # an unhashable key: the base class reports it
            if duplicate:
                raise _DuplicateKey(key, line, seen[key])
            seen[key] = line
        return super().construct_mapping(node, deep)


def load_spec(path: Path | str) -> PipelineSpec:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read spec {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (invalid byte at offset {exc.start})") from None
    try:
        data = yaml.load(text, Loader=_SpecLoader)  # a SafeLoader subclass
    except _DuplicateKey as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    return parse_spec(data if data is not None else {}, str(path))


def parse_spec(data: Any, origin: str = "spec") -> PipelineSpec:
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return PipelineSpec.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, origin)) from None


def _describe(exc: ValidationError, origin: str) -> str:
    """The first problem as ``origin: dotted.path: message`` (and how many more there are)."""
    errors = exc.errors()
    first = errors[0]
    where = ".".join(str(part) for part in first["loc"]) or "(top level)"
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{origin}: {where}: {_message(first)}{more}"


def _message(error: Any) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown key"
    message = str(error["msg"]).removeprefix("Value error, ")
    if "input" in error and not isinstance(error["input"], dict | list):
        message += f" (got {error['input']!r})"
    return message


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
