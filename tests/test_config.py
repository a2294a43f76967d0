from pathlib import Path

import pytest

from trainer.config import load_config, parse_overrides, save_config
from trainer.errors import UsageError, UserError

MINIMAL = """\
model:
  name_or_path: some/model
data:
  train_file: train.jsonl
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path, overrides=None) -> str:
    with pytest.raises(UserError) as info:
        load_config(path, overrides)
    return str(info.value)


def test_defaults_fill_everything_but_the_required_keys(tmp_path):
    config = load_config(write(tmp_path, MINIMAL))
    assert config.method == "lora"
    assert config.model.dtype == "auto" and config.model.trust_remote_code is False
    assert config.data.max_seq_len == 2048 and config.data.too_long == "error"
    assert config.training.epochs == "auto"
    assert config.checkpoints.count == 5
    assert config.lora.target_modules == "auto"


def test_overrides_are_typed_as_yaml(tmp_path):
    config = load_config(
        write(tmp_path, MINIMAL),
        [
            "training.learning_rate=3e-4",
            "checkpoints.count=7",
            "output_dir=runs/x",
            "model.gradient_checkpointing=true",
            "lora.target_modules=[q_proj, v_proj]",
            "data.validation_file=null",
        ],
    )
    assert config.training.learning_rate == 3e-4
    assert config.checkpoints.count == 7
    assert config.output_dir == "runs/x"
    assert config.model.gradient_checkpointing is True
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.data.validation_file is None


def test_unknown_key_is_named_with_the_file_and_a_suggestion(tmp_path):
    path = write(tmp_path, MINIMAL + "training:\n  learnign_rate: 0.1\n")
    message = error_of(path)
    assert "unknown key 'training.learnign_rate'" in message
    assert str(path) in message
    assert "did you mean 'training.learning_rate'?" in message


def test_unknown_override_is_blamed_on_the_command_line(tmp_path):
    message = error_of(write(tmp_path, MINIMAL), ["checkpoints.cout=3"])
    assert "unknown key 'checkpoints.cout' on the command line" in message
    assert "did you mean 'checkpoints.count'?" in message


@pytest.mark.parametrize(
    "text, overrides, unknown, where, suggested",
    [
        ("epoch: 3\n", [], "epoch", "in {path}", "'training.epochs'"),  # a top-level key of another section
        ("seed: 1\n", [], "seed", "in {path}", "'training.seed'"),
        (
            "model:\n  name_or_path: m\n  learning_rate: 1\n",
            [],
            "model.learning_rate",
            "in {path}",
            "'training.learning_rate'",
        ),
        ("", ["lr=1e-4"], "lr", "on the command line", "'training.learning_rate'"),  # other trainers' name
        ("", ["training.num_epochs=2"], "training.num_epochs", "on the command line", "'training.epochs'"),
    ],
)
def test_unknown_key_suggests_keys_of_other_sections(tmp_path, text, overrides, unknown, where, suggested):
    path = write(tmp_path, MINIMAL + text)
    message = error_of(path, overrides)
    assert message == f"unknown key '{unknown}' {where.format(path=path)}: did you mean {suggested}?"


def test_one_config_error_does_not_say_error_twice(tmp_path, capsys):
    """Entry points print 'error: ' before the message; the message itself names the key and file."""
    from trainer.status import main as status_main  # an entry point that only reads a config

    path = write(tmp_path, MINIMAL + "training:\n  learnin_rate: 1\n")
    assert status_main([str(path)]) == 1
    assert (
        capsys.readouterr().err
        == f"error: unknown key 'training.learnin_rate' in {path}: did you mean 'training.learning_rate'?\n"
    )
    assert error_of(path, ["checkpoints.count=0"]).startswith("config has 2 errors:\n")


def test_wrong_type_names_key_and_value(tmp_path):
    message = error_of(write(tmp_path, MINIMAL + "training:\n  micro_batch_size: many\n"))
    assert "key 'training.micro_batch_size'" in message and "'many'" in message


def test_bad_choice_lists_the_allowed_values(tmp_path):
    message = error_of(write(tmp_path, MINIMAL), ["data.too_long=cut"])
    assert "data.too_long" in message and "'error', 'drop' or 'truncate'" in message


def test_missing_required_key(tmp_path):
    message = error_of(write(tmp_path, "data:\n  train_file: a.jsonl\n"))
    assert "missing key 'model'" in message


@pytest.mark.parametrize(
    "override, expected",
    [
        (
            ["data.validation_file=v.jsonl", "data.validation_split=0.1"],
            "either data.validation_file or data.validation_split",
        ),
        (["training.optimizer=adamw_8bit"], "is for full fine-tuning"),
        (["test_prompts=[{temperature: 1}]"], "either `prompt` (text) or `messages` (chat)"),
        (["method=full", "model.dtype=float16"], "set model.dtype to bfloat16 or float32"),
        (["checkpoints.count=0"], "checkpoints.count"),
        (["data.validation_split=1.5"], "data.validation_split"),
        (["training.epochs=0"], "key 'training.epochs' on the command line: Input should be greater than 0"),
        (["training.epochs=-1"], "key 'training.epochs' on the command line: Input should be greater than 0"),
        (["training.max_bad_steps=0"], "training.max_bad_steps"),
        (["training.time_limit=soon"], "write it like 23h30m"),
    ],
)
def test_impossible_combinations(tmp_path, override, expected):
    assert expected in error_of(write(tmp_path, MINIMAL), override)


def test_every_problem_is_reported_at_once(tmp_path):
    message = error_of(write(tmp_path, MINIMAL), ["training.epochs=lots", "lora.r=-1"])
    assert message.startswith("config has 2 errors")
    assert "training.epochs" in message and "lora.r" in message


@pytest.mark.parametrize("arg", ["learning_rate", "=3", "training..lr=3"])
def test_malformed_override_is_a_usage_error(arg):
    with pytest.raises(UsageError) as info:
        parse_overrides([arg])
    assert info.value.exit_code == 2 and arg in str(info.value)


def test_yaml_syntax_error_gives_the_line(tmp_path):
    message = error_of(write(tmp_path, MINIMAL + "training:\n  epochs: [1\n"))
    assert "not valid YAML" in message and "line" in message


def test_missing_config_file(tmp_path):
    assert "does not exist" in error_of(tmp_path / "nope.yaml")


def test_test_prompts_accept_plain_strings_and_a_single_stop(tmp_path):
    text = MINIMAL + 'test_prompts:\n  - "banana ->"\n  - {prompt: "lime ->", temperature: 0.7, stop: "\\n"}\n'
    config = load_config(write(tmp_path, text))
    first, second = config.test_prompts
    assert first.prompt == "banana ->" and first.temperature == 0.0 and first.stop == []
    assert second.temperature == 0.7 and second.stop == ["\n"]


def test_temperature_zero_is_allowed_and_negative_is_not(tmp_path):
    path = write(tmp_path, MINIMAL + 'test_prompts:\n  - {prompt: "a", temperature: -1}\n')
    assert "test_prompts.0.temperature" in error_of(path)


def test_saved_config_loads_back_identically(tmp_path):
    config = load_config(write(tmp_path, MINIMAL), ["training.epochs=2.5", "test_prompts=[hi]"])
    save_config(config, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == config


def test_every_shipped_config_loads():
    from tests.helpers import REPO

    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert {p.name for p in configs} >= {
        "tiny-gpt2.yaml",
        "gptj.yaml",
        "gptj-full.yaml",
        "neox20b.yaml",
        "neox20b-full.yaml",
    }
    loaded = {path.name: load_config(path) for path in configs}
    assert all(c.data.packing == "auto" for name, c in loaded.items() if not name.startswith("tiny-"))  # the fast path
    assert (loaded["gptj-full.yaml"].method, loaded["gptj-full.yaml"].training.optimizer) == ("full", "adamw_8bit")
    assert (loaded["neox20b-full.yaml"].method, loaded["neox20b-full.yaml"].distributed.strategy) == ("full", "fsdp")
    assert {c.model.name_or_path for n, c in loaded.items() if not n.startswith("tiny-")} == {
        "EleutherAI/gpt-j-6b",
        "EleutherAI/gpt-neox-20b",
    }


def test_config_is_read_without_torch_or_transformers(tmp_path):
    """A config typo is reported before the heavy imports: trainer.config and load_config (valid or
    not) import neither torch nor transformers. A fresh process: this one has imported both."""
    import subprocess
    import sys

    path = write(tmp_path, MINIMAL)
    script = (
        "import sys\n"
        "from trainer.config import load_config\n"
        f"load_config({str(path)!r})\n"
        "try:\n"
        f"    load_config({str(path)!r}, ['training.learnin_rate=1'])\n"
        "except Exception as err:\n"
        "    print(type(err).__name__)\n"
        "print(sorted(name for name in ('torch', 'transformers', 'accelerate', 'peft') if name in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "UserError\n[]\n", "")


def test_an_override_that_is_not_yaml_is_one_line_with_the_fix():
    from trainer.config import load_config
    from trainer.errors import UsageError

    with pytest.raises(UsageError) as err:
        load_config("configs/tiny-gpt2.yaml", ["lora.target_modules=[q_proj"])
    assert str(err.value) == (
        "override 'lora.target_modules=[q_proj': the value is not valid YAML (expected ',' or ']', but got "
        "'<stream end>' at column 8). Fix: quote it ('lora.target_modules=\"...\"') or close its brackets "
        "(lora.target_modules=[a, b])"
    )
