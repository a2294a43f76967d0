"""A run that dies says so: a crash, an out-of-memory and a disk that fills mid-run each end with
one line, exit 1, `status.json` saying `failed`, the lock released, and the checkpoints and state
saved before intact (trainer/train.py `main`, trainer/disk.py `save_failure`)."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import torch

from tests.helpers import write_config
from trainer.train import FineTuneRecipe, main


def status(run: Path) -> dict:
    return json.loads((run / "status.json").read_text())


def messages(stderr: str) -> list[str]:
    """stderr's lines without the progress bar (redrawn with carriage returns on the same line)."""
    lines = (line.rsplit("\r", 1)[-1] for line in stderr.split("\n"))
    return [line for line in lines if line.strip() and not line.startswith("training:")]


def crash_at(monkeypatch, step: int, error: BaseException):
    train_step = FineTuneRecipe.train_step

    def failing_step(self, current):
        if current == step:
            raise error
        return train_step(self, current)

    monkeypatch.setattr(FineTuneRecipe, "train_step", failing_step)


def test_a_crash_after_step_2_is_recorded_as_failed_with_the_traceback_after_one_line(
    tmp_path, tiny_model_dirs, monkeypatch, capsys
):
    config = write_config(tmp_path, tiny_model_dirs["gpt2"], "lora")
    crash_at(monkeypatch, 3, RuntimeError("boom from a library"))
    assert main([str(config), "training.epochs=1"]) == 1
    err = capsys.readouterr().err
    first = messages(err)[0]
    assert first.startswith(
        "error: the run failed at step 3 of 6 with RuntimeError: boom from a library. This is a bug"
    )
    assert "Traceback (most recent call last)" in err and err.index("Traceback") > len(first)
    record = status(tmp_path / "run")
    assert record["status"] == "failed" and record["exit_code"] == 1 and record["step"] == 3
    assert record["message"] == "RuntimeError: boom from a library"
    assert not (tmp_path / "run" / "run.lock").exists()


def test_out_of_memory_is_one_line_with_the_fix_and_no_traceback(tmp_path, tiny_model_dirs, monkeypatch, capsys):
    config = write_config(tmp_path, tiny_model_dirs["gpt2"], "lora")
    crash_at(monkeypatch, 2, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert main([str(config), "training.epochs=1"]) == 1
    (err,) = messages(capsys.readouterr().err)
    assert "Traceback" not in err
    assert err.startswith("error: out of memory at step 2 of 6. Fix: lower training.micro_batch_size")
    assert status(tmp_path / "run")["status"] == "failed"


def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir(parents=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True
        ).returncode
        == 0
    )


def test_a_disk_that_fills_mid_run_fails_the_save_cleanly(tmp_path, tiny_model_dirs, monkeypatch, capsys):
    """A real full filesystem where the machine allows it (a tmpfs, as root), else a full-disk
    error injected at safetensors' write: another job fills the disk after the start check passed."""
    disk = tmp_path / "disk"
    mounted = _mount_tmpfs(disk, "8m")
    try:
        run = disk / "run"
        config = write_config(tmp_path, tiny_model_dirs["gpt2"], "full")
        train_step = FineTuneRecipe.train_step

        def another_job_fills_the_disk(self, step):
            if step == 3:  # after checkpoint-2 and its state; before checkpoint-4
                if mounted:
                    with open(disk / "other-job.bin", "wb") as filler:
                        try:
                            while True:
                                filler.write(b"\0" * (1 << 16))
                        except OSError:
                            pass
                else:
                    import safetensors.torch

                    def disk_full(*args, **kwargs):
                        raise OSError(28, "No space left on device", str(run / ".checkpoint-4.partial"))

                    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
            return train_step(self, step)

        monkeypatch.setattr(FineTuneRecipe, "train_step", another_job_fills_the_disk)
        assert (
            main(
                [
                    str(config),
                    f"output_dir={run}",
                    "training.epochs=1",
                    "checkpoints.count=3",
                    "checkpoints.state_every_minutes=0",
                ]
            )
            == 1
        )
        (err,) = messages(capsys.readouterr().err)
        assert "Traceback" not in err
        assert err.startswith(f"error: could not save checkpoint-4 in {run}: ")
        assert "No space left on device" in err or "the disk is full" in err
        assert "the last complete checkpoint is checkpoint-2, the last resumable state is state-2 (intact)" in err
        assert "rerun the same command to continue" in err
        record = status(run)
        assert record["status"] == "failed" and record["exit_code"] == 1
        assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name or "state" in p.name) == [
            "checkpoint-2",
            "state-2",
        ]  # no partial folder left behind
        assert (run / "checkpoint-2" / "model.safetensors").stat().st_size > 0
        assert not (run / "run.lock").exists()
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=False)


def test_a_time_limit_too_short_for_one_step_is_refused_before_step_1(tmp_path, tiny_model_dirs, capsys):
    config = write_config(tmp_path, tiny_model_dirs["gpt2"], "lora", training={"time_limit": "5s"})
    assert main([str(config)]) == 1
    (err,) = messages(capsys.readouterr().err)
    assert err.startswith("error: training.time_limit=5s leaves this job ")
    assert "every job would train a single step" in err and "at least 50 s" in err
    assert (
        not (tmp_path / "run" / "metrics.jsonl").exists()
        or "loss" not in (tmp_path / "run" / "metrics.jsonl").read_text()
    )


def test_the_embedded_default_continues_a_stopped_run_and_says_when_it_is_complete(tmp_path, monkeypatch, capsys):
    """configs/tiny-gpt2.yaml: "stopped ... run the same command to continue" must be true of it."""
    train_step = FineTuneRecipe.train_step

    def stop_after_step_3(self, step):
        loss = train_step(self, step)
        if step == 3 and self.start_step == 0:
            self.signals.requested = "SIGTERM"
        return loss

    monkeypatch.setattr(FineTuneRecipe, "train_step", stop_after_step_3)
    command = ["configs/tiny-gpt2.yaml", f"output_dir={tmp_path / 'run'}", "training.epochs=0.1", "checkpoints.count=1"]
    assert main(command) == 75
    assert "run the same command to continue" in capsys.readouterr().out
    assert main(command) == 0
    assert "resumed from step 3 of " in capsys.readouterr().out
    assert main(command) == 0
    assert "is already complete" in capsys.readouterr().out


def test_a_second_ctrl_c_is_recorded_as_130_in_the_status(tmp_path, monkeypatch, capsys):
    """A second SIGINT raises KeyboardInterrupt wherever the run is (trainer/stopping.py): the job
    exits 130 and status.json says so, so `python -m trainer.status` gives 130 too."""
    from trainer.status import describe

    train_step = FineTuneRecipe.train_step

    def interrupted_at_step_2(self, step):
        if step == 2:
            raise KeyboardInterrupt
        return train_step(self, step)

    monkeypatch.setattr(FineTuneRecipe, "train_step", interrupted_at_step_2)
    run = tmp_path / "run"
    assert main(["configs/tiny-gpt2.yaml", f"output_dir={run}", "training.epochs=0.1", "checkpoints.count=1"]) == 130
    assert "interrupted by a second Ctrl-C: stopped at once" in capsys.readouterr().err
    status = json.loads((run / "status.json").read_text())
    assert (status["status"], status["exit_code"], status["step"]) == ("failed", 130, 2)
    assert status["message"] == "interrupted by a second Ctrl-C"
    assert describe(run)[1] == 130
