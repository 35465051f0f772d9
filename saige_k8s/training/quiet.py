"""The libraries' warnings that are expected in a healthy run, silenced where they arise.

Everything else still reaches the log. Each entry says why it is harmless here."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

#: logger -> the start of a message that is expected, and below, why.
EXPECTED_LOGS: dict[str, tuple[str, ...]] = {
    # An optional CPU kernel for 4-bit matmuls (the `kernels` package); the plain one is used.
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
    # Tied input and output embeddings (SmolLM2, TinyLlama): saved once, tied again on load.
    "accelerate.utils.other": ("Removed shared tensor",),
}
#: Loggers whose INFO lines only narrate checkpoints (18 lines per save); warnings still show.
NARRATING_LOGGERS = ("accelerate.checkpointing", "accelerate.accelerator")
#: (category, message regex) of expected Python warnings.
EXPECTED_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    # A GGUF or local base has no config.json on the hub; the vocabulary is never resized here.
    (UserWarning, r"Could not find a config file in "),
    # Raised inside transformers/peft for their own calls; nothing this project calls.
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
)


class _Expected(logging.Filter):
    def __init__(self, starts: tuple[str, ...], below_warning: bool) -> None:
        super().__init__()
        self.starts, self.below_warning = starts, below_warning

    def filter(self, record: logging.LogRecord) -> bool:
        if self.below_warning and record.levelno < logging.WARNING:
            return False
        return not record.getMessage().startswith(self.starts)


@contextlib.contextmanager
def expected_noise_silenced() -> Iterator[None]:
    """Around loading, training, saving and merging a model."""
    filters = [(logging.getLogger(name), _Expected(starts, False)) for name, starts in EXPECTED_LOGS.items()]
    filters += [(logging.getLogger(name), _Expected((), True)) for name in NARRATING_LOGGERS]
    for logger, each in filters:
        logger.addFilter(each)
    try:
        with warnings.catch_warnings():
            for category, message in EXPECTED_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
            yield
    finally:
        for logger, each in filters:
            logger.removeFilter(each)
