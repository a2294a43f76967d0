import json
import struct
from pathlib import Path

import pytest

from tests.helpers import resume_config, write_config
from tests.stop_helpers import signal_after_step
from trainer.config import load_config
from trainer.disk import SMALL_FILES_BYTES, RunBytes, check_free_space, run_bytes, tensor_bytes, tokenizer_bytes
from trainer.errors import EXIT_STOPPED_RESUMABLE, NotEnoughDisk
from trainer.train import FineTuneRecipe, main


def safetensors_data_bytes(path) -> int:
    """The tensor bytes of a safetensors file: its size minus the 8-byte length and the JSON header."""
    with open(path, "rb") as handle:
        header = struct.unpack("<Q", handle.read(8))[0]
    return path.stat().st_size - 8 - header


def folder_bytes(folder) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("method", ["lora", "full"])
def test_the_estimate_matches_what_a_run_writes(tmp_path, tiny_model_dirs, method):
    config = write_config(tmp_path, tiny_model_dirs["gptj"], method, checkpoints={"count": 1})
    # Stopped after step 1 (SIGUSR1): a checkpoint-less state holding the optimizer.
    with pytest.MonkeyPatch.context() as monkeypatch:
        signal_after_step(monkeypatch, 1)
        assert main([str(config)]) == EXIT_STOPPED_RESUMABLE
    recipe = FineTuneRecipe(load_config(config))
    try:
        recipe.setup()
        sizes = run_bytes(
            recipe.unwrapped_model, method=method, optimizer="adamw", tokenizer_size=tokenizer_bytes(recipe.tokenizer)
        )
        assert recipe.train() == "complete"
    finally:
        recipe.close()
    run = tmp_path / "run"
    [checkpoint] = run.glob("checkpoint-*")
    weights = checkpoint / ("adapter_model.safetensors" if method == "lora" else "model.safetensors")
    trained = [p for p in recipe.unwrapped_model.parameters() if p.requires_grad]
    expected_weights = (
        tensor_bytes(trained) if method == "lora" else tensor_bytes(recipe.unwrapped_model.state_dict().values())
    )
    assert safetensors_data_bytes(weights) == expected_weights  # exact: the weights' bytes
    assert sizes.checkpoint - SMALL_FILES_BYTES <= folder_bytes(checkpoint) <= sizes.checkpoint
    assert json.loads((run / "status.json").read_text())["status"] == "complete"


def test_the_state_estimate_covers_the_state_folder(tmp_path, tiny_model_dirs):
    config = resume_config(tmp_path, tiny_model_dirs["gpt2"])
    with pytest.MonkeyPatch.context() as monkeypatch:
        signal_after_step(monkeypatch, 1)
        assert main([str(config)]) == EXIT_STOPPED_RESUMABLE
    [state] = (tmp_path / "run").glob("state-*")
    recipe = FineTuneRecipe(
        load_config(config, ["resume=never", "overwrite_output_dir=true", f"output_dir={tmp_path / 'again'}"])
    )
    try:
        recipe.setup()
        sizes = run_bytes(recipe.unwrapped_model, method="lora", optimizer="adamw", tokenizer_size=0)
    finally:
        recipe.close()
    assert sizes.state - SMALL_FILES_BYTES <= folder_bytes(state) <= sizes.state
    assert safetensors_data_bytes(state / "trainable.safetensors") == tensor_bytes(
        [p for p in recipe.unwrapped_model.parameters() if p.requires_grad]
    )


def test_too_little_free_space_is_refused_before_the_first_step_with_both_numbers(
    tmp_path, tiny_model_dirs, monkeypatch
):
    monkeypatch.setattr("trainer.disk.free_bytes", lambda folder: 123_000)
    recipe = FineTuneRecipe(load_config(write_config(tmp_path, tiny_model_dirs["gpt2"], "full")))
    try:
        with pytest.raises(NotEnoughDisk) as refused:
            recipe.setup()
    finally:
        recipe.close()
    assert refused.value.free == 123_000 and refused.value.needed > refused.value.free
    assert "has 123.0 kB free, but this run will write about" in str(refused.value)
    assert "checkpoints.count" in str(refused.value)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_what_is_still_needed():
    sizes = RunBytes(checkpoint=100, state=30)
    assert sizes.needed(checkpoints_left=5, states_present=0) == 560  # two states while one replaces the other
    assert sizes.needed(checkpoints_left=2, states_present=1) == 230
    check_free_space(Path("."), sizes, checkpoints_left=0, states_present=2)  # nothing to write: no refusal
