"""Rendering the Helm chart with the real helm binary, shared by the chart and alert tests."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "saige"
SCENARIOS = ["default", *sorted(p.name.removesuffix("-values.yaml") for p in (CHART / "ci").glob("*-values.yaml"))]
RELEASE = "saige"
NAMESPACE = "saige-ns"


def metric_names(expr: str) -> set[str]:
    """The saige_* series names a PromQL expression selects."""
    return set(re.findall(r"\bsaige_[a-z0-9_]+", expr))


def helm_binary() -> str | None:
    found = shutil.which("helm")
    if found:
        return found
    beside = Path(sys.executable).parent / "helm"
    return str(beside) if beside.exists() else None


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    binary = helm_binary()
    assert binary is not None
    env = {**os.environ, "HELM_CACHE_HOME": "/tmp/saige-helm-cache", "HELM_CONFIG_HOME": "/tmp/saige-helm-config"}
    result = subprocess.run([binary, *args], capture_output=True, text=True, check=False, env=env, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


def values_args(scenario: str) -> list[str]:
    return [] if scenario == "default" else ["-f", str(CHART / "ci" / f"{scenario}-values.yaml")]


def template(*extra: str, release: str = RELEASE, namespace: str = NAMESPACE) -> list[dict[str, Any]]:
    """The chart's objects (helm test hooks included), parsed."""
    out = helm("template", release, str(CHART), "-n", namespace, *extra).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def render_scenario(scenario: str) -> list[dict[str, Any]]:
    return template(*values_args(scenario))


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]
