"""bitsandbytes as the trainer uses it: imported without its import-time kernel warning, its
4-bit layers kept in the one weight layout that QLoRA training can use, and a model built without a
checkpoint (random weights) made 4-bit as loading a checkpoint makes it (`quantize_to_4bit`).

Two things bitsandbytes 0.50 does on CPUs with AVX512-BF16 that a trainer must handle:

- On import (also when peft is imported, which imports bitsandbytes whenever it is installed) it
  tries to fetch an optional fast kernel for 4-bit CPU *inference* from the Hugging Face Hub
  (`kernels-community/quantization-bitsandbytes`, through the `kernels` package) and, when that
  fails, logs "Failed to load CPU gemm_4bit_forward from kernels-community: ..." on the logger
  `bitsandbytes.backends.cpu.ops` (with HF_HUB_OFFLINE=1 the `kernels` package also logs that it
  skips the publisher check for that repository). It then falls back to the kernel bundled in its
  own library. Either kernel serves only the inference layout below, which the trainer turns off,
  so these lines say nothing about our commands: `quiet_bitsandbytes_import` filters exactly them.
- `Linear4bit.forward` repacks its weight into a CPU inference layout (bf16 scales, another nibble
  order) whenever it runs in eval mode on a CPU input that needs no gradient: evaluation and test
  prompts. Only `state_dict()` (or moving to a GPU) repacks it back, and lossily: the scales went
  through bf16 (in a random 256 x 256 layer the frozen weights moved by 0.2% of the largest one).
  The training forward on a repacked weight takes an inference-only path with no autograd: the
  next step fails ("a view of a leaf Variable that requires grad is being used in an in-place
  operation"), layers with in_features under the 64-value quantization block fail at once ("shape
  '[96, 0]' is invalid"), and a layer without a bias trains on a wrong gradient (the one through
  its base weight is lost; torch only warns). `keep_4bit_training_layout` prevents the repacking.
"""

from __future__ import annotations

import logging

import torch

from trainer.errors import UserError

#: What bitsandbytes' CPU backend logs at import when its optional Hub kernel does not load: its
#: own warning, and (with HF_HUB_OFFLINE=1) the `kernels` package's note on the same attempt.
BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
KERNEL_WARNING_START = "Failed to load CPU gemm_4bit_forward"
KERNELS_HUB_LOGGER = "kernels._internals.hf_hub"
KERNELS_OFFLINE_START = "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'"

#: The `Linear4bit` attribute (set in its __init__ from `bitsandbytes.functional.has_avx512bf16()`)
#: that bitsandbytes 0.50 consults before repacking a weight for CPU inference.
REPACK_FLAG = "support_avx512bf16_for_cpu"

#: Our own line for the dropped warning, shown once when QLoRA loads (see `kernel_notice`).
KERNEL_NOTICE = (
    "bitsandbytes: its optional Hugging Face Hub kernel for fast 4-bit CPU inference did not load; QLoRA here "
    "does not use that path (4-bit weights stay in the training layout for evaluation and test prompts too), "
    "so training is unaffected"
)


class _DropLinesStartingWith(logging.Filter):
    """Drops one logger's records whose text starts with `start`, and remembers that one came;
    every other record passes."""

    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start
        self.dropped = False

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith(self.start):
            self.dropped = True
            return False
        return True


_kernel_filter = _DropLinesStartingWith(KERNEL_WARNING_START)
_FILTERS = {BNB_CPU_LOGGER: _kernel_filter, KERNELS_HUB_LOGGER: _DropLinesStartingWith(KERNELS_OFFLINE_START)}


def quiet_bitsandbytes_import() -> None:
    """Keep bitsandbytes' import-time kernel lines out of our commands' output. Call it before
    anything imports bitsandbytes or peft: it installs filters on two loggers (the objects the
    libraries' own `getLogger(__name__)` will return), imports nothing and costs nothing; calling it
    again changes nothing."""
    for name, line_filter in _FILTERS.items():
        logger = logging.getLogger(name)
        if line_filter not in logger.filters:
            logger.addFilter(line_filter)


def import_bitsandbytes():
    """`import bitsandbytes`, quietly. ImportError passes through for the caller to explain."""
    quiet_bitsandbytes_import()
    import bitsandbytes

    return bitsandbytes


def kernel_notice() -> str | None:
    """What the dropped warning means for a QLoRA run, or None when bitsandbytes did not emit it
    (no AVX512-BF16, the kernel loaded, or it was printed before the filter was installed)."""
    return KERNEL_NOTICE if _kernel_filter.dropped else None


def keep_4bit_training_layout(model: torch.nn.Module, device: torch.device) -> int:
    """Stop bitsandbytes from repacking `model`'s 4-bit weights for CPU inference; returns how many
    `Linear4bit` layers it set.

    Needed by bitsandbytes 0.50 (0.50.2 checked) on CPUs with AVX512-BF16: `Linear4bit.forward`
    repacks its weight whenever the layer is in eval mode and its CPU input needs no gradient, which
    is every evaluation and test-prompt generation of a QLoRA run, and training cannot continue on a
    repacked weight (see the module docstring). bitsandbytes has no public switch for it; the layer
    attribute `support_avx512bf16_for_cpu` is the flag its forward checks, so it is set to False on
    each layer: evaluation and generation then use the same dequantize-and-multiply path as
    training. The repack only happens on the CPU; on a GPU a bitsandbytes without the attribute is
    fine, on the CPU it is refused with its version rather than risking a run that dies at its
    first checkpoint."""
    bitsandbytes = import_bitsandbytes()
    layers = [module for module in model.modules() if isinstance(module, bitsandbytes.nn.Linear4bit)]
    for layer in layers:
        if not hasattr(layer, REPACK_FLAG):
            if device.type != "cpu":
                return 0
            raise UserError(
                f"QLoRA on the CPU: bitsandbytes {bitsandbytes.__version__} changed how its 4-bit layers decide to "
                f"repack weights for CPU inference (Linear4bit has no '{REPACK_FLAG}'), which the trainer turns off "
                "so that evaluation and test prompts do not break the next training step. Fix: pip install "
                "'bitsandbytes>=0.50,<0.51' (the versions this trainer is tested with), or run QLoRA on a GPU"
            )
        setattr(layer, REPACK_FLAG, False)
    return len(layers)


def quantize_to_4bit(model, quantization_config, device: torch.device) -> None:
    """Replace every `nn.Linear` but the output head by bitsandbytes' `Linear4bit` holding the same
    weights in NF4, as `from_pretrained(quantization_config=...)` does while loading a checkpoint
    (transformers' `replace_with_bnb_linear` + `Bnb4bitQuantize`); quantization happens on `.to()`."""
    bnb = import_bitsandbytes()

    head = model.get_output_embeddings()
    # Names, not modules: holding a list of the Linear modules would keep every bf16 weight alive
    # until the end, instead of freeing each one as soon as its 4-bit copy exists.
    names = [name for name, module in model.named_modules() if type(module) is torch.nn.Linear and module is not head]
    for name in names:
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        child = getattr(parent, attribute)
        with torch.device("meta"):
            quantized = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=quantization_config.bnb_4bit_compute_dtype,
                compress_statistics=quantization_config.bnb_4bit_use_double_quant,
                quant_type=quantization_config.bnb_4bit_quant_type,
                quant_storage=quantization_config.bnb_4bit_quant_storage,
            )
        quantized.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, **quantized.weight.__dict__).to(
            device
        )
        if child.bias is not None:
            quantized.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
        setattr(parent, attribute, quantized)
        del child  # the last reference to the bf16 weight
    model.is_loaded_in_4bit = True  # what peft checks to wrap Linear4bit layers
