"""The training loop: LoRA on the curated dataset, preemption-safe, one process per GPU.

Run it as it is on a CPU or one GPU, or under ``accelerate launch`` / ``torchrun`` for
several processes: accelerate's ``Accelerator`` picks the setting up from the launcher.
Checkpoints (the trainable LoRA weights, optimizer, scheduler, RNG, and where in which epoch)
go to ``RUN/checkpoints/step-N`` every ``save_steps`` optimizer steps and when SIGTERM arrives;
a rerun with the same run directory continues from the newest one that is whole, at the same
step. The frozen base is not saved: it is loaded again from the model, as on the first run.
The same holds across machines (``train.nodes``, on a shared volume): the global rank 0 alone
writes checkpoints' shared files, TensorBoard, the metrics and the adapter, each rank adds its
RNG state to a checkpoint, and on a rerun rank 0 picks the checkpoint that every rank loads.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from saige_k8s import console, lifecycle
from saige_k8s.errors import Interrupted, ResourceError, RuntimeFailure
from saige_k8s.lifecycle import stop_requested
from saige_k8s.spec import TrainSpec
from saige_k8s.training import atomic
from saige_k8s.training.data import (
    IGNORE,
    Example,
    collate,
    length_grouped_batches,
    load_dataset_dir,
    padding_waste,
    tokenize_all,
)
from saige_k8s.training.model import compute_dtype, load_model, load_tokenizer
from saige_k8s.training.objectives import Figures, add_figures, means, objective_for, to_tensors, token_losses

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
METRICS = "metrics.json"
STATE = "trainer_state.json"
MERGED = "merged"
MODELFILE = "Modelfile"
#: What a run writes in its directory through a temporary (export's outputs included).
OUTPUTS = {ADAPTER, METRICS, MERGED, MODELFILE}
#: On a GPU every new sequence length costs a one-off setup (measured on an H100: bf16 autocast
#: ran 5.8x slower than fp32 with a new length per batch), so batch widths round up to this.
CUDA_PAD_MULTIPLE = 8


@dataclass(frozen=True)
class TrainOptions:
    dataset: Path
    run_dir: Path
    spec: TrainSpec
    keep_checkpoints: int = 2
    progress: bool = False


@dataclass
class _State:
    step: int = 0
    epoch: int = 0
    #: Batches of ``epoch`` already consumed (by this process's shard).
    batch_in_epoch: int = 0
    tokens: int = 0
    #: Eval loss of the untrained adapter, kept so a resumed run still reports it.
    eval_before: float | None = None
    log: list[dict[str, float]] = field(default_factory=list)


OOM_HINT = (
    "out of memory: try --use-4bit, a smaller --batch-size (with --gradient-accumulation), --max-seq-len, "
    "--gradient-checkpointing, or a smaller model (e.g. TinyLlama/TinyLlama-1.1B-Chat-v1.0)"
)


def train(options: TrainOptions) -> dict[str, Any]:
    try:
        return _train(options)
    except torch.OutOfMemoryError:
        raise ResourceError(OOM_HINT) from None


def _train(options: TrainOptions) -> dict[str, Any]:  # noqa: PLR0912, PLR0915 - the loop reads best in one piece
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import broadcast_object_list, set_seed
    from transformers import get_scheduler

    started = time.perf_counter()
    spec = options.spec
    dtype = compute_dtype(spec.precision)
    mixed = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")
    # accelerate keeps one precision per process; a second run here (tests, notebooks) may
    # want another. Reset it, keeping the process group (PartialState) torchrun made.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        # On a CPU, accelerate joins a torchrun/launch process group (gloo) only when told so.
        cpu=not torch.cuda.is_available(),
        mixed_precision=mixed if spec.quantization is None else "no",
        gradient_accumulation_steps=spec.gradient_accumulation,
        log_with="tensorboard",
        project_dir=str(options.run_dir),
    )
    set_seed(spec.seed)
    data = load_dataset_dir(options.dataset)
    tokenizer = load_tokenizer(spec)
    objective = objective_for(spec, tokenizer, data, accelerator)  # sft, dpo or kto: what a step minimises
    eval_examples = tokenize_all(tokenizer, data, "eval", spec.max_seq_len, limit=spec.max_eval_examples)
    model = load_model(spec)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    parameters = model.get_nb_trainable_parameters()[1]  # peft counts 4-bit packed weights unpacked
    lengths = objective.lengths
    batches_per_epoch = math.ceil(len(objective) / spec.batch_size)
    per_process = batches_per_epoch // accelerator.num_processes or 1
    steps_per_epoch = max(1, per_process // spec.gradient_accumulation)
    total_steps = max(1, math.ceil(steps_per_epoch * spec.epochs))
    if spec.max_steps is not None:
        total_steps = min(total_steps, spec.max_steps)

    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=spec.learning_rate, weight_decay=spec.weight_decay
    )
    # accelerate steps a prepared scheduler once per process per optimizer step.
    scheduler = get_scheduler(
        spec.lr_scheduler,
        optimizer,
        num_warmup_steps=int(spec.warmup_ratio * total_steps) * accelerator.num_processes,
        num_training_steps=total_steps * accelerator.num_processes,
    )
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    _save_only_trainable(accelerator, model)
    if accelerator.is_main_process:
        options.run_dir.mkdir(parents=True, exist_ok=True)
        atomic.remove_stale(options.run_dir, OUTPUTS)
        atomic.remove_stale(options.run_dir / CHECKPOINTS)
    # Checkpoint temporaries are named after the main process, whichever process writes into them.
    owner = broadcast_object_list([os.getpid()])[0]
    state = _resume(accelerator, model, options.run_dir)
    if accelerator.is_main_process:
        accelerator.init_trackers("tensorboard")
    if not state.step:  # a resumed run keeps the untrained adapter's eval loss
        state.eval_before = _evaluate(accelerator, model, eval_examples, tokenizer.pad_token_id, spec.batch_size)
        _log_eval(accelerator, state.eval_before, 0)
    log.info("training %d steps from step %d", total_steps, state.step)

    model.train()
    waste = []
    mine: list[list[int]] = []
    run_started, cpu_started = time.perf_counter(), time.process_time()
    tokens_at_start = state.tokens
    window_loss, window_batches = 0.0, 0
    window_figures: Figures = {}
    # Off a terminal the loop's own log lines (every logging_steps) are the progress.
    progress = console.progress(
        "training", "step", total_steps, enabled=options.progress and accelerator.is_main_process, initial=state.step
    )
    multiple = CUDA_PAD_MULTIPLE if accelerator.device.type == "cuda" else 1
    lifecycle.poll_stop(True)  # a signal from here on is answered at the next step, with a checkpoint
    while state.step < total_steps:
        batches = length_grouped_batches(lengths, spec.batch_size, spec.seed, state.epoch)
        usable = len(batches) - len(batches) % accelerator.num_processes or len(batches)
        mine = batches[accelerator.process_index : usable : accelerator.num_processes]
        waste.append(padding_waste(lengths, batches, multiple))
        for index in range(state.batch_in_epoch, len(mine)):
            batch = objective.batch(mine[index], accelerator.device, multiple)
            with accelerator.accumulate(model):
                loss, figures = objective.loss(model, batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients and spec.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), spec.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            state.batch_in_epoch = index + 1
            state.tokens += int(batch["attention_mask"].sum()) * accelerator.num_processes
            window_loss += float(loss.detach())
            window_batches += 1
            add_figures(window_figures, figures)
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            progress.update(1)
            if state.step % spec.logging_steps == 0 or state.step == total_steps:
                rate = (state.tokens - tokens_at_start) / (time.perf_counter() - run_started)
                _log_step(
                    accelerator,
                    state,
                    window_loss / max(window_batches, 1),
                    scheduler,
                    rate,
                    progress,
                    means(window_figures),
                )
                window_loss, window_batches, window_figures = 0.0, 0, {}
            if _should_stop(accelerator):
                _checkpoint(accelerator, options, state, owner)
                raise Interrupted(f"{lifecycle.reason()} at step {state.step}; checkpoint saved, rerun to resume")
            if state.step % spec.save_steps == 0:
                _checkpoint(accelerator, options, state, owner)
            if state.step >= total_steps:
                break
        else:
            state.epoch += 1
            state.batch_in_epoch = 0
    lifecycle.poll_stop(False)
    progress.close()
    epochs_done = state.epoch + state.batch_in_epoch / max(len(mine), 1)
    duration = time.perf_counter() - started
    train_seconds = time.perf_counter() - run_started  # the loop only: tokens/s is the training rate
    train_cpu_seconds = time.process_time() - cpu_started  # this process's threads: beside wall time on a busy machine
    eval_after = _evaluate(accelerator, model, eval_examples, tokenizer.pad_token_id, spec.batch_size)
    _log_eval(accelerator, eval_after, state.step)
    eval_objective = objective.evaluate(accelerator, model)
    metrics = {
        "dataset_id": data.manifest.get("dataset_id"),
        "dataset_path": str(data.path),
        "run_id": options.run_dir.name,
        "format": data.format,
        "system_prompt": data.system,
        "base_model": spec.model,
        "method": spec.method,
        "train_examples": len(objective),
        "eval_examples": len(eval_examples),
        "steps": state.step,
        "epochs": round(epochs_done, 4),
        "train_loss": state.log[-1]["loss"] if state.log else None,
        "eval_loss_before": state.eval_before,
        "eval_loss": eval_after,
        # dpo/kto: their own loss and rewards on the eval split's pairs / examples.
        "eval_preference": eval_objective or None,
        "tokens": state.tokens,
        "tokens_per_second": (state.tokens - tokens_at_start) / train_seconds if train_seconds else None,
        "padding_waste": sum(waste) / len(waste) if waste else 0.0,
        "trainable_parameters": trainable,
        "parameters": parameters,
        "processes": accelerator.num_processes,
        "device": str(accelerator.device),
        "duration_seconds": duration,
        "train_seconds": train_seconds,
        "train_cpu_seconds": train_cpu_seconds,
        "hyperparameters": spec.model_dump(),
        "log": state.log,
        "finished_at": time.time(),
    }
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with atomic.writing(options.run_dir / ADAPTER), atomic.replacing_dir(options.run_dir / ADAPTER) as adapter:
            accelerator.unwrap_model(model).save_pretrained(adapter)
            tokenizer.save_pretrained(adapter)
        # metrics.json marks a finished run: a signal from here on lets it finish.
        with lifecycle.commit(), atomic.writing(options.run_dir / METRICS):
            atomic.write_text(options.run_dir / METRICS, json.dumps(metrics, indent=2, default=str) + "\n")
    accelerator.end_training()
    return metrics


def _log_step(
    accelerator: Any,
    state: _State,
    loss: float,
    scheduler: Any,
    rate: float,
    progress: console.Progress,
    figures: dict[str, float],
) -> None:
    entry = {
        "step": state.step,
        "loss": loss,
        "learning_rate": scheduler.get_last_lr()[0],
        "tokens_per_second": rate,
        **figures,
    }
    state.log.append(entry)
    accelerator.log({f"train/{k}": v for k, v in entry.items() if k != "step"}, step=state.step)  # HF Trainer's tags
    if not accelerator.is_main_process:
        return
    if progress.on_screen:
        progress.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:.0f}")
    else:
        log.info("step %d loss %.4f lr %.2e %.0f tokens/s", state.step, loss, entry["learning_rate"], rate)


def _log_eval(accelerator: Any, loss: float | None, step: int) -> None:
    if loss is not None:
        accelerator.log({"eval/loss": loss}, step=step)
        log.info("eval loss %.4f at step %d", loss, step)


@torch.no_grad()
def _evaluate(accelerator: Any, model: Any, examples: list[Example], pad_id: int, batch_size: int) -> float | None:
    """Mean token loss over the eval split (every process takes a share; sums are reduced)."""
    if not examples:
        return None
    log.info("evaluating on %d eval examples", len(examples))
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    mine = [examples[i] for i in order[accelerator.process_index :: accelerator.num_processes]]
    total = accelerator.reduce(masked_loss_sums(model, mine, pad_id, batch_size, accelerator.device), reduction="sum")
    model.train()
    return float(total[0] / total[1]) if total[1] else None


@torch.no_grad()
def masked_loss_sums(
    model: Any, examples: list[Example], pad_id: int, batch_size: int, device: torch.device
) -> torch.Tensor:
    """[sum of token losses, number of label tokens] over ``examples``: labels only, as trained."""
    total = torch.zeros(2, device=device, dtype=torch.float64)
    for start in range(0, len(examples), batch_size):
        batch = to_tensors(collate(examples[start : start + batch_size], pad_id), device)
        losses, targets = token_losses(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        total += torch.stack([losses.sum().double(), (targets != IGNORE).sum().double()])
    return total


def _should_stop(accelerator: Any) -> bool:
    """Every process stops at the same step if any was asked to (a collective decision)."""
    flag = torch.tensor([1.0 if stop_requested() else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def _save_only_trainable(accelerator: Any, model: Any) -> None:
    """Checkpoints hold the trainable (LoRA) weights only: the frozen base is the model as loaded."""
    trainable = set(_trainable_shapes(model))

    def keep_trainable(_models: list[Any], weights: list[dict[str, Any]], _output_dir: str) -> None:
        for i, state_dict in enumerate(weights):
            weights[i] = {k: v for k, v in state_dict.items() if _plain(k) in trainable}

    accelerator.register_save_state_pre_hook(keep_trainable)


def _checkpoint(accelerator: Any, options: TrainOptions, state: _State, owner: int) -> None:
    """Written into a temporary directory, renamed to ``step-N`` once whole: a kill leaves none."""
    root = options.run_dir / CHECKPOINTS
    target = root / f"step-{state.step:08d}"
    tmp = atomic.temp_dir(target, owner)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every process's RNG state is in before the rename
    if accelerator.is_main_process:
        atomic.write_text(tmp / STATE, json.dumps(asdict(state)))
        atomic.replace_dir(tmp, target)
        for old in checkpoints(options.run_dir)[: -options.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _plain(name: str) -> str:
    """A parameter's name without the ``module.`` a multi-process (DDP) wrapper puts before it."""
    return name.removeprefix("module.")


def _trainable_shapes(model: Any) -> dict[str, list[int]]:
    """The trainable weights by their plain name: the same whether one process or several saved them."""
    return {_plain(key): list(p.shape) for key, p in model.named_parameters() if p.requires_grad}


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporaries are hidden, named ``.tmp-step-N-PID``)."""
    return sorted(p for p in (run_dir / CHECKPOINTS).glob("step-*") if p.is_dir())


def _unusable(checkpoint: Path, model: Any, accelerator: Any) -> str | None:
    """Why this run cannot resume from ``checkpoint`` (None: every file it needs is there and loads)."""
    from accelerate.utils import OPTIMIZER_NAME, RNG_STATE_NAME, SAFE_WEIGHTS_NAME, SCALER_NAME, SCHEDULER_NAME

    trainable = _trainable_shapes(model)
    needed = [STATE, SAFE_WEIGHTS_NAME, f"{OPTIMIZER_NAME}.bin", f"{SCHEDULER_NAME}.bin"]
    needed += [f"{RNG_STATE_NAME}_{i}.pkl" for i in range(accelerator.num_processes)]
    if accelerator.scaler is not None:
        needed.append(SCALER_NAME)
    for name in needed:
        try:
            why = _check_file(checkpoint, name, trainable)
        except FileNotFoundError:
            return f"{name} is missing"
        except Exception as exc:  # noqa: BLE001 - whatever a damaged file raises, the checkpoint is unusable
            reason = str(exc).strip().splitlines()
            return f"{name} cannot be read ({type(exc).__name__}{': ' + reason[0] if reason else ''})"
        if why:
            return f"{name} {why}"
    return None


def _check_file(checkpoint: Path, name: str, trainable: dict[str, list[int]]) -> str | None:
    """Load one checkpoint file the way ``load_state`` will; what is wrong with it, if anything."""
    from accelerate.utils import OPTIMIZER_NAME, RNG_STATE_NAME, load
    from safetensors import safe_open

    path = checkpoint / name
    if name == STATE:
        step = _State(**json.loads(path.read_text())).step
        return None if checkpoint.name == f"step-{step:08d}" else f"is for step {step}"
    if name.endswith(".safetensors"):
        with safe_open(path, "pt") as weights:  # checks the header against the file's size
            shapes = {_plain(key): list(weights.get_slice(key).get_shape()) for key in weights.keys()}  # noqa: SIM118
        wrong = [key for key, shape in trainable.items() if shapes.get(key) != shape]
        return f"lacks {wrong[0]} or has it in another shape (another LoRA setting?)" if wrong else None
    loaded = load(path, map_location="cpu")
    if name.startswith(OPTIMIZER_NAME) and sum(len(g["params"]) for g in loaded["param_groups"]) != len(trainable):
        return "is for another number of trainable tensors"
    if name.startswith(RNG_STATE_NAME) and not {"random_state", "torch_manual_seed"} <= set(loaded):
        return "lacks a random state"
    return None


def _resume(accelerator: Any, model: Any, run_dir: Path) -> _State:
    """Continue from the newest checkpoint that is whole; a damaged one is skipped with a warning."""
    from accelerate.utils import broadcast_object_list

    found = checkpoints(run_dir)
    chosen = None
    if accelerator.is_main_process:  # the checkpoints are on a shared volume: one process judges
        for checkpoint in reversed(found):
            why = _unusable(checkpoint, model, accelerator)
            if why is None:
                chosen = checkpoint
                break
            log.warning("skipping checkpoint %s: %s", checkpoint, why)
        if found and chosen is None:
            log.warning("no usable checkpoint in %s: training starts from scratch", run_dir / CHECKPOINTS)
    chosen = broadcast_object_list([chosen])[0]
    if chosen is None:
        return _State()
    try:
        # The saved weights are the trainable ones; ``_unusable`` made sure every one of them is there.
        accelerator.load_state(str(chosen), strict=False)
        _check_loaded(model, chosen)
    except Exception as exc:  # noqa: BLE001 - checked just before; one clear line if it still fails
        raise RuntimeFailure(f"cannot resume from checkpoint {chosen}: {type(exc).__name__}: {exc}") from None
    state = _State(**json.loads((chosen / STATE).read_text()))
    log.info("resuming at step %d (epoch %d, batch %d) from %s", state.step, state.epoch, state.batch_in_epoch, chosen)
    return state


def _check_loaded(model: Any, checkpoint: Path) -> None:
    """Every rank holds the checkpoint's trainable weights now (a load with ``strict=False`` could skip them)."""
    from accelerate.utils import SAFE_WEIGHTS_NAME
    from safetensors.torch import load_file

    saved = {_plain(key): value for key, value in load_file(checkpoint / SAFE_WEIGHTS_NAME).items()}
    for key, parameter in model.named_parameters():
        if parameter.requires_grad and not torch.equal(
            parameter.detach().cpu(), saved[_plain(key)].to(parameter.dtype)
        ):
            raise RuntimeFailure(f"resuming from {checkpoint}: {_plain(key)} did not load")
