"""FSDP2 sharding on CPU with gloo: two processes (accelerate launch, torchrun) against one.

The two-process runs shard the model (`distributed.strategy: auto` is fsdp for full fine-tuning on
several processes; LoRA asks for it explicitly); the one-process runs train the same global batch
unsharded, in-process.
"""

import signal
import sys

import pytest

from tests.helpers import (
    TORCHRUN_2,
    assert_same_run,
    checkpoint_folders,
    held_parameters,
    load_checkpoint_plainly,
    plain_greedy,
    read_jsonl,
    run_command,
    run_forked,
    trained_weights,
    write_config,
)
from trainer.errors import UserError
from trainer.train import main

ACCELERATE_2 = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--multi_gpu",
    "--num_processes",
    "2",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
    "trainer/train.py",
]


def assert_same_training(one, two, *, weights_tolerance: float) -> None:
    losses = lambda run: [m["loss"] for m in read_jsonl(run / "metrics.jsonl") if "grad_norm" in m]
    assert len(losses(one)) == len(losses(two)) == 12
    for a, b in zip(losses(one), losses(two)):
        assert abs(a - b) <= 1e-5 * abs(a), (losses(one), losses(two))
    final_one, final_two = trained_weights(checkpoint_folders(one)[-1]), trained_weights(checkpoint_folders(two)[-1])
    assert final_one.keys() == final_two.keys()
    assert max((final_one[k] - final_two[k]).abs().max().item() for k in final_one) <= weights_tolerance
    for mine, theirs in zip(checkpoint_folders(one), checkpoint_folders(two)):
        assert read_jsonl(mine / "samples.jsonl") == read_jsonl(theirs / "samples.jsonl"), mine.name


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory, tiny_model_dirs):
    """GPT-J full fine-tuning: one process (global batch 8) and two FSDP processes (4 each) under
    `accelerate launch --multi_gpu`, the users' command."""
    folder = tmp_path_factory.mktemp("fsdp-full")
    config = write_config(
        folder,
        tiny_model_dirs["gptj"],
        "full",
        training={"epochs": 2, "micro_batch_size": 4},
        checkpoints={"count": 2, "state_every_steps": 5},
    )
    assert main([str(config), f"output_dir={folder / 'one'}", "training.micro_batch_size=8"]) == 0
    two = run_command([*ACCELERATE_2, str(config), f"output_dir={folder / 'two'}"])
    assert two.returncode == 0, two.stderr[-3000:]
    return config, folder / "one", folder / "two", two.stdout + two.stderr


def test_two_sharded_processes_train_like_one(full_runs, tiny_model_dirs):
    config, one, two, output = full_runs
    held = held_parameters(output)
    total = held[0][1]
    assert sorted(held) == [0, 1] and held[0][0] + held[1][0] == total
    assert all(abs(count - total / 2) <= 0.05 * total for count, _ in held.values())  # about half each
    assert_same_training(one, two, weights_tolerance=1e-5)
    # The checkpoints are whole Hugging Face models, gathered from both shards: plain transformers
    # loads the last one and reproduces its greedy samples.
    last = checkpoint_folders(two)[-1]
    model, tokenizer = load_checkpoint_plainly(last, tiny_model_dirs["gptj"], "full")
    for sample in read_jsonl(last / "samples.jsonl")[:2]:
        assert (
            plain_greedy(model, tokenizer, sample["prompt"], sample["parameters"]["max_new_tokens"])
            == sample["completion"]
        )


def test_a_killed_sharded_run_resumes_from_its_sharded_state(full_runs, tmp_path, capfd):
    """kill -9 of rank 1 in the middle of step 8 (two processes forked as torchrun starts them); the
    same command continues from the FSDP state of step 6 (saved through torch.distributed.checkpoint)
    to the end the accelerate-launched run reached."""
    config, _, reference, _ = full_runs
    run = tmp_path / "run"
    killed = run_forked([str(config), f"output_dir={run}"], processes=2, env={"TRAINER_CRASH_AT": "mid_step@8:1"})
    assert killed[1] == -signal.SIGKILL
    [state] = run.glob("state-*")
    assert state.name == "state-6" and (state / "sharded" / ".metadata").is_file()
    capfd.readouterr()
    assert run_forked([str(config), f"output_dir={run}"], processes=2) == [0, 0]
    assert "resumed from step 6 of 12" in capfd.readouterr().out
    assert_same_run(reference, run)


def test_lora_under_fsdp_trains_like_one_process(tmp_path, tiny_model_dirs):
    config = write_config(
        tmp_path,
        tiny_model_dirs["gpt_neox"],
        "lora",
        training={"epochs": 2, "micro_batch_size": 4},
        checkpoints={"count": 2},
    )
    assert main([str(config), f"output_dir={tmp_path / 'one'}", "training.micro_batch_size=8"]) == 0
    two = run_command([*TORCHRUN_2, str(config), f"output_dir={tmp_path / 'two'}", "distributed.strategy=fsdp"])
    assert two.returncode == 0, two.stderr[-3000:]
    held = held_parameters(two.stdout + two.stderr)
    assert held[0][0] + held[1][0] == held[0][1]
    assert_same_training(tmp_path / "one", tmp_path / "two", weights_tolerance=1e-5)


def test_fsdp_refuses_what_it_cannot_shard(tmp_path, tiny_model_dirs):
    from trainer.config import load_config
    from trainer.strategy import check_fsdp_config

    config = write_config(tmp_path, tiny_model_dirs["gpt2"], "full")
    for overrides, message in (
        (["method=qlora"], "cannot shard QLoRA"),
        (["training.optimizer=adamw_8bit"], "8-bit state that FSDP cannot shard"),
        (["training.compile=true"], "not supported with distributed.strategy=fsdp"),
    ):
        with pytest.raises(UserError, match=message):
            check_fsdp_config(load_config(config, overrides))
