"""Export a checkpoint as a plain Hugging Face model folder (what vLLM and `pipeline` load).

    python -m trainer.export CHECKPOINT OUT_DIR [--dtype bfloat16|float16|float32] [--base PATH_OR_ID]
    python -m trainer.export RUN_DIR OUT_DIR --best     # the run's recommended checkpoint

A LoRA or QLoRA checkpoint is merged into its base model, loaded unquantized in `--dtype` (never
into 4-bit weights, even for a QLoRA run); the base is adapter_config.json's
base_model_name_or_path unless `--base` names another. A full fine-tuning checkpoint is copied with
the dtype applied. OUT_DIR gets safetensors weights (sharded with an index above
`--max-shard-size`), config.json, generation_config.json, the tokenizer with its chat template, and
for provenance the run's config.yaml, samples.jsonl and checkpoint.json plus export.json. The folder
is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from trainer.atomic import commit_partial, discard_partial, start_partial
from trainer.cli import command
from trainer.errors import UsageError, UserError
from trainer.loading import (
    base_model_name,
    inspect_checkpoint,
    load_checkpoint_model,
    load_checkpoint_tokenizer,
)
from trainer.precision import DTYPE_NAMES, torch_dtype
from trainer.recommend import add_checkpoint_arguments, checkpoint_from_args

PROVENANCE_FILES = ("config.yaml", "samples.jsonl", "checkpoint.json")
EXPORT_INFO = "export.json"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_checkpoint_arguments(parser, "CHECKPOINT", "a checkpoint-<step> folder (LoRA, QLoRA or full)")
    parser.add_argument(
        "out_dir", metavar="OUT_DIR", type=Path, help="the model folder to write (must not exist, or be empty)"
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPE_NAMES,
        help="weights dtype of the export (default: the dtype the run trained in, else float32)",
    )
    parser.add_argument(
        "--base", metavar="PATH_OR_ID", help="base model of a LoRA checkpoint (default: adapter_config.json's)"
    )
    parser.add_argument(
        "--max-shard-size",
        default="5GB",
        help="largest weights file; bigger models get shards and an index (default 5GB)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    return parser


def check_shard_size(size: str) -> None:
    from transformers.utils.hub import convert_file_size_to_int

    try:
        convert_file_size_to_int(size)
    except ValueError:
        raise UsageError(
            f"--max-shard-size {size!r} is not a size. Fix: give an integer with a unit, e.g. 5GB, 500MB or 2GiB"
        ) from None


def check_out_dir(out_dir: Path, checkpoint: Path, overwrite: bool) -> None:
    if out_dir.resolve() == checkpoint.resolve():
        raise UsageError(f"OUT_DIR {out_dir} is the checkpoint itself. Fix: give a new folder")
    if out_dir.is_file():
        raise UserError(f"OUT_DIR {out_dir} is a file. Fix: give a folder path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(
            f"OUT_DIR {out_dir} already exists and is not empty. Fix: choose a new folder, or pass --overwrite"
        )


def export(
    checkpoint: str | Path,
    out_dir: Path,
    *,
    dtype: str | None = None,
    base: str | None = None,
    max_shard_size: str = "5GB",
    overwrite: bool = False,
    log=print,
) -> Path:
    """Write the merged (LoRA) or converted (full) model to `out_dir`; returns it."""
    info = inspect_checkpoint(checkpoint)
    check_out_dir(out_dir, info.path, overwrite)
    dtype = dtype or info.training_dtype or "float32"
    base_name = base_model_name(info, base) if info.kind == "adapter" else None
    tokenizer = load_checkpoint_tokenizer(info)
    if info.kind == "adapter":
        quantized = " (the run was QLoRA; its 4-bit weights are not used)" if info.method == "qlora" else ""
        log(f"merging the adapter in {info.path} into {base_name}, loaded unquantized in {dtype}{quantized}")
    else:
        log(f"copying the full model in {info.path} as {dtype}")
    model = load_checkpoint_model(info, torch_dtype(dtype), base=base, merge_safely=True)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    try:
        partial = start_partial(out_dir)
        model.save_pretrained(partial, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(partial)
        for name in PROVENANCE_FILES:
            if (info.path / name).is_file():
                shutil.copy2(info.path / name, partial / name)
        record = {
            "source": str(info.path.resolve()),
            "kind": info.kind,
            "method": info.method,
            "base_model": base_name,
            "dtype": dtype,
        }
        (partial / EXPORT_INFO).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        # The umask's permissions (save_pretrained writes safetensors 0600), fsync, then the rename.
        commit_partial(partial, out_dir)
    except OSError as err:
        discard_partial(out_dir)
        raise UserError(
            f"could not write {out_dir} ({err.strerror or err}). Fix: choose a folder you can write to, with free space"
        ) from None
    log(f"wrote {out_dir}")
    return out_dir


@command
def main(argv: list[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    args = build_parser().parse_args(argv)
    check_shard_size(args.max_shard_size)
    checkpoint = checkpoint_from_args(args.checkpoint, args.best)
    export(
        checkpoint,
        args.out_dir,
        dtype=args.dtype,
        base=args.base,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
