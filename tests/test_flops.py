"""trainer/flops.py: exact FLOP counts on a small config worked out by hand, and the formulas
checked against the real module shapes of the tiny models."""

import pytest
import torch
from transformers import GPT2Config, GPTJConfig, GPTNeoXConfig
from transformers.pytorch_utils import Conv1D

from trainer.families import model_shape
from trainer.flops import (
    ModelShape,
    attention_flops,
    dense_flops_per_token,
    gpu_peak,
    matmul_params,
    mfu,
    training_flops,
)

# 2 layers of width 8, MLP 32, vocabulary 10. Per layer: q, k, v, out = 4 * 8 * 8 = 256 and the MLP
# 2 * 8 * 32 = 512, so 768; two layers 1536; head 8 * 10 = 80: N = 1616.
HAND = ModelShape(n_layer=2, d_model=8, d_ff=32, vocab=10)


def test_matmul_parameters_by_hand():
    assert matmul_params(HAND) == 1616


def test_dense_flops_per_token_full_is_6n_and_lora_is_4n_plus_6_adapter():
    assert dense_flops_per_token(frozen=0, trained=1616) == 9696  # 6 * 1616
    # LoRA: 2 forward + 2 activation-gradient FLOPs per weight, + 2 weight-gradient per adapter weight.
    assert dense_flops_per_token(frozen=1616, trained=100) == 7064  # 4 * 1616 + 6 * 100
    assert dense_flops_per_token(frozen=1616, trained=0) == 6464  # 4N exactly, adapters not counted


def test_attention_flops_use_each_examples_own_length():
    # 6 * n_layer * d * L^2 per example: 6 * 2 * 8 * (3^2 + 5^2) = 96 * 34.
    assert attention_flops([3, 5], n_layer=2, d_model=8) == 3264
    # The same 8 tokens as one 8-token sequence would cost 96 * 64: packing must not be charged that.
    assert attention_flops([8], n_layer=2, d_model=8) == 6144


def test_training_flops_per_method():
    assert training_flops([3, 5], HAND, method="full") == 8 * 9696 + 3264 == 80832
    assert training_flops([3, 5], HAND, method="lora", adapter_params=100) == 8 * 7064 + 3264 == 59776
    assert training_flops([3, 5], HAND, method="qlora", adapter_params=100) == 59776  # same multiplies as LoRA
    assert training_flops([3, 5], HAND, method="full", adapter_params=100) == 80832  # adapters only for LoRA
    with pytest.raises(ValueError, match="unknown method"):
        training_flops([3], HAND, method="prefix")


def test_mfu():
    assert mfu(494.5e12, 1.0, 989.0) == pytest.approx(0.5, rel=1e-12)
    assert mfu(80832, 2e-9, 40.416) == pytest.approx(1.0, rel=1e-12)  # 80832 / 2e-9 = 40.416 TFLOP/s
    with pytest.raises(ValueError):
        mfu(1.0, 0.0, 989.0)


def test_published_model_sizes():
    gptj_6b = ModelShape(n_layer=28, d_model=4096, d_ff=16384, vocab=50400)
    neox_20b = ModelShape(n_layer=44, d_model=6144, d_ff=24576, vocab=50432)
    assert matmul_params(gptj_6b) == 5_843_582_976  # 28 * 201,326,592 + 206,438,400
    assert matmul_params(neox_20b) == 20_241_186_816  # 44 * 452,984,832 + 309,854,208
    # GPT-J-6B LoRA at 2048 tokens, one example filling the row, no adapters: per token 4N + 6 * 28 * 4096 * 2048.
    assert training_flops([2048], gptj_6b, method="lora") == 2048 * (4 * 5_843_582_976 + 6 * 28 * 4096 * 2048)


def test_model_shape_reads_each_family_config():
    assert model_shape(GPTJConfig(n_embd=8, n_layer=2, n_head=2, vocab_size=10)) == HAND  # n_inner None: 4 * d
    assert model_shape(GPT2Config(n_embd=8, n_layer=3, n_head=2, n_inner=20, vocab_size=11)) == ModelShape(3, 8, 20, 11)
    neox = GPTNeoXConfig(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24, vocab_size=12)
    assert model_shape(neox) == ModelShape(2, 8, 24, 12)
    with pytest.raises(ValueError, match="no FLOP formula"):
        model_shape(type("Config", (), {"model_type": "llama"})())


class _Vocab:
    bos_token_id = eos_token_id = pad_token_id = 0

    def __len__(self):
        return 50


@pytest.mark.parametrize("family", ["gpt2", "gptj", "gpt_neox"])
def test_matmul_parameters_equal_the_models_matrix_weights(family):
    from trainer.tiny_models import build_tiny_model

    model = build_tiny_model(family, _Vocab(), n_layer=2, n_embd=16, n_head=2, n_positions=32)
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Linear, Conv1D)))
    assert matmul_params(model_shape(model.config)) == weights == 2 * (4 * 256 + 2 * 16 * 64) + 16 * 50


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA H100 NVL", None),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_gpu_peaks(name, tflops):
    peak = gpu_peak(name)
    assert (peak.tflops if peak else None) == tflops
