"""Every `auto` in a config, resolved once, before any weights or data are loaded.

The resolved config is what the run folder and each checkpoint record, and what a resume compares
with the run's saved one (a resume on another kind of machine, where `auto` would choose another
dtype, is then refused instead of silently training differently). It depends only on the config,
the training files' sizes, the model's config.json, the device and the number of processes.

Two `auto`s are decided by the data instead, and recorded where the data is: `data.format` is a
property of each file (a chat train file beside a prompt/completion validation file is fine), found
as the file is read and written to data_report.json; `eval.metrics` follows the task the preflight
found and the validation references, and each checkpoint.json names the metrics it was scored by.
A resume cannot decide them differently: it requires the same data files (their SHA-256s).
"""

from __future__ import annotations

import torch

from trainer.attention import choose_attention_for
from trainer.config import Config
from trainer.data.pipeline import train_file_bytes
from trainer.errors import UserError
from trainer.families import family_of
from trainer.model import lora_target_modules
from trainer.precision import AUTOCAST, autocast_dtype, dtype_name, resolve_dtype, torch_dtype
from trainer.schedule import auto_epochs


def resolve_precision(config: Config, device: torch.device) -> Config:
    """`model.dtype` and `training.mixed_precision` (in place): they decide the Accelerator, so they
    are settled first. `mixed_precision: auto` computes in the 16-bit `model.dtype` under autocast
    (a bfloat16 base with float32 adapters, or full fine-tuning's float32 master weights, needs it),
    and not at all for a float32 model."""
    config.model.dtype = dtype_name(resolve_dtype(config.model.dtype, device))
    if config.training.mixed_precision == "auto":
        config.training.mixed_precision = AUTOCAST.get(config.model.dtype, "no")
    if config.method == "full" and config.model.dtype in AUTOCAST and config.training.mixed_precision == "no":
        raise UserError(
            f"model.dtype={config.model.dtype} with method=full computes in {config.model.dtype} under autocast over "
            "float32 master weights, and training.mixed_precision=no turns autocast off. Fix: set "
            "training.mixed_precision=auto (or bf16), or model.dtype=float32"
        )
    return config


def autocast_caches_weights(method: str, gradient_checkpointing: bool) -> bool:
    """Whether autocast keeps its bf16 copies of the weights until the forward pass ends. Not for
    full fine-tuning with gradient checkpointing: there the cache alone would hold a bf16 copy of
    the whole model (12 GB for GPT-J-6B) that checkpointing otherwise avoids; a block's weights are
    simply cast again when it is recomputed."""
    return not (method == "full" and gradient_checkpointing)


def activation_dtype(config: Config) -> torch.dtype:
    """The dtype attention sees: the autocast dtype, else the weights' (float32 for QLoRA, whose
    k-bit preparation casts the residual stream to float32)."""
    autocast = autocast_dtype(config.training.mixed_precision)
    if autocast is not None:
        return autocast
    return torch.float32 if config.method == "qlora" else torch_dtype(config.model.dtype)


def resolve_strategy(config: Config, num_processes: int) -> str:
    """`distributed.strategy` with `auto` resolved: fsdp for full fine-tuning on several processes
    (the whole model's weights, gradients and optimizer state no longer fit each GPU), else ddp.
    An explicit strategy (or the fsdp an accelerate launcher asked for, set by
    `trainer.distributed.honour_launcher` before this runs) is kept."""
    requested = config.distributed.strategy
    if requested != "auto":
        return requested
    return "fsdp" if config.method == "full" and num_processes > 1 else "ddp"


def resolve_config(config: Config, *, device: torch.device, model_config, num_processes: int) -> Config:
    """Fill in every `auto` (in place; also returned): epochs, dtypes, attention, LoRA targets,
    packing and the strategy (for `num_processes` processes). Raises UserError for an attention
    backend or a precision setting that cannot run here, before anything loads."""
    resolve_precision(config, device)
    if config.training.epochs == "auto":
        config.training.epochs = float(auto_epochs(train_file_bytes(config)))
    config.model.attention = choose_attention_for(
        model_config, activation_dtype(config), config.model.attention, device
    )
    if config.method in ("lora", "qlora"):
        config.lora.target_modules = lora_target_modules(config, model_config)
    if config.data.packing == "auto":  # exact where the family's attention keeps packed examples apart
        config.data.packing = family_of(model_config) is not None
    config.distributed.strategy = resolve_strategy(config, num_processes)
    return config
