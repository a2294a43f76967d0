"""How the model is spread over the processes: replicated (DDP) or sharded (FSDP2).

`Replicated`: every process holds the whole model; accelerate wraps it in DDP (or nothing, on one
process), which all-reduces the gradients. The right choice for LoRA and QLoRA, whose trained
weights are small, and for anything that fits on one GPU.

`Sharded`: PyTorch's FSDP2 (`fully_shard`) splits every transformer block, then the rest of the
model, over the processes: each holds 1/N of the weights, gradients and optimizer state, and gathers
a block's weights only while it computes. Weights are kept in float32 (master weights) and gathered
in the compute dtype (`model.dtype`), gradients reduced in float32. Loading never needs a full copy
of the model in every process: the main process loads it on the CPU, the others build it on the meta
device (no memory), and the weights are broadcast from the main process shard by shard. In one
process (`distributed.strategy: fsdp` under plain `python`) it shards over a process group of one
that it makes itself, so the run is the one it would be on several processes (CPU offload, the
sharded resumable state), with a single shard.

Both offer the same operations to the recipe, so the training loop does not branch on the strategy:
build the model, prepare model and optimizer, skip the gradient sync on accumulation steps, clip
gradients, and give the full state dict for a checkpoint (collective under FSDP: every process
calls it, the main process gets the tensors).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from trainer.config import Config
from trainer.distributed import LauncherConflict, ensure_process_group, launcher_wrap_classes
from trainer.errors import UserError
from trainer.families import family_of, transformer_blocks
from trainer.model import apply_method, load_model, load_model_config
from trainer.precision import torch_dtype
from trainer.resolve import resolve_strategy
from trainer.unwrap import transformers_model


def check_fsdp_config(config: Config) -> None:
    """What FSDP here cannot do, refused before anything loads."""
    if config.method == "qlora":
        raise UserError(
            "distributed.strategy=fsdp cannot shard QLoRA's 4-bit weights. Fix: set distributed.strategy=ddp "
            "(QLoRA's frozen 4-bit model fits on one GPU) or method=lora/full"
        )
    if config.training.optimizer != "adamw":
        raise UserError(
            f"training.optimizer={config.training.optimizer} keeps 8-bit state that FSDP cannot shard. "
            "Fix: set training.optimizer=adamw (FSDP already divides the optimizer state by the number of GPUs)"
        )
    if config.training.compile:
        raise UserError(
            "training.compile is not supported with distributed.strategy=fsdp yet. Fix: set training.compile=false"
        )


class Replicated:
    """DDP through accelerate (or one process): see the module docstring."""

    sharded = False

    def __init__(self, accelerator, config: Config):
        self.accelerator, self.config = accelerator, config

    def build_model(self, *, random_weights: bool = False, model_config=None) -> torch.nn.Module:
        """`random_weights`, `model_config`: as `trainer.model.load_model` takes them (the doctor)."""
        model, _ = load_model(
            self.config, self.accelerator.device, random_weights=random_weights, model_config=model_config
        )
        return apply_method(self.config, model)

    def prepare(self, model, optimizer):
        if self.config.training.compile:
            model = torch.compile(model)
        return self.accelerator.prepare(model, optimizer)

    def no_sync(self, model):
        return self.accelerator.no_sync(model)

    def clip_grad_norm(self, model, max_norm: float) -> float:
        # float() waits for the GPU: once per step.
        return float(self.accelerator.clip_grad_norm_(model.parameters(), max_norm))

    def unwrap(self, model) -> torch.nn.Module:
        return self.accelerator.unwrap_model(model, keep_torch_compile=False)

    def full_state_dict(self, model) -> dict[str, torch.Tensor] | None:
        """Every weight, on the main process (None elsewhere)."""
        return self.unwrap(model).state_dict() if self.accelerator.is_main_process else None


class Sharded:
    """FSDP2: see the module docstring."""

    sharded = True

    def __init__(self, accelerator, config: Config):
        check_fsdp_config(config)
        self.accelerator, self.config = accelerator, config

    def _mixed_precision(self):
        from torch.distributed.fsdp import MixedPrecisionPolicy

        compute = torch_dtype(self.config.model.dtype)
        if compute == torch.float32:
            return None
        return MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)

    def build_model(self, *, random_weights: bool = False, model_config=None) -> torch.nn.Module:
        """Main process: the real model on the CPU, method applied (LoRA initialised from the seed);
        the others: the same model on the meta device. Then shard, and broadcast the weights.
        `random_weights`, `model_config`: as `trainer.model.load_model` takes them (the doctor)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

        acc, config = self.accelerator, self.config
        main = acc.is_main_process
        if acc.num_processes == 1:
            ensure_process_group(acc.device)  # no launcher made one; shut down in trainer.distributed.shutdown
        self.check_wrap_classes()
        model, _ = load_model(
            config, torch.device("cpu"), on_meta=not main, random_weights=random_weights, model_config=model_config
        )
        model = apply_method(config, model)
        if family_of(model) is None:
            raise UserError(
                f"distributed.strategy=fsdp needs to know the model's transformer blocks, and "
                f"{type(transformers_model(model)).__name__} has no entry in trainer/families.py. Fix: use "
                "distributed.strategy=ddp, or add the family (README: one place per model family)"
            )
        full = model.state_dict() if main else {}
        buffers = {name: buffer.clone() for name, buffer in model.named_buffers()} if main else {}
        options = dict(
            mp_policy=self._mixed_precision(),
            offload_policy=CPUOffloadPolicy() if config.distributed.cpu_offload else None,
        )
        options = {key: value for key, value in options.items() if value is not None}
        inner = transformers_model(model)
        for block in transformer_blocks(inner):
            fully_shard(block, reshard_after_forward=config.distributed.reshard_after_forward, **options)
        # The root is the transformers model itself, not PEFT's wrapper: generate() runs its forward.
        # FSDP keeps the root's weights (embeddings, final norm, head) gathered from its forward to
        # the end of the backward pass, which the chunked loss needs: it applies the head after the
        # forward (trainer/loss.py).
        fully_shard(inner, **options)
        device = torch.device("cpu") if config.distributed.cpu_offload else acc.device
        if not main:
            model.to_empty(device=device)
        elif device.type != "cpu":
            model.to(device)
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        # Buffers that are not in the state dict (rotary tables) were never loaded on the meta device.
        for name, buffer in model.named_buffers():
            if main:
                buffer.copy_(buffers[name])
            torch.distributed.broadcast(buffer, src=0)
        total = sum(p.numel() for p in model.parameters())  # a DTensor's numel is the whole tensor's
        print(
            f"[rank {acc.process_index}] FSDP: this process holds {self.held_parameters(model):,} of {total:,} "
            "parameters",
            flush=True,
        )
        return model

    def check_wrap_classes(self) -> None:
        """An accelerate config's `fsdp_transformer_layer_cls_to_wrap` must name the blocks that are
        sharded here (one per transformer block), or it would be ignored without a word. Checked
        from config.json, before the weights load (a family without an entry is refused later)."""
        named = launcher_wrap_classes()
        family = family_of(load_model_config(self.config)) if named else None
        blocks = {family.block_class} if family else set()
        if family and not blocks <= set(named):
            raise LauncherConflict(
                f"the accelerate launcher asks FSDP to wrap {', '.join(named)} (FSDP_TRANSFORMER_CLS_TO_WRAP, "
                f"`fsdp_transformer_layer_cls_to_wrap` in the accelerate config file), but this model's transformer "
                f"blocks, which are sharded one by one, are {', '.join(sorted(blocks))}. Fix: set "
                f"`fsdp_transformer_layer_cls_to_wrap: {','.join(sorted(blocks))}` in the accelerate config file "
                "(or remove it)",
                setting="FSDP_TRANSFORMER_CLS_TO_WRAP",
                value=",".join(named),
            )

    def prepare(self, model, optimizer):
        return model, optimizer

    @contextmanager
    def no_sync(self, model):
        """Accumulation micro-batches: keep gradients local until the step's last micro-batch."""
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    def clip_grad_norm(self, model, max_norm: float) -> float:
        norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_norm)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        return float(norm)  # waits for the GPU: once per step

    def unwrap(self, model) -> torch.nn.Module:
        return model  # FSDP2 shards in place: no wrapper

    def full_state_dict(self, model) -> dict[str, torch.Tensor] | None:
        """Collective: every process must call it. The main process gets every weight, gathered
        from all shards onto its CPU; the others get None."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return full if self.accelerator.is_main_process else None

    def held_parameters(self, model) -> int:
        """Parameters this process holds: its shards."""
        return sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())


def make_strategy(accelerator, config: Config):
    """The strategy a resolved config names (`distributed.strategy`; `auto`, in a config that was
    not resolved, as `trainer.resolve.resolve_strategy` resolves it for the accelerator's processes)."""
    return (
        Sharded(accelerator, config)
        if resolve_strategy(config, accelerator.num_processes) == "fsdp"
        else Replicated(accelerator, config)
    )


def sharded_training_state(model, optimizer) -> dict:
    """The trained weights (frozen ones left out) and the optimizer state, as each process's shards,
    for torch.distributed.checkpoint."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    return {
        "model": get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True)),
        "optimizer": get_optimizer_state_dict(model, optimizer),
    }


def load_sharded_training_state(model, optimizer, checkpoint_id) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    state = sharded_training_state(model, optimizer)
    dcp.load(state, checkpoint_id=str(checkpoint_id))
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
