"""GPU only: training speed against the batch-width multiple (``loop.CUDA_PAD_MULTIPLE``).

On CUDA every new sequence length costs a one-off setup in bf16 autocast; length-grouped
batches bring a new length almost every batch. This runs ``saige-k8s train`` on a tiny
Llama (built offline) for each precision and width multiple and prints tokens/s, padding
waste and eval loss, so the shipped multiple can be checked against its neighbours.

Run (from the repository root, on a machine with a CUDA GPU)::

    python tests/benchmarks/bench_gpu_padding.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

#: Runs the CLI with the multiple under test (argv[1]) in place of the shipped one.
RUNNER = (
    "import sys; import saige_k8s.training.loop as loop; loop.CUDA_PAD_MULTIPLE = int(sys.argv.pop(1)); "
    "from saige_k8s.cli import main; main()"
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--runs", default="auto:1,auto:8,auto:64,fp32:1,fp32:8", help="precision:multiple,...")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("bench_gpu_padding: needs a CUDA GPU (the multiple applies on CUDA only)", file=sys.stderr)
        return 2
    from saige_k8s.experiences.demo import DemoOptions
    from tests.benchmarks.bench_train import prepare, tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # The demo database's defaults, as `saige-k8s demo-db` makes them.
        data = prepare(work, args.rows, "tinyllama", 0.05, DemoOptions.response_median_bytes)
        model = tiny_model(work, data)
        print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}\n")
        print("| precision | width multiple | tokens/s | padding waste | train s | eval loss |")
        print("|---|---:|---:|---:|---:|---:|")
        for run in args.runs.split(","):
            precision, multiple = run.split(":")
            out = work / f"run-{precision}-{multiple}"
            command = [sys.executable, "-c", RUNNER, multiple, "train", "--dataset", str(data), "--model", model]
            command += ["--output-dir", str(out), "--precision", precision, "--epochs", str(args.epochs)]
            command += ["--batch-size", "8", "--max-seq-len", "512", "--target-modules", "all-linear"]
            subprocess.run(command, check=True, capture_output=True, cwd=REPO)
            m = json.loads((out / "metrics.json").read_text())
            print(
                f"| {precision} | {multiple} | {m['tokens_per_second']:,.0f} | {m['padding_waste']:.1%} "
                f"| {m['train_seconds']:.1f} | {m['eval_loss']:.4f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
