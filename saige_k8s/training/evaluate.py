"""Candidate against champion, item by item: does the new adapter prefer the better answer?

Both models score the same items: the dataset's held-out preference pairs (when it has
them) and the shipped scenario suite. Per item and model the *margin* is the mean
log-probability per token of the better response minus that of the worse one, each given
the prompt in the dataset's chat format, tokenized and masked exactly as in training. One
base model is loaded; the candidate's and the champion's adapters are switched on it (the
base alone is the baseline of a first run).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from saige_k8s.dataset.formats import FORMATS, user_turn
from saige_k8s.dataset.suite import Suite, load_suite
from saige_k8s.errors import InputError
from saige_k8s.evaluation.champion import ChampionStore
from saige_k8s.evaluation.compare import paired_comparison
from saige_k8s.evaluation.gate import decide
from saige_k8s.experiences.schema import HARM_COMPONENTS, PRINCIPLES
from saige_k8s.spec import EvaluateSpec, TrainSpec
from saige_k8s.training import atomic
from saige_k8s.training.data import Example, collate, load_dataset_dir, tokenize, tokenize_all
from saige_k8s.training.loop import ADAPTER, METRICS
from saige_k8s.training.model import load_base_model, load_tokenizer
from saige_k8s.training.serving import publish

log = logging.getLogger(__name__)

PAIRS_EVAL = "pairs-eval.parquet"
EVAL_SPLIT = "eval.parquet"


@dataclass(frozen=True)
class Item:
    """One comparison: a prompt (its user turn) with a better and a worse response."""

    source: str  # "pair" or "suite"
    id: str
    turn: str
    good: str
    bad: str
    principle: str | None
    component: str | None


def suite_items(suite: Suite, format_name: str) -> list[Item]:
    fmt = FORMATS[format_name]
    items = []
    for scenario in suite.scenarios:
        context = scenario.context_text()
        target = scenario.target
        items.append(
            Item(
                source="suite",
                id=scenario.id,
                turn=user_turn(scenario.user.strip(), context, fmt),
                good=scenario.good.strip(),
                bad=scenario.bad.strip(),
                principle=target if target in PRINCIPLES else None,
                component=target if target in HARM_COMPONENTS else None,
            )
        )
    return items


def pair_items(dataset: Path, limit: int | None) -> list[Item]:
    """The dataset's held-out preference pairs (none when the dataset has no pairs file)."""
    path = dataset / PAIRS_EVAL
    if not path.exists():
        return []
    rows = pq.read_table(path).to_pylist()[:limit]
    return [
        Item(
            source="pair",
            id=f"{row['chosen_id']}>{row['rejected_id']}",
            turn=next(m["content"] for m in row["prompt"] if m["role"] == "user"),
            good=row["chosen"][0]["content"],
            bad=row["rejected"][0]["content"],
            principle=row.get("principle"),
            component=row.get("component"),
        )
        for row in rows
    ]


@torch.no_grad()
def token_sums(model: Any, examples: Sequence[Example], pad_id: int, batch_size: int) -> np.ndarray:
    """Per example: [sum of the label tokens' log-probabilities, number of label tokens]."""
    device = next(model.parameters()).device
    out = np.zeros((len(examples), 2))
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        batch = {k: torch.tensor(v, device=device) for k, v in collate([examples[i] for i in chosen], pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), labels, ignore_index=-100, reduction="none"
        )
        counts = (labels != -100).sum(dim=1)
        out[chosen, 0] = (-losses.sum(dim=1)).double().cpu().numpy()
        out[chosen, 1] = counts.double().cpu().numpy()
    return out


@dataclass(frozen=True)
class Scored:
    """One model's figures on the items and the eval split."""

    margins: np.ndarray
    eval_loss: float | None


class Evaluator:
    """The base model once, with the adapters that take turns on it."""

    def __init__(self, spec: TrainSpec, candidate: Path, baseline: Path | None, batch_size: int) -> None:
        from peft import PeftModel

        self.spec = spec
        self.tokenizer = load_tokenizer(spec)
        base = load_base_model(spec)
        self.model = PeftModel.from_pretrained(base, candidate, adapter_name="candidate")
        if baseline is not None:
            self.model.load_adapter(str(baseline), adapter_name="baseline")
        self.has_baseline_adapter = baseline is not None
        self.model.eval()
        self.batch_size = batch_size

    def score(self, which: str, items: Sequence[Item], evaluation: Sequence[Example], fmt: str, system: str) -> Scored:
        examples = [
            tokenize(self.tokenizer, fmt, system, item.turn, response, self.spec.max_seq_len)
            for item in items
            for response in (item.good, item.bad)
        ]
        if which == "candidate":
            self.model.set_adapter("candidate")
            sums, held_out = self._sums(examples), self._sums(evaluation)
        elif self.has_baseline_adapter:
            self.model.set_adapter("baseline")
            sums, held_out = self._sums(examples), self._sums(evaluation)
        else:
            with self.model.disable_adapter():
                sums, held_out = self._sums(examples), self._sums(evaluation)
        means = sums[:, 0] / np.maximum(sums[:, 1], 1)
        margins = means[0::2] - means[1::2]
        tokens = held_out[:, 1].sum()
        return Scored(margins, float(-held_out[:, 0].sum() / tokens) if tokens else None)

    def _sums(self, examples: Sequence[Example]) -> np.ndarray:
        if not examples:
            return np.zeros((0, 2))
        return token_sums(self.model, examples, self.tokenizer.pad_token_id, self.batch_size)


EVAL_FILE = "eval.json"


def evaluate_run(run_dir: Path, data_root: Path, pipeline: str, settings: EvaluateSpec) -> dict[str, Any]:
    """Compare the run's adapter with the champion, write RUN_DIR/eval.json, record the verdict.

    A promoted candidate becomes the champion. Evaluating a run again (a retried pod) reports
    the verdict it already has instead of judging twice.
    """
    suite = load_suite([Path(p) for p in settings.suite])  # a broken suite file is an error, even on a rerun
    done = _existing(run_dir)
    if done is not None:
        log.info("%s was evaluated already (%s); reporting it", run_dir.name, done["verdict"])
        return done
    metrics = read_run(run_dir)
    candidate = run_dir.name
    store = ChampionStore(data_root, pipeline)
    champion, baseline_dir, notes = _baseline(store, data_root, candidate, metrics["base_model"])
    train_spec = TrainSpec.model_validate(metrics["hyperparameters"])
    dataset = _dataset_dir(metrics, data_root)
    items = pair_items(dataset, settings.max_pairs) + suite_items(suite, metrics["format"])
    started = time.perf_counter()
    evaluator = Evaluator(train_spec, run_dir / ADAPTER, baseline_dir, settings.batch_size)
    # The same eval examples training reported its eval loss on (train.max_eval_examples).
    held_out = tokenize_all(
        evaluator.tokenizer, load_dataset_dir(dataset), "eval", train_spec.max_seq_len, train_spec.max_eval_examples
    )
    fmt, system = metrics["format"], metrics.get("system_prompt", "")
    scores = {which: evaluator.score(which, items, held_out, fmt, system) for which in ("candidate", "baseline")}
    comparison = paired_comparison(
        scores["candidate"].margins,
        scores["baseline"].margins,
        principles=[item.principle for item in items],
        components=[item.component for item in items],
        seed=settings.seed,
    )
    verdict = decide(comparison, settings.gate, scores["candidate"].eval_loss, scores["baseline"].eval_loss)
    result = {
        "candidate": candidate,
        "baseline": champion,
        "baseline_model": "champion adapter" if champion else "base model",
        "pipeline": pipeline,
        "dataset_id": metrics.get("dataset_id"),
        "base_model": metrics["base_model"],
        "items": {"pairs": sum(i.source == "pair" for i in items), "suite": sum(i.source == "suite" for i in items)},
        "eval_loss": {which: score.eval_loss for which, score in scores.items()},
        "comparison": comparison.as_dict(),
        "gate": settings.gate.model_dump(),
        **verdict.as_dict(),
        "notes": [*notes, *verdict.notes],
        "per_item": [
            {"id": item.id, "source": item.source, "candidate": float(c), "baseline": float(b)}
            for item, c, b in zip(items, scores["candidate"].margins, scores["baseline"].margins, strict=True)
        ],
        "duration_seconds": time.perf_counter() - started,
        "time": now(),
    }
    with atomic.writing(run_dir / EVAL_FILE):
        atomic.write_text(run_dir / EVAL_FILE, json.dumps(result, indent=2, default=str) + "\n")
    record = {
        "dataset_id": result["dataset_id"],
        "base_model": result["base_model"],
        "reasons": verdict.reasons,
        "figures": verdict.figures,
    }
    if verdict.promoted:
        store.promote(candidate, **record)
        publish(data_root, store.pipeline)  # the serving directory follows the champion
    else:
        store.reject(candidate, **record)
    return result


def champion_since(data_root: Path, pipeline: str) -> float | None:
    """When the current champion became it (epoch seconds), from the history's last line that made it so."""
    store = ChampionStore(data_root, pipeline)
    champion = store.champion()
    made = [
        e
        for e in store.history()
        if e.get("run_id") == champion and e.get("verdict") in ("promoted", "promote", "rollback")
    ]
    if not made:
        return None
    try:
        return dt.datetime.fromisoformat(str(made[-1]["time"]).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """The one-line JSON the step hands on (its pod's termination message: keep it short)."""
    keys = ("dataset_id", "candidate", "baseline", "verdict")
    return {**{k: result.get(k) for k in keys}, "reasons": result.get("reasons", [])[:5]}


def _existing(run_dir: Path) -> dict[str, Any] | None:
    try:
        done: dict[str, Any] = json.loads((run_dir / EVAL_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return done if done.get("candidate") == run_dir.name and done.get("verdict") in ("promoted", "rejected") else None


def _baseline(
    store: ChampionStore, data_root: Path, candidate: str, base_model: str
) -> tuple[str | None, Path | None, list[str]]:
    """The champion and its adapter; none for a first run, or when the champion has another base model."""
    champion = store.champion()
    if champion is None or champion == candidate:
        return None, None, ["no champion yet: the baseline is the base model"] if champion is None else []
    adapter = data_root / "runs" / champion / ADAPTER
    if not (adapter / "adapter_config.json").is_file():
        raise InputError(
            f"the champion {champion} has no adapter at {adapter}: restore it, or choose another champion "
            f"(saige-k8s models; saige-k8s promote RUN)"
        )
    try:
        champion_base = read_run(adapter.parent)["base_model"]
    except (InputError, KeyError):
        champion_base = base_model
    if champion_base != base_model:
        note = f"the champion {champion} adapts {champion_base}, not {base_model}: the baseline is the base model"
        return None, None, [note]
    return champion, adapter, []


def _dataset_dir(metrics: dict[str, Any], data_root: Path) -> Path:
    recorded = Path(str(metrics.get("dataset_path") or ""))
    if recorded.is_dir():
        return recorded
    fallback = data_root / "datasets" / str(metrics.get("dataset_id"))
    if not fallback.is_dir():
        raise InputError(f"the run's dataset is gone: neither {recorded} nor {fallback} exists")
    return fallback


def read_run(run_dir: Path) -> dict[str, Any]:
    """The finished training run's metrics.json; a run without its adapter is an input error."""
    path = run_dir / METRICS
    if not (run_dir / ADAPTER / "adapter_config.json").is_file() or not path.is_file():
        raise InputError(f"not a finished training run (no {ADAPTER}/ or {METRICS}): {run_dir}")
    try:
        metrics: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"unreadable {path}: {exc}") from None
    return metrics


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
