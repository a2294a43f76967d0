"""Decisions every process of a run must make alike: one process decides, or all agree.

A decision taken on the main process alone (what to do with the run folder, a user error found
there) is shared with the others, so a user error ends every process with the same message and
exit code instead of leaving them waiting in a collective until the launcher kills them.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch
from accelerate.utils import broadcast_object_list

from trainer.errors import UserError

T = TypeVar("T")


def decide_on_main(accelerator, decide: Callable[[], T]) -> T:
    """Run `decide` on the main process and return its result on every process; a `UserError` it
    raises is raised on every process (marked `shared`, so only the main process prints it)."""
    if accelerator.num_processes == 1:
        return decide()
    outcome: list = [None]
    if accelerator.is_main_process:
        try:
            outcome[0] = ("ok", decide())
        except UserError as err:
            outcome[0] = ("error", err)
    broadcast_object_list(outcome, from_process=0)
    kind, value = outcome[0]
    if kind == "error":
        value.shared = True
        raise value
    return value


def sum_over_processes(accelerator, values: list[float]) -> list[float]:
    """Element-wise sum of `values` over all processes (one small all-reduce; a GPU sync)."""
    if accelerator.num_processes == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    return accelerator.reduce(tensor, reduction="sum").tolist()


def all_processes_ok(accelerator, ok: bool) -> bool:
    """True when `ok` is true on every process."""
    return sum_over_processes(accelerator, [0.0 if ok else 1.0])[0] == 0
