import torch

from trainer.config import Config
from trainer.model import load_model_config
from trainer.resolve import resolve_config


def test_every_auto_is_resolved_before_anything_loads(tmp_path, tiny_model_dirs):
    train = tmp_path / "train.jsonl"
    train.write_text('{"prompt": "a", "completion": " b"}\n')
    config = Config.model_validate(
        {"model": {"name_or_path": str(tiny_model_dirs["gptj"])}, "data": {"train_file": str(train)}}
    )
    resolve_config(config, device=torch.device("cpu"), model_config=load_model_config(config))
    assert config.training.epochs == 4.0  # under 10 MB
    assert config.model.dtype == "float32" and config.training.mixed_precision == "no"
    assert config.model.attention == "sdpa"
    assert config.lora.target_modules == ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"]
    dumped = config.model_dump(mode="json")
    assert "auto" not in (dumped["training"]["epochs"], dumped["model"]["dtype"], dumped["model"]["attention"])


def test_qlora_without_autocast_never_gets_a_flash_kernel(tmp_path, tiny_model_dirs):
    """k-bit preparation casts QLoRA's residual stream to float32: `auto` must not pick varlen, and
    an explicit varlen is refused before anything loads (checked as if on a GPU)."""
    import pytest

    from trainer.errors import UserError

    train = tmp_path / "train.jsonl"
    train.write_text('{"prompt": "a", "completion": " b"}\n')

    def resolved(**training):
        config = Config.model_validate(
            {
                "model": {"name_or_path": str(tiny_model_dirs["gptj"]), "dtype": "bfloat16"},
                "method": "qlora",
                "data": {"train_file": str(train)},
                "training": training,
            }
        )
        return resolve_config(config, device=torch.device("cuda"), model_config=load_model_config(config))

    assert resolved(mixed_precision="bf16").model.attention == "varlen"  # head 16, bf16 under autocast
    assert resolved(mixed_precision="no").model.attention == "sdpa"
    config = Config.model_validate(
        {
            "model": {"name_or_path": str(tiny_model_dirs["gptj"]), "dtype": "bfloat16", "attention": "varlen"},
            "method": "qlora",
            "data": {"train_file": str(train)},
            "training": {"mixed_precision": "no"},
        }
    )
    with pytest.raises(UserError, match="flash kernels take bfloat16 or float16 inputs"):
        resolve_config(config, device=torch.device("cuda"), model_config=load_model_config(config))
