import pytest
import torch

from trainer.config import Config
from trainer.errors import UserError
from trainer.model import LORA_TARGETS_BY_FAMILY, apply_method, count_parameters, load_model, load_tokenizer, resolve_dtype


def config(model_dir, **sections) -> Config:
    return Config.model_validate({"model": {"name_or_path": str(model_dir), **sections.pop("model", {})},
                                  "data": {"train_file": "t.jsonl"}, **sections})


@pytest.mark.parametrize("family", ["gpt2", "gptj", "gpt_neox"])
def test_lora_auto_targets_every_projection_of_the_family(tiny_model_dirs, family):
    cfg = config(tiny_model_dirs[family], method="lora")
    model = apply_method(cfg, load_model(cfg, torch.float32)[0])
    targets = {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in model.named_parameters() if ".lora_A" in name}
    assert targets == set(LORA_TARGETS_BY_FAMILY[family])
    trainable, total = count_parameters(model)
    assert 0 < trainable < total
    assert all("lora_" in name for name, p in model.named_parameters() if p.requires_grad)


def test_gradient_checkpointing_trains_the_same_gradients(tiny_model_dirs):
    plain_cfg = config(tiny_model_dirs["gptj"], method="full")
    checkpointed_cfg = config(tiny_model_dirs["gptj"], method="full", model={"gradient_checkpointing": True})
    batch = torch.tensor([[5, 6, 7, 8, 9, 10]])
    grads = []
    for cfg in (plain_cfg, checkpointed_cfg):
        model, attention = load_model(cfg, torch.float32)
        assert attention == "sdpa"  # auto on CPU
        model.train()
        assert model.is_gradient_checkpointing == cfg.model.gradient_checkpointing
        model(input_ids=batch, labels=batch).loss.backward()
        grads.append(model.transformer.h[0].attn.q_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_missing_model_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="model.name_or_path"):
        load_tokenizer(config(tmp_path / "nothing-here"))


def test_auto_dtype_is_float32_on_cpu():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
