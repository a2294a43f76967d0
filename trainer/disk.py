"""Will the run's files fit on the disk of `output_dir`? Checked before the first step.

The bytes come from the model's parameters and their dtypes:

* a checkpoint: the saved weights (LoRA: the adapter; full: every weight, tied ones once) plus the
  tokenizer files;
* a resumable state: the trained weights plus the optimizer state (AdamW: two moments in the
  weights' dtype; 8-bit AdamW: two bytes a parameter). Replacing a state writes the new one
  before the old one is removed, so two exist for a moment.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.errors import NotEnoughDisk, SaveFailed

#: Config, samples, JSON and safetensors headers: a few kB in practice; this is generous.
SMALL_FILES_BYTES = 1 << 20


def tensor_bytes(tensors, dtype: torch.dtype | None = None) -> int:
    """Bytes of distinct tensors (tied weights counted once; FSDP's sharded ones at their full
    size), floating-point ones counted in `dtype` when given."""
    seen, total = set(), 0
    for tensor in tensors:
        plain = tensor.device.type != "meta" and not hasattr(tensor, "to_local")
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape)) if plain else id(tensor)
        if key not in seen:
            seen.add(key)
            size = dtype.itemsize if dtype is not None and tensor.is_floating_point() else tensor.element_size()
            total += tensor.numel() * size
    return total


def tokenizer_bytes(tokenizer) -> int:
    """What `save_pretrained` writes for this tokenizer (measured in a temporary folder)."""
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def optimizer_state_bytes(trainable: list[torch.Tensor], optimizer: str) -> int:
    numel = sum(p.numel() for p in trainable)
    if optimizer == "adamw":  # exp_avg and exp_avg_sq, each like the parameter, and a step count
        return 2 * tensor_bytes(trainable) + 4 * len(trainable)
    return 2 * numel + numel // 256 * 8 + 4 * len(trainable)  # 8-bit moments + per-block scales


@dataclass
class RunBytes:
    checkpoint: int
    state: int

    def needed(self, checkpoints_left: int, states_present: int) -> int:
        """Bytes still to be written: the remaining checkpoints, and the states that will exist at
        once (two while one replaces the other) beyond those already on disk."""
        return checkpoints_left * self.checkpoint + max(0, 2 - states_present) * self.state


def run_bytes(
    model: torch.nn.Module,
    *,
    method: str,
    optimizer: str,
    tokenizer_size: int,
    checkpoint_dtype: torch.dtype | None = None,
) -> RunBytes:
    """A checkpoint's and a resumable state's bytes. A full checkpoint is the state dict (persistent
    buffers included, tied weights once) in `checkpoint_dtype` (the compute dtype the float32
    master weights are saved in); the state keeps the trained weights as they are."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if method in ("lora", "qlora"):
        weights = tensor_bytes(trainable)
    else:
        weights = tensor_bytes(model.state_dict().values(), checkpoint_dtype)
    checkpoint = weights + tokenizer_size + SMALL_FILES_BYTES
    state = tensor_bytes(trainable) + optimizer_state_bytes(trainable, optimizer) + SMALL_FILES_BYTES
    return RunBytes(checkpoint, state)


def free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def human(size: int) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError


def check_free_space(folder: Path, sizes: RunBytes, *, checkpoints_left: int, states_present: int) -> None:
    """Raise NotEnoughDisk, with both numbers and the fix, when the run's files would not fit."""
    needed = sizes.needed(checkpoints_left, states_present)
    free = free_bytes(folder)
    if needed > free:
        raise NotEnoughDisk(
            f"output_dir {folder} has {human(free)} free, but this run will write about {human(needed)} "
            f"({checkpoints_left} checkpoint(s) of {human(sizes.checkpoint)} and a resumable state of "
            f"{human(sizes.state)}, two of them while one replaces the other). Fix: free space, choose a "
            "folder on a larger disk (output_dir=...), or save fewer checkpoints (checkpoints.count)",
            needed=needed,
            free=free,
        )


def _newest(folder: Path, prefix: str) -> str | None:
    """The newest complete `<prefix><step>` folder's name (a `.partial` one is not complete)."""
    steps = []
    for path in Path(folder).glob(f"{prefix}*"):
        suffix = path.name[len(prefix) :]
        if suffix.isdigit() and path.is_dir():
            steps.append(int(suffix))
    return f"{prefix}{max(steps)}" if steps else None


def save_failure(
    what: str, output_dir: Path, err: BaseException, *, expected_bytes: int | None = None
) -> SaveFailed | None:
    """The SaveFailed for a write of `what` (e.g. `checkpoint-16`) that raised `err`, or None when
    `err` is not a failed write (the caller re-raises it: a bug must not pass for a full disk).

    An OSError is always a failed write. safetensors (SafetensorError) and torch.save (RuntimeError)
    report a full disk with their own types, so those count when the disk has less free space than
    the save needed. The message names the folder, the bytes, and what is still intact."""
    free = free_bytes(output_dir) if Path(output_dir).exists() else 0
    if isinstance(err, OSError):
        reason = err.strerror or str(err)
        if err.filename:
            reason += f" ({err.filename})"
    elif expected_bytes is not None and free < expected_bytes:
        reason = f"the disk is full ({type(err).__name__})"
    else:
        return None
    sizes = (
        f"; it needs about {human(expected_bytes)} and {human(free)} is free"
        if expected_bytes
        else f"; {human(free)} is free"
    )
    checkpoint, state = _newest(output_dir, "checkpoint-"), _newest(output_dir, "state-")
    intact = ", ".join(
        part
        for part in (
            f"the last complete checkpoint is {checkpoint}" if checkpoint else "no checkpoint was saved yet",
            f"the last resumable state is {state}" if state else "no resumable state was saved yet",
        )
        if part
    )
    return SaveFailed(
        f"could not save {what} in {output_dir}: {reason}{sizes}. Nothing of it was kept; {intact} (intact). "
        "Fix: free disk space (or fix the folder's permissions) and rerun the same command to continue",
        needed=expected_bytes or 0,
        free=free,
    )
