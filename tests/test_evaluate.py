"""The evaluate step on a tiny model: a candidate taught the suite's good answers is promoted over
the base model; one taught its bad answers is then rejected, naming the principles it regressed;
promote and rollback by hand; bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import need_tool, run_cli

try:
    import torch  # noqa: F401
except ImportError:
    need_tool("torch is not installed (pip install -e '.[train]')")

from saige_k8s.dataset.formats import DEFAULT_SYSTEM_PROMPT, FORMATS, render, user_turn
from saige_k8s.dataset.suite import load_suite
from tests.tiny_model import build_tiny_model

FORMAT = "tinyllama"


def _dataset(root: Path, name: str, answer: str) -> None:
    """A published dataset whose examples answer the suite's prompts with their good or bad answer."""
    fmt = FORMATS[FORMAT]
    suite = load_suite()
    rows = []
    for copy in range(4):
        for scenario in suite.scenarios:
            turn = user_turn(scenario.user, scenario.context_text(), fmt)
            response = getattr(scenario, answer)
            rows.append(
                {
                    "id": f"{scenario.id}-{copy}",
                    "messages": [
                        {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                        {"role": "user", "content": turn},
                        {"role": "assistant", "content": response},
                    ],
                }
            )
    directory = root / "datasets" / name
    directory.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), directory / "train.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:: len(rows) // 8]), directory / "eval.parquet")
    manifest = {"dataset_id": name, "format": FORMAT, "system_prompt": DEFAULT_SYSTEM_PROMPT}
    (directory / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("evaluate")
    suite = load_suite()
    corpus = [
        "".join(render(FORMATS[FORMAT], DEFAULT_SYSTEM_PROMPT, s.user, s.context_text(), answer))
        for s in suite.scenarios
        for answer in (s.good, s.bad)
    ]
    model = build_tiny_model(base / "model", corpus * 3)
    root = base / "data"
    _dataset(root, "good-answers", "good")
    _dataset(root, "bad-answers", "bad")
    spec = {
        "name": "evaltest",
        "data_root": str(root),
        "train": {
            "model": str(model),
            "max_steps": 60,
            "batch_size": 8,
            "max_seq_len": 256,
            "learning_rate": 0.01,
            "target_modules": ["all-linear"],
            "logging_steps": 20,
            "gpus": 0,
        },
        "evaluate": {"gate": {"max_eval_loss_rise": 1.0, "min_items": 3, "margin_tolerance": 0.0}},
    }
    path = base / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    for run, dataset in (("taught-good", "good-answers"), ("taught-bad", "bad-answers")):
        trained = run_cli("train", "-f", path, "--dataset", dataset, "--output-dir", root / "runs" / run)
        assert trained.exit_code == 0, trained.stderr
    return path, root


def test_a_candidate_that_learnt_the_good_answers_is_promoted_over_the_base_model(workspace) -> None:
    spec, root = workspace
    result = run_cli("evaluate", root / "runs" / "taught-good", "-f", spec, "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["verdict"] == "promoted" and summary["baseline"] is None
    report = json.loads((root / "runs" / "taught-good" / "eval.json").read_text())
    overall = report["comparison"]["overall"]
    assert overall["n"] == len(load_suite().scenarios)
    assert overall["candidate_win_rate"] > overall["baseline_win_rate"]
    assert set(report["comparison"]["principles"]) == {"ahimsa", "sacca", "karuna", "panna", "upekkha"}
    assert (root / "models" / "evaltest" / "CHAMPION").read_text().strip() == "taught-good"
    prom = (root / "runs" / "taught-good" / "eval.prom").read_text()
    assert 'saige_eval_verdict{pipeline="evaltest",verdict="promoted"} 1.0' in prom
    assert 'saige_champion_promoted_timestamp_seconds{pipeline="evaltest"} ' in prom
    again = run_cli("evaluate", root / "runs" / "taught-good", "-f", spec, "--json")  # a retried pod
    assert again.exit_code == 0 and json.loads(again.stdout) == summary


def test_a_candidate_that_learnt_the_bad_answers_is_rejected_naming_the_principles(workspace) -> None:
    spec, root = workspace
    run_cli("evaluate", root / "runs" / "taught-good", "-f", spec)  # the champion, whichever test runs first
    result = run_cli("evaluate", root / "runs" / "taught-bad", "-f", spec, "--json")
    assert result.exit_code == 3, result.stderr
    assert "candidate taught-bad rejected; the champion stays" in result.stderr
    summary = json.loads(result.stdout)
    assert summary["verdict"] == "rejected" and summary["baseline"] == "taught-good"
    report = json.loads((root / "runs" / "taught-bad" / "eval.json").read_text())
    regressed = [r for r in report["reasons"] if " regressed: " in r]
    assert regressed, report["reasons"]
    named = {r.split(" regressed")[0] for r in regressed}
    assert named & {"ahimsa", "sacca", "karuna", "panna", "upekkha"}
    assert (root / "models" / "evaltest" / "CHAMPION").read_text().strip() == "taught-good"
    history = json.loads(run_cli("models", "-f", spec, "-o", "json").stdout)["history"]
    assert [(h["run_id"], h["verdict"]) for h in history][-1] == ("taught-bad", "rejected")
    prom = (root / "runs" / "taught-bad" / "eval.prom").read_text()
    assert (
        'saige_champion_promoted_timestamp_seconds{pipeline="evaltest"} ' in prom
    )  # the champion's age survives a rejection
    assert any(
        f'saige_eval_regressed{{group="{name}",kind="principle",pipeline="evaltest"}} 1.0' in prom for name in named
    )
    refused = run_cli("export", root / "runs" / "taught-bad")
    assert refused.exit_code == 2 and "was rejected by the gate" in refused.stderr
    assert not (root / "runs" / "taught-bad" / "merged").exists()


def test_promote_and_rollback_by_hand_are_recorded(workspace) -> None:
    spec, root = workspace
    run_cli("evaluate", root / "runs" / "taught-good", "-f", spec)
    promoted = run_cli("promote", "taught-bad", "-f", spec, "--reason", "a person overrode the gate")
    assert promoted.exit_code == 0, promoted.stderr
    assert (root / "models" / "evaltest" / "CHAMPION").read_text().strip() == "taught-bad"
    back = run_cli("rollback", "-f", spec)
    assert back.exit_code == 0, back.stderr
    assert "taught-good is the champion" in back.stdout
    listing = run_cli("models", "-f", spec)
    assert listing.stdout.splitlines()[0] == "champion: taught-good"
    verdicts = [line.split()[1] for line in listing.stdout.splitlines()[1:]]
    assert verdicts[-2:] == ["promote", "rollback"]
    unknown = run_cli("promote", "no-such-run", "-f", spec)
    assert unknown.exit_code == 2 and "has no adapter" in unknown.stderr


def test_bad_input_is_one_clear_line(workspace, tmp_path: Path) -> None:
    spec, root = workspace
    no_adapter = run_cli("evaluate", tmp_path, "-f", spec)
    assert no_adapter.exit_code == 2
    assert no_adapter.stderr.startswith("saige-k8s: error: not a finished training run (no adapter/")
    broken_suite = tmp_path / "suite.yaml"
    broken_suite.write_text("version: 1\nscenarios:\n  - {id: x-1, target: sacca, user: hi, context: null, good: ok}\n")
    missing_field = run_cli("evaluate", root / "runs" / "taught-bad", "-f", spec, "--suite", broken_suite)
    assert missing_field.exit_code == 2
    assert "suite.yaml: scenarios[0].bad: Field required" in missing_field.stderr
    gate = tmp_path / "gate.yaml"
    gate.write_text(yaml.safe_dump({"evaluate": {"gate": {"alpha": 1.5}}}))
    out_of_range = run_cli("evaluate", root / "runs" / "taught-bad", "-f", gate)
    assert out_of_range.exit_code == 2
    assert "evaluate.gate.alpha" in out_of_range.stderr
    for result in (no_adapter, missing_field, out_of_range):
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_packed_scoring_equals_scoring_each_response_alone(workspace) -> None:
    """A pair shares one row (the prompt once, logits only where a response token is predicted):
    its figures must equal those of each response scored as a sequence of its own."""
    import numpy as np
    import torch

    from saige_k8s.spec import TrainSpec
    from saige_k8s.training.data import IGNORE, load_dataset_dir, tokenize, tokenize_all
    from saige_k8s.training.evaluate import Evaluator, read_run, suite_items

    _, root = workspace
    run = root / "runs" / "taught-bad"
    metrics = read_run(run)
    spec = TrainSpec.model_validate(metrics["hyperparameters"])
    evaluator = Evaluator(spec, run / "adapter", root / "runs" / "taught-good" / "adapter", batch_size=3)
    items = suite_items(load_suite(), FORMAT)[:7]

    def alone(response: str, turn: str) -> float:
        example = tokenize(evaluator.tokenizer, FORMAT, DEFAULT_SYSTEM_PROMPT, turn, response, spec.max_seq_len)
        with torch.no_grad():
            logits = evaluator.model(input_ids=torch.tensor([example.input_ids])).logits[0, :-1]
        labels = torch.tensor(example.labels[1:])
        keep = labels != IGNORE
        return float(-torch.nn.functional.cross_entropy(logits[keep], labels[keep]))

    for which in ("candidate", "baseline"):
        evaluator.model.set_adapter(which)
        expected = [alone(item.good, item.turn) - alone(item.bad, item.turn) for item in items]
        np.testing.assert_allclose(evaluator.margins(which, items, FORMAT, DEFAULT_SYSTEM_PROMPT), expected, atol=1e-5)
    held_out = tokenize_all(evaluator.tokenizer, load_dataset_dir(root / "datasets" / "bad-answers"), "eval", 256)
    assert evaluator.eval_loss("candidate", held_out) == pytest.approx(metrics["eval_loss"], rel=1e-4)
