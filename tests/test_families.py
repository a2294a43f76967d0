"""Every family entry matches the transformers models it describes (tiny models built locally)."""

import re

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from tests.helpers import REPO
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
    config = Config.model_validate(
        {"model": {"name_or_path": str(tiny_model_dirs[family])}, "data": {"train_file": "t"}}
    )
    peft_model = apply_method(config, model)
    assert family_of(peft_model) is entry  # through the PEFT wrapper


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_entry_names_its_activation_model_which_matches_the_flop_shape(tiny_model_dirs, family):
    from trainer.activations import ActivationModel, activation_model_of

    entry = FAMILIES[family]
    config = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[family]).config
    assert isinstance(entry.activation_model, ActivationModel) and activation_model_of(config) is entry.activation_model
    sizes, shape = entry.activation_model.sizes(config), model_shape(config)
    assert (sizes.layers, sizes.width, sizes.mlp_width, sizes.heads) == (
        shape.n_layer,
        shape.d_model,
        shape.d_ff,
        config.num_attention_heads,
    )


def test_the_activation_model_refuses_a_family_without_one():
    from trainer.activations import ActivationSetup, estimate_activations

    config = type("Config", (), {"model_type": "llama"})()
    setup = ActivationSetup(
        model_config=config,
        micro_batch_size=1,
        seq_len=8,
        supervised_rows=7,
        weight_dtype=torch.bfloat16,
        other_dtype=torch.bfloat16,
        autocast=None,
        full=True,
    )
    known = ", ".join(FAMILIES)
    message = f"no activation model for model_type 'llama'; families with one: {known}"
    with pytest.raises(ValueError, match=re.escape(message)):
        estimate_activations(setup)


def test_importing_the_families_imports_neither_torch_nor_transformers():
    import subprocess
    import sys

    heavy = ("torch", "transformers", "trainer.activations")
    code = f"import sys, trainer.families; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout == "[]\n"


def test_published_shapes_build_on_the_meta_device():
    with torch.device("meta"):
        sizes = {
            name: sum(p.numel() for p in AutoModelForCausalLM.from_config(make()).parameters())
            for name, make in PUBLISHED_CONFIGS.items()
        }
    assert sizes == {"EleutherAI/gpt-j-6b": 6_050_882_784, "EleutherAI/gpt-neox-20b": 20_554_567_680}


def test_an_unknown_family_has_no_entry():
    assert family_of(type("Config", (), {"model_type": "llama"})()) is None
