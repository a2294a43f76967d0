import pytest
import torch
from transformers import AutoModelForCausalLM

from trainer.config import Config
from trainer.errors import UserError
from trainer.optim import build_optimizer, parameter_groups, require_bitsandbytes, require_device_features


def config(**training) -> Config:
    return Config.model_validate(
        {
            "model": {"name_or_path": "m"},
            "method": training.pop("method", "full"),
            "data": {"train_file": "t.jsonl"},
            "training": training,
        }
    )


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


def test_8bit_adamw_keeps_8bit_state_on_the_cpu(tiny_model_dirs):
    """bitsandbytes itself (0.50 runs its 8-bit optimizers on the CPU): both moments are uint8."""
    import bitsandbytes as bnb

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["gptj"])
    for name, expected in (("adamw_8bit", bnb.optim.AdamW8bit), ("paged_adamw_8bit", bnb.optim.PagedAdamW8bit)):
        optimizer = build_optimizer(config(optimizer=name), model, torch.device("cpu"))
        assert type(optimizer) is expected
    big = max(model.parameters(), key=lambda p: p.numel())
    model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    optimizer.step()
    assert optimizer.state[big]["state1"].dtype == optimizer.state[big]["state2"].dtype == torch.uint8


def test_bitsandbytes_features_are_checked_before_loading(monkeypatch):
    require_device_features(config(optimizer="adamw_8bit"), torch.device("cpu"))  # installed: fine
    monkeypatch.setattr("bitsandbytes.__version__", "0.45.0")
    for settings, key in (
        ({"optimizer": "adamw_8bit"}, "training.optimizer=adamw_8bit"),
        ({"method": "qlora"}, "method=qlora"),
    ):
        with pytest.raises(UserError) as info:
            require_device_features(config(**settings), torch.device("cpu"))
        assert key in str(info.value) and "needs bitsandbytes >= 0.50" in str(info.value)


def test_bitsandbytes_is_imported_with_its_kernel_warning_filtered():
    """bitsandbytes 0.50 logs "Failed to load CPU gemm_4bit_forward ..." at import on CPUs with
    AVX512-BF16 (trainer/quantization.py): our import goes through the filter that drops it."""
    import logging

    from trainer import quantization

    assert require_bitsandbytes("method=qlora", torch.device("cpu")).__name__ == "bitsandbytes"
    assert logging.getLogger(quantization.BNB_CPU_LOGGER).filters.count(quantization._kernel_filter) == 1
