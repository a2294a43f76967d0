"""kill -9 anywhere, the same command again: the same run. Real processes, really killed.

The killed runs are forked from the test process (`run_forked`: the command's own code in separate
processes, one or a torchrun-like group of two, without a new interpreter's ten seconds of imports);
the SIGTERM test starts the real command. The reference is the uninterrupted run of the same
config; "the same" is checked by `assert_same_run` (final weights within 1e-6, identical samples at
every checkpoint, every step once in metrics.jsonl with the same losses, the same report).
"""

import json
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO, assert_same_run, command_env, read_jsonl, resume_config, run_forked
from trainer.errors import EXIT_STOPPED_RESUMABLE
from trainer.train import main

TRAIN = [sys.executable, "trainer/train.py"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dirs):
    """The uninterrupted run (in-process: the same code and thread count as the subprocesses)."""
    folder = tmp_path_factory.mktemp("reference")
    config = resume_config(folder, tiny_model_dirs["gpt2"])
    assert main([str(config)]) == 0
    return config, folder / "run"


def states(run) -> list[str]:
    return sorted(p.name for p in run.glob("state-*"))


def test_killed_at_three_points_then_rerun_equals_the_uninterrupted_run(tmp_path, reference, capfd):
    config, reference_run = reference
    run = tmp_path / "run"
    command = [str(config), f"output_dir={run}"]

    # kill -9 in the middle of step 7 (after a micro-batch's backward): the state of step 5 is the newest.
    assert run_forked(command, env={"TRAINER_CRASH_AT": "mid_step@7"}) == [-signal.SIGKILL]
    assert states(run) == ["state-5"] and not list(run.glob("checkpoint-*"))

    # ... while writing the state of step 10: its folder stays partial; the checkpoint's (8) is the newest.
    assert run_forked(command, env={"TRAINER_CRASH_AT": "state_save@10"}) == [-signal.SIGKILL]
    assert "resumed from step 5 of 24" in capfd.readouterr().out
    assert states(run) == ["state-8"] and (run / ".state-10.partial").is_dir()
    assert not (run / ".state-10.partial" / "COMPLETE").exists()

    # ... while writing checkpoint-16: no checkpoint-16, only its partial folder; state 15 is the newest.
    assert run_forked(command, env={"TRAINER_CRASH_AT": "checkpoint_save@16"}) == [-signal.SIGKILL]
    assert "resumed from step 8 of 24" in capfd.readouterr().out
    assert states(run) == ["state-15"] and (run / ".checkpoint-16.partial").is_dir()
    assert [p.name for p in run.glob("checkpoint-*")] == ["checkpoint-8"]

    # The last start, in-process (the same code; the subprocesses above already resumed twice).
    assert main([str(config), f"output_dir={run}"]) == 0
    assert "resumed from step 15 of 24" in capfd.readouterr().out
    assert not list(run.glob(".*.partial")) and not (run / "run.lock").exists()
    difference = assert_same_run(reference_run, run)
    print(f"largest final-weight difference after 3 kills: {difference}")

    # Finished: the same command again says so and exits 0, touching nothing.
    assert main([str(config), f"output_dir={run}"]) == 0
    assert "already complete" in capfd.readouterr().out
    assert_same_run(reference_run, run)


def test_sigterm_stops_at_a_step_boundary_with_a_state_and_the_rerun_is_the_same_run(tmp_path, reference, capsys):
    config, reference_run = reference
    run = tmp_path / "run"
    command = [*TRAIN, str(config), f"output_dir={run}"]
    process = subprocess.Popen(
        command, cwd=REPO, env=command_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while (
        not (metrics.exists() and metrics.read_text().count("\n") >= 2)
        and process.poll() is None
        and time.time() < deadline
    ):
        time.sleep(0.005)
    signalled_at = len(read_jsonl(metrics))
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == EXIT_STOPPED_RESUMABLE, stderr[-3000:]
    [state] = states(run)
    stopped = int(state.split("-")[1])
    assert signalled_at <= stopped <= signalled_at + 2 < 24  # within one step of the signal
    assert f"stopped at step {stopped} of 24 (signal SIGTERM)" in stdout + stderr
    assert "Traceback" not in stderr
    assert json.loads((run / "status.json").read_text())["status"] == "stopped"

    assert main([str(config), f"output_dir={run}"]) == 0
    assert f"resumed from step {stopped} of 24" in capsys.readouterr().out
    assert_same_run(reference_run, run)


def test_two_processes_killed_and_resumed_equal_the_uninterrupted_two_process_run(tmp_path, tiny_model_dirs, capfd):
    """Two processes (gloo), as torchrun starts them: rank 1 is killed with SIGKILL in the middle of
    step 7 (the other is then stopped, as torchrun's agent does when a node dies); the same command
    continues from the state of step 5, each rank with its own random generators (LoRA dropout
    differs per rank)."""
    config = resume_config(tmp_path, tiny_model_dirs["gpt2"])
    assert run_forked([str(config), f"output_dir={tmp_path / 'reference'}"], processes=2) == [0, 0]
    run = tmp_path / "run"
    killed = run_forked([str(config), f"output_dir={run}"], processes=2, env={"TRAINER_CRASH_AT": "mid_step@7:1"})
    assert killed[1] == -signal.SIGKILL
    assert states(run) == ["state-5"] and sorted(p.name for p in (run / "state-5").glob("rng-*")) == [
        "rng-0.pt",
        "rng-1.pt",
    ]
    capfd.readouterr()
    assert run_forked([str(config), f"output_dir={run}"], processes=2) == [0, 0]
    assert "resumed from step 5 of 12" in capfd.readouterr().out
    assert_same_run(tmp_path / "reference", run)
