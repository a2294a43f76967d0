"""Peak memory during training steps, measured: what the planner's estimate is held against.

On CUDA `torch.cuda.max_memory_allocated`; on Linux CPUs the process's peak RSS (VmHWM) growth;
elsewhere not measured. Used by `python -m trainer.doctor --speed` and scripts/bench.py.
"""

from __future__ import annotations

import ctypes
import gc

import torch


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory of one row: on CUDA `torch.cuda.max_memory_allocated` (reset once the model and
    optimizer are built, so a QLoRA model's bf16 construction does not count); on Linux CPUs the
    process's peak RSS during the steps (VmHWM, reset through /proc/self/clear_refs) minus its RSS
    before the model was built; elsewhere None."""

    def __init__(self, device: torch.device):
        self.device = device
        self.baseline_kb: int | None = None
        self.supported = True

    @property
    def label(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated during the steps (weights, optimizer state, activations)"
        return "CPU: process peak RSS during the steps minus RSS before the model was built (approximate)"

    def before_model(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            return
        try:  # hand freed heap back to the OS, so the next row's growth shows in RSS
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        self.baseline_kb = _status_kb("VmRSS")

    def before_steps(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        except OSError:
            self.supported = False

    def peak_bytes(self) -> int | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        peak = _status_kb("VmHWM")
        if not self.supported or peak is None or self.baseline_kb is None:
            return None
        return (peak - self.baseline_kb) * 1024
