"""The run folder (`output_dir`): one job at a time, what an earlier job left, and how it ended.

* `RunLock`: an exclusive lock file (`run.lock`, holding host, pid and SLURM job) taken by the
  main process before anything is written, refreshed by a heartbeat and removed on exit. A lock
  whose process is gone is taken over: on the same host when no process with that pid and start
  time exists, under SLURM when the same job was requeued, elsewhere when its heartbeat is five
  minutes old (a living holder refreshes it every 30 s).
* `RunFolder.inspect`: the checkpoints and the newest complete resumable state. A folder that holds
  neither is not a run (a failed start leaves only reports): it is reused.
* `status.json`: how the last job of this run ended (`running`, `stopped`, `complete`, `failed`),
  which `python -m trainer.status` reads for batch scripts, since launchers report any
  non-zero exit of a worker as 1.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from trainer.atomic import write_text_atomically
from trainer.errors import RunFolderBusy, UserError
from trainer.layout import (  # noqa: F401  (names other modules take from here too)
    CHECKPOINT_PREFIX,
    CONFIG_FILE,
    DATA_REPORT_FILE,
    HTML_FILE,
    LOCK_FILE,
    LOG_DIR,
    METRICS_FILE,
    PLOT_FILE,
    REPORT_FILE,
    RUN_FILES,
    SKIPPED_LINES_FILE,
    STATE_PREFIX,
    STATUS_FILE,
    WANDB_DIR,
)
from trainer.state import SavedState, newest_state, step_of

#: Files (and tracker folders) a run writes beside its checkpoint and state folders.


def _folder_error(folder: Path, err: OSError) -> UserError:
    return UserError(
        f"cannot write to output_dir {folder} ({err.strerror or err}). "
        "Fix: choose a folder you can write to (output_dir=runs/another) or fix its permissions"
    )


# ---------------------------------------------------------------------------------------------
# The lock


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, Linux), or None if there is no such process
    (or no /proc): with the pid it names one process, even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def this_process(environ=os.environ) -> dict:
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "pid": pid,
        "process_start": process_start(pid),
        "boot_id": _boot_id(),
        "slurm_job_id": environ.get("SLURM_JOB_ID"),
        "slurm_restart_count": int(environ.get("SLURM_RESTART_COUNT", 0) or 0),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def holder_is_gone(holder: dict, heartbeat_age: float, me: dict, stale_after: float) -> bool:
    """Whether the process that wrote lock `holder` no longer runs (see the module docstring)."""
    if holder.get("host") == me["host"]:
        if holder.get("boot_id") and me["boot_id"] and holder["boot_id"] != me["boot_id"]:
            return True  # the machine rebooted since
        if holder.get("process_start") and me["process_start"]:
            return process_start(holder["pid"]) != holder["process_start"]
        return not _pid_alive(holder["pid"])
    if holder.get("slurm_job_id") and holder["slurm_job_id"] == me["slurm_job_id"]:
        return holder.get("slurm_restart_count", 0) < me["slurm_restart_count"]  # an earlier run of a requeued job
    return heartbeat_age > stale_after


class RunLock:
    """`with RunLock(folder):` one job per run folder (see the module docstring)."""

    HEARTBEAT_SECONDS = 30.0
    STALE_SECONDS = 300.0

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.me = this_process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> "RunLock":
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise _folder_error(self.folder, err) from None
        if not self.folder.is_dir():
            raise UserError(f"output_dir {self.folder} is a file. Fix: choose a folder (output_dir=runs/another)")
        for _ in range(3):  # a lock taken over can be taken by a third job in between: look again
            try:
                handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                self._take_over_or_refuse()
                continue
            except OSError as err:
                raise _folder_error(self.folder, err) from None
            with os.fdopen(handle, "w", encoding="utf-8") as stream:
                stream.write(json.dumps(self.me) + "\n")
                stream.flush()
                os.fsync(stream.fileno())
            self._thread = threading.Thread(target=self._heartbeat, name="run-lock-heartbeat", daemon=True)
            self._thread.start()
            return self
        raise RunFolderBusy(
            f"output_dir {self.folder} is being taken by several jobs at once. Fix: start one job per run folder",
            holder={},
        )

    def _take_over_or_refuse(self) -> None:
        try:
            text = self.path.read_text(encoding="utf-8")
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return  # released meanwhile: try again
        try:
            holder = json.loads(text)
        except ValueError:  # a holder killed while writing it
            holder = {}
        if holder.get("pid"):
            alive = not holder_is_gone(holder, age, self.me, self.STALE_SECONDS)
        else:  # unreadable: being written right now, or left half-written long ago
            alive = age < self.HEARTBEAT_SECONDS
        if alive:
            raise RunFolderBusy(
                f"output_dir {self.folder} is in use by another job: "
                f"pid {holder.get('pid')} on host {holder.get('host')} "
                f"(started {holder.get('started')}, lock refreshed {age:.0f} s ago; {self.path}). "
                "Fix: wait for that job "
                "to end or stop it, or choose another output_dir; the lock is taken over automatically once its "
                f"process is gone (on another host: when the lock is {self.STALE_SECONDS / 60:.0f} minutes old)",
                holder=holder,
            )
        try:
            if self.path.read_text(encoding="utf-8") == text:  # nobody took it over in between
                self.path.unlink()
        except FileNotFoundError:
            pass

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.HEARTBEAT_SECONDS):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        try:
            if json.loads(self.path.read_text(encoding="utf-8")).get("pid") == self.me["pid"]:
                self.path.unlink()
        except (OSError, ValueError):
            pass

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ---------------------------------------------------------------------------------------------
# What is in the folder


@dataclass
class RunFolder:
    path: Path
    checkpoint_steps: list[int] = field(default_factory=list)
    state: SavedState | None = None
    """The newest complete resumable state."""
    has_status: bool = False
    """Written by every job of this version at its start: a folder with checkpoints but no status
    comes from a version that could not resume."""

    @classmethod
    def inspect(cls, path: Path) -> "RunFolder":
        path = Path(path)
        if not path.is_dir():
            return cls(path)
        steps = sorted(
            s for p in path.glob(f"{CHECKPOINT_PREFIX}*") if (s := step_of(p, CHECKPOINT_PREFIX)) is not None
        )
        return cls(path, steps, newest_state(path), (path / STATUS_FILE).is_file())

    @property
    def is_run(self) -> bool:
        """Holds a checkpoint or a resumable state: something a new run must not silently replace."""
        return bool(self.checkpoint_steps or self.state)

    def saved_config(self) -> dict | None:
        """The resolved config of the run in this folder: its state's, else its config.yaml."""
        if self.state is not None:
            return self.state.config
        try:
            return yaml.safe_load((self.path / CONFIG_FILE).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            return None


def clear_run(folder: Path) -> None:
    """Remove everything a run writes (checkpoints, states, run files, leftovers of crashed saves),
    keeping the lock."""
    for path in folder.iterdir():
        if path.name == LOCK_FILE:
            continue
        is_ours = (
            path.name in RUN_FILES
            or step_of(path, CHECKPOINT_PREFIX) is not None
            or step_of(path, STATE_PREFIX) is not None
            or (path.name.startswith(".") and path.name.endswith(".partial"))
        )
        if is_ours:
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def rewind_to(folder: Path, step: int) -> None:
    """Make the folder look as it did when the state of `step` was saved: checkpoints after it,
    older states and half-written folders go, and metrics.jsonl keeps only lines up to `step`
    (a line cut by a kill is dropped too), so every step appears once after the resume."""
    for path in folder.iterdir():
        checkpoint = step_of(path, CHECKPOINT_PREFIX)
        state = step_of(path, STATE_PREFIX)
        if (
            (checkpoint is not None and checkpoint > step)
            or (state is not None and state != step)
            or (path.name.startswith(".") and path.name.endswith(".partial"))
        ):
            shutil.rmtree(path, ignore_errors=True)
    metrics = folder / METRICS_FILE
    if metrics.exists():
        kept = []
        for line in metrics.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("step", step + 1) <= step:
                kept.append(line + "\n")
        write_text_atomically(metrics, "".join(kept))


# ---------------------------------------------------------------------------------------------
# How the last job ended


def write_status(folder: Path, status: str, **fields) -> None:
    """`status.json`: `running` | `stopped` | `complete` | `failed`, with the step and exit code."""
    record = {"status": status, **fields, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    text = json.dumps(record, indent=1) + "\n"
    try:
        write_text_atomically(folder / STATUS_FILE, text)
    except OSError:
        # A full disk has no room for a second copy; overwriting in place frees the old file's
        # blocks first, so how the run ended is still recorded (a torn file reads as no status).
        (folder / STATUS_FILE).write_text(text, encoding="utf-8")


def read_status(folder: Path) -> dict | None:
    try:
        return json.loads((Path(folder) / STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def make_run_folder(output_dir: Path, decision, data_reports: list, skipped: list) -> None:
    """Main process, once the data passed: make `output_dir` this run's. A fresh run clears what an
    earlier run or a failed start left; a resume rewinds the folder to its state's step (with
    `resume=PATH` from another folder, that run's metrics and checkpoints up to the step come
    along first). Then the data report and the skipped lines are written."""
    from trainer.data.pipeline import write_skipped_lines
    from trainer.data.preflight import write_data_reports

    output_dir = Path(output_dir)
    if decision.action == "fresh":
        clear_run(output_dir)
    else:
        step = decision.state.step
        if decision.copy_history_from is not None:
            copy_history(decision.copy_history_from, output_dir, step)
        rewind_to(output_dir, step)
    write_data_reports(output_dir / DATA_REPORT_FILE, data_reports)
    if skipped:
        write_skipped_lines(output_dir / SKIPPED_LINES_FILE, skipped)


def copy_history(source: Path, output_dir: Path, step: int) -> None:
    """`resume=PATH` from another run folder: its metrics and checkpoints up to `step` come along
    (`rewind_to` then drops what is after the step)."""
    clear_run(output_dir)
    if (source / METRICS_FILE).exists():
        shutil.copyfile(source / METRICS_FILE, output_dir / METRICS_FILE)
    for checkpoint in source.glob(f"{CHECKPOINT_PREFIX}*"):
        if step_of(checkpoint, CHECKPOINT_PREFIX) is not None:
            shutil.copytree(checkpoint, output_dir / checkpoint.name)
