"""What a job does with its run folder: start fresh, continue the run, say it is complete, or refuse.

`resume: auto` (the default) makes the same command, started again after any interruption,
continue the same run: when `output_dir` holds a resumable state of the same run, training goes on
from its step. "The same run" means the same resolved config (except the keys in
`RESULT_NEUTRAL_KEYS`, which cannot change the result), the same data file contents and the same
number of processes; any other run in the folder is refused, naming what differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from trainer.config import flatten
from trainer.data.cache import file_digest
from trainer.data.pipeline import data_paths
from trainer.errors import ConfigChanged, ProcessCountChanged, UserError
from trainer.run_folder import FolderContents, RunFolder
from trainer.state import SavedState, newest_state, read_state

#: Keys that cannot change the trained weights, checkpoints or samples: a resumed run may differ in them.
RESULT_NEUTRAL_KEYS = frozenset(
    {
        "checkpoints.state_every_minutes",
        "checkpoints.state_every_steps",
        "training.time_limit",
        "training.max_bad_steps",
        "training.self_test",
        "resume",
        "overwrite_output_dir",
        "data.cache_dir",
        "data.num_proc",
        "output_dir",  # the folder itself is what is being resumed, however its path is spelled
        "tracking.report_to",
        "tracking.project",  # where the run is reported, not what it trains
    }
)

#: Keys that an earlier trainer saved as `auto` and this one resolves at start into the resolved
#: config. A saved `auto` for one of them is the same run: what decides the value (the method and
#: the number of processes) is compared anyway.
RESOLVED_SINCE = frozenset({"distributed.strategy"})

FIX = (
    "Fix: rerun with the config that run used to continue it; or start a new run in another folder "
    "(output_dir=runs/another resume=never), or replace it (overwrite_output_dir=true)"
)


@dataclass
class RunDecision:
    action: Literal["fresh", "resume", "complete"]
    state: SavedState | None = None
    copy_history_from: Path | None = None
    """`resume=PATH` from another run folder: its metrics and earlier checkpoints are copied over."""
    note: str | None = None
    """What the log says about the decision when it is not what the user may expect."""


def config_differences(saved: dict, current: dict, ignore: frozenset[str] = RESULT_NEUTRAL_KEYS) -> dict[str, str]:
    """{key: 'key (X there, Y now)'} for every key whose values differ, except `ignore`d ones, keys
    a newer trainer added (at their defaults) and `RESOLVED_SINCE` keys saved as `auto`."""
    old, new = flatten(saved), flatten(current)
    shown = lambda value: (
        "missing" if value is None else repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "...'"
    )
    return {
        key: f"{key} ({shown(old.get(key))} there, {shown(new.get(key))} now)"
        for key in sorted(old.keys() | new.keys())
        if key not in ignore
        and old.get(key) != new.get(key)
        and not _added_since(key, old, new)
        and not (key in RESOLVED_SINCE and old.get(key) == "auto")
    }


def _added_since(key: str, old: dict, new: dict) -> bool:
    """A key the saved run's trainer did not have yet (a newer version added it), now at its
    default: the run is the same run. Any other value for it is a change."""
    if key in old:
        return False
    from pydantic import BaseModel

    from trainer.config import Config

    model: type[BaseModel] = Config
    *sections, name = key.split(".")
    for section in sections:
        field = model.model_fields.get(section)
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return False
        model = field.annotation
    field = model.model_fields.get(name)
    if field is None:
        return False
    default = field.default_factory() if field.default_factory is not None else field.default
    return default == new.get(key)


def data_digests(config) -> dict[str, str]:
    """SHA-256 of every data file, by path (memoized: the tokenized-data cache asks again)."""
    return {path: file_digest(path) for path in data_paths(config)}


def _compare(
    folder: Path,
    saved_config: dict,
    state: SavedState | None,
    config,
    world_size: int,
    ignore: frozenset[str] = RESULT_NEUTRAL_KEYS,
) -> None:
    current = config.model_dump(mode="json")
    differences = config_differences(saved_config, current, ignore)
    if state is None or state.world_size != world_size:
        # `auto` resolves the strategy by the number of processes: with another number, a strategy
        # that differs is that number's doing, which is refused (or, for a complete run, allowed)
        # below; with no state the run starts afresh, with any number.
        differences.pop("distributed.strategy", None)
    if state is not None:
        saved_data = state.info.get("data_files", {})
        differences |= {
            path: f"the content of {path} (changed since the run started)"
            for path, digest in data_digests(config).items()
            if path in saved_data and saved_data[path] != digest
        }
    if differences:
        listed = "; ".join(differences.values())
        raise ConfigChanged(
            f"output_dir {folder} holds a run with another config: {listed}. {FIX}", keys=list(differences)
        )
    if state is not None and not state.complete and state.world_size != world_size:
        raise ProcessCountChanged(
            f"the run in {folder} was started with {state.world_size} process(es) and this job has {world_size}: "
            "resuming with another number of processes is not supported (each step's batch depends on it). "
            f"Fix: launch it with {state.world_size} processes (accelerate launch --num_processes {state.world_size}), "
            "or start a new run (output_dir=runs/another)",
            saved=state.world_size,
            current=world_size,
        )


def decide_run(config, world_size: int) -> RunDecision:
    """Decide, from the resolved `config` and what `output_dir` holds, what this job does."""
    output_dir = Path(config.output_dir)
    folder = RunFolder(output_dir).contents()
    if config.resume not in ("auto", "never") and (folder.state is None or config.overwrite_output_dir):
        # Once the folder has a state of its own, the same command continues that one (as auto)
        # instead of going back to PATH's older state.
        return _decide_from_path(config, folder, Path(config.resume), world_size)
    if not folder.is_run or config.overwrite_output_dir:
        return RunDecision("fresh")
    if config.resume == "never" or not (folder.state or folder.has_status):  # never, or a pre-resume version's run
        held = [f"checkpoint-{s}" for s in folder.checkpoint_steps[:3]] + (
            [folder.state.path.name] if folder.state else []
        )
        why = "" if config.resume == "never" else " that this version cannot resume (it has no resumable state)"
        raise UserError(
            f"output_dir {output_dir} already holds a run{why} ({', '.join(held)}). "
            "Fix: choose a new folder (output_dir=runs/another) or set overwrite_output_dir=true"
        )
    saved = folder.saved_config()
    if saved is None:
        raise UserError(
            f"output_dir {output_dir} holds checkpoints but no config.yaml, so it cannot be resumed. "
            "Fix: choose a new folder (output_dir=runs/another) or set overwrite_output_dir=true"
        )
    _compare(output_dir, saved, folder.state, config, world_size)
    if folder.state is None:  # killed before its first state was saved: nothing to continue from
        held = ", ".join(f"checkpoint-{step}" for step in folder.checkpoint_steps)
        return RunDecision(
            "fresh",
            note=f"{output_dir} holds {held} but no resumable state (its job ended before saving one): the run "
            "starts again from step 1 and replaces them",
        )
    return RunDecision("complete" if folder.state.complete else "resume", folder.state)


def _decide_from_path(config, folder: FolderContents, path: Path, world_size: int) -> RunDecision:
    """`resume=PATH`: a state folder, or a run folder whose newest state is used."""
    if not path.exists():
        raise UserError(
            f"key 'resume': {path} does not exist. Fix: give a state-<step> folder, a run folder, auto or never"
        )
    state = read_state(path) if (path / "state.json").exists() else newest_state(path)
    if state is None:
        raise UserError(
            f"key 'resume': {path} holds no complete resumable state. "
            "Fix: give a state-<step> folder or a run folder that has one"
        )
    source_run = state.path.parent.resolve()
    same_folder = source_run == folder.path.resolve()
    if folder.is_run and not same_folder and not config.overwrite_output_dir:
        raise UserError(
            f"output_dir {folder.path} already holds a run, and resume={path} continues another one. "
            "Fix: choose a new output_dir, or set overwrite_output_dir=true to replace it"
        )
    _compare(state.path, state.config, state, config, world_size)
    if state.complete:
        return RunDecision("complete", state)
    return RunDecision("resume", state, None if same_folder else source_run)
