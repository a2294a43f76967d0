import torch

from trainer.config import Config
from trainer.model import load_model_config
from trainer.resolve import resolve_config, resolve_strategy


def test_every_auto_is_resolved_before_anything_loads(tmp_path, tiny_model_dirs):
    train = tmp_path / "train.jsonl"
    train.write_text('{"prompt": "a", "completion": " b"}\n')
    config = Config.model_validate(
        {"model": {"name_or_path": str(tiny_model_dirs["gptj"])}, "data": {"train_file": str(train)}}
    )
    resolve_config(config, device=torch.device("cpu"), model_config=load_model_config(config), num_processes=1)
    assert config.training.epochs == 4.0  # under 10 MB
    assert config.model.dtype == "float32" and config.training.mixed_precision == "no"
    assert config.model.attention == "sdpa"
    assert config.lora.target_modules == ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"]
    assert config.distributed.strategy == "ddp"
    dumped = config.model_dump(mode="json")
    assert "auto" not in (dumped["training"]["epochs"], dumped["model"]["dtype"], dumped["model"]["attention"])
    assert dumped["distributed"]["strategy"] == "ddp"  # saved resolved, with the run


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
        return resolve_config(
            config, device=torch.device("cuda"), model_config=load_model_config(config), num_processes=1
        )

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
        resolve_config(config, device=torch.device("cuda"), model_config=load_model_config(config), num_processes=1)


def _strategy_config(method="full", strategy=None) -> Config:
    distributed = {"strategy": strategy} if strategy else {}
    return Config.model_validate(
        {
            "model": {"name_or_path": "m"},
            "method": method,
            "data": {"train_file": "t.jsonl"},
            "distributed": distributed,
        }
    )


def test_auto_strategy_shards_full_fine_tuning_on_several_processes():
    assert resolve_strategy(_strategy_config("full"), 1) == "ddp"
    assert resolve_strategy(_strategy_config("full"), 2) == "fsdp"
    assert resolve_strategy(_strategy_config("lora"), 2) == "ddp"
    assert resolve_strategy(_strategy_config("qlora"), 8) == "ddp"


def test_an_explicit_strategy_is_kept_whatever_the_processes():
    assert resolve_strategy(_strategy_config("full", "ddp"), 8) == "ddp"
    assert resolve_strategy(_strategy_config("lora", "fsdp"), 1) == "fsdp"


def test_resolve_config_writes_the_strategy_for_its_processes(tmp_path, tiny_model_dirs):
    train = tmp_path / "train.jsonl"
    train.write_text('{"prompt": "a", "completion": " b"}\n')

    def resolved(processes: int, **distributed) -> str:
        config = Config.model_validate(
            {
                "model": {"name_or_path": str(tiny_model_dirs["gpt2"])},
                "method": "full",
                "data": {"train_file": str(train)},
                "distributed": distributed,
            }
        )
        model_config = load_model_config(config)
        return resolve_config(
            config, device=torch.device("cpu"), model_config=model_config, num_processes=processes
        ).distributed.strategy

    assert (resolved(1), resolved(2)) == ("ddp", "fsdp")
    assert resolved(2, strategy="ddp") == "ddp"


def test_a_launcher_forced_fsdp_wins_over_auto(tmp_path, tiny_model_dirs):
    """`accelerate launch` with an FSDP config sets the strategy before resolution (honour_launcher)."""
    from trainer.distributed import honour_launcher

    train = tmp_path / "train.jsonl"
    train.write_text('{"prompt": "a", "completion": " b"}\n')
    config = Config.model_validate(
        {"model": {"name_or_path": str(tiny_model_dirs["gpt2"])}, "method": "lora", "data": {"train_file": str(train)}}
    )
    honour_launcher(config, {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"})
    resolve_config(config, device=torch.device("cpu"), model_config=load_model_config(config), num_processes=1)
    assert config.distributed.strategy == "fsdp"
