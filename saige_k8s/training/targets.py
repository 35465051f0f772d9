"""Deployment targets with documented limits on the adapters they take.

Cloudflare Workers AI (the seed's "option B") runs LoRA adapters on a few of its own base
models. Its documentation (developers.cloudflare.com/workers-ai/features/fine-tunes/loras/,
read 2026-12-01) sets these limits: the base is one of the models listed for LoRAs and not
quantised; rank ``r`` at most 32; the adapter file under 300 MB; the files named exactly
``adapter_config.json`` and ``adapter_model.safetensors``; and ``adapter_config.json`` must
carry ``model_type``, one of ``mistral``, ``gemma`` or ``llama``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Final

from saige_k8s.errors import InputError
from saige_k8s.training import atomic

MAX_RANK: Final = 32
MAX_BYTES: Final = 300 * 1000 * 1000
CONFIG: Final = "adapter_config.json"
WEIGHTS: Final = "adapter_model.safetensors"
#: Hugging Face base model (lowercase) -> (Workers AI model, model_type), as documented for LoRAs.
CLOUDFLARE_BASES: Final = {
    "meta-llama/llama-2-7b-chat-hf": ("@cf/meta-llama/llama-2-7b-chat-hf-lora", "llama"),
    "mistralai/mistral-7b-instruct-v0.2": ("@cf/mistral/mistral-7b-instruct-v0.2-lora", "mistral"),
    "google/gemma-2b-it": ("@cf/google/gemma-2b-it-lora", "gemma"),
    "google/gemma-7b-it": ("@cf/google/gemma-7b-it-lora", "gemma"),
    "meta-llama/llama-3.2-11b-vision-instruct": ("@cf/meta/llama-3.2-11b-vision-instruct", "llama"),
    "meta-llama/llama-3.3-70b-instruct": ("@cf/meta/llama-3.3-70b-instruct-fp8-fast", "llama"),
    "meta-llama/llama-guard-3-8b": ("@cf/meta/llama-guard-3-8b", "llama"),
    "meta-llama/llama-3.1-8b-instruct": ("@cf/meta/llama-3.1-8b-instruct-fast", "llama"),
    "mistralai/mistral-small-3.1-24b-instruct-2503": ("@cf/mistralai/mistral-small-3.1-24b-instruct", "mistral"),
    "google/gemma-3-12b-it": ("@cf/google/gemma-3-12b-it", "gemma"),
}


def cloudflare_problems(adapter: Path, base_model: str) -> list[str]:
    """Each documented Workers AI limit the adapter breaks, in one sentence; empty when it fits."""
    problems = []
    try:
        config = json.loads((adapter / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return [f"{CONFIG} cannot be read: {exc}"]
    if base_model.lower() not in CLOUDFLARE_BASES:
        problems.append(
            f"base model {base_model!r} is not one Workers AI runs LoRAs on "
            f"(documented: {', '.join(sorted(CLOUDFLARE_BASES))})"
        )
    rank = max([config.get("r") or 0, *(config.get("rank_pattern") or {}).values()])
    if rank > MAX_RANK:
        problems.append(f"LoRA rank {rank} is above Workers AI's maximum of {MAX_RANK}")
    weights = adapter / WEIGHTS
    if not weights.is_file():
        problems.append(f"there is no {WEIGHTS} (Workers AI takes only that file name)")
    elif (size := os.path.getsize(weights)) >= MAX_BYTES:
        problems.append(f"{WEIGHTS} is {size / 1e6:.0f} MB, Workers AI takes under {MAX_BYTES / 1e6:.0f} MB")
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"the adapter is {config.get('peft_type')}, Workers AI takes LoRA only")
    return problems


def cloudflare_adapter(adapter: Path, base_model: str, out: Path) -> Path:
    """``out/`` with the two files Workers AI takes (``model_type`` added), or an error naming each broken limit."""
    problems = cloudflare_problems(adapter, base_model)
    if problems:
        raise InputError("the adapter does not fit Cloudflare Workers AI: " + "; ".join(problems))
    cf_model, model_type = CLOUDFLARE_BASES[base_model.lower()]
    config = json.loads((adapter / CONFIG).read_text(encoding="utf-8"))
    config["model_type"] = model_type
    with atomic.writing(out), atomic.replacing_dir(out) as tmp:
        shutil.copy2(adapter / WEIGHTS, tmp / WEIGHTS)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (tmp / "README.txt").write_text(f"npx wrangler ai finetune create {cf_model} saige {out}\n", encoding="utf-8")
    return out
