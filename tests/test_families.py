"""Every family entry matches the transformers models it describes (tiny models built locally)."""

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from trainer.config import Config
from trainer.families import FAMILIES, PUBLISHED_CONFIGS, family_of, model_shape, transformer_blocks
from trainer.model import apply_method


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_entry_describes_the_model(tiny_model_dirs, family):
    entry = FAMILIES[family]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[family])
    assert family_of(model) is entry and family_of(model.config) is entry
    blocks = transformer_blocks(model)
    assert len(blocks) == model.config.num_hidden_layers == model_shape(model.config).n_layer
    names = {name.rsplit(".", 1)[-1]: module for name, module in blocks[0].named_modules()}
    for target in entry.lora_targets:  # every target is a projection of each block
        assert isinstance(names[target], Conv1D if entry.conv1d_projections else torch.nn.Linear), target
    config = Config.model_validate({"model": {"name_or_path": str(tiny_model_dirs[family])}, "data": {"train_file": "t"}})
    peft_model = apply_method(config, model)
    assert family_of(peft_model) is entry  # through the PEFT wrapper


def test_published_shapes_build_on_the_meta_device():
    with torch.device("meta"):
        sizes = {name: sum(p.numel() for p in AutoModelForCausalLM.from_config(make()).parameters())
                 for name, make in PUBLISHED_CONFIGS.items()}
    assert sizes == {"EleutherAI/gpt-j-6b": 6_050_882_784, "EleutherAI/gpt-neox-20b": 20_554_567_680}


def test_an_unknown_family_has_no_entry():
    assert family_of(type("Config", (), {"model_type": "llama"})()) is None
