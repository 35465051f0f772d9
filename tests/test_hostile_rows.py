"""One hostile row never aborts an extraction: it is counted as unusable and never published.

Real SQLite files (any bytes fit in any column there) and, where the types allow, a real
PostgreSQL (``bytea`` columns); a property-based test throws random rows at every column.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from saige_k8s.dataset.curate import parse_scores
from saige_k8s.dataset.extract import ExtractRequest, extract
from saige_k8s.dataset.formats import DEFAULT_SYSTEM_PROMPT, FORMATS, render, render_columns
from saige_k8s.errors import NoExamplesError
from saige_k8s.experiences import source
from saige_k8s.experiences.demo import DemoOptions, create_database
from saige_k8s.experiences.filters import INVALID_REASONS
from saige_k8s.experiences.schema import COLUMNS, HARM_COMPONENTS, PRINCIPLES
from tests.conftest import run_cli
from tests.test_extract import accounted_rows

SCORES = {"ahimsa": 8, "sacca": 8, "karuna": 8, "panna": 8, "upekkha": 8}
DEEP = "[" * 2000


def _identity(manifest: dict) -> None:
    counts = manifest["counts"]
    assert counts["scanned"] == accounted_rows(manifest)
    assert counts["invalid_total"] == sum(manifest["invalid"].values())
    assert counts["kept"] == counts["train"] + counts["eval"]


def _published(root: Path) -> list[Path]:
    datasets = root / "datasets"
    return sorted(p for p in datasets.iterdir() if p.is_dir()) if datasets.exists() else []


def _read_back(path: Path) -> list[dict]:
    rows = []
    for name in ("train.parquet", "eval.parquet"):
        if (path / name).exists():
            rows += pq.read_table(path / name).to_pylist()  # raises on bytes that are not UTF-8
    return rows


def _extract(db: Path | str, out: Path, *args: str) -> tuple[dict, list[dict]]:
    result = run_cli("extract", "--db", db, "--data-root", out, "--json", *args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    path = out / "datasets" / summary["dataset_id"]
    manifest = json.loads((path / "manifest.json").read_text())
    rows = _read_back(path)
    assert len(rows) == manifest["counts"]["kept"]
    return manifest, rows


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, list[str]]:
    """A 300-row demo database, its clean extraction, and the ids that extraction kept."""
    root = tmp_path_factory.mktemp("hostile")
    db = root / "clean.db"
    create_database(str(db), DemoOptions(rows=300, seed=0))
    manifest, rows = _extract(db, root / "out")
    return db, manifest, [r["id"] for r in rows]


#: (column, SQL value expression, reason the row is counted under)
HOSTILE = [
    ("user_message", "X'C328'", "invalid_utf8_user_message"),  # a BLOB that is not UTF-8
    ("response", "X'41C328'", "invalid_utf8_response"),
    ("context", "X'C328'", "invalid_utf8_context"),
    ("buddhist_scores", "X'7BC3'", "malformed_scores_json"),
    ("user_message", "CAST(X'C328' AS TEXT)", "invalid_utf8_user_message"),  # TEXT that is not UTF-8
    ("response", "CAST(X'48C3A9FF' AS TEXT)", "invalid_utf8_response"),
    ("context", "CAST(X'FE' AS TEXT)", "invalid_utf8_context"),
    ("difficulty", "CAST(X'C328' AS TEXT)", "invalid_utf8_difficulty"),
    (
        "buddhist_scores",
        """'{"ahimsa": 7, "ahimsa": 8, "sacca": 8, "karuna": 8, "panna": 8, "upekkha": 8}'""",
        "malformed_scores_json",
    ),
    (
        "buddhist_scores",
        """'{"ahimsa": 1e999, "sacca": 8, "karuna": 8, "panna": 8, "upekkha": 8}'""",
        "missing_principle_score",
    ),
    (
        "buddhist_scores",
        """'{"ahimsa": 1""" + "0" * 400 + """, "sacca": 8, "karuna": 8, "panna": 8, "upekkha": 8}'""",
        "missing_principle_score",
    ),
    ("buddhist_scores", f"'{DEEP}'", "malformed_scores_json"),
    (
        "buddhist_scores",
        """'{"ahimsa": 8, "sacca": 8, "karuna": 8, "panna": 8, "upekkha": 8, "notes": """ + DEEP + "'",
        "malformed_scores_json",
    ),
    ("context", """'{"a": """ + DEEP + "'", "context_json_too_deep"),
    ("context", '\'{"a": ' + "[" * 65 + "]" * 65 + "}'", "context_json_too_deep"),
    ("response", "char(9, 10)", "empty_response"),  # whitespace-only, not spaces
    ("user_message", "char(12288, 10, 13)", "empty_user_message"),  # U+3000 ideographic space
    ("response", "X''", "empty_response"),  # an empty BLOB
]


@pytest.mark.parametrize(
    ("column", "value", "reason"), HOSTILE, ids=[f"{c}-{r}-{i}" for i, (c, _, r) in enumerate(HOSTILE)]
)
def test_one_hostile_row_is_counted_not_fatal(
    clean: tuple[Path, dict, list[str]], tmp_path: Path, column: str, value: str, reason: str
) -> None:
    db, before, kept_ids = clean
    victim = kept_ids[1]
    hostile = tmp_path / "hostile.db"
    shutil.copy(db, hostile)
    with sqlite3.connect(hostile) as conn:
        conn.execute(f"UPDATE experiences SET {column} = {value} WHERE id = ?", (int(victim),))

    manifest, rows = _extract(hostile, tmp_path / "out")
    _identity(manifest)
    assert victim not in {r["id"] for r in rows}
    assert manifest["invalid"][reason] == before["invalid"][reason] + 1
    assert manifest["counts"]["invalid_total"] == before["counts"]["invalid_total"] + 1
    assert manifest["counts"]["kept"] + manifest["counts"]["duplicates"] == (
        before["counts"]["kept"] + before["counts"]["duplicates"] - 1
    )
    assert list(manifest["invalid"]) == list(INVALID_REASONS)

    # The generic SQLAlchemy fetch counts the same.
    generic = extract(ExtractRequest(db=str(hostile), data_root=tmp_path / "generic", adbc=False))
    same = ("scanned", "kept", "duplicates", "invalid_total", "removed_total")
    assert {k: generic.manifest["counts"][k] for k in same} == {k: manifest["counts"][k] for k in same}
    assert generic.manifest["invalid"] == manifest["invalid"]
    assert len(_read_back(generic.path)) == manifest["counts"]["kept"]

    # --strict: the first such row is an error (one line, exit 2), naming it.
    result = run_cli("extract", "--db", hostile, "--data-root", tmp_path / "strict", "--strict")
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output
    assert f"{manifest['counts']['invalid_total']} unusable row(s)" in result.stderr
    assert _published(tmp_path / "strict") == []


def test_utf8_blob_is_read_as_its_text_and_bad_timestamps_become_null(
    clean: tuple[Path, dict, list[str]], tmp_path: Path
) -> None:
    db, before, kept_ids = clean
    hostile = tmp_path / "hostile.db"
    shutil.copy(db, hostile)
    with sqlite3.connect(hostile) as conn:
        conn.execute("UPDATE experiences SET response = CAST(? AS BLOB) WHERE id = ?", ("  Héllo.\n", int(kept_ids[0])))
        conn.execute("UPDATE experiences SET created_at = X'C328' WHERE id = ?", (int(kept_ids[1]),))
    manifest, rows = _extract(hostile, tmp_path / "out")
    _identity(manifest)
    by_id = {r["id"]: r for r in rows}
    assert by_id[kept_ids[0]]["messages"][-1]["content"] == "Héllo."  # trimmed
    assert by_id[kept_ids[0]]["text"].endswith("Héllo.</s>")
    assert by_id[kept_ids[1]]["created_at"] is None
    assert manifest["counts"]["kept"] == before["counts"]["kept"]


def test_json_context_with_a_lone_surrogate_is_free_text(clean: tuple[Path, dict, list[str]], tmp_path: Path) -> None:
    db, before, kept_ids = clean
    hostile = tmp_path / "hostile.db"
    shutil.copy(db, hostile)
    context = '{"emotional_state": "\\ud800", "x\\udc00": 1}'
    with sqlite3.connect(hostile) as conn:
        conn.execute("UPDATE experiences SET context = ? WHERE id = ?", (context, int(kept_ids[0])))
    manifest, rows = _extract(hostile, tmp_path / "out")
    assert manifest["counts"]["kept"] == before["counts"]["kept"]
    row = next(r for r in rows if r["id"] == kept_ids[0])
    assert row["messages"][-2]["content"].endswith(f"[Context: {context}]")


def test_texts_are_trimmed_of_all_whitespace(clean: tuple[Path, dict, list[str]], tmp_path: Path) -> None:
    db, _, kept_ids = clean
    hostile = tmp_path / "hostile.db"
    shutil.copy(db, hostile)
    with sqlite3.connect(hostile) as conn:
        conn.execute(
            "UPDATE experiences SET user_message = ?, response = ? WHERE id = ?",
            ("\t\n How are you?\u3000\r\n", "\n\nFine, thanks.\t \n", int(kept_ids[0])),
        )
    _, rows = _extract(hostile, tmp_path / "out", "--format", "llama3")
    row = next(r for r in rows if r["id"] == kept_ids[0])
    assert row["messages"][1]["content"].startswith("How are you?")
    assert row["messages"][2]["content"] == "Fine, thanks."
    assert "<|end_header_id|>\n\nHow are you?" in row["text"]
    assert row["text"].endswith("<|end_header_id|>\n\nFine, thanks.<|eot_id|>")


@pytest.mark.parametrize("adbc", [True, False])
def test_text_ids_that_are_null_or_not_utf8(tmp_path: Path, adbc: bool) -> None:
    db = tmp_path / "text-ids.db"
    with sqlite3.connect(db) as conn:
        conn.execute(
            "CREATE TABLE experiences (id TEXT PRIMARY KEY, user_message TEXT, response TEXT, actual_harm REAL, "
            "buddhist_scores TEXT, buddhist_alignment TEXT)"
        )
        for i, row_id in enumerate(["a", None, b"\xc3\x28", b"bc", 5, None, "d"]):
            conn.execute(
                "INSERT INTO experiences VALUES (?, ?, ?, 0.1, ?, 'good')",
                (row_id, f"q{i}", f"r{i}", json.dumps(SCORES)),
            )
        conn.execute(
            "INSERT INTO experiences VALUES (CAST(X'FF' AS TEXT), 'q', 'r', 0.1, ?, 'good')", (json.dumps(SCORES),)
        )
    result = extract(ExtractRequest(db=str(db), data_root=tmp_path / "out", eval_fraction=0.5, adbc=adbc))
    manifest = result.manifest
    _identity(manifest)
    assert {k: v for k, v in manifest["invalid"].items() if v} == {"missing_id": 2, "invalid_utf8_id": 2}
    assert sorted(r["id"] for r in _read_back(result.path)) == ["5", "a", "bc", "d"]


@pytest.mark.parametrize("name", list(FORMATS))
def test_every_format_trims_user_and_response(name: str) -> None:
    fmt = FORMATS[name]
    padded = "".join(render(fmt, DEFAULT_SYSTEM_PROMPT, "\u2003\t hi \n", None, "\r\n ok \x0b"))
    assert padded == "".join(render(fmt, DEFAULT_SYSTEM_PROMPT, "hi", None, "ok"))
    users = ["\t\nquestion\u00a0", "plain", " \u3000x\u2029"]
    responses = ["\n answer \t", "\u205fy", "z"]
    contexts = [None, "  free text \n", '{"emotional_state": "calm"}']
    _, texts = render_columns(
        fmt, DEFAULT_SYSTEM_PROMPT, pa.array(users), pa.array(contexts, pa.string()), pa.array(responses)
    )
    expected = [
        "".join(render(fmt, DEFAULT_SYSTEM_PROMPT, u, c, r)) for u, c, r in zip(users, contexts, responses, strict=True)
    ]
    assert texts.to_pylist() == expected
    assert "\t" not in texts[0].as_py() and "\u3000" not in texts[2].as_py()


@pytest.mark.parametrize(
    ("text", "values", "malformed"),
    [
        ('{"ahimsa": 7, "ahimsa": 8, "sacca": 8, "karuna": 6, "panna": 9, "upekkha": 7}', [math.nan] * 5, True),
        ('{"ahimsa": 7, "sacca": 8, "karuna": 6, "panna": 9, "upekkha": 7, "x": 1, "x": 2}', [7, 8, 6, 9, 7], False),
        ('{"ahimsa": 1e999, "sacca": 8, "karuna": 6, "panna": 9, "upekkha": 7}', [math.nan, 8, 6, 9, 7], False),
        ('{"ahimsa": 7, "sacca": 8, "karuna": 6, "panna": 9, "upekkha": 7, "x": 1e999}', [7, 8, 6, 9, 7], False),
        (
            '{"ahimsa": 1' + "0" * 400 + ', "sacca": 8, "karuna": 6, "panna": 9, "upekkha": 7}',
            [math.nan, 8, 6, 9, 7],
            False,
        ),
        (DEEP, [math.nan] * 5, True),
        ('{"ahimsa": 7, "sacca": 8, "karuna": 6, "panna": 9, "upekkha": 7, "n": ' + DEEP, [math.nan] * 5, True),
    ],
)
def test_parse_scores_isolates_what_the_bulk_reader_rejects(text: str, values: list[float], malformed: bool) -> None:
    good = '{"ahimsa": 1, "sacca": 2, "karuna": 3, "panna": 4, "upekkha": 5}'
    column = pa.array([good] * 40 + [text] + [good] * 40, pa.string())
    parsed, bad = parse_scores(column)
    np.testing.assert_allclose(parsed[40], values)
    assert bad.tolist() == [False] * 40 + [malformed] + [False] * 40
    np.testing.assert_allclose(np.delete(parsed, 40, axis=0), np.tile([1, 2, 3, 4, 5], (80, 1)))


def test_strict_reports_the_true_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "demo.db"
    create_database(str(db), DemoOptions(rows=1500, seed=3, defect_share=0.05))
    with sqlite3.connect(db) as conn:  # unusable rows the Arrow stage finds, in several batches
        conn.execute("UPDATE experiences SET response = char(10) || char(9) WHERE id % 97 = 0")
        conn.execute("UPDATE experiences SET buddhist_scores = '[]' WHERE id % 89 = 0")
    monkeypatch.setattr(source, "_BATCH_ROWS", 64)
    manifest, _ = _extract(db, tmp_path / "out")
    total = manifest["counts"]["invalid_total"]
    assert manifest["invalid"]["empty_response"] > 0 and manifest["invalid"]["malformed_scores_json"] > 0
    assert total > 30
    result = run_cli("extract", "--db", db, "--data-root", tmp_path / "strict", "--strict")
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert f"--strict: {total} unusable row(s)" in line, line
    assert "first: id " in line and _published(tmp_path / "strict") == []


@pytest.mark.postgres
def test_postgres_bytea_columns(demo_postgres: str, tmp_path: Path) -> None:
    """BLOBs are ``bytea`` there: UTF-8 bytes read as text, other bytes counted."""
    engine = sa.create_engine(demo_postgres)
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE IF EXISTS hostile"))
        conn.execute(sa.text("CREATE TABLE hostile AS SELECT * FROM experiences"))
        for column in ("user_message", "context", "response", "buddhist_scores"):
            conn.execute(
                sa.text(f"ALTER TABLE hostile ALTER COLUMN {column} TYPE bytea USING convert_to({column}, 'UTF8')")
            )
        kept = conn.execute(
            sa.text(
                "SELECT id FROM experiences WHERE actual_harm < 0.2 AND buddhist_alignment = 'excellent' "
                "AND buddhist_weighted_score > 7 ORDER BY id LIMIT 6"
            )
        ).scalars()
        ids = list(kept)
        hostile = [
            ("user_message", "'\\xc328'::bytea"),
            ("context", "'\\xfe'::bytea"),
            ("response", "'\\x41c328'::bytea"),
            ("buddhist_scores", "'\\x7bc3'::bytea"),
            ("response", "convert_to(E'\\t\\n', 'UTF8')"),
            ("buddhist_scores", "convert_to('{\"ahimsa\": 7, \"ahimsa\": 8}', 'UTF8')"),
        ]
        for row_id, (column, value) in zip(ids, hostile, strict=True):
            conn.execute(sa.text(f"UPDATE hostile SET {column} = {value} WHERE id = :id"), {"id": row_id})
    engine.dispose()
    plain, _ = _extract(demo_postgres, tmp_path / "plain")
    manifest, rows = _extract(demo_postgres, tmp_path / "bytea", "--table", "hostile")
    _identity(manifest)
    assert not {str(i) for i in ids} & {r["id"] for r in rows}
    delta = {k: manifest["invalid"][k] - plain["invalid"].get(k, 0) for k in manifest["invalid"]}
    assert {k: v for k, v in delta.items() if v} == {
        "invalid_utf8_user_message": 1,
        "invalid_utf8_context": 1,
        "invalid_utf8_response": 1,
        "empty_response": 1,
        "malformed_scores_json": 2,
    }
    assert manifest["counts"]["kept"] + manifest["counts"]["duplicates"] == (
        plain["counts"]["kept"] + plain["counts"]["duplicates"] - 6
    )


# --- Property: random rows in every column ------------------------------------------------

_COLUMNS = tuple(c for c in COLUMNS if c != "id")
_BASE = {
    "created_at": "2026-03-01 10:00:00",
    "user_message": "How do I deal with stress?",
    "context": '{"emotional_state": "anxious", "vulnerability": "high"}',
    "response": "Take a slow breath and start small.",
    "model": "m",
    "difficulty": "easy",
    **dict.fromkeys(HARM_COMPONENTS, 0.05),
    "actual_harm": 0.1,
    "buddhist_scores": json.dumps(SCORES),
    "buddhist_weighted_score": None,
    "buddhist_alignment": "good",
}

_texts = st.text(st.characters(codec="utf-8"), max_size=20) | st.sampled_from(
    ["", " ", "\t\n", "\u3000", " \u00a0x\u2029 ", "good", " GOOD ", "Excellent", "great", "{}", "null"]
)
_numbers = (
    st.floats(allow_nan=True, allow_infinity=True)
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.sampled_from([0, 0.1, 1, 1.5, -0.2, 10, 11, 1e308])
)
_json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from([*PRINCIPLES, "x"]), inner, max_size=6),
    max_leaves=12,
)


@st.composite
def _json_texts(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["scores", "random", "garbled", "deep", "duplicate", "huge", "surrogate"]))
    scores = {p: draw(st.floats(-1, 12) | st.integers(-1, 12) | st.sampled_from([None, "7", True])) for p in PRINCIPLES}
    if kind == "scores":
        return json.dumps({k: v for k, v in scores.items() if draw(st.booleans()) or k != "sacca"})
    if kind == "random":
        return json.dumps(draw(_json_values))
    if kind == "garbled":
        text = json.dumps(scores)
        cut = draw(st.integers(0, len(text)))
        return text[:cut] + draw(st.sampled_from(["", "}", ",", "\n", '"x":', "]"]))
    if kind == "deep":
        depth = draw(st.integers(60, 2500))
        return (
            draw(st.sampled_from(['{"a": ', json.dumps(SCORES)[:-1] + ', "n": ', ""]))
            + "[" * depth
            + "]" * draw(st.sampled_from([0, depth]))
            + draw(st.sampled_from(["", "}"]))
        )
    if kind == "surrogate":
        return draw(st.sampled_from(['{"emotional_state": "\\ud800"}', '{"\\udfff": 1, "ahimsa": 8}', '"\\ud83d"']))
    if kind == "duplicate":
        key = draw(st.sampled_from([*PRINCIPLES, "x"]))
        return json.dumps(SCORES)[:-1] + f', "{key}": 9' + "}"
    return json.dumps(SCORES)[:-1] + ', "ahimsa": ' + draw(st.sampled_from(["1e999", "-1e400", "1" + "0" * 400])) + "}"


#: (kind, value): how a value goes into SQLite; "badtext" is bytes stored as TEXT (not UTF-8 in general).
_values = st.one_of(
    st.tuples(st.just("plain"), _texts),
    st.tuples(st.just("plain"), _json_texts()),
    st.tuples(st.just("plain"), _numbers),
    st.tuples(st.just("plain"), st.none()),
    st.tuples(st.just("plain"), st.binary(max_size=12)),
    st.tuples(st.just("plain"), st.text(max_size=8).map(str.encode)),  # BLOBs holding UTF-8
    st.tuples(st.just("badtext"), st.binary(min_size=1, max_size=12)),
)


@st.composite
def _rows(draw: st.DrawFn) -> list[dict]:
    rows = []
    for _ in range(draw(st.integers(1, 10))):
        row = {c: ("plain", v) for c, v in _BASE.items()}
        for column in draw(st.lists(st.sampled_from(_COLUMNS), max_size=3, unique=True)):
            json_column = column in ("buddhist_scores", "context")
            row[column] = draw(
                st.tuples(st.just("plain"), _json_texts()) if json_column and draw(st.booleans()) else _values
            )
        rows.append(row)
    return rows


def _write_table(path: Path, rows: list[dict], typed: bool) -> None:
    path.unlink(missing_ok=True)
    with sqlite3.connect(path) as conn:
        if typed:
            types = {
                c: "REAL" if c in (*HARM_COMPONENTS, "actual_harm", "buddhist_weighted_score") else "TEXT"
                for c in _COLUMNS
            }
        else:  # no affinity: every value keeps its storage class
            types = dict.fromkeys(_COLUMNS, "")
        conn.execute(
            "CREATE TABLE experiences (id INTEGER PRIMARY KEY, " + ", ".join(f"{c} {types[c]}" for c in _COLUMNS) + ")"
        )
        for i, row in enumerate(rows, start=1):
            marks = ", ".join("CAST(? AS TEXT)" if row[c][0] == "badtext" else "?" for c in _COLUMNS)
            values = [(None if isinstance(v, float) and math.isnan(v) else v) for _, v in (row[c] for c in _COLUMNS)]
            conn.execute(f"INSERT INTO experiences VALUES (?, {marks})", [i, *values])


@pytest.mark.slow  # about 10 s
@settings(
    max_examples=int(os.environ.get("SAIGE_HOSTILE_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(rows=_rows(), typed=st.booleans(), adbc=st.booleans(), fmt=st.sampled_from(list(FORMATS)))
def test_random_rows_never_crash_and_always_add_up(
    tmp_path: Path, rows: list[dict], typed: bool, adbc: bool, fmt: str
) -> None:
    db = tmp_path / "random.db"
    out = tmp_path / "out"
    shutil.rmtree(out, ignore_errors=True)
    _write_table(db, rows, typed)
    if adbc:
        result = run_cli("extract", "--db", db, "--data-root", out, "--json", "--format", fmt)
        assert result.exit_code in (0, 2), result.output
        if result.exit_code == 2:
            event("no examples")
            assert "no experiences passed" in result.stderr and result.stderr.count("\n") == 1
            assert _published(out) == []
            return
        path = out / "datasets" / json.loads(result.stdout.strip().splitlines()[-1])["dataset_id"]
    else:
        try:
            path = extract(ExtractRequest(db=str(db), data_root=out, format=fmt, adbc=False)).path
        except NoExamplesError:
            event("no examples")
            assert _published(out) == []
            return
    manifest = json.loads((path / "manifest.json").read_text())
    _identity(manifest)
    assert manifest["counts"]["scanned"] == len(rows)
    for reason, n in manifest["invalid"].items():
        if n:
            event(f"unusable: {reason}")
    published = _read_back(path)
    assert len(published) == manifest["counts"]["kept"]
    for row in published:
        assert row["messages"][-1]["content"] == row["messages"][-1]["content"].strip() != ""
        assert row["text"].endswith(row["messages"][-1]["content"] + FORMATS[fmt].end_of_turn)
