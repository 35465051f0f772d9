"""Candidate against champion, item by item: does the new adapter prefer the better answer?

Both models score the same items: the dataset's held-out preference pairs (when it has
them) and the shipped scenario suite. Per item and model the *margin* is the mean
log-probability per token of the better response minus that of the worse one, each given
the prompt in the dataset's chat format, tokenized and masked exactly as in training. One
base model is loaded; the candidate's and the champion's adapters are switched on it (the
base alone is the baseline of a first run).
"""

from __future__ import annotations

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
from saige_k8s.dataset.suite import Suite
from saige_k8s.errors import InputError
from saige_k8s.experiences.schema import HARM_COMPONENTS, PRINCIPLES
from saige_k8s.spec import TrainSpec
from saige_k8s.training.data import Example, collate, tokenize
from saige_k8s.training.loop import ADAPTER, METRICS
from saige_k8s.training.model import load_base_model, load_tokenizer

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
        context = json.dumps(scenario.context) if scenario.context is not None else None
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
