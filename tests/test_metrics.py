"""Dataset-quality metrics: promtool-valid text, and values read back through a real
Pushgateway and Prometheus equal to the manifest's."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from saige_k8s.metrics import extraction_registry
from tests.conftest import _free_port, need_tool, run_cli, wait_for

REPO = Path(__file__).parent.parent


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        need_tool(f"{name} not found (apt-get install prometheus prometheus-pushgateway)")
    return str(path)


def _extract(db: str, root: Path, *extra: str) -> tuple[Path, dict]:
    result = run_cli("extract", "--db", db, "--data-root", root, "--json", *extra)
    assert result.exit_code == 0, result.output
    dataset = root / "datasets" / json.loads(result.stdout)["dataset_id"]
    return dataset, json.loads((dataset / "manifest.json").read_text())


def test_metrics_file_passes_promtool(demo_sqlite: str, tmp_path: Path) -> None:
    promtool = _tool("promtool")
    dataset, _ = _extract(demo_sqlite, tmp_path)
    text = (dataset / "metrics.prom").read_text()
    checked = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "dataset_id=" in text and "saige_dataset_info{" in text  # ids only in the _info series


@pytest.fixture
def prometheus_stack(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A Pushgateway and a Prometheus scraping it (honor_labels), both on loopback."""
    gateway_bin, prometheus_bin = _tool("prometheus-pushgateway"), _tool("prometheus")
    gateway_port, prometheus_port = _free_port(), _free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: pushgateway\n    honor_labels: true\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{gateway_port}']}}]\n"
    )
    procs = [
        subprocess.Popen(
            [gateway_bin, f"--web.listen-address=127.0.0.1:{gateway_port}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ),
        subprocess.Popen(
            [
                prometheus_bin,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prometheus_port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ),
    ]
    try:
        for port in (gateway_port, prometheus_port):
            assert wait_for(lambda p=port: _ready(f"http://127.0.0.1:{p}/-/ready"), timeout=60, interval=0.2)
        yield f"http://127.0.0.1:{gateway_port}", f"http://127.0.0.1:{prometheus_port}"
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def _query(prometheus: str, expression: str) -> list[dict]:
    url = f"{prometheus}/api/v1/query?{urllib.parse.urlencode({'query': expression})}"
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())["data"]["result"]


def test_pushed_values_read_back_through_prometheus_equal_the_manifest(
    demo_sqlite: str, tmp_path: Path, prometheus_stack: tuple[str, str]
) -> None:
    gateway, prometheus = prometheus_stack
    _, manifest = _extract(demo_sqlite, tmp_path / "out", "--pushgateway", gateway)
    assert wait_for(lambda: bool(_query(prometheus, "saige_dataset_info")), timeout=60, interval=0.5)

    def value(expression: str) -> float:
        result = _query(prometheus, expression)
        assert len(result) == 1, (expression, result)
        return float(result[0]["value"][1])

    counts = manifest["counts"]
    assert value("saige_extract_rows_scanned_total") == counts["scanned"]
    assert value("saige_extract_rows_kept_total") == counts["kept"]
    assert value("saige_extract_rows_duplicate_total") == counts["duplicates"]
    for reason, n in manifest["invalid"].items():
        assert value(f'saige_extract_rows_invalid_total{{reason="{reason}"}}') == n
    for name, n in manifest["removed"].items():
        assert value(f'saige_extract_rows_removed_total{{filter="{name}"}}') == n
    assert value('saige_dataset_examples{split="train"}') == counts["train"]
    assert value("saige_dataset_harm_mean") == pytest.approx(manifest["stats"]["actual_harm"]["avg"])
    assert value("saige_dataset_harm_count") == counts["kept"]
    assert value('saige_dataset_principle_mean{principle="karuna"}') == pytest.approx(
        manifest["stats"]["principles"]["karuna"]
    )
    assert value("saige_source_rows") == manifest["source_stats"]["rows"]
    assert value("saige_source_harm_mean") == pytest.approx(manifest["source_stats"]["mean_harm"])
    info = _query(prometheus, "saige_dataset_info")[0]["metric"]
    assert info["dataset_id"] == manifest["dataset_id"] and info["job"] == "saige-extract"
    assert info["pipeline"] == "saige" and not info.get("instance")


def test_push_failure_warns_and_the_step_succeeds(demo_sqlite: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "saige_k8s",
            "extract",
            "--db",
            demo_sqlite,
            "--data-root",
            str(tmp_path),
            "--json",
            "--pushgateway",
            f"http://127.0.0.1:{_free_port()}",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "could not push metrics" in result.stderr
    assert (tmp_path / "datasets" / json.loads(result.stdout)["dataset_id"] / "metrics.prom").exists()


def test_readme_metrics_table_matches_the_code(demo_sqlite: str, tmp_path: Path) -> None:
    _, manifest = _extract(demo_sqlite, tmp_path)
    exported = {m.name + ("_total" if m.type == "counter" else "") for m in extraction_registry(manifest).collect()}
    readme = (REPO / "README.md").read_text()
    documented = set(re.findall(r"^\| `(saige_[a-z_]+)` \|", readme, flags=re.MULTILINE))
    assert documented == exported


def test_metric_families_have_low_cardinality(demo_sqlite: str, tmp_path: Path) -> None:
    _, manifest = _extract(demo_sqlite, tmp_path)
    for family in extraction_registry(manifest, finished_at=time.time()).collect():
        labels = {k for sample in family.samples for k in sample.labels if k != "le"}
        assert ("dataset_id" in labels) == (family.name == "saige_dataset_info"), family.name
        assert len(family.samples) <= 20, family.name
