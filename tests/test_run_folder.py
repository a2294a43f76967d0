import json
import os
import subprocess
import sys
import time

import pytest

from trainer.errors import RunFolderBusy, UserError
from trainer.run_folder import (
    LOCK_FILE,
    RunFolder,
    RunLock,
    clear_run,
    holder_is_gone,
    process_start,
    read_status,
    rewind_to,
    this_process,
    write_status,
)


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


def test_what_makes_a_folder_a_run(tmp_path):
    folder = tmp_path / "run"
    assert not RunFolder.inspect(folder).is_run  # missing
    folder.mkdir()
    (folder / "data_report.json").write_text("[]")
    (folder / "metrics.jsonl").write_text("")
    (folder / "checkpoint-notanumber").mkdir()
    (folder / "state-3").mkdir()  # no COMPLETE marker: never used
    assert not RunFolder.inspect(folder).is_run
    (folder / "checkpoint-4").mkdir()
    assert RunFolder.inspect(folder).checkpoint_steps == [4] and RunFolder.inspect(folder).is_run


def test_rewind_keeps_each_step_once_and_drops_what_came_after_the_state(tmp_path):
    folder = tmp_path
    for name in (
        "checkpoint-4",
        "checkpoint-8",
        "state-6",
        "state-5",
        ".checkpoint-9.partial",
        ".state-9.partial",
        "keep-me",
    ):
        (folder / name).mkdir()
    lines = [{"step": s, "loss": 1.0} for s in range(1, 10)] + [{"step": 8, "eval_loss": 2.0}]
    text = "".join(json.dumps(line) + "\n" for line in lines)
    (folder / "metrics.jsonl").write_text(text + '{"step": 10, "lo')  # a line cut by the kill
    rewind_to(folder, 6)
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-4", "keep-me", "metrics.jsonl", "state-6"]
    assert [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
        3,
        4,
        5,
        6,
    ]


def test_clear_removes_what_a_run_writes_and_nothing_else(tmp_path):
    for name in ("checkpoint-4", "state-6", ".state-9.partial", "notes"):
        (tmp_path / name).mkdir()
    for name in ("metrics.jsonl", "report.md", "config.yaml", "status.json", LOCK_FILE, "README.txt"):
        (tmp_path / name).write_text("x")
    clear_run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.txt", "notes", LOCK_FILE]


def test_status_file(tmp_path):
    assert read_status(tmp_path) is None
    write_status(tmp_path, "stopped", step=5, exit_code=75)
    status = read_status(tmp_path)
    assert (status["status"], status["step"], status["exit_code"]) == ("stopped", 5, 75)
