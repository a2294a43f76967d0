"""trainer/peak_memory.py directly: the CPU measure sees memory the steps take."""

import sys

import pytest
import torch

from trainer.peak_memory import PeakMemory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CPU measure reads /proc/self (Linux)")
def test_the_cpu_peak_counts_what_was_allocated_after_the_baseline():
    memory = PeakMemory(torch.device("cpu"))
    memory.before_model()
    memory.before_steps()
    held = torch.ones(64 * 2**20 // 4)  # 64 MiB, written: resident
    peak = memory.peak_bytes()
    del held
    assert peak is not None and peak >= 60 * 2**20, peak
    assert memory.label.startswith("CPU: process peak RSS")


def test_without_a_baseline_nothing_is_claimed():
    assert PeakMemory(torch.device("cpu")).peak_bytes() is None
