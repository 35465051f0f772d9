"""Training recommendations from dataset size and GPU memory (the seed's pipeline step 3).

Rules of thumb, from the seed's model table and training-time estimates: TinyLlama 1.1B
needs ~8 GB without quantisation; a 7B model ~8 GB in 4-bit; Llama 3 8B is the quality
option when memory allows. Small datasets want more epochs and a smaller rank.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

MIN_EXAMPLES = 100
#: Seconds per example per epoch on a T4, from the seed's table (500 examples × 3 epochs).
_SECONDS_PER_EXAMPLE_EPOCH = {"tinyllama": 15 * 60 / 1500, "7b-4bit": 45 * 60 / 1500, "8b-4bit": 55 * 60 / 1500}


@dataclass(frozen=True)
class Recommendation:
    examples: int
    gpu_memory_gb: float | None
    model: str
    format: str
    use_4bit: bool
    epochs: int
    batch_size: int
    lora_rank: int
    estimated_minutes_on_t4: float
    warnings: tuple[str, ...]

    def command(self, dataset: str = "LATEST") -> str:
        parts = [
            "saige-k8s train",
            f"--dataset {dataset}",
            f"--model {self.model}",
            f"--epochs {self.epochs}",
            f"--batch-size {self.batch_size}",
            f"--lora-rank {self.lora_rank}",
        ]
        if self.use_4bit:
            parts.append("--use-4bit")
        return " ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "command": self.command()}


def recommend(examples: int, gpu_memory_gb: float | None = None) -> Recommendation:
    warnings = []
    if examples < MIN_EXAMPLES:
        warnings.append(
            f"only {examples} examples: below ~{MIN_EXAMPLES} the model mostly memorises; collect more "
            "experiences (aim for 1000+) or relax the filters (--preset permissive)"
        )
    memory = gpu_memory_gb
    if memory is not None and memory < 8:
        model, fmt, use_4bit, batch, kind = "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "tinyllama", True, 1, "tinyllama"
        warnings.append("under 8 GB of GPU memory: TinyLlama in 4-bit with batch size 1")
    elif memory is None or memory < 16 or examples < 500:
        model, fmt, use_4bit, batch, kind = "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "tinyllama", False, 4, "tinyllama"
    elif memory < 40:
        model, fmt, use_4bit, batch, kind = "mistralai/Mistral-7B-Instruct-v0.2", "mistral", True, 2, "7b-4bit"
    else:
        model, fmt, use_4bit, batch, kind = "meta-llama/Meta-Llama-3-8B-Instruct", "llama3", True, 4, "8b-4bit"
    epochs = 5 if examples < 500 else (3 if examples <= 5000 else 2)
    rank = 8 if examples < 500 else (16 if examples <= 5000 else 32)
    if kind != "tinyllama" and rank < 32:
        rank = 32  # the seed's setting for 7B models
    minutes = examples * epochs * _SECONDS_PER_EXAMPLE_EPOCH[kind] / 60
    return Recommendation(
        examples, gpu_memory_gb, model, fmt, use_4bit, epochs, batch, rank, round(minutes, 1), tuple(warnings)
    )
