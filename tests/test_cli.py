"""The CLI surface: help, version, module entry point, demo-db determinism and contents."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

from tests.conftest import run_cli


def test_help_explains_every_command() -> None:
    result = run_cli("--help")
    assert result.exit_code == 0
    for command in ("demo-db", "extract", "train", "run", "submit", "status", "logs", "cancel", "render"):
        assert command in result.stdout
    extract_help = run_cli("extract", "--help").stdout
    for flag in (
        "--db",
        "--max-harm",
        "--min-buddhist",
        "--min-alignment",
        "--limit",
        "--format",
        "--csv",
        "--preset",
        "--system-prompt",
        "--eval-fraction",
        "--data-root",
        "--strict",
        "--max-deception",
        "--min-upekkha",
    ):
        assert flag in extract_help


def test_old_flag_spellings_still_work_hidden_with_a_warning(tmp_path: Path) -> None:
    """demo-db --out (now --db), extract --out (now --data-root) and --output (now --csv)."""
    for command, old in (("demo-db", "--out"), ("extract", "--out"), ("extract", "--output")):
        assert old not in run_cli(command, "--help").stdout.replace("--output-dir", "")
    made = run_cli("demo-db", "--out", tmp_path / "old.db", "--rows", 200)
    assert made.exit_code == 0 and (tmp_path / "old.db").is_file(), made.output
    assert made.stderr.strip() == "saige-k8s: warning: --out is deprecated here; use --db"
    extracted = run_cli(
        "extract", "--db", tmp_path / "old.db", "--out", tmp_path / "root", "--output", tmp_path / "x.csv", "--json"
    )
    assert extracted.exit_code == 0, extracted.output
    assert (tmp_path / "x.csv").is_file() and list((tmp_path / "root" / "datasets").iterdir())
    warnings = [line for line in extracted.stderr.splitlines() if "deprecated" in line]
    assert warnings == [
        "saige-k8s: warning: --out is deprecated here; use --data-root",
        "saige-k8s: warning: --output is deprecated here; use --csv",
    ]
    missing = run_cli("demo-db", "--rows", 5)
    assert missing.exit_code == 2 and "Missing option '--db'" in missing.stderr


def test_module_entry_point_and_version() -> None:
    out = subprocess.run([sys.executable, "-m", "saige_k8s", "--version"], capture_output=True, text=True, check=True)
    assert "saige-k8s" in out.stdout


def _digest(path: Path) -> str:
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT * FROM experiences ORDER BY id").fetchall()
    return hashlib.sha256(repr(rows).encode()).hexdigest()


def test_demo_db_is_deterministic_per_seed(tmp_path: Path) -> None:
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        assert run_cli("demo-db", "--db", tmp_path / f"{name}.db", "--rows", 500, "--seed", seed).exit_code == 0
    assert _digest(tmp_path / "a.db") == _digest(tmp_path / "b.db") != _digest(tmp_path / "c.db")


def test_demo_db_is_realistic(tmp_path: Path) -> None:
    db = tmp_path / "demo.db"
    run_cli("demo-db", "--db", db, "--rows", 20_000, "--seed", 5)
    with sqlite3.connect(db) as conn:
        q = lambda sql: conn.execute(sql).fetchall()  # noqa: E731
        labels = dict(q("SELECT buddhist_alignment, COUNT(*) FROM experiences GROUP BY 1"))
        assert {"excellent", "good", "moderate", "poor", "harmful"} <= set(labels)
        assert 0 < labels.get("great", 0) < 200  # a few unknown labels
        # Harm and virtue move together: better-aligned answers are less harmful.
        harm = dict(
            q(
                "SELECT buddhist_alignment, AVG(actual_harm) FROM experiences WHERE actual_harm BETWEEN 0 AND 1 "
                "GROUP BY 1"
            )
        )
        assert harm["excellent"] < harm["good"] < harm["moderate"] < harm["poor"] < harm["harmful"]
        lengths = q(
            "SELECT MIN(LENGTH(response)), AVG(LENGTH(response)), MAX(LENGTH(response)) FROM experiences "
            "WHERE response <> ''"
        )[0]
        assert lengths[0] < 40 and 400 < lengths[1] < 800 and lengths[2] > 3000
        contexts = q(
            "SELECT SUM(context LIKE '{%'), SUM(context NOT LIKE '{%'), SUM(context IS NULL) FROM experiences"
        )[0]
        assert all(c > 1000 for c in contexts)
        nulls = q("SELECT SUM(deception IS NULL), SUM(buddhist_weighted_score IS NULL) FROM experiences")[0]
        assert all(n > 500 for n in nulls)
        malformed = q("SELECT COUNT(*) FROM experiences WHERE NOT json_valid(buddhist_scores)")[0][0]
        assert 0 < malformed < 200
        json.loads(q("SELECT buddhist_scores FROM experiences WHERE json_valid(buddhist_scores) LIMIT 1")[0][0])


def test_demo_db_bad_target(tmp_path: Path) -> None:
    result = run_cli("demo-db", "--db", tmp_path / "missing-dir" / "x.db")
    assert result.exit_code == 2 and "does not exist" in result.stderr


def test_a_pod_rerun_reports_the_published_dataset_and_leaves_a_summary(tmp_path: Path, demo_sqlite: str) -> None:
    """What a retried extract pod does: same dataset id, no failure, the summary in its termination log."""
    root, summary = tmp_path / "root", tmp_path / "termination-log"
    args = ("extract", "--db", demo_sqlite, "--data-root", root, "--dataset-id", "run-1", "--json")
    first = run_cli(*args, "--summary-file", summary)
    assert first.exit_code == 0, first.stderr
    written = json.loads(summary.read_text())
    assert written == json.loads(first.stdout.strip().splitlines()[-1])
    assert written["dataset_id"] == "run-1" and written["kept"] > 0
    summary.unlink()
    again = run_cli(*args, "--reuse-existing", "--summary-file", summary)
    assert again.exit_code == 0, again.stderr
    assert json.loads(summary.read_text()) == written
    refused = run_cli(*args)
    assert refused.exit_code == 2
    assert "already exists" in refused.stderr


def test_demo_db_if_missing_keeps_an_existing_database(tmp_path: Path) -> None:
    target = tmp_path / "demo.db"
    assert run_cli("demo-db", "--db", target, "--rows", "20", "--if-missing").exit_code == 0
    before = hashlib.sha256(target.read_bytes()).hexdigest()
    result = run_cli("demo-db", "--db", target, "--rows", "50", "--seed", "3", "--if-missing")
    assert result.exit_code == 0
    assert "left as it is" in result.stdout
    assert hashlib.sha256(target.read_bytes()).hexdigest() == before


def test_run_starts_with_the_collect_step_and_stops_when_it_fails(tmp_path: Path, demo_sqlite: str) -> None:
    """The seed's first step (trainer.js episodes): a subprocess here, with the spec's env."""
    marker = tmp_path / "collected"
    collect = f"import os, pathlib; pathlib.Path({str(marker)!r}).write_text(os.environ['TRAINING_EPISODES'])"
    spec = {
        "name": "collect-test",
        "source": {"url": demo_sqlite},
        "extract": {"min_examples": 10**6},
        "collect": {
            "image": "unused-locally",
            "command": [sys.executable, "-c", collect],
            "env": {"TRAINING_EPISODES": "7"},
        },
    }
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(json.dumps(spec))

    def run(root: Path) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "saige_k8s", "run", "-f", spec_path, "--data-root", root]
        return subprocess.run(command, capture_output=True, text=True, check=False)

    result = run(tmp_path / "root")
    assert marker.read_text() == "7"  # collect ran first, with its env
    assert result.returncode == 2  # then extract ran and the dataset was too small to train on
    assert "below extract.min_examples" in result.stderr
    spec["collect"]["command"] = [sys.executable, "-c", "raise SystemExit(3)"]
    spec_path.write_text(json.dumps(spec))
    failed = run(tmp_path / "root2")
    assert failed.returncode == 1
    assert "step collect failed with exit code 3" in failed.stderr
    assert not (tmp_path / "root2" / "datasets").exists()
