"""The planner (trainer/plan.py, trainer/activations.py, scripts/plan.py).

* Weights, gradients and optimizer state equal the bytes of real tiny models prepared as a run
  prepares them, after one step of the real optimizer (LoRA over bf16, full, 8-bit AdamW, QLoRA).
* FSDP and DDP terms follow from the real module structure.
* Activations: what autograd keeps after the forward pass is modelled exactly, and the estimated
  peak is within 25% of the peak measured on mid-gptj (CPU), LoRA and full, with and without
  gradient checkpointing.
* The command line: the JSON's fields, suggestions for a run that does not fit, clean errors.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import pytest
import torch
import yaml

from tests.helpers import REPO, run_command

FIELDS = {"weights", "gradients", "optimizer", "activations", "total"}


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


plan_cli = _load("plan")
plan_check = _load("plan_check")


def _config(model_dir, method="lora", dtype="bfloat16", optimizer="adamw", **sections):
    from trainer.config import Config

    tree = {
        "model": {"name_or_path": str(model_dir), "dtype": dtype},
        "method": method,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train_file": "unused.jsonl", "max_seq_len": 32},
        "training": {"optimizer": optimizer, "micro_batch_size": 2},
    }
    for section, values in sections.items():
        tree.setdefault(section, {}).update(values)
    return Config.model_validate(tree)


def _storage_bytes(tensors) -> int:
    """Bytes of distinct storages (shared ones, e.g. 8-bit AdamW's maps, once)."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def _model_weight_tensors(model) -> list[torch.Tensor]:
    """Parameters, buffers and bitsandbytes' quantization state (absmax, codes, offsets)."""
    tensors = [*model.parameters(), *model.buffers()]
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            tensors += [state.absmax, state.code, state.offset, state.state2.absmax, state.state2.code]
    return tensors


def _quantize_like_qlora(model):
    """NF4 with double quantization on CPU (bitsandbytes), then peft's k-bit preparation: what
    `from_pretrained(quantization_config=...)` and trainer.model.load_model give on a GPU."""
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    from trainer.quantization import quantize_to_4bit

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    quantize_to_4bit(model, quantization, torch.device("cpu"))
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def _one_step(model, optimizer_name: str):
    """One forward, backward and optimizer step through the trainer's loss and parameter groups."""
    from trainer.activations import packed_batch
    from trainer.loss import supervised_loss_sum
    from trainer.optim import parameter_groups

    if optimizer_name == "adamw":
        optimizer = torch.optim.AdamW(parameter_groups(model, 0.0), lr=1e-3)
    else:  # what trainer.optim.build_optimizer builds on CUDA; bitsandbytes also runs on CPU
        import bitsandbytes

        optimizer = bitsandbytes.optim.AdamW8bit(parameter_groups(model, 0.0), lr=1e-3)
    supervised_loss_sum(model, packed_batch(model.config.vocab_size, 2, 32)).backward()
    optimizer.step()
    return optimizer


@pytest.mark.parametrize(
    "family, method, dtype, optimizer",
    [
        ("gpt2", "lora", "bfloat16", "adamw"),
        ("gptj", "lora", "bfloat16", "adamw"),
        ("gpt_neox", "full", "float32", "adamw"),
        ("gptj", "full", "float32", "adamw_8bit"),
        ("gptj", "qlora", "bfloat16", "adamw"),
        ("gpt_neox", "qlora", "bfloat16", "adamw"),
    ],
)
def test_state_bytes_equal_a_real_model_after_one_step(tiny_model_dirs, family, method, dtype, optimizer):
    from transformers import AutoModelForCausalLM

    from trainer.model import apply_method
    from trainer.plan import estimate_run

    config = _config(tiny_model_dirs[family], method, dtype, optimizer)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[family], dtype=getattr(torch, dtype))
    if method == "qlora":
        model = _quantize_like_qlora(model)
    model = apply_method(config, model)
    model.train()
    weights = _storage_bytes(_model_weight_tensors(model))  # before a CPU forward repacks 4-bit weights
    optimizer_state = _one_step(model, optimizer).state
    gradients = _storage_bytes([p.grad for p in model.parameters() if p.grad is not None])
    state = _storage_bytes([v for s in optimizer_state.values() for v in s.values() if torch.is_tensor(v)])

    estimate = estimate_run(config, gpus=1, gpu_memory_bytes=10**12)
    assert (estimate.per_gpu.weights, estimate.per_gpu.gradients, estimate.per_gpu.optimizer) == (
        weights,
        gradients,
        state,
    )
    assert estimate.model["trained_parameters"] == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_fsdp_shards_every_tensor_and_gathers_blocks_in_the_compute_dtype(tiny_model_dirs):
    from transformers import AutoModelForCausalLM

    from trainer.families import transformer_blocks
    from trainer.plan import estimate_run

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["gptj"])
    gpus = 3  # not a divisor of the sizes: every first dimension is padded
    shard = {name: math.ceil(p.shape[0] / gpus) * p[0].numel() for name, p in model.named_parameters()}
    block_bf16 = [2 * sum(p.numel() for p in block.parameters()) for block in transformer_blocks(model)]
    in_blocks = {id(p) for block in transformer_blocks(model) for p in block.parameters()}
    root_bf16 = 2 * sum(p.numel() for p in model.parameters() if id(p) not in in_blocks)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    sharded = 4 * sum(shard.values())
    optimizer = sum(8 * n + 4 for n in shard.values())

    def estimate(**distributed):
        config = _config(tiny_model_dirs["gptj"], "full", "bfloat16", distributed={"strategy": "fsdp", **distributed})
        return estimate_run(config, gpus=gpus, gpu_memory_bytes=10**12)

    resharded = estimate()
    assert resharded.per_gpu.weights == sharded + buffers + 2 * max(block_bf16) + root_bf16
    # One block's gradients before the reduce-scatter: bf16, and their float32 copy.
    assert resharded.per_gpu.gradients == sharded + 3 * max(block_bf16)
    assert resharded.per_gpu.optimizer == optimizer
    assert estimate(reshard_after_forward=False).per_gpu.weights == sharded + buffers + sum(block_bf16) + root_bf16
    offloaded = estimate(cpu_offload=True)
    assert (offloaded.per_gpu.weights, offloaded.per_gpu.optimizer) == (buffers + 2 * max(block_bf16) + root_bf16, 0)
    assert offloaded.cpu_bytes == 2 * sharded + optimizer


def test_ddp_on_several_gpus_adds_gradient_buckets_and_auto_shards_full_runs(tiny_model_dirs):
    from trainer.plan import estimate_run

    lora = _config(tiny_model_dirs["gpt_neox"])
    one, two = (estimate_run(lora, gpus=n, gpu_memory_bytes=10**12) for n in (1, 2))
    assert two.settings.strategy == "ddp" and two.per_gpu.gradients == 2 * one.per_gpu.gradients
    assert two.per_gpu.weights == one.per_gpu.weights
    full = estimate_run(_config(tiny_model_dirs["gpt_neox"], "full", "float32"), gpus=2, gpu_memory_bytes=10**12)
    assert full.settings.strategy == "fsdp"


# ---------------------------------------------------------------------------------------------
# Activations: estimated against measured, on a model with GPT-J-6B's vocabulary


@pytest.mark.parametrize("method, checkpointing", plan_check.CASES)
def test_activation_estimate_is_within_25_percent_of_the_measured_peak(method, checkpointing):
    from trainer.families import mid_gptj_config

    result = plan_check.check(mid_gptj_config(), method, checkpointing, micro_batch_size=2, seq_len=128)
    assert abs(result.peak_error) <= 0.25, result
    # What the forward pass leaves for the backward pass is modelled op by op: all of it without
    # checkpointing; with it, only small index tensors are not modelled.
    assert abs(result.forward_error) <= (0.001 if not checkpointing else 0.10), result


def test_loss_chunk_backward_holds_twelve_bytes_a_logit():
    """Every position supervised: the loss's chunk of float32 logits dominates the peak."""
    from trainer.families import mid_gptj_config

    result = plan_check.check(mid_gptj_config(), "lora", True, micro_batch_size=1, seq_len=128, supervised=1.0)
    assert abs(result.peak_error) <= 0.02, result


# ---------------------------------------------------------------------------------------------
# The command line


def _write_config(tmp_path, model_dir, method: str = "lora") -> str:
    tree = {
        "model": {"name_or_path": str(model_dir)},
        "method": method,
        "lora": {"r": 4},
        "data": {"train_file": "unused.jsonl", "max_seq_len": 64},
        "training": {"micro_batch_size": 8},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tree), encoding="utf-8")
    return str(path)


def _run_json(capsys, *args) -> dict:
    assert plan_cli.main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_has_the_required_fields(tmp_path, capsys, tiny_model_dirs):
    config = _write_config(tmp_path, tiny_model_dirs["gptj"])
    result = _run_json(capsys, config, "--gpus", "1", "--gpu-memory", "80GB")
    assert set(result["per_gpu_bytes"]) == FIELDS
    assert result["per_gpu_bytes"]["total"] == sum(result["per_gpu_bytes"][k] for k in FIELDS - {"total"})
    assert result["fits"] is True and result["suggestions"] == []
    assert result["gpu_memory_bytes"] == 80 * 10**9
    assert result["settings"]["method"] == "lora" and result["model"]["model_type"] == "gptj"


def test_a_run_that_does_not_fit_gets_suggestions_that_do(tmp_path, capsys, tiny_model_dirs):
    config = _write_config(tmp_path, tiny_model_dirs["gptj"], method="full")
    total = _run_json(capsys, config, "--gpu-memory", "1GB")["per_gpu_bytes"]["total"]
    memory = int(total * 0.95)  # 90% of it usable: does not fit
    result = _run_json(capsys, config, "--gpu-memory", f"{memory}B")
    assert result["fits"] is False and result["suggestions"]
    for suggestion in result["suggestions"]:
        assert set(suggestion) == {"change", "per_gpu_bytes_total"}
        assert suggestion["per_gpu_bytes_total"] <= result["usable_bytes"] < total
        # The change, applied, gives that total and fits.
        overrides = [word for word in suggestion["change"].split() if "=" in word]
        gpus = suggestion["change"].split("--gpus ")[1].split()[0] if "--gpus" in suggestion["change"] else "1"
        again = _run_json(capsys, config, *overrides, "--gpus", gpus, "--gpu-memory", f"{memory}B")
        assert again["fits"] and again["per_gpu_bytes"]["total"] == suggestion["per_gpu_bytes_total"]
    # A tiny model's memory is mostly activations: recomputing them is what fits here.
    assert any("model.gradient_checkpointing=true" in s["change"] for s in result["suggestions"])


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["CONFIG", "--gpu-memory", "80"], 2, "--gpu-memory '80'"),
        (["CONFIG", "--gpus", "0"], 2, "--gpus 0"),
        (["missing.yaml"], 2, "config file missing.yaml does not exist"),
        (["CONFIG", "model.name_or_path=nobody/no-model"], 1, "hf download nobody/no-model config.json"),
        (["CONFIG", "training.micro_batch_size=0"], 1, "training.micro_batch_size"),
    ],
)
def test_errors_are_one_line_with_the_fix(tmp_path, capsys, tiny_model_dirs, args, code, message):
    config = _write_config(tmp_path, tiny_model_dirs["gpt2"])
    assert plan_cli.main([config if a == "CONFIG" else a for a in args]) == code
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_a_model_without_an_activation_model_is_refused_with_the_families_it_knows(tmp_path, capsys, tiny_model_dirs):
    import transformers

    transformers.BloomConfig(vocab_size=320, hidden_size=32, n_layer=2, n_head=2).save_pretrained(tmp_path / "bloom")
    config = _write_config(tmp_path, tiny_model_dirs["gpt2"])
    assert plan_cli.main([config, f"model.name_or_path={tmp_path / 'bloom'}"]) == 1
    assert capsys.readouterr().err.strip() == (
        f"error: model.name_or_path='{tmp_path / 'bloom'}' is a 'bloom' model; the planner knows gpt2, gptj, gpt_neox"
    )


def test_the_script_reports_usage_errors_without_a_traceback():
    result = run_command([sys.executable, "scripts/plan.py", "nowhere.yaml", "--gpus", "2"])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        == f"error: config file nowhere.yaml does not exist: check the path (it is relative to {REPO})"
    )


def test_shape_from_the_published_config_when_there_is_no_config_json():
    from trainer.config import Config
    from trainer.errors import UserError
    from trainer.plan import load_shape

    def config(name):
        return Config.model_validate({"model": {"name_or_path": name}, "data": {"train_file": "x"}})

    shape, _ = load_shape(config("EleutherAI/gpt-neox-20b"))
    assert (shape.model_type, shape.hidden_size, shape.num_hidden_layers) == ("gpt_neox", 6144, 44)
    with pytest.raises(UserError, match="no published shape"):
        load_shape(config("EleutherAI/pythia-nonexistent"))


def test_the_training_preflight_warns_when_the_estimate_exceeds_the_gpu(tmp_path, tiny_model_dirs):
    """What the recipe logs on CUDA before loading the model (here with a pretend 1 MB GPU)."""
    from tests.helpers import write_config
    from trainer.config import load_config
    from trainer.model import load_model_config
    from trainer.plan import memory_message

    config = load_config(write_config(tmp_path, tiny_model_dirs["gptj"], "full"))
    message = memory_message(config, load_model_config(config), gpus=1, gpu_memory_bytes=1_000_000)
    assert message and message.startswith("warning: memory estimate: this run") and "does not fit" in message
    assert memory_message(config, load_model_config(config), gpus=1, gpu_memory_bytes=10**12) is None


def test_a_model_without_a_family_entry_gets_a_note_not_a_traceback(tmp_path, tiny_model_dirs):
    """On CUDA the recipe asks the planner; a family it has no entry for still trains."""
    import transformers

    from tests.helpers import write_config
    from trainer.config import load_config
    from trainer.plan import memory_message

    config = load_config(write_config(tmp_path, tiny_model_dirs["gpt2"], "lora"))
    bloom = transformers.BloomConfig(vocab_size=320, hidden_size=32, n_layer=2, n_head=2)
    assert memory_message(config, bloom, gpus=1, gpu_memory_bytes=10**12) == (
        "note: no memory estimate for model_type 'bloom' (the planner knows gpt2, gptj, gpt_neox); training goes "
        "on without one"
    )
