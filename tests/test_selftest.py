"""trainer/selftest.py: the startup self-test passes on every family and CPU backend, and stops a
broken backend, a model that does not isolate packed examples, and wrong labels."""

import contextlib
import functools

import pytest
import torch
import transformers
from transformers import AttentionInterface, AutoModelForCausalLM

from trainer.attention import install_attention
from trainer.data.tokenize import IGNORE_INDEX, TokenizedExample
from trainer.families import FAMILIES
from trainer.selftest import TOLERANCES, SelfTestFailed, check_labels, check_model, failure, run_self_test

CPU = torch.device("cpu")


def checks_of(model, attention, packing, dtype=torch.float32):
    autocast = (
        contextlib.nullcontext if dtype == torch.float32 else functools.partial(torch.autocast, "cpu", dtype=dtype)
    )
    return {
        c.name: c
        for c in check_model(
            model, attention=attention, packing=packing, compute_dtype=dtype, autocast=autocast, device=CPU
        )
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_and_cpu_backend_passes_packed_and_padded(tiny_model_dirs, family):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[family]).train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    rng = torch.get_rng_state()
    for attention in ("eager", "sdpa", "varlen"):  # varlen: the CPU reference kernel
        install_attention(model, attention)
        for packing in (True, False):
            checks = checks_of(model, attention, packing)
            assert set(checks) == ({"layout"} if attention == "eager" else {"attention", "layout"})
            for check in checks.values():
                assert check.passed and check.difference < 1e-5, (attention, packing, check)
            assert model.config._attn_implementation == {"varlen": "trainer_varlen"}.get(attention, attention)
    # Left as it was: training mode, no gradients, weights and the random generator untouched.
    assert model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert torch.equal(torch.get_rng_state(), rng)


def test_bfloat16_differences_stay_under_their_tolerance(tiny_model_dirs):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["gptj"])
    install_attention(model, "sdpa")
    checks = checks_of(model, "sdpa", True, torch.bfloat16)
    assert all(c.tolerance == TOLERANCES[torch.bfloat16] and 0 < c.difference < c.tolerance for c in checks.values())


def _ignore_the_mask(module, query, key, value, attention_mask, scaling=None, dropout=0.0, causal=True, **kwargs):
    """A broken backend: plain attention over the whole row (causal or not), ignoring every mask."""
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=causal, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


@pytest.fixture
def broken_backends():
    AttentionInterface.register("test_not_causal", functools.partial(_ignore_the_mask, causal=False))
    AttentionInterface.register("test_causal_over_the_row", _ignore_the_mask)
    transformers.masking_utils.AttentionMaskInterface.register("test_not_causal", lambda *a, **k: None)
    transformers.masking_utils.AttentionMaskInterface.register("test_causal_over_the_row", lambda *a, **k: None)
    yield


def test_a_backend_that_is_not_causal_fails_the_attention_check(tiny_model_dirs, broken_backends):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["gpt_neox"])
    model.set_attn_implementation("test_not_causal")
    checks = checks_of(model, "sdpa", False)
    assert not checks["attention"].passed and checks["attention"].difference > 0.05


def test_packing_on_a_model_that_does_not_isolate_examples_fails_the_layout_check(tiny_model_dirs, broken_backends):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["gptj"])
    model.set_attn_implementation("test_causal_over_the_row")  # causal, but across packed examples
    assert checks_of(model, "sdpa", False)["layout"].passed  # right padding alone never shows it
    packed = checks_of(model, "sdpa", True)["layout"]
    assert not packed.passed and packed.difference > 0.05


def test_bloom_forced_to_pack_is_stopped_with_the_numbers_and_the_fix():
    """BLOOM (no family entry, ALiBi positions, no position_ids) cannot keep packed examples apart."""
    config = transformers.BloomConfig(
        vocab_size=320, hidden_size=32, n_layer=2, n_head=2, hidden_dropout=0.0, attention_dropout=0.0
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    result = run_self_test(
        model, attention="eager", packing=True, compute_dtype=torch.float32, autocast=contextlib.nullcontext, device=CPU
    )
    assert [c.name for c in result.failed] == ["layout"]
    err = failure(result)
    assert isinstance(err, SelfTestFailed) and err.checks == result.failed
    message = str(err)
    assert f"relative difference {result.failed[0].difference:.3g} > tolerance 0.0001" in message
    assert "packed examples attend to each other" in message and "data.packing=false" in message
    assert f"transformers {transformers.__version__}" in message
    assert not run_self_test(
        model,
        attention="eager",
        packing=False,
        compute_dtype=torch.float32,
        autocast=contextlib.nullcontext,
        device=CPU,
    ).failed


def _example(tokenizer, prompt, completion, line, source):
    prompt_ids = tokenizer(prompt)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return TokenizedExample(
        prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids, source, line
    )


def test_the_labels_check_re_encodes_the_first_batch_from_its_file(tokenizer, tmp_path):
    import json

    from trainer.data.batching import collate
    from trainer.data.packing import PackedRow, collate_packed

    rows = [
        {"prompt": "Fruit: apple\nColour:", "completion": " red"},
        {"prompt": "Fruit: banana\nColour:", "completion": " yellow<|endoftext|>"},
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = [
        _example(tokenizer, r["prompt"], r["completion"].removesuffix("<|endoftext|>"), n, str(path))
        for n, r in enumerate(rows, 1)
    ]
    for batch_items, batch in (
        (items, collate(items, 0)),
        ([PackedRow(tuple(items))], collate_packed([PackedRow(tuple(items))], 0)),
    ):
        check = check_labels(batch_items, batch, tokenizer, "auto")
        assert check.passed and check.detail == "2 examples supervise exactly their completion and EOS"
    # The EOS left unsupervised (the trap of masking by token id when pad == eos): caught.
    wrong = [TokenizedExample(items[0].input_ids, items[0].labels[:-1] + [IGNORE_INDEX], str(path), 1), items[1]]
    check = check_labels(wrong, collate(wrong, 0), tokenizer, "auto")
    assert (
        not check.passed
        and check.detail == f"{path} line 1: supervised positions are not exactly the completion and its EOS"
    )
    # Labels that collate put in the wrong place: caught too.
    batch = collate(items, 0)
    batch["labels"] = torch.roll(batch["labels"], 1, dims=1)
    assert (
        check_labels(items, batch, tokenizer, "auto").detail == "batch row 0: labels not where the example's tokens are"
    )


def test_the_labels_check_parses_only_its_batchs_lines_of_the_file(tokenizer, tmp_path, parsed_lines):
    import json

    from trainer.data.batching import collate

    rows = [
        {"prompt": "Fruit: apple\nColour:", "completion": " red"},
        {"prompt": "Fruit: banana\nColour:", "completion": " yellow"},
        {"prompt": "Fruit: kiwi\nColour:", "completion": " green"},
    ]
    path = tmp_path / "train.jsonl"
    # A large file's rest: never parsed (here it could not be).
    path.write_bytes("".join(json.dumps(r) + "\n" for r in rows).encode() + b"{ not JSON\n\xff\n" * 1000)
    items = [_example(tokenizer, r["prompt"], r["completion"], n, str(path)) for n, r in enumerate(rows, 1)]
    batch = [items[0], items[2]]
    check = check_labels(batch, collate(batch, 0), tokenizer, "auto")
    assert check.passed and check.detail == "2 examples supervise exactly their completion and EOS"
    assert parsed_lines == [1, 3]
