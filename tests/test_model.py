import pytest
import torch

from trainer.config import Config
from trainer.errors import UserError
from trainer.families import FAMILIES
from trainer.model import apply_method, count_parameters, load_model, load_tokenizer, resolve_dtype


def config(model_dir, **sections) -> Config:
    return Config.model_validate(
        {
            "model": {"name_or_path": str(model_dir), **sections.pop("model", {})},
            "data": {"train_file": "t.jsonl"},
            **sections,
        }
    )


@pytest.mark.parametrize("family", ["gpt2", "gptj", "gpt_neox"])
def test_lora_auto_targets_every_projection_of_the_family(tiny_model_dirs, family):
    cfg = config(tiny_model_dirs[family], method="lora", model={"dtype": "float32"})
    model = apply_method(cfg, load_model(cfg)[0])
    targets = {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in model.named_parameters() if ".lora_A" in name}
    assert targets == set(FAMILIES[family].lora_targets)
    trainable, total = count_parameters(model)
    assert 0 < trainable < total
    assert all("lora_" in name for name, p in model.named_parameters() if p.requires_grad)


def test_gradient_checkpointing_trains_the_same_gradients(tiny_model_dirs):
    plain_cfg = config(tiny_model_dirs["gptj"], method="full", model={"dtype": "float32"})
    checkpointed_cfg = config(
        tiny_model_dirs["gptj"], method="full", model={"gradient_checkpointing": True, "dtype": "float32"}
    )
    batch = torch.tensor([[5, 6, 7, 8, 9, 10]])
    grads = []
    for cfg in (plain_cfg, checkpointed_cfg):
        model, attention = load_model(cfg)
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


def test_an_unreachable_hub_fails_at_once_with_the_offline_fix(monkeypatch):
    """With the Hub unreachable, a model id not in the cache is an immediate error that says how to
    run offline (huggingface_hub would otherwise retry for about a minute)."""
    import trainer.hub

    monkeypatch.setattr(trainer.hub, "hub_reachable", lambda: False)
    assert trainer.hub.load_options("EleutherAI/gpt-j-6b") == {"local_files_only": True}
    with pytest.raises(UserError) as failed:
        load_tokenizer(config("EleutherAI/no-such-model-anywhere"))
    message = str(failed.value)
    assert (
        "cannot be reached from this machine" in message and "hf download EleutherAI/no-such-model-anywhere" in message
    )
    assert "HF_HUB_OFFLINE=1" in message


def test_the_hub_probe_answers_without_retrying(monkeypatch):
    """The probe itself: offline mode answers without a request; a failing request means unreachable."""
    import huggingface_hub.constants
    import huggingface_hub.utils

    import trainer.hub

    trainer.hub.hub_reachable.cache_clear()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert trainer.hub.hub_reachable() is False
    trainer.hub.hub_reachable.cache_clear()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    requests = []

    class Refusing:
        def head(self, url, timeout):
            requests.append((url, timeout))
            raise OSError("Name or service not known")

    monkeypatch.setattr(huggingface_hub.utils, "get_session", lambda: Refusing())
    assert trainer.hub.hub_reachable() is False
    assert requests == [(huggingface_hub.constants.ENDPOINT, trainer.hub.PROBE_SECONDS)]
    trainer.hub.hub_reachable.cache_clear()
    assert trainer.hub.load_options(".") == {}  # a local folder never asks
