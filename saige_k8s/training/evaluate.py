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
from saige_k8s.training.data import IGNORE, Example, load_dataset_dir, tokenize, tokenize_all
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


@dataclass(frozen=True)
class Row:
    """Responses to one prompt packed into one sequence: the shared prompt once, then each
    response, which sees the prompt and itself only (its own positions restart after the
    prompt). Scoring a pair then costs the prompt once, and logits are computed only where a
    response token is predicted.
    """

    input_ids: list[int]
    position_ids: list[int]
    segments: list[int]  # -1: the shared prompt; k: response k
    targets: list[tuple[int, int, int]]  # (response k, logit position, token id)
    responses: int


def pack(examples: Sequence[Example]) -> Row:
    """One row from examples of the same prompt; each is scored exactly as if alone."""
    first = examples[0]
    prefix = 0
    while all(
        prefix < len(e) - 1 and e.labels[prefix] == IGNORE and e.input_ids[prefix] == first.input_ids[prefix]
        for e in examples
    ):
        prefix += 1
    ids, positions, segments = list(first.input_ids[:prefix]), list(range(prefix)), [-1] * prefix
    targets = []
    for k, example in enumerate(examples):
        start = len(ids) - prefix  # where this response's positions past the prompt begin, minus the prompt
        ids += example.input_ids[prefix:]
        positions += range(prefix, len(example))
        segments += [k] * (len(example) - prefix)
        for j in range(1, len(example)):
            if example.labels[j] != IGNORE:
                before = j - 1
                targets.append((k, before if before < prefix else start + before, example.labels[j]))
    return Row(ids, positions, segments, targets, len(examples))


def _attention(rows: Sequence[Row], width: int, dtype: torch.dtype, device: Any) -> torch.Tensor:
    """Additive 4D mask: causal, and a response never sees another response (padding sees itself)."""
    segments = torch.full((len(rows), width), -2, dtype=torch.long)
    for b, row in enumerate(rows):
        segments[b, : len(row.segments)] = torch.tensor(row.segments)
    query, key = segments[:, :, None], segments[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = causal & ((key == -1) | (key == query)) & (key != -2)
    allowed |= torch.eye(width, dtype=torch.bool)
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[:, None].to(device)


@torch.no_grad()
def response_sums(model: Any, rows: Sequence[Row], pad_id: int, batch_size: int) -> np.ndarray:
    """Per response, in row order: [sum of its label tokens' log-probabilities, their number]."""
    device = next(model.parameters()).device
    dtype = model.get_input_embeddings().weight.dtype  # the hidden states', which the mask is added to
    firsts = np.cumsum([0] + [row.responses for row in rows])
    out = np.zeros((int(firsts[-1]), 2))
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].input_ids))
    for start in range(0, len(order), batch_size):
        chosen = [rows[i] for i in order[start : start + batch_size]]
        width = max(len(row.input_ids) for row in chosen)
        ids = torch.tensor([r.input_ids + [pad_id] * (width - len(r.input_ids)) for r in chosen], device=device)
        positions = torch.tensor([r.position_ids + [0] * (width - len(r.position_ids)) for r in chosen], device=device)
        kept = sorted({position for row in chosen for _, position, _ in row.targets})
        if not kept:  # every response cut away by max_seq_len: nothing to score (zero tokens)
            continue
        column = {position: c for c, position in enumerate(kept)}
        logits = model(
            input_ids=ids,
            attention_mask=_attention(chosen, width, dtype, device),
            position_ids=positions,
            logits_to_keep=torch.tensor(kept, device=device),
        ).logits
        flat = [(b, column[p], token, k) for b, row in enumerate(chosen) for k, p, token in row.targets]
        batch_index, columns, tokens, responses = (list(x) for x in zip(*flat, strict=True))
        picked = logits[torch.tensor(batch_index, device=device), torch.tensor(columns, device=device)].float()
        logprobs = -torch.nn.functional.cross_entropy(picked, torch.tensor(tokens, device=device), reduction="none")
        owner = [int(firsts[order[start + b]]) + k for b, k in zip(batch_index, responses, strict=True)]
        np.add.at(out[:, 0], owner, logprobs.double().cpu().numpy())
        np.add.at(out[:, 1], owner, 1)
    return out


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

    def margins(self, which: str, items: Sequence[Item], fmt: str, system: str) -> np.ndarray:
        """Per item: the better response's mean log-probability per token minus the worse one's."""
        length = self.spec.max_seq_len
        rows = [
            pack([tokenize(self.tokenizer, fmt, system, item.turn, answer, length) for answer in (item.good, item.bad)])
            for item in items
        ]
        sums = self._sums(which, rows)
        means = sums[:, 0] / np.maximum(sums[:, 1], 1)
        return means[0::2] - means[1::2]

    def eval_loss(self, which: str, examples: Sequence[Example]) -> float | None:
        """Mean token loss on the eval split, as training reports it."""
        sums = self._sums(which, [pack([example]) for example in examples])
        tokens = sums[:, 1].sum()
        return float(-sums[:, 0].sum() / tokens) if tokens else None

    def _sums(self, which: str, rows: Sequence[Row]) -> np.ndarray:
        if not rows:
            return np.zeros((0, 2))
        pad = self.tokenizer.pad_token_id
        if which == "candidate" or self.has_baseline_adapter:
            self.model.set_adapter(which)
            return response_sums(self.model, rows, pad, self.batch_size)
        with self.model.disable_adapter():
            return response_sums(self.model, rows, pad, self.batch_size)


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
    fmt, system = metrics["format"], metrics.get("system_prompt", "")
    margins = {which: evaluator.margins(which, items, fmt, system) for which in ("candidate", "baseline")}
    eval_loss = _eval_losses(evaluator, metrics, dataset, train_spec, champion is not None)
    comparison = paired_comparison(
        margins["candidate"],
        margins["baseline"],
        principles=[item.principle for item in items],
        components=[item.component for item in items],
        seed=settings.seed,
    )
    verdict = decide(comparison, settings.gate, eval_loss["candidate"], eval_loss["baseline"])
    result = {
        "candidate": candidate,
        "baseline": champion,
        "baseline_model": "champion adapter" if champion else "base model",
        "pipeline": pipeline,
        "dataset_id": metrics.get("dataset_id"),
        "base_model": metrics["base_model"],
        "items": {"pairs": sum(i.source == "pair" for i in items), "suite": sum(i.source == "suite" for i in items)},
        "eval_loss": eval_loss,
        "comparison": comparison.as_dict(),
        "gate": settings.gate.model_dump(),
        **verdict.as_dict(),
        "notes": [*notes, *verdict.notes],
        "per_item": [
            {"id": item.id, "source": item.source, "candidate": float(c), "baseline": float(b)}
            for item, c, b in zip(items, margins["candidate"], margins["baseline"], strict=True)
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


def _eval_losses(
    evaluator: Evaluator, metrics: dict[str, Any], dataset: Path, spec: TrainSpec, champion_baseline: bool
) -> dict[str, float | None]:
    """The eval loss of both models on the eval examples training used (train.max_eval_examples).

    Training measured the candidate's (after its last step) and the base model's (before its first,
    when the new adapter is still zero), so only a champion adapter's is computed here.
    """
    before = None if champion_baseline else metrics.get("eval_loss_before")
    known = {"candidate": metrics.get("eval_loss"), "baseline": before}
    missing = [which for which, loss in known.items() if loss is None]
    if missing:
        held_out = tokenize_all(
            evaluator.tokenizer, load_dataset_dir(dataset), "eval", spec.max_seq_len, spec.max_eval_examples
        )
        known |= {which: evaluator.eval_loss(which, held_out) for which in missing}
    return known


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
