"""trainer/run_lock.py: one job per run folder, and taking over the lock of a job that is gone."""

import json
import os
import subprocess
import sys
import time

import pytest

from trainer.errors import RunFolderBusy, UserError
from trainer.layout import LOCK_FILE
from trainer.run_lock import RunLock, holder_is_gone, process_start, this_process


def finished_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def write_lock(folder, **holder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_FILE).write_text(json.dumps(holder))


def test_one_job_per_folder_and_the_lock_goes_with_it(tmp_path):
    with RunLock(tmp_path / "run") as first:
        saved = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
        assert saved["pid"] == os.getpid() and saved["host"] == first.me["host"]
        with pytest.raises(RunFolderBusy) as busy:
            RunLock(tmp_path / "run").acquire()
        assert busy.value.holder["pid"] == os.getpid()
        assert f"pid {os.getpid()} on host" in str(busy.value)
    assert not (tmp_path / "run" / LOCK_FILE).exists()


def test_a_lock_whose_process_is_gone_is_taken_over(tmp_path):
    me = this_process()
    write_lock(tmp_path / "dead", host=me["host"], pid=finished_pid(), process_start="1", boot_id=me["boot_id"])
    with RunLock(tmp_path / "dead") as lock:
        assert json.loads((tmp_path / "dead" / LOCK_FILE).read_text())["pid"] == lock.me["pid"]
    # A living pid whose start time differs is another process that got the same pid: gone too.
    write_lock(tmp_path / "reused", host=me["host"], pid=os.getpid(), process_start="1", boot_id=me["boot_id"])
    RunLock(tmp_path / "reused").acquire().release()


def test_which_holders_are_gone():
    me = {"host": "a", "pid": 10, "process_start": "5", "boot_id": "b1", "slurm_job_id": "77", "slurm_restart_count": 1}
    living = {"host": "a", "pid": os.getpid(), "process_start": process_start(os.getpid()), "boot_id": "b1"}
    assert not holder_is_gone(living, 1e9, me, stale_after=300)  # same host: the process decides, not the age
    assert holder_is_gone(living | {"boot_id": "b0"}, 0, me, stale_after=300)  # rebooted since
    elsewhere = {"host": "b", "pid": 1}
    assert not holder_is_gone(elsewhere, 299, me, stale_after=300)
    assert holder_is_gone(elsewhere, 301, me, stale_after=300)  # its heartbeat stopped
    requeued = {"host": "b", "pid": 1, "slurm_job_id": "77", "slurm_restart_count": 0}
    assert holder_is_gone(requeued, 0, me, stale_after=300)  # the same SLURM job, an earlier run of it
    assert not holder_is_gone(requeued | {"slurm_restart_count": 1}, 0, me, stale_after=300)


def test_a_fresh_lock_elsewhere_is_respected_a_stale_one_taken_over(tmp_path):
    folder = tmp_path / "run"
    write_lock(folder, host="other-host", pid=1234, started="earlier")
    with pytest.raises(RunFolderBusy, match="pid 1234 on host other-host"):
        RunLock(folder).acquire()
    old = time.time() - RunLock.STALE_SECONDS - 60
    os.utime(folder / LOCK_FILE, (old, old))
    RunLock(folder).acquire().release()


def test_an_unwritable_folder_or_a_file_is_a_user_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="cannot write to output_dir"):
        RunLock(tmp_path / "file" / "run").acquire()


def test_an_output_dir_that_is_a_file_is_named_so(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=r"output_dir .*file is a file, not a folder\. Fix: choose a folder"):
        RunLock(tmp_path / "file").acquire()


def test_a_folder_the_lock_made_goes_when_the_job_wrote_nothing(tmp_path):
    RunLock(tmp_path / "new" / "run").acquire().release()  # a start that failed before writing
    assert not (tmp_path / "new").exists()  # nor the folder above it, made for it
    lock = RunLock(tmp_path / "kept").acquire()
    (tmp_path / "kept" / "status.json").write_text("{}")
    lock.release()
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["status.json"]
    (tmp_path / "existing").mkdir()
    RunLock(tmp_path / "existing").acquire().release()
    assert (tmp_path / "existing").is_dir()  # not ours to remove
