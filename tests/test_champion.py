"""The champion store: round trips, clear refusals, torn lines, and atomicity under SIGKILL."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from saige_k8s.errors import InputError
from saige_k8s.evaluation.champion import ChampionStore, previous_champion

ROOT = Path(__file__).parent.parent


def _store(tmp_path: Path) -> ChampionStore:
    return ChampionStore(tmp_path, "demo")


def _lines(store: ChampionStore) -> list[dict]:
    return [json.loads(line) for line in store.history_path.read_text().splitlines()]


def test_promote_rollback_history_round_trip(tmp_path: Path) -> None:
    store = _store(tmp_path)
    assert store.champion() is None
    assert store.history() == []
    store.promote("run-a", dataset_id="ds-1", base_model="tiny", reasons=["first run"], figures={"n": 10})
    store.reject("run-b", dataset_id="ds-2", base_model="tiny", reasons=["karuna regressed"], figures={"n": 10})
    store.promote("run-c", dataset_id="ds-3", base_model="tiny", reasons=["better"], figures={"n": 12})
    store.promote("run-d", by="human", reasons=["operator's choice"])
    assert store.champion_path.read_text() == "run-d\n"
    assert store.champion() == "run-d"

    history = store.history()
    assert [(e["run_id"], e["verdict"], e["by"]) for e in history] == [
        ("run-a", "promoted", "evaluate"),
        ("run-b", "rejected", "evaluate"),
        ("run-c", "promoted", "evaluate"),
        ("run-d", "promote", "human"),
    ]
    first = history[0]
    assert set(first) == {"run_id", "dataset_id", "base_model", "verdict", "reasons", "figures", "time", "by"}
    assert (first["dataset_id"], first["base_model"], first["reasons"], first["figures"]) == (
        "ds-1",
        "tiny",
        ["first run"],
        {"n": 10},
    )
    assert first["time"].endswith("Z") and "T" in first["time"]
    assert store.champion() == "run-d"

    assert store.rollback(reasons=["bad answers in production"]) == "run-c"
    assert store.champion() == "run-c"
    last = store.history()[-1]
    assert (last["run_id"], last["verdict"], last["by"]) == ("run-c", "rollback", "human")
    assert last["reasons"] == ["rolled back from run-d", "bad answers in production"]
    # Two rollbacks go back two champions, skipping the rejected run-b.
    assert store.rollback() == "run-a"
    assert store.champion() == "run-a"
    with pytest.raises(InputError, match="nothing to roll back to: run-a is the first champion of pipeline demo"):
        store.rollback()
    assert store.champion() == "run-a"
    # Only this pipeline's files, and no temporary file left behind.
    assert sorted(p.name for p in store.directory.iterdir()) == [".lock", "CHAMPION", "history.jsonl"]
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["demo"]


def test_rollback_without_a_previous_champion_is_a_clear_error(tmp_path: Path) -> None:
    store = _store(tmp_path)
    with pytest.raises(InputError, match="pipeline demo has no champion to roll back from"):
        store.rollback()
    store.reject("run-a")
    with pytest.raises(InputError, match="has no champion"):
        store.rollback()
    store.promote("run-b")
    with pytest.raises(InputError, match="nothing to roll back to: run-b is the first champion"):
        store.rollback()
    assert store.champion() == "run-b"


def test_previous_champion_replays_history_as_a_stack() -> None:
    def h(*pairs: str) -> list[dict]:
        return [{"verdict": v, "run_id": r} for v, r in (p.split(":") for p in pairs)]

    assert previous_champion(h("promoted:a", "rejected:b", "promoted:c"), "c") == "a"
    assert previous_champion(h("promoted:a", "promoted:b", "rollback:a", "promoted:c"), "c") == "a"
    assert previous_champion(h("promoted:a", "promoted:a", "promote:b"), "b") == "a"
    # CHAMPION says d but its history line was lost to a kill: the top of history comes before it.
    assert previous_champion(h("promoted:a", "promoted:c"), "d") == "c"
    assert previous_champion(h("promoted:a"), "a") is None
    assert previous_champion([], "a") is None


@pytest.mark.parametrize("bad", ["Run-A", "run_a", "-run", "run-", "", "a" * 64, "../x", "run a", 12])
def test_promote_refuses_a_run_id_that_is_not_a_dns_label(tmp_path: Path, bad: object) -> None:
    store = _store(tmp_path)
    with pytest.raises(InputError, match="is not a DNS label"):
        store.promote(bad)  # type: ignore[arg-type]
    assert store.champion() is None
    assert store.history() == []


def test_bad_entries_and_names_are_refused_before_anything_changes(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.promote("run-a")
    with pytest.raises(InputError, match="must be plain JSON"):
        store.promote("run-b", figures={"model": object()})
    with pytest.raises(InputError, match="verdict 'maybe' is not one of"):
        store.record({"run_id": "run-b", "verdict": "maybe"})
    with pytest.raises(InputError, match="by must be one of evaluate, human"):
        store.promote("run-b", by="cron")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="unknown history fields: colour"):
        store.record({"run_id": "run-b", "verdict": "rejected", "colour": "red"})
    with pytest.raises(InputError, match="reasons must be a list"):
        store.record({"run_id": "run-b", "verdict": "rejected", "reasons": "one string"})
    assert store.champion() == "run-a"
    assert len(store.history()) == 1
    with pytest.raises(InputError, match=r"pipeline name '\.\./up' is not a DNS label"):
        ChampionStore(tmp_path, "../up")
    # Non-finite figures become null, so that strict JSON readers can read every line.
    store.reject("run-c", figures={"eval_loss": float("nan"), "nested": [float("inf"), 1.5]})
    assert _lines(store)[-1]["figures"] == {"eval_loss": None, "nested": [None, 1.5]}


def test_garbled_last_line_is_skipped_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = _store(tmp_path)
    store.promote("run-a")
    store.promote("run-b")
    with open(store.history_path, "ab") as handle:
        handle.write(b'{"run_id": "run-c", "verdict": "prom')  # a kill mid-append
    with caplog.at_level(logging.WARNING, logger="saige_k8s.evaluation.champion"):
        history = store.history()
    assert [e["run_id"] for e in history] == ["run-a", "run-b"]
    assert "skipping a torn last line" in caplog.text
    # The next append cuts the fragment off instead of gluing its own line to it.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="saige_k8s.evaluation.champion"):
        store.promote("run-d")
    assert "cutting off a torn last line" in caplog.text
    assert [e["run_id"] for e in _lines(store)] == ["run-a", "run-b", "run-d"]
    assert store.rollback() == "run-b"


def test_garbled_middle_line_and_missing_newline(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = _store(tmp_path)
    store.promote("run-a")
    with open(store.history_path, "ab") as handle:
        handle.write(b"\x00\x00garbage\n[1, 2]\n")
        handle.write(json.dumps({"run_id": "run-b", "verdict": "promote", "by": "human"}).encode())  # no newline
    with caplog.at_level(logging.WARNING, logger="saige_k8s.evaluation.champion"):
        assert [e["run_id"] for e in store.history()] == ["run-a", "run-b"]
    assert "skipping line 2" in caplog.text and "skipping line 3" in caplog.text
    # A complete entry without its newline (a hand edit) is kept, not cut off.
    store.reject("run-c")
    assert [e["run_id"] for e in store.history()] == ["run-a", "run-b", "run-c"]


_LOOP = """
import sys
from pathlib import Path
from saige_k8s.evaluation.champion import ChampionStore

store = ChampionStore(Path(sys.argv[1]), "demo")
ids = sys.argv[3:]
i = 0
while int(sys.argv[2]) == 0 or i < int(sys.argv[2]):
    store.promote(ids[i % len(ids)], dataset_id=f"ds-{i}", reasons=[f"iteration {i}"], figures={"i": i})
    if i == 0:
        print("ready", flush=True)  # promoting now: a kill from here on lands among the swaps, whatever the load
    i += 1
"""


def _loop(root: Path, count: int, *ids: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", _LOOP, str(root), str(count), *ids],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_champion_swap_is_atomic_under_sigkill(tmp_path: Path) -> None:
    store = _store(tmp_path)
    ids = ("run-a", "run-bb", "run-ccccccccccccccccccccccccccccccccccccccccccccccccccccccccc")
    store.promote(ids[0])
    valid = {ids[0]}  # what CHAMPION may hold: a looped id, or the last promotion before the kill
    rng = random.Random(20261201)
    known = set(ids)  # every id a history line may name
    for trial in range(24):
        proc = _loop(tmp_path, 0, *ids)
        try:
            assert proc.stdout is not None and proc.stdout.readline() == "ready\n", proc.stderr
            time.sleep(rng.uniform(0.0, 0.04))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            proc.kill()
            proc.wait()
        assert proc.returncode == -signal.SIGKILL

        raw = store.champion_path.read_bytes()
        assert raw.decode() in {f"{i}\n" for i in valid | set(ids)}, (trial, raw)
        data = store.history_path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1].decode().splitlines()
        for line in complete:
            entry = json.loads(line)
            assert entry["run_id"] in known and entry["verdict"] == "promoted"
        assert len(store.history()) == len(complete)

        final = f"run-final-{trial}"
        store.promote(final)
        assert store.champion() == final
        entries = _lines(store)  # the torn tail, if any, is gone: every line parses
        assert entries[-1]["run_id"] == final
        assert len(entries) == len(complete) + 1
        assert not list(store.directory.glob(".CHAMPION.*.tmp"))  # the killed writer's temporary is cleaned up
        valid = {final}
        known.add(final)


def test_concurrent_promotions_lose_no_line(tmp_path: Path) -> None:
    store = _store(tmp_path)
    count = 40
    procs = [_loop(tmp_path, count, "run-x"), _loop(tmp_path, count, "run-y")]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    entries = _lines(store)
    assert len(entries) == 2 * count
    assert sorted(e["run_id"] for e in entries) == ["run-x"] * count + ["run-y"] * count
    for run in ("run-x", "run-y"):
        assert [e["figures"]["i"] for e in entries if e["run_id"] == run] == list(range(count))
    # The last line written is the champion: swap and append happen under one lock.
    assert store.champion() == entries[-1]["run_id"]
