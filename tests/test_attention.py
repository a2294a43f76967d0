import functools

import pytest
import torch
from transformers import AutoModelForCausalLM

from trainer import families
from trainer.attention import (
    _reference_varlen,
    choose_attention,
    configure_attention,
    install_attention,
    sequence_boundaries,
)
from trainer.errors import UserError
from trainer.loss import supervised_loss_sum

FAMILIES = list(families.FAMILIES)


def load(tiny_model_dirs, family, **kwargs):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dirs[family], **kwargs)


def batches():
    """A right-padded batch (with its 2D mask) and one packed row of three sequences."""
    generator = torch.Generator().manual_seed(0)
    a, b, c = (torch.randint(1, 300, (n,), generator=generator) for n in (7, 5, 3))
    padded = torch.zeros(2, 7, dtype=torch.long)
    padded[0], padded[1, :5] = a, b
    mask = torch.zeros(2, 7, dtype=torch.long)
    mask[0], mask[1, :5] = 1, 1
    packed = torch.cat([a, b, c])[None]
    positions = torch.cat([torch.arange(7), torch.arange(5), torch.arange(3)])[None]
    return dict(input_ids=padded, attention_mask=mask), dict(input_ids=packed, position_ids=positions)


def logits_and_grads(model, inputs, real):
    model.zero_grad()
    logits = model(**inputs, use_cache=False).logits
    # A loss that weighs every real position's logits differently, so wrong attention shows.
    weights = torch.linspace(-1, 1, logits.shape[-1])
    (logits[real] * weights).sum().backward()
    return logits.detach()[real], {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("attention", ["sdpa", "varlen"])
@pytest.mark.parametrize("family", FAMILIES)
def test_backend_matches_eager_padded_and_packed(tiny_model_dirs, family, attention):
    eager = load(tiny_model_dirs, family)
    install_attention(eager, "eager")
    model = load(tiny_model_dirs, family)
    install_attention(model, attention)  # varlen: the CPU reference kernel stands in for flash
    padded, packed = batches()
    for inputs, real in ((padded, padded["attention_mask"].bool()), (packed, torch.ones(1, 15, dtype=torch.bool))):
        expected_logits, expected_grads = logits_and_grads(eager, inputs, real)
        got_logits, got_grads = logits_and_grads(model, inputs, real)
        torch.testing.assert_close(got_logits, expected_logits, rtol=1e-5, atol=1e-5)
        for name, grad in expected_grads.items():
            torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("attention", ["sdpa", "varlen"])
def test_gptj_attends_through_the_chosen_function_not_its_fp32_eager_scores(tiny_model_dirs, attention, monkeypatch):
    import transformers.models.gptj.modeling_gptj as modeling_gptj

    model = load(tiny_model_dirs, "gptj")
    install_attention(model, attention)
    assert model.config._attn_implementation == {"sdpa": "sdpa", "varlen": "trainer_varlen"}[attention]

    def eager_attention_called(*args, **kwargs):
        raise AssertionError("GPT-J's eager attention ran")

    monkeypatch.setattr(modeling_gptj, "eager_attention_forward", eager_attention_called)
    padded, packed = batches()
    model(**padded, use_cache=False)
    model(**packed, use_cache=False)
    install_attention(model, "eager")  # and back: transformers' eager attention again
    with pytest.raises(AssertionError, match="eager attention ran"):
        model(**padded, use_cache=False)


@pytest.mark.parametrize("attention", ["sdpa", "varlen"])
@pytest.mark.parametrize("family", FAMILIES)
def test_generation_with_a_kv_cache_matches_eager(tiny_model_dirs, family, attention):
    prompt = torch.tensor([[5, 17, 42, 8, 99]])
    outputs = []
    for backend in ("eager", attention):
        model = load(tiny_model_dirs, family).eval()
        install_attention(model, backend)
        outputs.append(model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0))
    assert outputs[1].shape == (1, 13)
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_matches_eager_on_cpu_in_its_uncompiled_form(tiny_model_dirs, monkeypatch):
    """Flex has no CPU backward, and compiling it on CPU takes minutes; its uncompiled forward is
    the same math, which checks the BlockMask (padding, packing) and GPT-J's dispatch."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    import transformers.integrations.flex_attention as transformers_flex
    import transformers.masking_utils as masking_utils

    monkeypatch.setattr(
        masking_utils,
        "create_block_mask",
        lambda *args, _compile=None, **kwargs: flex.create_block_mask(*args, _compile=False, **kwargs),
    )
    monkeypatch.setattr(
        transformers_flex,
        "compile_friendly_flex_attention",
        lambda query, key, value, training=False, **kwargs: flex.flex_attention(query, key, value, **kwargs),
    )
    padded, packed = batches()
    for family in ("gptj", "gpt_neox"):
        eager, model = load(tiny_model_dirs, family), load(tiny_model_dirs, family)
        install_attention(eager, "eager")
        install_attention(model, "flex")
        assert model.config._attn_implementation == "flex_attention"
        with torch.no_grad():
            for inputs, real in ((padded, padded["attention_mask"].bool()), (packed, slice(None))):
                expected = eager(**inputs, use_cache=False).logits[real]
                torch.testing.assert_close(
                    model(**inputs, use_cache=False).logits[real], expected, rtol=1e-5, atol=1e-5
                )


def test_gpt2_has_no_flex_path_in_transformers(tiny_model_dirs):
    with pytest.raises(UserError, match="GPT2LMHeadModel cannot use flex attention.*Fix: set model.attention"):
        install_attention(load(tiny_model_dirs, "gpt2"), "flex")


def test_sequence_boundaries_cut_at_position_restarts_and_padding():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    padding = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    cu_seqlens, longest = sequence_boundaries(positions, padding, 2, 6, "cpu")
    assert cu_seqlens.tolist() == [0, 3, 5, 6, 10, 12]
    assert cu_seqlens.dtype == torch.int32 and longest == 4
    cu_seqlens, longest = sequence_boundaries(torch.arange(4)[None], None, 3, 4, "cpu")  # unpacked rows
    assert cu_seqlens.tolist() == [0, 4, 8, 12] and longest == 4


def test_auto_is_sdpa_on_cpu_and_unavailable_backends_fail_with_the_fix(tiny_model_dirs):
    model = load(tiny_model_dirs, "gptj")
    assert configure_attention(model, "auto", "cpu") == "sdpa"
    assert model.config._attn_implementation == "sdpa"
    assert configure_attention(model, "eager", torch.device("cpu")) == "eager"
    with pytest.raises(UserError, match="model.attention.*varlen.*CUDA kernel.*Fix: set model.attention=auto"):
        configure_attention(model, "varlen", "cpu")
    with pytest.raises(UserError, match="flex.*no backward pass on cpu"):
        configure_attention(model, "flex", "cpu")
    with pytest.raises(UserError, match="unknown value 'fast'"):
        configure_attention(model, "fast", "cpu")


def test_auto_on_cuda_is_varlen_for_16_bit_weights_without_attention_dropout(tiny_model_dirs):
    from trainer.attention import varlen_kernel

    varlen = "varlen" if varlen_kernel() is not None else "sdpa"
    assert choose_attention(load(tiny_model_dirs, "gptj", dtype=torch.bfloat16), "auto", "cuda") == varlen
    assert choose_attention(load(tiny_model_dirs, "gpt_neox", dtype=torch.float16), "auto", "cuda") == varlen
    assert choose_attention(load(tiny_model_dirs, "gptj"), "auto", "cuda") == "sdpa"  # float32: no flash kernel
    dropout = load(tiny_model_dirs, "gpt2", dtype=torch.bfloat16, attn_pdrop=0.1)
    assert choose_attention(dropout, "auto", "cuda") == "sdpa"
    with pytest.raises(UserError, match="attention dropout 0.1"):
        choose_attention(dropout, "flex", "cuda")


def test_the_backend_is_not_saved_into_checkpoints(tiny_model_dirs, tmp_path):
    for family in ("gptj", "gpt_neox"):
        model = load(tiny_model_dirs, family)
        install_attention(model, "varlen")
        model.save_pretrained(tmp_path / family)
        assert "trainer_varlen" not in (tmp_path / family / "config.json").read_text()
        assert AutoModelForCausalLM.from_pretrained(tmp_path / family).config._attn_implementation != "trainer_varlen"


# ---------------------------------------------------------------------------------------------
# Issue 8: the batch brings its sequence boundaries (trainer/data/boundaries.py), computed once
# on the CPU by the collate functions, so that a compiled varlen model has no graph break.


def collated_batches():
    """A padded batch from `collate` and a packed one from `collate_packed` (two rows, one padded)."""
    from trainer.data.batching import collate
    from trainer.data.packing import collate_packed, pack_examples
    from trainer.data.tokenize import IGNORE_INDEX, TokenizedExample

    generator = torch.Generator().manual_seed(1)
    examples = [
        TokenizedExample(ids, [IGNORE_INDEX] + ids[1:], "data.jsonl", line)
        for line, n in enumerate((9, 5, 4, 3, 1, 7))
        for ids in [torch.randint(1, 300, (n,), generator=generator).tolist()]
    ]
    return collate(examples, pad_id=0), collate_packed(pack_examples(examples, max_seq_len=16), pad_id=0)


def without_boundaries(batch):
    from trainer.data.boundaries import BOUNDARY_KEYS

    return {key: value for key, value in batch.items() if key not in (*BOUNDARY_KEYS, "labels")}


def test_collate_boundaries_are_the_cuts_varlen_finds_in_the_batch_itself():
    padded, packed = collated_batches()
    assert packed["position_ids"].shape == (2, 16) and (packed["position_ids"][:, 1:] == 0).any()  # packed
    for batch in (padded, packed):
        rows, width = batch["input_ids"].shape
        found, longest = sequence_boundaries(batch.get("position_ids"), batch.get("attention_mask"), rows, width, "cpu")
        assert batch["cu_seq_lens_q"].dtype == torch.int32
        assert batch["cu_seq_lens_q"].tolist() == found.tolist()
        assert batch["max_length_q"] == longest and type(batch["max_length_q"].to("cuda")) is type(
            batch["max_length_q"]
        )
    # Rows of 9: each example, then its padding as a sequence of its own (9 | 5 4 | 4 5 | 3 6 | 1 8 | 7 2).
    assert padded["cu_seq_lens_q"].tolist() == [0, 9, 14, 18, 22, 27, 30, 36, 37, 45, 52, 54]


@pytest.mark.parametrize("family", FAMILIES)
def test_varlen_takes_the_batch_boundaries_and_the_other_backends_ignore_them(tiny_model_dirs, family, monkeypatch):
    import trainer.attention as attention
    from trainer.loss import model_inputs

    padded, packed = collated_batches()
    models = {backend: load(tiny_model_dirs, family) for backend in ("eager", "sdpa", "varlen")}
    for backend, model in models.items():
        install_attention(model, backend)
    with torch.no_grad():
        # Without boundaries varlen finds them itself (the path of generation and other callers).
        expected = [models["varlen"](**without_boundaries(b), use_cache=False).logits for b in (padded, packed)]

        def found_here(*args):
            raise AssertionError("varlen looked for boundaries the batch brought")

        monkeypatch.setattr(attention, "sequence_boundaries", found_here)
        for batch, logits in zip((padded, packed), expected):
            inputs = model_inputs(models["varlen"], batch)
            assert type(inputs["max_length_q"]) is int  # a plain int for dynamo, not the batch's HostInt
            torch.testing.assert_close(models["varlen"](**inputs, use_cache=False).logits, logits, rtol=1e-5, atol=1e-5)
            for backend in ("eager", "sdpa"):  # given the boundaries anyway: unchanged
                assert "cu_seq_lens_q" not in model_inputs(models[backend], batch)
                with_them = models[backend](**inputs, use_cache=False).logits
                torch.testing.assert_close(
                    with_them, models[backend](**without_boundaries(batch), use_cache=False).logits
                )
        # The boundaries are really used: one sequence per row lets packed examples see each other.
        rows, width = packed["input_ids"].shape
        merged = dict(model_inputs(models["varlen"], packed), max_length_q=width, max_length_k=width)
        merged["cu_seq_lens_q"] = merged["cu_seq_lens_k"] = torch.arange(0, rows * width + 1, width, dtype=torch.int32)
        assert not torch.allclose(models["varlen"](**merged, use_cache=False).logits, expected[1], atol=1e-3)


def test_gptj_hands_the_batch_boundaries_to_its_attention_function(tiny_model_dirs, monkeypatch):
    """GPT-J passes a forward's extra arguments (FlashAttentionKwargs) down to every attention call
    since transformers 5.25, as GPT-2 and GPT-NeoX do: no wrapper of ours carries them."""
    import trainer.attention as attention

    model = load(tiny_model_dirs, "gptj")
    install_attention(model, "varlen")
    assert "forward" not in model.__dict__  # the model's own forward, unwrapped
    _, packed = collated_batches()
    seen = []
    reference = attention._reference_varlen
    monkeypatch.setattr(attention, "_reference_varlen", lambda *args: seen.append(args[3]) or reference(*args))
    from trainer.loss import model_inputs

    model(**model_inputs(model, packed), use_cache=False)
    assert len(seen) == model.config.n_layer and all(cu is packed["cu_seq_lens_q"] for cu in seen)


@functools.cache
def _compile_check():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "compile_check.py"
    spec = importlib.util.spec_from_file_location("compile_check", path)
    module = sys.modules["compile_check"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_varlen_has_no_graph_break_and_recompiles_at_most_a_few_times(tiny_model_dirs, family):
    """scripts/compile_check.py's count, as a test: 10 packed batches of different shapes, trained
    through the compiled model as `training.compile` does (dynamo only: the "eager" backend)."""
    check = _compile_check()
    model = load(tiny_model_dirs, family).train()
    install_attention(model, "varlen")  # the CPU reference stands in for the flash kernel
    batches = check.packed_batches(10, vocab_size=model.config.vocab_size)
    assert len({b["input_ids"].shape for b in batches}) == 10 and len({b["max_length_q"] for b in batches}) > 5
    counts = check.count_compiles(model, batches)
    assert counts.error is None
    assert counts.graph_breaks == 0, counts.break_reasons
    assert counts.frames_first_batch == 1  # one graph for the whole forward
    assert counts.recompiles <= 3, counts.recompile_reasons  # 1 here: sizes become dynamic once
    with torch.no_grad():  # and the compiled model computes what the uncompiled one does
        for index in (0, 1, 9):  # static sizes, then dynamic ones
            assert counts.losses[index] == pytest.approx(supervised_loss_sum(model, batches[index]).item(), rel=1e-5)


_REFERENCE_VARLEN = _reference_varlen  # the test below swaps the module's for the stand-in


@torch.library.custom_op("trainer_tests::varlen_kernel_stand_in", mutates_args=())
def _kernel_stand_in(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
) -> torch.Tensor:
    return _REFERENCE_VARLEN(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale)


@_kernel_stand_in.register_fake
def _(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale):
    return torch.empty_like(query)


def test_a_kernel_taking_the_max_length_as_an_int_recompiles_once_not_per_length(tiny_model_dirs, monkeypatch):
    """The CPU reference ignores the max lengths; the flash kernel takes them as ints (a custom op,
    `torch_attn::_varlen_attn`, whose schema makes them SymInts). A custom op of the same signature
    stands in for it here, so dynamo must trace the max lengths as the GPU path does: a new value
    must not recompile (a forward pass: the stand-in has no backward).

    GPT-J here; GPT-2 and GPT-NeoX get the boundaries as arguments of the compiled forward the same
    way (the same check passes for them; left out to keep the suite fast)."""
    import trainer.attention as attention

    check = _compile_check()
    monkeypatch.setattr(attention, "_reference_varlen", _kernel_stand_in)
    model = load(tiny_model_dirs, "gptj")
    install_attention(model, "varlen")
    batches = check.packed_batches(6, vocab_size=model.config.vocab_size)
    assert len({b["max_length_q"] for b in batches}) == 5
    counts = check.count_compiles(model, batches, train=False)
    assert counts.error is None and counts.graph_breaks == 0, counts.break_reasons
    assert counts.recompiles <= 3, counts.recompile_reasons
    assert not any("max_length" in reason for reason in counts.recompile_reasons)
