"""The Helm chart helm/saige, rendered by the real helm binary and checked object by object:
strict Kubernetes schemas, the pipeline spec it installs, pod hardening, secrets, RBAC, names."""

from __future__ import annotations

import base64
import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from saige_k8s.metrics import exported_metric_names
from saige_k8s.spec import KubernetesSpec, parse_spec
from tests.chart_helpers import (
    CHART,
    NAMESPACE,
    RELEASE,
    ROOT,
    SCENARIOS,
    by_kind,
    helm,
    helm_binary,
    metric_names,
    one,
    render_scenario,
    template,
    values_args,
)
from tests.conftest import need_tool, run_cli

if helm_binary() is None:
    need_tool("helm not found (on PATH or beside the Python interpreter); .ci/install-helm .venv/bin installs it")

KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
PLANTED = "PLANTED-s3cret-7f3a9c"


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """Every scenario rendered once: {scenario: objects}."""
    return {scenario: render_scenario(scenario) for scenario in SCENARIOS}


def pipeline_of(objects: list[dict[str, Any]]) -> dict[str, Any]:
    config_maps = [o for o in by_kind(objects, "ConfigMap") if "spec.yaml" in o.get("data", {})]
    assert len(config_maps) == 1
    return yaml.safe_load(config_maps[0]["data"]["spec.yaml"])


def pod_specs(objects: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(name, pod spec) of every pod the chart runs."""
    specs = []
    for obj in objects:
        if obj["kind"] == "CronJob":
            specs.append((obj["metadata"]["name"], obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]))
        elif obj["kind"] == "Job":
            specs.append((obj["metadata"]["name"], obj["spec"]["template"]["spec"]))
        elif obj["kind"] == "Pod":
            specs.append((obj["metadata"]["name"], obj["spec"]))
        else:
            assert obj["kind"] not in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet")
    return specs


# --- the schema ---------------------------------------------------------------------------------


def test_values_schema_is_generated_from_the_pipeline_spec():
    spec = importlib.util.spec_from_file_location("values_schema", ROOT / "helm" / "values_schema.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    committed = (CHART / "values.schema.json").read_text(encoding="utf-8")
    assert committed == module.render(), "values.schema.json is stale: run python helm/values_schema.py"
    schema = json.loads(committed)
    # The pipeline part follows the pydantic model: every spec key is there, minus the composed ones.
    kubernetes = schema["$defs"]["KubernetesSpec"]["properties"]
    assert set(kubernetes) == set(KubernetesSpec.model_fields) - set(module.COMPOSED_KUBERNETES_KEYS)
    assert schema["$defs"]["TrainSpec"]["additionalProperties"] is False


def _all_objects_strict(node: Any, path: str = "") -> list[str]:
    """Paths of object schemas that allow unknown keys (none may, except passthrough affinity terms)."""
    loose = []
    if isinstance(node, dict):
        if node.get("type") == "object" and "properties" in node and node.get("additionalProperties") is not False:
            loose.append(path)
        for key, value in node.items():
            loose += _all_objects_strict(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            loose += _all_objects_strict(value, f"{path}/{i}")
    return loose


def test_values_schema_is_strict_everywhere():
    schema = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    assert _all_objects_strict(schema) == []


@pytest.mark.parametrize(
    "setting",
    [
        "imag.tag=1",  # a misspelt top-level key
        "cronJob.schedul=@daily",
        "pipeline.train.modle=x",  # a misspelt spec key
        "pipeline.kubernetes.train.tolerations[0].efect=NoSchedule",
        "pipeline.kubernetes.claim_name=mine",  # composed by the chart: set persistence.existingClaim
        "pipeline.train.quantization=3bit",
        "image.pullPolicy=Sometimes",
        "persistence.accessModes[0]=ReadWriteAlways",
        "image.extract.digest=sha256:nothex",
        "pipeline.kubernetes.train.shm_size=8GB",  # not a Kubernetes quantity
        "controller.resources.limits.memory=1.1.M",
        "pipeline.kubernetes.run_as_user=5",  # composed by the chart: set podSecurityContext.runAsUser
        "podSecurityContext.runAsNonRoot=false",  # the hardening is not optional
        "podSecurityContext.runAsUser=0",
        "podSecurityContext.seccompProfile.type=Unconfined",
        "securityContext.allowPrivilegeEscalation=true",
        "securityContext.readOnlyRootFilesystem=false",
        "securityContext.capabilities.drop={NET_RAW}",
        "securityContext.runAsUsr=5",
    ],
)
def test_a_wrong_value_fails_lint_and_template(setting):
    lint = helm("lint", "--strict", str(CHART), "--set", setting, check=False)
    assert lint.returncode != 0
    assert "schema" in (lint.stdout + lint.stderr)
    rendered = helm("template", RELEASE, str(CHART), "--set", setting, check=False)
    assert rendered.returncode != 0
    assert "don't meet the specifications of the schema" in rendered.stderr


def test_every_kubernetes_quantity_form_passes_the_schema():
    objects = template(
        "--set-string",
        "controller.resources.requests.cpu=250u,controller.resources.limits.memory=1e3,persistence.size=+1Ti",
        "--set-string",
        "pipeline.kubernetes.train.shm_size=1.5Gi,pipeline.kubernetes.extract.resources.requests.cpu=.5",
    )
    spec = parse_spec(pipeline_of(objects))
    assert (spec.kubernetes.train.shm_size, spec.kubernetes.extract.resources.requests["cpu"]) == ("1.5Gi", ".5")
    controller = one(objects, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert controller["resources"]["requests"]["cpu"] == "250u"


# --- lint, template, install --------------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_lint_strict(scenario):
    result = helm("lint", "--strict", str(CHART), *values_args(scenario))
    assert "0 chart(s) failed" in result.stdout


def test_install_dry_run_client():
    result = helm(
        "install",
        RELEASE,
        str(CHART),
        "-n",
        NAMESPACE,
        "--dry-run=client",
        "-f",
        str(CHART / "ci" / "monitoring-values.yaml"),
    )
    out = result.stdout
    assert "STATUS: pending-install" in out
    assert "kind: CronJob" in out
    assert f"kubectl -n {NAMESPACE} create job --from=cronjob/{RELEASE} {RELEASE}-manual-$(date +%s)" in out
    assert "helm test saige" in out


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_passes_the_strict_kubernetes_schema(rendered, scenario, version):
    objects = rendered[scenario]
    assert objects
    for obj in objects:
        if obj["apiVersion"] == "monitoring.coreos.com/v1":
            continue  # CRDs without bundled schemas: test_monitoring_objects checks them
        kubernetes_validate.validate(obj, version, strict=True)


def test_the_schema_check_can_fail():
    objects = render_scenario("default")
    cron = one(objects, "CronJob")
    cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(cron, KUBERNETES_VERSIONS[0], strict=True)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_names_labels_and_namespace(rendered, scenario):
    for obj in rendered[scenario]:
        meta = obj["metadata"]
        assert DNS_LABEL.match(meta["name"]), meta["name"]
        labels = meta["labels"]
        assert labels["helm.sh/chart"] == "saige-0.1.0"
        assert labels["app.kubernetes.io/name"] == "saige"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/version"] == "0.1.0"
        if obj["kind"] not in ("ServiceMonitor", "PrometheusRule") and not (
            obj["kind"] == "ConfigMap" and "dashboard" in meta["name"]
        ):
            assert meta["namespace"] == NAMESPACE


def test_long_release_names_stay_within_63_characters():
    release = "a-very-long-release-name-for-the-saige-chart-tests-x"  # 52 characters (helm allows 53)
    objects = template("--set", "database.url=sqlite:///demo.db", "--set", "dashboards.enabled=true", release=release)
    names = [o["metadata"]["name"] for o in objects]
    assert len({(o["kind"], o["metadata"]["name"]) for o in objects}) == len(objects)
    for name in names:
        assert len(name) <= 63 and DNS_LABEL.match(name), name


# --- the pipeline spec in the ConfigMap ---------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_the_configmap_holds_a_valid_pipeline_spec(rendered, scenario):
    objects = rendered[scenario]
    spec = parse_spec(pipeline_of(objects), f"{scenario}: spec.yaml")
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    if scenario != "default":
        scenario_values = yaml.safe_load((CHART / "ci" / f"{scenario}-values.yaml").read_text())
        values = _merge(values, scenario_values)
    k8s = spec.kubernetes
    assert k8s.namespace == NAMESPACE
    # The claim: the existing one, or the one the chart creates.
    claims = by_kind(objects, "PersistentVolumeClaim")
    if values["persistence"]["existingClaim"]:
        assert claims == []
        assert k8s.claim_name == values["persistence"]["existingClaim"]
    else:
        assert [c["metadata"]["name"] for c in claims] == [k8s.claim_name]
        assert claims[0]["spec"]["resources"]["requests"]["storage"] == values["persistence"]["size"]
    # Images: repository:tag (appVersion by default) or repository@digest.
    for step in ("extract", "train"):
        image = values["image"][step]
        expected = (
            f"{image['repository']}@{image['digest']}"
            if image.get("digest")
            else f"{image['repository']}:{image.get('tag') or '0.1.0'}"
        )
        assert getattr(k8s.images, step) == expected
    assert k8s.images.pull_policy == values["image"]["pullPolicy"]
    assert k8s.images.pull_secrets == values["imagePullSecrets"]
    # Secret references, never values.
    db = values["database"]
    if db["existingSecret"]:
        assert (k8s.secrets.db_url.name, k8s.secrets.db_url.key) == (db["existingSecret"], db["secretKey"])
    elif db["url"]:
        secret = one(objects, "Secret")
        assert (k8s.secrets.db_url.name, k8s.secrets.db_url.key) == (secret["metadata"]["name"], "url")
    else:
        assert k8s.secrets.db_url is None
    hf = values["huggingface"]
    if hf["existingSecret"]:
        assert (k8s.secrets.hf_token.name, k8s.secrets.hf_token.key) == (hf["existingSecret"], hf["secretKey"])
    else:
        assert k8s.secrets.hf_token is None
    assert k8s.pushgateway_url == (values["metrics"]["pushgateway"]["url"] or None)
    # `submit --no-wait` with this spec runs the controller as the chart's ServiceAccount.
    binding = one(objects, "RoleBinding")
    assert k8s.controller_service_account == binding["subjects"][0]["name"]
    cron = one(objects, "CronJob")
    assert (
        k8s.controller_service_account == cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["serviceAccountName"]
    )
    # The rest of the block passes through.
    assert spec.name == values["pipeline"]["name"]
    assert spec.train.model == values["pipeline"]["train"]["model"]
    assert spec.train.gpus == values["pipeline"]["train"]["gpus"]


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_the_installed_spec_renders_its_jobs(rendered, scenario, tmp_path):
    """What `helm test` runs in the cluster (saige-k8s render -f /etc/saige/spec.yaml), here."""
    objects = rendered[scenario]
    path = tmp_path / "spec.yaml"
    config_map = next(o for o in by_kind(objects, "ConfigMap") if "spec.yaml" in o["data"])
    path.write_text(config_map["data"]["spec.yaml"])
    result = run_cli("render", "-f", path, "-o", "yaml", "--run", "chart-test")
    assert result.exit_code == 0, result.output + result.stderr
    documents = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    jobs = [doc for doc in documents if doc["kind"] == "Job"]
    spec = parse_spec(yaml.safe_load(path.read_text()))
    # A multi-node train step comes with its headless Service.
    services = [doc for doc in documents if doc["kind"] == "Service"]
    assert [s["metadata"]["name"] for s in services] == (["chart-test-train"] if spec.train.nodes > 1 else [])
    for service in services:
        assert service["metadata"]["namespace"] == NAMESPACE
        kubernetes_validate.validate(service, KUBERNETES_VERSIONS[-1], strict=True)
    steps = [
        "extract",
        "train",
        *(["evaluate"] if spec.evaluate.enabled else []),
        *(["export"] if spec.train.export else []),
    ]
    assert [job["metadata"]["labels"]["saige.io/step"] for job in jobs] == steps
    for job in jobs:
        assert job["metadata"]["namespace"] == NAMESPACE
        kubernetes_validate.validate(job, KUBERNETES_VERSIONS[-1], strict=True)
        pod = job["spec"]["template"]["spec"]
        claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
        assert claims == [spec.kubernetes.claim_name]
        (container,) = pod["containers"]
        step = job["metadata"]["labels"]["saige.io/step"]
        assert container["image"] == (
            spec.kubernetes.images.extract if step == "extract" else spec.kubernetes.images.train
        )
        secret_env = {
            e["name"]: e["valueFrom"]["secretKeyRef"]
            for e in container.get("env", [])
            if "valueFrom" in e and "secretKeyRef" in e["valueFrom"]
        }
        if step == "extract" and spec.kubernetes.secrets.db_url:
            ref = secret_env["SAIGE_DB_URL"]
            assert (ref["name"], ref["key"]) == (
                spec.kubernetes.secrets.db_url.name,
                spec.kubernetes.secrets.db_url.key,
            )


def test_gpu_scheduling_reaches_the_spec(rendered):
    spec = parse_spec(pipeline_of(rendered["multi-gpu"]))
    train = spec.kubernetes.train
    assert spec.train.gpus == 4
    assert train.shm_size == "32Gi"
    assert train.runtime_class_name == "nvidia"
    assert train.priority_class_name == "batch-high"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in train.tolerations
    assert train.node_selector == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert "nodeAffinity" in train.affinity
    assert spec.kubernetes.kueue_queue == "gpu-queue"
    assert train.resources.requests == {"cpu": "32", "memory": "256Gi"}
    assert parse_spec(pipeline_of(rendered["cpu-demo"])).train.gpus == 0
    multi_node = parse_spec(pipeline_of(rendered["multi-node"]))
    assert (multi_node.train.nodes, multi_node.train.gpus) == (4, 8)
    assert multi_node.kubernetes.kueue_queue == "gpu-queue"
    assert parse_spec(pipeline_of(rendered["qlora-7b"])).train.quantization == "4bit"


# --- pods: hardening ----------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_pod_is_hardened(rendered, scenario):
    specs = pod_specs(rendered[scenario])
    assert any(name == RELEASE for name, _ in specs)  # the CronJob's pod is always there
    for name, pod in specs:
        pod_ctx = pod["securityContext"]
        assert pod_ctx["runAsNonRoot"] is True, name
        assert pod_ctx["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert pod_ctx["runAsUser"] == pod_ctx["runAsGroup"] == pod_ctx["fsGroup"] == 10001
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), name
        for volume in pod.get("volumes", []):
            assert "hostPath" not in volume, name
        mounts_tmp = False
        for container in pod["containers"] + pod.get("initContainers", []):
            ctx = container["securityContext"]
            assert ctx["runAsNonRoot"] is True
            assert isinstance(ctx["runAsUser"], int) and ctx["runAsUser"] > 0
            assert ctx["allowPrivilegeEscalation"] is False
            assert ctx["readOnlyRootFilesystem"] is True
            assert ctx.get("privileged") is not True
            assert ctx["capabilities"] == {"drop": ["ALL"]}
            assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
            assert container["resources"]["limits"]["memory"]
            mounts_tmp |= any(m["mountPath"] == "/tmp" for m in container["volumeMounts"])
            spec_mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/etc/saige")
            assert spec_mount["readOnly"] is True
        assert mounts_tmp, name
        tmp = next(v for v in pod["volumes"] if v["name"] == "tmp")
        assert "emptyDir" in tmp


def test_security_contexts_and_the_step_pods_uid_come_from_values():
    objects = template("--set", "podSecurityContext.runAsUser=2000,podSecurityContext.runAsGroup=3000")
    for name, pod in pod_specs(objects):
        assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (2000, 3000), name
        container = pod["containers"][0]["securityContext"]
        assert (container["runAsUser"], container["runAsGroup"], container["runAsNonRoot"]) == (2000, 3000, True)
    assert parse_spec(pipeline_of(objects)).kubernetes.run_as_user == 2000  # the step pods' UID
    own = template("--set", "securityContext.runAsUser=4000")
    assert one(own, "Pod")["spec"]["containers"][0]["securityContext"]["runAsUser"] == 4000


def test_the_controller_and_the_helm_test_pod_share_one_pod_spec(rendered):
    """They differ only where their jobs do: what runs, API access, resources, /tmp's size."""
    objects = rendered["monitoring"]  # placement and a pushgateway set
    controller = one(objects, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    tester = one(objects, "Pod")["spec"]
    shapes = []
    for pod in (json.loads(json.dumps(controller)), json.loads(json.dumps(tester))):
        pod.pop("serviceAccountName", None)
        pod.pop("automountServiceAccountToken")
        for key in ("name", "command", "args", "env", "resources"):
            pod["containers"][0].pop(key, None)
        next(v for v in pod["volumes"] if v["name"] == "tmp")["emptyDir"].pop("sizeLimit")
        shapes.append(pod)
    assert shapes[0] == shapes[1]
    assert tester["nodeSelector"] == controller["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert (controller["automountServiceAccountToken"], tester["automountServiceAccountToken"]) == (True, False)


def test_the_chart_names_its_maintainers_and_icon():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["maintainers"] and all(
        m["name"] and m.get("url", "").startswith("https://") for m in chart["maintainers"]
    )
    assert chart["icon"].startswith(chart["home"].replace("github.com", "raw.githubusercontent.com"))
    assert (ROOT / chart["icon"].split("/main/", 1)[1]).is_file()  # the file the URL serves once pushed
    lint = helm("lint", str(CHART))
    assert "icon is recommended" not in lint.stdout + lint.stderr


def test_the_cronjob(rendered):
    cron = one(rendered["default"], "CronJob")
    spec = cron["spec"]
    assert spec["schedule"] == "0 3 * * 0"
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["suspend"] is False
    assert "timeZone" not in spec
    assert (spec["successfulJobsHistoryLimit"], spec["failedJobsHistoryLimit"]) == (3, 3)
    assert spec["startingDeadlineSeconds"] == 3600
    job = spec["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 0
    assert job["activeDeadlineSeconds"] == 259200
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["serviceAccountName"] == one(rendered["default"], "ServiceAccount")["metadata"]["name"]
    container = pod["containers"][0]
    assert container["image"] == "ghcr.io/saige-k8s/saige-k8s-extract:0.1.0"
    assert container["command"] + container.get("args", []) == [
        "saige-k8s",
        "submit",
        "--in-cluster",
        "-f",
        "/etc/saige/spec.yaml",
    ]
    assert "SAIGE_PUSHGATEWAY_URL" not in {e["name"] for e in container["env"]}
    config_map = next(v for v in pod["volumes"] if v["name"] == "spec")["configMap"]["name"]
    assert config_map == next(o for o in by_kind(rendered["default"], "ConfigMap"))["metadata"]["name"]
    for key in ("nodeSelector", "tolerations", "affinity", "imagePullSecrets"):
        assert key not in pod

    monitoring = one(rendered["monitoring"], "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    env = {e["name"]: e["value"] for e in monitoring["containers"][0]["env"]}
    assert env["SAIGE_PUSHGATEWAY_URL"] == "http://prometheus-pushgateway.monitoring.svc:9091"
    assert monitoring["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert monitoring["tolerations"] == [{"key": "batch", "operator": "Exists", "effect": "NoSchedule"}]

    cpu = one(rendered["cpu-demo"], "CronJob")["spec"]
    assert (cpu["schedule"], cpu["timeZone"]) == ("30 2 * * *", "Etc/UTC")
    assert one(rendered["existing-pvc"], "CronJob")["spec"]["suspend"] is True
    single = one(rendered["single-gpu"], "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert single["imagePullSecrets"] == [{"name": "regcred"}]


def _controller_job_shape(job_spec: dict[str, Any]) -> dict[str, Any]:
    """A controller Job's spec less what names it or says where its spec file comes from."""
    shape = json.loads(json.dumps(job_spec))
    shape.pop("ttlSecondsAfterFinished", None)  # the CronJob keeps its Jobs by history limits instead
    template = shape["template"]
    template["metadata"] = {"label_keys": sorted(set(template["metadata"]["labels"]) - {"saige.io/pipeline-run"})}
    pod = template["spec"]
    container = pod["containers"][0]
    if "--run" in container["command"]:  # submit --no-wait resumes a named run; the CronJob starts one
        at = container["command"].index("--run")
        del container["command"][at : at + 2]
    for volume in pod["volumes"]:
        if volume["name"] == "spec":  # a ConfigMap the chart installs, or the pod's own annotation
            volume.pop("configMap", None)
            volume.pop("downwardAPI", None)
    return shape


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_the_cronjob_runs_the_same_controller_pod_as_submit_no_wait(rendered, scenario):
    from saige_k8s.runners.backend import Run
    from saige_k8s.runners.jobs import construct_controller_job, to_dict

    cron = one(rendered[scenario], "CronJob")["spec"]["jobTemplate"]["spec"]
    spec = parse_spec(pipeline_of(rendered[scenario]))
    built = to_dict(construct_controller_job(Run(spec, "saige-20261201-000000")))["spec"]
    chart_shape, built_shape = _controller_job_shape(cron), _controller_job_shape(built)
    # The chart's own controller.* values place and size its pod; a scenario that sets them differs there only.
    for key in ("nodeSelector", "tolerations", "affinity"):
        chart_shape["template"]["spec"].pop(key, None)
    if (
        chart_shape["template"]["spec"]["containers"][0]["resources"]
        != built_shape["template"]["spec"]["containers"][0]["resources"]
    ):
        assert scenario != "default"
        for shape in (chart_shape, built_shape):
            shape["template"]["spec"]["containers"][0].pop("resources")
    assert chart_shape == built_shape


def test_the_config_checksum_follows_the_spec():
    def checksum(*extra: str) -> str:
        cron = one(template(*extra), "CronJob")
        return cron["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    base = checksum()
    assert re.fullmatch(r"[0-9a-f]{64}", base)
    assert checksum() == base
    assert checksum("--set", "pipeline.train.epochs=5") != base


def test_the_helm_test_pod_renders_the_installed_spec(rendered):
    pod = one(rendered["default"], "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    container = pod["spec"]["containers"][0]
    assert container["command"] + container["args"] == [
        "saige-k8s",
        "render",
        "-f",
        "/etc/saige/spec.yaml",
        "-o",
        "yaml",
    ]
    assert container["image"].startswith("ghcr.io/saige-k8s/saige-k8s-extract:")
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert by_kind(rendered["existing-pvc"], "Pod") == []  # tests.enabled: false


# --- secrets ------------------------------------------------------------------------------------


def test_a_planted_database_url_appears_only_base64_in_a_secret():
    url = f"postgresql+psycopg://u:{PLANTED}@db.example/saige"
    out = helm(
        "template",
        RELEASE,
        str(CHART),
        "-n",
        NAMESPACE,
        "--set",
        f"database.url={url}",
        "--set",
        "metrics.prometheusRule.enabled=true",
        "--set",
        "dashboards.enabled=true",
    ).stdout
    assert PLANTED not in out
    objects = [o for o in yaml.safe_load_all(out) if o]
    secret = one(objects, "Secret")
    assert base64.b64decode(secret["data"]["url"]).decode() == url
    assert "stringData" not in secret
    spec = parse_spec(pipeline_of(objects))
    assert (spec.kubernetes.secrets.db_url.name, spec.kubernetes.secrets.db_url.key) == (
        secret["metadata"]["name"],
        "url",
    )
    # Outside the Secret, not even the encoded value.
    encoded = base64.b64encode(url.encode()).decode()
    assert all(encoded not in json.dumps(o) for o in objects if o["kind"] != "Secret")
    # --dry-run output hides it too with --hide-secret.
    hidden = helm(
        "install",
        RELEASE,
        str(CHART),
        "-n",
        NAMESPACE,
        "--dry-run=client",
        "--hide-secret",
        "--set",
        f"database.url={url}",
    ).stdout
    assert PLANTED not in hidden and encoded not in hidden


@pytest.mark.parametrize(
    "setting",
    [
        f"pipeline.source.url=postgresql://u:{PLANTED}@h/db",
        f"pipeline.source.url=mysql+pymysql://admin:{PLANTED}@h:3306/db",
    ],
)
def test_a_password_in_the_spec_url_is_refused(setting):
    result = helm("template", RELEASE, str(CHART), "--set", setting, check=False)
    assert result.returncode != 0
    assert "database.existingSecret" in result.stderr
    assert PLANTED not in result.stdout


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://u:{PLANTED}@h/db",
        f"postgresql://u:x/{PLANTED}@h/db",  # SQLAlchemy reads a password up to the first "@"
        f"postgresql://h:5432/db?x=a@{PLANTED}",  # ... so this one has a password too
        f"postgresql://u@h/db?password={PLANTED}",
        f"postgresql://u@h/db?sslmode=require&PASSWORD={PLANTED}",
        f"postgresql://u@h/db?passfile=/run/{PLANTED}",
        f"postgresql://u@h/db?sslkey=/keys/{PLANTED}.key",
        f"postgresql://u@h/db?sslpassword={PLANTED}",
        f"postgresql://u@h/db?pass%77ord={PLANTED}",
        f"postgresql://u@h/db?%70assword={PLANTED}",
        f"postgresql:///dbname%3Dsaige%20password%3D{PLANTED}",
        f"postgresql://u@h/db?dbname=host%3Dh+password+%3D+{PLANTED}",
        f"mssql+pyodbc://?odbc_connect=DSN%3Dx%3BPWD%3D{PLANTED}",
        f"host=h dbname=saige password={PLANTED}",
        f"postgresql://u@h:5x32/db?{PLANTED}",
        f"postgresql://h/db?x=1\npassword={PLANTED}",
        f"post gres://h/{PLANTED}",
    ],
)
def test_every_credential_form_in_the_spec_url_is_refused(url):
    result = helm("template", RELEASE, str(CHART), "--set-json", f"pipeline.source.url={json.dumps(url)}", check=False)
    assert result.returncode != 0, result.stdout
    assert "pipeline.source.url" in result.stderr and "database.existingSecret" in result.stderr
    assert PLANTED not in result.stdout + result.stderr


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://user%40server@db.example:5432/saige?sslmode=verify-full&sslrootcert=/etc/ca.pem",
        "postgresql+psycopg://saige@[::1]:5432/saige?options=-csearch_path%3Dsaige",
        "sqlite:////data/keys.db",
        "/data/saige.db",
    ],
)
def test_urls_without_credentials_pass_the_check(url):
    assert parse_spec(pipeline_of(template("--set-json", f"pipeline.source.url={json.dumps(url)}"))).source.url == url


def test_a_passwordless_source_url_passes_through():
    objects = template("--set", "pipeline.source.url=postgresql+psycopg://saige@db.example/saige")
    assert parse_spec(pipeline_of(objects)).source.url == "postgresql+psycopg://saige@db.example/saige"


def test_database_url_and_existing_secret_are_exclusive():
    result = helm(
        "template",
        RELEASE,
        str(CHART),
        "--set",
        "database.url=sqlite:///x.db",
        "--set",
        "database.existingSecret=db",
        check=False,
    )
    assert result.returncode != 0
    assert "not both" in result.stderr


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_no_secret_values_in_env_or_args(rendered, scenario):
    for _, pod in pod_specs(rendered[scenario]):
        for container in pod["containers"]:
            text = json.dumps([container.get("command"), container.get("args"), container.get("env")])
            assert not re.search(r"://[^/@\"]*:[^/@\"]*@", text)
            for env in container.get("env", []):
                assert env["name"] not in ("SAIGE_DB_URL", "HF_TOKEN") or "valueFrom" in env


# --- RBAC ---------------------------------------------------------------------------------------


def test_rbac_is_exactly_what_the_controller_uses(rendered):
    objects = rendered["default"]
    role = one(objects, "Role")
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): sorted(r["verbs"]) for r in role["rules"]}
    assert rules == {
        (("batch",), ("jobs",)): sorted(["create", "get", "list", "watch", "delete"]),
        (("",), ("pods",)): ["get", "list", "watch"],
        (("",), ("pods/log",)): ["get"],
        # A multi-node train step's headless Service: created, found again on a resubmit, deleted by cancel.
        (("",), ("services",)): ["create", "delete", "get"],
    }
    assert all("resourceNames" not in r and "nonResourceURLs" not in r for r in role["rules"])
    assert by_kind(objects, "ClusterRole") == [] and by_kind(objects, "ClusterRoleBinding") == []
    binding = one(objects, "RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    account = one(objects, "ServiceAccount")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": NAMESPACE}
    ]
    assert account["automountServiceAccountToken"] is False  # only the controller pod opts in

    existing = rendered["existing-pvc"]
    assert by_kind(existing, "ServiceAccount") == []
    assert one(existing, "RoleBinding")["subjects"][0]["name"] == "saige-controller"
    cron_pod = one(existing, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert cron_pod["serviceAccountName"] == "saige-controller"


def test_an_existing_service_account_needs_a_name():
    result = helm("template", RELEASE, str(CHART), "--set", "serviceAccount.create=false", check=False)
    assert result.returncode != 0
    assert "serviceAccount.name is required" in result.stderr


# --- monitoring objects -------------------------------------------------------------------------


def test_monitoring_objects(rendered):
    assert [o for o in rendered["default"] if o["apiVersion"].startswith("monitoring.coreos.com")] == []
    objects = rendered["monitoring"]
    monitor = one(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    spec = monitor["spec"]
    assert set(spec) == {"selector", "namespaceSelector", "endpoints"}
    assert spec["selector"] == {"matchLabels": {"app.kubernetes.io/name": "prometheus-pushgateway"}}
    assert spec["namespaceSelector"] == {"matchNames": ["monitoring"]}
    (endpoint,) = spec["endpoints"]
    assert endpoint == {
        "port": "http",
        "path": "/metrics",
        "interval": "60s",
        "scrapeTimeout": "10s",
        "honorLabels": True,
    }

    rule = one(objects, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert set(rule["spec"]) == {"groups"}
    alerts = set()
    for group in rule["spec"]["groups"]:
        assert set(group) == {"name", "rules"} and group["name"]
        for r in group["rules"]:
            assert set(r) == {"alert", "expr", "for", "labels", "annotations"}
            assert isinstance(r["expr"], str) and r["expr"]
            assert re.fullmatch(r"[0-9]+[smhdwy]", r["for"])
            assert r["labels"]["team"] == "ml" and r["labels"]["severity"] in ("warning", "critical")
            assert set(r["annotations"]) == {"summary", "description"}
            assert 'pipeline="saige"' in r["expr"]
            alerts.add(r["alert"])
    assert alerts == {
        "SaigeRetrainingStale",
        "SaigeDatasetBelowMinimum",
        "SaigeKeptHarmRising",
        "SaigeSourceHarmRising",
        "SaigePipelineFailed",
        "SaigeCandidateRejected",
        "SaigePrincipleRegressed",
    }


def test_alert_thresholds_come_from_values():
    objects = template(
        "--set",
        "metrics.prometheusRule.enabled=true",
        "--set",
        "metrics.prometheusRule.staleHours=30",
        "--set-json",  # --set reads 0.02 as a string, which the schema refuses
        "metrics.prometheusRule.keptHarmRise=0.02",
        "--set",
        "metrics.prometheusRule.harmRiseWindow=14d",
        "--set",
        "pipeline.name=nightly",
    )
    rules = {
        r["alert"] + r["expr"][:5]: r for g in one(objects, "PrometheusRule")["spec"]["groups"] for r in g["rules"]
    }
    exprs = "\n".join(r["expr"] for r in rules.values())
    assert "> 30 * 3600" in exprs
    assert "offset 14d > 0.02" in exprs
    assert 'pipeline="nightly"' in exprs and 'pipeline="saige"' not in exprs


# --- dashboards ---------------------------------------------------------------------------------


def dashboard_files() -> list[Path]:
    files = sorted((CHART / "dashboards").glob("*.json"))
    assert files
    return files


def test_one_dashboard_configmap_per_file(rendered):
    assert [c for c in by_kind(rendered["default"], "ConfigMap") if "dashboard" in c["metadata"]["name"]] == []
    maps = [c for c in by_kind(rendered["monitoring"], "ConfigMap") if "grafana_dashboard" in c["metadata"]["labels"]]
    assert len(maps) == len(dashboard_files())
    for config_map, path in zip(sorted(maps, key=lambda c: next(iter(c["data"]))), dashboard_files(), strict=True):
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert config_map["metadata"]["namespace"] == "monitoring"
        assert config_map["metadata"]["annotations"] == {"grafana_folder": "SAIGE"}
        assert json.loads(config_map["data"][path.name]) == json.loads(path.read_text())
    custom = template(
        "--set", "dashboards.enabled=true", "--set", "dashboards.label=my_dash", "--set", "dashboards.labelValue=yes"
    )
    (config_map,) = [c for c in by_kind(custom, "ConfigMap") if "my_dash" in c["metadata"]["labels"]]
    assert config_map["metadata"]["labels"]["my_dash"] == "yes"


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels += panel.get("panels", [])
    return [p for p in panels if p["type"] != "row"]


@pytest.mark.parametrize("path", dashboard_files(), ids=lambda p: p.name)
def test_dashboard_json(path):
    dashboard = json.loads(path.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["pipeline"]["type"] == "query"
    assert "label_values(" in variables["pipeline"]["definition"]
    assert variables["pipeline"]["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    panels = _panels(dashboard)
    assert len(panels) >= 10
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    used: set[str] = set()
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert '$pipeline"' in target["expr"], (panel["title"], target["expr"])
            used |= metric_names(target["expr"])
    # No hard-coded data source anywhere.
    uids = re.findall(r'"uid":\s*"([^"]*)"', path.read_text())
    assert set(uids) <= {"${datasource}", dashboard["uid"]}
    # What the brief asks to see.
    for name in (
        "saige_dataset_examples",
        "saige_extract_rows_removed",
        "saige_extract_rows_invalid",
        "saige_extract_rows_duplicate",
        "saige_dataset_harm_mean",
        "saige_dataset_weighted_score_mean",
        "saige_source_harm_mean",
        "saige_source_weighted_score_mean",
        "saige_dataset_alignment_ratio",
        "saige_source_alignment_ratio",
        "saige_dataset_principle_mean",
        "saige_train_loss",
        "saige_train_eval_loss",
        "saige_train_tokens_per_second",
        "saige_pipeline_last_success_timestamp_seconds",
        "saige_extract_last_success_timestamp_seconds",
        "saige_train_last_success_timestamp_seconds",
        "saige_train_trainable_parameters",
        "saige_dataset_info",
    ):
        assert name in used, name
    assert used <= exported_metric_names(), sorted(used - exported_metric_names())


# --- documentation ------------------------------------------------------------------------------


def _leaf_keys(node: Any, prefix: str = "") -> list[str]:
    """Dotted paths of the leaves; a map keyed by label names (with '.' or '/') is one leaf."""
    if isinstance(node, dict) and node and not any("." in key or "/" in key for key in node):
        return [k for key, value in node.items() for k in _leaf_keys(value, f"{prefix}{key}.")]
    return [prefix.rstrip(".")]


def test_the_chart_readme_documents_every_value():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    readme = (CHART / "README.md").read_text()
    documented = set(re.findall(r"^\| `([^`]+)` \|", readme, flags=re.MULTILINE))
    leaves = _leaf_keys(values)
    assert len(leaves) > 50
    missing = [key for key in leaves if key not in documented]
    assert missing == []


def test_the_readme_shows_how_to_install():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Install on a cluster (Helm)")[1].split("\n## ")[0]
    assert "helm install saige ./helm/saige -n saige -f my-values.yaml" in section
    assert "create job --from=cronjob/saige saige-manual-$(date +%s)" in section
    assert "create secret generic saige-db" in section and "--from-literal=url=" in section


def test_the_readme_example_values_render(tmp_path):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Install on a cluster (Helm)")[1].split("\n## ")[0]
    example = re.search(r"```yaml\n(# my-values.yaml\n.*?)```", section, flags=re.DOTALL)
    assert example is not None
    path = tmp_path / "my-values.yaml"
    path.write_text(example.group(1))
    objects = template("-f", str(path))
    spec = parse_spec(pipeline_of(objects))
    assert spec.train.gpus >= 1 and spec.kubernetes.train.tolerations
    helm("lint", "--strict", str(CHART), "-f", str(path))
