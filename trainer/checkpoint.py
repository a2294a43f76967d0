"""Self-contained checkpoint folders, written atomically.

A checkpoint is built in a hidden temporary folder and renamed into place only once every file is
written and on disk, so a crash can never leave a `checkpoint-<step>/` that looks complete but is
not. Loading one needs only transformers (full fine-tuning) or peft (LoRA), never this project.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError

from trainer.atomic import atomic_folder
from trainer.config import Config, save_config
from trainer.data.jsonl import write_jsonl
from trainer.disk import save_failure
from trainer.faults import crash_point
from trainer.layout import CHECKPOINT_INFO_FILE as INFO_FILE
from trainer.layout import CHECKPOINT_PREFIX, PREDICTIONS_FILE, SAMPLES_FILE
from trainer.precision import torch_dtype


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return output_dir / f"{CHECKPOINT_PREFIX}{step}"


def base_model_reference(name_or_path: str) -> str:
    """Where an adapter's base model is, usable from any folder: the absolute path of a local
    model, the Hugging Face id otherwise."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else name_or_path


def cast_floating(state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating-point tensors in `dtype` (tied weights stay one tensor), the others as they are; the
    copies are made on the CPU, where saving needs them anyway: a second copy of a 6B model on the
    GPU would not fit beside its master weights."""
    cast: dict[tuple, torch.Tensor] = {}
    out = {}
    for name, tensor in state_dict.items():
        if tensor.is_floating_point():
            key = (
                tensor.device,
                tensor.data_ptr(),
                tuple(tensor.shape),
            )  # state_dict() gives tied weights as two views
            if key not in cast:
                cast[key] = tensor.detach().to(device="cpu", dtype=dtype)
            out[name] = cast[key]
        else:
            out[name] = tensor
    return out


def share_tied_weights(model, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state_dict` with every name of a tied parameter (GPT-2's `lm_head.weight` and
    `transformer.wte.weight`) holding one tensor, as the unsharded model's `state_dict()` gives them,
    so that `save_pretrained` stores the tied weight once. A state dict gathered from FSDP shards (or
    cast per name) holds a separate copy under each name, which would be stored twice."""
    names_of: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(parameter), []).append(name)
    shared = dict(state_dict)
    for names in names_of.values():
        present = [name for name in names if name in shared]
        for alias in present[1:]:
            shared[alias] = shared[present[0]]
    return shared


def _record_dtype(folder: Path, state_dict: dict[str, torch.Tensor]) -> None:
    """config.json names the dtype the weights were saved in (save_pretrained writes the model's,
    float32 for master weights saved in bfloat16), so from_pretrained(dtype="auto") loads that."""
    config_file = folder / "config.json"
    dtypes = {t.dtype for t in state_dict.values() if t.is_floating_point()}
    if config_file.exists() and len(dtypes) == 1:
        config = json.loads(config_file.read_text(encoding="utf-8"))
        config["dtype"] = str(dtypes.pop()).removeprefix("torch.")
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_checkpoint(
    output_dir: Path,
    step: int,
    *,
    model,
    tokenizer,
    config: Config,
    samples: list[dict],
    info: dict,
    state_dict: dict[str, torch.Tensor] | None = None,
    expected_bytes: int | None = None,
    predictions: list[dict] | None = None,
) -> Path:
    """Write weights (safetensors, sharded with an index for large models), tokenizer, resolved
    config, samples and info; then rename. `state_dict` gives the weights when they are not the
    model's own tensors (gathered from FSDP shards); full fine-tuning's float32 master weights are
    saved in the compute dtype (`model.dtype`).

    A failed write (a full disk) leaves no folder behind and raises `SaveFailed` (trainer/disk.py
    `save_failure`, which `expected_bytes`, the checkpoint's estimated size, helps tell a full disk
    from another error); the checkpoints and the resumable state saved before are untouched."""
    final = checkpoint_dir(output_dir, step)
    for adapter in getattr(model, "peft_config", {}).values():
        adapter.base_model_name_or_path = base_model_reference(config.model.name_or_path)
    try:
        with atomic_folder(final) as partial:
            # LoRA: PEFT writes adapter_config.json + adapter_model.safetensors. Full: a whole HF model.
            if state_dict is not None:
                if config.method == "full":
                    state_dict = cast_floating(state_dict, torch_dtype(config.model.dtype))
                state_dict = share_tied_weights(model, state_dict)
            model.save_pretrained(partial, safe_serialization=True, state_dict=state_dict)
            if state_dict is not None:
                _record_dtype(partial, state_dict)
            tokenizer.save_pretrained(partial)
            save_config(config, partial / "config.yaml")
            write_jsonl(partial / SAMPLES_FILE, samples)
            if predictions is not None:  # the validation answers the task metrics scored
                write_jsonl(partial / PREDICTIONS_FILE, predictions)
            (partial / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
            crash_point("checkpoint_save", step)
    except (OSError, SafetensorError, RuntimeError) as err:
        failure = save_failure(final.name, output_dir, err, expected_bytes=expected_bytes)
        if failure is None:
            raise
        raise failure from None
    return final
