"""A killed extraction (SIGKILL: no cleanup runs) leaves the published datasets as they were."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from saige_k8s.experiences.demo import DemoOptions, create_database
from tests.conftest import wait_for


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
