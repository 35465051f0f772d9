"""Extraction, training and pipeline metrics: promtool-valid text, and values read back
through a real Pushgateway and Prometheus equal to the manifest's and metrics.json's."""

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
import yaml
from prometheus_client.parser import text_string_to_metric_families

from saige_k8s.metrics import (
    exported_metric_names,
    extraction_registry,
    push_pipeline_result,
    training_registry,
    write_pipeline_textfile,
)
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


def _promtool_check(text: str) -> None:
    checked = subprocess.run(
        [_tool("promtool"), "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_metrics_file_passes_promtool(demo_sqlite: str, tmp_path: Path) -> None:
    dataset, _ = _extract(demo_sqlite, tmp_path)
    text = (dataset / "metrics.prom").read_text()
    _promtool_check(text)
    assert "dataset_id=" in text and "saige_dataset_info{" in text  # ids only in the _info series
    families = list(text_string_to_metric_families(text))
    # Every sample names its pipeline (a textfile scrape has no grouping key to add it).
    assert all(s.labels.get("pipeline") == "saige" for f in families for s in f.samples)
    # Per-run row counts are gauges (a counter would "reset" on every run).
    kinds = {f.name: f.type for f in families}
    for name in ("scanned", "kept", "duplicate", "invalid", "removed"):
        assert kinds[f"saige_extract_rows_{name}"] == "gauge"


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
            # Debian's build persists to /var/lib/prometheus by default: keep each test's pushes its own.
            [gateway_bin, f"--web.listen-address=127.0.0.1:{gateway_port}", "--persistence.file="],
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
    assert value("saige_extract_rows_scanned") == counts["scanned"]
    assert value("saige_extract_rows_kept") == counts["kept"]
    assert value("saige_extract_rows_duplicate") == counts["duplicates"]
    for reason, n in manifest["invalid"].items():
        assert value(f'saige_extract_rows_invalid{{reason="{reason}"}}') == n
    for name, n in manifest["removed"].items():
        assert value(f'saige_extract_rows_removed{{filter="{name}"}}') == n
    assert value('saige_dataset_examples{split="train"}') == counts["train"]
    assert value("saige_dataset_harm_mean") == pytest.approx(manifest["stats"]["actual_harm"]["avg"])
    assert value("saige_dataset_harm_count") == counts["kept"]
    assert value('saige_dataset_principle_mean{principle="karuna"}') == pytest.approx(
        manifest["stats"]["principles"]["karuna"]
    )
    assert value("saige_source_rows") == manifest["source_stats"]["rows"]
    assert value("saige_source_harm_mean") == pytest.approx(manifest["source_stats"]["mean_harm"])
    assert value("saige_dataset_min_examples") == 100  # the default spec's extract.min_examples
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


def _names(families) -> set[str]:
    suffixes = {"counter": ("_total",), "histogram": ("", "_bucket", "_sum", "_count")}
    return {f.name + suffix for f in families for suffix in suffixes.get(f.type, ("",))}


def test_readme_metrics_table_matches_the_code(demo_sqlite: str, tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text()
    rows = re.findall(r"^\| `(saige_[a-z_]+)` \| (\w+) \|", readme, flags=re.MULTILINE)
    documented = {
        name + suffix
        for name, kind in rows
        for suffix in (("", "_bucket", "_sum", "_count") if kind == "histogram" else ("",))
    }
    exported = exported_metric_names()
    assert documented == exported
    assert {"saige_train_info", "saige_pipeline_last_success_timestamp_seconds", "saige_dataset_min_examples"} <= (
        exported
    )
    # The representative records leave nothing out that a real extraction exports.
    _, manifest = _extract(demo_sqlite, tmp_path)
    assert _names(extraction_registry(manifest, min_examples=100).collect()) <= exported


def test_metric_families_have_low_cardinality(demo_sqlite: str, tmp_path: Path) -> None:
    _, manifest = _extract(demo_sqlite, tmp_path)
    for family in extraction_registry(manifest, finished_at=time.time(), min_examples=5).collect():
        labels = {k for sample in family.samples for k in sample.labels if k != "le"}
        assert ("dataset_id" in labels) == (family.name == "saige_dataset_info"), family.name
        assert len(family.samples) <= 20, family.name
    record = {"train_loss": 1.0, "steps": 3, "base_model": "m", "dataset_id": "d", "run_id": "r"}
    for family in training_registry(record).collect():
        labels = {k for sample in family.samples for k in sample.labels}
        assert bool(labels) == (family.name == "saige_train_info"), family.name
        assert len(family.samples) == 1, family.name
    # dpo/kto add their rewards: by kind and split only, a handful of series.
    preference = {**record, "method": "dpo", "log": [{"rewards/chosen": 1.0, "rewards/accuracy": 0.5}]}
    preference["eval_preference"] = {"rewards/chosen": 1.0, "rewards/rejected": 0.0, "rewards/margins": 1.0}
    for family in training_registry(preference).collect():
        labels = {k for sample in family.samples for k in sample.labels}
        if family.name in ("saige_train_rewards", "saige_train_reward_accuracy"):
            assert labels <= {"kind", "split"} and len(family.samples) <= 6, family.name


def test_training_registry_leaves_out_what_the_run_did_not_measure() -> None:
    names = _names(training_registry({"train_loss": 2.0, "eval_loss": None, "steps": 1}).collect())
    assert "saige_train_loss" in names and "saige_train_steps" in names
    assert "saige_train_eval_loss" not in names and "saige_train_initial_eval_loss" not in names


# ---- training ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_training(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A small dataset (with an eval split) and a tiny model built from it: (dataset, model)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        need_tool("torch is not installed (pip install -e '.[train]')")
    from saige_k8s.dataset.extract import ExtractRequest, extract
    from saige_k8s.experiences.demo import DemoOptions, create_database
    from saige_k8s.training.data import load_dataset_dir
    from tests.tiny_model import build_tiny_model

    root = tmp_path_factory.mktemp("train-metrics")
    create_database(str(root / "saige.db"), DemoOptions(rows=600, seed=5, response_median_bytes=80))
    result = extract(
        ExtractRequest(
            db=str(root / "saige.db"), data_root=root / "data", format="mistral", eval_fraction=0.1, dataset_id="ds"
        )
    )
    texts = [str(row) for row in load_dataset_dir(result.path).train[:200]]
    return result.path, build_tiny_model(root / "model", texts, vocab_size=400, hidden=32)


def _value(prometheus: str, expression: str) -> float:
    result = _query(prometheus, expression)
    assert len(result) == 1, (expression, result)
    return float(result[0]["value"][1])


def test_training_metrics_read_back_through_prometheus_equal_metrics_json(
    tiny_training: tuple[Path, Path], tmp_path: Path, prometheus_stack: tuple[str, str]
) -> None:
    gateway, prometheus = prometheus_stack
    dataset, model = tiny_training
    run = tmp_path / "run-7"
    result = run_cli(
        "train",
        "--dataset",
        dataset,
        "--model",
        model,
        "--output-dir",
        run,
        "--batch-size",
        "8",
        "--max-seq-len",
        "128",
        "--max-steps",
        "6",
        "--logging-steps",
        "3",
        "--target-modules",
        "all-linear",
        "--pushgateway",
        gateway,
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "metrics.json").read_text())
    _promtool_check((run / "metrics.prom").read_text())
    assert wait_for(lambda: bool(_query(prometheus, "saige_train_info")), timeout=60, interval=0.5)

    expected = {
        "saige_train_loss": metrics["log"][-1]["loss"],
        "saige_train_eval_loss": metrics["eval_loss"],
        "saige_train_initial_eval_loss": metrics["eval_loss_before"],
        "saige_train_tokens_per_second": metrics["tokens_per_second"],
        "saige_train_duration_seconds": metrics["train_seconds"],
        "saige_train_trainable_parameters": metrics["trainable_parameters"],
        "saige_train_parameters": metrics["parameters"],
        "saige_train_steps": 6,
        "saige_train_examples": metrics["train_examples"],
        "saige_train_last_success_timestamp_seconds": metrics["finished_at"],
    }
    for name, value in expected.items():
        assert _value(prometheus, name) == pytest.approx(value, rel=1e-9), name
    assert metrics["parameters"] > metrics["trainable_parameters"] > 0
    assert metrics["tokens_per_second"] == pytest.approx(metrics["tokens"] / metrics["train_seconds"])
    assert time.time() - 300 < metrics["finished_at"] <= time.time()
    info = _query(prometheus, "saige_train_info")[0]["metric"]
    assert (info["base_model"], info["dataset_id"], info["run_id"]) == (str(model), "ds", "run-7")
    assert (info["job"], info["pipeline"]) == ("saige-train", "saige") and not info.get("instance")


# ---- pipeline ------------------------------------------------------------------------------


def _gateway_values(gateway: str, job: str, pipeline: str = "pipe") -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{gateway}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        s.name: s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.labels.get("job") == job and s.labels.get("pipeline") == pipeline and s.name.startswith("saige_")
    }


def test_failed_run_keeps_the_last_success_on_the_gateway(prometheus_stack: tuple[str, str]) -> None:
    gateway, prometheus = prometheus_stack
    push_pipeline_result("pipe", gateway, succeeded=True, started=1000.0, finished=1060.0)
    assert wait_for(lambda: bool(_query(prometheus, "saige_pipeline_last_run_success")), timeout=60, interval=0.5)
    assert _value(prometheus, "saige_pipeline_last_run_success") == 1
    assert _value(prometheus, "saige_pipeline_last_success_timestamp_seconds") == 1060

    push_pipeline_result("pipe", gateway, succeeded=False, started=2000.0, finished=2030.0)
    assert wait_for(lambda: _value(prometheus, "saige_pipeline_last_run_success") == 0, timeout=60, interval=0.5)
    assert _value(prometheus, "saige_pipeline_last_success_timestamp_seconds") == 1060
    assert _value(prometheus, "saige_pipeline_last_run_timestamp_seconds") == 2030
    assert _value(prometheus, "saige_pipeline_last_run_duration_seconds") == 30
    info = _query(prometheus, "saige_pipeline_last_run_success")[0]["metric"]
    assert (info["job"], info["pipeline"]) == ("saige-pipeline", "pipe") and not info.get("instance")

    push_pipeline_result("pipe", gateway, succeeded=True, started=3000.0, finished=3010.0)
    assert _gateway_values(gateway, "saige-pipeline") == {
        "saige_pipeline_last_run_timestamp_seconds": 3010,
        "saige_pipeline_last_run_success": 1,
        "saige_pipeline_last_run_duration_seconds": 10,
        "saige_pipeline_last_success_timestamp_seconds": 3010,
    }


def test_pipeline_push_failure_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING"):
        push_pipeline_result("pipe", f"http://127.0.0.1:{_free_port()}", succeeded=False, started=1.0, finished=2.0)
    assert "could not push metrics" in caplog.text


def test_pipeline_textfile_keeps_the_last_success_after_a_failure(tmp_path: Path) -> None:
    write_pipeline_textfile(tmp_path, "pipe", succeeded=True, started=10.0, finished=20.0)
    path = write_pipeline_textfile(tmp_path, "pipe", succeeded=False, started=30.0, finished=45.0)
    text = path.read_text()
    _promtool_check(text)
    assert 'saige_pipeline_last_success_timestamp_seconds{pipeline="pipe"} 20.0' in text
    assert 'saige_pipeline_last_run_success{pipeline="pipe"} 0.0' in text
    assert 'saige_pipeline_last_run_duration_seconds{pipeline="pipe"} 15.0' in text
    (tmp_path / "new").mkdir()
    fresh = write_pipeline_textfile(tmp_path / "new", "pipe", succeeded=False, started=1.0, finished=2.0)
    assert "last_success" not in fresh.read_text()  # never succeeded: no timestamp rather than a made-up one


def test_failed_local_run_pushes_its_result_and_still_fails(tmp_path: Path, prometheus_stack: tuple[str, str]) -> None:
    gateway, _ = prometheus_stack
    assert not _gateway_values(gateway, "saige-extract")  # a fresh gateway: nothing left from other tests
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "pipe",
                "data_root": str(tmp_path / "data"),
                "source": {"url": str(tmp_path / "saige.db"), "demo": {"rows": 300, "seed": 3}},
                "extract": {"min_examples": 100_000},
            }
        )
    )
    push_pipeline_result("pipe", gateway, succeeded=True, started=1000.0, finished=1060.0)
    result = run_cli("run", "-f", spec, "--pushgateway", gateway)
    assert result.exit_code == 2
    assert "below extract.min_examples (100000); not training" in result.stderr
    pipeline = _gateway_values(gateway, "saige-pipeline")
    assert pipeline["saige_pipeline_last_run_success"] == 0
    assert pipeline["saige_pipeline_last_success_timestamp_seconds"] == 1060
    assert time.time() - 120 < pipeline["saige_pipeline_last_run_timestamp_seconds"] <= time.time()
    assert _gateway_values(gateway, "saige-extract")["saige_dataset_min_examples"] == 100_000  # the step pushed too
    text = (tmp_path / "data" / "metrics" / "pipeline-pipe.prom").read_text()
    assert 'saige_pipeline_last_run_success{pipeline="pipe"} 0.0' in text


def test_the_kubernetes_controller_pushes_its_runs_outcome(kube, prometheus_stack: tuple[str, str]) -> None:
    """A successful run, then one stopped below min_examples: the failure keeps the last success."""
    from saige_k8s.runners.jobs import Run
    from saige_k8s.runners.kubernetes import Cluster
    from tests.test_controller import NS, RUN, Submission, _finish, _job, _spec, _summary

    gateway, _ = prometheus_stack
    cluster = Cluster(kube.api_client(), NS)
    runs = {RUN: 480, RUN.replace("130000", "140000"): 3}
    outcomes = {}
    for run_id, kept in runs.items():
        submission = Submission(cluster, Run(_spec(), run_id), pushgateway=gateway)
        assert wait_for(lambda r=run_id: _job(kube, f"{r}-extract") is not None, 10)
        _finish(kube, f"{run_id}-extract", "extract", message=_summary(kept=kept))
        if kept >= 10:
            assert wait_for(lambda r=run_id: _job(kube, f"{r}-train") is not None, 10)
            _finish(kube, f"{run_id}-train", "train")
        submission.join()
        outcomes[run_id] = _gateway_values(gateway, "saige-pipeline", pipeline="demo")
    succeeded, failed = outcomes.values()
    assert succeeded["saige_pipeline_last_run_success"] == 1
    assert failed["saige_pipeline_last_run_success"] == 0
    last_success = "saige_pipeline_last_success_timestamp_seconds"
    assert failed[last_success] == succeeded[last_success] > 0
