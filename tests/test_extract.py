"""Extraction end to end on real SQLite and PostgreSQL, checked against an independent oracle.

The oracle re-reads the source table row by row in plain Python and applies the rules as
documented (README "Funnel"): its verdict for every row must match the
manifest's counts, and its kept rows must be exactly the dataset's rows.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa

from saige_k8s.dataset.formats import DEFAULT_SYSTEM_PROMPT, FORMATS, render, user_turn
from saige_k8s.experiences.filters import Filters
from saige_k8s.experiences.schema import ALIGNMENT_LEVELS, HARM_COMPONENTS, PRINCIPLES, alignments_at_least
from tests.conftest import DEMO_ROWS, run_cli


def _blank(value: str | None) -> bool:
    return value is None or value.strip(" ") == ""


def oracle(url: str, filters: Filters, fmt: str) -> tuple[Counter, list[dict]]:
    """(verdict counts, kept rows in id order) by the documented rules, one row at a time."""
    if "://" not in url:
        url = f"sqlite:///{url}"
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(sa.text("SELECT * FROM experiences ORDER BY id"))]
    engine.dispose()
    weights = np.array([filters.weights()[p] for p in PRINCIPLES])
    verdicts: Counter = Counter()
    kept: list[dict] = []
    seen: set[str] = set()
    for row in rows:
        verdict, principles, weighted = _judge(row, filters, weights)
        if verdict == "kept":
            prompt, completion = render(
                FORMATS[fmt], DEFAULT_SYSTEM_PROMPT, row["user_message"], row["context"], row["response"]
            )
            if prompt + completion in seen:
                verdict = "duplicates"
            else:
                seen.add(prompt + completion)
                kept.append({**row, "text": prompt + completion, "weighted": weighted, **principles})
        verdicts[verdict] += 1
    return verdicts, kept


def _judge(row: dict, filters: Filters, weights: np.ndarray) -> tuple[str, dict, float | None]:
    harm = row["actual_harm"]
    label = (row["buddhist_alignment"] or "").strip(" ").lower() if row["buddhist_alignment"] is not None else None
    stored = row["buddhist_weighted_score"]
    components = [row[c] for c in HARM_COMPONENTS]
    checks = [
        ("invalid:empty_user_message", _blank(row["user_message"])),
        ("invalid:empty_response", _blank(row["response"])),
        ("invalid:missing_harm", harm is None),
        ("invalid:harm_out_of_range", harm is not None and not 0 <= harm <= 1),
        ("invalid:component_out_of_range", any(c is not None and not 0 <= c <= 1 for c in components)),
        ("invalid:unknown_alignment", label not in ALIGNMENT_LEVELS),
        ("invalid:weighted_score_out_of_range", stored is not None and not 0 <= stored <= 10),
        ("filter:max_harm", harm is not None and harm >= filters.max_harm),
        *((f"filter:max_{c}", row[c] is not None and row[c] >= v) for c, v in filters.component_maxima().items()),
        ("filter:min_alignment", label not in alignments_at_least(filters.min_alignment)),
        ("filter:min_buddhist", stored is not None and stored < filters.min_buddhist),
    ]
    for verdict, failed in checks:
        if failed:
            return verdict, {}, None
    try:
        scores = json.loads(row["buddhist_scores"]) if row["buddhist_scores"] is not None else None
    except ValueError:
        scores = None
    if not isinstance(scores, dict):
        return "invalid:malformed_scores_json", {}, None
    values = {p: scores.get(p) for p in PRINCIPLES}
    if any(not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v) for v in values.values()):
        return "invalid:missing_principle_score", {}, None
    if any(not 0 <= v <= 10 for v in values.values()):
        return "invalid:principle_out_of_range", {}, None
    vector = np.array([values[p] for p in PRINCIPLES], dtype=float)
    weighted = stored if stored is not None else float(vector @ (weights / weights.sum()))
    if weighted < filters.min_buddhist:
        return "filter:min_buddhist", {}, None
    for p, minimum in filters.principle_minima().items():
        if values[p] < minimum:
            return f"filter:min_{p}", {}, None
    return "kept", values, weighted


def _extract(db: str, out: Path, *args: str) -> dict:
    result = run_cli("extract", "--db", db, "--data-root", out, "--json", *args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    path = out / "datasets" / summary["dataset_id"]
    return json.loads((path / "manifest.json").read_text()) | {"_path": str(path)}


def _rows(manifest: dict) -> list[dict]:
    path = Path(manifest["_path"])
    rows = pq.read_table(path / "train.parquet").to_pylist()
    if (path / "eval.parquet").exists():
        rows += pq.read_table(path / "eval.parquet").to_pylist()
    return sorted(rows, key=lambda r: int(r["id"]))


@pytest.mark.parametrize("fmt", ["tinyllama", "mistral", "llama3"])
def test_dataset_matches_oracle(demo_db: str, tmp_path: Path, fmt: str) -> None:
    manifest = _extract(demo_db, tmp_path, "--format", fmt)
    verdicts, kept = oracle(demo_db, Filters(), fmt)
    rows = _rows(manifest)

    assert [r["id"] for r in rows] == [str(k["id"]) for k in kept]
    assert [r["text"] for r in rows] == [k["text"] for k in kept]  # byte for byte
    for row, expected in zip(rows, kept, strict=True):
        assert row["format"] == fmt
        assert row["actual_harm"] == pytest.approx(expected["actual_harm"])
        assert row["buddhist_weighted_score"] == pytest.approx(expected["weighted"])
        assert row["karuna"] == pytest.approx(expected["karuna"])
        roles = [m["role"] for m in row["messages"]]
        assert roles == (["user", "assistant"] if fmt == "mistral" else ["system", "user", "assistant"])
        assert row["messages"][-2]["content"] == user_turn(expected["user_message"], expected["context"], FORMATS[fmt])
        assert row["messages"][-1]["content"] == expected["response"]

    counts = manifest["counts"]
    invalid = {k.split(":", 1)[1]: v for k, v in verdicts.items() if k.startswith("invalid:")}
    removed = {k.split(":", 1)[1]: v for k, v in verdicts.items() if k.startswith("filter:")}
    assert {k: v for k, v in manifest["invalid"].items() if v} == invalid
    assert {k: v for k, v in manifest["removed"].items() if v} == removed
    assert counts["duplicates"] == verdicts["duplicates"] > 0
    assert counts["kept"] == verdicts["kept"] == len(rows)
    # The manifest adds up: every scanned row is kept or removed for exactly one reason.
    assert counts["scanned"] == accounted_rows(manifest)
    assert counts["scanned"] == sum(verdicts.values())
    assert manifest["funnel"][-1]["remaining"] == counts["kept"]
    stats = manifest["stats"]
    assert stats["actual_harm"]["max"] < 0.3
    assert stats["buddhist_weighted_score"]["min"] >= 6.0
    assert stats["actual_harm"]["avg"] == pytest.approx(np.mean([k["actual_harm"] for k in kept]))
    assert set(r["buddhist_alignment"] for r in rows) <= {"good", "excellent"}
    assert stats["alignment"]["excellent"] == sum(r["buddhist_alignment"] == "excellent" for r in rows)


def test_loads_with_hugging_face_datasets(demo_sqlite: str, tmp_path: Path) -> None:
    import datasets

    manifest = _extract(demo_sqlite, tmp_path, "--format", "llama3", "--eval-fraction", "0.2")
    path = Path(manifest["_path"])
    loaded = datasets.load_dataset(
        "parquet",
        data_files={"train": str(path / "train.parquet"), "eval": str(path / "eval.parquet")},
        cache_dir=str(tmp_path / "hf-cache"),
    )
    assert loaded["train"].num_rows == manifest["counts"]["train"]
    assert loaded["eval"].num_rows == manifest["counts"]["eval"] > 0
    first = loaded["train"][0]
    assert first["messages"][0]["role"] == "system"
    assert first["text"].startswith("<|begin_of_text|>")


def test_split_is_deterministic_by_prompt(demo_sqlite: str, tmp_path: Path) -> None:
    one = _extract(demo_sqlite, tmp_path / "a", "--eval-fraction", "0.25")
    two = _extract(demo_sqlite, tmp_path / "b", "--eval-fraction", "0.25")
    eval_one = {r["id"] for r in pq.read_table(Path(one["_path"]) / "eval.parquet").to_pylist()}
    eval_two = {r["id"] for r in pq.read_table(Path(two["_path"]) / "eval.parquet").to_pylist()}
    assert eval_one == eval_two
    share = one["counts"]["eval"] / one["counts"]["kept"]
    assert 0.18 < share < 0.32


def test_thresholds_and_limit(demo_db: str, tmp_path: Path) -> None:
    filters = Filters.from_preset("elite", max_deception=0.15, min_karuna=8.0)
    manifest = _extract(demo_db, tmp_path / "all", "--preset", "elite", "--max-deception", "0.15", "--min-karuna", "8")
    verdicts, kept = oracle(demo_db, filters, "tinyllama")
    assert manifest["counts"]["kept"] == len(kept) > 10
    assert manifest["removed"]["max_deception"] == verdicts["filter:max_deception"] > 0
    assert manifest["removed"]["min_karuna"] == verdicts["filter:min_karuna"] > 0
    assert {r["buddhist_alignment"] for r in _rows(manifest)} == {"excellent"}

    limited = _extract(
        demo_db,
        tmp_path / "limited",
        "--preset",
        "elite",
        "--max-deception",
        "0.15",
        "--min-karuna",
        "8",
        "--limit",
        "7",
    )
    counts = limited["counts"]
    assert counts["kept"] == 7
    assert [r["id"] for r in _rows(limited)] == [str(k["id"]) for k in kept[:7]]
    assert counts["scanned"] == accounted_rows(limited)


def test_generic_sqlalchemy_fetch_gives_the_same_dataset(demo_sqlite: str, tmp_path: Path) -> None:
    from saige_k8s.dataset.extract import ExtractRequest, extract

    fast = extract(ExtractRequest(db=demo_sqlite, data_root=tmp_path / "a", dataset_id="x"))
    generic = extract(ExtractRequest(db=demo_sqlite, data_root=tmp_path / "b", dataset_id="x", adbc=False))
    assert fast.manifest["counts"] == generic.manifest["counts"]
    assert pq.read_table(fast.path / "train.parquet").equals(pq.read_table(generic.path / "train.parquet"))


def test_csv_output_for_seed_users(demo_sqlite: str, tmp_path: Path) -> None:
    import csv

    manifest = _extract(demo_sqlite, tmp_path, "--output", tmp_path / "training.csv", "--format", "mistral")
    with open(tmp_path / "training.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == manifest["counts"]["kept"]
    assert rows[0]["text"].startswith("<s>[INST] ")
    assert set(rows[0]) >= {"id", "text", "actual_harm", "buddhist_weighted_score", "buddhist_alignment"}


def test_human_report_has_the_seed_statistics(demo_sqlite: str, tmp_path: Path) -> None:
    result = run_cli("extract", "--db", demo_sqlite, "--data-root", tmp_path)
    assert result.exit_code == 0
    out = result.stdout
    assert "high-quality experiences" in out
    assert "Harm Score: avg=" in out and "Buddhist Score: avg=" in out
    assert "% excellent" in out and "% good" in out
    assert "max_harm" in out and "duplicates" in out
    assert (tmp_path / "datasets" / "LATEST").read_text().strip() in out


def accounted_rows(manifest: dict) -> int:
    """Kept + every invalid reason + every filter's removals + duplicates + beyond the limit."""
    counts = manifest["counts"]
    removed = sum(manifest["invalid"].values()) + sum(manifest["removed"].values())
    return counts["kept"] + removed + counts["duplicates"] + counts["beyond_limit"]


def test_the_progress_total_is_the_databases_own_row_estimate(demo_db: str) -> None:
    from saige_k8s.experiences.source import open_source, resolve_url

    url = resolve_url(demo_db)
    if url.get_backend_name() == "postgresql":
        engine = sa.create_engine(url)
        with engine.begin() as conn:
            conn.execute(sa.text("ANALYZE experiences"))  # reltuples is what the last ANALYZE counted
        engine.dispose()
    assert open_source(url, "experiences", {}).estimated_rows == DEMO_ROWS


def test_a_table_without_rowids_has_no_progress_total(tmp_path: Path) -> None:
    from saige_k8s.experiences.source import estimate_rows

    engine = sa.create_engine(f"sqlite:///{tmp_path / 'tables.db'}")
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE no_rowid (id INTEGER PRIMARY KEY, user_message TEXT) WITHOUT ROWID"))
        conn.execute(sa.text("CREATE TABLE sparse (id INTEGER PRIMARY KEY, user_message TEXT)"))
        conn.execute(sa.text("INSERT INTO sparse VALUES (5, 'a'), (9, 'b')"))
        conn.execute(sa.text("CREATE TABLE empty (id INTEGER PRIMARY KEY)"))
    with engine.connect() as conn:
        tables = {name: sa.Table(name, sa.MetaData(), autoload_with=conn) for name in ("no_rowid", "sparse", "empty")}
        assert estimate_rows(conn, tables["no_rowid"]) is None
    with engine.connect() as conn:
        assert estimate_rows(conn, tables["sparse"]) == 5  # the rowids' span: an estimate, never a scan
        assert estimate_rows(conn, tables["empty"]) is None
    engine.dispose()


def test_extract_on_a_terminal_shows_scanned_rows_against_a_total(demo_sqlite: str, tmp_path: Path) -> None:
    """A pseudo-terminal with a width, as a user's shell: the bar counts scanned rows of the table's estimate."""
    import fcntl
    import os
    import struct
    import subprocess
    import sys
    import termios

    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    command = [sys.executable, "-m", "saige_k8s", "extract", "--db", demo_sqlite, "--data-root", tmp_path / "out"]
    env = {key: value for key, value in os.environ.items() if key != "TQDM_DISABLE"}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=slave, env=env)
    os.close(slave)
    drawn = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the terminal's other end closed: the command has exited
            break
        if not chunk:
            break
        drawn += chunk
    os.close(master)
    assert process.wait(timeout=120) == 0
    text = drawn.decode("utf-8", "replace")
    assert re.search(r"rows: +\d+%\|.*\| [\d.]+k?/4\.00k \[", text), text[-2000:]  # a percentage of the total
    assert "4.00k/4.00k" in text  # every scanned row is counted, not only the candidates (fewer)
