"""What this machine can train on. torch is imported here, not by callers outside training."""

from __future__ import annotations


def local_gpus() -> int:
    """CUDA devices visible to this process (0 without torch or a GPU)."""
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0
