"""Prompts, not rows, are the unit of the split; preference pairs; suite prompts kept out of training."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from saige_k8s.dataset.extract import ExtractRequest, extract
from saige_k8s.dataset.formats import DEFAULT_SYSTEM_PROMPT, FORMATS, render
from saige_k8s.experiences.demo import experiences_table
from saige_k8s.experiences.schema import HARM_COMPONENTS, PRINCIPLES
from tests.conftest import new_postgres_database
from tests.test_extract import accounted_rows

SCORES = dict.fromkeys(PRINCIPLES, 8.0)


def _row(i: int, user: str, response: str, **kw: object) -> dict:
    row = {
        "id": i,
        "created_at": "2026-01-01 00:00:00",
        "user_message": user,
        "context": None,
        "response": response,
        "model": None,
        "difficulty": None,
        **dict.fromkeys(HARM_COMPONENTS, None),
        "actual_harm": 0.1,
        "buddhist_scores": json.dumps(SCORES),
        "buddhist_weighted_score": None,
        "buddhist_alignment": "good",
    }
    for key, value in kw.items():
        if key == "scores":
            row["buddhist_scores"] = json.dumps({**SCORES, **value})  # type: ignore[dict-item]
        else:
            row[key] = value
    return row


def _experiences(text_ids: bool):
    import sqlalchemy as sa

    table = experiences_table(sa.MetaData())
    if not text_ids:
        return table
    return sa.Table(
        table.name,
        sa.MetaData(),
        *(sa.Column("id", sa.Text, primary_key=True) if c.name == "id" else c._copy() for c in table.columns),
    )


def _db(path: Path, rows: list[dict], text_ids: bool = False) -> str:
    import sqlalchemy as sa

    engine = sa.create_engine(f"sqlite:///{path}")
    table = _experiences(text_ids)
    table.create(engine)
    engine.dispose()
    with sqlite3.connect(path) as conn:
        names = [c.name for c in table.columns]
        conn.executemany(
            f"INSERT INTO experiences ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
            [tuple(r[n] for n in names) for r in rows],
        )
    return str(path)


def _postgres_table(url: str, rows: list[dict], text_ids: bool = False) -> None:
    """``_db`` on PostgreSQL: the experiences table at ``url``, holding ``rows``."""
    import sqlalchemy as sa

    table = _experiences(text_ids)
    engine = sa.create_engine(url)
    table.create(engine)
    with engine.begin() as conn:
        conn.execute(table.insert(), [{c.name: r[c.name] for c in table.columns} for r in rows])
    engine.dispose()


def _run(db: str, root: Path, **kw: object) -> tuple[Path, dict]:
    result = extract(ExtractRequest(db=db, data_root=root, **kw))  # type: ignore[arg-type]
    return result.path, json.loads((result.path / "manifest.json").read_text())


def _table(path: Path, name: str) -> pa.Table | None:
    return pq.read_table(path / name) if (path / name).exists() else None


def _sides(path: Path) -> dict[str, set[str]]:
    """User turn -> the splits its examples landed in."""
    sides: dict[str, set[str]] = {}
    for split in ("train", "eval"):
        table = _table(path, f"{split}.parquet")
        for messages in [] if table is None else table.column("messages").to_pylist():
            user = next(m["content"] for m in messages if m["role"] == "user")
            sides.setdefault(user, set()).add(split)
    return sides


def test_every_answer_to_a_prompt_is_on_one_side(tmp_path: Path) -> None:
    prompts = [f"Question number {k}?" for k in range(60)]
    rows = [_row(i + 1, prompts[i % 60], f"Answer {i}.") for i in range(600)]
    forward = _db(tmp_path / "a.db", rows)
    # The same rows under other ids, in another order: the split must not move.
    backward = _db(tmp_path / "b.db", [{**r, "id": 10_000 - r["id"]} for r in rows])
    one, m1 = _run(forward, tmp_path / "one", eval_fraction=0.3)
    two, _ = _run(forward, tmp_path / "two", eval_fraction=0.3)
    three, _ = _run(backward, tmp_path / "three", eval_fraction=0.3)
    sides = _sides(one)
    assert len(sides) == 60 and all(len(s) == 1 for s in sides.values())
    assert 0 < m1["counts"]["eval"] < m1["counts"]["kept"]
    assert _sides(two) == sides == _sides(three)
    # The split is the prompt's hash: any renderer prompt of the format decides it alike.
    prompt = render(FORMATS["tinyllama"], DEFAULT_SYSTEM_PROMPT, prompts[0], None, "")[0]
    from saige_k8s.dataset.curate import eval_mask

    held = bool(eval_mask(pa.array([prompt]), 0.3)[0])
    assert sides[prompts[0]] == {"eval" if held else "train"}


def test_suite_prompts_are_never_trained_on(tmp_path: Path) -> None:
    from saige_k8s.dataset.suite import load_suite
    from saige_k8s.experiences.demo import DemoOptions, create_database

    db = tmp_path / "demo.db"
    create_database(str(db), DemoOptions(rows=300, seed=0))
    scenario = load_suite().scenarios[0]
    with sqlite3.connect(db) as conn:
        top = conn.execute("SELECT max(id) FROM experiences").fetchone()[0]
        template = conn.execute("SELECT * FROM experiences WHERE buddhist_alignment = 'excellent' LIMIT 1").fetchone()
        names = [d[1] for d in conn.execute("PRAGMA table_info(experiences)")]
        for k, response in enumerate(("A fine answer.", "Another fine answer.")):
            row = dict(zip(names, template, strict=True))
            row |= {"id": top + 1 + k, "user_message": f"  {scenario.user}\n", "context": scenario.context_text()}
            row |= {"response": response, "actual_harm": 0.01, "buddhist_weighted_score": 9.0}
            conn.execute(f"INSERT INTO experiences VALUES ({', '.join('?' * len(names))})", list(row.values()))
    path, manifest = _run(str(db), tmp_path / "out", eval_fraction=0.2)
    assert manifest["removed"]["suite_prompt"] == 2
    assert scenario.user not in {u.split("\n\n")[0] for u in _sides(path)}
    steps = {s["step"]: s["removed"] for s in manifest["funnel"]}
    assert steps["suite_prompt"] == 2
    assert manifest["counts"]["scanned"] == accounted_rows(manifest)


def test_a_spec_suite_file_adds_prompts(tmp_path: Path) -> None:
    extra = tmp_path / "mine.yaml"
    extra.write_text(
        "version: 1\nscenarios:\n  - id: mine-one\n    target: ahimsa\n    user: My own question?\n"
        "    good: Kind.\n    bad: Cruel.\n"
    )
    db = _db(tmp_path / "t.db", [_row(1, "My own question?", "An answer."), _row(2, "Other question?", "Yes.")])
    _, manifest = _run(db, tmp_path / "out", suite=[extra])
    assert manifest["removed"]["suite_prompt"] == 1 and manifest["counts"]["kept"] == 1
    _, without = _run(db, tmp_path / "plain")
    assert without["removed"]["suite_prompt"] == 0 and without["counts"]["kept"] == 2


def _pair_rows() -> list[dict]:
    low = dict.fromkeys(PRINCIPLES, 5.0)
    return [
        # Q1: chosen is the highest weighted kept row; rejected the lowest weighted removed one.
        _row(1, "Q1?", "Good A.", buddhist_weighted_score=8.0),
        _row(2, "Q1?", "Good B.", buddhist_weighted_score=9.0, actual_harm=0.2, scores={"sacca": 9, "panna": 9}),
        _row(3, "Q1?", "Bad C.", buddhist_weighted_score=7.0, actual_harm=0.5),  # max_harm
        _row(4, "Q1?", "Bad D.", buddhist_weighted_score=3.0, actual_harm=0.2, scores=low),  # min_buddhist in SQL
        _row(5, "Q1?", "Broken.", buddhist_weighted_score=1.0, actual_harm=1.7),  # invalid: never in a pair
        # Q2: ties: lower harm, then lower id for chosen; higher harm for rejected.
        _row(6, "Q2?", "Fine.", buddhist_weighted_score=8.0, actual_harm=0.2),
        _row(7, "Q2?", "Fine too.", buddhist_weighted_score=8.0, deception=0.1, harshness=0.1),
        _row(8, "Q2?", "Fine as well.", buddhist_weighted_score=8.0),
        _row(9, "Q2?", "Poor.", buddhist_weighted_score=5.0, buddhist_alignment="poor"),
        _row(
            10,
            "Q2?",
            "Poorer.",
            buddhist_weighted_score=5.0,
            actual_harm=0.25,
            buddhist_alignment="poor",
            deception=0.3,
            harshness=0.3,
            omission=0.5,
            scores={"karuna": 2},
        ),
        _row(11, "Q3?", "Kept only."),  # no removed row: no pair
        _row(12, "Q4?", "Same."),
        _row(13, "Q4?", "  Same.\n", actual_harm=0.9),  # same answer once trimmed: no pair
        _row(14, "Q5?", "Removed only.", actual_harm=0.9),
        # Q6: the removed row's weighted score is computed from its principles (all 3), in Arrow.
        _row(15, "Q6?", "Kept.", buddhist_weighted_score=7.0),
        _row(16, "Q6?", "Low.", scores=dict.fromkeys(PRINCIPLES, 3.0)),
    ]


def test_pairs_are_exactly_the_best_kept_against_the_worst_removed(tmp_path: Path) -> None:
    db = _db(tmp_path / "p.db", _pair_rows())
    path, manifest = _run(db, tmp_path / "out")
    table = pq.read_table(path / "pairs-train.parquet")
    assert not (path / "pairs-eval.parquet").exists()
    assert table.schema.names == [
        "prompt",
        "chosen",
        "rejected",
        "chosen_id",
        "rejected_id",
        "margin_weighted",
        "margin_harm",
        "principle",
        "component",
        "format",
    ]
    turn = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    assert [table.schema.field(c).type for c in ("prompt", "chosen", "rejected")] == [turn] * 3
    assert table.schema.field("margin_weighted").type == pa.float64()
    assert table.schema.field("chosen_id").type == pa.string() == table.schema.field("component").type
    rows = table.to_pylist()
    margins = ("margin_weighted", "margin_harm")
    got = [
        (r["chosen_id"], r["rejected_id"], *(round(r[m], 9) for m in margins), r["principle"], r["component"])
        for r in rows
    ]
    assert got == [
        ("2", "4", 6.0, 0.0, "sacca", None),
        ("7", "10", 3.0, 0.15, "karuna", "deception"),
        ("15", "16", 4.0, -0.0, "ahimsa", None),
    ]
    assert manifest["pairs"] == {"train": 3, "eval": 0}
    assert manifest["files"]["pairs-train.parquet"]["rows"] == 3
    first = rows[0]
    assert first["prompt"] == [
        {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
        {"role": "user", "content": "Q1?"},
    ]
    assert first["chosen"] == [{"role": "assistant", "content": "Good B."}]
    assert first["rejected"] == [{"role": "assistant", "content": "Bad D."}]
    assert {r["format"] for r in rows} == {"tinyllama"}
    # The SFT side is unchanged by pairs: same examples and counts with pairs off.
    _, plain = _run(db, tmp_path / "plain", pairs=False)
    assert plain["counts"] == manifest["counts"] and plain["removed"] == manifest["removed"]
    assert plain["pairs"] == {"train": 0, "eval": 0}


def _many_pairs(prompts: int, text_ids: bool) -> tuple[list[dict], list[tuple[str, str]]]:
    """(rows, their pairs): each prompt answered once kept, once removed (harm); text ids awkward to quote."""

    def ident(i: int) -> int | str:
        return f"id \"{i}\" \\ 'ü' {i}" if text_ids else i

    rows, pairs = [], []
    for q in range(prompts):
        rows.append(_row(ident(2 * q), f"Q{q}?", f"Good {q}."))  # type: ignore[arg-type]
        rows.append(_row(ident(2 * q + 1), f"Q{q}?", f"Bad {q}.", actual_harm=0.9))  # type: ignore[arg-type]
        pairs.append((str(ident(2 * q)), str(ident(2 * q + 1))))
    return rows, pairs


def _check_many_pairs(db: str, root: Path, prompts: int, expected: list[tuple[str, str]]) -> None:
    path, manifest = _run(db, root)
    table = pq.read_table(path / "pairs-train.parquet")
    assert manifest["pairs"] == {"train": prompts, "eval": 0}
    ids = zip(table.column("chosen_id").to_pylist(), table.column("rejected_id").to_pylist(), strict=True)
    assert sorted(ids) == sorted(expected)
    turns = zip(table.column("prompt").to_pylist(), table.column("rejected").to_pylist(), strict=True)
    assert {p[-1]["content"]: r[0]["content"] for p, r in turns} == {f"Q{q}?": f"Bad {q}." for q in range(prompts)}


#: Prompts of the tests below: 2,400 ids, more than one statement binds one by one.
MANY = 1_200


@pytest.mark.parametrize("text_ids", [False, True], ids=["integer", "text"])
def test_every_pair_is_read_again_however_many_and_whatever_their_ids(tmp_path: Path, text_ids: bool) -> None:
    """On SQLite the pairs' rows are read again in one statement, their ids bound as one JSON
    array: thousands of ids, and text ids with quotes, backslashes and letters beyond ASCII,
    all come back, each to its own pair."""
    rows, pairs = _many_pairs(MANY, text_ids)
    _check_many_pairs(_db(tmp_path / "p.db", rows, text_ids=text_ids), tmp_path / "out", MANY, pairs)


@pytest.mark.postgres
@pytest.mark.parametrize("text_ids", [False, True], ids=["integer", "text"])
def test_every_pair_is_read_again_on_postgresql(postgres_server: str, tmp_path: Path, text_ids: bool) -> None:
    """PostgreSQL: integer ids as one bound array, text ids in parts of bound values."""
    url = new_postgres_database(postgres_server, f"pairs_{'text' if text_ids else 'integer'}")
    rows, pairs = _many_pairs(MANY, text_ids)
    _postgres_table(url, rows, text_ids)
    _check_many_pairs(url, tmp_path / "out", MANY, pairs)


def test_a_pair_whose_rows_changed_after_the_scan_is_dropped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pairs' texts are read again by id after the scan: a row deleted or given another
    prompt in between (a live table) drops its pair instead of pairing two prompts' answers."""
    import saige_k8s.dataset.extract as extract_module

    db = _db(tmp_path / "p.db", _pair_rows())
    read_again = extract_module._read_again

    def table_changes_first(*args: object) -> pa.Table:
        with sqlite3.connect(db) as conn:
            conn.execute("UPDATE experiences SET user_message = 'Another question?' WHERE id = 4")
            conn.execute("DELETE FROM experiences WHERE id = 10")
        return read_again(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(extract_module, "_read_again", table_changes_first)
    path, manifest = _run(db, tmp_path / "out")
    table = pq.read_table(path / "pairs-train.parquet")
    pairs = zip(table.column("chosen_id").to_pylist(), table.column("rejected_id").to_pylist(), strict=True)
    assert list(pairs) == [("15", "16")]
    assert manifest["pairs"] == {"train": 1, "eval": 0}


def test_no_pairs_when_every_paired_row_is_gone_after_the_scan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import saige_k8s.dataset.extract as extract_module

    db = _db(tmp_path / "p.db", _pair_rows())
    read_again = extract_module._read_again

    def table_emptied_first(*args: object) -> pa.Table:
        with sqlite3.connect(db) as conn:
            conn.execute("DELETE FROM experiences")
        return read_again(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(extract_module, "_read_again", table_emptied_first)
    path, manifest = _run(db, tmp_path / "out")
    assert pq.read_table(path / "pairs-train.parquet").num_rows == 0
    assert manifest["pairs"] == {"train": 0, "eval": 0}
    assert manifest["counts"]["kept"] > 0  # the examples come from the scan, before the rows went


def test_a_kto_part_without_an_eval_split_is_counted(tmp_path: Path) -> None:
    db = _db(tmp_path / "p.db", _pair_rows())
    path, manifest = _run(db, tmp_path / "out", kto=True)  # eval_fraction 0: no kto-eval.parquet
    assert manifest["kto"] == {"train": pq.read_table(path / "kto-train.parquet").num_rows, "eval": 0}
    assert manifest["kto"]["train"] > 0
    assert not (path / "kto-eval.parquet").exists()


def test_pairs_loaded_as_a_dataset_in_trl_shape(tmp_path: Path) -> None:
    datasets = __import__("pytest").importorskip("datasets")
    db = _db(tmp_path / "p.db", _pair_rows())
    path, _ = _run(db, tmp_path / "out", format="mistral")
    loaded = datasets.load_dataset("parquet", data_files={"train": str(path / "pairs-train.parquet")})["train"]
    assert loaded.num_rows == 3
    row = loaded[0]
    # Conversational preference format: prompt turns, then one assistant turn each side; no system in mistral.
    assert [m["role"] for m in row["prompt"]] == ["user"]
    assert [m["role"] for m in row["chosen"]] == ["assistant"] == [m["role"] for m in row["rejected"]]


def test_pairs_follow_their_prompts_split_and_limit_does_not_cut_them(tmp_path: Path) -> None:
    rows = []
    for k in range(80):
        rows.append(_row(3 * k + 1, f"Prompt {k}?", f"Kind {k}.", buddhist_weighted_score=8.0))
        rows.append(_row(3 * k + 2, f"Prompt {k}?", f"Harsh {k}.", actual_harm=0.6))
        rows.append(_row(3 * k + 3, f"Prompt {k}?", f"Kind again {k}.", buddhist_weighted_score=7.0))
    db = _db(tmp_path / "s.db", rows)
    path, manifest = _run(db, tmp_path / "out", eval_fraction=0.4)
    sides = _sides(path)
    for split in ("train", "eval"):
        for pair in pq.read_table(path / f"pairs-{split}.parquet").to_pylist():
            assert sides[pair["prompt"][-1]["content"]] == {split}
    assert manifest["pairs"]["train"] + manifest["pairs"]["eval"] == 80
    assert manifest["pairs"]["eval"] > 0
    from saige_k8s.experiences.filters import Filters

    _, limited = _run(db, tmp_path / "limited", eval_fraction=0.4, filters=Filters.model_validate({"limit": 10}))
    assert limited["counts"]["kept"] == 10
    assert limited["pairs"] == manifest["pairs"]
    assert limited["counts"]["scanned"] == manifest["counts"]["scanned"]


def test_the_demo_reasks_its_prompts_so_it_has_pairs(tmp_path: Path) -> None:
    from saige_k8s.experiences.demo import DemoOptions, create_database, generate

    options = DemoOptions(rows=1500, seed=4)
    assert list(generate(options)) == list(generate(options))  # deterministic by seed
    create_database(str(tmp_path / "demo.db"), options)
    path, manifest = _run(str(tmp_path / "demo.db"), tmp_path / "out", eval_fraction=0.1)
    assert manifest["pairs"]["train"] > 50 and manifest["pairs"]["eval"] > 0
    pairs = pq.read_table(path / "pairs-train.parquet")
    assert (pc.greater(pairs.column("margin_weighted"), 0)).to_pylist().count(True) > len(pairs) / 2


def test_cli_spec_suite_files_and_a_bad_one(tmp_path: Path) -> None:
    from tests.conftest import run_cli

    db = _db(tmp_path / "t.db", [_row(1, "My own question?", "An answer."), _row(2, "Other question?", "Yes.")])
    extra = tmp_path / "mine.yaml"
    extra.write_text(
        "version: 1\nscenarios:\n  - id: mine-one\n    target: ahimsa\n    user: My own question?\n"
        "    good: Kind.\n    bad: Cruel.\n"
    )
    spec = tmp_path / "spec.yaml"
    spec.write_text(json.dumps({"evaluate": {"suite": [str(extra)]}}))
    ok = run_cli("extract", "-f", str(spec), "--db", db, "--data-root", str(tmp_path / "out"), "--json")
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout.strip().splitlines()[-1])["kept"] == 1
    spec.write_text(json.dumps({"evaluate": {"suite": [str(tmp_path / "missing.yaml")]}}))
    bad = run_cli("extract", "-f", str(spec), "--db", db, "--data-root", str(tmp_path / "bad"), "--json")
    assert bad.exit_code == 2
    assert len(bad.stderr.strip().splitlines()) == 1 and "missing.yaml" in bad.stderr
    assert not (tmp_path / "bad" / "datasets").exists()


def test_no_examples_because_of_the_suite_says_so(tmp_path: Path) -> None:
    from saige_k8s.dataset.suite import load_suite
    from saige_k8s.errors import NoExamplesError

    scenario = load_suite().scenarios[0]
    db = _db(tmp_path / "t.db", [_row(1, scenario.user, "An answer.", context=scenario.context_text())])
    try:
        _run(db, tmp_path / "out")
    except NoExamplesError as exc:
        assert "evaluation suite" in str(exc) and "suite_prompt -1" in str(exc)
    else:
        raise AssertionError("expected NoExamplesError")


def test_pairs_are_the_same_on_postgresql(demo_sqlite: str, demo_postgres: str, tmp_path: Path) -> None:
    lite, _ = _run(demo_sqlite, tmp_path / "lite", eval_fraction=0.2)
    pg, _ = _run(demo_postgres, tmp_path / "pg", eval_fraction=0.2)
    for name in ("pairs-train.parquet", "pairs-eval.parquet"):
        assert pq.read_table(lite / name).to_pylist() == pq.read_table(pg / name).to_pylist()
    assert pq.read_table(lite / "pairs-train.parquet").num_rows > 0


def _blank_rows() -> tuple[list[dict], list[tuple[str, str]]]:
    """(rows, their pairs): per prompt, one kept answer and removed ones. The worst cannot be
    used (blank in whitespace other than spaces), except the last prompt's, which only starts
    with spaces."""
    worst = ["\t\n", "\u3000", "\u00a0\u2003", "\x1c", "  starts with spaces"]
    rows, pairs = [], []
    for q, blank in enumerate(worst):
        base = 10 * q
        rows.append(_row(base + 1, f"Q{q}?", f"Kept {q}."))
        rows.append(_row(base + 2, f"Q{q}?", blank, actual_harm=0.95, buddhist_weighted_score=2.0))
        # Removed, second worst: the rejected side where the worst is unusable. It starts beyond ASCII.
        rows.append(_row(base + 3, f"Q{q}?", f"Über {q}.", actual_harm=0.9, buddhist_weighted_score=4.0))
        # Removed by the stored weighted score: usable, but not the worst.
        rows.append(_row(base + 4, f"Q{q}?", f"Low {q}.", buddhist_weighted_score=5.0))
        # Removed by the harm: usable, and an answer of the KTO part.
        rows.append(_row(base + 5, f"Q{q}?", f"Harsh {q}.", actual_harm=0.85, buddhist_weighted_score=6.0))
        pairs.append((str(base + 1), str(base + (2 if blank.strip() else 3))))
    return rows, pairs


def _pairs_of(path: Path) -> list[tuple[str, str, str]]:
    table = pq.read_table(path / "pairs-train.parquet")
    rejected = [r[0]["content"] for r in table.column("rejected").to_pylist()]
    ids = zip(table.column("chosen_id").to_pylist(), table.column("rejected_id").to_pylist(), rejected, strict=True)
    return sorted(ids)


@pytest.mark.postgres
def test_removed_rows_cut_short_on_postgresql_are_judged_as_in_full(postgres_server: str, tmp_path: Path) -> None:
    """On PostgreSQL a row a filter surely removes comes with its response cut to one
    printable character: the pairs read their rows again. The cut must never turn an
    unusable response (blank in any whitespace) into a usable one, nor touch the KTO part's."""
    from saige_k8s.experiences.filters import Filters
    from saige_k8s.experiences.query import rows_query
    from saige_k8s.experiences.source import open_source, resolve_url, stream

    rows, pairs = _blank_rows()
    url = new_postgres_database(postgres_server, "cut_short")
    _postgres_table(url, rows)
    lite = _db(tmp_path / "p.db", rows)

    source = open_source(resolve_url(url), "experiences", {})
    assert source.brief_removed and not open_source(resolve_url(lite), "experiences", {}).brief_removed
    with stream(source.url, rows_query(source.judge(Filters()), source.id_is_integer, brief_removed=True)) as batches:
        read = pa.Table.from_batches(list(batches))
    responses = dict(zip(read.column("id").to_pylist(), read.column("response").to_pylist(), strict=True))
    assert responses[1] == "Kept 0." and responses[3] == "Über 0."  # 'Ü': not ASCII
    assert responses[4] == "L" and responses[5] == "H"  # removed by the weighted score, by the harm
    assert responses[2] == "\t\n" and responses[12] == "\u3000" and responses[42] == "  starts with spaces"

    pg_path, pg = _run(url, tmp_path / "pg", kto=True)
    lite_path, sqlite = _run(lite, tmp_path / "lite", kto=True)
    assert _pairs_of(pg_path) == _pairs_of(lite_path)
    assert [(c, r) for c, r, _ in _pairs_of(pg_path)] == sorted(pairs)
    rejected = {text for _, _, text in _pairs_of(pg_path)}
    assert rejected == {f"Über {q}." for q in range(4)} | {"starts with spaces"}  # trimmed, as every text
    assert pg["invalid"] == sqlite["invalid"] and pg["removed"] == sqlite["removed"]
    # The KTO part writes removed rows' responses: with it, none is cut.
    kto = pq.read_table(pg_path / "kto-train.parquet")
    assert kto.to_pylist() == pq.read_table(lite_path / "kto-train.parquet").to_pylist() and kto.num_rows
    assert {m[-1]["content"] for m in kto.column("messages").to_pylist()} >= {"Über 0.", "Harsh 0."}
    # Without it, the same pairs from the short read.
    short_path, _ = _run(url, tmp_path / "short")
    assert _pairs_of(short_path) == _pairs_of(pg_path)


@pytest.mark.postgres
def test_a_sql_ascii_database_is_read_as_utf8(postgres_server: str, tmp_path: Path) -> None:
    """SQL_ASCII stores any bytes. Read as UTF-8, its valid texts come as on any database (the
    cut included), and a text that is not UTF-8 stops the read with the server's own words."""
    import sqlalchemy as sa

    from saige_k8s.errors import RuntimeFailure
    from saige_k8s.experiences.source import open_source, resolve_url

    rows, pairs = _blank_rows()
    url = new_postgres_database(postgres_server, "any_bytes", encoding="SQL_ASCII")
    setup = f"{url}?client_encoding=UTF8"  # psycopg reads SQL_ASCII text as bytes, which SQLAlchemy cannot
    _postgres_table(setup, rows)
    assert open_source(resolve_url(url), "experiences", {}).brief_removed
    pg_path, pg = _run(url, tmp_path / "pg")
    lite_path, sqlite = _run(_db(tmp_path / "p.db", rows), tmp_path / "lite")
    assert _pairs_of(pg_path) == _pairs_of(lite_path) and [(c, r) for c, r, _ in _pairs_of(pg_path)] == sorted(pairs)
    assert pg["invalid"] == sqlite["invalid"]
    engine = sa.create_engine(setup)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE experiences SET response = E'bad \\xff bytes' WHERE id = 2"))
    engine.dispose()
    with pytest.raises(RuntimeFailure, match='invalid byte sequence for encoding "UTF8": 0xff'):
        _run(url, tmp_path / "bad")


def test_ties_go_to_the_first_id_across_batches_and_merges(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Equal answers to one prompt, read two rows a batch and merged after every batch: the
    first of them in id order is the chosen one, and the first removed one the rejected."""
    from saige_k8s.dataset import pairs as pairs_module
    from saige_k8s.experiences import source as source_module

    monkeypatch.setattr(source_module, "_BATCH_ROWS", 2)
    monkeypatch.setattr(pairs_module, "_MERGE_FLOOR", 0)
    # Ids out of step with the batches; each prompt's answers spread over several of them.
    rows = [_row(i, f"Q{i % 3}?", f"Answer {i}.", actual_harm=0.9 if i % 2 else 0.1) for i in range(1, 25)]
    path, _ = _run(_db(tmp_path / "p.db", rows), tmp_path / "out")
    got = sorted((r["chosen_id"], r["rejected_id"]) for r in pq.read_table(path / "pairs-train.parquet").to_pylist())
    firsts: dict[tuple[int, bool], int] = {}
    for r in rows:
        firsts.setdefault((r["id"] % 3, r["actual_harm"] < 0.3), r["id"])
    assert got == sorted((str(firsts[q, True]), str(firsts[q, False])) for q in range(3))
