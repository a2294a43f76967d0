"""Model FLOPs per training step and model FLOPs utilization (MFU), as plain functions.

The conventions (docs/BENCHMARKS.md explains them with examples):

* `N`, the matmul parameters: the weights of every matrix multiply a token goes through, i.e. the
  attention and MLP projections of every layer (`4 d^2 + 2 d d_ff` per layer: q, k, v, out and the
  two MLP matrices; GPT-2, GPT-J and GPT-NeoX all have this shape) and the output head (`d * vocab`,
  tied or not). Left out: the input embedding (a table lookup, no multiply), biases, layer norms,
  rotary embeddings, softmax and the loss: together well under 1% of the total for these models.
* Dense FLOPs per token: a multiply-add is 2 FLOPs, so the forward pass costs `2` per weight; the
  backward pass costs `2` per weight for the gradient with respect to the activations (needed for
  frozen weights too, to reach the trained ones below) plus `2` per *trained* weight for its own
  gradient. Full fine-tuning trains all `N`: 6N. LoRA (and QLoRA: dequantized 4-bit weights cost the
  same multiplies) freezes `N` and trains the adapters' `N_adapter` matrices: 4N + 6 N_adapter.
* Attention scores and weighted values (`QK^T` and `AV`): `2 * 2 * d` FLOPs per (query, key) pair per
  layer forward, three times that for forward + backward (both inputs of each matmul need a
  gradient), whatever the method. A causal example of `L` tokens has about `L^2 / 2` pairs, so it
  costs `6 * n_layer * d * L^2` FLOPs, i.e. `6 * n_layer * d * L` per token (PaLM's `12 n_layer d L`,
  halved for causal masking as FlashAttention counts it). `L` is each *example's* real length: a
  packed row of three examples costs the sum of three squares, not the square of the row; padding
  costs nothing (wasted work is what utilization is meant to expose).
* MFU = model FLOPs / seconds / the hardware's dense (no sparsity) bf16 peak. Recomputation for
  gradient checkpointing is not model FLOPs (that would be hardware FLOPs utilization), and neither
  are the head multiplies the chunked loss skips on unsupervised positions: the same useful work is
  counted for every way of computing it, so MFU ratios equal throughput ratios.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    """The sizes the FLOP formulas need."""

    n_layer: int
    d_model: int
    d_ff: int
    vocab: int


@dataclass(frozen=True)
class Peak:
    """A device's stated dense bf16 peak, with the name it is reported under."""

    name: str
    tflops: float


#: Dense (no 2:4 sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, matched against
#: `torch.cuda.get_device_name()` ("NVIDIA H100 80GB HBM3" is the SXM part): (words that must all
#: appear, words that must not, peak). The NVL parts have other clocks and are left out on purpose.
GPU_PEAKS: tuple[tuple[tuple[str, ...], tuple[str, ...], Peak], ...] = (
    (("H200",), ("NVL",), Peak("NVIDIA H200 SXM (dense bf16)", 989.0)),
    (("H100", "PCIE"), (), Peak("NVIDIA H100 PCIe (dense bf16)", 756.0)),
    (("H100", "HBM3"), ("NVL",), Peak("NVIDIA H100 SXM (dense bf16)", 989.0)),
    (("H100", "SXM"), ("NVL",), Peak("NVIDIA H100 SXM (dense bf16)", 989.0)),
    (("A100",), (), Peak("NVIDIA A100 (dense bf16)", 312.0)),
)


def gpu_peak(device_name: str) -> Peak | None:
    """The dense bf16 peak of a GPU named as `torch.cuda.get_device_name()` names it, or None when
    it is not in `GPU_PEAKS` (MFU is then reported as n/a rather than against a guess)."""
    upper = device_name.upper()
    for required, excluded, peak in GPU_PEAKS:
        if all(word in upper for word in required) and not any(word in upper for word in excluded):
            return peak
    return None


def matmul_params(shape: ModelShape) -> int:
    """N: weights in the matrix multiplies of one token's forward pass (layers and output head)."""
    d = shape.d_model
    return shape.n_layer * (4 * d * d + 2 * d * shape.d_ff) + d * shape.vocab


def dense_flops_per_token(frozen: int, trained: int) -> int:
    """Forward + backward FLOPs per token of matmuls with `frozen` + `trained` weights:
    2 (forward) + 2 (activation gradient) per weight, + 2 (weight gradient) per trained weight.
    Full fine-tuning: (0, N) -> 6N. LoRA / QLoRA: (N, N_adapter) -> 4N + 6 N_adapter."""
    return 4 * (frozen + trained) + 2 * trained


def attention_flops(lengths: Iterable[int], n_layer: int, d_model: int) -> int:
    """Forward + backward FLOPs of causal attention scores and values over examples of these real
    lengths: 6 * n_layer * d_model * L^2 each (6 * n_layer * d_model * L per token)."""
    return 6 * n_layer * d_model * sum(length * length for length in lengths)


def training_flops(lengths: Iterable[int], shape: ModelShape, *, method: str, adapter_params: int = 0) -> int:
    """Model FLOPs of one forward + backward pass over examples of these real lengths.

    `method` is `full`, `lora` or `qlora`; `adapter_params` counts the LoRA matrices (A and B) and
    is ignored for `full`.
    """
    lengths = list(lengths)
    n = matmul_params(shape)
    if method == "full":
        per_token = dense_flops_per_token(frozen=0, trained=n)
    elif method in ("lora", "qlora"):
        per_token = dense_flops_per_token(frozen=n, trained=adapter_params)
    else:
        raise ValueError(f"unknown method {method!r}; expected full, lora or qlora")
    return sum(lengths) * per_token + attention_flops(lengths, shape.n_layer, shape.d_model)


def mfu(flops: float, seconds: float, peak_tflops: float) -> float:
    """Model FLOPs utilization: achieved FLOP/s as a fraction of the peak (0.5 means 50%)."""
    if seconds <= 0 or peak_tflops <= 0:
        raise ValueError("seconds and peak_tflops must be positive")
    return flops / seconds / (peak_tflops * 1e12)
