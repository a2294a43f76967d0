"""trainer/strategy.py directly, in one process: what `Replicated` and `Sharded` give the recipe.

(`resolve_strategy` is tested in tests/test_resolve.py, `check_fsdp_config` in tests/test_fsdp.py;
whole runs under each strategy in tests/test_distributed.py and tests/test_fsdp.py.)"""

import pytest
import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM

from trainer.config import Config
from trainer.strategy import Replicated, Sharded, make_strategy


def config(tmp_path, model_dir, **distributed) -> Config:
    return Config.model_validate(
        {
            "model": {"name_or_path": str(model_dir), "dtype": "float32", "attention": "eager"},
            "method": "full",
            "data": {"train_file": str(tmp_path / "train.jsonl")},
            "distributed": distributed,
            "output_dir": str(tmp_path / "run"),
        }
    )


def pretrained_state(model_dir) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()


def assert_same_tensors(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(actual[name].cpu(), tensor), name


def test_make_strategy_follows_distributed_strategy(tmp_path, tiny_model_dirs):
    accelerator = Accelerator(cpu=True)
    model_dir = tiny_model_dirs["gpt2"]
    assert type(make_strategy(accelerator, config(tmp_path, model_dir))) is Replicated  # auto, one process
    assert type(make_strategy(accelerator, config(tmp_path, model_dir, strategy="ddp"))) is Replicated
    assert type(make_strategy(accelerator, config(tmp_path, model_dir, strategy="fsdp"))) is Sharded


def test_replicated_unwraps_to_the_model_and_its_full_state_dict_is_the_models(tmp_path, tiny_model_dirs):
    model_dir = tiny_model_dirs["gpt_neox"]
    strategy = Replicated(Accelerator(cpu=True), config(tmp_path, model_dir))
    model = strategy.build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    prepared, _ = strategy.prepare(model, optimizer)
    assert strategy.unwrap(prepared) is model
    full = strategy.full_state_dict(prepared)
    assert_same_tensors(full, model.state_dict())
    assert_same_tensors(full, pretrained_state(model_dir))  # full fine-tuning: the weights as loaded


def test_replicated_clip_grad_norm_returns_the_norm_before_clipping(tmp_path, tiny_model_dirs):
    strategy = Replicated(Accelerator(cpu=True), config(tmp_path, tiny_model_dirs["gpt2"]))
    model = torch.nn.Linear(2, 2, bias=False)
    model.weight.grad = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    assert strategy.clip_grad_norm(model, 1.0) == pytest.approx(5.0)
    torch.testing.assert_close(model.weight.grad, torch.tensor([[0.6, 0.0], [0.0, 0.8]]), rtol=1e-5, atol=1e-6)


def test_sharded_in_one_process_holds_every_parameter_and_gathers_the_full_state_dict(tmp_path, tiny_model_dirs):
    model_dir = tiny_model_dirs["gpt2"]
    strategy = Sharded(Accelerator(cpu=True), config(tmp_path, model_dir, strategy="fsdp"))
    assert not torch.distributed.is_initialized()
    try:
        model = strategy.build_model()  # makes its own process group of one
        assert torch.distributed.is_initialized() and torch.distributed.get_world_size() == 1
        assert strategy.unwrap(model) is model
        full = strategy.full_state_dict(model)
        assert_same_tensors(full, pretrained_state(model_dir))  # every shard gathered, tied head included
        total = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())
        assert strategy.held_parameters(model) == total  # a single shard is the whole model
        assert strategy.prepare(model, "optimizer") == (model, "optimizer")  # FSDP2 shards in place
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
