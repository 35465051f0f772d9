"""Export a trained run so that every engine serves it as it was trained.

- ``adapter/`` is made portable: its base is a reference a user can resolve, its tokenizer
  carries the trained chat template, ``saige.json`` records what we know (the ``package://``
  base as given, the format, the end-of-turn token).
- ``merged/``: the adapter merged into the base, in the base's dtype, with the chat
  template and the trained end-of-turn token as ``generation_config``'s EOS.
- ``gguf/`` (``--gguf``): the merged model, the base and the LoRA as GGUF files made by
  llama.cpp's converters, optionally quantised; ``Modelfile`` then loads the merged GGUF and
  ``Modelfile.adapter`` the base GGUF with the LoRA GGUF on top (one base, adapters swapped).
- ``cloudflare/`` (``--cloudflare``): the adapter as Workers AI takes it, once it passes
  that platform's documented limits.

Every output replaces what an earlier export left only once written whole.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from saige_k8s.dataset.formats import FORMATS
from saige_k8s.errors import InputError
from saige_k8s.spec import TrainSpec
from saige_k8s.training import atomic
from saige_k8s.training.loop import ADAPTER, MERGED, METRICS, MODELFILE, OUTPUTS
from saige_k8s.training.model import PACKAGE_SCHEME, load_tokenizer
from saige_k8s.training.templates import chat_template, modelfile

log = logging.getLogger(__name__)

GGUF: Final = "gguf"
BASE: Final = "base"
CLOUDFLARE: Final = "cloudflare"
ADAPTER_MODELFILE: Final = f"{MODELFILE}.adapter"
#: Our own record of the adapter, beside PEFT's adapter_config.json.
SAIGE_JSON: Final = "saige.json"
DTYPES: Final = ("auto", "float16", "bfloat16", "float32")


@dataclass
class Exported:
    merged: Path
    modelfiles: list[Path]
    gguf: dict[str, Path] = field(default_factory=dict)
    cloudflare: Path | None = None
    serving: Path | None = None


def export_run(
    run_dir: Path,
    out_dir: Path | None = None,
    force: bool = False,
    *,
    gguf: bool = False,
    quantize: str | None = None,
    dtype: str = "auto",
    cloudflare: bool = False,
) -> Exported:
    """Merge ``run_dir/adapter`` into its base model and write what the serving engines read.

    A run the gate rejected is not exported unless ``force``: only a promoted model is served.
    """
    import torch
    from peft import PeftModel

    from saige_k8s.training import gguf as llama
    from saige_k8s.training.data import end_of_turn_id
    from saige_k8s.training.model import load_base_model, without_quantization_config
    from saige_k8s.training.serving import publish_if_champion
    from saige_k8s.training.targets import cloudflare_adapter, cloudflare_problems

    metrics = _read_metrics(run_dir)
    _check_not_rejected(run_dir, force)
    spec = TrainSpec.model_validate({**metrics["hyperparameters"], "quantization": None})
    gguf_base = spec.model.startswith(PACKAGE_SCHEME) or spec.model.endswith(".gguf")
    # Everything that can be refused is refused before minutes of merging.
    if quantize is not None and not gguf:
        raise InputError("--quantize needs --gguf")
    if gguf:
        llama.converters()
        base_dir = run_dir / BASE if gguf_base else _base_dir(spec.model)
    if cloudflare and (problems := cloudflare_problems(run_dir / ADAPTER, spec.model)):
        raise InputError("the adapter does not fit Cloudflare Workers AI: " + "; ".join(problems))
    fmt, system = metrics["format"], metrics.get("system_prompt", "")
    tokenizer = load_tokenizer(spec)
    tokenizer.chat_template = chat_template(fmt, system)
    eot = end_of_turn_id(tokenizer, fmt)
    stop = tokenizer.convert_ids_to_tokens(eot)
    out = out_dir or run_dir / MERGED
    names = {"model": f"model-{quantize or llama.FLOAT}.gguf", "base": f"base-{llama.FLOAT}.gguf"}
    names["adapter"] = f"adapter-{llama.FLOAT}.gguf"
    model_from = f"./{out.relative_to(run_dir)}" if out.is_relative_to(run_dir) else str(out)
    modelfiles = _modelfiles(fmt, system, stop, model_from, names if gguf else None)

    atomic.remove_stale(run_dir, OUTPUTS | {GGUF, BASE, CLOUDFLARE, ADAPTER_MODELFILE})
    atomic.remove_stale(out.parent, {out.name})
    base = without_quantization_config(load_base_model(spec, dtype=torch.float32))
    target = _save_dtype(spec, dtype, gguf_base)
    _portable_adapter(run_dir, base, target, tokenizer, spec.model, gguf_base, (fmt, system, stop))
    merged = PeftModel.from_pretrained(base, run_dir / ADAPTER).merge_and_unload().to(target)
    merged.generation_config.eos_token_id = eot
    with atomic.writing(out), atomic.replacing_dir(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    del merged, base

    result = Exported(merged=out, modelfiles=[run_dir / name for name in modelfiles])
    if gguf:
        result.gguf = _write_gguf(run_dir, out, base_dir, names, quantize)
    for name, text in modelfiles.items():
        with atomic.writing(run_dir / name):
            atomic.write_text(run_dir / name, text)
    if cloudflare:
        result.cloudflare = cloudflare_adapter(run_dir / ADAPTER, spec.model, run_dir / CLOUDFLARE)
    result.serving = publish_if_champion(run_dir)
    return result


def _modelfiles(fmt: str, system: str, stop: str, merged: str, gguf: dict[str, str] | None) -> dict[str, str]:
    """Modelfile: FROM the merged model (its GGUF when there is one); Modelfile.adapter: base GGUF + LoRA GGUF."""
    if gguf is None:
        return {MODELFILE: modelfile(fmt, system, merged, stop)}
    base, adapter = f"./{GGUF}/{gguf['base']}", f"./{GGUF}/{gguf['adapter']}"
    return {
        MODELFILE: modelfile(fmt, system, f"./{GGUF}/{gguf['model']}", stop),
        ADAPTER_MODELFILE: modelfile(fmt, system, base, stop, adapter=adapter),
    }


def _save_dtype(spec: TrainSpec, dtype: str, gguf_base: bool) -> Any:
    """The dtype the merged model is saved in: the one the base is stored in unless asked
    (a GGUF base is quantised: float16, what llama.cpp's converter writes too)."""
    import torch
    from transformers import AutoConfig

    from saige_k8s.training.model import resolve_model_path

    if dtype != "auto":
        return getattr(torch, dtype)
    if gguf_base:
        return torch.float16
    try:
        config = AutoConfig.from_pretrained(resolve_model_path(spec.model), trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise InputError(f"unknown model {spec.model!r}: {str(exc).splitlines()[0]}") from None
    stored = getattr(config, "dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if isinstance(stored, torch.dtype) else torch.float32


def _base_dir(model: str) -> Path:
    """The base's Hugging Face directory: the local one, or the hub download already in the cache."""
    from saige_k8s.training.model import resolve_model_path

    path = Path(resolve_model_path(model)).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, local_files_only=True))
    except Exception as exc:  # noqa: BLE001 - the hub client raises several types for a missing model
        raise InputError(f"base model {model!r} is not in the Hugging Face cache: {exc}") from None


def _portable_adapter(
    run_dir: Path, base: Any, dtype: Any, tokenizer: Any, model: str, gguf_base: bool, served: tuple[str, str, str]
) -> None:
    """A GGUF base cannot be loaded by transformers from its directory: it is written (``base/``)
    where it can, and the adapter names it; any other base is named as the user gave it."""
    if gguf_base:
        with atomic.writing(run_dir / BASE), atomic.replacing_dir(run_dir / BASE) as tmp:
            copy.deepcopy(base).to(dtype).save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    reference = str(run_dir / BASE) if gguf_base else model
    _finish_adapter(run_dir / ADAPTER, tokenizer, reference, model, *served)


def _finish_adapter(
    adapter: Path, tokenizer: Any, reference: str, given: str, fmt: str, system: str, stop: str
) -> None:
    """The adapter, rewritten whole: a resolvable base reference, the chat template, our own record."""
    config_path = adapter / "adapter_config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"unreadable adapter config {config_path}: {exc}") from None
    config["base_model_name_or_path"] = reference
    record = {"base_model": given, "format": fmt, "system_prompt": system, "end_of_turn": stop}
    with atomic.writing(adapter), atomic.replacing_dir(adapter) as tmp:
        for item in adapter.iterdir():
            if item.is_file() and not item.name.startswith("."):
                shutil.copy2(item, tmp / item.name)
        tokenizer.save_pretrained(tmp)
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (tmp / SAIGE_JSON).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def _write_gguf(
    run_dir: Path, merged: Path, base_dir: Path, names: dict[str, str], quantize: str | None
) -> dict[str, Path]:
    """gguf/: the merged model (f16, and quantised if asked), the base and the LoRA, written as one directory."""
    from saige_k8s.training import gguf as llama

    with atomic.writing(run_dir / GGUF), atomic.replacing_dir(run_dir / GGUF) as tmp:
        f16 = llama.convert_model(merged, tmp / f"model-{llama.FLOAT}.gguf")
        if quantize is not None:
            llama.quantize(f16, tmp / names["model"], quantize)
        llama.convert_model(base_dir, tmp / names["base"])
        llama.convert_adapter(run_dir / ADAPTER, base_dir, tmp / names["adapter"])
    return {key: run_dir / GGUF / name for key, name in names.items()}


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
    metrics = json.loads(path.read_text())
    if metrics.get("format") not in FORMATS:
        raise InputError(f"{path} names no known chat format: {metrics.get('format')!r}")
    return metrics
