"""Messages a new user meets: a model path that is not there is named as a missing folder (not
looked for on the Hub), and `~` in a model path means the home folder."""

import shutil

import pytest

import trainer.hub
from trainer.config import Config
from trainer.hub import ModelFolderMissing, model_source, written_as_path
from trainer.model import load_model_config, load_tokenizer

FIX = "Fix: give the path of a model folder made by save_pretrained"


def config(name_or_path: str) -> Config:
    return Config.model_validate({"model": {"name_or_path": name_or_path}, "data": {"train_file": "t.jsonl"}})


@pytest.fixture
def no_hub(monkeypatch):
    """Asking the Hub about a path would be the bug (and a 5-second wait on a machine without network)."""

    def asked():
        raise AssertionError("the Hub was asked about a path")

    monkeypatch.setattr(trainer.hub, "hub_reachable", asked)


@pytest.mark.parametrize("name", ["/nonexistent/folder", "./nonexistent", "../nonexistent/model"])
def test_a_missing_path_is_a_missing_folder_not_a_hub_id(no_hub, monkeypatch, tmp_path, name):
    monkeypatch.chdir(tmp_path)
    for load in (load_model_config, load_tokenizer):
        with pytest.raises(ModelFolderMissing) as error:
            load(config(name))
        assert (error.value.key, error.value.path) == ("model.name_or_path", name)
        relative = "" if name.startswith("/") else f" (relative paths start at {tmp_path})"
        assert str(error.value) == (
            f"model.name_or_path: the folder {name} does not exist. {FIX}{relative}, or a Hugging Face model id "
            "such as EleutherAI/gpt-j-6b"
        )


def test_a_home_path_is_expanded_and_shown_expanded(no_hub, monkeypatch, tmp_path, tiny_model_dirs):
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ModelFolderMissing) as error:
        load_model_config(config("~/models/gpt2"))
    assert str(error.value).startswith(
        f"model.name_or_path: the folder ~/models/gpt2 ({tmp_path}/models/gpt2) does not exist. {FIX}, "
    )

    shutil.copytree(tiny_model_dirs["gpt2"], tmp_path / "models" / "gpt2")
    assert (
        load_model_config(config("~/models/gpt2")).model_type == "gpt2"
    )  # transformers alone would call it a bad Hub id
    assert load_tokenizer(config("~/models/gpt2")).eos_token == "<|endoftext|>"


@pytest.mark.parametrize(
    "name, is_path",
    [
        ("/abs/model", True),
        ("./model", True),
        ("../model", True),
        ("~/model", True),
        ("~", True),
        (".", True),
        ("gpt2", False),
        ("EleutherAI/gpt-j-6b", False),
        ("examples/tiny-gpt2", False),
        (".hidden-model", False),
    ],
)
def test_what_is_written_as_a_path(name, is_path):
    assert written_as_path(name) is is_path


def test_hub_ids_and_relative_folders_pass_unchanged(no_hub):
    assert model_source("EleutherAI/gpt-j-6b", "model.name_or_path") == "EleutherAI/gpt-j-6b"
    assert model_source("examples/no-such-folder", "model.name_or_path") == "examples/no-such-folder"  # could be an id
