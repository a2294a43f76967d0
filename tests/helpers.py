"""Small helpers shared by the tests: example data in the seeds' format, run configs, the real command."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable

import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parent.parent
FRUIT_COLOURS = {
    "banana": "yellow",
    "lime": "green",
    "tomato": "red",
    "cherry": "red",
    "kiwi": "green",
    "lemon": "yellow",
}


def fruit_rows(count: int = 48) -> list[dict]:
    """A tiny classification task in the seeds' format (separator ' ->', leading space, EOS)."""
    names = sorted(FRUIT_COLOURS)
    return [
        {"prompt": f"{names[i % len(names)]} ->", "completion": f" {FRUIT_COLOURS[names[i % len(names)]]}<|endoftext|>"}
        for i in range(count)
    ]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


TEST_PROMPTS = [
    {"prompt": "banana ->", "max_new_tokens": 6},
    {"prompt": "kiwi ->", "max_new_tokens": 6, "stop": ["\n"]},
    {"prompt": "tomato ->", "temperature": 0.8, "top_k": 20, "max_new_tokens": 6},
]


def command_env(**extra: str) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)


def run_command(args: list[str], env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """Run `args` in the repository root, one thread per process (as the in-process tests)."""
    return subprocess.run(
        args, cwd=REPO, env=command_env(**(env or {})), capture_output=True, text=True, timeout=240, **kwargs
    )


def write_config(tmp_path: Path, model_dir: Path, method: str, **sections) -> Path:
    train = write_jsonl(tmp_path / "train.jsonl", fruit_rows(48))
    valid = write_jsonl(tmp_path / "valid.jsonl", fruit_rows(12))
    config = {
        "model": {"name_or_path": str(model_dir)},
        "method": method,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        # Unpacked: the step counts the tests reason about are examples (packing has its own tests).
        "data": {"train_file": str(train), "validation_file": str(valid), "max_seq_len": 32, "packing": False},
        "training": {
            "epochs": 3,
            "micro_batch_size": 8,
            "learning_rate": 3e-2 if method == "lora" else 1e-2,
            "warmup_ratio": 0.1,
            "seed": 1,
        },
        "checkpoints": {"count": 3},
        "test_prompts": TEST_PROMPTS,
        "output_dir": str(tmp_path / "run"),
    }
    for key, value in sections.items():
        config[key].update(value)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def checkpoint_folders(run: Path) -> list[Path]:
    return sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def trained_weights(checkpoint: Path) -> dict:
    """The weights a checkpoint holds (adapter or full model), by name."""
    from safetensors.torch import load_file

    name = "adapter_model.safetensors" if (checkpoint / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(checkpoint / name)


def assert_same_run(reference: Path, other: Path, tolerance: float = 1e-6) -> float:
    """`other` is the run `reference` is: the same checkpoints with the same samples, final weights
    within `tolerance`, every step exactly once in metrics.jsonl with the same losses, the same
    report. Returns the largest weight difference."""
    assert [p.name for p in checkpoint_folders(other)] == [p.name for p in checkpoint_folders(reference)]
    for mine, theirs in zip(checkpoint_folders(other), checkpoint_folders(reference)):
        assert read_jsonl(mine / "samples.jsonl") == read_jsonl(theirs / "samples.jsonl"), mine.name
    final, expected = trained_weights(checkpoint_folders(other)[-1]), trained_weights(checkpoint_folders(reference)[-1])
    assert final.keys() == expected.keys()
    difference = max((final[k].float() - expected[k].float()).abs().max().item() for k in expected)
    assert difference <= tolerance, difference
    metrics, reference_metrics = read_jsonl(other / "metrics.jsonl"), read_jsonl(reference / "metrics.jsonl")
    steps = [m["step"] for m in metrics if "loss" in m]
    assert steps == list(range(1, len(steps) + 1)) == [m["step"] for m in reference_metrics if "loss" in m]
    for key in ("loss", "eval_loss", "learning_rate"):
        ours = [m[key] for m in metrics if key in m]
        theirs = [m[key] for m in reference_metrics if key in m]
        assert len(ours) == len(theirs) and all(abs(a - b) <= 1e-6 * max(1.0, abs(b)) for a, b in zip(ours, theirs)), (
            key
        )
    report = (other / "report.md").read_text(encoding="utf-8").replace(str(other), "RUN")
    assert report == (reference / "report.md").read_text(encoding="utf-8").replace(str(reference), "RUN")
    return difference


def resume_config(tmp_path: Path, model_dir: Path, **sections) -> Path:
    """A tiny LoRA run with dropout on (so that restoring the random generators matters), sampled
    test prompts, 24 steps, checkpoints at 8, 16, 24 and a resumable state every 5 steps."""
    base = {
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        "training": {"epochs": 2, "micro_batch_size": 4, "learning_rate": 3e-2, "warmup_ratio": 0.1, "seed": 1},
        "checkpoints": {"count": 3, "state_every_steps": 5, "state_every_minutes": 0},
    }
    for key, value in sections.items():
        base.setdefault(key, {}).update(value)
    return write_config(tmp_path, model_dir, "lora", **base)


def load_checkpoint_plainly(checkpoint: Path, base: Path, method: str):
    """Exactly what a user does, with no import from this project."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    if method == "lora":
        from peft import PeftModel

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), checkpoint)
    else:
        model = AutoModelForCausalLM.from_pretrained(checkpoint)
    return model.eval(), tokenizer


def plain_greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(
            **inputs, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.eos_token_id
        )
    new = output[0, inputs["input_ids"].shape[1] :].tolist()
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id)]
    return tokenizer.decode(new)


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_forked(
    argv: list[str] | Callable[[int], list[str]], *, processes: int = 1, env: dict | None = None, timeout: float = 240
) -> list[int]:
    """`trainer.train.main(argv)` in `processes` processes forked from this one, as one process
    group (RANK, WORLD_SIZE, MASTER_ADDR/PORT set as torchrun sets them; gloo on the CPU).

    The code that runs is the command's own, in real separate processes that a real kill -9 or
    signal can hit, without the ten seconds of imports a new interpreter costs. As torchrun's agent
    does, when one process dies the others are killed. Returns each process's exit code (negative:
    killed by that signal). Their output reaches pytest's `capfd`, not `capsys`. `argv` may also be a
    function of the rank that returns its arguments (a setting that differs per process)."""
    import signal
    import sys
    import time
    import traceback

    port = _free_port()
    pids = []
    for rank in range(processes):
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 1
            try:
                from accelerate.state import AcceleratorState, PartialState

                AcceleratorState._reset_state()
                PartialState._reset_state()  # the parent's single-process state must not be inherited
                os.environ.update(env or {})
                if processes > 1:
                    os.environ.update(
                        RANK=str(rank),
                        LOCAL_RANK=str(rank),
                        WORLD_SIZE=str(processes),
                        LOCAL_WORLD_SIZE=str(processes),
                        MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=str(port),
                    )
                from trainer.train import main

                code = main(argv(rank) if callable(argv) else argv)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()  # os._exit skips Python's own flushing
                sys.stderr.flush()
                os._exit(code)
        pids.append(pid)
    codes: dict[int, int] = {}
    deadline = time.time() + timeout
    while len(codes) < len(pids):
        for pid in pids:
            if pid in codes:
                continue
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes[pid] = os.waitstatus_to_exitcode(status)
                if codes[pid] != 0:  # as torchrun's agent: one failed, stop the others
                    for other in pids:
                        if other not in codes:
                            try:
                                os.kill(other, signal.SIGKILL)
                            except ProcessLookupError:
                                pass
        if time.time() > deadline:
            for pid in pids:
                if pid not in codes:
                    os.kill(pid, signal.SIGKILL)
            raise TimeoutError(f"forked run {argv} did not finish in {timeout} s")
        time.sleep(0.01)
    return [codes[pid] for pid in pids]


#: Two CPU processes of the training command under torchrun (gloo), as a cluster job starts them.
TORCHRUN_2 = [
    sys.executable,
    "-m",
    "torch.distributed.run",
    "--standalone",
    "--nproc_per_node",
    "2",
    "trainer/train.py",
]


def held_parameters(output: str) -> dict[int, tuple[int, int]]:
    """{rank: (parameters held, parameters of the model)} from the runs' FSDP log lines."""
    found = re.findall(r"\[rank (\d)\] FSDP: this process holds ([\d,]+) of ([\d,]+) parameters", output)
    return {int(rank): (int(held.replace(",", "")), int(total.replace(",", ""))) for rank, held, total in found}
