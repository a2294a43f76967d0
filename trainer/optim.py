"""The optimizer: AdamW from torch, or 8-bit AdamW from bitsandbytes for full fine-tuning on one GPU.

8-bit AdamW keeps both moment estimates in 8 bits (block-wise quantized): 2 bytes per trained
parameter instead of 8, which is what lets GPT-J-6B full fine-tuning fit on one 80 GB GPU. The
paged variant also lets optimizer state spill to CPU memory under memory spikes.
"""

from __future__ import annotations

import torch

from trainer.config import Config
from trainer.errors import UserError


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: decaying biases and norm gains hurts and helps nothing."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]


#: The first bitsandbytes release whose 4-bit layers and 8-bit optimizers run on the CPU here.
CPU_BITSANDBYTES = (0, 50)


def require_bitsandbytes(what: str, device: torch.device):
    """Import bitsandbytes for `what`, or say exactly why it cannot be used here. CUDA GPUs and (from
    bitsandbytes 0.50) the CPU run its 4-bit layers and 8-bit optimizers."""
    from trainer.quantization import import_bitsandbytes

    try:
        bitsandbytes = import_bitsandbytes()  # without its kernel warning (trainer/quantization.py)
    except ImportError:
        raise UserError(f"{what} needs bitsandbytes: pip install -c constraints.txt -e '.[gpu]'") from None
    version = tuple(int(part) for part in bitsandbytes.__version__.split(".")[:2] if part.isdigit())
    if device.type == "cpu" and version < CPU_BITSANDBYTES:
        raise UserError(
            f"{what} on the CPU needs bitsandbytes >= 0.50 (this is {bitsandbytes.__version__}): "
            "pip install -U bitsandbytes"
        )
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"{what} runs on CUDA GPUs and the CPU (bitsandbytes), not on {device.type}")
    return bitsandbytes


def require_device_features(config: Config, device: torch.device) -> None:
    """Check bitsandbytes features before the model loads: failing after loading 12 GB is cruel."""
    if config.method == "qlora":
        require_bitsandbytes("method=qlora", device)
    if config.training.optimizer != "adamw":
        require_bitsandbytes(f"training.optimizer={config.training.optimizer}", device)


def build_optimizer(config: Config, model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    training = config.training
    groups = parameter_groups(model, training.weight_decay)
    if training.optimizer == "adamw":
        # The fused kernel is one launch for all parameters instead of several per tensor.
        return torch.optim.AdamW(groups, lr=training.learning_rate, fused=device.type == "cuda")
    bnb = require_bitsandbytes(f"training.optimizer={training.optimizer}", device)
    optimizer_class = bnb.optim.PagedAdamW8bit if training.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return optimizer_class(groups, lr=training.learning_rate)
