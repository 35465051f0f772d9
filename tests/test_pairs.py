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
