"""The resumable state: what an exact continuation of a run needs, written atomically.

    state-<step>/
      trainable.safetensors   the trained weights by parameter name (LoRA: the adapter only)
      optimizer.pt            the optimizer's state_dict (read back with weights_only=True)
      sharded/                (FSDP instead of the two above) every process's shards of both,
                              through torch.distributed.checkpoint
      rng-<rank>.pt           each process's random generators: python, numpy, torch CPU, CUDA
      state.json              step, process count, the loss sums since the last checkpoint, the
                              checkpoint summaries (report.md), bad-step counters, timings, the
                              data files' digests
      config.yaml             the resolved config
      COMPLETE                written last: a folder without it is never used

The data position is not saved: the data order and the learning rate are pure functions of
(seed, step). Only the newest state is kept: a new one is complete and renamed into place before
the older one is removed, so a crash at any moment leaves at least one whole state. When the run
finishes, the last state keeps only state.json and config.yaml (marked `complete`): what a rerun
needs to say "already complete", without the optimizer state (twice the trained weights).
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from trainer.atomic import commit_partial, discard_partial, partial_path, start_partial
from trainer.config import Config, save_config
from trainer.disk import save_failure
from trainer.distributed import all_processes_ok
from trainer.errors import SaveFailed, UserError
from trainer.faults import crash_point
from trainer.layout import COMPLETE_MARKER, STATE_PREFIX
from trainer.layout import STATE_INFO_FILE as INFO_FILE
from trainer.layout import STATE_OPTIMIZER_FILE as OPTIMIZER_FILE
from trainer.layout import STATE_SHARDED_DIR as SHARDED_DIR
from trainer.layout import STATE_WEIGHTS_FILE as WEIGHTS_FILE

STATE_FORMAT = 1


def state_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / f"{STATE_PREFIX}{step}"


def step_of(path: Path, prefix: str) -> int | None:
    """The step in a `<prefix><step>` folder name (checkpoint-12, state-12), or None."""
    suffix = path.name.removeprefix(prefix)
    return int(suffix) if path.name.startswith(prefix) and suffix.isdigit() else None


def complete_states(output_dir: Path) -> list[Path]:
    """Complete state folders in `output_dir`, oldest first."""
    found = [
        p
        for p in Path(output_dir).glob(f"{STATE_PREFIX}*")
        if step_of(p, STATE_PREFIX) is not None and (p / COMPLETE_MARKER).is_file()
    ]
    return sorted(found, key=lambda p: step_of(p, STATE_PREFIX))


@dataclass
class SavedState:
    """A complete state folder, read back (everything but the tensors)."""

    path: Path
    info: dict
    config: dict
    """The resolved config the run was started with (as plain YAML data)."""

    @property
    def step(self) -> int:
        return self.info["step"]

    @property
    def complete(self) -> bool:
        """The run finished: nothing is left to train."""
        return bool(self.info.get("complete"))

    @property
    def world_size(self) -> int:
        return self.info["world_size"]


def read_state(path: Path) -> SavedState:
    """Read a complete state folder's metadata; raises UserError for anything else."""
    path = Path(path)
    if not (path / COMPLETE_MARKER).is_file():
        raise UserError(
            f"{path} is not a complete resumable state (no {COMPLETE_MARKER} marker). "
            "Fix: give a state-<step> folder of a run, or the run folder itself (resume=auto)"
        )
    try:
        info = json.loads((path / INFO_FILE).read_text(encoding="utf-8"))
        config = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise UserError(
            f"the resumable state {path} cannot be read ({err}). Fix: resume from another state "
            "or start over (overwrite_output_dir=true)"
        ) from None
    if info.get("format") != STATE_FORMAT:
        raise UserError(
            f"the resumable state {path} was written by another version of the trainer "
            f"(format {info.get('format')}, this one reads {STATE_FORMAT}). Fix: start over (overwrite_output_dir=true)"
        )
    return SavedState(path, info, config)


def newest_state(output_dir: Path) -> SavedState | None:
    states = complete_states(output_dir)
    return read_state(states[-1]) if states else None


# ---------------------------------------------------------------------------------------------
# What is saved


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters the optimizer updates, by name (tied weights once)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def capture_rng() -> dict:
    """This process's random generators: python, numpy, torch CPU and (where present) CUDA."""
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": keys.tolist(),
            "position": position,
            "has_gauss": has_gauss,
            "cached_gauss": cached_gauss,
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    numpy = state["numpy"]
    np.random.set_state(
        (
            numpy["kind"],
            np.array(numpy["keys"], dtype=np.uint32),
            numpy["position"],
            numpy["has_gauss"],
            numpy["cached_gauss"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _rng_file(rank: int) -> str:
    return f"rng-{rank}.pt"


# ---------------------------------------------------------------------------------------------
# Save and load (collective: every process calls them)


def save_state(
    accelerator,
    output_dir: Path,
    step: int,
    *,
    model,
    optimizer,
    config: Config,
    info: dict,
    final: bool = False,
    sharded: bool = False,
    expected_bytes: int | None = None,
) -> Path:
    """Write `state-<step>` atomically and remove older states. `model` is the unwrapped model.

    Every process writes its RNG file; the main process writes the rest, marks it complete and
    renames it. A write error on any process (a full disk) discards the new folder on all of them
    and raises `SaveFailed`: the previous state stays as it was. `final` saves only the metadata of
    a finished run. `sharded` (FSDP): every process writes its shards of the weights and the
    optimizer state through torch.distributed.checkpoint instead.
    """
    acc = accelerator
    final_path = state_dir(output_dir, step)
    ok = True
    if acc.is_main_process:
        try:
            start_partial(final_path)
        except OSError as err:
            ok, problem = False, err
    if not all_processes_ok(acc, ok):
        raise _save_failed(output_dir, step, problem if not ok else None)
    partial = partial_path(final_path)
    problem = None
    try:
        if not final:
            torch.save(capture_rng(), partial / _rng_file(acc.process_index))
        if acc.is_main_process:
            record = {
                "format": STATE_FORMAT,
                "step": step,
                "world_size": acc.num_processes,
                "complete": final,
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            } | info
            (partial / INFO_FILE).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
            save_config(config, partial / "config.yaml")
            if not final and not sharded:
                weights = {name: p.detach().contiguous().cpu() for name, p in trainable_parameters(model).items()}
                save_file(weights, partial / WEIGHTS_FILE)
                torch.save(optimizer.state_dict(), partial / OPTIMIZER_FILE)
        if not final and sharded:
            import torch.distributed.checkpoint as dcp

            from trainer.strategy import sharded_training_state

            dcp.save(sharded_training_state(model, optimizer), checkpoint_id=str(partial / SHARDED_DIR))
        crash_point("state_save", step, acc.process_index)
    except (OSError, SafetensorError, RuntimeError) as err:
        problem = save_failure(f"the resumable state of step {step}", output_dir, err, expected_bytes=expected_bytes)
        if problem is None:
            raise
        ok = False
    if not all_processes_ok(acc, ok):
        if acc.is_main_process:
            discard_partial(final_path)
        raise _save_failed(output_dir, step, problem if not ok else None)
    if acc.is_main_process:
        try:
            (partial / COMPLETE_MARKER).write_text(f"{step}\n", encoding="utf-8")
            commit_partial(partial, final_path)
        except OSError as err:
            ok, problem = False, err
            discard_partial(final_path)
        if ok:
            for older in complete_states(output_dir):
                if older != final_path:
                    shutil.rmtree(older, ignore_errors=True)
    if not all_processes_ok(acc, ok):
        raise _save_failed(output_dir, step, problem if not ok else None)
    return final_path


def _save_failed(output_dir: Path, step: int, err: SaveFailed | OSError | None) -> SaveFailed:
    if isinstance(err, SaveFailed):
        return err
    previous = [p.name for p in complete_states(output_dir)]
    kept = f"the previous state ({previous[-1]}) is intact" if previous else "no earlier state exists"
    reason = (
        f"{err.strerror or err} ({err.filename})" if err is not None else "another process could not write its part"
    )
    return SaveFailed(
        f"could not save the resumable state of step {step} in {output_dir}: {reason}; {kept}. "
        "Fix: free disk space (or fix the folder's permissions) and rerun the same command to continue"
    )


def load_state(accelerator, state: SavedState, *, model, optimizer, sharded: bool = False) -> None:
    """Put the saved trained weights into `model` (unwrapped) and the optimizer state into
    `optimizer`. The random generators are restored separately (`restore_rng_of`), last."""
    if sharded:
        from trainer.strategy import load_sharded_training_state

        if not (state.path / SHARDED_DIR).is_dir():
            raise UserError(
                f"the resumable state {state.path} was saved without FSDP; this run shards the model. "
                "Fix: resume with the strategy the run used (distributed.strategy)"
            )
        load_sharded_training_state(model, optimizer, state.path / SHARDED_DIR)
        return
    weights = load_file(state.path / WEIGHTS_FILE)
    params = trainable_parameters(model)
    if weights.keys() != params.keys():
        missing, extra = sorted(params.keys() - weights.keys()), sorted(weights.keys() - params.keys())
        raise UserError(
            f"the resumable state {state.path} does not match this model (missing {missing[:3]}, "
            f"unexpected {extra[:3]}). Fix: start over (overwrite_output_dir=true)"
        )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(weights[name])
    optimizer.load_state_dict(torch.load(state.path / OPTIMIZER_FILE, map_location="cpu", weights_only=True))


def restore_rng_of(accelerator, state: SavedState) -> None:
    restore_rng(torch.load(state.path / _rng_file(accelerator.process_index), weights_only=True))
