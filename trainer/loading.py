"""Load a checkpoint folder or an exported model for inference (export, generate, serve).

A folder is one of two kinds, told apart by its files:

* adapter: `adapter_config.json` + `adapter_model.safetensors` (a LoRA or QLoRA checkpoint). Its base
  model is `base_model_name_or_path` in adapter_config.json (or `--base`); the base is always loaded
  unquantized in the chosen dtype and the adapter merged into it, also for QLoRA runs (merging into
  4-bit weights fails or degrades the model, peft#638).
* full: `config.json` + `model.safetensors` (or a sharded `model.safetensors.index.json`): a full
  fine-tuning checkpoint or a folder written by `trainer.export`.

The tokenizer (with the chat template training used) always comes from the folder itself. Only
safetensors are read and no code shipped with a model is ever run (trust_remote_code off).
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from trainer.errors import UsageError, UserError
from trainer.hub import load_options, offline_fix
from trainer.precision import DTYPE_CHOICES, DTYPE_NAMES

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FULL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
TRAINER_CONFIG = "config.yaml"

# "gpt2" or "EleutherAI/gpt-j-6b": what the Hub accepts as a model id.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


@dataclass
class CheckpointInfo:
    """What a folder holds, read from its files without loading any weights."""

    path: Path
    kind: str  # "adapter" or "full"
    adapter_config: dict = field(default_factory=dict)
    trainer_config: dict = field(default_factory=dict)  # the run's config.yaml, if the folder has one

    @property
    def training_seed(self) -> int | None:
        return (self.trainer_config.get("training") or {}).get("seed")

    @property
    def training_dtype(self) -> str | None:
        dtype = (self.trainer_config.get("model") or {}).get("dtype")
        return dtype if dtype in DTYPE_NAMES else None

    @property
    def method(self) -> str | None:
        return self.trainer_config.get("method")


def inspect_checkpoint(path: str | Path) -> CheckpointInfo:
    """Tell an adapter checkpoint from a full model; anything else is a `UserError` naming the path."""
    path = Path(path)
    fix = "Fix: give a checkpoint-<step> folder of a run, or a folder written by `python -m trainer.export`"
    if not path.exists():
        raise UserError(f"{path} does not exist. {fix}")
    if not path.is_dir():
        raise UserError(f"{path} is a file, not a checkpoint folder. {fix}")
    trainer_config = _read_trainer_config(path)
    if (path / ADAPTER_CONFIG).is_file():
        if not (path / ADAPTER_WEIGHTS).is_file():
            raise UserError(
                f"{path} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS} (only safetensors weights are loaded). {fix}"
            )
        try:
            adapter_config = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UserError(f"{path / ADAPTER_CONFIG} is not valid JSON ({err}). {fix}") from None
        return CheckpointInfo(path, "adapter", adapter_config, trainer_config)
    if (path / "config.json").is_file() and any((path / name).is_file() for name in FULL_WEIGHTS):
        return CheckpointInfo(path, "full", {}, trainer_config)
    raise UserError(
        f"{path} is not a checkpoint: it has neither {ADAPTER_CONFIG} + {ADAPTER_WEIGHTS} (LoRA) nor "
        f"config.json + model.safetensors (full model). {fix}"
    )


def _read_trainer_config(path: Path) -> dict:
    try:
        config = yaml.safe_load((path / TRAINER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}  # provenance only: a folder without a readable one still loads
    return config if isinstance(config, dict) else {}


def base_model_name(info: CheckpointInfo, override: str | None = None) -> str:
    """The base model of an adapter checkpoint: `--base`, else adapter_config.json's
    base_model_name_or_path. A path that is not there stops with the path and the `--base` fix."""
    source = "--base" if override else f"{info.path / ADAPTER_CONFIG} (base_model_name_or_path)"
    name = override or info.adapter_config.get("base_model_name_or_path")
    if not name:
        raise UserError(
            f"{info.path / ADAPTER_CONFIG} names no base model. Fix: pass --base PATH_OR_ID, the model the run trained"
        )
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if path.is_absolute() or name.startswith((".", "~")) or not _HUB_ID.fullmatch(name):
        raise UserError(f"base model {name} (from {source}) does not exist on this machine. {_base_fix(info)}")
    return name  # a Hugging Face id, or a relative path that is not here: loading says which


def _base_fix(info: CheckpointInfo) -> str:
    trained = (info.trainer_config.get("model") or {}).get("name_or_path")
    hint = f" (the run's config.yaml says model.name_or_path: {trained})" if trained else ""
    return (
        f"Fix: pass --base PATH_OR_ID with the base model's folder or Hugging Face id{hint}; a relative path "
        "in adapter_config.json is relative to the folder training ran in"
    )


def resolve_device(name: str | None = None) -> torch.device:
    """`--device`: a torch device name, or `auto`/None: cuda if a GPU is visible, else cpu."""
    if not name or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name!r} is not a device. Fix: cpu, cuda, cuda:1, ... or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(
            f"--device {name}: no CUDA GPU is visible to this process. Fix: --device cpu, or run on a GPU machine"
        )
    return device


def load_checkpoint_tokenizer(info: CheckpointInfo):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(info.path, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise UserError(
            f"could not load the tokenizer from {info.path}: {_first_line(err)}. "
            "Fix: the folder needs the tokenizer files a checkpoint or export has "
            "(tokenizer.json, tokenizer_config.json)"
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # as in training; generation masks padding by position
    return tokenizer


def load_checkpoint_model(
    info: CheckpointInfo, dtype: torch.dtype, *, base: str | None = None, merge_safely: bool = False
):
    """The model on the CPU in `dtype`, eval mode: the full model, or the base with the adapter merged.
    `merge_safely` checks the merged weights for NaN first (peft's safe_merge), as export does."""
    from transformers import AutoModelForCausalLM

    if info.kind == "full":
        try:
            model = AutoModelForCausalLM.from_pretrained(info.path, dtype=dtype, trust_remote_code=False)
        except (OSError, ValueError) as err:
            raise UserError(f"could not load the model in {info.path}: {_first_line(err)}") from None
    else:
        model = _merged_adapter_model(info, dtype, base, merge_safely)
    model.config.use_cache = True  # training saves it off; generation wants the KV cache
    return model.eval()


def _merged_adapter_model(info: CheckpointInfo, dtype: torch.dtype, base: str | None, merge_safely: bool):
    from trainer.quantization import quiet_bitsandbytes_import

    quiet_bitsandbytes_import()  # peft imports bitsandbytes whenever it is installed
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    name = base_model_name(info, base)
    try:
        # No quantization_config: the base is loaded in `dtype` even when the run was QLoRA.
        base_model = AutoModelForCausalLM.from_pretrained(
            name, dtype=dtype, trust_remote_code=False, **load_options(name)
        )
    except (OSError, ValueError) as err:
        source = "--base" if base else f"{info.path / ADAPTER_CONFIG} (base_model_name_or_path)"
        if Path(name).expanduser().is_dir():
            problem = f"could not be loaded ({_first_line(err)})"
        elif load_options(name).get("local_files_only"):
            problem = f"is not a folder here and {offline_fix(name)}"
        else:
            problem = f"is not a folder here, nor a Hugging Face model that loads ({_first_line(err)})"
        raise UserError(f"base model {name} (from {source}) {problem}. {_base_fix(info)}") from None
    try:
        with warnings.catch_warnings():  # peft asks transformers a deprecated question; not the user's concern
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            model = PeftModel.from_pretrained(base_model, info.path, is_trainable=False)
        return model.merge_and_unload(safe_merge=merge_safely)
    except (ValueError, RuntimeError, KeyError) as err:
        raise UserError(
            f"the adapter in {info.path} does not fit the base model {name}: {_first_line(err)}. {_base_fix(info)}"
        ) from None


def position_limit(model) -> int:
    """How many positions (prompt + completion tokens) the model can attend over."""
    return getattr(model.config, "max_position_embeddings", None) or 10**9


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0].rstrip(".") if text else type(err).__name__


def add_model_arguments(parser, base_help: str = "base model of an adapter checkpoint") -> None:
    """`--base`, `--dtype` and `--device`: how the commands that run a checkpoint (generate, serve,
    compare) load it."""
    parser.add_argument("--base", metavar="PATH_OR_ID", help=f"{base_help} (default: adapter_config.json's)")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPE_CHOICES,
        help="weights dtype (auto: bfloat16 on a CUDA GPU that supports it, else float32)",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if available)")
