"""Multi-node training on one machine: two torchrun "nodes" on loopback, over gloo, from the step table.

The same command lines the pods of an Indexed Job get (only the rank and node 0's address
differ); the result must be the one of one node with two processes, and a group that loses
a node mid-run must resume from its newest checkpoint when run again.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import need_tool, wait_for

try:
    import torch
except ImportError:
    need_tool("torch is not installed (pip install -e '.[train]')")

from saige_k8s.dataset.formats import DEFAULT_SYSTEM_PROMPT, FORMATS, render
from saige_k8s.spec import Programs, load_spec, train_command
from tests.tiny_model import build_tiny_model

RUN = "multi-20261201-000000"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    corpus = [
        "".join(render(FORMATS[f], DEFAULT_SYSTEM_PROMPT, f"question {i}", None, "an answer " * (i % 7)))
        for f in FORMATS
        for i in range(200)
    ]
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", corpus)


def _spec(tmp_path: Path, model: Path, nodes: int, **train: object) -> Path:
    spec = {
        "name": "multi",
        "data_root": str(tmp_path / "data"),
        "source": {"url": str(tmp_path / "saige.db"), "demo": {"rows": 800, "seed": 5}},
        "extract": {"format": "llama3", "eval_fraction": 0.1, "min_examples": 50},
        "evaluate": {"enabled": False},
        "train": {
            "model": str(model),
            "max_steps": 12,
            "batch_size": 4,
            "max_seq_len": 128,
            "learning_rate": 0.003,
            "target_modules": ["all-linear"],
            "lora_dropout": 0.0,
            "logging_steps": 4,
            "save_steps": 1000,
            "gpus": 0,
            "nodes": nodes,
            "rendezvous_timeout": 120,
            **train,
        },
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _run(spec: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "saige_k8s", "run", "-f", str(spec), "--run", RUN, *extra]
    return subprocess.run(command, capture_output=True, text=True, check=False, timeout=900)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


@pytest.mark.slow
def test_two_nodes_train_like_one_node_with_two_processes(tmp_path: Path, tiny_model: Path) -> None:
    spec_path = _spec(tmp_path, tiny_model, nodes=2)
    result = _run(spec_path)
    assert result.returncode == 0, result.stderr[-3000:]
    launched = [line for line in result.stderr.splitlines() if line.startswith("train: ") and "--nnodes" in line]
    assert len(launched) == 2
    assert ["--node-rank 0" in launched[0], "--node-rank 1" in launched[1]] == [True, True]
    assert all("--nnodes 2" in line and "--nproc-per-node 1" in line for line in launched)
    state = tmp_path / "data" / "pipelines" / RUN
    assert (state / "train.node-1.log").stat().st_size > 0  # node 1 has its own log
    two_nodes = tmp_path / "data" / "runs" / RUN
    metrics = json.loads((two_nodes / "metrics.json").read_text())
    assert metrics["processes"] == 2

    # The reference: the same spec, one node with two processes, from the same builder.
    reference = tmp_path / "one-node"
    spec = load_spec(spec_path)
    command = train_command(Programs.local(), str(spec_path), str(tmp_path / "data"), RUN, str(reference), processes=2)
    assert command[command.index("--nproc_per_node") + 1] == "2"
    single = subprocess.run(command, capture_output=True, text=True, check=False, timeout=900)
    assert single.returncode == 0, single.stderr[-3000:]
    alone = json.loads((reference / "metrics.json").read_text())
    assert alone["processes"] == 2 and alone["steps"] == metrics["steps"] == spec.train.max_steps
    assert metrics["train_loss"] == pytest.approx(alone["train_loss"], rel=1e-5)
    assert metrics["eval_loss"] == pytest.approx(alone["eval_loss"], rel=1e-5)
    mine, theirs = _weights(two_nodes), _weights(reference)
    assert mine.keys() == theirs.keys() and mine
    worst = max(float((mine[k] - theirs[k]).abs().max()) for k in mine)
    assert worst < 1e-5, worst
    # And training moved the adapter: equal weights are not two untouched initialisations.
    assert metrics["eval_loss"] < metrics["eval_loss_before"]


@pytest.mark.slow
def test_a_node_killed_mid_run_ends_the_group_and_a_rerun_resumes_from_the_newest_checkpoint(
    tmp_path: Path, tiny_model: Path
) -> None:
    spec_path = _spec(tmp_path, tiny_model, nodes=2, max_steps=400, epochs=50, save_steps=3)
    command = [sys.executable, "-m", "saige_k8s", "run", "-f", str(spec_path), "--run", RUN]
    runner = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state_file = tmp_path / "data" / "pipelines" / RUN / "train.json"
    checkpoints = tmp_path / "data" / "runs" / RUN / "checkpoints"
    try:
        assert wait_for(lambda: len(list(checkpoints.glob("step-*"))) >= 2, timeout=600, interval=0.1)
        import psutil

        # The machine is gone: its launcher and its worker (torchrun starts each worker in a session of its own).
        launcher = psutil.Process(json.loads(state_file.read_text())["nodes"][1])
        for process in [*launcher.children(recursive=True), launcher]:
            process.send_signal(signal.SIGKILL)
        _, stderr = runner.communicate(timeout=300)
    finally:
        runner.kill()
    assert runner.returncode == 1, stderr[-3000:]
    assert "step train node 1 failed with exit code -9" in stderr
    status = json.loads(state_file.read_text())
    assert status["state"] == "Failed"
    newest = max(int(p.name.split("-")[1]) for p in checkpoints.glob("step-*"))
    assert 3 <= newest < 400

    resumed = _run(_spec(tmp_path, tiny_model, nodes=2, max_steps=newest + 3, epochs=50, save_steps=3))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # It went on from the checkpoint: the rerun logged only steps past it, and stopped 3 later.
    logged = [int(step) for step in re.findall(r"step (\d+) loss", resumed.stderr)]
    assert logged and min(logged) > newest, logged
    metrics = json.loads((tmp_path / "data" / "runs" / RUN / "metrics.json").read_text())
    assert metrics["steps"] == newest + 3
