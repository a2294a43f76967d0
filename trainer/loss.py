"""The training loss: token cross-entropies summed over supervised positions, without ever
building full-vocabulary float32 logits.

Returning a sum (not a mean) is what makes gradient accumulation exact: the loop divides the sum
of every micro-batch of an optimizer step, on every process, by the step's total supervised tokens.

Why not `model(...).logits`: GPT-J and GPT-NeoX have a 50k vocabulary, so the logits of a 4 x 2048
micro-batch are 0.8 GB in bfloat16, and accelerate's mixed-precision wrapper converts every output
of the model to float32 (1.7 GB more), before any of them is even looked at. Instead:

1. The model runs as usual, through its own `__call__` (and so through DDP's forward, accelerate's
   autocast, PEFT). A forward pre-hook on the output head (`get_output_embeddings()`) keeps the
   hidden states the head is given (after the last layer norm, and any projection a family puts
   there, such as OPT's `project_out`) and hands the head only the last position of each row, so
   it computes one row of logits per sequence. The hook sits on the head, not on the decoder
   body, because that is the one place every causal LM passes its final hidden states through:
   OPT's `OPTForCausalLM` calls `self.model.decoder` directly, so a hook on its `base_model`
   (`OPTModel`) never fires. The model is called with `logits_to_keep=0` (every position) so that
   the head's input holds every position: with `logits_to_keep=1` the model would slice the
   hidden states to the last position before the head, and the hook would see only that.
2. Only the supervised positions' hidden states are kept (hidden at t predicts the label at t+1).
3. Cross-entropy runs over chunks of `chunk_rows` of them; each chunk's logits are recomputed in
   the backward pass (activation checkpointing), so peak memory is one chunk's logits.

DDP: calling the body or the head directly would bypass `DistributedDataParallel.forward`, which is
what arms the gradient all-reduce (`prepare_for_backward`) and honours `no_sync()`; the gradients
would silently stay local. Here DDP's forward does run: the body and the head are used inside it,
and the head applied to the chunks afterwards only adds to the same parameters' gradients in the
same backward pass, which the armed reducer all-reduces like any other (tests/test_loss.py checks
two processes end with identical, averaged gradients). The chunks run under the autocast state that
was active inside the model's forward, so mixed precision is the same as if the model had computed
the logits itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from trainer.attention import takes_sequence_boundaries
from trainer.data.boundaries import BOUNDARY_KEYS
from trainer.data.tokenize import IGNORE_INDEX
from trainer.quiet import drop_attention_mask_advice
from trainer.unwrap import transformers_model

#: Rows (supervised tokens) per cross-entropy chunk: 4096 x 50k float32 logits are 0.8 GB.
DEFAULT_CHUNK_ROWS = 4096


drop_attention_mask_advice()  # packed rows go without a 2D mask on purpose (trainer/quiet.py)

#: Batch keys the model gets (labels stay out: the model would compute its own full-logits loss).
#: The sequence boundaries (trainer/data/boundaries.py) go only to a model that attends with
#: varlen (see `model_inputs`).
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", *BOUNDARY_KEYS)


def model_inputs(model: torch.nn.Module, batch: dict) -> dict:
    """The batch's inputs for `model`.

    The boundaries go to a varlen model only: the other backends ignore them, and a compiled
    model would still take them as inputs and recompile when their shapes change (the number of
    sequences changes even between batches of the same width). Their max lengths go as plain ints
    (the batch holds `HostInt`s, which only have to survive its move to the GPU), which dynamo
    treats as ints: specialized on the first batch, then symbolic.
    """
    keys = MODEL_INPUTS if takes_sequence_boundaries(model) else [k for k in MODEL_INPUTS if k not in BOUNDARY_KEYS]
    return {key: int(batch[key]) if isinstance(batch[key], int) else batch[key] for key in keys if key in batch}


def output_head(model: torch.nn.Module) -> torch.nn.Module:
    """The output head of a causal LM (a Linear, with a bias for GPT-J; LoRA-wrapped if LoRA
    targets it), through DDP / torch.compile / PEFT wrappers."""
    inner = transformers_model(model)
    head = inner.get_output_embeddings()
    if head is None:
        raise TypeError(f"{type(inner).__name__} has no output head (get_output_embeddings() is None)")
    return head


def body_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The decoder body (`base_model`) and the output head of a causal LM. The loss needs only the
    head (`output_head`); the body is what a caller that wants the decoder gets."""
    return transformers_model(model).base_model, output_head(model)


def _chunk_loss(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # Logits in the head's (autocast) dtype, softmax in float32: as `logits.float()` did before.
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def chunked_cross_entropy_sum(
    head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> torch.Tensor:
    """Sum of CE(head(hidden[i]), targets[i]) over rows, one chunk of logits alive at a time.

    With zero rows the head still runs (on an empty chunk), so it stays in the autograd graph:
    under DDP every trained parameter must get a gradient, a zero one included.
    """
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, max(len(hidden), 1), chunk_rows):
        rows = slice(start, start + chunk_rows)
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, head, hidden[rows], targets[rows], use_reentrant=False)
        else:
            total = total + _chunk_loss(head, hidden[rows], targets[rows])
    return total


def supervised_loss_sum(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], *, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> torch.Tensor:
    """Sum over supervised positions of -log p(label | prefix), in float32.

    `batch` holds `input_ids` and `labels`, and either `attention_mask` (a padded batch from
    `collate`) or `position_ids` (packed rows from `collate_packed`, no 2D mask: the model then
    keeps the packed examples apart), and optionally the sequence boundaries both collate functions
    add (for the varlen backend). `model` may be a transformers causal LM, a PEFT model, or either
    wrapped by DDP / torch.compile.
    """
    inputs = model_inputs(model, batch)
    head = output_head(model)
    captured: dict[str, object] = {}

    def keep_hidden_states(module, args, kwargs):
        if "hidden" in captured:  # a model that calls its head again: those calls run unchanged
            return None
        name, hidden = (None, args[0]) if args else next(iter(kwargs.items()))
        device_type = hidden.device.type
        captured["hidden"] = hidden
        captured["autocast"] = (
            device_type,
            torch.get_autocast_dtype(device_type),
            torch.is_autocast_enabled(device_type),
        )
        # The head computes the last position of each row only (what logits_to_keep=1 would give).
        last = hidden[..., -1:, :]
        return ((last, *args[1:]), kwargs) if args else (args, {**kwargs, name: last})

    handle = head.register_forward_pre_hook(keep_hidden_states, with_kwargs=True)
    try:
        # use_cache=False: with a cache, transformers would not isolate packed examples.
        # logits_to_keep=0 keeps every position in the head's input (see the module docstring).
        model(**inputs, use_cache=False, logits_to_keep=0)
    except TypeError as err:  # a (remote-code) model without logits_to_keep: the hook shrinks its head's input
        if "logits_to_keep" not in str(err):
            raise
        captured.clear()
        model(**inputs, use_cache=False)
    finally:
        handle.remove()
    if "hidden" not in captured:
        raise TypeError(
            f"{type(transformers_model(model)).__name__} never called its output head "
            f"({type(head).__name__}) as a module, so its hidden states cannot be taken from there"
        )
    hidden = captured["hidden"]

    targets = batch["labels"][:, 1:].to(hidden.device)
    supervised = targets != IGNORE_INDEX
    selected = hidden[:, :-1][supervised]  # GPU sync (data-dependent size): once per micro-batch
    device_type, dtype, enabled = captured["autocast"]
    with torch.autocast(device_type, dtype=dtype, enabled=enabled):
        return chunked_cross_entropy_sum(head, selected, targets[supervised], chunk_rows)
