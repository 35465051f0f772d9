"""Preference training (dpo, kto) and score-weighted SFT: losses against their formulas, the
extraction's KTO part, exact resume after SIGKILL, metrics, and the errors for bad input."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import need_tool, run_cli, wait_for

try:
    import torch
except ImportError:
    need_tool("torch is not installed (pip install -e '.[train]')")

from saige_k8s.dataset.curate import content_hashes
from saige_k8s.dataset.formats import FORMATS
from saige_k8s.dataset.kto import KTO_FILES, UNDESIRABLE_ALIGNMENT
from saige_k8s.experiences.filters import Filters
from saige_k8s.spec import TrainSpec
from saige_k8s.training.data import IGNORE, Example, load_dataset_dir, tokenize
from tests.tiny_model import mistral_workspace

BETA = 0.3


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mistral_workspace(tmp_path_factory.mktemp("preference"))


def _dataset(root: Path) -> Path:
    return root / "data" / "datasets" / "m"


# --- The extraction's KTO part ----------------------------------------------------------


def test_the_kto_part_holds_the_removed_poor_harmful_or_too_harmful_answers(root: Path) -> None:
    dataset = _dataset(root)
    manifest = json.loads((dataset / "manifest.json").read_text())
    threshold = Filters().max_harm
    kept_ids = set(pq.read_table(dataset / "train.parquet").column("id").to_pylist())
    kept_ids |= set(pq.read_table(dataset / "eval.parquet").column("id").to_pylist())
    fmt = FORMATS["mistral"]
    for split, name in KTO_FILES.items():
        table = pq.read_table(dataset / name)
        assert manifest["kto"][split] == table.num_rows == manifest["files"][name]["rows"]
        alignment = table.column("buddhist_alignment").to_pylist()
        harm = table.column("actual_harm").to_pylist()
        assert all(a in UNDESIRABLE_ALIGNMENT or h >= threshold for a, h in zip(alignment, harm, strict=True))
        assert not kept_ids & set(table.column("id").to_pylist())
        assert len(set(table.column("text").to_pylist())) == table.num_rows  # no exact duplicates
    assert manifest["kto"]["train"] > 0 and manifest["kto"]["eval"] > 0
    train_prompts = _prompt_keys(pq.read_table(dataset / "train.parquet"), fmt)
    eval_prompts = _prompt_keys(pq.read_table(dataset / "eval.parquet"), fmt)
    # Every answer to a prompt falls on one side of the split, with the kept answers to it.
    assert not _prompt_keys(pq.read_table(dataset / KTO_FILES["train"]), fmt) & eval_prompts
    assert not _prompt_keys(pq.read_table(dataset / KTO_FILES["eval"]), fmt) & train_prompts


def _prompt_keys(table, fmt) -> set[int]:
    import pyarrow as pa

    texts = table.column("text").to_pylist()
    bodies = pa.array([t.rsplit(fmt.assistant_open, 1)[0] for t in texts])
    return set(content_hashes(bodies).tolist())


# --- Known answers: the losses against their formulas ------------------------------------------


def _objective(root: Path, method: str, **settings):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from saige_k8s.training.model import load_model, load_tokenizer
    from saige_k8s.training.objectives import objective_for

    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(cpu=True)
    spec = TrainSpec(model=str(root / "model"), method=method, beta=BETA, lora_dropout=0.0, max_seq_len=256, **settings)
    tokenizer = load_tokenizer(spec)
    objective = objective_for(spec, tokenizer, load_dataset_dir(_dataset(root)), accelerator)
    torch.manual_seed(0)
    model = load_model(spec)
    with torch.no_grad():  # a trained-looking adapter: the policy differs from the reference
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    model.train()
    return objective, model, tokenizer


def _logp_by_hand(model, example: Example, adapter: bool) -> float:
    """Sum over the label tokens of log p(token | the tokens before it), one unpadded sequence."""
    with torch.no_grad():
        if adapter:
            logits = model(input_ids=torch.tensor([example.input_ids])).logits[0]
        else:
            with model.disable_adapter():
                logits = model(input_ids=torch.tensor([example.input_ids])).logits[0]
    logits = logits.double()
    total = 0.0
    for t in range(1, len(example.input_ids)):
        if example.labels[t] != IGNORE:
            row = logits[t - 1]
            total += float(row[example.labels[t]] - torch.logsumexp(row, 0))
    return total


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_dpo_loss_matches_its_formula(root: Path) -> None:
    objective, model, _ = _objective(root, "dpo")
    picked = [0, 5, 9]  # of different lengths: padding must not change a log-probability
    assert len({len(objective.pairs[i].chosen) for i in picked}) > 1
    loss, figures = objective.loss(model, objective.batch(picked, torch.device("cpu"), 1))
    losses, chosen_rewards, rejected_rewards = [], [], []
    for i in picked:
        pair = objective.pairs[i]
        pc_, pr = _logp_by_hand(model, pair.chosen, True), _logp_by_hand(model, pair.rejected, True)
        rc, rr = _logp_by_hand(model, pair.chosen, False), _logp_by_hand(model, pair.rejected, False)
        chosen_rewards.append(BETA * (pc_ - rc))
        rejected_rewards.append(BETA * (pr - rr))
        losses.append(-math.log(_sigmoid(chosen_rewards[-1] - rejected_rewards[-1])))
    assert abs(loss.item() - sum(losses) / 3) < 1e-5
    assert abs(float(loss) - math.log(2)) > 1e-3  # the adapter moved the policy: not the trivial value
    assert abs(figures["rewards/chosen"][0] / 3 - sum(chosen_rewards) / 3) < 1e-5
    assert abs(figures["rewards/rejected"][0] / 3 - sum(rejected_rewards) / 3) < 1e-5
    wins = sum(c > r for c, r in zip(chosen_rewards, rejected_rewards, strict=True))
    assert figures["rewards/accuracy"] == (wins, 3)
    loss.backward()  # the loss trains the adapter
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora" in n)


def test_kto_loss_matches_its_formula(root: Path) -> None:
    objective, model, tokenizer = _objective(root, "kto", desirable_weight=1.5, undesirable_weight=0.7)
    desirable = [i for i, item in enumerate(objective.items) if item.desirable][:2]
    undesirable = [i for i, item in enumerate(objective.items) if not item.desirable][:2]
    picked = [desirable[0], undesirable[0], desirable[1], undesirable[1]]
    loss, figures = objective.loss(model, objective.batch(picked, torch.device("cpu"), 1))
    items = [objective.items[i] for i in picked]
    # The reference point: each prompt with the previous example's answer (the first with the last's).
    kl_terms = []
    for j, item in enumerate(items):
        other = items[j - 1]
        mismatched = tokenize(tokenizer, "mistral", item.system, item.turn, other.response, 256)
        kl_terms.append(_logp_by_hand(model, mismatched, True) - _logp_by_hand(model, mismatched, False))
    z = max(0.0, sum(kl_terms) / len(kl_terms))
    losses = []
    for item in items:
        ratio = _logp_by_hand(model, item.example, True) - _logp_by_hand(model, item.example, False)
        if item.desirable:
            losses.append(1.5 * (1 - _sigmoid(BETA * (ratio - z))))
        else:
            losses.append(0.7 * (1 - _sigmoid(BETA * (z - ratio))))
    assert abs(float(loss) - sum(losses) / 4) < 1e-5
    # z is a difference of float32 sums over a hundred tokens: equal to float32's precision.
    assert figures["kl"][0] == pytest.approx(z, rel=1e-4) and z > 0
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora" in n)


def test_score_weighted_sft_scales_each_examples_loss(root: Path) -> None:
    from saige_k8s.training.objectives import example_weights

    objective, model, _ = _objective(root, "sft", sample_weights="weighted_score")
    data = load_dataset_dir(_dataset(root))
    assert objective.weights == example_weights(data.train_scores)
    assert abs(sum(objective.weights) / len(objective.weights) - 1) < 1e-9  # the loss keeps its scale
    picked = [0, 1, 2]
    assert len({round(objective.weights[i], 6) for i in picked}) > 1
    loss, _ = objective.loss(model, objective.batch(picked, torch.device("cpu"), 1))
    weighted, tokens = 0.0, 0
    for i in picked:
        example = objective.examples[i]
        weighted -= objective.weights[i] * _logp_by_hand(model, example, True)
        tokens += sum(label != IGNORE for label in example.labels[1:])
    assert abs(float(loss) - weighted / tokens) < 1e-5
    unweighted = objective.batch(picked, torch.device("cpu"), 1)
    unweighted["weights"] = torch.ones(3)
    assert (
        abs(
            float(objective.loss(model, unweighted)[0])
            - float(model(**{k: v for k, v in unweighted.items() if k != "weights"}).loss)
        )
        < 1e-5
    )


# --- Runs: resume after SIGKILL, metrics ------------------------------------------------------------

STEPS = "--batch-size 8 --max-seq-len 256 --learning-rate 3e-3 --logging-steps 3 --save-steps 3 --max-steps 12"


def _command(root: Path, run: Path, method: str) -> list[str]:
    return [
        sys.executable, "-m", "saige_k8s", "train", "--dataset", str(_dataset(root)), "--model", str(root / "model"),
        "--output-dir", str(run), "--method", method, "--beta", str(BETA), *STEPS.split(),
    ]  # fmt: skip


def _adapter(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "adapter" / "adapter_model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_a_run_killed_with_sigkill_resumes_exactly(root: Path, tmp_path: Path, method: str) -> None:
    whole = tmp_path / "whole"
    subprocess.run(_command(root, whole, method), check=True, capture_output=True)
    run = tmp_path / "run"
    proc = subprocess.Popen(_command(root, run, method), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for((run / "checkpoints" / "step-00000003").is_dir, timeout=300, interval=0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "metrics.json").exists()
    resumed = subprocess.run(_command(root, run, method), check=False, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at step" in resumed.stderr
    expected, got = json.loads((whole / "metrics.json").read_text()), json.loads((run / "metrics.json").read_text())
    assert got["steps"] == expected["steps"] == 12
    assert got["train_loss"] == expected["train_loss"]
    assert got["log"][-1] == {**expected["log"][-1], "tokens_per_second": got["log"][-1]["tokens_per_second"]}
    first, second = _adapter(whole), _adapter(run)
    assert first.keys() == second.keys() and all(bool((first[k] == second[k]).all()) for k in first)
    # The figures: in metrics.json, metrics.prom and TensorBoard.
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy"):
        assert key in got["log"][-1] and key in got["eval_preference"]
    assert 0 <= got["eval_preference"]["rewards/accuracy"] <= 1
    prom = (run / "metrics.prom").read_text()
    assert 'saige_train_rewards{kind="margins",pipeline="saige",split="eval"}' in prom
    assert 'saige_train_reward_accuracy{pipeline="saige",split="train"}' in prom
    assert f'method="{method}"' in next(line for line in prom.splitlines() if line.startswith("saige_train_info{"))
    tags = _tensorboard_tags(run)
    assert all(any(t.endswith(key) for t in tags) for key in ("rewards/chosen", "rewards/margins", "rewards/accuracy"))


def _tensorboard_tags(run: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    for events in (run / "tensorboard").rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        tags |= set(accumulator.Tags().get("scalars", []))
    return tags


# --- Bad input --------------------------------------------------------------------------------------


def _train(root: Path, dataset: Path, run: Path, *extra: str):
    flags = "--batch-size 4 --max-seq-len 128 --max-steps 1"
    return run_cli(
        "train", "--dataset", dataset, "--model", root / "model", "--output-dir", run, *flags.split(), *extra
    )


def test_dpo_without_pairs_and_kto_without_undesirable_answers_are_refused(root: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(_dataset(root), bare)
    for name in ("pairs-train.parquet", "pairs-eval.parquet", *KTO_FILES.values()):
        (bare / name).unlink()
    dpo = _train(root, bare, tmp_path / "r1", "--method", "dpo")
    assert dpo.exit_code == 2 and "no preference pairs (pairs-train.parquet)" in dpo.stderr, dpo.output
    kto = _train(root, bare, tmp_path / "r2", "--method", "kto")
    assert kto.exit_code == 2 and "no KTO part (kto-train.parquet)" in kto.stderr, kto.output
    assert "extract --kto" in kto.stderr
    empty = pq.read_table(_dataset(root) / KTO_FILES["train"]).schema.empty_table()
    pq.write_table(empty, bare / KTO_FILES["train"])  # a KTO part without a single undesirable answer
    none = _train(root, bare, tmp_path / "r3", "--method", "kto")
    assert none.exit_code == 2 and "no undesirable examples (kto-train.parquet)" in none.stderr, none.output
    for result in (dpo, kto, none):
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not any((tmp_path / run).exists() for run in ("r1", "r2", "r3"))


def test_the_kto_part_is_written_when_asked_for_or_when_the_spec_trains_with_kto(root: Path, tmp_path: Path) -> None:
    db = root / "saige.db"
    plain = run_cli("extract", "--db", db, "--data-root", tmp_path / "plain", "--dataset-id", "p", "--json")
    assert plain.exit_code == 0, plain.output
    manifest = json.loads((tmp_path / "plain" / "datasets" / "p" / "manifest.json").read_text())
    assert manifest["kto"] is None and not any(name.startswith("kto-") for name in manifest["files"])
    assert not list((tmp_path / "plain" / "datasets" / "p").glob("kto-*"))
    spec = tmp_path / "kto.yaml"
    spec.write_text("name: k\ntrain:\n  method: kto\n")
    by_spec = run_cli("extract", "-f", spec, "--db", db, "--data-root", tmp_path / "spec", "--dataset-id", "s")
    by_flag = run_cli("extract", "--kto", "--db", db, "--data-root", tmp_path / "flag", "--dataset-id", "f")
    for result, where in ((by_spec, tmp_path / "spec/datasets/s"), (by_flag, tmp_path / "flag/datasets/f")):
        assert result.exit_code == 0, result.output
        counts = json.loads((where / "manifest.json").read_text())["kto"]
        assert counts["train"] > 0
        assert pq.read_table(where / KTO_FILES["train"]).num_rows == counts["train"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--method", "dpo", "--sample-weights", "weighted_score"], "sample_weights applies to method sft"),
        (["--method", "kto", "--batch-size", "1"], "method kto needs batch_size 2 or more"),
        (["--method", "ppo"], "Invalid value for '--method'"),
        (["--method", "dpo", "--beta", "0"], "--beta"),
    ],
)
def test_settings_that_cannot_work_together_are_refused(root: Path, tmp_path: Path, flags, message) -> None:
    result = _train(root, _dataset(root), tmp_path / "r", *flags)
    assert result.exit_code == 2 and message in result.stderr, result.output
    assert "Traceback" not in result.stderr
