import pytest
import torch
from transformers import AutoModelForCausalLM

from trainer.config import Config
from trainer.errors import UserError
from trainer.optim import build_optimizer, parameter_groups, require_device_features


def config(**training) -> Config:
    return Config.model_validate({
        "model": {"name_or_path": "m"}, "method": training.pop("method", "full"),
        "data": {"train_file": "t.jsonl"}, "training": training,
    })


def test_weight_decay_only_on_matrices(tiny_model_dirs):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["gptj"])
    decay, no_decay = parameter_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_adamw_on_cpu(tiny_model_dirs):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["gpt2"])
    optimizer = build_optimizer(config(learning_rate=0.5, weight_decay=0.01), model, torch.device("cpu"))
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.param_groups[0]["lr"] == 0.5


@pytest.mark.parametrize(
    "settings, key",
    [({"optimizer": "adamw_8bit"}, "training.optimizer=adamw_8bit"),
     ({"optimizer": "paged_adamw_8bit"}, "training.optimizer=paged_adamw_8bit"),
     ({"method": "qlora"}, "method=qlora")],
)
def test_bitsandbytes_features_need_a_gpu_and_say_so_before_loading(settings, key):
    with pytest.raises(UserError) as info:
        require_device_features(config(**settings), torch.device("cpu"))
    assert key in str(info.value) and "CUDA GPU" in str(info.value)
