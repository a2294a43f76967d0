"""Self-contained checkpoint folders, written atomically.

A checkpoint is built in a hidden temporary folder and renamed into place only once every file is
written, so a crash can never leave a `checkpoint-<step>/` that looks complete but is not.
Loading one needs only transformers (full fine-tuning) or peft (LoRA), never this project.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from trainer.config import Config, save_config
from trainer.data.jsonl import write_jsonl

CHECKPOINT_PREFIX = "checkpoint-"
SAMPLES_FILE = "samples.jsonl"
INFO_FILE = "checkpoint.json"


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return output_dir / f"{CHECKPOINT_PREFIX}{step}"


def save_checkpoint(
    output_dir: Path, step: int, *, model, tokenizer, config: Config, samples: list[dict], info: dict
) -> Path:
    """Write weights (safetensors), tokenizer, resolved config, samples and info; then rename."""
    final = checkpoint_dir(output_dir, step)
    partial = output_dir / f".{final.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    # LoRA: PEFT writes adapter_config.json + adapter_model.safetensors. Full: a whole HF model.
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    save_config(config, partial / "config.yaml")
    write_jsonl(partial / SAMPLES_FILE, samples)
    (partial / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    if final.exists():  # only with overwrite_output_dir, from an earlier run
        shutil.rmtree(final)
    os.replace(partial, final)
    return final
