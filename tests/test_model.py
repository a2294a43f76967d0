import pytest
import torch

from trainer.config import Config
from trainer.errors import UserError
from trainer.families import FAMILIES
from trainer.model import apply_method, count_parameters, load_model, load_tokenizer


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


def _without_weights(model_dir, tmp_path):
    """The tiny model's folder without its weights file: config.json and the tokenizer only."""
    import shutil

    folder = tmp_path / "no-weights"
    shutil.copytree(model_dir, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return folder


def test_random_weights_builds_the_configured_model_without_reading_weights(tiny_model_dirs, tmp_path):
    folder = _without_weights(tiny_model_dirs["gptj"], tmp_path)
    cfg = config(folder, method="lora", model={"dtype": "bfloat16", "attention": "eager"})
    with pytest.raises(UserError, match="could not load the model from model.name_or_path"):
        load_model(cfg)  # the checkpoint's weights are not there
    model, attention = load_model(cfg, random_weights=True)
    assert attention == "eager" and model.config._attn_implementation == "eager"
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # the frozen base in model.dtype
    assert model.config.use_cache is False and model.transformer.h[0].attn.q_proj.weight.device.type == "cpu"
    full = config(folder, method="full", model={"dtype": "bfloat16"})
    assert {p.dtype for p in load_model(full, random_weights=True)[0].parameters()} == {torch.float32}  # master weights


def test_random_weights_take_the_model_config_given(tiny_model_dirs, tmp_path):
    """The doctor passes a published configuration where config.json is not here either."""
    from transformers import AutoConfig

    shape = AutoConfig.from_pretrained(tiny_model_dirs["gpt_neox"])
    cfg = config(tmp_path / "nothing-here", method="full", model={"dtype": "float32"})
    model, _ = load_model(cfg, random_weights=True, model_config=shape)
    assert type(model).__name__ == "GPTNeoXForCausalLM" and model.config.hidden_size == shape.hidden_size


def test_random_weights_make_qlora_layers_4_bit(tiny_model_dirs, tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    folder = _without_weights(tiny_model_dirs["gpt_neox"], tmp_path)
    cfg = config(folder, method="qlora", model={"dtype": "bfloat16"})
    model, _ = load_model(cfg, random_weights=True)
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 4  # 4 projections x 2 layers; the head stays unquantized
    assert model.is_loaded_in_4bit is True and {m.compute_dtype for m in quantized} == {torch.bfloat16}


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


def test_a_typo_in_a_local_path_says_the_folder_is_not_there(tmp_path, monkeypatch):
    """`examples/nope` beside a folder `examples/` could be a Hub id, so it is looked up as one; when
    that fails, the message first says there is no such folder here, and what `examples/` holds."""
    import trainer.hub

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(trainer.hub, "hub_reachable", lambda: False)
    (tmp_path / "examples" / "tiny-gpt2").mkdir(parents=True)
    with pytest.raises(UserError) as failed:
        load_tokenizer(config("examples/nope"))
    assert (
        "could not load the tokenizer of model.name_or_path='examples/nope': there is no folder examples/nope here "
        "(examples/ holds tiny-gpt2); as a Hugging Face id: the Hub"
    ) in str(failed.value)
    assert trainer.hub.local_folder_hint("EleutherAI/gpt-j-6b") == ""  # no folder EleutherAI/ here
