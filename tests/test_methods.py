"""Training methods end to end on CPU, with the real libraries: QLoRA (bitsandbytes 4-bit), 8-bit
AdamW, and full fine-tuning in bfloat16 over float32 master weights."""

import json
import re
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.helpers import REPO, checkpoint_folders, read_jsonl, write_config
from trainer.families import FAMILIES
from trainer.train import main


def loss_drop(run) -> float:
    """Mean loss of the first three steps minus that of the last three."""
    losses = [m["loss"] for m in read_jsonl(run / "metrics.jsonl") if "grad_norm" in m]
    return sum(losses[:3]) / 3 - sum(losses[-3:]) / 3


@pytest.mark.parametrize("family", list(FAMILIES))
def test_qlora_trains_4bit_models_and_the_adapter_loads_on_a_plain_base(tmp_path, tiny_model_dirs, family, capsys):
    config = write_config(tmp_path, tiny_model_dirs[family], "qlora", training={"epochs": 2})
    assert main([str(config)]) == 0
    trainable, total = (
        int(n.replace(",", ""))
        for n in re.search(r"([\d,]+) of ([\d,]+) parameters trainable", capsys.readouterr().out).groups()
    )
    base = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dirs[family]).parameters())
    assert total == base + trainable  # 4-bit weights counted as weights, not as their packed bytes
    assert loss_drop(tmp_path / "run") > 0.2
    from peft import PeftModel

    last = checkpoint_folders(tmp_path / "run")[-1]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[family])  # plain float32, no bitsandbytes
    model = PeftModel.from_pretrained(base, last).eval()
    assert {type(m).__name__ for m in model.modules()} >= {"Linear"} and not any(
        "4bit" in type(m).__name__ for m in model.modules()
    )
    with torch.no_grad():
        assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.isfinite().all()


def test_full_fine_tuning_in_bfloat16_keeps_float32_master_weights(tmp_path, monkeypatch):
    """At learning rate 1e-5 every AdamW update is smaller than half a bfloat16 step of these
    weights: bfloat16 weights would not move. Master weights in float32 with bfloat16 compute
    lower the loss as much as float32 does (at least 80% of it); the pure-bfloat16 run below shows
    the test can tell."""
    monkeypatch.chdir(REPO)
    common = [
        "configs/tiny-gpt2.yaml",
        "training.learning_rate=1e-5",
        "training.epochs=0.25",
        "checkpoints.count=1",
        "test_prompts=[]",
        "data.validation_file=null",
        "training.warmup_ratio=0",
        "training.lr_scheduler=constant",
    ]
    drops = {}
    for dtype in ("float32", "bfloat16"):
        assert main([*common, f"model.dtype={dtype}", f"output_dir={tmp_path / dtype}"]) == 0
        drops[dtype] = loss_drop(tmp_path / dtype)
    assert drops["float32"] > 0.2 and drops["bfloat16"] >= 0.8 * drops["float32"], drops
    checkpoint = checkpoint_folders(tmp_path / "bfloat16")[-1]
    assert json.loads((checkpoint / "config.json").read_text())["dtype"] == "bfloat16"  # saved in the compute dtype
    assert AutoModelForCausalLM.from_pretrained(checkpoint).dtype == torch.bfloat16
    resolved = (tmp_path / "bfloat16" / "config.yaml").read_text()
    assert "mixed_precision: bf16" in resolved

    monkeypatch.setattr("trainer.model.storage_dtype", lambda config: torch.bfloat16)  # the old way: bf16 weights
    assert main([*common, "model.dtype=bfloat16", f"output_dir={tmp_path / 'pure'}"]) == 0
    drops["pure bfloat16"] = loss_drop(tmp_path / "pure")
    assert drops["pure bfloat16"] < 0.8 * drops["float32"], drops
    print(drops)


def test_8bit_adamw_full_fine_tuning_learns_the_embedded_default(tmp_path, monkeypatch):
    """configs/tiny-gpt2.yaml with 8-bit AdamW (bitsandbytes on the CPU), 4 of its 6 epochs: every
    held-out test prompt answered right."""
    sys.path.insert(0, str(REPO / "scripts"))
    from make_example_data import TEST_PROMPTS as EXPECTED

    monkeypatch.chdir(REPO)
    assert (
        main(
            [
                "configs/tiny-gpt2.yaml",
                "training.optimizer=adamw_8bit",
                "training.epochs=4",
                "checkpoints.count=1",
                f"output_dir={tmp_path / 'run'}",
            ]
        )
        == 0
    )
    samples = read_jsonl(checkpoint_folders(tmp_path / "run")[-1] / "samples.jsonl")
    assert [s["completion"] for s in samples] == [t["expected"] for t in EXPECTED]
