import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from trainer import families
from trainer.data.batching import collate
from trainer.data.tokenize import IGNORE_INDEX, TokenizedExample
from trainer.loss import body_and_head, supervised_loss_sum

FAMILIES = list(families.FAMILIES)
#: Some of each family's projections (adapting only some must work too); a family not listed
#: here gets all of its entry's targets.
LORA_TARGETS = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gptj": ["q_proj", "v_proj", "fc_in"],
    "gpt_neox": ["query_key_value", "dense"],
}


def examples(seed: int = 0) -> list[TokenizedExample]:
    """Four examples of different lengths and prompt lengths: 6 + 4 + 8 + 3 = 21 supervised tokens."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for line, (length, prompt) in enumerate([(9, 3), (5, 1), (12, 4), (4, 0)], 1):
        ids = torch.randint(1, 300, (length,), generator=generator).tolist()
        rows.append(TokenizedExample(ids, [IGNORE_INDEX] * prompt + ids[prompt:], "data.jsonl", line))
    return rows


def plain_loss_sum(model, batch):
    """The reference: full logits, float32, cross-entropy summed over the shifted labels."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits.float()
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="sum")


def load(tiny_model_dirs, family, method="full"):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[family])
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        # init_lora_weights=False: random B too, so every adapter weight gets a non-zero gradient.
        entry = families.FAMILIES[family]
        lora = LoraConfig(
            r=4,
            lora_alpha=8,
            lora_dropout=0.0,
            target_modules=LORA_TARGETS.get(family, list(entry.lora_targets)),
            fan_in_fan_out=entry.conv1d_projections,
            init_lora_weights=False,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    return model


def loss_and_grads(model, loss_fn, batch):
    model.zero_grad()
    loss = loss_fn(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("chunk_rows", [5, 4096])
@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_loss_and_gradients_equal_the_full_logits_computation(tiny_model_dirs, family, method, chunk_rows):
    model = load(tiny_model_dirs, family, method)
    batch = collate(examples(), pad_id=0)
    assert sum(e.supervised_tokens for e in examples()) == 21
    expected_loss, expected_grads = loss_and_grads(model, plain_loss_sum, batch)
    loss, grads = loss_and_grads(model, lambda m, b: supervised_loss_sum(m, b, chunk_rows=chunk_rows), batch)
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == expected_grads.keys() and len(grads) > 0
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_head_never_sees_more_than_a_chunk_of_rows(tiny_model_dirs, family):
    model = load(tiny_model_dirs, family)
    _, head = body_and_head(model)
    assert head is model.get_output_embeddings()
    seen = []
    head.register_forward_hook(lambda module, args, output: seen.append(output.shape[:-1].numel()))
    supervised_loss_sum(model, collate(examples(), pad_id=0), chunk_rows=8).backward()
    # One row per sequence (logits_to_keep=1), then the 21 supervised rows as 8 + 8 + 5, each
    # chunk recomputed once in the backward pass (in reverse order).
    assert seen[:4] == [4, 8, 8, 5]
    assert sorted(seen[4:]) == [5, 8, 8]


@pytest.mark.parametrize("attention", ["sdpa", "varlen"])
def test_with_activation_checkpointing_and_a_packed_batch_the_gradients_are_the_same(tiny_model_dirs, attention):
    from trainer.attention import install_attention
    from trainer.data.packing import collate_packed, pack_examples

    model = load(tiny_model_dirs, "gptj")
    expected_loss, expected_grads = loss_and_grads(model, plain_loss_sum, collate(examples(), pad_id=0))
    install_attention(model, attention)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # checkpointing is only active in training mode (the tiny models have no dropout)
    rows = pack_examples(examples(), max_seq_len=20)
    assert [len(r.examples) for r in rows] == [2, 2]
    loss, grads = loss_and_grads(model, lambda m, b: supervised_loss_sum(m, b, chunk_rows=4), collate_packed(rows, 0))
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-5)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)


def test_an_idle_batch_is_zero_and_still_gives_every_weight_a_gradient(tiny_model_dirs):
    model = load(tiny_model_dirs, "gptj")
    loss = supervised_loss_sum(model, collate(examples(), pad_id=0, supervise=False))
    loss.backward()
    assert loss.item() == 0.0
    # Under DDP every trained weight must take part in each backward pass, the head included.
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


def test_evaluation_without_gradients_gives_the_same_sum(tiny_model_dirs):
    model = load(tiny_model_dirs, "gpt_neox")
    batch = collate(examples(), pad_id=0)
    with torch.no_grad():
        torch.testing.assert_close(
            supervised_loss_sum(model, batch, chunk_rows=3), plain_loss_sum(model, batch), rtol=1e-5, atol=1e-5
        )


def test_under_accelerate_bf16_the_head_runs_in_the_forwards_autocast(tiny_model_dirs):
    from types import MethodType

    from accelerate.utils import convert_outputs_to_fp32

    model = load(tiny_model_dirs, "gptj")
    # What Accelerator(mixed_precision="bf16").prepare(model) does to the model (accelerate 1.x,
    # Accelerator.prepare_model), without creating an Accelerator: its state is process-global.
    autocast_forward = torch.autocast("cpu", dtype=torch.bfloat16)(model.forward.__func__)
    model.forward = MethodType(convert_outputs_to_fp32(autocast_forward), model)
    _, head = body_and_head(model)
    dtypes = []
    head.register_forward_hook(lambda module, args, output: dtypes.append(output.dtype))
    batch = collate(examples(), pad_id=0)
    loss = supervised_loss_sum(model, batch)
    loss.backward()
    # The model's forward is autocast; the chunks, which run after it returns, must be too.
    assert dtypes and set(dtypes) == {torch.bfloat16}
    assert loss.dtype == torch.float32
    expected = plain_loss_sum(model, batch)
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=2e-2, atol=0.0)


# ---------------------------------------------------------------------------------------------
# DDP: the loss goes through DistributedDataParallel.forward, so gradients are all-reduced.


def _ddp_worker(rank: int, world_size: int, model_dir: str, init_file: str, batches: list[dict]) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        reference = AutoModelForCausalLM.from_pretrained(model_dir)
        local = [loss_and_grads(reference, plain_loss_sum, batch)[1] for batch in batches]
        ddp = DistributedDataParallel(AutoModelForCausalLM.from_pretrained(model_dir))
        for step in range(2):  # a second step fails if the first left the reducer half done
            ddp.zero_grad()
            supervised_loss_sum(ddp, batches[rank], chunk_rows=5).backward()
            for name, param in ddp.module.named_parameters():
                averaged = sum(grads[name] for grads in local) / world_size
                torch.testing.assert_close(param.grad, averaged, rtol=1e-5, atol=1e-6, msg=f"step {step} {name}")
        ddp.zero_grad()
        with ddp.no_sync():  # accumulation micro-batches stay local
            supervised_loss_sum(ddp, batches[rank]).backward()
        for name, param in ddp.module.named_parameters():
            torch.testing.assert_close(param.grad, local[rank][name], rtol=1e-5, atol=1e-6, msg=f"no_sync {name}")
    finally:
        dist.destroy_process_group()


def test_under_ddp_gradients_are_averaged_across_processes(tiny_model_dirs, tmp_path):
    import torch.multiprocessing as mp

    batches = [collate(examples(seed), pad_id=0) for seed in (0, 1)]
    # fork: the workers inherit the imported libraries instead of importing them again (seconds).
    mp.start_processes(
        _ddp_worker,
        args=(2, str(tiny_model_dirs["gptj"]), str(tmp_path / "init"), batches),
        nprocs=2,
        start_method="fork",
    )
