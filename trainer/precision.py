"""The precision names, in one place: the dtypes a config or a command line may name, the torch
dtype each stands for, what `auto` becomes on a device, and which of them autocast computes in.

Torch-free at import (torch is imported inside the functions that return torch dtypes): the config
(trainer/config.py) takes its `model.dtype` choices from here, and reading a config must not import
torch, so that a typo in one is reported in well under a second.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = ("bfloat16", "float16", "float32")
"""The weight / compute dtypes, as `model.dtype` and the commands' `--dtype` spell them."""

DTYPE_CHOICES = ("auto", *DTYPE_NAMES)
"""What a user may write: a dtype name, or `auto` (see `resolve_dtype`)."""

AUTOCAST = {"bfloat16": "bf16", "float16": "fp16"}
"""The 16-bit dtype names and the `training.mixed_precision` (accelerate's name) that computes in
each under autocast; a float32 model has no autocast."""


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a name in `DTYPE_NAMES`."""
    import torch

    if name not in DTYPE_NAMES:
        raise ValueError(f"{name!r} is not a dtype name; one of {', '.join(DTYPE_NAMES)}")
    return getattr(torch, name)


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> "bfloat16": the name a resolved config records."""
    return str(dtype).removeprefix("torch.")


def autocast_dtype(mixed_precision: str) -> torch.dtype | None:
    """The dtype autocast computes in for a `training.mixed_precision` value (None: no autocast)."""
    names = {autocast: name for name, autocast in AUTOCAST.items()}
    return torch_dtype(names[mixed_precision]) if mixed_precision in names else None


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """A dtype name, or `auto` (None from a command line's default): bfloat16 on a CUDA GPU that
    supports it, else float32 (a CPU, where the smoke tests run)."""
    import torch

    if name not in (None, "auto"):
        return torch_dtype(name)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32
