import pytest
import torch
from transformers import AutoModelForCausalLM

from trainer import families
from trainer.attention import choose_attention, configure_attention, install_attention, sequence_boundaries
from trainer.errors import UserError

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
def test_gptj_no_longer_builds_fp32_scores_in_attn(tiny_model_dirs, attention, monkeypatch):
    from transformers.models.gptj.modeling_gptj import GPTJAttention

    model = load(tiny_model_dirs, "gptj")
    install_attention(model, attention)
    assert model.config._attn_implementation == {"sdpa": "sdpa", "varlen": "trainer_varlen"}[attention]

    def eager_attention_called(*args, **kwargs):
        raise AssertionError("GPTJAttention._attn ran")

    monkeypatch.setattr(GPTJAttention, "_attn", eager_attention_called)
    padded, packed = batches()
    model(**padded, use_cache=False)
    model(**packed, use_cache=False)
    install_attention(model, "eager")  # and back: transformers' own forward (and _attn) again
    with pytest.raises(AssertionError, match="_attn ran"):
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
        masking_utils, "create_block_mask",
        lambda *args, _compile=None, **kwargs: flex.create_block_mask(*args, _compile=False, **kwargs),
    )
    monkeypatch.setattr(
        transformers_flex, "compile_friendly_flex_attention",
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
                torch.testing.assert_close(model(**inputs, use_cache=False).logits[real], expected, rtol=1e-5, atol=1e-5)


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
