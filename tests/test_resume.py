"""Resuming a run in-process: stop signals, the time limit, resume=PATH, refusals, the run folder.

Every stopped run here is continued and compared with the uninterrupted run of the same config
(`assert_same_run`). The kill -9 cases, which need a real process to kill, are in
test_resume_e2e.py.
"""

import json
import shutil
import signal
import threading
import time

import pytest
import yaml

from tests.helpers import assert_same_run, checkpoint_folders, read_jsonl, resume_config, trained_weights
from tests.stop_helpers import out_of_time_after_steps
from trainer.config import load_config
from trainer.errors import (
    EXIT_INTERRUPTED,
    EXIT_STOPPED_RESUMABLE,
    ConfigChanged,
    ProcessCountChanged,
    RunFolderBusy,
)
from trainer.resume import decide_run
from trainer.run_lock import RunLock
from trainer.train import FineTuneRecipe, main


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dirs):
    """The config, its uninterrupted run, and the same run stopped by its time limit after step 2."""
    folder = tmp_path_factory.mktemp("runs")
    config = resume_config(folder, tiny_model_dirs["gpt2"])
    assert main([str(config), f"output_dir={folder / 'reference'}"]) == 0
    # The deadline says stop at the second step boundary (a job that could train only one step is
    # refused: tests/test_failures.py).
    with pytest.MonkeyPatch.context() as monkeypatch:
        out_of_time_after_steps(monkeypatch, 2)
        assert (
            main([str(config), f"output_dir={folder / 'stopped'}", "training.time_limit=1h"]) == EXIT_STOPPED_RESUMABLE
        )
    return config, folder / "reference", folder / "stopped"


def copy_of(run, tmp_path):
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def test_the_time_limit_stops_at_a_step_boundary_and_the_same_command_continues(runs, tmp_path, capsys):
    config, reference, stopped = runs
    assert sorted(p.name for p in stopped.glob("state-*")) == ["state-2"]
    assert [m["step"] for m in read_jsonl(stopped / "metrics.jsonl")] == [1, 2]
    status = json.loads((stopped / "status.json").read_text())
    assert (status["status"], status["step"], status["exit_code"]) == ("stopped", 2, EXIT_STOPPED_RESUMABLE)
    assert status["message"] == "stopped at step 2 of 24 (time limit)"
    assert not (stopped / "run.lock").exists()

    run = copy_of(stopped, tmp_path)
    # time_limit and the state interval cannot change the result: a resume may change them.
    assert main([str(config), f"output_dir={run}", "checkpoints.state_every_steps=7"]) == 0
    assert "resumed from step 2 of 24 (state saved at" in capsys.readouterr().out
    assert_same_run(reference, run)
    assert json.loads((run / "status.json").read_text())["status"] == "complete"


def test_without_restoring_the_random_generators_the_resumed_run_would_differ(runs, tmp_path, monkeypatch):
    """Guards the equality tests: in this config (LoRA dropout) the RNG restore is what makes them pass."""
    config, reference, stopped = runs
    monkeypatch.setattr("trainer.recipe.restore_rng_of", lambda accelerator, state: None)
    run = copy_of(stopped, tmp_path)
    assert main([str(config), f"output_dir={run}"]) == 0
    final, expected = trained_weights(checkpoint_folders(run)[-1]), trained_weights(checkpoint_folders(reference)[-1])
    assert max((final[k] - expected[k]).abs().max().item() for k in expected) > 1e-4


def _signal_when(metrics, lines: int, signum: int, times: int = 1) -> threading.Thread:
    """Send `signum` to this process once metrics.jsonl has `lines` lines (the main thread handles it)."""

    def watch():
        deadline = time.time() + 60
        while time.time() < deadline:
            if metrics.exists() and metrics.read_text().count("\n") >= lines:
                for _ in range(times):
                    signal.raise_signal(signum)
                    time.sleep(0.001)  # lets the main thread handle it: two pending signals would be one
                return
            time.sleep(0.002)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_sigusr1_stops_within_a_step_and_the_rerun_is_the_same_run(runs, tmp_path, capsys):
    config, reference, _ = runs
    run = tmp_path / "run"
    watcher = _signal_when(run / "metrics.jsonl", 3, signal.SIGUSR1)
    assert main([str(config), f"output_dir={run}"]) == EXIT_STOPPED_RESUMABLE
    watcher.join()
    [state] = run.glob("state-*")
    stopped = int(state.name.split("-")[1])
    assert 3 <= stopped <= 5
    assert f"stopped at step {stopped} of 24 (signal SIGUSR1)" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # the handler is gone with the run

    assert main([str(config), f"output_dir={run}"]) == 0
    assert_same_run(reference, run)


def test_ctrl_c_once_stops_cleanly_twice_stops_at_once(runs, tmp_path, capsys):
    config, _, _ = runs
    once = tmp_path / "once"
    watcher = _signal_when(once / "metrics.jsonl", 2, signal.SIGINT)
    assert main([str(config), f"output_dir={once}"]) == EXIT_STOPPED_RESUMABLE
    watcher.join()
    assert "(signal SIGINT)" in capsys.readouterr().out
    assert list(once.glob("state-*"))

    twice = tmp_path / "twice"
    watcher = _signal_when(twice / "metrics.jsonl", 2, signal.SIGINT, times=2)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # not pytest's, should a signal come late
    try:
        assert main([str(config), f"output_dir={twice}"]) == EXIT_INTERRUPTED
        watcher.join()
    finally:
        signal.signal(signal.SIGINT, previous)
    err = capsys.readouterr().err
    message = [line for line in err.replace("\r", "\n").splitlines() if "Ctrl-C" in line]
    assert len(message) == 1 and "Traceback" not in err, err
    assert not (twice / "run.lock").exists()


def test_resume_from_a_state_path_into_another_folder(runs, tmp_path, capsys):
    config, reference, stopped = runs
    run = tmp_path / "elsewhere"
    command = [str(config), f"output_dir={run}", f"resume={stopped / 'state-2'}"]
    watcher = _signal_when(run / "metrics.jsonl", 5, signal.SIGTERM)  # the copied steps 1-2, then 3 more
    assert main(command) == EXIT_STOPPED_RESUMABLE
    watcher.join()
    assert "resumed from step 2 of 24" in capsys.readouterr().out
    # The same command again continues the new folder's own state, not the older one of PATH.
    assert main(command) == 0
    out = capsys.readouterr().out
    assert "resumed from step 2 " not in out and "resumed from step" in out
    assert_same_run(reference, run)
    assert (stopped / "state-2").is_dir()  # the source is read, never changed


def test_a_changed_config_is_refused_naming_the_keys(runs, tmp_path, capsys):
    config, _, stopped = runs
    run = copy_of(stopped, tmp_path)
    recipe = FineTuneRecipe(
        load_config(config, [f"output_dir={run}", "training.learning_rate=0.1", "checkpoints.count=4"])
    )
    with pytest.raises(ConfigChanged) as refused:
        try:
            recipe.setup()
        finally:
            recipe.close()
    assert refused.value.keys == ["checkpoints.count", "training.learning_rate"]

    assert main([str(config), f"output_dir={run}", "training.learning_rate=0.1"]) == 1
    err = capsys.readouterr().err
    assert "training.learning_rate (0.03 there, 0.1 now)" in err
    assert "output_dir=runs/another resume=never" in err and "overwrite_output_dir=true" in err
    # A changed data file is another run too.
    train_file = yaml.safe_load(config.read_text())["data"]["train_file"]
    edited = tmp_path / "train.jsonl"
    shutil.copyfile(train_file, edited)
    with edited.open("a") as handle:
        handle.write(json.dumps({"prompt": "plum ->", "completion": " purple<|endoftext|>"}) + "\n")
    assert main([str(config), f"output_dir={run}", f"data.train_file={edited}"]) == 1
    assert "data.train_file" in capsys.readouterr().err
    assert sorted(p.name for p in run.glob("state-*")) == ["state-2"]  # refused: nothing changed


def test_a_finished_run_says_so_and_a_changed_one_names_the_keys(runs, tmp_path, capsys):
    config, reference, _ = runs
    assert main([str(config), f"output_dir={reference}"]) == 0
    assert "already complete (step 24)" in capsys.readouterr().out
    assert main([str(config), f"output_dir={reference}", "training.epochs=3"]) == 1
    assert "training.epochs (2.0 there, 3.0 now)" in capsys.readouterr().err


def test_another_number_of_processes_is_refused(runs, tmp_path):
    config, _, stopped = runs
    run = copy_of(stopped, tmp_path)
    info_file = run / "state-2" / "state.json"
    info = json.loads(info_file.read_text())
    info_file.write_text(json.dumps(info | {"world_size": 2}))
    recipe = FineTuneRecipe(load_config(config, [f"output_dir={run}"]))
    with pytest.raises(ProcessCountChanged, match="started with 2 process"):
        try:
            recipe.setup()
        finally:
            recipe.close()


def test_resume_never_refuses_a_run_and_overwrite_starts_over(runs, tmp_path, capsys):
    config, reference, stopped = runs
    run = copy_of(stopped, tmp_path)
    assert main([str(config), f"output_dir={run}", "resume=never"]) == 1
    assert "already holds a run (state-2)" in capsys.readouterr().err
    assert main([str(config), f"output_dir={run}", "overwrite_output_dir=true"]) == 0
    assert "resumed" not in capsys.readouterr().out
    assert_same_run(reference, run)


def test_a_folder_without_checkpoint_or_state_is_not_a_run(runs, tmp_path, capsys):
    """A start that failed its checks (here checkpoints.count=99 for 24 steps) blocks nothing."""
    config, reference, _ = runs
    run = tmp_path / "run"
    assert main([str(config), f"output_dir={run}", "checkpoints.count=99"]) == 1
    assert "checkpoints.count=99 but training has only 24" in capsys.readouterr().err
    assert not run.exists()  # it wrote nothing, so the folder it made is gone
    run.mkdir()
    (run / "data_report.json").write_text("[]")  # leftovers of an older failed start
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    assert main([str(config), f"output_dir={run}"]) == 0
    assert_same_run(reference, run)


def test_a_second_job_in_the_same_folder_is_refused(runs, tmp_path, capsys):
    config, _, _ = runs
    run = tmp_path / "run"
    with RunLock(run) as first:
        recipe = FineTuneRecipe(load_config(config, [f"output_dir={run}"]))
        with pytest.raises(RunFolderBusy) as busy:
            recipe.setup()
        assert busy.value.holder["pid"] == first.me["pid"]
        assert main([str(config), f"output_dir={run}"]) == 1
        assert f"in use by another job: pid {first.me['pid']} on host {first.me['host']}" in capsys.readouterr().err
        assert (run / "run.lock").exists()  # still the first job's
    assert not (run / "run.lock").exists()


def test_an_unwritable_output_dir_is_one_clear_line(runs, capsys):
    """/sys/kernel exists and refuses new files even to root: a read-only existing output_dir."""
    config, _, _ = runs
    try:
        open("/sys/kernel/trainer-probe", "w").close()
        pytest.skip("/sys/kernel is writable on this machine")
    except OSError:
        pass
    assert main([str(config), "output_dir=/sys/kernel"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write to output_dir /sys/kernel (") and "Traceback" not in err
    assert err.count("\n") == 1


def test_a_key_a_newer_trainer_added_at_its_default_is_not_a_change():
    """A run saved before `eval` (or `training.self_test`) existed resumes with today's defaults."""
    from trainer.resume import config_differences

    saved = {"training": {"learning_rate": 0.03}, "eval": {}}
    current = {"training": {"learning_rate": 0.03, "self_test": True}, "eval": {"metrics": "auto", "max_examples": 200}}
    assert config_differences(saved, current) == {}
    changed = {
        "training": {"learning_rate": 0.03, "self_test": False},
        "eval": {"metrics": "none", "max_examples": 200},
    }
    # (training.self_test cannot change the result: a resume may always change it.)
    assert config_differences(saved, changed) == {"eval.metrics": "eval.metrics (missing there, 'none' now)"}


def _resolved(config_file, output_dir):
    """The config as a one-process job on this CPU resolves it before it decides on its folder."""
    import torch

    from trainer.model import load_model_config
    from trainer.resolve import resolve_config

    config = load_config(config_file, [f"output_dir={output_dir}"])
    return resolve_config(config, device=torch.device("cpu"), model_config=load_model_config(config), num_processes=1)


def test_a_run_saved_with_strategy_auto_by_an_earlier_version_is_the_same_run(runs, tmp_path):
    """Earlier versions saved `distributed.strategy: auto` unresolved; this one saves ddp or fsdp.
    What decides it (the method, the number of processes) is compared anyway."""
    from trainer.resume import config_differences

    config, _, stopped = runs
    run = copy_of(stopped, tmp_path)
    for saved_file in (run / "config.yaml", run / "state-2" / "config.yaml"):
        saved = yaml.safe_load(saved_file.read_text())
        assert saved["distributed"]["strategy"] == "ddp"  # resolved and saved by this version
        saved["distributed"]["strategy"] = "auto"  # as an earlier version saved it
        saved_file.write_text(yaml.safe_dump(saved))
    current = yaml.safe_load((stopped / "config.yaml").read_text())
    assert config_differences(saved, current) == {}
    decision = decide_run(_resolved(config, run), 1)
    assert (decision.action, decision.state.step) == ("resume", 2)


def test_another_strategy_is_another_run():
    from trainer.resume import config_differences

    saved = {"method": "full", "distributed": {"strategy": "ddp"}}
    current = {"method": "full", "distributed": {"strategy": "fsdp"}}
    assert config_differences(saved, current) == {
        "distributed.strategy": "distributed.strategy ('ddp' there, 'fsdp' now)"
    }


def test_a_strategy_that_differs_with_the_processes_is_refused_as_the_process_count(runs, tmp_path):
    """A full run started on 2 processes saved fsdp (auto); on 1 it resolves to ddp: the cause is the
    number of processes, and that is what the refusal names."""
    config, _, stopped = runs
    run = copy_of(stopped, tmp_path)
    info_file = run / "state-2" / "state.json"
    info_file.write_text(json.dumps(json.loads(info_file.read_text()) | {"world_size": 2}))
    saved_file = run / "state-2" / "config.yaml"
    saved_file.write_text(saved_file.read_text().replace("strategy: ddp", "strategy: fsdp"))
    with pytest.raises(ProcessCountChanged, match="started with 2 process"):
        decide_run(_resolved(config, run), 1)


def test_a_folder_with_checkpoints_but_no_state_starts_afresh_whatever_its_strategy(runs, tmp_path):
    """Killed between a checkpoint and its state: nothing to continue, so the run starts afresh; a
    strategy that `auto` resolved for another number of processes is no reason to refuse."""
    import shutil

    config, _, stopped = runs
    run = copy_of(stopped, tmp_path)
    for state in run.glob("state-*"):
        shutil.rmtree(state)
    (run / "checkpoint-1").mkdir(exist_ok=True)  # a checkpoint: the folder holds a run
    saved_file = run / "config.yaml"
    saved_file.write_text(saved_file.read_text().replace("strategy: ddp", "strategy: fsdp"))
    decision = decide_run(_resolved(config, run), 1)
    assert decision.action == "fresh" and decision.note == (
        f"{run} holds checkpoint-1 but no resumable state (its job ended before saving one): the run starts "
        "again from step 1 and replaces them"
    )
    saved_file.write_text(saved_file.read_text().replace("learning_rate: ", "learning_rate: 1"))
    with pytest.raises(ConfigChanged, match="training.learning_rate"):
        decide_run(_resolved(config, run), 1)  # another config still is another run
