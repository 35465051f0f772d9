"""Prompts, not rows, are the unit of the split; preference pairs; suite prompts kept out of training."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from saige_k8s.dataset.extract import ExtractRequest, extract
from saige_k8s.dataset.formats import DEFAULT_SYSTEM_PROMPT, FORMATS, render
from saige_k8s.experiences.demo import experiences_table
from saige_k8s.experiences.schema import HARM_COMPONENTS, PRINCIPLES

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


def _db(path: Path, rows: list[dict]) -> str:
    import sqlalchemy as sa

    engine = sa.create_engine(f"sqlite:///{path}")
    table = experiences_table(sa.MetaData())
    table.create(engine)
    engine.dispose()
    with sqlite3.connect(path) as conn:
        names = [c.name for c in table.columns]
        conn.executemany(
            f"INSERT INTO experiences ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
            [tuple(r[n] for n in names) for r in rows],
        )
    return str(path)


def _run(db: str, root: Path, **kw: object) -> tuple[Path, dict]:
    result = extract(ExtractRequest(db=db, data_root=root, **kw))  # type: ignore[arg-type]
    return result.path, result.manifest


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
    counts = manifest["counts"]
    assert counts["scanned"] == (
        counts["kept"]
        + sum(manifest["invalid"].values())
        + sum(manifest["removed"].values())
        + counts["duplicates"]
        + counts["beyond_limit"]
    )


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
