"""Will a run fit on its GPUs? Per-GPU memory of weights, gradients, optimizer state and
activations, estimated from the config alone, and what to change when it does not fit.

    python scripts/plan.py configs/gptj.yaml --gpus 1 --gpu-memory 80GB

    # The trainer's preflight on CUDA (resolved config, its model config, the device's memory):
    estimate = estimate_run(config, gpus=accelerator.num_processes, model_config=model_config,
                    gpu_memory_bytes=torch.cuda.get_device_properties(device).total_memory)
    if estimate.warning():
        print(estimate.warning())     # one paragraph: the numbers, the verdict, what would fit

The model is built on the meta device (shapes and dtypes, no weights, nothing downloaded) from its
config.json (a local folder, or the local Hugging Face cache), or else from the family's published
configuration (`trainer.families.PUBLISHED_CONFIGS`). LoRA adapters are added by the trainer's own
`trainer.model.apply_method`, so their count is exactly the run's. What the planner assumes the
trainer does on CUDA:

* LoRA: frozen base weights in `model.dtype`, float32 adapters with float32 gradients, AdamW's two
  float32 moments per adapter parameter. QLoRA: the transformer blocks' linear weights in 4-bit NF4
  with double quantization (half a byte a parameter, plus one 8-bit absmax per 64 weights and one
  float32 scale per 256 absmax), every other base parameter in float32 (k-bit preparation).
* Full fine-tuning: float32 master weights and gradients whatever `model.dtype` is (it is then the
  bf16 autocast dtype); AdamW's moments in float32 (8 bytes a parameter) or 8-bit (2 bytes plus a
  float32 scale per 256) with `training.optimizer: adamw_8bit`.
* DDP (`distributed.strategy: ddp`, and `auto` but for full fine-tuning on several GPUs): every GPU
  holds everything; with more than one GPU, DDP's gradient buckets are a second copy of the
  trained gradients. FSDP2 (`fully_shard` per transformer block, then the root): weights,
  gradients and optimizer state divided over the GPUs (each tensor's first dimension padded to a
  multiple of the GPU count), plus the copies gathered in `model.dtype` for compute: the largest
  block twice (the next one is prefetched) or, without `reshard_after_forward`, every block; the
  root's embeddings, final norm and head for the whole step; and one block's gradients before the
  reduce-scatter, with their float32 copy. `cpu_offload` moves the sharded part to CPU memory.
* Activations: `micro_batch_size` rows of `data.max_seq_len` tokens, every position supervised
  (the worst case), modelled op by op in trainer/activations.py; with float32 master weights under
  autocast (full fine-tuning, DDP) also autocast's bf16 copy of every weight, kept for the backward
  pass; with gradient checkpointing the trainer turns autocast's weight cache off, so a block's
  copies live only while it runs.

A run "fits" when the total is at most 90% of the GPU's memory: the rest is for the CUDA context,
kernels' workspaces, NCCL buffers and the caching allocator's fragmentation.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trainer.activations import CUDA, ActivationBytes, ActivationSetup, estimate_activations
from trainer.config import Config
from trainer.disk import human
from trainer.errors import UserError
from trainer.families import PUBLISHED_CONFIGS, estimates_memory, family_of, memory_families, transformer_blocks
from trainer.precision import AUTOCAST, autocast_dtype, torch_dtype
from trainer.resolve import autocast_caches_weights

#: Share of the GPU's memory kept free for what the estimate does not count.
HEADROOM = 0.10


#: bitsandbytes keeps optimizer state of tensors smaller than this in float32 (`min_8bit_size`).
MIN_8BIT_SIZE = 4096

#: FSDP group sizes tried when a suggestion needs more GPUs.
FSDP_SIZES = (2, 4, 8, 16, 32, 64, 128, 256, 512)


# ---------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class PerGpuBytes:
    weights: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def to_json(self) -> dict:
        return {
            "weights": self.weights,
            "gradients": self.gradients,
            "optimizer": self.optimizer,
            "activations": self.activations,
            "total": self.total,
        }


@dataclass(frozen=True)
class Suggestion:
    change: str
    """Overrides (and `--gpus`) that make the run fit, e.g. `training.optimizer=adamw_8bit`."""
    per_gpu: PerGpuBytes


@dataclass(frozen=True)
class Settings:
    """The config's memory-relevant settings with every `auto` resolved as on a CUDA GPU."""

    method: str
    base_dtype: str
    """How the base weights are stored: model.dtype (LoRA), nf4 (QLoRA), float32 (full)."""
    compute_dtype: str
    """model.dtype resolved: LoRA's base, QLoRA's dequantized products, FSDP's gathered copies."""
    autocast: str | None
    gradient_checkpointing: bool
    attention: str
    micro_batch_size: int
    seq_len: int
    packing: bool
    optimizer: str
    strategy: str
    gpus: int
    reshard_after_forward: bool
    cpu_offload: bool
    lora_r: int
    lora_dropout: float
    lora_targets: tuple[str, ...]

    def to_json(self) -> dict:
        return dict(self.__dict__, lora_targets=list(self.lora_targets))


@dataclass(frozen=True)
class RunEstimate:
    settings: Settings
    model: dict
    """name_or_path, model_type, where its shape came from, parameters and trained parameters."""
    per_gpu: PerGpuBytes
    details: dict
    """The terms behind the four numbers (bytes), e.g. FSDP's gathered copies, the activations' parts."""
    cpu_bytes: int
    """Per GPU, in CPU memory (FSDP cpu_offload)."""
    gpu_memory_bytes: int
    suggestions: tuple[Suggestion, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def usable_bytes(self) -> int:
        return int(self.gpu_memory_bytes * (1 - HEADROOM))

    @property
    def fits(self) -> bool:
        return self.per_gpu.total <= self.usable_bytes

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "settings": self.settings.to_json(),
            "gpus": self.settings.gpus,
            "gpu_memory_bytes": self.gpu_memory_bytes,
            "usable_bytes": self.usable_bytes,
            "per_gpu_bytes": self.per_gpu.to_json(),
            "details": self.details,
            "cpu_bytes_per_gpu": self.cpu_bytes,
            "fits": self.fits,
            "suggestions": [{"change": s.change, "per_gpu_bytes_total": s.per_gpu.total} for s in self.suggestions],
            "notes": list(self.notes),
        }

    def verdict(self) -> str:
        """One line: fits or not, with the numbers."""
        need = f"about {human(self.per_gpu.total)} per GPU"
        gpu = f"GPU memory {human(self.gpu_memory_bytes)}, {human(self.usable_bytes)} usable"
        return f"fits: {need} ({gpu})" if self.fits else f"does not fit: {need} ({gpu})"

    def warning(self) -> str | None:
        """The trainer's preflight message when the estimate exceeds the device, else None."""
        if self.fits:
            return None
        fixes = "; ".join(f"{s.change} ({human(s.per_gpu.total)})" for s in self.suggestions[:3])
        hint = f" What would fit: {fixes}." if fixes else ""
        return (
            f"memory estimate: this run {self.verdict()} (weights {human(self.per_gpu.weights)}, gradients "
            f"{human(self.per_gpu.gradients)}, optimizer {human(self.per_gpu.optimizer)}, activations "
            f"{human(self.per_gpu.activations)}).{hint} Details: python scripts/plan.py CONFIG --gpus N."
        )


# ---------------------------------------------------------------------------------------------
# The model's shape: config.json where there is one here, else the published configuration


def load_shape(config: Config):
    """(transformers config, where it came from). Never downloads: a local folder or the local
    Hugging Face cache, else `PUBLISHED_CONFIGS`; neither is a UserError naming the fixes."""
    from transformers import AutoConfig

    name = config.model.name_or_path
    try:
        found = AutoConfig.from_pretrained(
            name, local_files_only=True, trust_remote_code=config.model.trust_remote_code
        )
        source = f"config.json in {name}" if Path(name).is_dir() else "config.json from the local Hugging Face cache"
    except (OSError, ValueError):
        if name not in PUBLISHED_CONFIGS:
            raise UserError(
                f"model.name_or_path='{name}': no config.json here (not a local folder, not in the local Hugging "
                f"Face cache) and no published shape in trainer/families.py (known: {', '.join(PUBLISHED_CONFIGS)}). "
                f"Fix: download its config where there is network (hf download {name} config.json) "
                "or give a local folder"
            ) from None
        found, source = PUBLISHED_CONFIGS[name](), "the published configuration (trainer/families.py)"
    if not estimates_memory(found):
        raise UserError(
            f"model.name_or_path='{name}' is a {found.model_type!r} model; the planner knows "
            f"{', '.join(memory_families())}"
        )
    return found, source


# ---------------------------------------------------------------------------------------------
# Settings


def resolve_settings(config: Config, model_config, gpus: int) -> Settings:
    """Every `auto` resolved as the trainer resolves it (trainer/resolve.py)
    on a CUDA GPU with bfloat16. Raises the trainer's UserError for what it would refuse (a float32
    autocast-less full run in 16 bits, QLoRA or 8-bit AdamW under FSDP)."""
    from trainer.attention import choose_attention_for
    from trainer.model import lora_target_modules
    from trainer.resolve import activation_dtype, resolve_precision, resolve_strategy
    from trainer.strategy import check_fsdp_config

    resolved = config.model_copy(deep=True)
    if resolved.model.dtype == "auto":  # what resolve_dtype picks on a GPU with bfloat16
        resolved.model.dtype = "bfloat16"
    resolve_precision(resolved, torch.device("cuda"))
    mixed = resolved.training.mixed_precision
    cuda = torch.device("cuda")
    attention = choose_attention_for(model_config, activation_dtype(resolved), config.model.attention, cuda)
    strategy = resolve_strategy(config, gpus)
    if strategy == "fsdp":
        check_fsdp_config(config)
    packing = config.data.packing if config.data.packing != "auto" else family_of(model_config) is not None
    method = config.method
    targets = lora_target_modules(config, model_config) if method != "full" else []
    return Settings(
        method=method,
        base_dtype={"full": "float32", "qlora": "nf4"}.get(method, resolved.model.dtype),
        compute_dtype=resolved.model.dtype,
        autocast=mixed if mixed in AUTOCAST.values() else None,
        gradient_checkpointing=config.model.gradient_checkpointing,
        attention=attention,
        micro_batch_size=config.training.micro_batch_size,
        seq_len=config.data.max_seq_len,
        packing=packing,
        optimizer=config.training.optimizer,
        strategy=strategy,
        gpus=gpus,
        reshard_after_forward=config.distributed.reshard_after_forward,
        cpu_offload=config.distributed.cpu_offload,
        lora_r=config.lora.r,
        lora_dropout=config.lora.dropout,
        lora_targets=tuple(targets) if isinstance(targets, list) else (targets,),
    )


# ---------------------------------------------------------------------------------------------
# The parameters, as this method stores them


@dataclass(frozen=True)
class Tensor:
    """One parameter (or buffer) as the run holds it."""

    shape: tuple[int, ...]
    nbytes: int
    trained: bool
    block: int | None
    """Index of the transformer block (FSDP unit) that holds it; None: the root."""
    buffer: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Inventory:
    tensors: tuple[Tensor, ...]
    adapted: frozenset[str]
    """Short names of the modules LoRA wraps (q_proj, ...)."""

    @property
    def trained(self) -> list[Tensor]:
        return [t for t in self.tensors if t.trained]


def nf4_bytes(numel: int) -> int:
    """A 4-bit NF4 weight with double quantization, as bitsandbytes stores it: two weights a byte,
    an 8-bit absmax per block of 64, a float32 scale per 256 absmax, and its own copies of the
    16-entry NF4 code, the 256-entry map the absmax are quantized with, and their offset (float32)."""
    blocks = math.ceil(numel / 64)
    return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / 256) + 4 * (16 + 256 + 1)


def _meta_model(model_config, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(model_config), dtype=dtype)
    model.config.use_cache = False
    return model


def prepared_model(config: Config, model_config, method: str):
    """A meta-device model of `model_config` prepared by `trainer.model.apply_method` exactly as a
    run prepares it (LoRA's adapters included): full fine-tuning in float32, LoRA and QLoRA in
    model.dtype (QLoRA's linears are made 4-bit by `inventory_of`)."""
    from trainer.model import apply_method

    dtype = (
        torch.float32
        if method == "full"
        else torch_dtype("bfloat16" if config.model.dtype == "auto" else config.model.dtype)
    )
    model = _meta_model(model_config, dtype)
    return apply_method(config.model_copy(update={"method": "full" if method == "full" else "lora"}), model)


def inventory_of(model, method: str) -> Inventory:
    """The parameters and buffers of a `prepared_model` as `method` stores them on the GPU."""
    from trainer.unwrap import transformers_model

    inner = transformers_model(model)
    blocks = transformer_blocks(inner)
    block_of = {id(t): i for i, block in enumerate(blocks) for t in (*block.parameters(), *block.buffers())}
    quantizable = _quantized_weights(inner) if method == "qlora" else set()
    tensors = []
    for parameter in model.parameters():
        nbytes = parameter.numel() * parameter.element_size()
        if method == "qlora" and not parameter.requires_grad:  # 4-bit, or float32 after k-bit preparation
            nbytes = nf4_bytes(parameter.numel()) if id(parameter) in quantizable else parameter.numel() * 4
        tensors.append(Tensor(tuple(parameter.shape), nbytes, parameter.requires_grad, block_of.get(id(parameter))))
    for buffer in model.buffers():
        tensors.append(
            Tensor(
                tuple(buffer.shape),
                buffer.numel() * buffer.element_size(),
                False,
                block_of.get(id(buffer)),
                buffer=True,
            )
        )
    adapted = frozenset(name.rsplit(".", 1)[-1] for name, module in model.named_modules() if hasattr(module, "lora_A"))
    return Inventory(tuple(tensors), adapted)


def _quantized_weights(model) -> set[int]:
    """ids of the weights QLoRA loads in 4 bits: every linear layer (Linear, GPT-2's Conv1D) but the
    output head, as transformers' bitsandbytes integration converts them; LoRA's own A and B layers
    (trained, float32) are not the model's."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    adapters = {
        id(layer)
        for parent in model.modules()
        if hasattr(parent, "lora_A")
        for layer in (*parent.lora_A.values(), *parent.lora_B.values())
    }
    return {
        id(module.weight)
        for module in model.modules()
        if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not head and id(module) not in adapters
    }


# ---------------------------------------------------------------------------------------------
# Bytes per GPU


def optimizer_bytes(shape: tuple[int, ...], optimizer: str) -> int:
    """AdamW: two float32 moments and a float32 step; 8-bit AdamW: two uint8 moments and a float32
    absmax per 256 values (float32 moments for tensors under MIN_8BIT_SIZE, as bitsandbytes does)."""
    numel = math.prod(shape)
    if optimizer == "adamw":
        return 8 * numel + 4
    if numel < MIN_8BIT_SIZE:
        return 8 * numel
    return 2 * numel + 2 * 4 * math.ceil(numel / 256)


#: bitsandbytes' two 256-entry quantization maps, shared by all tensors of an 8-bit optimizer.
OPTIMIZER_8BIT_SHARED_BYTES = 2 * 256 * 4


def _shard(tensor: Tensor, gpus: int) -> tuple[int, ...]:
    """FSDP2 shards dimension 0, padded to a multiple of the GPU count."""
    if not tensor.shape:
        return ()
    return (math.ceil(tensor.shape[0] / gpus), *tensor.shape[1:])


def _shard_bytes(tensor: Tensor, gpus: int) -> int:
    return math.ceil(tensor.nbytes * math.prod(_shard(tensor, gpus)) / max(1, tensor.numel))


def state_bytes(inventory: Inventory, settings: Settings) -> tuple[dict, int]:
    """Weights, gradients and optimizer state per GPU, and the part of it in CPU memory."""
    fsdp = settings.strategy == "fsdp"
    gpus = settings.gpus if fsdp else 1
    params = [t for t in inventory.tensors if not t.buffer]
    sharded = sum(_shard_bytes(t, gpus) for t in params) if fsdp else sum(t.nbytes for t in params)
    buffers = sum(t.nbytes for t in inventory.tensors if t.buffer)
    trained = inventory.trained
    grads = sum(_shard_bytes(t, gpus) for t in trained)
    optimizer = sum(optimizer_bytes(_shard(t, gpus) if fsdp else t.shape, settings.optimizer) for t in trained)
    if settings.optimizer != "adamw" and trained:
        optimizer += OPTIMIZER_8BIT_SHARED_BYTES
    terms = {
        "weights_sharded" if fsdp else "weights_stored": sharded,
        "buffers": buffers,
        "gradients_stored": grads,
        "optimizer_state": optimizer,
    }
    if fsdp:
        terms.update(_fsdp_gathered(inventory, settings))
    elif settings.gpus > 1:
        terms["ddp_gradient_buckets"] = grads  # gradient_as_bucket_view is off: a second copy
    cpu = sharded + grads + optimizer if fsdp and settings.cpu_offload else 0
    return terms, cpu


def _fsdp_gathered(inventory: Inventory, settings: Settings) -> dict:
    """FSDP's unsharded copies in the compute dtype (trainer/strategy.py: param_dtype model.dtype):
    blocks for compute (the largest twice: the next one is prefetched; or all of them when nothing
    is resharded after forward), the root (embeddings, final norm, head) for the whole step, and one
    block's gradients before the reduce-scatter, with their float32 copy (reduce_dtype float32)."""
    size = torch_dtype(settings.compute_dtype).itemsize
    blocks: dict[int, int] = {}
    block_grads: dict[int, int] = {}
    root = 0
    for t in inventory.tensors:
        if t.buffer:
            continue
        if t.block is None:
            root += size * t.numel
        else:
            blocks[t.block] = blocks.get(t.block, 0) + size * t.numel
            if t.trained:
                block_grads[t.block] = block_grads.get(t.block, 0) + (size + 4) * t.numel
    largest = max(blocks.values(), default=0)
    gathered = sum(blocks.values()) if not settings.reshard_after_forward else 2 * largest
    return {
        "fsdp_gathered_blocks": gathered,
        "fsdp_gathered_root": root,
        "fsdp_unsharded_block_gradients": max(block_grads.values(), default=0),
    }


def activation_setup(settings: Settings, model_config, inventory: Inventory) -> ActivationSetup:
    """What the forward pass sees: the weights' and other parameters' dtypes under this method and
    strategy (FSDP computes with its gathered bf16 copies), autocast, LoRA, checkpointing."""
    autocast = autocast_dtype(settings.autocast) if settings.autocast else None
    compute = torch_dtype(settings.compute_dtype)
    if settings.method == "qlora":  # 4-bit linears computed in model.dtype; k-bit preparation: float32 rest
        weight, other = compute, torch.float32
    elif settings.method == "full":  # FSDP computes with its gathered copies, DDP with the float32 masters
        weight = other = compute if settings.strategy == "fsdp" else torch.float32
    else:
        weight = other = compute
    rows = settings.micro_batch_size * (settings.seq_len - 1)  # every position supervised: the worst case
    return ActivationSetup(
        model_config=model_config,
        micro_batch_size=settings.micro_batch_size,
        seq_len=settings.seq_len,
        supervised_rows=rows,
        weight_dtype=weight,
        other_dtype=other,
        autocast=autocast,
        full=settings.method == "full",
        lora_targets=inventory.adapted,
        lora_r=settings.lora_r,
        lora_dropout=settings.lora_dropout > 0,
        quantized=settings.method == "qlora",
        inputs_require_grad=settings.method == "qlora"
        or (settings.method == "lora" and settings.gradient_checkpointing),
        gradient_checkpointing=settings.gradient_checkpointing,
        attention=settings.attention,
        kernels=CUDA,
        autocast_cache=autocast_caches_weights(settings.method, settings.gradient_checkpointing),
    )


def _activation_details(acts: ActivationBytes) -> dict:
    return {
        "activations_kept_by_forward": acts.forward,
        "activations_backward_working_set": acts.backward,
        "activations_per_block": max(acts.blocks),
        "activations_loss_chunk": acts.loss_chunk,
        "activations_autocast_weight_copies": acts.weight_copies,
    }


def per_gpu_bytes(settings: Settings, model_config, inventory: Inventory) -> tuple[PerGpuBytes, dict, int]:
    """The four numbers, their terms, and the CPU bytes (offload)."""
    terms, cpu = state_bytes(inventory, settings)
    acts = estimate_activations(activation_setup(settings, model_config, inventory))
    offloaded = settings.cpu_offload and settings.strategy == "fsdp"
    weights = 0 if offloaded else terms.get("weights_sharded", terms.get("weights_stored", 0))
    weights += terms["buffers"] + terms.get("fsdp_gathered_blocks", 0) + terms.get("fsdp_gathered_root", 0)
    gradients = (0 if offloaded else terms["gradients_stored"]) + terms.get("ddp_gradient_buckets", 0)
    gradients += terms.get("fsdp_unsharded_block_gradients", 0)
    optimizer = 0 if offloaded else terms["optimizer_state"]
    return PerGpuBytes(weights, gradients, optimizer, acts.total), {**terms, **_activation_details(acts)}, cpu


# ---------------------------------------------------------------------------------------------
# The estimate, and what would fit


@dataclass
class _Planner:
    """One estimate's model shape and inventories (built once per method: LoRA's take seconds)."""

    config: Config
    model_config: object
    inventories: dict = field(default_factory=dict)
    models: dict = field(default_factory=dict)

    def inventory(self, config: Config) -> Inventory:
        method = config.method
        key = (method, config.model.dtype, config.lora.r, str(config.lora.target_modules))
        if key not in self.inventories:
            # QLoRA's and LoRA's adapters are the same: one peft build serves both.
            dtype = "float32" if method == "full" else config.model.dtype
            model_key = (
                method == "full",
                "bfloat16" if dtype == "auto" else dtype,
                config.lora.r,
                str(config.lora.target_modules),
            )
            if model_key not in self.models:
                self.models[model_key] = prepared_model(config, self.model_config, method)
            self.inventories[key] = inventory_of(self.models[model_key], method)
        return self.inventories[key]

    def evaluate(self, config: Config, gpus: int) -> tuple[Settings, PerGpuBytes, dict, int]:
        settings = resolve_settings(config, self.model_config, gpus)
        per_gpu, details, cpu = per_gpu_bytes(settings, self.model_config, self.inventory(config))
        return settings, per_gpu, details, cpu


def estimate_run(
    config: Config, *, gpus: int, gpu_memory_bytes: int, model_config=None, suggest: bool = True
) -> RunEstimate:
    """Estimate per-GPU memory of `config` on `gpus` GPUs of `gpu_memory_bytes` each and, when it
    does not fit (and `suggest`), the fewest changes that would, each with its per-GPU total.

    `model_config`: the transformers config when the caller has it (the trainer does), else it is
    found as `load_shape` says. Raises UserError for a model whose shape cannot be found and for
    settings the trainer refuses. Costs a few seconds of CPU (LoRA's adapters are added to a meta
    model by peft); the suggestions, when the run does not fit, a few more."""
    if gpus < 1 or gpu_memory_bytes < 1:
        raise UserError(f"gpus ({gpus}) and GPU memory ({gpu_memory_bytes} bytes) must be positive")
    source = "given by the caller"
    if model_config is None:
        model_config, source = load_shape(config)
    planner = _Planner(config, model_config)
    settings, per_gpu, details, cpu = planner.evaluate(config, gpus)
    held = planner.inventory(config)
    model = {
        "name_or_path": config.model.name_or_path,
        "model_type": model_config.model_type,
        "shape_from": source,
        "parameters": sum(t.numel for t in held.tensors if not t.buffer and not _is_lora_shape(t, settings)),
        "trained_parameters": sum(t.numel for t in held.trained),
    }
    estimate = RunEstimate(settings, model, per_gpu, details, cpu, gpu_memory_bytes, notes=_notes(settings, source))
    if suggest and not estimate.fits:
        estimate = RunEstimate(
            settings,
            model,
            per_gpu,
            details,
            cpu,
            gpu_memory_bytes,
            suggestions=tuple(_suggestions(planner, config, gpus, estimate.usable_bytes)),
            notes=estimate.notes,
        )
    return estimate


def _is_lora_shape(tensor: Tensor, settings: Settings) -> bool:
    """Adapter parameters are not the model's own (LoRA and QLoRA train only them)."""
    return settings.method in ("lora", "qlora") and tensor.trained


def _notes(settings: Settings, source: str) -> tuple[str, ...]:
    rows = (
        "packing fills each row"
        if settings.packing
        else "without data.packing a micro-batch is padded to its longest example, at most this"
    )
    plural = "s" if settings.micro_batch_size > 1 else ""
    return (
        f"shape: {source}",
        f"activations for {settings.micro_batch_size} row{plural} of {settings.seq_len} tokens ({rows}), every "
        "position supervised (the worst case for the chunked loss)",
        "CUDA assumed: auto settings resolve to bf16 and the attention a GPU would get",
        f"fits means at most {100 * (1 - HEADROOM):.0f}% of the GPU's memory: the rest is for the CUDA context, "
        "workspaces, NCCL buffers and allocator fragmentation",
    )


def _candidates(config: Config, gpus: int, settings: Settings) -> dict[str, list[tuple[dict, int, str]]]:
    """Per kind of change, its variants in order of preference: (overrides, gpus, label)."""
    kinds: dict[str, list[tuple[dict, int, str]]] = {}
    if not config.model.gradient_checkpointing:
        kinds["checkpointing"] = [({"model.gradient_checkpointing": True}, gpus, "model.gradient_checkpointing=true")]
    if config.method == "full" and config.training.optimizer == "adamw":
        kinds["8bit"] = [({"training.optimizer": "adamw_8bit"}, gpus, "training.optimizer=adamw_8bit")]
    adamw = {"training.optimizer": "adamw"} if config.training.optimizer != "adamw" else {}
    adamw_label = " training.optimizer=adamw" if adamw else ""
    if config.method == "full":
        kinds["lora"] = [({"method": "lora", **adamw}, gpus, "method=lora" + adamw_label)]
    if config.method != "qlora":
        kinds["qlora"] = [({"method": "qlora", **adamw}, gpus, "method=qlora" + adamw_label)]
    if config.method != "qlora":  # trainer/strategy.py: FSDP shards neither 4-bit weights nor 8-bit state
        sizes = [k for k in FSDP_SIZES if (k > gpus if settings.strategy == "fsdp" else k >= max(2, gpus))]
        kinds["fsdp"] = [
            ({"distributed.strategy": "fsdp", **adamw}, k, f"distributed.strategy=fsdp{adamw_label} --gpus {k}")
            for k in sizes
        ]
    batch, accumulation = config.training.micro_batch_size, config.training.gradient_accumulation_steps
    smaller = []
    for size in range(batch - 1, 0, -1):
        same_step = (batch * accumulation) % size == 0
        overrides = {"training.micro_batch_size": size}
        label = f"training.micro_batch_size={size}"
        if same_step:
            overrides["training.gradient_accumulation_steps"] = batch * accumulation // size
            label += f" training.gradient_accumulation_steps={batch * accumulation // size}"
        smaller.append((overrides, gpus, label))
    if smaller:
        kinds["micro_batch"] = smaller
    return kinds


def _with(config: Config, overrides: dict) -> Config | None:
    """`config` with dotted overrides, or None if the combination is invalid (e.g. 8-bit AdamW with LoRA)."""
    from pydantic import ValidationError

    tree = config.model_dump()
    for key, value in overrides.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    try:
        return Config.model_validate(tree)
    except ValidationError:
        return None


def _suggestions(planner: _Planner, config: Config, gpus: int, usable: int, most: int = 3) -> list[Suggestion]:
    """For each kind of change (checkpointing, 8-bit AdamW, LoRA, QLoRA, FSDP, a smaller
    micro-batch): the fewest changes including it that fit, each at its least drastic variant that
    fits (fewest GPUs, largest micro-batch). A set of changes is left out when a part of it fits
    alone. Fewest changes first, then the smallest total."""
    settings = resolve_settings(config, planner.model_config, gpus)
    kinds = _candidates(config, gpus, settings)
    tried: dict[frozenset, Suggestion | None] = {}

    def first_fit(chosen: tuple[str, ...]) -> Suggestion | None:
        if frozenset(chosen) not in tried:
            tried[frozenset(chosen)] = _first_fit(planner, config, kinds, chosen, usable)
        return tried[frozenset(chosen)]

    found: dict[frozenset, Suggestion] = {}
    for kind in kinds:
        for size in range(1, most + 1):
            fitting = {
                frozenset(chosen): fit
                for chosen in itertools.combinations(kinds, size)
                if kind in chosen
                for fit in [first_fit(chosen)]
                if fit is not None
            }
            if fitting:
                best = min(fitting, key=lambda chosen: fitting[chosen].per_gpu.total)
                found.setdefault(best, fitting[best])
                break
    minimal = {chosen: fit for chosen, fit in found.items() if not any(other < chosen for other in found)}
    return [minimal[c] for c in sorted(minimal, key=lambda c: (len(c), minimal[c].per_gpu.total))]


def _first_fit(
    planner: _Planner, config: Config, kinds: dict, chosen: tuple[str, ...], usable: int
) -> Suggestion | None:
    """The first combination of the chosen kinds' variants (in their order of preference) that fits."""
    for variants in itertools.product(*(kinds[k] for k in chosen)):
        changed = _with(config, {key: value for v in variants for key, value in v[0].items()})
        if changed is None:
            continue
        try:
            _, per_gpu, _, _ = planner.evaluate(changed, max(v[1] for v in variants))
        except UserError:  # a combination the trainer refuses (8-bit AdamW under FSDP)
            continue
        if per_gpu.total <= usable:
            return Suggestion(" ".join(v[2] for v in variants), per_gpu)
    return None


# ---------------------------------------------------------------------------------------------
# Text


def format_estimate(estimate: RunEstimate, config_path: str = "") -> str:
    """The CLI's human-readable report."""
    s, m, b = estimate.settings, estimate.model, estimate.per_gpu
    lines = [
        f"{config_path + ': ' if config_path else ''}{m['name_or_path']} ({m['model_type']}, {m['parameters']:,} "
        f"parameters; shape from {m['shape_from']})",
        f"  method {s.method}"
        + (
            f" (r {s.lora_r} on {', '.join(s.lora_targets)}; {m['trained_parameters']:,} trained parameters)"
            if s.method != "full"
            else f" ({m['trained_parameters']:,} trained parameters)"
        )
        + f", base weights {s.base_dtype}, autocast {s.autocast or 'off'}, optimizer {s.optimizer}",
        f"  {s.gpus} GPU{'s' if s.gpus > 1 else ''}, {s.strategy}"
        + (
            f" (reshard_after_forward {str(s.reshard_after_forward).lower()}, cpu_offload {str(s.cpu_offload).lower()})"
            if s.strategy == "fsdp"
            else ""
        )
        + f"; micro-batch {s.micro_batch_size} x {s.seq_len} tokens; gradient checkpointing "
        f"{'on' if s.gradient_checkpointing else 'off'}; attention {s.attention}",
        "",
        "per GPU:",
    ]
    for name, value, why in (
        ("weights", b.weights, _weights_note(estimate)),
        ("gradients", b.gradients, _gradients_note(estimate)),
        ("optimizer", b.optimizer, "" if b.optimizer or not estimate.cpu_bytes else "in CPU memory (cpu_offload)"),
        ("activations", b.activations, _activations_note(estimate)),
        ("total", b.total, ""),
    ):
        lines.append(f"  {name:<12}{human(value):>10}  {why}".rstrip())
    if estimate.cpu_bytes:
        lines.append(f"  (and {human(estimate.cpu_bytes)} of CPU memory per GPU: the offloaded shards)")
    lines += ["", estimate.verdict()]
    if not estimate.fits:
        if estimate.suggestions:
            lines.append("what would fit (estimated per-GPU total):")
            width = max(len(x.change) for x in estimate.suggestions)
            lines += [f"  {x.change:<{width}}  {human(x.per_gpu.total):>10}" for x in estimate.suggestions]
        else:
            lines.append("no combination of up to three changes fits (try a smaller model or more GPUs)")
    lines += ["", "assumptions: " + "; ".join(estimate.notes[1:]) + "."]
    return "\n".join(lines)


def _weights_note(estimate: RunEstimate) -> str:
    d = estimate.details
    if "fsdp_gathered_blocks" in d:
        return (
            f"{human(d.get('weights_sharded', 0))} shard + gathered in {estimate.settings.compute_dtype}: "
            f"{human(d['fsdp_gathered_blocks'])} blocks, {human(d['fsdp_gathered_root'])} root"
        )
    return ""


def _gradients_note(estimate: RunEstimate) -> str:
    d = estimate.details
    if "ddp_gradient_buckets" in d:
        return "and DDP's gradient buckets (a second copy)"
    if "fsdp_unsharded_block_gradients" in d:
        return (
            f"shard + one block's unsharded gradients, in {estimate.settings.compute_dtype} and float32 "
            f"({human(d['fsdp_unsharded_block_gradients'])})"
        )
    return ""


def _activations_note(estimate: RunEstimate) -> str:
    d = estimate.details
    return (
        f"{human(d['activations_kept_by_forward'])} kept by the forward pass + "
        f"{human(d['activations_backward_working_set'])} backward working set"
    )


def memory_message(config: Config, model_config, *, gpus: int, gpu_memory_bytes: int) -> str | None:
    """What training logs before loading the model on CUDA: a warning when the estimate exceeds
    the GPU, a note when the planner has no entry for the model's family (it trains all the same),
    else None."""
    from trainer.families import estimates_memory, memory_families

    if not estimates_memory(model_config):
        return (
            f"note: no memory estimate for model_type {model_config.model_type!r} (the planner knows "
            f"{', '.join(memory_families())}); training goes on without one"
        )
    warning = estimate_run(config, gpus=gpus, gpu_memory_bytes=gpu_memory_bytes, model_config=model_config).warning()
    return f"warning: {warning}" if warning else None
