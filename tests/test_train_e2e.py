"""The training job end to end on tiny GPT-2, GPT-J and GPT-NeoX models on CPU.

Most runs call `main(argv)` in-process (the same code as the command, without 5 s of imports per
run); subprocesses are kept for what only the real command shows: `accelerate launch`,
`python -m trainer.train`, and two processes under torchrun.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.helpers import (
    REPO,
    TEST_PROMPTS,
    TORCHRUN_2,
    load_checkpoint_plainly,
    plain_greedy,
    read_jsonl,
    run_command,
    write_config,
    write_jsonl,
)
from trainer.families import FAMILIES
from trainer.schedule import checkpoint_steps
from trainer.train import main


def check_run(run: Path, model_dir: Path, method: str, count: int = 3) -> None:
    metrics = read_jsonl(run / "metrics.jsonl")
    steps = [m for m in metrics if "loss" in m]
    evals = [m for m in metrics if "eval_loss" in m]
    assert [m["step"] for m in steps] == list(range(1, len(steps) + 1))
    assert all({"loss", "learning_rate", "grad_norm", "tokens_per_second"} <= m.keys() for m in steps)
    expected_steps = checkpoint_steps(len(steps), count)
    assert [m["step"] for m in evals] == expected_steps

    # The loss falls. LoRA on a random-init tiny model plateaus early (the frozen output embeddings
    # are too small to give confident logits), so it gets a fixed drop rather than a ratio.
    first = sum(m["loss"] for m in steps[:3]) / 3
    last = sum(m["loss"] for m in steps[-3:]) / 3
    assert last < (first - 0.2 if method == "lora" else 0.7 * first), (first, last)

    checkpoints = sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint-"))
    assert checkpoints == sorted(f"checkpoint-{s}" for s in expected_steps)
    assert not list(run.glob(".*partial"))
    report = (run / "report.md").read_text(encoding="utf-8")
    page = (run / "report.html").read_text(encoding="utf-8")
    for step in expected_steps:
        assert f"| checkpoint-{step} |" in report and f"checkpoint-{step}" in page
    assert (run / "loss.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and "data:image/png;base64," in page

    for step in expected_steps:
        checkpoint = run / f"checkpoint-{step}"
        samples = read_jsonl(checkpoint / "samples.jsonl")
        assert [s["prompt"] for s in samples] == [p["prompt"] for p in TEST_PROMPTS]
        assert samples[2]["parameters"]["temperature"] == 0.8 and samples[2]["parameters"]["top_k"] == 20
        weights = {p.name for p in checkpoint.iterdir()}
        assert ("adapter_model.safetensors" in weights) if method == "lora" else ("model.safetensors" in weights)
        assert not {"pytorch_model.bin", "adapter_model.bin"} & weights
    # Reloading the last checkpoint with plain transformers/peft reproduces its greedy samples.
    model, tokenizer = load_checkpoint_plainly(run / f"checkpoint-{expected_steps[-1]}", model_dir, method)
    samples = read_jsonl(run / f"checkpoint-{expected_steps[-1]}" / "samples.jsonl")
    for sample, prompt in zip(samples[:2], TEST_PROMPTS[:2]):
        assert plain_greedy(model, tokenizer, prompt["prompt"], prompt["max_new_tokens"]) == sample["completion"]


ACCELERATE_LAUNCH = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--cpu",
    "--num_processes",
    "1",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
]


def check_resolved_config(run: Path, family: str, method: str) -> None:
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["model"]["dtype"] == "float32" and resolved["model"]["attention"] == "sdpa"
    if method == "lora":
        assert resolved["lora"]["target_modules"] == list(FAMILIES[family].lora_targets)


@pytest.mark.parametrize(
    "family, method",
    [("gpt2", "lora"), ("gptj", "lora"), ("gptj", "full"), ("gpt_neox", "lora"), ("gpt_neox", "full")],
    ids=["gpt2-lora", "gptj-lora", "gptj-full", "neox-lora", "neox-full"],
)
def test_each_family_and_method_end_to_end(tmp_path, tiny_model_dirs, family, method):
    config = write_config(tmp_path, tiny_model_dirs[family], method)
    assert main([str(config)]) == 0
    check_run(tmp_path / "run", tiny_model_dirs[family], method)
    check_resolved_config(tmp_path / "run", family, method)


def test_accelerate_launch_runs_the_job(tmp_path, tiny_model_dirs):
    config = write_config(tmp_path, tiny_model_dirs["gpt2"], "full")
    result = run_command([*ACCELERATE_LAUNCH, "trainer/train.py", str(config)])
    assert result.returncode == 0, result.stderr[-3000:]
    check_run(tmp_path / "run", tiny_model_dirs["gpt2"], "full")
    check_resolved_config(tmp_path / "run", "gpt2", "full")


def test_packed_training_end_to_end(tmp_path, tiny_model_dirs, capsys):
    config = write_config(
        tmp_path, tiny_model_dirs["gptj"], "full", data={"packing": True}, training={"micro_batch_size": 2}
    )
    assert main([str(config)]) == 0
    assert "packing: packed 48 examples" in capsys.readouterr().out
    check_run(tmp_path / "run", tiny_model_dirs["gptj"], "full")


def test_module_entry_point_with_overrides(tmp_path, tiny_model_dirs):
    config = write_config(tmp_path, tiny_model_dirs["gpt2"], "lora")
    result = run_command(
        [
            sys.executable,
            "-m",
            "trainer.train",
            str(config),
            "checkpoints.count=2",
            "training.epochs=1",
            f"output_dir={tmp_path / 'other'}",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "other").glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]


def test_two_processes_give_the_same_losses_as_one(tmp_path, tiny_model_dirs):
    """Two CPU processes (torchrun; `accelerate launch --cpu` needs MPI for that) run the same
    Accelerator code as a multi-GPU job: each step's loss, normalized over both processes, equals
    one process running the same global batch."""
    config = write_config(tmp_path, tiny_model_dirs["gpt2"], "full")
    assert (
        main(
            [
                str(config),
                "training.micro_batch_size=8",
                f"output_dir={tmp_path / 'one'}",
                "checkpoints.count=1",
                "training.epochs=1",
            ]
        )
        == 0
    )
    double = run_command(
        [
            *TORCHRUN_2,
            str(config),
            "training.micro_batch_size=4",
            f"output_dir={tmp_path / 'two'}",
            "checkpoints.count=1",
            "training.epochs=1",
        ]
    )
    assert double.returncode == 0, double.stderr[-3000:]
    losses = lambda run: [m["loss"] for m in read_jsonl(tmp_path / run / "metrics.jsonl") if "loss" in m]
    one, two = losses("one"), losses("two")
    assert len(one) == len(two) == 6  # 48 examples, 8 a step, 1 epoch
    for a, b in zip(one, two):
        assert abs(a - b) < 1e-4, (one, two)


def test_usage_and_user_errors_have_exit_codes_and_no_traceback(tmp_path, tiny_model_dirs, capsys):
    assert main([]) == 2 and "usage:" in capsys.readouterr().err
    assert main(["x.yaml", "nonsense"]) == 2 and "section.key=value" in capsys.readouterr().err

    # The data is checked before the model is loaded: a missing model is not what gets reported.
    config = write_config(tmp_path, tmp_path / "no-such-model", "lora")
    (tmp_path / "train.jsonl").write_text('{"prompt": "a", "completion": " b"}\n{"prompt": "a"\n', encoding="utf-8")
    assert main([str(config)]) == 1
    err = capsys.readouterr().err
    assert "the data has 1 error:" in err and "train.jsonl line 2: invalid JSON" in err and "Traceback" not in err

    assert main([str(config), "training.lr=1"]) == 1
    assert "unknown key 'training.lr' on the command line" in capsys.readouterr().err

    # A pretty-printed JSON array is one message, not one per line.
    (tmp_path / "train.jsonl").write_text(json.dumps(fruit_rows_for_array(), indent=2), encoding="utf-8")
    assert main([str(config)]) == 1
    err = capsys.readouterr().err
    assert "is one JSON array of 4 items, not JSON Lines" in err and "the data has" not in err


def fruit_rows_for_array() -> list[dict]:
    from tests.helpers import fruit_rows

    return fruit_rows(4)


def test_a_finished_run_is_not_trained_again_unless_overwritten(tmp_path, tiny_model_dirs, capsys):
    config = write_config(tmp_path, tiny_model_dirs["gpt2"], "lora", training={"epochs": 1}, checkpoints={"count": 1})
    assert main([str(config)]) == 0
    assert main([str(config)]) == 0 and "already complete" in capsys.readouterr().out
    assert main([str(config), "overwrite_output_dir=true", "checkpoints.count=2"]) == 0
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]


def test_the_embedded_default_learns_the_example_task(tmp_path, monkeypatch):
    """README command 1's job, as shipped: by the last checkpoint every held-out test prompt of
    configs/tiny-gpt2.yaml is answered exactly right (greedy)."""
    sys.path.insert(0, str(REPO / "scripts"))
    from make_example_data import TEST_PROMPTS as EXPECTED

    monkeypatch.chdir(REPO)
    assert main(["configs/tiny-gpt2.yaml", f"output_dir={tmp_path / 'run'}"]) == 0
    checkpoints = sorted((tmp_path / "run").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert [p.name for p in checkpoints] == [
        "checkpoint-76",
        "checkpoint-152",
        "checkpoint-227",
        "checkpoint-303",
        "checkpoint-378",
    ]
    samples = read_jsonl(checkpoints[-1] / "samples.jsonl")
    assert [(s["prompt"], s["completion"]) for s in samples] == [(t["prompt"], t["expected"]) for t in EXPECTED]
    first = read_jsonl(checkpoints[0] / "samples.jsonl")
    assert [s["completion"] for s in first] != [t["expected"] for t in EXPECTED]  # it was learned, not given


def test_chat_data_end_to_end(tmp_path, tiny_model_dirs, capsys):
    """Chat rows in seed 000's form (its `agent` role included) on a model without a chat template:
    the plain-text default renders training data and the chat test prompt alike, and the checkpoint's
    tokenizer carries that template, so plain `apply_chat_template` reproduces the sample."""
    system = {"role": "system", "content": "Marv."}  # short: the tiny models have 64 positions
    pairs = [("kiwi?", "green"), ("banana?", "yellow"), ("tomato?", "red"), ("lime?", "green")]
    rows = [
        {
            "messages": [
                system,
                {"role": "user", "content": q},
                {"role": "agent" if i == 0 else "assistant", "content": a},
            ]
        }
        for i, (q, a) in enumerate(pairs * 6)
    ]
    config = write_config(tmp_path, tiny_model_dirs["gpt_neox"], "full", data={"format": "chat", "max_seq_len": 64})
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "valid.jsonl", rows[:4])
    chat_prompt = {"messages": [system, {"role": "user", "content": "kiwi?"}], "max_new_tokens": 6}
    assert main([str(config), f"test_prompts=[{json.dumps(chat_prompt)}]"]) == 0
    # The alias (on line 1) is accepted, with a warning naming the file.
    out = capsys.readouterr().out
    assert "warning: " + str(tmp_path / "train.jsonl") in out
    assert "the role 'agent', read as 'assistant'" in out

    run = tmp_path / "run"
    last = sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    [sample] = read_jsonl(last / "samples.jsonl")
    tokenizer = AutoTokenizer.from_pretrained(last)
    model = AutoModelForCausalLM.from_pretrained(last).eval()
    ids = tokenizer.apply_chat_template(
        chat_prompt["messages"], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert tokenizer.decode(ids) == sample["prompt"]
    with torch.no_grad():
        output = model.generate(
            torch.tensor([ids]), do_sample=False, max_new_tokens=6, pad_token_id=tokenizer.eos_token_id
        )
    new = output[0, len(ids) :].tolist()
    new = new[: new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new
    assert tokenizer.decode(new) == sample["completion"]
