"""Trackers through accelerate, read back from their own files: TensorBoard's event reader, W&B's
offline run folders."""

import json

import pytest

from tests.helpers import checkpoint_folders, read_jsonl, write_config
from tests.stop_helpers import signal_after_step
from trainer.errors import EXIT_STOPPED_RESUMABLE
from trainer.report import markdown_cell
from trainer.train import main


def test_tensorboard_holds_every_step_every_eval_and_each_checkpoints_samples(tmp_path, tiny_model_dirs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = write_config(tmp_path, tiny_model_dirs["gpt2"], "lora", training={"epochs": 1}, checkpoints={"count": 2})
    assert main([str(config), "tracking.report_to=tensorboard", "tracking.project=fruit"]) == 0
    run = tmp_path / "run"
    events = EventAccumulator(str(run / "logs" / "fruit"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    metrics = read_jsonl(run / "metrics.jsonl")
    steps = [m for m in metrics if "grad_norm" in m]
    logged = events.Scalars("train/loss")
    assert [e.step for e in logged] == [m["step"] for m in steps] == list(range(1, 7))
    assert all(abs(e.value - m["loss"]) <= 1e-6 * m["loss"] for e, m in zip(logged, steps))  # float32 in TB
    assert [e.value for e in events.Scalars("train/learning_rate")] == pytest.approx(
        [m["learning_rate"] for m in steps]
    )
    assert [e.step for e in events.Scalars("eval/loss")] == [m["step"] for m in metrics if "eval_loss" in m] == [3, 6]
    for checkpoint in checkpoint_folders(run):
        step = checkpoint.name.split("-")[1]
        [text] = events.Tensors(f"samples/checkpoint-{step}/text_summary")
        table = text.tensor_proto.string_val[0].decode()
        for sample in read_jsonl(checkpoint / "samples.jsonl"):
            assert markdown_cell(sample["prompt"]) in table and markdown_cell(sample["completion"]) in table


def test_wandb_offline_run_is_continued_by_the_resumed_job(tmp_path, tiny_model_dirs, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = write_config(tmp_path, tiny_model_dirs["gpt2"], "lora", training={"epochs": 1}, checkpoints={"count": 2})
    command = [str(config), "tracking.report_to=wandb"]
    with pytest.MonkeyPatch.context() as stop:
        signal_after_step(stop, 1)
        assert main(command) == EXIT_STOPPED_RESUMABLE  # stops after step 1
    run = tmp_path / "run"
    [state] = run.glob("state-*")
    run_id = json.loads((state / "state.json").read_text())["tracker_run_id"]
    assert main(command) == 0  # the same command continues the run, and its W&B run
    folders = sorted((run / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and all(folder.name.endswith(f"-{run_id}") for folder in folders)
    assert all((folder / f"run-{run_id}.wandb").stat().st_size > 0 for folder in folders)


def test_a_missing_tracker_package_is_a_user_error(tmp_path, tiny_model_dirs, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    config = write_config(tmp_path, tiny_model_dirs["gpt2"], "lora")
    assert main([str(config), "tracking.report_to=all"]) == 1
    assert (
        "tracking.report_to=all needs wandb: pip install -c constraints.txt -e '.[tracking]'" in capsys.readouterr().err
    )
