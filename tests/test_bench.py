"""scripts/bench.py: the tiny-model run in-process (both rows, the JSON), the synthetic data and step
plans, the real architectures' sizes, and clean failures for GPU-only options on a CPU."""

import importlib.util
import json
import sys
from collections import Counter

import numpy as np
import pytest
import torch

from tests.helpers import REPO
from trainer.families import model_shape
from trainer.flops import training_flops

SCRIPT = REPO / "scripts" / "bench.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


bench = _load_bench()

TINY_RUN = [
    "--model",
    "tiny-gptj",
    "--warmup",
    "1",
    "--steps",
    "2",
    "--seq-len",
    "256",
    "--micro-batch-size",
    "2",
    "--accumulation",
    "2",
    "--examples",
    "300",
    "--device",
    "cpu",
]
ROW_KEYS = {
    "name",
    "attention",
    "parameters",
    "trainable_parameters",
    "adapter_parameters",
    "seconds",
    "loss_per_step",
    "peak_memory_bytes",
    "error",
    "tokens",
    "supervised_tokens",
    "micro_batches",
    "tokens_per_step",
    "supervised_tokens_per_step",
    "padded_positions",
    "padding_fraction",
    "tokens_per_second",
    "supervised_tokens_per_second",
    "model_flops",
    "model_tflops_per_second",
    "mfu",
}


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "tiny.json"
    assert bench.main([*TINY_RUN, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_json_has_both_rows_with_every_number(tiny_result):
    baseline, ours = tiny_result["rows"]
    assert (baseline["name"], ours["name"]) == ("baseline", "ours")
    for row in (baseline, ours):
        assert set(row) == ROW_KEYS and row["error"] is None
        assert row["tokens_per_second"] > 0 and row["supervised_tokens_per_second"] > 0
        assert row["mfu"] is None  # no stated peak for a CPU
        assert len(row["loss_per_step"]) == 2 and all(np.isfinite(row["loss_per_step"]))
    # transformers' default for GPT-J (sdpa since 5.25) vs ours on CPU (auto: sdpa)
    assert baseline["attention"] == "sdpa" and ours["attention"] == "sdpa"
    assert tiny_result["speedup"] == pytest.approx(ours["tokens_per_second"] / baseline["tokens_per_second"])
    assert {"date", "command", "machine", "versions", "settings", "model", "data", "flops", "peak", "memory"} <= set(
        tiny_result
    )
    assert {"python", "torch", "transformers", "peft"} <= set(tiny_result["versions"])
    assert tiny_result["command"].startswith("python scripts/bench.py --model tiny-gptj")
    assert tiny_result["machine"]["device"] == "cpu" and tiny_result["peak"] is None


def test_same_examples_in_both_rows_and_packing_pads_less(tiny_result):
    baseline, ours = tiny_result["rows"]
    assert ours["supervised_tokens_per_step"] == baseline["supervised_tokens_per_step"]
    assert ours["tokens_per_step"] == baseline["tokens_per_step"]
    assert sum(ours["supervised_tokens_per_step"]) == tiny_result["data"]["timed_supervised_tokens"]
    assert ours["padding_fraction"] < baseline["padding_fraction"]
    assert ours["micro_batches"] == 2 * 2 < baseline["micro_batches"]  # 2 steps x 2 micro-batches of packed rows


def test_flops_are_the_formula_over_the_timed_examples(tiny_result):
    baseline, ours = tiny_result["rows"]
    # LoRA r=16 on GPT-J's q, k, v, out (64 -> 64) and fc_in / fc_out (64 <-> 256), two layers:
    # 2 * (4 * 16 * (64 + 64) + 2 * 16 * (64 + 256)) A and B weights.
    assert ours["adapter_parameters"] == baseline["adapter_parameters"] == 2 * (4 * 2048 + 2 * 5120) == 36864
    steps, _ = bench.make_steps(
        examples=300, seq_len=256, vocab=1024, micro_batch_size=2, accumulation=2, steps=3, seed=0
    )
    lengths = [len(e.input_ids) for step in steps[1:] for e in step.examples]
    shape = bench.model_shape(
        bench.build_model(
            bench.ARCHITECTURES["tiny-gptj"], dtype=torch.float32, device=torch.device("cpu"), seed=0, positions=256
        ).config
    )
    expected = training_flops(lengths, shape, method="lora", adapter_params=36864)
    assert ours["model_flops"] == baseline["model_flops"] == expected
    assert sum(lengths) == ours["tokens"] == sum(ours["tokens_per_step"])


def test_synthetic_lengths_are_long_tailed_deterministic_and_prompt_masked():
    examples = bench.synthetic_examples(2000, seq_len=2048, vocab=50400, seed=0)
    lengths = np.array([len(e.input_ids) for e in examples])
    assert lengths.min() >= 64 and lengths.max() <= 2048
    assert 220 <= np.median(lengths) <= 290  # median seq_len / 8 = 256
    assert lengths.mean() > 1.3 * np.median(lengths)  # a long tail pulls the mean up
    assert (lengths == 2048).sum() > 0
    supervised = sum(e.supervised_tokens for e in examples) / lengths.sum()
    assert 0.65 < supervised < 0.75  # ~30% of each example is the masked prompt
    assert all(e.labels[0] == -100 and e.labels[-1] == e.input_ids[-1] for e in examples)
    again = bench.synthetic_examples(2000, seq_len=2048, vocab=50400, seed=0)
    assert [e.input_ids for e in again] == [e.input_ids for e in examples]
    other = bench.synthetic_examples(2000, seq_len=2048, vocab=50400, seed=1)
    assert [e.input_ids for e in other] != [e.input_ids for e in examples]


def test_each_step_gives_both_rows_the_same_examples():
    steps, facts = bench.make_steps(
        examples=400, seq_len=256, vocab=1024, micro_batch_size=3, accumulation=2, steps=4, seed=0
    )
    assert len(steps) == 4 and facts["examples_drawn"] == 400
    seen = []
    for step in steps:
        packed = [e for rows in step.packed for row in rows for e in row.examples]
        assert Counter(id(e) for e in packed) == Counter(id(e) for e in step.examples)
        assert len(step.packed) == 2 and all(len(rows) == 3 for rows in step.packed)
        assert all(len(row) <= 256 for rows in step.packed for row in rows)
        assert all(len(micro) <= 3 for micro in step.padded)
        real, grid = bench.padding(step.packed)
        assert real == step.tokens and grid >= real
        seen += [id(e) for e in step.examples]
    assert len(seen) == len(set(seen))  # no example trained twice


def test_real_architectures_have_the_published_sizes():
    sizes = {}
    for name in ("gptj-6b", "neox-20b"):
        arch = bench.ARCHITECTURES[name]
        with torch.device("meta"):  # no memory: shapes only
            model = bench.build_model(arch, dtype=torch.bfloat16, device=torch.device("meta"), seed=0, positions=2048)
        sizes[name] = (sum(p.numel() for p in model.parameters()), model_shape(model.config))
    assert sizes["gptj-6b"][0] == 6_050_882_784  # EleutherAI/gpt-j-6b in transformers
    assert sizes["neox-20b"][0] == 20_554_567_680  # EleutherAI/gpt-neox-20b
    assert (sizes["gptj-6b"][1].d_model, sizes["gptj-6b"][1].n_layer, sizes["gptj-6b"][1].vocab) == (4096, 28, 50400)
    assert sizes["neox-20b"][1] == bench.model_shape(bench.neox_20b_config()) and sizes["neox-20b"][1].d_ff == 24576


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--model", "gptj-6b", "--method", "lora", "--seq-len", "2048"], "--model gptj-6b needs a CUDA GPU"),
        (["--model", "neox-20b", "--method", "qlora"], "--model neox-20b needs a CUDA GPU"),
        (["--model", "tiny-gptj", "--optimizer", "adamw_8bit"], "is for full fine-tuning"),
        (["--model", "tiny-gptj", "--seq-len", "4096"], "--seq-len 4096: tiny-gptj takes 32 to 2048 tokens"),
    ],
)
def test_impossible_runs_fail_with_one_clear_message(options, message, capsys):
    assert bench.main([*options, "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_qlora_replaces_every_linear_but_the_head_with_real_4bit_layers():
    """With bitsandbytes itself (its 4-bit layers run on the CPU from 0.50): every projection becomes
    a Linear4bit holding NF4 weights close to the originals; the head stays a plain Linear."""
    from types import SimpleNamespace

    import bitsandbytes as bnb

    from trainer.quantization import quantize_to_4bit

    model = bench.build_model(
        bench.ARCHITECTURES["tiny-neox"], dtype=torch.float32, device=torch.device("cpu"), seed=0, positions=64
    )
    before = {
        name: (m.weight.detach().clone(), m.bias) for name, m in model.named_modules() if type(m) is torch.nn.Linear
    }
    options = SimpleNamespace(
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_quant_storage=torch.uint8,
    )
    quantize_to_4bit(model, options, torch.device("cpu"))
    assert model.is_loaded_in_4bit is True
    head = model.get_output_embeddings()
    assert type(head) is torch.nn.Linear  # the head stays in 16/32 bits, as transformers keeps it
    head_name = next(name for name, m in model.named_modules() if m is head)
    replaced = {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert set(replaced) == set(before) - {head_name} and len(replaced) == 2 * 4  # 4 projections x 2 layers
    for name, module in replaced.items():
        weight, bias = before[name]
        assert module.weight.quant_state.quant_type == "nf4" and module.weight.dtype == torch.uint8
        restored = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
        assert restored.shape == weight.shape
        assert (restored - weight).abs().max() <= 0.2 * weight.abs().max()  # 4 bits: close, not equal
        assert torch.equal(module.bias, bias) and not module.bias.requires_grad
        assert module.compute_dtype == torch.bfloat16


def test_a_row_that_runs_out_of_memory_is_reported_not_raised(monkeypatch, tiny_result):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(bench, "_train", out_of_memory)
    steps, _ = bench.make_steps(
        examples=300, seq_len=256, vocab=1024, micro_batch_size=2, accumulation=2, steps=3, seed=0
    )
    settings = bench.Settings(
        bench.ARCHITECTURES["tiny-gptj"], None, torch.device("cpu"), torch.float32, None, "auto", False, 0, 1, 256
    )
    row = bench.run_row("baseline", settings, steps)
    assert row == {"name": "baseline", "error": "out of memory (CUDA out of memory. Tried to allocate 20.00 GiB)"}
    bench.describe_rows([row], steps[1:], shape=None, method="lora", peak=None)
    assert row["tokens_per_second"] is None and row["padding_fraction"] > 0
    table = bench.format_table({**tiny_result, "rows": [row, tiny_result["rows"][1]], "speedup": None})
    assert "baseline  -" in table and "out of memory (CUDA out of memory" in table and "ours / baseline" not in table
