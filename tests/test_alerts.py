"""The chart's alert rules, as Prometheus evaluates them: the PrometheusRule rendered by helm,
checked by ``promtool check rules`` and unit-tested by ``promtool test rules`` (every alert
firing and not firing)."""

from __future__ import annotations

import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from saige_k8s.metrics import exported_metric_names
from tests.chart_helpers import helm_binary, metric_names, one, render_scenario
from tests.conftest import need_tool, run_cli

if helm_binary() is None:
    need_tool("helm not found (on PATH or beside the Python interpreter); .ci/install-helm .venv/bin installs it")
if shutil.which("promtool") is None:
    need_tool("promtool not found; apt-get install prometheus")

PIPELINE = "saige"  # pipeline.name of the monitoring scenario
ALERT_LABELS = {"team": "ml"}  # metrics.prometheusRule.alertLabels of the monitoring scenario
PIPELINE_JOB = {"job": "saige-pipeline", "pipeline": PIPELINE}
EXTRACT_JOB = {"job": "saige-extract", "pipeline": PIPELINE}
EVALUATE_JOB = {"job": "saige-evaluate", "pipeline": PIPELINE}


@pytest.fixture(scope="module")
def groups() -> list[dict[str, Any]]:
    rule = one(render_scenario("monitoring"), "PrometheusRule")
    return rule["spec"]["groups"]


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, check=False, cwd=cwd, timeout=120)


def series(name: str, labels: dict[str, str], values: str) -> dict[str, str]:
    selector = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{selector}}}", "values": values}


def alert(labels: dict[str, str], severity: str = "warning", **extra: str) -> dict[str, Any]:
    return {"exp_labels": {**labels, "severity": severity, **extra, **ALERT_LABELS}}


def test_the_rules_pass_promtool_check(groups, tmp_path):
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    result = promtool("check", "rules", "rules.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 8 rules found" in result.stdout, result.stdout + result.stderr
    assert "inconsistency" not in result.stderr


def test_a_broken_rule_fails_promtool_check(groups, tmp_path):
    broken = yaml.safe_load(yaml.safe_dump(groups))
    broken[0]["rules"][0]["expr"] = "time() - saige_pipeline_last_success_timestamp_seconds{ > 3"
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": broken}))
    assert promtool("check", "rules", "rules.yaml", cwd=tmp_path).returncode != 0


def test_every_metric_in_the_rules_is_exported(groups):
    used = {name for group in groups for rule in group["rules"] for name in metric_names(rule["expr"])}
    assert used
    assert used <= exported_metric_names(), sorted(used - exported_metric_names())


# Each case: (name, scrape interval, input series, [(eval time, alert name, expected alerts)]).
# Rules are evaluated every 5 minutes; timestamps in the series are seconds since the test's
# start (t = 0), which is also where time() starts in promtool.
CASES = [
    (
        "stale: the last success is older than staleHours (192 h)",
        "5m",
        [series("saige_pipeline_last_success_timestamp_seconds", PIPELINE_JOB, "0x2400")],
        [
            ("100h", "SaigeRetrainingStale", []),
            ("191h", "SaigeRetrainingStale", []),
            ("193h", "SaigeRetrainingStale", [alert(PIPELINE_JOB, reason="stale")]),
        ],
    ),
    (
        "stale: a recent success (timestamp keeps up with time)",
        "5m",
        [series("saige_pipeline_last_success_timestamp_seconds", PIPELINE_JOB, "0+300x2400")],
        [("199h", "SaigeRetrainingStale", [])],
    ),
    (
        "stale: another pipeline's stale success is not this release's",
        "5m",
        [
            series("saige_pipeline_last_success_timestamp_seconds", {**PIPELINE_JOB, "pipeline": "other"}, "0x2400"),
            series("saige_pipeline_last_success_timestamp_seconds", PIPELINE_JOB, "0+300x2400"),
        ],
        [("199h", "SaigeRetrainingStale", [])],
    ),
    (
        "stale: no success ever recorded",
        "5m",
        [series("saige_pipeline_last_run_success", PIPELINE_JOB, "0x2400")],
        [
            ("191h", "SaigeRetrainingStale", []),
            ("193h", "SaigeRetrainingStale", [alert(PIPELINE_JOB, reason="never-succeeded")]),
        ],
    ),
    (
        "failed: the last run failed",
        "1m",
        [series("saige_pipeline_last_run_success", PIPELINE_JOB, "1 1 1 0x20")],
        [
            ("0m", "SaigePipelineFailed", []),
            ("5m", "SaigePipelineFailed", []),  # pending since 5m (for: 5m)
            ("15m", "SaigePipelineFailed", [alert(PIPELINE_JOB, severity="critical")]),
        ],
    ),
    (
        "failed: the last run succeeded",
        "1m",
        [series("saige_pipeline_last_run_success", PIPELINE_JOB, "0 0 1x20")],
        [("15m", "SaigePipelineFailed", [])],
    ),
    (
        "dataset: train + eval below min_examples",
        "1m",
        [
            series("saige_dataset_examples", {**EXTRACT_JOB, "split": "train"}, "40x20"),
            series("saige_dataset_examples", {**EXTRACT_JOB, "split": "eval"}, "5x20"),
            series("saige_dataset_min_examples", EXTRACT_JOB, "100x20"),
        ],
        [
            ("0m", "SaigeDatasetBelowMinimum", []),  # pending (for: 5m)
            ("10m", "SaigeDatasetBelowMinimum", [alert(EXTRACT_JOB)]),
        ],
    ),
    (
        "dataset: train alone below, train + eval at the minimum",
        "1m",
        [
            series("saige_dataset_examples", {**EXTRACT_JOB, "split": "train"}, "95x20"),
            series("saige_dataset_examples", {**EXTRACT_JOB, "split": "eval"}, "5x20"),
            series("saige_dataset_min_examples", EXTRACT_JOB, "100x20"),
        ],
        [("10m", "SaigeDatasetBelowMinimum", [])],
    ),
]

for metric, alertname, threshold in (
    ("saige_dataset_harm_mean", "SaigeKeptHarmRising", 0.05),
    ("saige_source_harm_mean", "SaigeSourceHarmRising", 0.05),
):
    # 5-minute samples: 7 days = 2016 steps; the value changes right after day 7.
    CASES += [
        (
            f"{alertname}: up by more than {threshold} within 7d",
            "5m",
            [series(metric, EXTRACT_JOB, "0.10x2016 0.20x40")],
            [
                ("167h", alertname, []),  # before the rise
                ("169h", alertname, [alert(EXTRACT_JOB)]),
                ("171h", alertname, [alert(EXTRACT_JOB)]),
            ],
        ),
        (
            f"{alertname}: up by less than {threshold}",
            "5m",
            [series(metric, EXTRACT_JOB, "0.10x2016 0.14x40")],
            [("169h", alertname, [])],
        ),
        (
            f"{alertname}: falling harm",
            "5m",
            [series(metric, EXTRACT_JOB, "0.30x2016 0.10x40")],
            [("169h", alertname, [])],
        ),
        (
            f"{alertname}: a rise older than the window",
            "5m",
            [series(metric, EXTRACT_JOB, "0.10x100 0.30x2200")],
            [("178h", alertname, [])],
        ),
    ]


def evaluation(verdict: str) -> list[dict[str, str]]:
    """The verdict and info series of one evaluation push (the other verdict is 0)."""
    other = "promoted" if verdict == "rejected" else "rejected"
    info = {**EVALUATE_JOB, "candidate": "run-2", "baseline": "run-1", "verdict": verdict}
    return [
        series("saige_eval_verdict", {**EVALUATE_JOB, "verdict": verdict}, "1x20"),
        series("saige_eval_verdict", {**EVALUATE_JOB, "verdict": other}, "0x20"),
        series("saige_eval_info", info, "1x20"),
    ]


def margin_delta(
    kind: str, group: str, lower: str, point: str, upper: str, items: str = "50x20"
) -> list[dict[str, str]]:
    labels = {**EVALUATE_JOB, "kind": kind, "group": group}
    return [
        series("saige_eval_margin_delta", {**labels, "bound": "lower"}, lower),
        series("saige_eval_margin_delta", {**labels, "bound": "point"}, point),
        series("saige_eval_margin_delta", {**labels, "bound": "upper"}, upper),
        series("saige_eval_items", labels, items),
    ]


REJECTED = {**EVALUATE_JOB, "verdict": "rejected", "candidate": "run-2", "baseline": "run-1"}
CASES += [
    (
        "rejected: the last candidate was rejected",
        "1m",
        evaluation("rejected"),
        [
            ("0m", "SaigeCandidateRejected", []),  # pending (for: 5m)
            ("10m", "SaigeCandidateRejected", [alert(REJECTED)]),
        ],
    ),
    (
        "rejected: the last candidate was promoted",
        "1m",
        evaluation("promoted"),
        [("10m", "SaigeCandidateRejected", [])],
    ),
    (
        "rejected: a later candidate is promoted (the group is replaced) and the alert resolves",
        "1m",
        [
            series("saige_eval_verdict", {**EVALUATE_JOB, "verdict": "rejected"}, "1x10 0x10"),
            series("saige_eval_verdict", {**EVALUATE_JOB, "verdict": "promoted"}, "0x10 1x10"),
            series("saige_eval_info", {**REJECTED}, "1x9 stale"),  # the PUT removed it
            series("saige_eval_info", {**REJECTED, "verdict": "promoted", "candidate": "run-3"}, "_x10 1x10"),
        ],
        [
            ("8m", "SaigeCandidateRejected", [alert(REJECTED)]),
            ("20m", "SaigeCandidateRejected", []),
        ],
    ),
    (
        "rejected: another pipeline's rejection is not this release's",
        "1m",
        [
            series("saige_eval_verdict", {**EVALUATE_JOB, "pipeline": "other", "verdict": "rejected"}, "1x20"),
            series("saige_eval_info", {**REJECTED, "pipeline": "other"}, "1x20"),
            *evaluation("promoted"),
        ],
        [("10m", "SaigeCandidateRejected", [])],
    ),
    (
        "regressed: a principle's whole interval is below 0, a component's is not",
        "1m",
        [
            *margin_delta("principle", "karuna", "-0.30x20", "-0.20x20", "-0.10x20"),
            *margin_delta("component", "harshness", "-0.30x20", "-0.10x20", "0.05x20"),
            *margin_delta("overall", "overall", "-0.20x20", "-0.10x20", "-0.01x20"),  # overall is not a group
        ],
        [
            ("0m", "SaigePrincipleRegressed", []),  # pending (for: 5m)
            (
                "10m",
                "SaigePrincipleRegressed",
                [alert({**EVALUATE_JOB, "kind": "principle", "group": "karuna", "bound": "upper"})],
            ),
        ],
    ),
    (
        "regressed: a harm component significantly worse",
        "1m",
        margin_delta("component", "deception", "-0.5x20", "-0.3x20", "-0.02x20"),
        [
            (
                "10m",
                "SaigePrincipleRegressed",
                [alert({**EVALUATE_JOB, "kind": "component", "group": "deception", "bound": "upper"})],
            )
        ],
    ),
    (
        "regressed: worse by noise only (the interval includes 0), or better",
        "1m",
        [
            *margin_delta("principle", "sacca", "-0.20x20", "-0.05x20", "0.10x20"),
            *margin_delta("principle", "panna", "0.05x20", "0.10x20", "0.20x20"),
        ],
        [("10m", "SaigePrincipleRegressed", [])],
    ),
    (
        "regressed: a group smaller than regressionMinItems (5) does not count",
        "1m",
        margin_delta("principle", "upekkha", "-0.9x20", "-0.5x20", "-0.2x20", items="4x20"),
        [("10m", "SaigePrincipleRegressed", [])],
    ),
    (
        "regressed: another pipeline's regression is not this release's",
        "1m",
        [
            {**s, "series": s["series"].replace('pipeline="saige"', 'pipeline="other"')}
            for s in margin_delta("principle", "ahimsa", "-0.3x20", "-0.2x20", "-0.1x20")
        ],
        [("10m", "SaigePrincipleRegressed", [])],
    ),
]

ALERTS = {
    "SaigeCandidateRejected",
    "SaigePrincipleRegressed",
    "SaigeRetrainingStale",
    "SaigePipelineFailed",
    "SaigeDatasetBelowMinimum",
    "SaigeKeptHarmRising",
    "SaigeSourceHarmRising",
}


def _without_annotations(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rules as rendered, minus annotations (checked by promtool check and by the test below)."""
    stripped = yaml.safe_load(yaml.safe_dump(groups))
    for group in stripped:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    return stripped


def test_every_alert_fires_and_stays_quiet(groups, tmp_path):
    covered = {name: set() for name in ALERTS}
    tests = []
    for name, interval, input_series, checks in CASES:
        alert_tests = []
        for eval_time, alertname, expected in checks:
            alert_tests.append({"eval_time": eval_time, "alertname": alertname, "exp_alerts": expected})
            covered[alertname].add(bool(expected))
        tests.append({"name": name, "interval": interval, "input_series": input_series, "alert_rule_test": alert_tests})
    assert all(seen == {True, False} for seen in covered.values()), covered

    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": _without_annotations(groups)}))
    # One promtool run per case, side by side: the week-long cases take a few seconds each.
    for i, test in enumerate(tests):
        document = {"rule_files": ["rules.yaml"], "evaluation_interval": "5m", "tests": [test]}
        (tmp_path / f"case{i}.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = list(pool.map(lambda i: promtool("test", "rules", f"case{i}.yaml", cwd=tmp_path), range(len(tests))))
    failures = [
        f"{test['name']}:\n{result.stdout}{result.stderr}"
        for test, result in zip(tests, results, strict=True)
        if result.returncode != 0 or "SUCCESS" not in result.stdout
    ]
    assert failures == []


def test_a_wrong_expectation_fails(groups, tmp_path):
    """The unit tests can fail: expecting the failed-run alert on a successful run does."""
    test = {
        "interval": "1m",
        "input_series": [series("saige_pipeline_last_run_success", PIPELINE_JOB, "1x20")],
        "alert_rule_test": [
            {"eval_time": "15m", "alertname": "SaigePipelineFailed", "exp_alerts": [alert(PIPELINE_JOB, "critical")]}
        ],
    }
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": _without_annotations(groups)}))
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump({"rule_files": ["rules.yaml"], "tests": [test]}))
    assert promtool("test", "rules", "tests.yaml", cwd=tmp_path).returncode != 0


def test_annotations_are_expanded(groups, tmp_path):
    """Prometheus templating in the annotations survives helm's tpl and expands as meant."""
    test = {
        "interval": "1m",
        "input_series": [
            series("saige_pipeline_last_run_success", PIPELINE_JOB, "0x20"),
            series("saige_dataset_examples", {**EXTRACT_JOB, "split": "train"}, "40x20"),
            series("saige_dataset_examples", {**EXTRACT_JOB, "split": "eval"}, "5x20"),
            series("saige_dataset_min_examples", EXTRACT_JOB, "100x20"),
            *evaluation("rejected"),
            *margin_delta("principle", "karuna", "-0.30x20", "-0.20x20", "-0.125x20"),
        ],
        "alert_rule_test": [
            {
                "eval_time": "10m",
                "alertname": "SaigeCandidateRejected",
                "exp_alerts": [
                    {
                        **alert(REJECTED),
                        "exp_annotations": {
                            "summary": "SAIGE pipeline saige: candidate run-2 was rejected; run-1 stays the champion",
                            "description": _description(groups, "SaigeCandidateRejected"),
                        },
                    }
                ],
            },
            {
                "eval_time": "10m",
                "alertname": "SaigePrincipleRegressed",
                "exp_alerts": [
                    {
                        **alert({**EVALUATE_JOB, "kind": "principle", "group": "karuna", "bound": "upper"}),
                        "exp_annotations": {
                            "summary": "SAIGE pipeline saige: the last candidate is worse on the principle karuna "
                            "(margin delta at most -0.125)",
                            "description": _description(groups, "SaigePrincipleRegressed"),
                        },
                    }
                ],
            },
            {
                "eval_time": "10m",
                "alertname": "SaigePipelineFailed",
                "exp_alerts": [
                    {
                        **alert(PIPELINE_JOB, "critical"),
                        "exp_annotations": {
                            "summary": "SAIGE pipeline saige: the last run failed",
                            "description": _description(groups, "SaigePipelineFailed"),
                        },
                    }
                ],
            },
            {
                "eval_time": "10m",
                "alertname": "SaigeDatasetBelowMinimum",
                "exp_alerts": [
                    {
                        **alert(EXTRACT_JOB),
                        "exp_annotations": {
                            "summary": "SAIGE pipeline saige: the newest dataset has only 45 examples, "
                            "below extract.min_examples",
                            "description": _description(groups, "SaigeDatasetBelowMinimum"),
                        },
                    }
                ],
            },
        ],
    }
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump({"rule_files": ["rules.yaml"], "tests": [test]}))
    result = promtool("test", "rules", "tests.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def _description(groups: list[dict[str, Any]], alertname: str) -> str:
    (rule,) = [r for g in groups for r in g["rules"] if r["alert"] == alertname]
    assert "{{" not in rule["annotations"]["description"]
    return rule["annotations"]["description"]


def test_a_textfile_collector_scrape_of_metrics_prom_matches_the_alerts(groups, demo_sqlite, tmp_path):
    """metrics.prom scraped by node-exporter's textfile collector (job "node", no grouping key)
    still carries the pipeline label: the dataset-below-minimum alert fires on it."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": PIPELINE, "extract": {"min_examples": 1_000_000}}))
    result = run_cli("extract", "-f", str(spec), "--db", demo_sqlite, "--data-root", str(tmp_path / "d"), "--json")
    assert result.exit_code == 0, result.output
    text = next((tmp_path / "d" / "datasets").glob("*/metrics.prom")).read_text()
    scraped = {"job": "node", "instance": "host:9100"}
    input_series = [
        series(sample.name, {**sample.labels, **scraped}, f"{sample.value:g}x20")
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name in {"saige_dataset_examples", "saige_dataset_min_examples"}
    ]
    assert len(input_series) == 3, input_series
    test = {
        "interval": "1m",
        "input_series": input_series,
        "alert_rule_test": [
            {
                "eval_time": "10m",
                "alertname": "SaigeDatasetBelowMinimum",
                "exp_alerts": [alert({"pipeline": PIPELINE, "job": "node"})],  # matched on (job, pipeline)
            }
        ],
    }
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": _without_annotations(groups)}))
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump({"rule_files": ["rules.yaml"], "tests": [test]}))
    result = promtool("test", "rules", "tests.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
