"""Export a trained run: the adapter merged into the base model, and an Ollama Modelfile.

The Modelfile's TEMPLATE is built from the same format pieces as the dataset's text, so
Ollama prompts the merged model exactly the way it was trained.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from saige_k8s.dataset.formats import FORMATS, prompt_prefix
from saige_k8s.errors import InputError
from saige_k8s.spec import TrainSpec
from saige_k8s.training import atomic
from saige_k8s.training.loop import ADAPTER, MERGED, METRICS, MODELFILE, OUTPUTS
from saige_k8s.training.model import load_tokenizer

log = logging.getLogger(__name__)


def modelfile(format_name: str, system: str, model_dir: str = f"./{MERGED}") -> str:
    """An Ollama Modelfile whose TEMPLATE renders prompts as the dataset's format does."""
    fmt = FORMATS[format_name]
    with_system, between = prompt_prefix(fmt, "{{ .System }}")
    without_system, _ = prompt_prefix(fmt, "")
    head = without_system
    if with_system != without_system:  # mistral has no system turn
        head = "{{ if .System }}" + with_system + "{{ else }}" + without_system + "{{ end }}"
    template = head + "{{ .Prompt }}" + between
    lines = [f"FROM {model_dir}", f'TEMPLATE """{template}"""', f'PARAMETER stop "{fmt.end_of_turn}"']
    if system and fmt.system_open is not None:
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"


def export_run(run_dir: Path, out_dir: Path | None = None, force: bool = False) -> Path:
    """Merge ``run_dir/adapter`` into its base model (safetensors) and write the Modelfile.

    Both replace what an earlier export left only once written whole (Ollama may be reading it).
    A run the gate rejected is not exported unless ``force``: only a promoted model is served.
    """
    import torch
    from peft import PeftModel

    from saige_k8s.training.model import load_base_model, without_quantization_config

    metrics = _read_metrics(run_dir)
    _check_not_rejected(run_dir, force)
    out = out_dir or run_dir / MERGED
    atomic.remove_stale(run_dir, OUTPUTS)
    atomic.remove_stale(out.parent, {out.name})
    spec = TrainSpec.model_validate({**metrics["hyperparameters"], "quantization": None})
    base = load_base_model(spec, dtype=torch.float32)
    merged = without_quantization_config(PeftModel.from_pretrained(base, run_dir / ADAPTER).merge_and_unload())
    with atomic.writing(out), atomic.replacing_dir(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        load_tokenizer(spec).save_pretrained(tmp)
    location = f"./{out.relative_to(run_dir)}" if out.is_relative_to(run_dir) else str(out)
    with atomic.writing(run_dir / MODELFILE):
        atomic.write_text(run_dir / MODELFILE, modelfile(metrics["format"], metrics.get("system_prompt", ""), location))
    return out


def _check_not_rejected(run_dir: Path, force: bool) -> None:
    try:
        verdict = json.loads((run_dir / "eval.json").read_text(encoding="utf-8")).get("verdict")
    except (OSError, ValueError):
        return  # not evaluated (evaluation is off): nothing to refuse on
    if verdict == "rejected" and not force:
        raise InputError(
            f"run {run_dir.name} was rejected by the gate (see {run_dir / 'eval.json'}); "
            "export it anyway with --force, e.g. after saige-k8s promote"
        )


def _read_metrics(run_dir: Path) -> dict[str, Any]:
    path = run_dir / METRICS
    if not (run_dir / ADAPTER).is_dir() or not path.is_file():
        raise InputError(f"not a finished training run (no {ADAPTER}/ or {METRICS}): {run_dir}")
    return json.loads(path.read_text())
