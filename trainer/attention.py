"""Attention backends (`model.attention`): eager, sdpa, varlen and flex for GPT-2, GPT-J and GPT-NeoX.

Every backend gives each packed example its own attention (see trainer/data/packing.py), and the
eager backend's result within floating-point tolerance (tests/test_attention.py):

* `eager`: transformers' reference code (GPT-J's computes the T x T scores in float32).
* `sdpa`: torch's scaled_dot_product_attention, through transformers' own sdpa path for every
  family (GPT-J has had one since transformers 5.25, the lowest version this project supports).
  Packed rows (position_ids restarting at 0, no 2D mask, use_cache=False) get a block-diagonal
  causal mask from transformers' `create_causal_mask` (`find_packed_sequence_indices`).
* `varlen` (CUDA): torch's variable-length flash attention (`torch.nn.attention.varlen`), fed the
  sequence boundaries of the batch, so packed rows need no T x T mask at all and padding is never
  attended to. The collate functions compute the boundaries once per batch on the CPU
  (trainer/data/boundaries.py) and the model gets them as inputs, so a compiled model has no graph
  break in its attention layers; a call without them (generation, other callers) has them found
  in `position_ids` (restarts) and the padding mask, once per forward. Registered in transformers'
  AttentionInterface as `trainer_varlen`; with a KV cache (generation) it hands over to sdpa.
* `flex` (CUDA; GPT-J and GPT-NeoX, transformers refuses it for GPT-2): transformers'
  flex_attention path (a compiled kernel and a BlockMask built from the same packed/padding
  rules). Compiling costs time at start and on new shapes.

`auto` picks, for packed and unpacked (padded) batches alike:

* CPU: `sdpa` (torch's fused CPU kernel; flex has no CPU backward, varlen no CPU kernel);
* CUDA: `varlen` when the installed torch has `torch.nn.attention.varlen`, the weights are bfloat16
  or float16, the head size is a multiple of 8 up to 256 and attention dropout is 0 (GPT-J-6B,
  GPT-NeoX-20B); otherwise `sdpa`. Flex is never picked automatically (compile time).
* only backends the model's class declares (`supported_backends`): a model without transformers'
  sdpa path (e.g. BLOOM) gets `eager`; `auto` never asks for what the model cannot do.

Nothing here patches a model's internals: backends are registered in transformers' public
AttentionInterface / AttentionMaskInterface and chosen with `set_attn_implementation`, and the
batch's sequence boundaries reach the attention function as the FlashAttentionKwargs that every
family's forward passes down.

The chosen backend lives in `model.config._attn_implementation`, which transformers does not save,
so checkpoints load with the library's default attention everywhere.
"""

from __future__ import annotations

import inspect
import math
import weakref

import torch
import torch.nn.functional as F

from trainer.errors import UserError
from trainer.unwrap import transformers_model

IMPLEMENTATIONS = ("auto", "eager", "sdpa", "varlen", "flex")

#: The name our varlen function has in transformers' Attention(Mask)Interface (no "sdpa"/"flex"
#: inside: transformers matches those substrings to run its own checks).
VARLEN_NAME = "trainer_varlen"

#: `model.attention` value -> `config._attn_implementation` value.
TRANSFORMERS_NAMES = {"eager": "eager", "sdpa": "sdpa", "flex": "flex_attention", "varlen": VARLEN_NAME}


# ---------------------------------------------------------------------------------------------
# Availability: checked at start, so a missing kernel fails before any training.


def varlen_kernel():
    """torch's varlen attention function, or None if this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def _attention_dropout(config) -> float:
    for key in ("attn_pdrop", "attention_dropout"):
        value = getattr(config, key, None)
        if value is not None:
            return float(value)
    return 0.0


def _head_size(config) -> int:
    return config.hidden_size // config.num_attention_heads


def _unavailable(requested: str, reason: str) -> UserError:
    return UserError(
        f"key 'model.attention': {requested} is not available here: {reason}. "
        "Fix: set model.attention=auto (or sdpa, which runs everywhere)"
    )


def supported_backends(model_config) -> set[str]:
    """The backends the model's class declares it can use (transformers' `_supports_sdpa`,
    `_supports_flex_attn` and `_supports_attention_backend` class flags, which
    `set_attn_implementation` checks), found from the config alone, before any weight loads.
    A config transformers has no causal-LM class for is assumed to take every backend; installing
    one it refuses then fails with a UserError naming the fix."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(model_config)]
    except KeyError:
        return {"eager", "sdpa", "varlen", "flex"}
    flags = {"sdpa": "_supports_sdpa", "flex": "_supports_flex_attn", "varlen": "_supports_attention_backend"}
    return {"eager"} | {name for name, flag in flags.items() if getattr(model_class, flag, False)}


def choose_attention(model: torch.nn.Module, requested: str, device: torch.device | str) -> str:
    """Resolve `auto` and check that the requested backend can run here; raise UserError if not."""
    inner = transformers_model(model)
    # transformers' dtype: the first floating-point weight's (4-bit QLoRA weights are not).
    return choose_attention_for(inner.config, inner.dtype, requested, device)


def choose_attention_for(model_config, dtype: torch.dtype, requested: str, device: torch.device | str) -> str:
    """`choose_attention` from the model's config and the dtype attention computes in (the autocast
    dtype, else the weights'), before any weight loads."""
    if requested not in IMPLEMENTATIONS:
        raise UserError(
            f"key 'model.attention': unknown value {requested!r}. Fix: use one of {', '.join(IMPLEMENTATIONS)}"
        )
    device = torch.device(device)
    dropout = _attention_dropout(model_config)
    head = _head_size(model_config)
    if requested == "auto":
        supports = supported_backends(model_config)
        fits_flash = dtype in (torch.bfloat16, torch.float16) and head % 8 == 0 and head <= 256 and dropout == 0
        if "varlen" in supports and device.type == "cuda" and varlen_kernel() is not None and fits_flash:
            return "varlen"
        return "sdpa" if "sdpa" in supports else "eager"
    if requested == "varlen":
        if device.type != "cuda":
            raise _unavailable("varlen", f"it is a CUDA kernel and this run is on {device.type}")
        if varlen_kernel() is None:
            raise _unavailable(
                "varlen", f"torch {torch.__version__} has no torch.nn.attention.varlen (newer versions do)"
            )
        if head % 8 or head > 256:
            raise _unavailable(
                "varlen", f"flash kernels take head sizes that are multiples of 8 up to 256, this model's is {head}"
            )
        if dtype not in (torch.bfloat16, torch.float16):
            # QLoRA's k-bit preparation casts the residual stream to float32: only autocast makes it 16-bit.
            raise _unavailable(
                "varlen",
                f"flash kernels take bfloat16 or float16 inputs and this run computes attention "
                f"in {str(dtype).removeprefix('torch.')} (set training.mixed_precision=bf16 or auto)",
            )
    if requested == "flex":
        if device.type != "cuda":
            raise _unavailable("flex", f"torch's flex_attention has no backward pass on {device.type}")
        if not flex_available():
            raise _unavailable("flex", f"torch {torch.__version__} has no torch.nn.attention.flex_attention")
    if requested in ("varlen", "flex") and dropout > 0:
        raise _unavailable(
            requested, f"the model config sets attention dropout {dropout}, which {requested} kernels do not support"
        )
    return requested


def configure_attention(model: torch.nn.Module, requested: str, device: torch.device | str) -> str:
    """Set the attention backend of a loaded model (before LoRA, accelerate.prepare or compile).

    `requested` is `model.attention`: auto | eager | sdpa | varlen | flex. Returns the backend
    chosen (`auto` resolved as the module docstring says). Raises UserError, naming the fix, for
    a backend that cannot run here or that the model refuses.
    """
    chosen = choose_attention(model, requested, device)
    install_attention(model, chosen)
    return chosen


def install_attention(model: torch.nn.Module, implementation: str) -> None:
    """Switch `model` to `implementation` without availability checks (tests use this to run the
    varlen logic on CPU, where a reference kernel stands in for flash attention).

    Every family goes through transformers' public `set_attn_implementation` (GPT-J too, since
    transformers 5.25 gave it the AttentionInterface); a model that refuses a backend gets a
    UserError naming the fix, never an AttributeError from a patched internal."""
    model = transformers_model(model)
    name = TRANSFORMERS_NAMES[implementation]
    refusal = "it does not use transformers' AttentionInterface"
    if model.config._attn_implementation != name:
        try:
            model.set_attn_implementation(name)
        except (ValueError, ImportError) as err:  # e.g. GPT-2 does not declare flex support
            refusal = str(err).split(". ")[0]
    if model.config._attn_implementation != name:  # refused, or transformers only warned
        raise UserError(
            f"key 'model.attention': {type(model).__name__} cannot use {implementation} attention ({refusal}). "
            f"Fix: set model.attention=auto, sdpa or eager"
        )


def takes_sequence_boundaries(model: torch.nn.Module) -> bool:
    """Whether `model` attends with `varlen`, the one backend that uses a batch's sequence
    boundaries (trainer/data/boundaries.py); trainer/loss.py gives them to no other."""
    return transformers_model(model).config._attn_implementation == VARLEN_NAME


# ---------------------------------------------------------------------------------------------
# varlen: one flash-attention call over every sequence of the batch.
#
# Under torch.compile this path has no graph break when the call brings the batch's boundaries
# (trainer/data/boundaries.py): `cu_seq_lens_q` is a tensor input like any other, and
# `max_length_q` a plain int, which dynamo turns into a symbolic int on the first batch that
# changes it (automatic dynamic), so a new longest sequence costs one recompile in all, not one
# per value. Only a call without boundaries finds them here, in `sequence_boundaries`.


class _LastBoundaries:
    """The boundaries of the last batch seen. Every layer gets the same position_ids and mask
    tensors, so they are computed (with their one GPU sync) once per forward, not once per layer."""

    keys: tuple = ()
    value: tuple[torch.Tensor, int] | None = None


def _same_tensors(refs: tuple, tensors: tuple) -> bool:
    if len(refs) != len(tensors):
        return False
    for ref, tensor in zip(refs, tensors):
        if tensor is None or ref is None:
            if tensor is not ref:
                return False
        elif ref[0]() is not tensor or ref[1] != tensor._version:
            return False
    return True


@torch.compiler.disable
def sequence_boundaries(
    position_ids: torch.Tensor | None, padding_mask: torch.Tensor | None, batch: int, length: int, device
) -> tuple[torch.Tensor, int]:
    """`(cu_seqlens, max_seqlen)` of the flattened (batch * length) tokens, for a call that did
    not bring them (generation, callers other than trainer/loss.py).

    A sequence starts at every row start, wherever the position does not continue (+1) from the
    previous token (packed examples restart at 0, as in transformers' `find_packed_sequence_indices`)
    and wherever the padding mask changes, so a run of padding is a sequence of its own and no
    real token ever attends to it. These are the cuts the collate functions make
    (trainer/data/boundaries.py; tested).

    Never compiled (`torch.compiler.disable`): `nonzero()` and `int()` depend on the data, and the
    cache's weakrefs cannot be traced, so in a compiled model this is one clean graph break per
    layer rather than several, and it runs eagerly, cached, once per forward.
    """
    tensors = (position_ids, padding_mask)
    if _LastBoundaries.value is not None and _same_tensors(_LastBoundaries.keys, tensors):
        return _LastBoundaries.value
    if position_ids is None:
        position_ids = torch.arange(length, device=device)[None]
    positions = position_ids.to(device).expand(batch, length)
    starts = torch.ones((batch, length), dtype=torch.bool, device=device)
    starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
    if padding_mask is not None:
        mask = padding_mask.to(device=device, dtype=torch.bool)
        starts[:, 1:] |= mask[:, 1:] != mask[:, :-1]
    first_tokens = starts.flatten().nonzero().flatten()  # GPU sync: once per forward (cached)
    cu_seqlens = torch.cat([first_tokens, first_tokens.new_tensor([batch * length])]).to(torch.int32)
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())  # GPU sync
    _LastBoundaries.keys = tuple(None if t is None else (weakref.ref(t), t._version) for t in tensors)
    _LastBoundaries.value = (cu_seqlens, max_seqlen)
    return cu_seqlens, max_seqlen


def _reference_varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale):
    """What torch's varlen kernel computes, as one sdpa call over the flattened tokens with a
    block-diagonal causal mask built from `cu_seqlens_q` (queries and keys are the same tokens
    here): the CPU stand-in that lets the tests check boundaries and layouts without a GPU.

    Only the stand-in has the (tokens x tokens) mask, which is fine for the tests' tiny batches;
    the kernel takes the boundaries themselves. It is built with tensor ops only (no `.tolist()`,
    no data-dependent Python value), so a compiled model traces it whole, as it traces the kernel
    (a custom op), and the CPU tests see the graph the GPU path has, less the kernel.
    `max_seqlen_*` only size the kernel's launch; the mask needs neither.
    """
    tokens = torch.arange(query.shape[0], device=query.device)
    sequence = torch.searchsorted(cu_seqlens_q[1:].to(tokens.dtype), tokens, right=True)  # each token's
    mask = (sequence[:, None] == sequence[None, :]) & (tokens[:, None] >= tokens[None, :])
    query, key, value = (t.transpose(0, 1) for t in (query, key, value))  # (heads, tokens, head_dim)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale).transpose(0, 1)


def _causal_argument() -> dict:
    """How the installed varlen kernel is told to be causal (its signature changed across torch
    versions). Read once, at import: `inspect.signature` in a compiled forward would break the graph."""
    kernel = varlen_kernel()
    if kernel is None:
        return {}
    return {"window_size": (-1, 0)} if "window_size" in inspect.signature(kernel).parameters else {"is_causal": True}


_VARLEN_KERNEL = varlen_kernel()
_CAUSAL = _causal_argument()


def _flash_varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale):
    """torch's varlen flash kernel (CUDA). No GPU sync and nothing that breaks a compiled graph:
    the kernel is a custom op (`torch_attn::_varlen_attn`) that dynamo keeps whole, and the max
    lengths are host ints (symbolic ints under compile) that only size its launch grid."""
    dtype = query.dtype
    if dtype not in (torch.float16, torch.bfloat16):
        # Flash kernels take 16-bit inputs: follow autocast as transformers' flash path does.
        if not torch.is_autocast_enabled(query.device.type):
            raise RuntimeError(
                "model.attention=varlen needs bfloat16 or float16 activations: set model.dtype=bfloat16 "
                "(or training.mixed_precision=bf16), or model.attention=sdpa"
            )
        half = torch.get_autocast_dtype(query.device.type)
        query, key, value = query.to(half), key.to(half), value.to(half)
    out = _VARLEN_KERNEL(
        query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale=scale, **_CAUSAL
    )
    return out.to(dtype)


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    position_ids: torch.Tensor | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """An AttentionInterface function: query/key/value (batch, heads, time, head_dim) in,
    (batch, time, heads, head_dim) out.

    `cu_seq_lens_*` / `max_length_*` are the batch's boundaries (trainer/data/boundaries.py),
    which the model passes down from its call (transformers' FlashAttentionKwargs); without them
    they are found in `position_ids` and the padding mask (`sequence_boundaries`)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, length, head_dim = query.shape
    if key.shape[2] != length or (attention_mask is not None and attention_mask.ndim != 2):
        # Decoding with a KV cache: the mask function gave an sdpa mask; let sdpa do it.
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if dropout:
        raise RuntimeError("model.attention=varlen does not support attention dropout; set model.attention=sdpa")
    if cu_seq_lens_q is None:
        if position_ids is None:
            # Without positions, packed examples cannot be told apart: refuse rather than mix them.
            raise RuntimeError(
                f"{type(module).__name__} does not pass position_ids to its attention function, which "
                "model.attention=varlen needs to find packed sequences; set model.attention=sdpa"
            )
        cu_seq_lens_q, max_length_q = sequence_boundaries(position_ids, attention_mask, batch, length, query.device)
    if cu_seq_lens_k is None:  # self-attention without a cache: the keys are the queries' tokens
        cu_seq_lens_k, max_length_k = cu_seq_lens_q, max_length_q
    scale = scaling if scaling is not None else 1.0 / math.sqrt(head_dim)
    flat = [t.transpose(1, 2).reshape(batch * length, heads, head_dim) for t in (query, key, value)]
    kernel = _flash_varlen if query.is_cuda else _reference_varlen
    out = kernel(*flat, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, scale)
    return out.view(batch, length, heads, head_dim), None


def varlen_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset=0,
    kv_offset=0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
):
    """An AttentionMaskInterface function. Without a cache (training, evaluation, prefill) the
    varlen function needs at most the 2D padding mask, and only to find the boundaries of a call
    that did not bring them. With a cache it returns transformers' sdpa mask for the sdpa fallback."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    if q_length == kv_length and isinstance(q_offset, int) and q_offset == 0 and kv_offset == 0:
        # The mask as it is, even when nothing is padded: testing that (`mask.all()`) would be a
        # GPU sync and a graph break in every forward, and an all-ones mask cuts nothing.
        return None if attention_mask is None else attention_mask[:, -kv_length:]
    return sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function or causal_mask_function,
        attention_mask=attention_mask,
        **kwargs,
    )


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN_NAME, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN_NAME, varlen_mask)


_register()
