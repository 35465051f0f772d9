"""What a training step minimises: SFT, DPO or KTO, on the same loop and the same batches.

Every objective hands the loop a length per training item (for the length-grouped batches),
builds a batch from a list of item indices, and computes a loss with its figures. The
prompt is masked exactly as for SFT: every sequence goes through ``data.tokenize``, and
a completion's log-probability is the sum over its label tokens.

DPO and KTO compare the adapter with a reference, the base model itself: the same model
with its adapter switched off (peft's ``disable_adapter``), so no second copy is in memory.

- ``dpo`` (the DPO paper's sigmoid loss): ``-log σ(β·((π_c − ref_c) − (π_r − ref_r)))`` per
  pair, where π and ref are the summed log-probabilities of the chosen (c) and rejected (r)
  answers under the adapter and the base.
- ``kto`` (the KTO paper's eq. 7, as TRL computes it): the implied reward of an answer is
  ``π − ref``; a reference point ``z`` is the batch's mean ``π − ref`` over mismatched
  (prompt, answer) pairs, each prompt with the previous example's answer, detached, averaged
  over the processes and clamped at 0. A desirable answer costs ``1 − σ(β·(r − z))``, an
  undesirable one ``1 − σ(β·(z − r))``, times their weights; the loss is the batch mean.
- ``sft`` with ``sample_weights: weighted_score``: each example's token losses are scaled by
  its weighted score divided by the training set's mean score, so the loss's scale (and the
  learning rate's meaning) stays that of unweighted SFT.

Figures (means over the logging window): ``rewards/chosen`` and ``rewards/rejected`` (β times
the log-ratio, for chosen/desirable and rejected/undesirable answers), ``rewards/margins``
(chosen − rejected) and ``rewards/accuracy`` (DPO: share of pairs whose chosen reward is the
higher; KTO: share of answers on their side of ``z``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from saige_k8s.dataset.kto import KTO_FILES
from saige_k8s.errors import InputError
from saige_k8s.spec import TrainSpec
from saige_k8s.training.data import (
    IGNORE,
    Example,
    LoadedDataset,
    collate,
    load_pairs,
    load_undesirable,
    tokenize,
    tokenize_all,
)

Batch = dict[str, torch.Tensor]
#: A figure over a window: (sum, count); averaged when logged.
Figures = dict[str, tuple[float, float]]
REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy")
EVAL_FIGURES = ("loss", *REWARDS, "kl")


def to_tensors(batch: dict[str, list[list[int]]], device: torch.device) -> Batch:
    return {k: torch.tensor(v, dtype=torch.long, device=device) for k, v in batch.items()}


def token_losses(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(each label token's loss, 0 elsewhere; the labels they were scored against), in float32.

    The vocabulary projection runs only at the positions where some row predicts a label,
    not at the prompt's, and the logits are never copied for the shift: on SmolLM2's 49k-token
    vocabulary that saved 14 % of the CPU of a 3-step DPO run, load and evals included.
    """
    shifted = labels[:, 1:]  # the logits at position t predict the token at t + 1
    keep = (shifted != IGNORE).any(0).nonzero().squeeze(1)
    if not len(keep):  # every label cut away: score one position, which counts nothing
        keep = torch.zeros(1, dtype=torch.long, device=labels.device)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits
    targets = shifted[:, keep]
    losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="none")
    return losses.view(targets.shape), targets


def sequence_logps(model: Any, batch: Batch, prefix: str = "") -> torch.Tensor:
    """Per row, the summed log-probability of its label tokens (the completion), in float32."""
    losses, _ = token_losses(
        model, batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"], batch[f"{prefix}labels"]
    )
    return -losses.sum(-1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, Figures]:
    """The mean sigmoid DPO loss over the pairs, and its reward figures."""
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    loss = -F.logsigmoid(chosen - rejected).mean()
    n = float(len(chosen))
    figures = {
        "rewards/chosen": (float(chosen.detach().sum()), n),
        "rewards/rejected": (float(rejected.detach().sum()), n),
        "rewards/margins": (float((chosen - rejected).detach().sum()), n),
        "rewards/accuracy": (float((chosen > rejected).sum()), n),
    }
    return loss, figures


def kto_loss(
    policy: torch.Tensor,
    ref: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, Figures]:
    """The mean KTO loss over the examples given the reference point ``kl``, and its figures."""
    ratio = policy - ref
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
        undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))),
    )
    rewards = beta * ratio.detach()
    good, bad = float(desirable.sum()), float((~desirable).sum())
    chosen, rejected = float(rewards[desirable].sum()), float(rewards[~desirable].sum())
    right = torch.where(desirable, ratio > kl, ratio < kl)
    figures = {
        "rewards/chosen": (chosen, good),
        "rewards/rejected": (rejected, bad),
        "rewards/accuracy": (float(right.sum()), float(len(ratio))),
        "kl": (float(kl), 1.0),
    }
    return losses.mean(), figures


def add_figures(total: Figures, more: Figures) -> None:
    for key, (value, count) in more.items():
        before = total.get(key, (0.0, 0.0))
        total[key] = (before[0] + value, before[1] + count)


def means(total: Figures) -> dict[str, float]:
    """The window's means; margins as chosen − rejected where the objective gives no paired margin."""
    out = {key: value / count for key, (value, count) in total.items() if count}
    if "rewards/margins" not in out and {"rewards/chosen", "rewards/rejected"} <= set(out):
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out


@contextlib.contextmanager
def reference(model: Any) -> Iterator[None]:
    """The base model: the adapter switched off, no gradients."""
    with torch.no_grad(), model.disable_adapter():
        yield


class Objective:
    """SFT: the masked token loss, optionally weighted per example."""

    method = "sft"

    def __init__(self, spec: TrainSpec, tokenizer: Any, data: LoadedDataset, accelerator: Any) -> None:
        self.spec, self.pad_id, self.accelerator = spec, tokenizer.pad_token_id, accelerator
        self.examples = tokenize_all(tokenizer, data, "train", spec.max_seq_len)
        self.lengths = [len(e) for e in self.examples]
        self.weights = example_weights(data.train_scores) if spec.sample_weights == "weighted_score" else None

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, indices: Sequence[int], device: torch.device, multiple: int) -> Batch:
        batch = to_tensors(collate([self.examples[i] for i in indices], self.pad_id, multiple), device)
        if self.weights is not None:
            batch["weights"] = torch.tensor([self.weights[i] for i in indices], device=device)
        return batch

    def loss(self, model: Any, batch: Batch) -> tuple[torch.Tensor, Figures]:
        """The mean loss of the label tokens; with weights, each example's sum scaled by its weight."""
        losses, targets = token_losses(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        tokens = (targets != IGNORE).sum().clamp(min=1)
        if "weights" not in batch:
            return losses.sum() / tokens, {}
        return (losses.sum(-1) * batch["weights"]).sum() / tokens, {}

    def evaluate(self, accelerator: Any, model: Any) -> dict[str, float]:
        return {}


def example_weights(scores: Sequence[float | None]) -> list[float]:
    """Each example's weighted score over the mean score (an unknown score weighs 1)."""
    known = [s for s in scores if s is not None]
    mean = sum(known) / len(known) if known else 0.0
    if mean <= 0:
        return [1.0] * len(scores)
    return [s / mean if s is not None else 1.0 for s in scores]


@dataclass(frozen=True)
class _Pair:
    chosen: Example
    rejected: Example


class DpoObjective(Objective):
    method = "dpo"

    def __init__(self, spec: TrainSpec, tokenizer: Any, data: LoadedDataset, accelerator: Any) -> None:
        self.spec, self.pad_id, self.accelerator = spec, tokenizer.pad_token_id, accelerator
        self.pairs = self._tokenized(tokenizer, data, "train")
        if not self.pairs:
            raise InputError(
                f"dataset {data.path} has no preference pairs (pairs-train.parquet): method dpo needs prompts "
                "with both a kept and a removed answer (extract from a table that has both, or use --method sft/kto)"
            )
        self.eval_pairs = self._tokenized(tokenizer, data, "eval")[: spec.max_eval_examples]
        self.lengths = [max(len(p.chosen), len(p.rejected)) for p in self.pairs]

    def _tokenized(self, tokenizer: Any, data: LoadedDataset, split: str) -> list[_Pair]:
        n, fmt = self.spec.max_seq_len, data.format
        return [
            _Pair(
                tokenize(tokenizer, fmt, p.system, p.turn, p.chosen, n),
                tokenize(tokenizer, fmt, p.system, p.turn, p.rejected, n),
            )
            for p in load_pairs(data, split)
        ]

    def batch(self, indices: Sequence[int], device: torch.device, multiple: int) -> Batch:
        return self._collate([self.pairs[i] for i in indices], device, multiple)

    def _collate(self, pairs: Sequence[_Pair], device: torch.device, multiple: int = 1) -> Batch:
        """One grid: the chosen answers, then the rejected ones (a single forward pass for both)."""
        return to_tensors(
            collate([p.chosen for p in pairs] + [p.rejected for p in pairs], self.pad_id, multiple), device
        )

    def _logps(self, model: Any, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        chosen, rejected = sequence_logps(model, batch).chunk(2)
        return chosen, rejected

    def loss(self, model: Any, batch: Batch) -> tuple[torch.Tensor, Figures]:
        policy_chosen, policy_rejected = self._logps(model, batch)
        base = self.accelerator.unwrap_model(model)
        with reference(base):
            ref_chosen, ref_rejected = self._logps(base, batch)
        return dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, self.spec.beta)

    @torch.no_grad()
    def evaluate(self, accelerator: Any, model: Any) -> dict[str, float]:
        mine = self.eval_pairs[accelerator.process_index :: accelerator.num_processes]
        return _evaluate_batches(accelerator, model, mine, self.spec.batch_size, self._collate, self.loss)


def _evaluate_batches(
    accelerator: Any,
    model: Any,
    items: Sequence[Any],
    batch_size: int,
    collate_items: Callable[[Sequence[Any], torch.device], Batch],
    loss_of: Callable[[Any, Batch], tuple[torch.Tensor, Figures]],
) -> dict[str, float]:
    """The objective's loss and figures over eval items (every process takes a share; sums are reduced)."""
    total: Figures = {}
    model.eval()
    for start in range(0, len(items), batch_size):
        part = items[start : start + batch_size]
        loss, figures = loss_of(model, collate_items(part, accelerator.device))
        add_figures(total, {"loss": (float(loss) * len(part), float(len(part))), **figures})
    model.train()
    keys = EVAL_FIGURES  # the same on every process, whatever its share held
    local = torch.tensor(
        [v for k in keys for v in total.get(k, (0.0, 0.0))], device=accelerator.device, dtype=torch.float64
    )
    summed = accelerator.reduce(local, reduction="sum").tolist()
    return means({k: (summed[2 * i], summed[2 * i + 1]) for i, k in enumerate(keys)})


@dataclass(frozen=True)
class _Unpaired:
    system: str
    turn: str
    response: str
    desirable: bool
    example: Example


class KtoObjective(Objective):
    method = "kto"

    def __init__(self, spec: TrainSpec, tokenizer: Any, data: LoadedDataset, accelerator: Any) -> None:
        self.spec, self.pad_id, self.accelerator = spec, tokenizer.pad_token_id, accelerator
        self.tokenizer, self.format = tokenizer, data.format
        if not (data.path / KTO_FILES["train"]).is_file():
            raise InputError(
                f"dataset {data.path} has no KTO part ({KTO_FILES['train']}): extract it with "
                "`saige-k8s extract --kto`, or with train.method: kto in the pipeline's spec"
            )
        self.items = self._items(data, "train")
        if not any(not item.desirable for item in self.items):
            raise InputError(
                f"dataset {data.path} has no undesirable examples (kto-train.parquet): method kto needs answers that "
                "a filter removed as poor, harmful or too harmful (extract again, or use --method sft)"
            )
        self.eval_items = self._items(data, "eval")[: spec.max_eval_examples]
        self.lengths = [len(item.example) for item in self.items]

    def _items(self, data: LoadedDataset, split: str) -> list[_Unpaired]:
        good = data.train if split == "train" else data.eval
        rows = [(t, r, True) for t, r in good] + [(t, r, False) for t, r in load_undesirable(data, split)]
        return [
            _Unpaired(
                data.system, t, r, ok, tokenize(self.tokenizer, self.format, data.system, t, r, self.spec.max_seq_len)
            )
            for t, r, ok in rows
        ]

    def batch(self, indices: Sequence[int], device: torch.device, multiple: int) -> Batch:
        return self._collate([self.items[i] for i in indices], device, multiple)

    def _collate(self, items: Sequence[_Unpaired], device: torch.device, multiple: int = 1) -> Batch:
        """The examples and, for the reference point, each prompt with the previous example's answer."""
        shifted = [items[-1], *items[:-1]]
        mismatched = [
            tokenize(self.tokenizer, self.format, item.system, item.turn, other.response, self.spec.max_seq_len)
            for item, other in zip(items, shifted, strict=True)
        ]
        batch = to_tensors(collate([item.example for item in items], self.pad_id, multiple), device)
        kl = to_tensors(collate(mismatched, self.pad_id, multiple), device)
        batch.update({f"kl_{k}": v for k, v in kl.items()})
        batch["desirable"] = torch.tensor([item.desirable for item in items], device=device)
        return batch

    def loss(self, model: Any, batch: Batch) -> tuple[torch.Tensor, Figures]:
        policy = sequence_logps(model, batch)
        base = self.accelerator.unwrap_model(model)
        with torch.no_grad():  # the reference point is detached
            policy_kl = sequence_logps(base, batch, "kl_")
        with reference(base):
            ref = sequence_logps(base, batch)
            ref_kl = sequence_logps(base, batch, "kl_")
        kl = (policy_kl - ref_kl).mean()
        if model.training:  # averaged over the processes, which all step together (not in evaluation)
            kl = self.accelerator.reduce(kl, reduction="mean")
        kl = kl.clamp(min=0)
        return kto_loss(
            policy,
            ref,
            batch["desirable"],
            kl,
            self.spec.beta,
            self.spec.desirable_weight,
            self.spec.undesirable_weight,
        )

    @torch.no_grad()
    def evaluate(self, accelerator: Any, model: Any) -> dict[str, float]:
        mine = sorted(self.eval_items, key=lambda item: len(item.example))[
            accelerator.process_index :: accelerator.num_processes
        ]
        return _evaluate_batches(accelerator, model, mine, max(2, self.spec.batch_size), self._collate, self.loss)


OBJECTIVES: dict[str, type[Objective]] = {"sft": Objective, "dpo": DpoObjective, "kto": KtoObjective}


def objective_for(spec: TrainSpec, tokenizer: Any, data: LoadedDataset, accelerator: Any) -> Objective:
    """The one place a method is chosen."""
    return OBJECTIVES[spec.method](spec, tokenizer, data, accelerator)
