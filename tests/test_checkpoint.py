import pytest
from transformers import AutoModelForCausalLM

from trainer.checkpoint import save_checkpoint
from trainer.config import Config


def make_config(path) -> Config:
    return Config.model_validate({"model": {"name_or_path": str(path)}, "data": {"train_file": "t.jsonl"}})


def test_checkpoint_is_complete_and_loads_with_plain_transformers(tmp_path, tiny_model_dirs, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["gpt2"])
    path = save_checkpoint(tmp_path, 3, model=model, tokenizer=tokenizer, config=make_config(tiny_model_dirs["gpt2"]),
                           samples=[{"prompt": "a", "completion": " b"}], info={"step": 3})
    assert path == tmp_path / "checkpoint-3"
    assert {"model.safetensors", "config.json", "tokenizer.json", "config.yaml", "samples.jsonl", "checkpoint.json"} <= {p.name for p in path.iterdir()}
    reloaded = AutoModelForCausalLM.from_pretrained(path)
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert a.equal(b), name


def test_a_crash_while_saving_leaves_no_checkpoint_folder(tmp_path, tiny_model_dirs, tokenizer, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["gpt2"])

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tokenizer, "save_pretrained", crash)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 5, model=model, tokenizer=tokenizer, config=make_config("m"), samples=[], info={})
    assert not (tmp_path / "checkpoint-5").exists()
    assert list(tmp_path.glob("checkpoint-*")) == []  # the partial folder never takes a checkpoint's name
    assert (tmp_path / ".checkpoint-5.partial").exists()
