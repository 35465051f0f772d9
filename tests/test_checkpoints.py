"""Checkpoints hold the adapter only, a damaged one is skipped, outputs are replaced whole."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import need_tool, run_cli

try:
    import torch  # noqa: F401
except ImportError:
    need_tool("torch is not installed (pip install -e '.[train]')")

from tests.tiny_model import mistral_workspace

STEP4, STEP8 = "step-00000004", "step-00000008"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mistral_workspace(tmp_path_factory.mktemp("checkpoints"))


def _train(root: Path, run: Path, *extra: str):
    dataset, model = root / "data" / "datasets" / "m", root / "model"
    flags = "--batch-size 8 --max-seq-len 256 --learning-rate 3e-3 --logging-steps 2 --save-steps 4 --max-steps 8"
    return run_cli("train", "--dataset", dataset, "--model", model, "--output-dir", run, *flags.split(), *extra)


@pytest.fixture(scope="module")
def finished(root: Path) -> Path:
    """A run of 8 steps, checkpoints at steps 4 and 8, never interrupted."""
    run = root / "finished"
    result = _train(root, run)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [STEP4, STEP8]
    return run


def _copy(finished: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    return run


def _adapter(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "adapter" / "adapter_model.safetensors")


def _same_adapter(a: Path, b: Path) -> bool:
    first, second = _adapter(a), _adapter(b)
    return first.keys() == second.keys() and all(bool((first[k] == second[k]).all()) for k in first)


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_checkpoint_holds_the_trainable_weights_only(root: Path, finished: Path) -> None:
    from safetensors import safe_open

    checkpoint = finished / "checkpoints" / STEP8
    with safe_open(checkpoint / "model.safetensors", "pt") as weights:
        names = list(weights.keys())
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    with safe_open(finished / "adapter" / "adapter_model.safetensors", "pt") as adapter:
        assert len(names) == len(list(adapter.keys()))
    weights_size = (checkpoint / "model.safetensors").stat().st_size
    adapter_size = (finished / "adapter" / "adapter_model.safetensors").stat().st_size
    assert weights_size < 1.2 * adapter_size
    assert weights_size < 0.2 * (root / "model" / "model.safetensors").stat().st_size


def test_resume_from_a_checkpoint_is_exact(root: Path, finished: Path, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="saige_k8s")
    run = _copy(finished, tmp_path)
    shutil.rmtree(run / "checkpoints" / STEP8)
    shutil.rmtree(run / "adapter")
    result = _train(root, run)
    assert result.exit_code == 0, result.output
    assert "resuming at step 4" in caplog.text
    assert json.loads((run / "metrics.json").read_text())["steps"] == 8
    assert _same_adapter(run, finished)


def test_a_4bit_run_resumes_exactly(root: Path, tmp_path: Path, caplog) -> None:
    """QLoRA: the quantised base is loaded again, not saved; bitsandbytes' CPU inference repacking
    (at the first evaluation) must not make the first run train differently from a resumed one."""
    pytest.importorskip("bitsandbytes")
    caplog.set_level(logging.INFO, logger="saige_k8s")
    whole = tmp_path / "whole"
    assert _train(root, whole, "--use-4bit").exit_code == 0
    run = tmp_path / "resumed"
    shutil.copytree(whole, run)
    shutil.rmtree(run / "checkpoints" / STEP8)
    shutil.rmtree(run / "adapter")
    result = _train(root, run, "--use-4bit")
    assert result.exit_code == 0, result.output
    assert "resuming at step 4" in caplog.text
    assert _same_adapter(run, whole)
    assert any(bool(t.any()) for k, t in _adapter(run).items() if "lora_B" in k)  # it learnt (B starts at 0)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE: dict[str, tuple[str, Callable[[Path], None]]] = {
    "truncated weights": ("model.safetensors", _truncate),
    "missing weights": ("model.safetensors", Path.unlink),
    "empty optimizer": ("optimizer.bin", lambda p: p.write_bytes(b"")),
    "empty trainer state": ("trainer_state.json", lambda p: p.write_bytes(b"")),
    "truncated scheduler": ("scheduler.bin", _truncate),
    "truncated RNG state": ("random_states_0.pkl", _truncate),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(
    root: Path, finished: Path, tmp_path: Path, caplog, damage: str
) -> None:
    caplog.set_level(logging.INFO, logger="saige_k8s")
    run = _copy(finished, tmp_path)
    name, spoil = DAMAGE[damage]
    spoil(run / "checkpoints" / STEP8 / name)
    shutil.rmtree(run / "adapter")
    (run / "metrics.json").unlink()
    result = _train(root, run)
    assert result.exit_code == 0, result.output
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(STEP8 in w and name in w for w in warnings), warnings
    assert "resuming at step 4" in caplog.text
    assert json.loads((run / "metrics.json").read_text())["steps"] == 8
    assert _same_adapter(run, finished)  # the exact run: the damaged state was not used
    assert (run / "checkpoints" / STEP8 / "trainer_state.json").stat().st_size > 0  # saved again, whole


def test_no_usable_checkpoint_trains_from_scratch(root: Path, finished: Path, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="saige_k8s")
    run = _copy(finished, tmp_path)
    for step in (STEP4, STEP8):
        _truncate(run / "checkpoints" / step / "model.safetensors")
    result = _train(root, run)
    assert result.exit_code == 0, result.output
    assert "starts from scratch" in caplog.text and "resuming" not in caplog.text
    assert json.loads((run / "metrics.json").read_text())["steps"] == 8
    assert _same_adapter(run, finished)  # same seed, same run


def _assert_failed_on_a_full_disk(result, run: Path) -> None:
    """Exit 1, one clear line, and no temporary left in the run directory."""
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []
    assert "cannot write" in result.stderr and "No space left on device" in result.stderr


def _fails_half_written(name: str):
    """A save_pretrained that writes part of ``name`` and then finds the disk full."""

    def half_written(self, directory, *args, **kwargs) -> None:
        (Path(directory) / name).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    return half_written


def test_a_failed_adapter_write_leaves_the_previous_adapter_and_metrics(
    root: Path, finished: Path, tmp_path: Path, monkeypatch
) -> None:
    from peft import PeftModel

    run = _copy(finished, tmp_path)
    before = _snapshot(run / "adapter")
    metrics = (run / "metrics.json").read_bytes()

    monkeypatch.setattr(PeftModel, "save_pretrained", _fails_half_written("adapter_model.safetensors"))
    result = _train(root, run)
    _assert_failed_on_a_full_disk(result, run)
    assert _snapshot(run / "adapter") == before
    assert (run / "metrics.json").read_bytes() == metrics


def test_a_failed_export_leaves_the_previous_merged_model_and_modelfile(
    finished: Path, tmp_path: Path, monkeypatch
) -> None:
    from transformers import PreTrainedModel

    run = _copy(finished, tmp_path)
    assert run_cli("export", str(run)).exit_code == 0
    before = _snapshot(run / "merged")
    modelfile = (run / "Modelfile").read_bytes()

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", _fails_half_written("model.safetensors"))
    result = run_cli("export", str(run))
    _assert_failed_on_a_full_disk(result, run)
    assert _snapshot(run / "merged") == before
    assert (run / "Modelfile").read_bytes() == modelfile


def test_stale_temporaries_are_removed_and_never_taken_for_checkpoints(
    root: Path, finished: Path, tmp_path: Path, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="saige_k8s")
    run = _copy(finished, tmp_path)
    dead = _dead_pid()
    live = subprocess.Popen(["sleep", "60"])
    try:
        (run / f".metrics.json.{dead}.tmp").write_text("{")
        (run / f".tmp-adapter-{dead}").mkdir()
        (run / f".tmp-adapter-{dead}" / "adapter_model.safetensors").write_bytes(b"partial")
        (run / f".tmp-adapter-{live.pid}").mkdir()  # its writer is still at work
        # A checkpoint killed mid-save, whole-looking and newer than any complete one.
        half = run / "checkpoints" / f".tmp-step-00000012-{dead}"
        shutil.copytree(run / "checkpoints" / STEP8, half)
        (half / "trainer_state.json").write_text(json.dumps({"step": 12, "epoch": 0, "batch_in_epoch": 12}))
        result = _train(root, run)
        assert result.exit_code == 0, result.output
        assert "resuming at step 8" in caplog.text
        assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == [f".tmp-adapter-{live.pid}"]
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [STEP4, STEP8]
    finally:
        live.kill()
        live.wait()


def test_write_text_failing_midway_keeps_the_old_file(tmp_path: Path, monkeypatch) -> None:
    from saige_k8s.training import atomic

    target = tmp_path / "metrics.json"
    target.write_text("old")

    def fail(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="Input/output"):
        atomic.write_text(target, "new " * 10_000)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_replacing_a_directory_is_all_or_nothing(tmp_path: Path) -> None:
    from saige_k8s.training import atomic

    target = tmp_path / "adapter"
    target.mkdir()
    (target / "weights").write_text("old")
    with pytest.raises(RuntimeError), atomic.replacing_dir(target) as tmp:
        (tmp / "weights").write_text("half")
        raise RuntimeError("killed")
    assert (target / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    with atomic.replacing_dir(target) as tmp:
        (tmp / "weights").write_text("new")
        assert (target / "weights").read_text() == "old"  # readers see the old one until the swap
    assert (target / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_a_kill_mid_swap_gets_the_old_directory_back(tmp_path: Path) -> None:
    from saige_k8s.training import atomic

    dead = _dead_pid()
    aside = tmp_path / f".tmp-adapter.old-{dead}"
    aside.mkdir()
    (aside / "weights").write_text("old")
    atomic.remove_stale(tmp_path)
    assert (tmp_path / "adapter" / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
