"""What evaluating a candidate costs: seconds per model for the suite (and more items), and its
share of the run's training time.

    python tests/benchmarks/bench_evaluate.py saige-data/runs/RUN [--repeats 1 2 4]

Run it on a finished training run (e.g. of ``saige-k8s run -f jobs/demo.yaml``). A pair is one
forward pass per model (the prompt once, both answers after it), so the time grows with
items x models; the items here are the shipped suite, repeated to stand for a dataset's
held-out pairs. CPU-seconds are printed beside wall time: on a shared machine they move less.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

from saige_k8s.dataset.suite import load_suite
from saige_k8s.spec import TrainSpec
from saige_k8s.training.data import load_dataset_dir, tokenize_all
from saige_k8s.training.evaluate import Evaluator, read_run, suite_items


def _timed(work: Callable[[], object]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    work()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--data-root", type=Path, help="where the run's dataset is, when its recorded path is relative")
    parser.add_argument("--repeats", type=int, nargs="+", default=[1, 2, 4], help="suite copies per measurement")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    metrics = read_run(args.run_dir)
    spec = TrainSpec.model_validate(metrics["hyperparameters"])
    dataset = Path(metrics["dataset_path"])
    if args.data_root is not None:
        dataset = args.data_root / "datasets" / str(metrics["dataset_id"])
    holder: dict[str, Evaluator] = {}
    loaded = _timed(lambda: holder.setdefault("e", Evaluator(spec, args.run_dir / "adapter", None, args.batch_size)))
    evaluator = holder["e"]
    items = suite_items(load_suite(), metrics["format"])
    data = load_dataset_dir(dataset)
    held_out = tokenize_all(evaluator.tokenizer, data, "eval", spec.max_seq_len, spec.max_eval_examples)
    system = metrics.get("system_prompt", "")
    print(f"model loaded with its adapter in {loaded[0]:.1f} s; suite {len(items)} items; eval split {len(held_out)}")
    rows = []
    for repeat in args.repeats:
        for which in ("candidate", "baseline"):
            wall, cpu = _timed(lambda w=which, r=repeat: evaluator.margins(w, items * r, metrics["format"], system))
            rows.append((repeat * len(items), which, wall, cpu))
    eval_loss = _timed(lambda: evaluator.eval_loss("candidate", held_out))
    print(f"{'items':>6} {'model':>10} {'seconds':>8} {'cpu-s':>8} {'ms/item':>8}")
    for n, which, wall, cpu in rows:
        print(f"{n:>6} {which:>10} {wall:>8.2f} {cpu:>8.2f} {1000 * wall / n:>8.1f}")
    suite_both = [sum(r[i] for r in rows if r[0] == len(items)) for i in (2, 3)]
    train_seconds = float(metrics.get("duration_seconds") or metrics.get("train_seconds") or 0)
    # A first run: the eval losses come from training; a champion baseline adds one eval-loss pass.
    first = loaded[0] + suite_both[0]
    later = first + eval_loss[0]
    print(
        json.dumps(
            {
                "load_seconds": round(loaded[0], 2),
                "suite_both_models_seconds": round(suite_both[0], 2),
                "suite_both_models_cpu_seconds": round(suite_both[1], 2),
                "eval_loss_seconds_one_model": round(eval_loss[0], 2),
                "training_seconds": round(train_seconds, 2),
                "share_of_training_first_run": round(first / train_seconds, 3) if train_seconds else None,
                "share_of_training_against_a_champion": round(later / train_seconds, 3) if train_seconds else None,
            }
        )
    )


if __name__ == "__main__":
    main()
