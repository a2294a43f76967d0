"""Decisions every process of a run must make alike: one process decides, or all agree.

A decision taken on the main process alone (what to do with the run folder, a user error found
there) is shared with the others, so a user error ends every process with the same message and
exit code instead of leaving them waiting in a collective until the launcher kills them.

The same agreement covers how a run starts and ends on several processes: what the launcher asked
for (`launcher_settings`: an `accelerate config` file's FSDP or DeepSpeed choice and mixed
precision, honoured or refused, never dropped), a process group of one when FSDP runs in one
process, the check that every process sees the same run folder, and a clean shutdown of the
process group.
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Callable, Mapping, TypeVar

import torch
from accelerate.utils import broadcast_object_list, gather_object

from trainer.errors import UserError
from trainer.layout import SHARED_CHECK_FILE

T = TypeVar("T")


def decide_on_main(accelerator, decide: Callable[[], T]) -> T:
    """Run `decide` on the main process and return its result on every process; a `UserError` it
    raises is raised on every process (marked `shared`, so only the main process prints it)."""
    if accelerator.num_processes == 1:
        return decide()
    outcome: list = [None]
    if accelerator.is_main_process:
        try:
            outcome[0] = ("ok", decide())
        except UserError as err:
            outcome[0] = ("error", err)
    broadcast_object_list(outcome, from_process=0)
    kind, value = outcome[0]
    if kind == "error":
        value.shared = True
        raise value
    return value


def sum_over_processes(accelerator, values: list[float]) -> list[float]:
    """Element-wise sum of `values` over all processes (one small all-reduce; a GPU sync)."""
    if accelerator.num_processes == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    return accelerator.reduce(tensor, reduction="sum").tolist()


def all_processes_ok(accelerator, ok: bool) -> bool:
    """True when `ok` is true on every process."""
    return sum_over_processes(accelerator, [0.0 if ok else 1.0])[0] == 0


# ---------------------------------------------------------------------------------------------
# What the launcher asked for


class LauncherConflict(UserError):
    """`accelerate launch` (its config file or flags) asked for `setting`=`value`, which this
    trainer cannot do or which contradicts `config_key` in the run's config."""

    shared = True  # every process reads the same environment and raises the same error

    def __init__(self, message: str, setting: str = "", value: str = "", config_key: str | None = None):
        super().__init__(message)
        self.setting, self.value, self.config_key = setting, value, config_key


@dataclass(frozen=True)
class LauncherSettings:
    """What `accelerate launch` exported for this process (see `launcher_settings`)."""

    fsdp: bool = False
    """ACCELERATE_USE_FSDP: the accelerate config's `distributed_type: FSDP` (or `--use_fsdp`)."""
    deepspeed: bool = False
    """ACCELERATE_USE_DEEPSPEED: `distributed_type: DEEPSPEED` (or `--use_deepspeed`)."""
    mixed_precision: str | None = None
    """ACCELERATE_MIXED_PRECISION (`mixed_precision:` of the config file, or `--mixed_precision`)."""
    fsdp_options: dict[str, str] = field(default_factory=dict)
    """The FSDP_* variables, as exported (names without the prefix: VERSION, OFFLOAD_PARAMS, ...)."""


def launcher_settings(environ: Mapping[str, str] | None = None) -> LauncherSettings:
    """Read what `accelerate launch` exports (accelerate 1.16, `utils/launch.py`: `prepare_multi_gpu_env`
    and `prepare_deepspeed_cmd_env`). torchrun and `python` export none of it."""
    env = os.environ if environ is None else environ
    flag = lambda name: _truthy(env.get(name, "false"))
    return LauncherSettings(
        fsdp=flag("ACCELERATE_USE_FSDP"),
        deepspeed=flag("ACCELERATE_USE_DEEPSPEED"),
        mixed_precision=env.get("ACCELERATE_MIXED_PRECISION", "").strip().lower() or None,
        fsdp_options={name.removeprefix("FSDP_"): value for name, value in env.items() if name.startswith("FSDP_")},
    )


def _truthy(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "y")


# The FSDP_* variables `_apply_fsdp` does not read are the ones FSDP2 ignores (accelerate itself drops
# SHARDING_STRATEGY, BACKWARD_PREFETCH, USE_ORIG_PARAMS and SYNC_MODULE_STATES with FSDP2), one that
# only size-based wrapping reads (MIN_NUM_PARAMS, refused with it), and requests this trainer always
# fulfils: CPU_RAM_EFFICIENT_LOADING (only the main process loads the weights) and a STATE_DICT_TYPE
# other than LOCAL (checkpoints are whole Hugging Face folders, the resumable state is sharded).
_LAUNCH_FLAG = {
    "VERSION": "fsdp_version",
    "RESHARD_AFTER_FORWARD": "fsdp_reshard_after_forward",
    "OFFLOAD_PARAMS": "fsdp_offload_params",
    "AUTO_WRAP_POLICY": "fsdp_auto_wrap_policy",
    "STATE_DICT_TYPE": "fsdp_state_dict_type",
    "FORWARD_PREFETCH": "fsdp_forward_prefetch",
    "ACTIVATION_CHECKPOINTING": "fsdp_activation_checkpointing",
    "ACTIVATION_CHECKPOINTING_OFFLOAD": "fsdp_activation_checkpointing_offload",
    "IGNORED_MODULES": "fsdp_ignored_modules",
    "TRANSFORMER_CLS_TO_WRAP": "fsdp_transformer_layer_cls_to_wrap",
}


def _refuse(option: str, value: str, why: str, fix: str) -> LauncherConflict:
    key = _LAUNCH_FLAG.get(option, f"fsdp_{option.lower()}")
    return LauncherConflict(
        f"the accelerate launcher asks for FSDP with FSDP_{option}={value} (`{key}: {value}` in the accelerate config "
        f"file, or --{key}), which {why}. Fix: {fix}",
        setting=f"FSDP_{option}",
        value=value,
    )


def _take(section, key: str, value, path: str, setting: str, shown: str) -> None:
    """Set `section.key` to the launcher's `value`; a different value set in the config file is an error."""
    if key in section.model_fields_set and getattr(section, key) != value:
        raise LauncherConflict(
            f"the accelerate launcher sets {setting}={shown} but the config sets {path}={getattr(section, key)}. "
            f"Fix: make them agree: change {path} in the config (or remove it to take the launcher's), or the "
            "launcher's setting in the accelerate config file",
            setting=setting,
            value=shown,
            config_key=path,
        )
    setattr(section, key, value)


def _apply_fsdp(config, options: dict[str, str]) -> None:
    dist = config.distributed
    if dist.strategy == "ddp" and "strategy" in dist.model_fields_set:
        raise LauncherConflict(
            "the accelerate launcher asks for FSDP "
            "(ACCELERATE_USE_FSDP=true: `distributed_type: FSDP` in the accelerate "
            "config file, or --use_fsdp) but the config sets distributed.strategy=ddp. Fix: set "
            "distributed.strategy=fsdp (or auto), or launch with a config file whose distributed_type is MULTI_GPU",
            setting="ACCELERATE_USE_FSDP",
            value="true",
            config_key="distributed.strategy",
        )
    version = options.get("VERSION", "1").strip()
    if version != "2":
        raise _refuse(
            "VERSION",
            version,
            "this trainer does not do: it shards with FSDP2 (fully_shard)",
            "set `fsdp_version: 2` in the accelerate config file (or pass --fsdp_version 2)",
        )
    policy = options.get("AUTO_WRAP_POLICY", "").strip().upper()
    if policy not in ("", "TRANSFORMER_BASED_WRAP"):
        raise _refuse(
            "AUTO_WRAP_POLICY",
            options["AUTO_WRAP_POLICY"],
            "this trainer does not do: it shards every transformer block, then the rest of the model",
            "set `fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP` in the accelerate config file (or remove it)",
        )
    for option in ("FORWARD_PREFETCH", "ACTIVATION_CHECKPOINTING_OFFLOAD"):
        if _truthy(options.get(option, "false")):
            raise _refuse(
                option,
                options[option],
                "this trainer does not do with FSDP2",
                f"set `{_LAUNCH_FLAG[option]}: false` in the accelerate config file",
            )
    if options.get("IGNORED_MODULES", "").strip():
        raise _refuse(
            "IGNORED_MODULES",
            options["IGNORED_MODULES"],
            "this trainer does not do: every module is sharded",
            f"remove `{_LAUNCH_FLAG['IGNORED_MODULES']}` from the accelerate config file",
        )
    state_dict_type = options.get("STATE_DICT_TYPE", "").strip().upper()
    if state_dict_type == "LOCAL_STATE_DICT":
        raise _refuse(
            "STATE_DICT_TYPE",
            options["STATE_DICT_TYPE"],
            "FSDP2 does not support",
            "set `fsdp_state_dict_type: SHARDED_STATE_DICT` (or FULL_STATE_DICT) in the accelerate config file",
        )
    dist.strategy = "fsdp"
    if "RESHARD_AFTER_FORWARD" in options:
        value = options["RESHARD_AFTER_FORWARD"].strip()
        if value.lower() not in ("true", "false", "1", "0"):
            raise _refuse(
                "RESHARD_AFTER_FORWARD",
                value,
                "is not a true/false value (FSDP2)",
                "set `fsdp_reshard_after_forward: true` (or false) in the accelerate config file",
            )
        _take(
            dist,
            "reshard_after_forward",
            _truthy(value),
            "distributed.reshard_after_forward",
            "FSDP_RESHARD_AFTER_FORWARD",
            value,
        )
    if "OFFLOAD_PARAMS" in options:
        value = options["OFFLOAD_PARAMS"].strip()
        _take(dist, "cpu_offload", _truthy(value), "distributed.cpu_offload", "FSDP_OFFLOAD_PARAMS", value)
    if _truthy(options.get("ACTIVATION_CHECKPOINTING", "false")):
        # FSDP's activation checkpointing of every block is what gradient checkpointing does here.
        _take(
            config.model,
            "gradient_checkpointing",
            True,
            "model.gradient_checkpointing",
            "FSDP_ACTIVATION_CHECKPOINTING",
            options["ACTIVATION_CHECKPOINTING"],
        )


def launcher_wrap_classes(environ: Mapping[str, str] | None = None) -> list[str]:
    """The block classes an accelerate config names for FSDP's transformer-based wrapping (empty:
    none named); the sharded strategy checks them against the model's blocks once it is loaded."""
    names = launcher_settings(environ).fsdp_options.get("TRANSFORMER_CLS_TO_WRAP", "")
    return [name.strip() for name in names.split(",") if name.strip()]


def apply_launcher_settings(config, settings: LauncherSettings) -> None:
    """Honour what the launcher asked for in `config` (in place), or refuse it (`LauncherConflict`),
    before anything loads. Precedence (README, "Many GPUs"):

    * FSDP (`distributed_type: FSDP`, fsdp_version 2) means `distributed.strategy: fsdp`, with the
      launcher's reshard_after_forward, offload_params and activation_checkpointing; a value the
      config file sets differently is an error naming both; options FSDP2 here cannot do are refused.
    * DeepSpeed is refused: checkpoints here are whole Hugging Face folders and resumes are exact,
      which this trainer guarantees only for its own DDP and FSDP2.
    * Mixed precision: the config file wins; `training.mixed_precision: auto` takes the launcher's
      bf16 or fp16; the launcher's bf16/fp16 against another value in the config is an error. The
      launcher's `no` is its default when nothing was chosen, so it never conflicts.
    """
    if settings.deepspeed:
        raise LauncherConflict(
            "the accelerate launcher asks for DeepSpeed (`distributed_type: DEEPSPEED` in the accelerate config file, "
            "or --use_deepspeed), which this trainer does not use: its checkpoints are whole Hugging Face folders and "
            "its resumes exact only under its own DDP and FSDP2. Fix: launch without the DeepSpeed config "
            "(accelerate launch --multi_gpu ..., or torchrun), and for sharding set distributed.strategy=fsdp "
            "(or use an accelerate config with distributed_type: FSDP and fsdp_version: 2)",
            setting="ACCELERATE_USE_DEEPSPEED",
            value="true",
        )
    if settings.fsdp:
        _apply_fsdp(config, settings.fsdp_options)
    launcher, training = settings.mixed_precision, config.training
    if launcher in (None, "no"):
        return
    if launcher not in ("bf16", "fp16"):
        raise LauncherConflict(
            f"the accelerate launcher asks for mixed_precision={launcher}, which this trainer does not do. Fix: set "
            "`mixed_precision: bf16` (or fp16, no) in the accelerate config file (or pass --mixed_precision bf16)",
            setting="ACCELERATE_MIXED_PRECISION",
            value=launcher,
        )
    if training.mixed_precision == "auto":
        training.mixed_precision = launcher
    elif training.mixed_precision != launcher:
        raise LauncherConflict(
            f"the accelerate launcher sets mixed_precision={launcher} (its config file or --mixed_precision) but the "
            f"config sets training.mixed_precision={training.mixed_precision}. Fix: make them agree: set "
            f"training.mixed_precision={launcher} (or auto, to take the launcher's), or launch with "
            f"--mixed_precision {training.mixed_precision}",
            setting="ACCELERATE_MIXED_PRECISION",
            value=launcher,
            config_key="training.mixed_precision",
        )


def honour_launcher(config, environ=None) -> LauncherSettings:
    """Read what the launcher asked for, apply it to `config` or refuse it, then take the sharding
    over from accelerate (the recipe calls this before it builds its Accelerator)."""
    settings = launcher_settings(environ)
    apply_launcher_settings(config, settings)
    take_over_launcher_plugins(environ)
    return settings


def take_over_launcher_plugins(environ=None) -> None:
    """Once the settings are applied, the sharding is this trainer's (trainer/strategy.py): without
    this, accelerate would build its own FSDP plugin from the same variables on a GPU and wrap the
    model a second time (and on the CPU drop it), so the variables that switch it on are removed."""
    env = os.environ if environ is None else environ
    for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        env.pop(name, None)


# ---------------------------------------------------------------------------------------------
# Process group: one process under FSDP, every process's view of the run folder, shutdown


def ensure_process_group(device: torch.device) -> bool:
    """A process group of one for FSDP in a single process (fully_shard and the distributed
    checkpoint need one; a launcher makes it on several). Its rendezvous is an in-memory store, so
    no port is taken. True when this call made it."""
    if not torch.distributed.is_available() or torch.distributed.is_initialized():
        return False
    # gloo for CPU tensors (the buffers of an offloaded model), nccl for the GPU's.
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1)
    return True


class FolderNotShared(UserError):
    """A folder that every process must see (`output_dir`) is not the same folder on all of them."""

    shared = True  # agreed on by every process; the main process prints it

    def __init__(self, message: str, key: str = "", path: str = "", process: int = 0, host: str = ""):
        super().__init__(message)
        self.key, self.path, self.process, self.host = key, path, process, host


def check_shared_folder(accelerator, folder: Path, key: str = "output_dir") -> None:
    """Every process must see the folder the main process writes to: the main process writes a
    random token into it, every process reads it back, and all agree; otherwise `FolderNotShared`
    on every process, naming the first process (and its host) that could not see it. Collective."""
    if accelerator.num_processes == 1:
        return
    folder = Path(folder)
    check = folder / SHARED_CHECK_FILE
    token = [None]
    if accelerator.is_main_process:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            token[0] = secrets.token_hex(16)
            check.write_text(token[0], encoding="utf-8")
        except OSError:
            token[0] = None  # reported below: the main process itself cannot see it
    broadcast_object_list(token, from_process=0)  # also the barrier: the file is written before anyone reads
    try:
        seen = check.read_text(encoding="utf-8")
    except OSError:
        seen = None
    ok = token[0] is not None and seen == token[0]
    views = gather_object([(accelerator.process_index, socket.gethostname(), str(folder.resolve()), ok)])
    if accelerator.is_main_process:
        check.unlink(missing_ok=True)  # everyone has read it: gather_object waited for all
    blind = [view for view in views if not view[3]]
    if blind:
        process, host, path, _ = blind[0]
        main_host = views[0][1]
        raise FolderNotShared(
            f"{key} must be one folder on a filesystem shared by all nodes: process {process} (host {host}) does not "
            f"see in {path} the file that process 0 (host {main_host}) wrote into {views[0][2]}"
            f"{f' ({len(blind)} processes in all)' if len(blind) > 1 else ''}. Fix: set {key} to a path on a shared "
            "filesystem (NFS, Lustre, GPFS...) that every node mounts at the same place, the same on every node",
            key=key,
            path=path,
            process=process,
            host=host,
        )


SHUTDOWN_TIMEOUT_S = 60


def shutdown(timeout_s: float = SHUTDOWN_TIMEOUT_S) -> None:
    """End the process group cleanly: all processes meet at a barrier, then each destroys its group.
    A process that exits with its group alive can abort in the communication library's teardown
    (`terminate called without an active exception`, SIGABRT), which turns a finished run into a
    failed job. After an error on this process alone the others may never reach the barrier, so it
    waits at most `timeout_s` (the main process may still be writing its report) and then leaves the
    group as it is; with an exception still propagating it does not wait at all."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return
    if sys.exc_info()[1] is not None:
        return  # this process failed on its own: the launcher stops the others
    try:
        torch.distributed.barrier(async_op=True).wait(timeout=timedelta(seconds=timeout_s))
    except RuntimeError:  # timed out, or another process is gone
        return
    torch.distributed.destroy_process_group()


def make_accelerator(config):
    """The run's Accelerator. What `accelerate launch` asked for (its config file's FSDP or
    DeepSpeed, mixed precision) is honoured in the config or refused first, then the dtypes are
    resolved (trainer/resolve.py), since they decide the Accelerator's autocast."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import AutocastKwargs

    from trainer import tracking
    from trainer.resolve import autocast_caches_weights, resolve_precision

    honour_launcher(config)
    resolve_precision(config, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    # accelerate keeps one AcceleratorState per process; another recipe in the same process (the
    # tests, a notebook) may ask for another precision. The process group itself is kept.
    AcceleratorState._reset_state()
    cache = autocast_caches_weights(config.method, config.model.gradient_checkpointing)
    tracking.check_installed(config)
    return Accelerator(
        **tracking.accelerator_options(config),
        mixed_precision=config.training.mixed_precision,
        # Without a GPU, say so: only then does accelerate join torchrun/mpirun CPU processes.
        cpu=not torch.cuda.is_available(),
        kwargs_handlers=[] if cache else [AutocastKwargs(cache_enabled=False)],
    )
