"""Activation memory of one training micro-batch: the planner's model, and the probe that checks it.

The estimate replays one forward pass of the model symbolically: every op a GPT-2, GPT-J or
GPT-NeoX block runs (in transformers 5, with the trainer's attention and LoRA from peft) becomes a
call on a `_Trace`, which follows each tensor's size, dtype, storage and whether it requires a
gradient, and records what autograd keeps for the backward pass under PyTorch's own rules:

* a linear layer keeps its input only when its weight is trained (frozen base weights in LoRA and
  QLoRA keep nothing), and under autocast it keeps the *cast* copy, one per layer;
* autocast runs matrix products in bf16 and, on CUDA, `layer_norm` and `pow` in float32 (so GPT-J's
  `gelu_new` keeps float32 tensors); elementwise ops follow type promotion;
* peft casts each adapter's input to the adapter's float32 dtype, and LoRA dropout keeps a mask
  (CUDA: one byte an element; CPU: a noise tensor in the input's dtype) besides the dropped copy;
* the attention kernel keeps q, k, v, its output and the log-sum-exp; sdpa also a float mask per
  layer (packed or padded rows), eager the T x T scores;
* the chunked loss (trainer/loss.py) keeps the supervised hidden states; its chunks' logits are
  rebuilt in the backward pass, one chunk at a time;
* autocast caches the bf16 copy of every float32 weight that requires grad until the outermost
  autocast region (the model's forward) ends, with gradient checkpointing too, unless the cache is
  off (the trainer turns it off for full fine-tuning with gradient checkpointing).

Each family's forward pass (its sizes, embeddings, block, and any tensor its blocks share) is an
`ActivationModel` here, which the family's entry in trainer/families.py names (`Family.activations`);
the estimate asks `family_of(config)` for it and tests no model_type itself.

The peak is what the forward pass leaves for the backward pass plus the largest working set of
the backward pass: a chunk of float32 logits with their gradients, or (gradient checkpointing) one
block recomputed, plus the gradients flowing through a block. `measure_activations` measures the
same quantities on a real model on CPU (tests/test_plan.py, scripts/plan_check.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from trainer.families import family_of, memory_families
from trainer.loss import DEFAULT_CHUNK_ROWS

#: Bytes the backward pass of one logits chunk holds per logit: the float32 log-probabilities kept
#: by log_softmax, the gradient nll_loss hands back, and the gradient log_softmax computes (all
#: float32). Measured on CPU: exactly 12 (tests/test_plan.py).
LOSS_BYTES_PER_LOGIT = 12

#: Tensors of a block's widest (MLP) size in flight while its backward pass runs, besides what the
#: block saved: the incoming gradient and the one being computed.
BLOCK_BACKWARD_TENSORS = 2


@dataclass(frozen=True)
class Kernels:
    """Where CUDA and CPU kernels keep different tensors for the backward pass."""

    device: str
    fp32_under_autocast: frozenset[str]
    """Ops autocast runs in float32 (CUDA: layer_norm and pow; the CPU's autocast keeps them in bf16)."""
    bool_dropout_mask: bool
    """CUDA's fused dropout keeps a bool mask; the CPU's keeps the float noise it multiplied by."""


CUDA = Kernels("cuda", frozenset({"layer_norm", "pow"}), True)
CPU = Kernels("cpu", frozenset(), False)


@dataclass(frozen=True)
class ActivationSetup:
    """Everything activation memory depends on (`trainer.plan` fills it from the config)."""

    model_config: object
    """The transformers config (GPT-2, GPT-J or GPT-NeoX)."""
    micro_batch_size: int
    seq_len: int
    supervised_rows: int
    """Supervised positions in the micro-batch: the rows of the chunked loss."""
    weight_dtype: torch.dtype
    """Dtype of the linear weights the forward pass multiplies by (QLoRA: model.dtype, to which its
    4-bit weights are dequantized)."""
    other_dtype: torch.dtype
    """Dtype of embeddings, norms and the output head (QLoRA's k-bit preparation: float32)."""
    autocast: torch.dtype | None
    full: bool
    """Every weight is trained (full fine-tuning); otherwise only LoRA adapters are."""
    lora_targets: frozenset[str] = frozenset()
    lora_r: int = 0
    lora_dropout: bool = False
    quantized: bool = False
    """QLoRA: block linears are 4-bit, dequantized to `weight_dtype` for each product (kept nowhere)."""
    inputs_require_grad: bool = False
    """The embedding output requires grad although it is frozen (QLoRA; peft with checkpointing)."""
    gradient_checkpointing: bool = False
    autocast_cache: bool = True
    """Autocast keeps its bf16 weight copies until the forward pass ends (the trainer turns this off
    for full fine-tuning with gradient checkpointing: `trainer.resolve.autocast_caches_weights`)."""
    attention: str = "varlen"
    kernels: Kernels = CUDA
    chunk_rows: int = DEFAULT_CHUNK_ROWS

    @property
    def tokens(self) -> int:
        return self.micro_batch_size * self.seq_len


@dataclass(frozen=True)
class ActivationBytes:
    """Activation memory of one micro-batch, in parts, and its peak (`total`)."""

    blocks: tuple[int, ...]
    """Bytes each block keeps for the backward pass without checkpointing."""
    block_inputs: int
    """Checkpointing: what all blocks keep (their inputs, and the tensors every block shares)."""
    outside: int
    """Embeddings, final norm and the supervised hidden states the loss keeps."""
    weight_copies: int
    """Autocast's bf16 copies of float32 weights (full fine-tuning under DDP; LoRA's adapters),
    cached until the forward pass ends."""
    loss_chunk: int
    """Backward pass of one chunk of the loss: its float32 logits and their gradients."""
    block_backward: int
    """Gradients in flight through one block; full fine-tuning: also the new gradient of its
    largest weight before it is added into `.grad`; QLoRA: its largest dequantized weight."""
    gradient_checkpointing: bool
    autocast_cache: bool = True

    @property
    def forward(self) -> int:
        """What the forward pass leaves for the backward pass."""
        if self.gradient_checkpointing:
            return self.block_inputs + self.outside
        return sum(self.blocks) + self.outside + self.weight_copies

    @property
    def backward(self) -> int:
        """The largest working set the backward pass adds to `forward`."""
        if self.gradient_checkpointing:
            recompute = max(self.blocks) + self.weight_copies // max(1, len(self.blocks))
            # With its cache, autocast holds every weight's copy at the end of the forward pass;
            # without it, a block's copies live only while the block runs.
            cached = self.weight_copies if self.autocast_cache else 0
            return max(self.loss_chunk, recompute + self.block_backward, cached)
        return max(self.loss_chunk, self.block_backward)

    @property
    def total(self) -> int:
        """The peak: what the forward pass kept plus the backward pass's largest working set."""
        return self.forward + self.backward


# ---------------------------------------------------------------------------------------------
# The symbolic forward pass


@dataclass(eq=False)
class _Storage:
    """Memory that views share: autograd keeping any view keeps all of it."""

    nbytes: int


@dataclass(eq=False)
class _Tensor:
    """A tensor as autograd sees it: size, dtype, requires_grad, and the storage it views.
    `bthd` says whether its memory is laid out (batch, time, heads, head_dim), which decides
    whether an attention kernel needs a copy of it."""

    numel: int
    dtype: torch.dtype
    requires_grad: bool
    storage: _Storage | None = None
    bthd: bool = True

    def __post_init__(self):
        if self.storage is None:
            self.storage = _Storage(self.numel * self.dtype.itemsize)


def _promote(*dtypes: torch.dtype) -> torch.dtype:
    """Type promotion of floating dtypes: bf16 with float32 gives float32."""
    return max(dtypes, key=lambda dtype: dtype.itemsize)


class _Trace:
    """Records the storages autograd keeps (each once) while a family's forward pass is replayed."""

    def __init__(self, setup: ActivationSetup):
        self.setup = setup
        self.saved: dict[int, _Storage] = {}  # holds the storages, so that no id() is reused
        self.weight_copies = 0
        self.widest_dequantized = 0
        self.widest_grad = 0

    # bookkeeping ---------------------------------------------------------------------------

    def save(self, *tensors: _Tensor) -> None:
        for tensor in tensors:
            self.saved.setdefault(id(tensor.storage), tensor.storage)

    def saved_bytes(self) -> int:
        return sum(storage.nbytes for storage in self.saved.values())

    def new(self, numel: int, dtype: torch.dtype, requires_grad: bool, bthd: bool = True) -> _Tensor:
        return _Tensor(numel, dtype, requires_grad, bthd=bthd)

    def cast(self, x: _Tensor, dtype: torch.dtype) -> _Tensor:
        """`x.to(dtype)`: a new tensor when the dtype changes, and nothing kept for backward."""
        return x if x.dtype == dtype else self.new(x.numel, dtype, x.requires_grad, x.bthd)

    def for_op(self, op: str, x: _Tensor) -> _Tensor:
        """The input an op really gets under autocast: bf16 for matrix products, float32 for the
        ops this device's autocast runs in float32, unchanged otherwise."""
        autocast = self.setup.autocast
        if autocast is None:
            return x
        if op in ("linear", "attention"):
            return self.cast(x, autocast)
        if op in self.setup.kernels.fp32_under_autocast:
            return self.cast(x, torch.float32)
        return x

    # elementwise ops (PyTorch keeps an operand only when the other one needs its gradient) ---

    def add(self, a: _Tensor, b: _Tensor) -> _Tensor:
        return self.new(a.numel, _promote(a.dtype, b.dtype), a.requires_grad or b.requires_grad)

    def scale(self, a: _Tensor) -> _Tensor:
        """Multiply by or add a Python number: nothing kept."""
        return self.new(a.numel, a.dtype, a.requires_grad)

    def mul(self, a: _Tensor, b: _Tensor) -> _Tensor:
        if a.requires_grad:
            self.save(b)
        if b.requires_grad:
            self.save(a)
        return self.add(a, b)

    def tanh(self, a: _Tensor) -> _Tensor:
        out = self.new(a.numel, a.dtype, a.requires_grad)
        if a.requires_grad:
            self.save(out)
        return out

    def pow(self, a: _Tensor) -> _Tensor:
        a = self.for_op("pow", a)
        if a.requires_grad:
            self.save(a)
        return self.new(a.numel, a.dtype, a.requires_grad)

    def keeps_input(self, a: _Tensor) -> _Tensor:
        """An elementwise op that keeps its input (F.gelu, silu): one new tensor, the input kept."""
        if a.requires_grad:
            self.save(a)
        return self.new(a.numel, a.dtype, a.requires_grad)

    # layers ----------------------------------------------------------------------------------

    def embedding(self, width: int) -> _Tensor:
        setup = self.setup
        if setup.full:
            self.save(self.new(setup.tokens, torch.int64, False))  # the token ids
        return self.new(setup.tokens * width, setup.other_dtype, setup.full or setup.inputs_require_grad)

    def layer_norm(self, x: _Tensor) -> _Tensor:
        x = self.for_op("layer_norm", x)
        needed = x.requires_grad or self.setup.full
        if needed:
            self.save(x, self.new(2 * self.setup.tokens, torch.float32, False))  # input, mean and rstd
        return self.new(x.numel, x.dtype, needed)

    def _matmul(self, x: _Tensor, fan_in: int, fan_out: int, *, trained: bool, weight_dtype: torch.dtype) -> _Tensor:
        """x @ W.T for a weight of fan_out x fan_in: keeps the (cast) input if W is trained, and
        under autocast a bf16 copy of a float32 W for the whole forward pass."""
        x = self.for_op("linear", x)
        autocast = self.setup.autocast
        if autocast is not None and weight_dtype != autocast and (trained or x.requires_grad):
            self.weight_copies += fan_in * fan_out * autocast.itemsize
        if trained:
            self.save(x)
        tokens = x.numel // fan_in
        return self.new(tokens * fan_out, autocast or _promote(x.dtype, weight_dtype), x.requires_grad or trained)

    def linear(self, x: _Tensor, fan_in: int, fan_out: int, name: str, *, other: bool = False) -> _Tensor:
        """A model linear layer `name`, with its LoRA adapter if LoRA targets it. `other`: the
        output head (never quantized; float32 after QLoRA's k-bit preparation)."""
        setup = self.setup
        weight_dtype = setup.other_dtype if other else setup.weight_dtype
        if setup.quantized and not other:  # dequantized to the compute dtype for each product
            self.widest_dequantized = max(self.widest_dequantized, fan_in * fan_out * weight_dtype.itemsize)
        out = self._matmul(x, fan_in, fan_out, trained=setup.full, weight_dtype=weight_dtype)
        if setup.full or name not in setup.lora_targets:
            return out
        return self._lora(x, out, fan_in, fan_out)

    def _lora(self, x: _Tensor, base_out: _Tensor, fan_in: int, fan_out: int) -> _Tensor:
        """peft's LoRA Linear: x cast to the adapter's float32, dropout, A then B, added to the base."""
        x = self.cast(x, torch.float32)
        # Its gradient flows back through this float32 copy: as wide as the input, in float32.
        self.widest_grad = max(self.widest_grad, x.numel * x.dtype.itemsize)
        if self.setup.lora_dropout:
            if x.requires_grad:
                kernels = self.setup.kernels
                self.save(self.new(x.numel, torch.bool if kernels.bool_dropout_mask else x.dtype, False))
            x = self.new(x.numel, x.dtype, x.requires_grad)
        r = self.setup.lora_r
        a = self._matmul(x, fan_in, r, trained=True, weight_dtype=torch.float32)
        self._matmul(a, r, fan_out, trained=True, weight_dtype=torch.float32)  # B keeps A's small output
        return self.new(base_out.numel, base_out.dtype, True)  # peft casts the sum back to the base's dtype

    def attention(self, q: _Tensor, k: _Tensor, v: _Tensor, heads: int) -> _Tensor:
        """What the attention backend keeps: q, k, v (copies where the kernel needs another
        layout), the output and the log-sum-exp; sdpa a float mask too, eager the scores."""
        setup = self.setup
        q, k, v = (self.for_op("attention", t) for t in (q, k, v))
        tokens = setup.tokens
        if setup.attention in ("varlen", "flex"):
            # trainer/attention.py flattens each to (tokens, heads, head_dim): a view when the
            # tensor is already laid out (batch, time, heads, head_dim), else a copy.
            q, k, v = (t if t.bthd else self.new(t.numel, t.dtype, t.requires_grad) for t in (q, k, v))
        out = self.new(q.numel, q.dtype, True, bthd=q.bthd if setup.attention == "sdpa" else True)
        self.save(q, k, v, out, self.new(heads * tokens, torch.float32, False))
        if setup.attention == "sdpa":
            self.save(self.new(setup.micro_batch_size * setup.seq_len**2, q.dtype, False))
        if setup.attention == "eager":
            scores = setup.micro_batch_size * heads * setup.seq_len**2
            self.save(self.new(scores, torch.float32, False), self.new(scores, q.dtype, False))
        # transformers' `attn_output.transpose(1, 2).contiguous()`: a copy unless already laid out so.
        return out if out.bthd else self.new(out.numel, out.dtype, True)

    def activation(self, x: _Tensor, name: str) -> _Tensor:
        """The MLP activation, op by op as transformers writes it."""
        if name == "gelu_new":  # 0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x ** 3)))
            inner = self.scale(self.add(x, self.scale(self.pow(x))))
            return self.mul(self.scale(x), self.scale(self.tanh(inner)))
        if name == "gelu_fast":  # 0.5 * x * (1 + tanh(x * 0.7978845608 * (1 + 0.044715 * x * x)))
            inner = self.mul(self.scale(x), self.scale(self.mul(self.scale(x), x)))
            return self.mul(self.scale(x), self.scale(self.tanh(inner)))
        if name == "relu":
            out = self.new(x.numel, x.dtype, x.requires_grad)
            self.save(out)
            return out
        return self.keeps_input(x)  # gelu, gelu_pytorch_tanh, silu: torch keeps the input


# ---------------------------------------------------------------------------------------------
# The families' blocks, as transformers 5.25 runs them. Each family's entry in trainer/families.py
# names its `ActivationModel` here (`Family.activations`); nothing below tests a model_type.


@dataclass(frozen=True)
class BlockSizes:
    layers: int
    width: int
    mlp_width: int
    heads: int
    rotary_dims: int
    """Dimensions of each head that rotary embeddings rotate (0: none, GPT-2's learned positions)."""


@dataclass(frozen=True)
class ActivationModel:
    """One family's forward pass, op by op: what a `Family` entry's `activations` names."""

    sizes: Callable[[object], BlockSizes]
    embed: Callable[[_Trace, BlockSizes], _Tensor]
    """The embeddings' output (token embeddings, plus learned positions where the family has them)."""
    block: Callable[[_Trace, _Tensor, object, "_Tensor | None"], _Tensor]
    """One transformer block: (trace, hidden states, config, shared) -> hidden states."""
    shared: Callable[[_Trace, object, _Tensor], "_Tensor | None"] = lambda tr, config, x: None
    """A tensor every block uses, computed once per forward pass (GPT-NeoX's rotary tables), or None."""


def _gpt2_sizes(config) -> BlockSizes:
    width = config.n_embd
    return BlockSizes(config.n_layer, width, getattr(config, "n_inner", None) or 4 * width, config.n_head, 0)


def _gptj_sizes(config) -> BlockSizes:
    width, heads = config.n_embd, config.n_head
    inner = getattr(config, "n_inner", None) or 4 * width
    rotary = getattr(config, "rotary_dim", None) or width // heads  # None rotates every dimension
    return BlockSizes(config.n_layer, width, inner, heads, rotary)


def _neox_sizes(config) -> BlockSizes:
    width, heads = config.hidden_size, config.num_attention_heads
    factor = (getattr(config, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0)
    return BlockSizes(config.num_hidden_layers, width, config.intermediate_size, heads, int(width // heads * factor))


def _mlp_activation(tr: _Trace, x: _Tensor, name: str) -> _Tensor:
    """The MLP's activation; its output is the block's widest tensor, and the backward pass's
    gradients through the MLP have its size and dtype."""
    out = tr.activation(x, name)
    tr.widest_grad = max(tr.widest_grad, out.numel * out.dtype.itemsize)
    return out


def _gptj_block(tr: _Trace, x: _Tensor, config, shared: _Tensor | None = None) -> _Tensor:
    """GPTJBlock: attention and MLP in parallel on one layer norm; sin and cos are looked up once
    per forward pass, but `apply_rotary_pos_emb` repeats them for q and for k in every layer
    (four tensors of tokens x rotary saved for the backward pass)."""
    sizes = _gptj_sizes(config)
    d, f, heads, rotary = sizes.width, sizes.mlp_width, sizes.heads, sizes.rotary_dims
    h = tr.layer_norm(x)
    q, k, v = (tr.linear(h, d, d, name) for name in ("q_proj", "k_proj", "v_proj"))
    if rotary and (q.requires_grad or k.requires_grad):
        for _ in range(4):
            tr.save(tr.new(tr.setup.tokens * rotary, q.dtype, False))
    q, k = (tr.new(t.numel, t.dtype, t.requires_grad) for t in (q, k))  # torch.cat([rotated, pass])
    o = tr.attention(q, k, v, heads)
    a = tr.linear(o, d, d, "out_proj")
    m = tr.linear(_mlp_activation(tr, tr.linear(h, d, f, "fc_in"), config.activation_function), f, d, "fc_out")
    return tr.add(tr.add(a, m), x)


def _neox_rotary_tables(tr: _Trace, config, x: _Tensor) -> _Tensor:
    """cos and sin, computed once per forward pass in x's dtype."""
    return tr.new(2 * tr.setup.tokens * _neox_sizes(config).rotary_dims, x.dtype, False)


def _neox_block(tr: _Trace, x: _Tensor, config, rotary_tables: _Tensor) -> _Tensor:
    """GPTNeoXLayer: fused query_key_value (v stays a view of it), rotary from tables computed once
    per forward pass, q and k concatenated in (batch, heads, time) layout, parallel residual."""
    sizes = _neox_sizes(config)
    d, f, heads, rotary = sizes.width, sizes.mlp_width, sizes.heads, sizes.rotary_dims
    qkv = tr.linear(tr.layer_norm(x), d, 3 * d, "query_key_value")
    v = _Tensor(qkv.numel // 3, qkv.dtype, qkv.requires_grad, storage=qkv.storage, bthd=True)
    if rotary and qkv.requires_grad:
        tr.save(rotary_tables)
    dtype = _promote(qkv.dtype, rotary_tables.dtype) if rotary else qkv.dtype
    q, k = (tr.new(qkv.numel // 3, dtype, qkv.requires_grad, bthd=False) for _ in range(2))
    a = tr.linear(tr.attention(q, k, v, heads), d, d, "dense")
    after = x if config.use_parallel_residual else tr.add(a, x)
    m = tr.linear(tr.layer_norm(after), d, f, "dense_h_to_4h")
    m = tr.linear(_mlp_activation(tr, m, config.hidden_act), f, d, "dense_4h_to_h")
    return tr.add(tr.add(m, a), x) if config.use_parallel_residual else tr.add(m, after)


def _gpt2_block(tr: _Trace, x: _Tensor, config, shared: _Tensor | None = None) -> _Tensor:
    """GPT2Block: sequential residual; c_attn's output split into q, k, v views."""
    sizes = _gpt2_sizes(config)
    d, f, heads = sizes.width, sizes.mlp_width, sizes.heads
    qkv = tr.linear(tr.layer_norm(x), d, 3 * d, "c_attn")
    q, k, v = (_Tensor(qkv.numel // 3, qkv.dtype, qkv.requires_grad, storage=qkv.storage) for _ in range(3))
    after = tr.add(tr.linear(tr.attention(q, k, v, heads), d, d, "c_proj"), x)
    m = tr.linear(tr.layer_norm(after), d, f, "c_fc")
    m = tr.linear(_mlp_activation(tr, m, config.activation_function), f, d, "c_proj")
    return tr.add(m, after)


def _token_embeddings(tr: _Trace, sizes: BlockSizes) -> _Tensor:
    return tr.embedding(sizes.width)


def _token_and_position_embeddings(tr: _Trace, sizes: BlockSizes) -> _Tensor:
    """GPT-2: token plus learned position embeddings."""
    return tr.add(tr.embedding(sizes.width), tr.embedding(sizes.width))


GPT2 = ActivationModel(sizes=_gpt2_sizes, embed=_token_and_position_embeddings, block=_gpt2_block)
GPTJ = ActivationModel(sizes=_gptj_sizes, embed=_token_embeddings, block=_gptj_block)
GPT_NEOX = ActivationModel(sizes=_neox_sizes, embed=_token_embeddings, block=_neox_block, shared=_neox_rotary_tables)


def _loss_inputs(tr: _Trace, x: _Tensor, config, d: int) -> int:
    """Final norm, then the supervised rows' hidden states (trainer/loss.py) with their indices.
    Returns the bytes of one chunk's backward pass."""
    setup = tr.setup
    hidden = tr.layer_norm(x)
    rows = setup.supervised_rows
    tr.save(
        tr.new(rows * d, hidden.dtype, True),
        tr.new(rows, torch.int64, False),
        tr.new(setup.micro_batch_size * (setup.seq_len - 1), torch.bool, False),
    )
    logits = min(rows, setup.chunk_rows) * config.vocab_size
    working = logits * LOSS_BYTES_PER_LOGIT
    if setup.full:  # the head's new float32 gradient, beside the logits' gradient, before it is added
        working = max(working, logits * 4 + config.vocab_size * d * 4)
    if setup.autocast is not None and setup.other_dtype != setup.autocast:
        working += config.vocab_size * d * setup.autocast.itemsize  # the head, cast again
    return working


def activation_model_of(config) -> ActivationModel:
    """The activation model of `config`'s family (`Family.activations` in trainer/families.py)."""
    family = family_of(config)
    model = family.activation_model if family is not None else None
    if model is None:
        raise ValueError(
            f"no activation model for model_type {getattr(config, 'model_type', None)!r}; "
            f"families with one: {', '.join(memory_families())}"
        )
    return model


def estimate_activations(setup: ActivationSetup) -> ActivationBytes:
    """Replay one forward pass of `setup.model_config` and return its activation memory."""
    config = setup.model_config
    model = activation_model_of(config)
    sizes = model.sizes(config)
    tr = _Trace(setup)
    x = model.embed(tr, sizes)
    outside = tr.saved_bytes()
    shared = model.shared(tr, config, x)
    # Checkpointing keeps every block's inputs: the hidden states, and once the tensors all blocks
    # share (sdpa's boolean mask, GPT-NeoX's rotary tables).
    inputs = setup.micro_batch_size * setup.seq_len**2 if setup.attention == "sdpa" else 0
    inputs += shared.storage.nbytes if shared is not None else 0
    blocks = []
    for _ in range(sizes.layers):
        before = tr.saved_bytes()
        inputs += x.numel * x.dtype.itemsize
        x = model.block(tr, x, config, shared)
        blocks.append(tr.saved_bytes() - before)
    before = tr.saved_bytes()
    loss_chunk = _loss_inputs(tr, x, config, sizes.width)
    outside += tr.saved_bytes() - before
    block_backward = BLOCK_BACKWARD_TENSORS * tr.widest_grad + tr.widest_dequantized
    if setup.full:
        d, f = sizes.width, sizes.mlp_width
        block_backward += 4 * d * max(f, 3 * d)
    return ActivationBytes(
        blocks=tuple(blocks),
        block_inputs=inputs,
        outside=outside,
        weight_copies=tr.weight_copies,
        autocast_cache=setup.autocast_cache,
        loss_chunk=loss_chunk,
        block_backward=block_backward,
        gradient_checkpointing=setup.gradient_checkpointing,
    )


# ---------------------------------------------------------------------------------------------
# The probe: the same quantities measured on a real model (CPU; tests and scripts/plan_check.py)


@dataclass(frozen=True)
class MeasuredActivations:
    saved_after_forward: int
    """Bytes autograd still keeps for the backward pass when the loss is returned (storages seen
    by saved_tensors_hooks, each once, parameters excluded, only those still alive)."""
    peak: int
    """Peak bytes of every tensor alive during forward and backward, parameters, their
    preallocated gradients and the batch excluded (a TorchDispatchMode tracking storages)."""


def measure_activations(
    model: torch.nn.Module, batch: dict, *, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> MeasuredActivations:
    """Run `trainer.loss.supervised_loss_sum` forward and backward on `model` (CPU) and measure
    what autograd saves and the peak of live tensors. Gradients are allocated first (as on the
    second micro-batch of a step), so that the peak holds activations and transient gradients only."""
    import weakref

    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    from trainer.loss import supervised_loss_sum

    for parameter in model.parameters():
        if parameter.requires_grad and parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
    known = [*model.parameters(), *model.buffers(), *batch.values()]
    known += [p.grad for p in model.parameters() if p.grad is not None]
    excluded = {t.untyped_storage().data_ptr() for t in known}

    class LiveTensors(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live: dict[int, tuple[StorageWeakRef, int]] = {}
            self.current = self.peak = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            # Forget freed storages first: the allocator may have put a new one at the same address.
            for key in [key for key, (ref, _) in self.live.items() if ref.expired()]:
                del self.live[key]
            for tensor in tree_leaves(out):
                if isinstance(tensor, torch.Tensor):
                    storage = tensor.untyped_storage()
                    key = storage.data_ptr()
                    if key and key not in excluded and key not in self.live:
                        self.live[key] = (StorageWeakRef(storage), storage.nbytes())
            self.current = sum(nbytes for _, nbytes in self.live.values())
            self.peak = max(self.peak, self.current)
            return out

    class Kept:
        def __init__(self, tensor):
            self.tensor = tensor

    kept: list = []

    def pack(tensor):
        holder = Kept(tensor)
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            kept.append((weakref.ref(holder), storage.data_ptr(), storage.nbytes()))
        return holder

    mode = LiveTensors()
    with mode:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda holder: holder.tensor):
            loss = supervised_loss_sum(model, batch, chunk_rows=chunk_rows)
        alive = {key: nbytes for ref, key, nbytes in kept if ref() is not None}
        loss.backward()
    return MeasuredActivations(saved_after_forward=sum(alive.values()), peak=mode.peak)


def packed_batch(
    vocab_size: int,
    micro_batch_size: int,
    seq_len: int,
    *,
    supervised: float = 1.0,
    examples_per_row: int = 2,
    seed: int = 0,
) -> dict:
    """A packed micro-batch as trainer/data/packing.py builds it: `examples_per_row` examples per
    row (positions restart at each), the last `supervised` share of each example labelled."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (micro_batch_size, seq_len), generator=generator)
    labels = torch.full_like(input_ids, -100)
    position_ids = torch.empty_like(input_ids)
    length = seq_len // examples_per_row
    for start in range(0, seq_len, length):
        end = min(start + length, seq_len)
        position_ids[:, start:end] = torch.arange(end - start)
        first = end - max(1, math.ceil((end - start) * supervised))
        labels[:, first:end] = input_ids[:, first:end]
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
