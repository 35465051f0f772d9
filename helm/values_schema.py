"""Write helm/saige/values.schema.json: the chart's own values, strict, plus the ``pipeline``
block generated from the pydantic PipelineSpec, so the chart and the Python spec cannot drift.

    python helm/values_schema.py           # rewrite the schema
    python helm/values_schema.py --check   # exit 1 when the committed schema is stale (tests do this)

The ``pipeline.kubernetes`` keys that the chart composes from its own values (namespace,
images, claim_name, secrets, pushgateway_url, controller_service_account) are not accepted
under ``pipeline``: set them through ``image``, ``persistence``, ``database``,
``huggingface``, ``metrics``, ``serviceAccount`` and ``podSecurityContext`` instead.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from saige_k8s.spec import QUANTITY_PATTERN, PipelineSpec

SCHEMA_PATH = Path(__file__).resolve().parent / "saige" / "values.schema.json"

#: pipeline.kubernetes keys the chart fills in from its own values.
COMPOSED_KUBERNETES_KEYS = (
    "namespace",
    "images",
    "claim_name",
    "secrets",
    "pushgateway_url",
    "controller_service_account",
    "run_as_user",
)

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
QUANTITY = QUANTITY_PATTERN
DURATION = r"^([0-9]+(ms|s|m|h|d|w|y))+$"


def obj(properties: dict[str, Any], *, required: tuple[str, ...] = (), description: str = "") -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "additionalProperties": False, "properties": properties}
    if required:
        schema["required"] = list(required)
    if description:
        schema["description"] = description
    return schema


def string(pattern: str | None = None, *, enum: list[str] | None = None, description: str = "") -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    if pattern:
        schema["pattern"] = pattern
    if enum:
        schema["enum"] = enum
    if description:
        schema["description"] = description
    return schema


def optional_string(pattern: str, description: str = "") -> dict[str, Any]:
    """A string matching ``pattern``, or "" (unset)."""
    schema: dict[str, Any] = {"type": "string", "pattern": f"^$|{pattern}"}
    if description:
        schema["description"] = description
    return schema


def integer(minimum: int = 0, description: str = "") -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer", "minimum": minimum}
    if description:
        schema["description"] = description
    return schema


BOOLEAN = {"type": "boolean"}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
LABELS = {"type": "object", "additionalProperties": {"type": "string"}, "propertyNames": {"maxLength": 317}}


def k8s_defs() -> dict[str, Any]:
    """Kubernetes shapes shared by the chart's values and the pipeline's pod settings."""
    quantity = {"type": ["string", "number"], "pattern": QUANTITY, "minimum": 0}
    return {
        "Toleration": obj(
            {
                "key": {"type": "string"},
                "operator": string(enum=["Exists", "Equal"]),
                "value": {"type": "string"},
                "effect": string(enum=["NoSchedule", "PreferNoSchedule", "NoExecute"]),
                "tolerationSeconds": {"type": "integer"},
            },
            description="A Kubernetes toleration (camelCase keys, as in a pod spec).",
        ),
        "Affinity": obj(
            {
                "nodeAffinity": {"type": "object"},
                "podAffinity": {"type": "object"},
                "podAntiAffinity": {"type": "object"},
            },
            description="A Kubernetes affinity (camelCase keys, as in a pod spec).",
        ),
        "Resources": obj(
            {
                "requests": {"type": "object", "additionalProperties": quantity},
                "limits": {"type": "object", "additionalProperties": quantity},
            },
            description="Kubernetes resource requests and limits.",
        ),
    }


def security_defs() -> dict[str, Any]:
    """The chart's pod and container security contexts: Kubernetes' fields, held to the hardening."""
    seccomp = obj(
        {"type": string(enum=["RuntimeDefault", "Localhost"]), "localhostProfile": {"type": "string"}},
        required=("type",),
        description="Unconfined is not accepted.",
    )
    user = {"runAsNonRoot": {"const": True}, "runAsUser": integer(1), "runAsGroup": integer(0)}
    return {
        "SeccompProfile": seccomp,
        "PodSecurityContext": obj(
            {
                **user,
                "fsGroup": integer(0),
                "fsGroupChangePolicy": string(enum=["OnRootMismatch", "Always"]),
                "supplementalGroups": {"type": "array", "items": integer(0)},
                "seccompProfile": {"$ref": "#/$defs/SeccompProfile"},
            },
            required=("runAsNonRoot", "runAsUser", "seccompProfile"),
            description="A non-root pod with a numeric UID (the step pods get it too) and a seccomp profile.",
        ),
        "SecurityContext": obj(
            {
                **user,
                "allowPrivilegeEscalation": {"const": False},
                "readOnlyRootFilesystem": {"const": True},
                "privileged": {"const": False},
                "capabilities": obj(
                    {
                        "drop": {"type": "array", "items": {"type": "string"}, "contains": {"const": "ALL"}},
                        "add": {"type": "array", "items": string(enum=["NET_BIND_SERVICE"])},
                    },
                    required=("drop",),
                ),
                "seccompProfile": {"$ref": "#/$defs/SeccompProfile"},
            },
            required=("allowPrivilegeEscalation", "readOnlyRootFilesystem", "capabilities"),
            description="Every capability dropped, no privilege escalation, a read-only root file system.",
        ),
    }


def _strip(node: Any) -> Any:
    """Drop pydantic's titles and defaults (helm does not apply schema defaults)."""
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in node.items() if k not in ("title", "default")}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def pipeline_schema() -> tuple[dict[str, Any], dict[str, Any]]:
    """(the ``pipeline`` property's schema, its ``$defs``), adapted for the chart's values."""
    schema = _strip(PipelineSpec.model_json_schema(by_alias=True, mode="validation"))
    defs = schema.pop("$defs")
    kubernetes = defs["KubernetesSpec"]
    for key in COMPOSED_KUBERNETES_KEYS:
        kubernetes["properties"].pop(key)
    kubernetes["description"] = (
        "How the steps run as Jobs. namespace, images, claim_name, secrets, pushgateway_url and "
        "controller_service_account are composed by the chart from its own values and cannot be set here."
    )
    for name in ("ImagesSpec", "SecretsSpec"):
        defs.pop(name)
    # Kubernetes-shaped passthrough keys: as strict as a pod spec would be.
    for name in ("PodSpec", "TrainPodSpec"):
        props = defs[name]["properties"]
        props["tolerations"] = {"type": "array", "items": {"$ref": "#/$defs/Toleration"}}
        props["affinity"] = {"anyOf": [{"$ref": "#/$defs/Affinity"}, {"type": "null"}]}
    # ResourcesSpec coerces numbers to strings (cpu: 4): accept numbers here too.
    quantity = {"type": ["string", "number"], "pattern": QUANTITY, "minimum": 0}
    for key in ("requests", "limits"):
        defs["ResourcesSpec"]["properties"][key]["additionalProperties"] = quantity
    schema["description"] = "The pipeline spec (saige_k8s.spec.PipelineSpec), stored in the ConfigMap."
    return schema, defs


def image() -> dict[str, Any]:
    return obj(
        {
            "repository": string(r"^[a-z0-9]+([._/:-][a-z0-9]+)*$"),
            "tag": optional_string(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$"),
            "digest": optional_string(r"^sha256:[a-f0-9]{64}$"),
        },
        required=("repository",),
    )


def chart_schema() -> dict[str, Any]:
    pipeline, pipeline_defs = pipeline_schema()
    defs = {**k8s_defs(), **security_defs(), **pipeline_defs}
    properties = {
        "nameOverride": optional_string(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"),
        "fullnameOverride": optional_string(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"),
        "image": obj(
            {
                "extract": image(),
                "train": image(),
                "pullPolicy": string(enum=["Always", "IfNotPresent", "Never"]),
            },
            required=("extract", "train", "pullPolicy"),
        ),
        "imagePullSecrets": {"type": "array", "items": string(DNS_LABEL), "uniqueItems": True},
        "serviceAccount": obj(
            {"create": BOOLEAN, "name": optional_string(DNS_LABEL), "annotations": STRING_MAP},
            required=("create",),
        ),
        "rbac": obj({"create": BOOLEAN}, required=("create",)),
        "persistence": obj(
            {
                "existingClaim": optional_string(DNS_LABEL),
                "size": string(QUANTITY),
                "storageClassName": optional_string(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"),
                "accessModes": {
                    "type": "array",
                    "minItems": 1,
                    "uniqueItems": True,
                    "items": string(enum=["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"]),
                },
                "annotations": STRING_MAP,
                "keepOnUninstall": BOOLEAN,
            },
            required=("size", "accessModes"),
        ),
        "database": obj(
            {
                "existingSecret": optional_string(DNS_LABEL),
                "secretKey": string(r"^[-._a-zA-Z0-9]+$"),
                "url": {"type": "string"},
            },
            required=("secretKey",),
        ),
        "huggingface": obj(
            {"existingSecret": optional_string(DNS_LABEL), "secretKey": string(r"^[-._a-zA-Z0-9]+$")},
            required=("secretKey",),
        ),
        "cronJob": obj(
            {
                "schedule": string(r"^(@(yearly|annually|monthly|weekly|daily|midnight|hourly)|(\S+\s+){4}\S+)$"),
                "timeZone": optional_string(r"^[A-Za-z0-9_+-]+(/[A-Za-z0-9_+-]+)*$"),
                "suspend": BOOLEAN,
                "successfulJobsHistoryLimit": integer(0),
                "failedJobsHistoryLimit": integer(0),
                "startingDeadlineSeconds": integer(10),
                "activeDeadlineSeconds": integer(60),
            },
            required=("schedule",),
        ),
        "podSecurityContext": {"$ref": "#/$defs/PodSecurityContext"},
        "securityContext": {"$ref": "#/$defs/SecurityContext"},
        "controller": obj(
            {
                "resources": {"$ref": "#/$defs/Resources"},
                "nodeSelector": STRING_MAP,
                "tolerations": {"type": "array", "items": {"$ref": "#/$defs/Toleration"}},
                "affinity": {"$ref": "#/$defs/Affinity"},
                "podAnnotations": STRING_MAP,
                "podLabels": LABELS,
            }
        ),
        "tests": obj({"enabled": BOOLEAN, "resources": {"$ref": "#/$defs/Resources"}}),
        "metrics": obj(
            {
                "pushgateway": obj({"url": optional_string(r"^https?://\S+$")}),
                "serviceMonitor": obj(
                    {
                        "enabled": BOOLEAN,
                        "namespace": optional_string(DNS_LABEL),
                        "labels": LABELS,
                        "selector": {**LABELS, "minProperties": 1},
                        "namespaceSelector": obj(
                            {"any": BOOLEAN, "matchNames": {"type": "array", "items": string(DNS_LABEL)}}
                        ),
                        "port": string(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"),
                        "interval": string(DURATION),
                        "scrapeTimeout": string(DURATION),
                    }
                ),
                "prometheusRule": obj(
                    {
                        "enabled": BOOLEAN,
                        "namespace": optional_string(DNS_LABEL),
                        "labels": LABELS,
                        "alertLabels": LABELS,
                        "staleHours": {"type": "number", "exclusiveMinimum": 0},
                        "keptHarmRise": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                        "sourceHarmRise": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                        "harmRiseWindow": string(DURATION),
                        "regressionTolerance": {"type": "number", "minimum": 0},
                        "regressionMinItems": integer(1),
                    }
                ),
            }
        ),
        "dashboards": obj(
            {
                "enabled": BOOLEAN,
                "namespace": optional_string(DNS_LABEL),
                "label": string(r"^([a-z0-9.-]+/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"),
                "labelValue": string(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$"),
                "annotations": STRING_MAP,
            }
        ),
        "pipeline": pipeline,
    }
    schema = obj(properties, required=tuple(k for k in properties if k not in ("nameOverride", "fullnameOverride")))
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "Values of the saige chart (generated by helm/values_schema.py; do not edit)",
        **schema,
        "$defs": defs,
    }


def render() -> str:
    return json.dumps(chart_schema(), indent=2) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        current = SCHEMA_PATH.read_text(encoding="utf-8") if SCHEMA_PATH.exists() else ""
        if current != text:
            print(f"{SCHEMA_PATH} is stale: run python helm/values_schema.py", file=sys.stderr)
            return 1
        return 0
    SCHEMA_PATH.write_text(text, encoding="utf-8")
    print(f"wrote {SCHEMA_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
