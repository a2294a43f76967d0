"""python -m trainer.export: merged LoRA and copied full checkpoints as plain Hugging Face folders,
checked against the checkpoints' own samples and logits; bad inputs end in one line."""

import json
import os
import shutil
import stat

import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.trained_runs import SEED, TEST_PROMPTS, read_samples
from trainer.config import TestPrompt
from trainer.export import main
from trainer.generate import complete

PLAIN_FILES = {
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
}


def export(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()  # drop what came before (a fixture's training run)
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def weights(folder) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as handle:
            tensors |= {name: handle.get_tensor(name) for name in handle.keys()}
    return tensors


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # inside peft
@pytest.mark.parametrize("family", ["gpt2", "gptj", "gpt_neox"])
def test_merged_export_reproduces_the_checkpoint(tmp_path, capsys, trained_checkpoints, tiny_model_dirs, family):
    checkpoint = trained_checkpoints(family, "lora")
    out = tmp_path / "merged"
    assert export(capsys, checkpoint, out)[0] == 0
    assert PLAIN_FILES | {"model.safetensors", "samples.jsonl", "config.yaml", "export.json"} <= {
        p.name for p in out.iterdir()
    }
    assert not (out / "adapter_config.json").exists()

    # Every test prompt, greedy, sampled and chat, gives the checkpoint's own sample.
    model, tokenizer = AutoModelForCausalLM.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)
    samples = read_samples(checkpoint)
    assert [complete(model, tokenizer, TestPrompt(**p), seed=SEED) for p in TEST_PROMPTS] == samples
    assert any(len(s["completion"]) > 3 for s in samples)

    # Logits of the merged model equal the base + adapter model's, and the adapter does change them.
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[family]).eval()
    ids = torch.tensor([tokenizer("banana -> yellow\nkiwi -> green")["input_ids"]])
    with torch.no_grad():
        base_logits = base(ids).logits
        adapter_logits = PeftModel.from_pretrained(base, checkpoint).eval()(ids).logits
        merged_logits = model(ids).logits
    assert (merged_logits - adapter_logits).abs().max() < 1e-4
    assert (base_logits - adapter_logits).abs().max() > 1e-2


def test_export_loads_in_a_text_generation_pipeline(tmp_path, capsys, trained_checkpoints):
    from transformers import pipeline

    checkpoint = trained_checkpoints("gpt2", "lora")
    out = tmp_path / "merged"
    assert export(capsys, checkpoint, out)[0] == 0
    info = json.loads((out / "export.json").read_text())
    assert (
        info["kind"] == "adapter"
        and info["dtype"] == "float32"
        and info["base_model"]
        == json.loads((checkpoint / "adapter_config.json").read_text())["base_model_name_or_path"]
    )
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == generation["pad_token_id"] == 0
    assert json.loads((out / "config.json").read_text())["use_cache"] is True

    generate = pipeline("text-generation", model=str(out))
    [sample] = [s for s in read_samples(checkpoint) if s["prompt"] == "banana ->"]
    [result] = generate("banana ->", max_new_tokens=16, do_sample=False, return_full_text=False)
    assert result["generated_text"] == sample["completion"]


def test_qlora_run_is_merged_into_the_unquantized_base_in_the_runs_dtype_and_sharded(
    tmp_path, capsys, trained_checkpoints
):
    checkpoint = tmp_path / "checkpoint-qlora"
    shutil.copytree(trained_checkpoints("gpt2", "lora"), checkpoint)
    config = yaml.safe_load((checkpoint / "config.yaml").read_text())
    config["method"], config["model"]["dtype"] = "qlora", "bfloat16"
    (checkpoint / "config.yaml").write_text(yaml.safe_dump(config))
    reference = tmp_path / "float32"
    assert export(capsys, checkpoint, reference, "--dtype", "float32")[0] == 0

    out = tmp_path / "merged"
    assert main([str(checkpoint), str(out), "--max-shard-size", "20KB"]) == 0
    assert "the run was QLoRA; its 4-bit weights are not used" in capsys.readouterr().out
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").exists()
    config_json = json.loads((out / "config.json").read_text())
    assert config_json["dtype"] == "bfloat16" and "quantization_config" not in config_json

    merged, exact = weights(out), weights(reference)
    assert merged.keys() == exact.keys() and {t.dtype for t in merged.values()} == {torch.bfloat16}
    for name, tensor in merged.items():  # merged in bfloat16: within its rounding of the float32 merge
        torch.testing.assert_close(tensor.float(), exact[name], rtol=1e-2, atol=1e-3)
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16


def test_full_checkpoint_is_copied_with_the_dtype_applied(tmp_path, capsys, trained_checkpoints):
    checkpoint = trained_checkpoints("gpt2", "full")
    out = tmp_path / "half"
    assert export(capsys, checkpoint, out, "--dtype", "float16")[0] == 0
    original, copied = weights(checkpoint), weights(out)
    assert copied.keys() == original.keys()
    for name, tensor in copied.items():
        assert tensor.dtype == torch.float16 and torch.equal(tensor, original[name].to(torch.float16)), name
    assert json.loads((out / "export.json").read_text())["kind"] == "full"
    assert json.loads((out / "config.json").read_text())["use_cache"] is True


def with_base(tmp_path, checkpoint, base: str):
    copy = tmp_path / "checkpoint-moved"
    shutil.copytree(checkpoint, copy)
    adapter_config = json.loads((copy / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = base
    (copy / "adapter_config.json").write_text(json.dumps(adapter_config))
    return copy


def test_missing_base_says_which_and_suggests_base_which_then_works(
    tmp_path, capsys, trained_checkpoints, tiny_model_dirs
):
    checkpoint = trained_checkpoints("gpt2", "lora")
    for missing in ["/no/such/tiny-gpt2", "examples/no-such-model"]:
        moved = with_base(tmp_path / missing.replace("/", "_"), checkpoint, missing)
        code, err = export(capsys, moved, tmp_path / "out")
        assert code == 1 and err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
        assert f"base model {missing}" in err and "--base" in err and str(tiny_model_dirs["gpt2"]) in err
    assert export(capsys, moved, tmp_path / "out", "--base", tiny_model_dirs["gpt2"])[0] == 0
    assert weights(tmp_path / "out").keys()

    code, err = export(capsys, checkpoint, tmp_path / "wrong", "--base", tiny_model_dirs["gptj"])
    assert code == 1 and "does not fit the base model" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "case, expected_code, expected",
    [
        ("missing", 1, "does not exist"),
        ("empty folder", 1, "is not a checkpoint"),
        ("file", 1, "is a file, not a checkpoint folder"),
        ("out_dir not empty", 1, "already exists and is not empty"),
        ("bad shard size", 2, "--max-shard-size '5XB' is not a size"),
        ("no arguments", 2, "the following arguments are required"),
    ],
)
def test_bad_inputs_end_in_one_line(tmp_path, capsys, trained_checkpoints, case, expected_code, expected):
    checkpoint = trained_checkpoints("gpt2", "lora")
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    argv = {
        "missing": [tmp_path / "nope", tmp_path / "out"],
        "empty folder": [tmp_path / "empty", tmp_path / "out"],
        "file": [tmp_path / "file.txt", tmp_path / "out"],
        "out_dir not empty": [checkpoint, tmp_path / "full"],
        "bad shard size": [checkpoint, tmp_path / "out", "--max-shard-size", "5XB"],
        "no arguments": [],
    }[case]
    code, err = export(capsys, *argv)
    assert code == expected_code and expected in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("error") or "error:" in line]) == 1
    assert not (tmp_path / "out").exists() and (tmp_path / "full" / "keep.txt").exists()


def test_exported_files_follow_the_umask(tmp_path, capsys, trained_checkpoints):
    """save_pretrained writes model.safetensors 0600; the export gives every file the umask's
    permissions (0644 under umask 022), so other users of a shared folder can load it."""
    checkpoint = trained_checkpoints("gpt2", "lora")
    previous = os.umask(0o022)
    try:
        assert export(capsys, checkpoint, tmp_path / "merged")[0] == 0
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "merged").iterdir()}
    assert modes["model.safetensors"] == 0o644
    assert set(modes.values()) == {0o644}, modes
