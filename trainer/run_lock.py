"""The run lock (`run.lock`): one job at a time per run folder.

The main process takes it before anything is written; it holds host, pid, process start time and
SLURM job, is refreshed by a heartbeat every 30 s and removed on exit. A lock whose process is gone
is taken over: on the same host when no process with that pid and start time exists, under SLURM
when the same job was requeued, elsewhere when its heartbeat is five minutes old.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

from trainer.errors import RunFolderBusy, UserError
from trainer.layout import LOCK_FILE


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
        self.made_folders: list[Path] = []  # a job that writes nothing leaves no empty folder behind

    def acquire(self) -> "RunLock":
        if self.folder.exists() and not self.folder.is_dir():
            raise UserError(
                f"output_dir {self.folder} is a file, not a folder. Fix: choose a folder (output_dir=runs/another)"
            )
        absolute = self.folder.absolute()
        # The deepest first, as they are removed (a dangling link is not ours to make or remove).
        self.made_folders = [p for p in (absolute, *absolute.parents) if not p.exists() and not p.is_symlink()]
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            self._remove_made_folders()
            raise _folder_error(self.folder, err) from None
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
        self._remove_made_folders()

    def _remove_made_folders(self) -> None:
        """The folders `acquire` made, while they are empty: what a run wrote stays, and so does
        every folder above one that holds something."""
        for path in self.made_folders:
            try:
                path.rmdir()
            except FileNotFoundError:
                continue
            except OSError:
                break

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
