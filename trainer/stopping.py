"""When a run must stop early: stop signals, and the job's time limit.

Signal handlers only set a flag (saving inside a handler can hang: Lightning#21406). The training
loop reads the flag at each optimizer-step boundary, all processes agree on it, and the run saves
its resumable state and exits with code 75. SIGTERM (what most clusters and `kill` send), SIGUSR1
(what SLURM's `--signal` sends) and SIGINT (Ctrl-C) all mean "stop at the next step boundary"; a
second Ctrl-C means "now".

`Deadline` turns `training.time_limit` (or, under SLURM, the job's end time) into the same stop,
early enough that the last step, a checkpoint if one is due and the state save still fit.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field

from trainer.errors import TimeLimitTooShort

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([dhms])")
_UNIT_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_duration(text: str | int | float) -> float:
    """Seconds in `23h30m`, `90m`, `1d12h`, `3600s` or a plain number of seconds."""
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        compact = str(text).strip().lower().replace(" ", "")
        if re.fullmatch(r"\d+(\.\d+)?", compact):
            seconds = float(compact)
        elif compact and _DURATION_PART.sub("", compact) == "":
            seconds = sum(float(n) * _UNIT_SECONDS[unit] for n, unit in _DURATION_PART.findall(compact))
        else:
            raise ValueError(f"{text!r} is not a duration: write it like 23h30m, 90m, 1d12h or 3600s")
    if seconds <= 0:
        raise ValueError(f"{text!r} is not a positive duration")
    return seconds


def parse_slurm_time_left(text: str) -> float | None:
    """Seconds in squeue's `%L` (time left): `[days-]hours:minutes:seconds`, `minutes:seconds`, or
    None for `UNLIMITED`, `NOT_SET`, `INVALID` and anything else unparseable."""
    match = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", text.strip())
    if not match:
        return None
    days, hours, minutes, seconds = (int(part or 0) for part in match.groups())
    return float(((days * 24 + hours) * 60 + minutes) * 60 + seconds)


def slurm_seconds_left(environ=os.environ, now: float | None = None) -> float | None:
    """Seconds until this SLURM job's end time, or None outside SLURM or when it has no limit.

    `SLURM_JOB_END_TIME` (a Unix time, set by recent SLURM versions) is read first; otherwise
    `squeue -j $SLURM_JOB_ID -o %L` is asked, with a short timeout."""
    job = environ.get("SLURM_JOB_ID")
    if not job:
        return None
    now = time.time() if now is None else now
    end = environ.get("SLURM_JOB_END_TIME", "")
    if end.isdigit() and int(end) > 0:
        return int(end) - now
    try:
        result = subprocess.run(["squeue", "-h", "-j", job, "-o", "%L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_slurm_time_left(result.stdout) if result.returncode == 0 else None


class StopSignals:
    """Install flag-only handlers for the stop signals while the run is in its `with` block.

    `requested` names the first stop signal received (None: none yet). A second SIGINT raises
    KeyboardInterrupt at once. The previous handlers come back on exit, so in-process callers
    (tests) keep theirs.
    """

    def __init__(self):
        self.requested: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.requested == "SIGINT":
            raise KeyboardInterrupt
        self.requested = self.requested or signal.Signals(signum).name

    def __enter__(self) -> "StopSignals":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


#: Margin = MARGIN_FACTOR x (what must still fit) + MARGIN_SECONDS, for the process exit and for
#: timings that vary.
MARGIN_FACTOR = 1.2
MARGIN_SECONDS = 10.0


@dataclass
class Deadline:
    """The time by which the job must have saved its state and exited, and the longest step,
    checkpoint and state save seen so far (carried over a resume in the state)."""

    end: float | None
    """`time.time()` at which the job is out of time, or None for no limit."""
    longest: dict[str, float] = field(default_factory=lambda: {"step": 0.0, "checkpoint": 0.0, "state": 0.0})

    @classmethod
    def for_job(cls, time_limit: str | None, started: float, environ=os.environ) -> "Deadline":
        """`training.time_limit` counted from `started`; without one, the SLURM job's end time."""
        if time_limit is not None:
            return cls(started + parse_duration(time_limit))
        left = slurm_seconds_left(environ)
        return cls(None if left is None else time.time() + left)

    def record(self, kind: str, seconds: float) -> None:
        self.longest[kind] = max(self.longest[kind], seconds)

    def margin(self, checkpoint_due: bool) -> float:
        """Seconds needed for one more step, its checkpoint if one is due, and a state save."""
        needed = self.longest["step"] + self.longest["state"] + (self.longest["checkpoint"] if checkpoint_due else 0.0)
        return MARGIN_FACTOR * needed + MARGIN_SECONDS

    def too_short(self, now: float, time_limit: str | None, *, after_first_step: bool) -> TimeLimitTooShort | None:
        """The error for a time limit that leaves no room for a second step of this job (checked
        after setup, with the timings a resumed state carries, and after the job's first step):
        every job would train one step, save and stop, and a requeue loop would never end."""
        if self.end is None:
            return None
        left, needed = self.end - now, self.margin(checkpoint_due=False)
        if left >= needed and not after_first_step:
            return None
        source = f"training.time_limit={time_limit}" if time_limit else "the SLURM job's time limit"
        measured = ", ".join(f"{kind} {seconds:.1f} s" for kind, seconds in self.longest.items() if seconds)
        when = "after its first step" if after_first_step else "after setup"
        return TimeLimitTooShort(
            f"{source} leaves this job {max(left, 0):.0f} s {when}, but one step, a state save and the margin "
            f"need {needed:.0f} s ({MARGIN_FACTOR:g} x ({measured or 'no step measured yet'}) + {MARGIN_SECONDS:g} s): "
            f"every job would train a single step.{' The resumable state is saved.' if after_first_step else ''} "
            f"Fix: give the job more time "
            f"({'training.time_limit' if time_limit else 'sbatch --time'}), at least {needed * 5:.0f} s",
            seconds_left=left,
            seconds_needed=needed,
        )

    def must_stop(self, now: float, next_step_has_checkpoint: bool) -> bool:
        """True when the next step (and its checkpoint) might not leave time to save the state."""
        return self.end is not None and now + self.margin(next_step_has_checkpoint) > self.end


def boundary_decision(
    step: int,
    signalled: bool,
    interval_due: bool,
    out_of_time: bool,
    *,
    checkpoint_steps: list[int],
    state_every_steps: int | None,
    own_signal: str | None,
) -> tuple[bool, bool, str]:
    """(stop now, save the state now, why) at the boundary after `step`, from the flags every
    process agreed on: a stop signal on any process, the time limit, the state interval."""
    every_steps = bool(state_every_steps) and step % state_every_steps == 0
    if signalled:
        reason = f"signal {own_signal}" if own_signal else "stop signal on another process"
    elif out_of_time:
        reason = "time limit"
    else:
        reason = "checkpoint" if step in checkpoint_steps else "interval"
    return signalled or out_of_time, step in checkpoint_steps or every_steps or interval_due, reason


class StopPolicy:
    """What the loop asks at every step boundary: stop now? save the state now? why? The same
    answer on every process: a stop signal on any process counts, and the main process's clock
    alone decides the time limit and the state interval (the others get `Deadline(None)`)."""

    def __init__(self, signals: StopSignals | None, deadline: Deadline, checkpoints_config, *, time_limit, is_main):
        self.signals, self.deadline, self.is_main = signals, deadline, is_main
        self.state_every_minutes = checkpoints_config.state_every_minutes
        self.state_every_steps = checkpoints_config.state_every_steps
        self.time_limit = time_limit
        self.last_state_time = time.time()

    @classmethod
    def for_job(cls, signals, started: float, training_config, checkpoints_config, *, is_main: bool) -> "StopPolicy":
        time_limit = training_config.time_limit
        deadline = Deadline.for_job(time_limit, started) if is_main else Deadline(None)
        return cls(signals, deadline, checkpoints_config, time_limit=time_limit, is_main=is_main)

    def state_saved(self) -> None:
        self.last_state_time = time.time()

    def at_boundary(self, step: int, checkpoint_steps: list[int], agree) -> tuple[bool, bool, str]:
        """(stop now, save the state now, why) after `step`. `agree(flags)` sums a list of flags
        over the processes (trainer.distributed.sum_over_processes)."""
        now = time.time()
        signalled = bool(self.signals and self.signals.requested)
        interval_due = (
            self.is_main
            and bool(self.state_every_minutes)
            and now - self.last_state_time >= 60 * self.state_every_minutes
        )
        out_of_time = self.is_main and self.deadline.must_stop(now, step + 1 in checkpoint_steps)
        flags = [flag > 0 for flag in agree([signalled, interval_due, out_of_time])]
        return boundary_decision(
            step,
            *flags,
            checkpoint_steps=checkpoint_steps,
            state_every_steps=self.state_every_steps,
            own_signal=self.signals.requested if self.signals else None,
        )

    def refuse_too_short(self, *, after_first_step: bool) -> None:
        """Main process: raise TimeLimitTooShort when the time limit leaves no room for a second step."""
        err = self.deadline.too_short(time.time(), self.time_limit, after_first_step=after_first_step)
        if err is not None:
            raise err
