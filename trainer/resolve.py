"""Every `auto` in a config, resolved once, before any weights or data are loaded.

The resolved config is what the run folder and each checkpoint record, and what a resume compares
with the run's saved one (a resume on another kind of machine, where `auto` would choose another
dtype, is then refused instead of silently training differently). It depends only on the config,
the training files' sizes, the model's config.json and the device.
"""

from __future__ import annotations

import torch

from trainer.attention import choose_attention_for
from trainer.config import Config
from trainer.data.pipeline import train_file_bytes
from trainer.model import lora_target_modules, resolve_dtype
from trainer.schedule import auto_epochs


def mixed_precision_mode(setting: str, device: torch.device) -> str:
    """`auto`: bf16 autocast on a CUDA GPU that supports it, none elsewhere."""
    if setting != "auto":
        return setting
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"


def resolve_config(config: Config, *, device: torch.device, model_config) -> Config:
    """Fill in `training.epochs`, `model.dtype`, `training.mixed_precision`, `model.attention` and
    `lora.target_modules` (in place; also returned). Raises UserError for a backend that cannot run."""
    if config.training.epochs == "auto":
        config.training.epochs = float(auto_epochs(train_file_bytes(config)))
    dtype = resolve_dtype(config.model.dtype, device)
    config.model.dtype = str(dtype).removeprefix("torch.")
    config.training.mixed_precision = mixed_precision_mode(config.training.mixed_precision, device)
    config.model.attention = choose_attention_for(model_config, dtype, config.model.attention, device)
    if config.method in ("lora", "qlora"):
        config.lora.target_modules = lora_target_modules(config, model_config)
    return config
