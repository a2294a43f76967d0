"""The transformers model inside the wrappers training puts around it (DDP, torch.compile, PEFT)."""

from __future__ import annotations

import torch


def transformers_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside DDP / torch.compile / PEFT wrappers (to reach its parts).
    FSDP2 shards a model in place (no wrapper), so a sharded model is its own answer."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model
