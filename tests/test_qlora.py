"""QLoRA alternating training with evaluation and test prompts, on any CPU: bitsandbytes 0.50
repacks 4-bit weights for CPU inference in every no-grad eval-mode forward on CPUs with
AVX512-BF16, and training cannot continue on them (trainer/quantization.py). The tests force
bitsandbytes' own capability check on, so CPUs without AVX512-BF16 take that path too; and
bitsandbytes' import-time kernel warning stays out of our commands' output."""

import logging
import sys

import pytest
import torch

from tests.helpers import (
    TEST_PROMPTS,
    checkpoint_folders,
    fruit_rows,
    read_jsonl,
    run_command,
    run_forked,
    write_config,
)
from trainer import quantization
from trainer.config import Config
from trainer.errors import UserError
from trainer.model import apply_method, load_model
from trainer.train import main


@pytest.fixture
def avx512_bf16(monkeypatch):
    """Every Linear4bit built from now on believes the CPU has AVX512-BF16, as bitsandbytes decides
    it (`has_avx512bf16()`, read in Linear4bit.__init__), so it repacks on any CPU."""
    monkeypatch.setattr("bitsandbytes.nn.modules.has_avx512bf16", lambda: True)


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    """A tiny GPT-NeoX 64 wide: the conftest models (32 wide) are narrower than one 64-value
    quantization block and fail inside the repacking itself; this one repacks as real models do."""
    from trainer.tiny_models import save_tiny_model

    texts = [row["prompt"] + row["completion"] for row in fruit_rows()]
    return save_tiny_model(
        tmp_path_factory.mktemp("wide") / "gpt_neox",
        "gpt_neox",
        texts,
        vocab_size=320,
        n_layer=2,
        n_embd=64,
        n_head=2,
        n_positions=64,
    )


def linear4bit_layers(model):
    import bitsandbytes

    return [m for m in model.modules() if isinstance(m, bitsandbytes.nn.Linear4bit)]


def lora_gradients(model, batch) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(input_ids=batch, labels=batch).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def test_evaluation_and_generation_leave_the_4bit_weights_as_training_needs_them(wide_model, avx512_bf16):
    """Train, then evaluate and generate without gradients, then train again: no layer is repacked,
    the 4-bit weights and their scales are bit for bit the same, and the same batch gets exactly the
    same gradients as before (a repacked layer's forward has no autograd: the gradient through the
    base weight would be lost, or the step fails)."""
    cfg = Config.model_validate(
        {
            "model": {"name_or_path": str(wide_model), "dtype": "float32"},
            "method": "qlora",
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "data": {"train_file": "t.jsonl"},
        }
    )
    model = apply_method(cfg, load_model(cfg)[0])
    layers = linear4bit_layers(model)
    assert len(layers) == 8  # 2 blocks x (query_key_value, dense, dense_h_to_4h, dense_4h_to_h)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)  # not the zero init: every adapter gets a gradient, through every base layer
    before = [(layer.weight.data.clone(), layer.weight.quant_state.absmax.clone()) for layer in layers]
    batch = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    model.train()
    expected = lora_gradients(model, batch)

    model.eval()
    with torch.no_grad():
        model(input_ids=batch)  # evaluation
        model.generate(input_ids=batch[:, :3], max_new_tokens=4, do_sample=False, pad_token_id=0)  # test prompts
    model.train()
    assert [getattr(layer.weight.quant_state, "packing_format_for_cpu", False) for layer in layers] == [False] * 8
    for layer, (data, absmax) in zip(layers, before):
        assert torch.equal(layer.weight.data, data) and torch.equal(layer.weight.quant_state.absmax, absmax)
    after = lora_gradients(model, batch)
    assert after.keys() == expected.keys() and len(after) == 16
    for name in expected:
        assert torch.equal(after[name], expected[name]), name


def test_a_bitsandbytes_without_the_repacking_flag_is_refused_on_the_cpu_with_its_version(monkeypatch):
    import bitsandbytes

    layer = bitsandbytes.nn.Linear4bit(64, 64)
    model = torch.nn.Sequential(layer, torch.nn.Linear(64, 64))
    assert quantization.keep_4bit_training_layout(model, torch.device("cpu")) == 1
    assert layer.support_avx512bf16_for_cpu is False
    del layer.support_avx512bf16_for_cpu  # a release that decides to repack some other way
    monkeypatch.setattr(bitsandbytes, "__version__", "0.51.0")
    with pytest.raises(UserError) as error:
        quantization.keep_4bit_training_layout(model, torch.device("cpu"))
    message = str(error.value)
    assert message.startswith("QLoRA on the CPU: bitsandbytes 0.51.0 changed how its 4-bit layers decide to repack")
    assert message.endswith(
        "Fix: pip install 'bitsandbytes>=0.50,<0.51' (the versions this trainer is tested with), or run QLoRA on a GPU"
    )
    assert quantization.keep_4bit_training_layout(model, torch.device("cuda")) == 0  # GPUs never repack


def assert_checkpoints_evaluated_and_sampled(run, steps: list[int]) -> None:
    """Every checkpoint step has its eval loss and its test prompts' samples, every training step
    ran once, and training after the first evaluation still lowered the eval loss."""
    assert [p.name for p in checkpoint_folders(run)] == [f"checkpoint-{step}" for step in steps]
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["step"] for m in metrics if "loss" in m] == list(range(1, steps[-1] + 1))
    evaluations = [m for m in metrics if "eval_loss" in m]
    assert [m["step"] for m in evaluations] == steps
    assert evaluations[-1]["eval_loss"] < evaluations[0]["eval_loss"], evaluations
    for checkpoint in checkpoint_folders(run):
        samples = read_jsonl(checkpoint / "samples.jsonl")
        assert [s["prompt"] for s in samples] == [p["prompt"] for p in TEST_PROMPTS], checkpoint.name


@pytest.mark.parametrize("processes", [1, 2])
def test_qlora_runs_through_checkpoints_with_eval_loss_and_test_prompts(
    tmp_path, wide_model, avx512_bf16, monkeypatch, capfd, processes
):
    """48 examples, 8 a micro-batch per process, 2 epochs, 3 checkpoints: 12 steps (checkpoints at
    4, 8, 12) in one process, 6 (at 2, 4, 6) in two (gloo, forked as torchrun starts them). The
    kernel notice is printed once, by the main process only."""
    monkeypatch.setattr(quantization._kernel_filter, "dropped", True)  # as when bitsandbytes warned at import
    config = write_config(tmp_path, wide_model, "qlora", training={"epochs": 2})
    if processes == 1:
        assert main([str(config)]) == 0
    else:
        assert run_forked([str(config)], processes=2) == [0, 0]
    assert capfd.readouterr().out.count(quantization.KERNEL_NOTICE) == 1
    assert_checkpoints_evaluated_and_sampled(tmp_path / "run", [4, 8, 12] if processes == 1 else [2, 4, 6])


BNB_WARNING = (
    "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
    "`pip install kernels` and the kernels >= 0.11.1"
)  # bitsandbytes 0.50.2, backends/cpu/ops.py
KERNELS_OFFLINE = (
    "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' because Hugging "
    "Face Hub is in offline mode."
)  # kernels 0.19.1, _internals/hf_hub.py, with HF_HUB_OFFLINE=1


def test_the_kernel_warning_alone_is_filtered_and_remembered(monkeypatch, caplog):
    monkeypatch.setattr(quantization._kernel_filter, "dropped", False)
    quantization.quiet_bitsandbytes_import()
    quantization.quiet_bitsandbytes_import()  # once is enough; again adds nothing
    logger = logging.getLogger(quantization.BNB_CPU_LOGGER)
    assert logger.filters.count(quantization._kernel_filter) == 1
    assert quantization.kernel_notice() is None
    kernels_logger = logging.getLogger(quantization.KERNELS_HUB_LOGGER)
    with caplog.at_level(logging.WARNING):
        kernels_logger.warning(KERNELS_OFFLINE)
        logger.warning(BNB_WARNING, "Kernel repository could not verify publisher trust status")
        logger.warning("another bitsandbytes warning")
        kernels_logger.warning(
            "Skipping publisher trust check for 'someone/else' because Hugging Face Hub is in offline mode."
        )
    assert [record.getMessage() for record in caplog.records] == [
        "another bitsandbytes warning",
        "Skipping publisher trust check for 'someone/else' because Hugging Face Hub is in offline mode.",
    ]
    assert quantization.kernel_notice() == quantization.KERNEL_NOTICE


def test_the_planner_imports_bitsandbytes_without_its_kernel_warning(tmp_path, tiny_model_dirs):
    """scripts/plan.py adds LoRA with peft, which imports bitsandbytes: on CPUs with AVX512-BF16 and
    no Hub kernel that import logs "Failed to load CPU gemm_4bit_forward ..." unless filtered."""
    config = write_config(tmp_path, tiny_model_dirs["gpt_neox"], "qlora")
    result = run_command([sys.executable, "scripts/plan.py", str(config), "--gpus", "1", "--gpu-memory", "80GB"])
    assert result.returncode == 0, result.stderr
    assert "fits: about" in result.stdout
    assert "gemm_4bit_forward" not in result.stdout + result.stderr
    assert "kernels-community" not in result.stdout + result.stderr
