"""What evaluating a candidate costs: seconds per model for the suite (and more items), and its
share of the run's training time.

    python tests/benchmarks/bench_evaluate.py saige-data/runs/RUN [--repeats 1 2 4]

Run it on a finished training run (e.g. of ``saige-k8s run -f jobs/demo.yaml``). Scoring is two
forward passes per item and model, so the time grows with items x models; the items here are
the shipped suite, repeated to stand for a dataset's held-out pairs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from saige_k8s.dataset.suite import load_suite
from saige_k8s.spec import TrainSpec
from saige_k8s.training.data import load_dataset_dir, tokenize_all
from saige_k8s.training.evaluate import Evaluator, read_run, suite_items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--repeats", type=int, nargs="+", default=[1, 2, 4], help="suite copies per measurement")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    metrics = read_run(args.run_dir)
    spec = TrainSpec.model_validate(metrics["hyperparameters"])
    started = time.perf_counter()
    evaluator = Evaluator(spec, args.run_dir / "adapter", None, args.batch_size)
    loaded = time.perf_counter() - started
    items = suite_items(load_suite(), metrics["format"])
    held_out = tokenize_all(evaluator.tokenizer, load_dataset_dir(Path(metrics["dataset_path"])), "eval", 192)
    system = metrics.get("system_prompt", "")
    print(f"model loaded with its adapter in {loaded:.1f} s; suite {len(items)} items; eval split {len(held_out)}")
    rows = []
    for repeat in args.repeats:
        for which in ("candidate", "baseline"):
            t = time.perf_counter()
            evaluator.score(which, items * repeat, [], metrics["format"], system)
            rows.append((repeat * len(items), which, time.perf_counter() - t))
    t = time.perf_counter()
    evaluator.score("candidate", [], held_out, metrics["format"], system)
    eval_loss_seconds = time.perf_counter() - t
    print(f"{'items':>6} {'model':>10} {'seconds':>8} {'ms/item':>8}")
    for n, which, seconds in rows:
        print(f"{n:>6} {which:>10} {seconds:>8.2f} {1000 * seconds / n:>8.1f}")
    suite_both = sum(s for n, _, s in rows if n == len(items))
    one_run = loaded + suite_both + 2 * eval_loss_seconds
    train_seconds = float(metrics.get("duration_seconds") or metrics.get("train_seconds") or 0)
    share = one_run / train_seconds if train_seconds else float("nan")
    print(
        json.dumps(
            {
                "load_seconds": round(loaded, 2),
                "suite_both_models_seconds": round(suite_both, 2),
                "eval_loss_seconds_per_model": round(eval_loss_seconds, 2),
                "evaluation_seconds": round(one_run, 2),
                "training_seconds": round(train_seconds, 2),
                "share_of_training": round(share, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
