"""trainer/doctor/: `python -m trainer.doctor CONFIG` in-process on tiny models: the report's
numbers, the timed steps, a failing self-test, a version warning, random weights, user errors."""

import json

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.helpers import REPO, write_config
from trainer import doctor
from trainer.doctor import environment, setup
from trainer.selftest import TOLERANCES

TINY = str(REPO / "configs" / "tiny-gpt2.yaml")


def run_doctor(capsys, *argv) -> tuple[int, dict]:
    code = doctor.main([*argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


@pytest.fixture
def in_repo(monkeypatch, tmp_path):
    """configs/tiny-gpt2.yaml names its model and data relative to the repository root."""
    monkeypatch.chdir(REPO)
    return f"output_dir={tmp_path / 'run'}"


def test_the_tiny_config_passes_with_the_self_tests_numbers(capsys, in_repo):
    code, report = run_doctor(capsys, TINY, in_repo)
    assert code == 0 and report["ok"] is True and report["failures"] == [] and report["warnings"] == []
    resolved = report["config"]["resolved"]
    assert (
        resolved["model"]["attention"],
        resolved["model"]["dtype"],
        resolved["data"]["packing"],
        resolved["training"]["mixed_precision"],
        resolved["training"]["epochs"],
    ) == ("sdpa", "float32", True, "no", 6.0)
    assert report["config"]["auto"] == {
        "model.attention": "sdpa",
        "data.packing": True,
        "training.mixed_precision": "no",
        "distributed.strategy (on 1 process)": "ddp",
    }
    test = report["self_test"]
    assert test["passed"] is True and test["weights"] == "real" and test["parameters"] == 524_928
    checks = {check["name"]: check for check in test["checks"]}
    assert list(checks) == ["attention", "layout", "labels"]
    for name in ("attention", "layout"):
        assert checks[name]["tolerance"] == TOLERANCES[torch.float32]
        assert isinstance(checks[name]["difference"], float) and 0 <= checks[name]["difference"] < 1e-5
    assert checks["labels"]["difference"] == 0.0
    assert checks["labels"]["detail"].endswith("examples supervise exactly their completion and EOS")
    plan = report["memory_plan"]
    assert plan["fits"] is True and plan["gpu_memory_bytes"] == setup.REFERENCE_GPU_BYTES and plan["gpus"] == 1
    disk = report["disk"]
    assert 0 < disk["needed_bytes"] < disk["free_bytes"]
    assert disk["needed_bytes"] == 5 * disk["checkpoint_bytes"] + 2 * disk["state_bytes"]
    assert report["device"]["type"] == "cpu" and "speed" not in report
    versions = {row["name"]: row for row in report["versions"]["packages"]}
    assert versions["transformers"]["installed"] == transformers.__version__


def test_speed_times_the_trainers_step_on_packed_rows(capsys, in_repo):
    code, report = run_doctor(capsys, TINY, in_repo, "--speed", "--steps", "2")
    speed = report["speed"]
    assert code == 0 and speed["steps"] == 2 and speed["warmup_steps"] == 1
    assert speed["tokens"] == 2 * 8 * 64  # 2 steps x 8 rows x max_seq_len, every row full
    assert speed["tokens_per_second"] > 0 and speed["tokens_per_second"] == speed["tokens"] / speed["seconds"]
    assert speed["mfu"] is None  # no stated peak for a CPU
    assert speed["planner_estimate_bytes"] == report["memory_plan"]["per_gpu_bytes"]["total"]


@pytest.fixture
def bloom_dir(tmp_path, tiny_model_dirs):
    """A tiny BLOOM (no family entry, ALiBi, no position_ids: packing cannot keep examples apart)."""
    folder = tmp_path / "bloom"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs["gpt2"])
    config = transformers.BloomConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        n_layer=2,
        n_head=2,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_failing_self_test_is_a_failing_item_and_exit_1(capsys, tmp_path, bloom_dir):
    config = write_config(tmp_path, bloom_dir, "full", model={"dtype": "float32"}, data={"packing": True})
    code, report = run_doctor(capsys, str(config))
    assert code == 1 and report["ok"] is False
    assert [failed["item"] for failed in report["failures"]] == ["self-test"]
    assert "packed examples attend to each other" in report["failures"][0]["message"]
    assert [c["name"] for c in report["self_test"]["checks"] if not c["passed"]] == ["layout"]
    # The planner knows no BLOOM: on a CPU that is a warning, not a failure. The data's warnings
    # (tests/helpers.py repeats its rows) are training's preflight's, one line a file.
    assert [warning["item"] for warning in report["warnings"]] == ["data", "data", "memory"]
    assert report["warnings"][0]["message"] == (
        f"{tmp_path / 'train.jsonl'}: 46 warnings (42 duplicate, 1 too_few_examples, 3 test_prompt_in_data): "
        "training runs, but results may suffer. Details and fixes: python scripts/prepare_data.py validate "
        f"{tmp_path / 'train.jsonl'}"
    )
    # The text report lists the failing item last.
    assert doctor.main([str(config)]) == 1
    last = capsys.readouterr().out.rstrip().splitlines()[-2:]
    assert last[0].startswith("  FAILED (1 item, ") and last[1] == "  - self-test: " + report["failures"][0]["message"]


def test_a_version_that_differs_from_constraints_is_a_warning(capsys, in_repo, monkeypatch):
    real = environment.installed_version
    monkeypatch.setattr(environment, "installed_version", lambda name: "0.0.1" if name == "peft" else real(name))
    code, report = run_doctor(capsys, TINY, in_repo)
    peft = next(row for row in report["versions"]["packages"] if row["name"] == "peft")
    assert code == 0 and report["ok"] is True
    assert peft == {
        "name": "peft",
        "installed": "0.0.1",
        "tested": environment.tested_versions()["peft"],
        "status": "differs",
    }
    assert report["warnings"] == [
        {
            "item": "versions",
            "message": f"not the tested versions: peft 0.0.1 (tested "
            f"{peft['tested']}). Fix if the run misbehaves: pip install -c constraints.txt -e .",
        }
    ]


def test_weights_missing_from_the_cache_are_built_random_and_said_so(capsys, tmp_path, tiny_model_dirs, monkeypatch):
    """A Hub id that is not cached, on a machine without the Hub (the tests run offline): the model
    comes from its published config with random weights; no tokenizer, so no labels check."""
    from trainer.families import FAMILIES, PUBLISHED_CONFIGS

    published = lambda: FAMILIES["gptj"].tiny_config(
        {"eos_token_id": 0, "bos_token_id": 0},
        n_layer=2,
        n_embd=32,
        n_head=2,
        n_positions=64,
        vocab_size=320,
    )
    monkeypatch.setitem(PUBLISHED_CONFIGS, "example-org/not-cached", published)
    config = write_config(tmp_path, tiny_model_dirs["gptj"], "lora", model={"name_or_path": "example-org/not-cached"})
    assert doctor.main([str(config)]) == 0
    text = capsys.readouterr().out
    assert "THE WEIGHTS ARE RANDOM" in text
    code, report = run_doctor(capsys, str(config))
    assert code == 0 and report["self_test"]["weights"] == "random" and report["self_test"]["passed"] is True
    assert [c["name"] for c in report["self_test"]["checks"]] == ["attention", "layout"]
    # No config.json; the data's own warnings (the preflight needs no tokenizer); training cannot load the weights.
    assert [w["item"] for w in report["warnings"]] == ["config", "data", "data", "weights"]
    assert "first_batch" not in report["data"] and report["data"]["files"][0]["warnings"] == 46


def test_user_errors_are_one_line_and_exit_1(capsys, tmp_path, in_repo):
    assert doctor.main([str(tmp_path / "missing.yaml")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.yaml" in err and err.count("\n") == 1
    assert doctor.main([TINY, "training.learning_rat=1e-4"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "learning_rat" in err and "Traceback" not in err
    assert doctor.main([TINY, "--steps", "0"]) == 2  # a malformed command line: usage error, as train's


def test_with_json_a_user_error_is_also_one_json_object_and_the_environment_one_line(capsys, tmp_path, monkeypatch):
    missing = tmp_path / "missing.yaml"
    assert doctor.main([str(missing), "--json"]) == 1
    out, err = capsys.readouterr()
    assert err.startswith("error: ") and err.count("\n") == 1
    assert json.loads(out) == {"ok": False, "error": err.removeprefix("error: ").rstrip("\n")}

    def unreadable(args, report):
        raise PermissionError(13, "Permission denied", str(tmp_path / "data"))

    monkeypatch.setattr(doctor, "run", unreadable)
    assert doctor.main([TINY]) == 1
    assert capsys.readouterr() == (
        "",
        f"error: Permission denied: {tmp_path / 'data'}. Fix: check that this path is readable and its disk has "
        "free space\n",
    )


# ---------------------------------------------------------------------------------------------
# Where training refuses at its start, the doctor fails, with training's message


def test_more_checkpoints_than_optimizer_steps_fail_as_the_schedule_says(capsys, in_repo):
    code, report = run_doctor(capsys, TINY, in_repo, "checkpoints.count=1000")
    assert code == 1 and report["ok"] is False
    assert report["failures"] == [
        {
            "item": "schedule",
            "message": "checkpoints.count=1000 but training has only 378 optimizer steps: lower checkpoints.count "
            "to at most 378, or train longer (training.epochs) or with smaller steps (training.micro_batch_size, "
            "training.gradient_accumulation_steps)",
        }
    ]


def test_a_training_file_with_errors_fails_with_the_preflights_message(capsys, tmp_path, in_repo):
    train = tmp_path / "train.jsonl"
    train.write_text('{"prompt": "a", "completion": " b<|endoftext|>"}\nnot json\n{"prompt": "c"}\n', encoding="utf-8")
    code, report = run_doctor(capsys, TINY, in_repo, f"data.train_file={train}")
    assert code == 1 and [failed["item"] for failed in report["failures"]] == ["data"]
    message = report["failures"][0]["message"]
    assert message.splitlines()[0] == "the data has 2 errors:"
    assert message.splitlines()[1].startswith(f"  {train} line 2: invalid JSON")
    assert message.splitlines()[2] == (
        f"  {train} line 3: missing key 'completion'. Fix: every line needs 'prompt' and 'completion'"
    )
    assert "first_batch" not in report["data"]  # nothing was tokenized: no first batch, no labels check
    assert [check["name"] for check in report["self_test"]["checks"]] == ["attention", "layout"]


def test_examples_longer_than_max_seq_len_fail_naming_the_fix(capsys, in_repo):
    code, report = run_doctor(capsys, TINY, in_repo, "data.max_seq_len=16")
    assert code == 1 and [failed["item"] for failed in report["failures"]] == ["data"]
    message = report["failures"][0]["message"]
    assert message.splitlines()[0] == "1000 examples are longer than data.max_seq_len=16:"
    assert message.splitlines()[-1] == (
        "Fix: raise data.max_seq_len, shorten them, or set data.too_long to drop or truncate"
    )


def test_an_output_dir_that_is_a_file_fails_as_training_does(capsys, tmp_path, in_repo):
    path = tmp_path / "a-file"
    path.write_text("not a folder\n", encoding="utf-8")
    code, report = run_doctor(capsys, TINY, f"output_dir={path}")
    assert code == 1
    assert report["failures"] == [
        {
            "item": "output_dir",
            "message": f"output_dir {path} is a file, not a folder. Fix: choose a folder (output_dir=runs/another)",
        }
    ]
    assert report["disk"]["checked"] == str(tmp_path)  # the free disk of the folder holding it
    assert path.read_text(encoding="utf-8") == "not a folder\n"


def test_a_run_folder_training_would_refuse_or_find_complete_is_said(capsys, tmp_path, in_repo):
    """What `decide_run` says of output_dir, as training would say it before loading anything."""
    old = tmp_path / "old"
    (old / "checkpoint-4").mkdir(parents=True)  # a run of a version that could not resume: no status
    code, report = run_doctor(capsys, TINY, f"output_dir={old}")
    assert code == 1 and [f["item"] for f in report["failures"]] == ["run folder"]
    assert report["failures"][0]["message"].startswith(
        f"output_dir {old} already holds a run that this version cannot resume (it has no resumable state)"
    )
    code, report = run_doctor(capsys, TINY, in_repo)
    assert code == 0 and report["run_folder"] == {"action": "fresh", "step": 0}


def test_the_output_dir_check_leaves_no_folder_behind(capsys, tmp_path, in_repo):
    run = tmp_path / "runs" / "new"
    code, report = run_doctor(capsys, TINY, f"output_dir={run}")
    assert code == 0 and report["disk"]["checked"] == str(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_the_self_tests_first_batch_is_trainings(capsys, tmp_path, in_repo):
    """The labels check runs on the micro-batch training's step 1 starts with (the packed rows of
    the whole shuffled file), not on a sample of the file's first lines."""
    from trainer.config import load_config
    from trainer.recipe import FineTuneRecipe

    code, report = run_doctor(capsys, TINY, in_repo)
    recipe = FineTuneRecipe(load_config(TINY, [f"output_dir={tmp_path / 'trained'}", "training.self_test=false"]))
    try:
        recipe.setup()
        items, _, real = recipe.batches.first_micro_batch(1)
    finally:
        recipe.close()
    examples = [example for row in items for example in row.examples]
    assert real and code == 0 and len(items) == 8 and len(examples) == 16
    assert report["data"]["first_batch"] == {
        "items": 8,
        "examples": 16,
        "lines": [f"{example.source} line {example.line}" for example in examples],
    }
    labels = next(check for check in report["self_test"]["checks"] if check["name"] == "labels")
    assert labels["detail"] == "16 examples supervise exactly their completion and EOS"
    assert (report["data"]["total_steps"], report["data"]["checkpoint_steps"]) == (
        recipe.schedule.total_steps,
        recipe.schedule.checkpoint_steps,
    )
