"""Crash injection for the resume tests: `kill -9` at an exact point of a run.

    TRAINER_CRASH_AT=state_save@6          SIGKILL this process while it saves the state of step 6
    TRAINER_CRASH_AT=mid_step@3:1          ... in the middle of step 3, on rank 1 only

Points: `mid_step` (after the first micro-batch's backward, before the optimizer step),
`state_save` (resumable-state files written, not yet complete), `checkpoint_save` (checkpoint files
written, not yet renamed). Unset (always, outside the tests), `crash_point` does nothing.
"""

from __future__ import annotations

import os
import signal

ENV = "TRAINER_CRASH_AT"


def _target() -> tuple[str, int, int | None] | None:
    spec = os.environ.get(ENV)
    if not spec:
        return None
    point, _, rest = spec.partition("@")
    step, _, rank = rest.partition(":")
    return point, int(step), int(rank) if rank else None


def crash_point(point: str, step: int, rank: int = 0) -> None:
    """SIGKILL this process if `TRAINER_CRASH_AT` names this point, step and (optionally) rank."""
    target = _target()
    if target and target[0] == point and target[1] == step and target[2] in (None, rank):
        os.kill(os.getpid(), signal.SIGKILL)
