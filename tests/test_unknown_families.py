"""A causal LM the trainer has no family entry for trains, with generic defaults: OPT, BLOOM and
Llama, built tiny and locally with the tests' tokenizer (nothing is downloaded).

* the loss takes the hidden states the output head sees (OPT calls its decoder past `base_model`,
  and projects them out to a narrower width before the head);
* LoRA's `auto` targets are peft's `all-linear` (every linear layer but the head);
* attention `auto` picks what the model's class supports (BLOOM has no sdpa path: eager);
* packing `auto` stays off, and packing forced on a model that does not keep packed examples
  apart is stopped by the startup self-test before anything is trained.
"""

import json

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoTokenizer, BloomConfig, LlamaConfig, OPTConfig

from tests.helpers import load_checkpoint_plainly, plain_greedy, read_jsonl, write_config
from tests.test_loss import examples, loss_and_grads, plain_loss_sum
from trainer.data.batching import collate
from trainer.families import FAMILIES, family_of
from trainer.loss import supervised_loss_sum
from trainer.tiny_models import build_model_from_config, token_ids
from trainer.train import main

#: Tiny configs (2 layers, width 32, 2 heads, dropout off) of families without an entry.
UNKNOWN_FAMILIES = {
    # word_embed_proj_dim < hidden_size: OPT-350m's project_in / project_out, so the head's input
    # is not the decoder layers' output.
    "opt": lambda ids: OPTConfig(
        **ids,
        hidden_size=32,
        num_hidden_layers=2,
        ffn_dim=64,
        num_attention_heads=2,
        max_position_embeddings=64,
        word_embed_proj_dim=16,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        layerdrop=0.0,
    ),
    "bloom": lambda ids: BloomConfig(
        **ids, hidden_size=32, n_layer=2, n_head=2, hidden_dropout=0.0, attention_dropout=0.0
    ),
    "llama": lambda ids: LlamaConfig(
        **ids,
        hidden_size=32,
        num_hidden_layers=2,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    ),
}

#: What `lora.target_modules: auto` (peft's all-linear: every linear layer but the head) adapts.
ALL_LINEAR = {
    "opt": {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "project_in", "project_out"},
    "bloom": {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"},
    "llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
}


@pytest.fixture(scope="module")
def unknown_model_dirs(tmp_path_factory, tiny_model_dirs):
    """Each family's tiny model saved beside the tests' tokenizer (that of `tiny_model_dirs`)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs["gpt2"])
    root = tmp_path_factory.mktemp("unknown-families")
    folders = {}
    for name, make_config in UNKNOWN_FAMILIES.items():
        model = build_model_from_config(make_config(token_ids(tokenizer)), tokenizer)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        folders[name] = root / name
    return folders


def test_the_families_have_no_entry(unknown_model_dirs):
    assert not UNKNOWN_FAMILIES.keys() & FAMILIES.keys()
    for folder in unknown_model_dirs.values():
        assert family_of(AutoConfig.from_pretrained(folder)) is None


@pytest.mark.parametrize("family", UNKNOWN_FAMILIES)
def test_the_loss_equals_the_full_logits_computation(unknown_model_dirs, family):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(unknown_model_dirs[family])
    batch = collate(examples(), pad_id=0)
    expected_loss, expected_grads = loss_and_grads(model, plain_loss_sum, batch)
    loss, grads = loss_and_grads(model, lambda m, b: supervised_loss_sum(m, b, chunk_rows=5), batch)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == expected_grads.keys() and len(grads) > 0
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("family", UNKNOWN_FAMILIES)
def test_lora_trains_with_generic_defaults(tmp_path, unknown_model_dirs, family):
    model_dir = unknown_model_dirs[family]
    config = write_config(
        tmp_path, model_dir, "lora", data={"packing": "auto"}, training={"epochs": 1}, checkpoints={"count": 2}
    )
    assert main([str(config)]) == 0
    run = tmp_path / "run"

    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["lora"]["target_modules"] == "all-linear"
    assert resolved["data"]["packing"] is False
    assert resolved["model"]["attention"] == ("eager" if family == "bloom" else "sdpa")

    metrics = read_jsonl(run / "metrics.jsonl")
    losses = [m["loss"] for m in metrics if "loss" in m]
    evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
    assert len(losses) == 6 and len(evals) == 2  # 48 examples, 8 a step, 1 epoch
    assert sum(losses[-3:]) < sum(losses[:3]) and evals[-1] < evals[0], (losses, evals)

    checkpoint = run / "checkpoint-6"
    adapted = json.loads((checkpoint / "adapter_config.json").read_text())["target_modules"]
    assert {name.rsplit(".", 1)[-1] for name in adapted} == ALL_LINEAR[family]
    # Plain transformers + peft load the checkpoint and reproduce its greedy sample.
    model, tokenizer = load_checkpoint_plainly(checkpoint, model_dir, "lora")
    sample = read_jsonl(checkpoint / "samples.jsonl")[0]
    assert plain_greedy(model, tokenizer, sample["prompt"], 6) == sample["completion"]


@pytest.mark.parametrize("family, isolates", [("opt", False), ("bloom", False), ("llama", True)])
def test_forced_packing_runs_only_where_the_self_test_finds_examples_kept_apart(
    tmp_path, unknown_model_dirs, capsys, family, isolates
):
    config = write_config(
        tmp_path,
        unknown_model_dirs[family],
        "lora",
        data={"packing": True},
        training={"epochs": 1, "micro_batch_size": 2},
        checkpoints={"count": 1},
    )
    code = main([str(config)])
    err = capsys.readouterr().err
    if isolates:
        assert code == 0, err[-2000:]
        assert [p.name for p in (tmp_path / "run").glob("checkpoint-*")] == ["checkpoint-3"]
        return
    assert code == 1
    assert "training.self_test failed before step 1 (nothing was trained): packed rows vs one by one" in err
    assert "packed examples attend to each other" in err and "Traceback" not in err
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_an_attention_backend_the_model_lacks_is_refused_before_loading(tmp_path, unknown_model_dirs, capsys):
    config = write_config(tmp_path, unknown_model_dirs["bloom"], "lora", model={"attention": "sdpa"})
    assert main([str(config)]) == 1
    err = capsys.readouterr().err
    assert "model.attention" in err and "sdpa" in err and "Traceback" not in err
