"""A killed or signalled command (SIGKILL: no cleanup runs) leaves the published output as it was."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from saige_k8s.experiences.demo import DemoOptions, create_database
from tests.conftest import REQUIRE_TOOLS, wait_for


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_mid_write_leaves_previous_dataset_and_latest(tmp_path: Path, sig: signal.Signals) -> None:
    db = tmp_path / "big.db"
    create_database(str(db), DemoOptions(rows=150_000, seed=3))
    root = tmp_path / "root"
    cmd = [sys.executable, "-m", "saige_k8s", "extract", "--db", str(db), "--data-root", str(root)]
    subprocess.run([*cmd, "--dataset-id", "previous", "--limit", "500"], check=True, capture_output=True)
    datasets = root / "datasets"
    before = {p.name: p.read_bytes() for p in (datasets / "previous").iterdir()}

    proc = subprocess.Popen([*cmd, "--dataset-id", "doomed"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # Kill it once a row group is in its temporary directory (the file holds more than the magic).
        def writing() -> bool:
            return any(p.stat().st_size > 4 for p in datasets.glob(".tmp-doomed-*/train.parquet"))

        assert wait_for(writing, timeout=60, interval=0.002), "extraction never started writing"
        os.kill(proc.pid, sig)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    expected = -signal.SIGKILL if sig == signal.SIGKILL else 128 + sig
    assert proc.returncode == expected, proc.stderr.read().decode() if proc.stderr else ""

    visible = sorted(p.name for p in datasets.iterdir() if not p.name.startswith("."))
    assert visible == ["LATEST", "previous"]
    assert (datasets / "LATEST").read_text().strip() == "previous"
    assert {p.name: p.read_bytes() for p in (datasets / "previous").iterdir()} == before
    assert pq.read_table(datasets / "previous" / "train.parquet").num_rows > 0
    assert json.loads((datasets / "previous" / "manifest.json").read_text())["dataset_id"] == "previous"
    if sig == signal.SIGTERM:  # a graceful stop also removes its temporary directory
        assert list(datasets.glob(".tmp-*")) == []


# --- Signals at random moments -------------------------------------------------------------
#
# Each (command, signal) pair gets TRIALS runs, each signalled at a seeded random moment of
# its run; every trial checks the exit code, the time to exit, the published output, and that
# a rerun succeeds. The figures are printed (pytest -s) for the README.

TRIALS = int(os.environ.get("SAIGE_SIGNAL_TRIALS", "20"))
EXIT_WITHIN_S = 5.0
EXPECTED = {signal.SIGKILL: -signal.SIGKILL, signal.SIGTERM: 143, signal.SIGINT: 130}


def _handlers_installed(pid: int, timeout: float = 60.0) -> None:
    """Wait until the process catches SIGTERM (the SigCgt mask of /proc/PID/status).

    A trial's clock starts there: before, the interpreter itself is starting, no project code
    has run and the kernel's default action applies; how long that takes depends on the
    machine's load, not on the project."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return  # already gone
        caught = next(int(line.split()[1], 16) for line in status.splitlines() if line.startswith("SigCgt:"))
        if caught & (1 << (signal.SIGTERM - 1)):
            return
        time.sleep(0.002)
    raise AssertionError(f"process {pid} installed no SIGTERM handler within {timeout} s")


def _cli(*args: object) -> list[str]:
    return [sys.executable, "-m", "saige_k8s", *(str(a) for a in args)]


def _signal_at(cmd: list[str], sig: signal.Signals, delay: float) -> tuple[int, float, str]:
    """Run ``cmd``, send ``sig`` after ``delay`` s; its exit code, seconds from the signal to
    the exit, and stderr."""
    # A crash in native code (it happened once in CI) then prints every thread's stack.
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        _handlers_installed(proc.pid)
        time.sleep(delay)
        sent = time.monotonic()
        if proc.poll() is None:
            proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        return proc.returncode, time.monotonic() - sent, err.decode(errors="replace")
    finally:
        proc.kill()
        proc.wait()


def _check_stderr(code: int, err: str) -> None:
    assert "Traceback" not in err, err
    if code in (130, 143):
        lines = [line for line in err.splitlines() if line.startswith("saige-k8s: error:")]
        assert len(lines) == 1, err
        assert ("interrupted" if code == 130 else "stopped by SIGTERM") in lines[0], err


class _Extract:
    """extract on a 3,000-row SQLite database, next to a published dataset and LATEST."""

    duration_s = 1.5

    def __init__(self, base: Path, db: Path) -> None:
        self.db, self.root = db, base / "root"
        self.datasets = self.root / "datasets"
        subprocess.run(self.command("previous", "--limit", "200"), check=True, capture_output=True)
        self.before = {p.name: p.read_bytes() for p in (self.datasets / "previous").iterdir()}

    def command(self, dataset_id: str, *extra: str) -> list[str]:
        return _cli("-q", "extract", "--db", self.db, "--data-root", self.root, "--dataset-id", dataset_id, *extra)

    def trial_command(self, i: str) -> list[str]:
        return self.command(i)

    def check(self, i: str, code: int, sig: signal.Signals) -> None:
        latest = (self.datasets / "LATEST").read_text().strip()
        assert {p.name: p.read_bytes() for p in (self.datasets / "previous").iterdir()} == self.before
        assert pq.read_table(self.datasets / latest / "train.parquet").num_rows > 0
        assert json.loads((self.datasets / latest / "manifest.json").read_text())["dataset_id"] == latest
        if code == 0:
            assert latest == i
        elif sig == signal.SIGKILL:  # killed before its rename, or after it: never half a dataset
            if (self.datasets / i).exists():
                assert json.loads((self.datasets / i / "manifest.json").read_text())["dataset_id"] == i
                assert pq.read_table(self.datasets / i / "train.parquet").num_rows > 0
        else:
            assert latest != i and not (self.datasets / i).exists()
            assert not list(self.datasets.glob(".tmp-*")), list(self.datasets.glob(".tmp-*"))

    def rerun(self, i: str) -> None:
        subprocess.run(self.command(i, "--reuse-existing"), check=True, capture_output=True)
        assert (self.datasets / "LATEST").read_text().strip() == i
        assert pq.read_table(self.datasets / i / "train.parquet").num_rows > 0


class _DemoDb:
    """demo-db --if-missing of 20,000 rows (what the pipeline's first step runs)."""

    duration_s = 2.5
    rows = 20_000

    def __init__(self, base: Path) -> None:
        self.dir = base / "demo"
        self.dir.mkdir()
        self.out = self.dir / "saige.db"

    def trial_command(self, i: str) -> list[str]:
        self.out.unlink(missing_ok=True)
        return _cli("demo-db", "--db", self.out, "--rows", self.rows, "--if-missing")

    def _rows(self) -> int:
        with contextlib.closing(sqlite3.connect(self.out)) as conn:
            return conn.execute("SELECT count(*) FROM experiences").fetchone()[0]

    def check(self, i: str, code: int, sig: signal.Signals) -> None:
        if code == 0 or (sig == signal.SIGKILL and self.out.exists()):  # SIGKILL: maybe after the rename
            assert self._rows() == self.rows
        else:
            assert not self.out.exists()  # never a partial file that --if-missing would keep
            if sig != signal.SIGKILL:
                assert sorted(p.name for p in self.dir.iterdir()) == []

    def rerun(self, i: str) -> None:
        subprocess.run(
            _cli("demo-db", "--db", self.out, "--rows", self.rows, "--if-missing"), check=True, capture_output=True
        )
        assert self._rows() == self.rows
        assert sorted(p.name for p in self.dir.iterdir()) == ["saige.db"]  # a dead run's temporary is swept


class _Train:
    """train of the tiny model, 4 steps with a checkpoint every 2.

    Trials share a run directory until one completes it: each trial after an interrupted one
    is that one's rerun (it resumes), and ``finish`` completes the last.
    """

    duration_s = 9.0

    def __init__(self, base: Path, dataset: Path, model: Path) -> None:
        self.base, self.dataset, self.model = base, dataset, model
        self.current: str | None = None

    def _command(self, run: Path) -> list[str]:
        return _cli(
            "train", "--dataset", self.dataset, "--model", self.model, "--output-dir", run,
            "--batch-size", "4", "--max-steps", "4", "--save-steps", "2", "--max-seq-len", "128",
            "--max-eval-examples", "8", "--precision", "fp32", "--target-modules", "all-linear",
        )  # fmt: skip

    def trial_command(self, i: str) -> list[str]:
        self.current = self.current or i
        return self._command(self.base / f"run-{self.current}")

    def check(self, i: str, code: int, sig: signal.Signals) -> None:
        run = self.base / f"run-{self.current}"
        if code == 0 or (sig == signal.SIGKILL and (run / "metrics.json").exists()):
            assert json.loads((run / "metrics.json").read_text())["steps"] == 4
            assert (run / "adapter" / "adapter_config.json").is_file()
            self.current = None
        else:
            assert not (run / "metrics.json").exists()

    def rerun(self, i: str) -> None:
        """The next trial is this one's rerun."""

    def finish(self) -> None:
        if self.current is not None:
            run = self.base / f"run-{self.current}"
            subprocess.run(self._command(run), check=True, capture_output=True)
            assert json.loads((run / "metrics.json").read_text())["steps"] == 4
            self.current = None


def _trials(target, sig: signal.Signals, seed: int) -> list[tuple[int, float]]:
    rng = random.Random(seed)
    outcomes = []
    for i in range(TRIALS):
        delay = rng.uniform(0.0, target.duration_s)
        key = f"{sig.name.lower()}-{i}"
        code, took, err = _signal_at(target.trial_command(key), sig, delay)
        where = f"{type(target).__name__} trial {i} ({sig.name} after {delay:.2f} s)"
        assert code in (EXPECTED[sig], 0), f"{where}: exit {code}: {err}"
        assert took < EXIT_WITHIN_S, f"{where}: exited {took:.1f} s after the signal"
        _check_stderr(code, err)
        target.check(key, code, sig)
        target.rerun(key)
        outcomes.append((code, took))
    getattr(target, "finish", lambda: None)()
    return outcomes


@pytest.fixture(scope="module")
def signal_targets(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("signals")
    db = base / "small.db"
    create_database(str(db), DemoOptions(rows=3000, seed=5))
    targets = {"extract": _Extract(base / "extract", db), "demo-db": _DemoDb(base)}
    try:
        import torch  # noqa: F401
    except ImportError:
        return targets
    from saige_k8s.dataset.extract import ExtractRequest, extract
    from saige_k8s.training.data import load_dataset_dir
    from tests.tiny_model import build_tiny_model

    train_base = base / "train"
    train_base.mkdir()
    create_database(str(train_base / "t.db"), DemoOptions(rows=400, seed=11, response_median_bytes=80))
    result = extract(
        ExtractRequest(db=str(train_base / "t.db"), data_root=train_base, format="mistral", eval_fraction=0.1)
    )
    texts = [str(row) for row in load_dataset_dir(result.path).train[:200]]
    model = build_tiny_model(train_base / "model", texts, vocab_size=400, hidden=32)
    targets["train"] = _Train(train_base, result.path, model)
    return targets


@pytest.mark.slow
def test_signals_at_random_moments(signal_targets) -> None:
    from concurrent.futures import ThreadPoolExecutor

    if "train" not in signal_targets and REQUIRE_TOOLS:
        pytest.fail("torch is not installed (SAIGE_REQUIRE_TOOLS=1)")
    jobs = {
        (name, sig): seed
        for seed, (name, sig) in enumerate(
            (name, sig) for name in signal_targets for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT)
        )
    }
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=len(signal_targets)) as pool:
        # One sequence per command at a time: the trials of a command share its directories.
        futures = {name: pool.submit(_run_sequence, signal_targets[name], name, jobs) for name in signal_targets}
        results = {key: value for future in futures.values() for key, value in future.result().items()}
    print(f"\n{TRIALS} trials per command and signal, {time.monotonic() - started:.0f} s in all:")
    for (name, sig), outcomes in results.items():
        codes = sorted({code for code, _ in outcomes})
        counts = ", ".join(f"exit {code}: {sum(1 for c, _ in outcomes if c == code)}" for code in codes)
        worst = max(took for _, took in outcomes)
        print(f"  {name:8} {sig.name:8} {counts}; slowest exit {worst:.2f} s after the signal")


def _run_sequence(target, name: str, jobs: dict) -> dict:
    return {(name, sig): _trials(target, sig, seed) for (command, sig), seed in jobs.items() if command == name}
