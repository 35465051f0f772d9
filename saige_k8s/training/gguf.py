"""GGUF files for llama.cpp and Ollama, made by llama.cpp's own converters.

The converters (``convert_hf_to_gguf.py``, ``convert_lora_to_gguf.py`` and the gguf-py they
import) are not on PyPI as a package; the ``llama-cpp-python`` source distribution vendors
them at the same llama.cpp commit as the engine it builds. ``.ci/install-llama-cpp`` installs
the engine and puts the converters in ``<prefix>/share/llama.cpp``; ``SAIGE_LLAMA_CPP``
names another llama.cpp source tree. Quantising goes through the engine's own
``llama_model_quantize``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Final

from saige_k8s.errors import ConfigError, RuntimeFailure

ENV: Final = "SAIGE_LLAMA_CPP"
#: The type the converters write before any quantisation: what the token-equality checks use.
FLOAT: Final = "f16"
#: ``--quantize`` choices: llama.cpp's file types, by the names its tools use.
QUANT_TYPES: Final = {"Q8_0": 7, "Q6_K": 18, "Q5_K_M": 17, "Q4_K_M": 15, "Q4_0": 2}
_INSTALL: Final = "run .ci/install-llama-cpp, or set SAIGE_LLAMA_CPP to a llama.cpp source tree"


def converters() -> Path:
    """The llama.cpp directory holding the converters; a clear error when there is none."""
    root = Path(os.environ.get(ENV) or Path(sys.prefix) / "share" / "llama.cpp")
    for script in ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py"):
        if not (root / script).is_file():
            raise ConfigError(f"GGUF export needs llama.cpp's {script}, not found in {root} ({_INSTALL})")
    return root


def _convert(script: str, args: list[str], what: str) -> None:
    done = subprocess.run(
        [sys.executable, str(converters() / script), *args],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        lines = [line for line in (done.stderr or done.stdout).strip().splitlines() if line.strip()]
        raise RuntimeFailure(f"llama.cpp could not convert {what}: {lines[-1] if lines else 'no output'}")


def convert_model(model_dir: Path, out: Path) -> Path:
    """A Hugging Face model directory as one f16 GGUF file (its tokenizer and chat template included)."""
    _convert("convert_hf_to_gguf.py", [str(model_dir), "--outfile", str(out), "--outtype", FLOAT], str(model_dir))
    return out


def convert_adapter(adapter_dir: Path, base_dir: Path, out: Path) -> Path:
    """A PEFT LoRA adapter as a GGUF LoRA for ``base_dir``'s architecture (llama.cpp ``--lora``, Ollama ADAPTER)."""
    args = [str(adapter_dir), "--base", str(base_dir), "--outfile", str(out), "--outtype", FLOAT]
    _convert("convert_lora_to_gguf.py", args, str(adapter_dir))
    return out


def quantize(source: Path, out: Path, kind: str) -> Path:
    """``source`` (f16 GGUF) quantised to ``kind`` by the llama.cpp engine."""
    if kind not in QUANT_TYPES:
        raise ConfigError(f"unknown quantisation {kind!r} (one of {', '.join(QUANT_TYPES)})")
    try:
        import llama_cpp
    except ImportError as exc:
        raise ConfigError(f"--quantize needs llama-cpp-python ({_INSTALL}): {exc}") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[kind]
    params.nthread = os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params) != 0:
        raise RuntimeFailure(f"llama.cpp could not quantise {source} to {kind}")
    return out
