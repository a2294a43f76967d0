import errno
import json
import os
import stat

import pytest
import torch
from transformers import AutoModelForCausalLM

from trainer.atomic import file_mode
from trainer.checkpoint import save_checkpoint
from trainer.config import Config
from trainer.errors import SaveFailed
from trainer.model import apply_method


def make_config(path, **extra) -> Config:
    return Config.model_validate({"model": {"name_or_path": str(path)}, "data": {"train_file": "t.jsonl"}, **extra})


def test_checkpoint_is_complete_and_loads_with_plain_transformers(tmp_path, tiny_model_dirs, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["gpt2"])
    path = save_checkpoint(
        tmp_path,
        3,
        model=model,
        tokenizer=tokenizer,
        config=make_config(tiny_model_dirs["gpt2"]),
        samples=[{"prompt": "a", "completion": " b"}],
        info={"step": 3},
    )
    assert path == tmp_path / "checkpoint-3"
    assert {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "config.yaml",
        "samples.jsonl",
        "checkpoint.json",
    } <= {p.name for p in path.iterdir()}
    reloaded = AutoModelForCausalLM.from_pretrained(path)
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert a.equal(b), name


def test_every_file_gets_the_umask_permissions(tmp_path, tiny_model_dirs, tokenizer):
    """safetensors creates files 0600; on a shared cluster folder others could not read the weights."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["gpt2"])
    path = save_checkpoint(
        tmp_path, 1, model=model, tokenizer=tokenizer, config=make_config(tiny_model_dirs["gpt2"]), samples=[], info={}
    )
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in path.iterdir()}
    assert modes["model.safetensors"] == file_mode() == 0o666 & ~_umask(), modes
    assert set(modes.values()) == {file_mode()}, modes


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_an_adapter_names_its_local_base_by_absolute_path(tmp_path, tiny_model_dirs, tokenizer, monkeypatch):
    """Loading the adapter by its path alone must work from any folder, not only the training cwd."""
    monkeypatch.chdir(tiny_model_dirs["gpt2"].parent)
    relative = tiny_model_dirs["gpt2"].name
    config = make_config(relative, method="lora")
    model = apply_method(config, AutoModelForCausalLM.from_pretrained(relative))
    path = save_checkpoint(tmp_path, 2, model=model, tokenizer=tokenizer, config=config, samples=[], info={})
    adapter = json.loads((path / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tiny_model_dirs["gpt2"].resolve())
    hub_id = make_config("EleutherAI/gpt-j-6b", method="lora")
    from trainer.checkpoint import base_model_reference

    assert base_model_reference(hub_id.model.name_or_path) == "EleutherAI/gpt-j-6b"


def test_a_full_disk_while_saving_leaves_no_folder_and_says_so(tmp_path, tiny_model_dirs, tokenizer, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["gpt2"])

    def disk_full(*args, **kwargs):
        raise OSError(
            errno.ENOSPC, "No space left on device", str(tmp_path / ".checkpoint-5.partial" / "tokenizer.json")
        )

    monkeypatch.setattr(tokenizer, "save_pretrained", disk_full)
    with pytest.raises(
        SaveFailed,
        match="could not save checkpoint-5 .*No space left on device.* is free. Nothing of it was kept; no checkpoint "
        "was saved yet, no resumable state was saved yet \\(intact\\)",
    ):
        save_checkpoint(tmp_path, 5, model=model, tokenizer=tokenizer, config=make_config("m"), samples=[], info={})
    assert list(tmp_path.iterdir()) == []  # neither a checkpoint nor a half-written folder


def test_master_weights_are_saved_in_the_compute_dtype_with_tied_weights_once(tiny_model_dirs):
    from trainer.checkpoint import cast_floating

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["gpt2"])  # GPT-2 ties wte and lm_head
    state = model.state_dict()
    cast = cast_floating(state, torch.bfloat16)
    assert cast.keys() == state.keys()
    assert all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in cast.values() if t.is_floating_point())
    assert cast["lm_head.weight"] is cast["transformer.wte.weight"]
    assert torch.equal(cast["lm_head.weight"], state["lm_head.weight"].to(torch.bfloat16))
