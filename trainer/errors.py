"""How a run ends: errors a user can cause, and the exit codes the command line reports.

Anything a user can get wrong (config keys, data files, paths) raises `UserError` with a message
that names the file, the line or key, and the fix. The entry point prints that message alone (no
traceback). Subclasses carry the facts a caller (or a test) needs as attributes, so nothing ever
has to be matched from message text.

Exit codes (README, "Cluster jobs"):

    0    done: the run finished (or was already complete)
    1    user error: fix the config, data or paths and rerun
    2    usage error: the command line itself is malformed
    75   stopped early and resumable (signal, time limit): rerun the same command to continue
         (75 is EX_TEMPFAIL of sysexits.h, "try again later"; the SLURM script requeues on it)
    130  interrupted at once by a second Ctrl-C (nothing saved since the last resumable state)
"""

from __future__ import annotations

EXIT_DONE = 0
EXIT_USER_ERROR = 1
EXIT_USAGE = 2
EXIT_STOPPED_RESUMABLE = 75
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """A mistake in the user's config, data or paths. The message is the whole report.

    Subclasses give their extra arguments defaults: errors are pickled to reach every process
    (`trainer.distributed.decide_on_main`), and unpickling calls the class with the message alone."""

    exit_code = EXIT_USER_ERROR


class UsageError(UserError):
    """A malformed command line (missing config file, bad `key=value` override)."""

    exit_code = EXIT_USAGE


class RunFolderBusy(UserError):
    """Another job holds the run folder's lock."""

    def __init__(self, message: str, holder: dict | None = None):
        super().__init__(message)
        self.holder = holder or {}


class ConfigChanged(UserError):
    """The run folder holds a run whose config differs from this one in `keys`."""

    def __init__(self, message: str, keys: list[str] | None = None):
        super().__init__(message)
        self.keys = keys or []


class ProcessCountChanged(UserError):
    """A resume with another number of processes than the run was started with."""

    def __init__(self, message: str, saved: int = 0, current: int = 0):
        super().__init__(message)
        self.saved, self.current = saved, current


class NotEnoughDisk(UserError):
    """The run's checkpoints and resumable state would not fit on the disk of `output_dir`."""

    def __init__(self, message: str, needed: int = 0, free: int = 0):
        super().__init__(message)
        self.needed, self.free = needed, free


class SaveFailed(UserError):
    """Writing a checkpoint or the resumable state failed (disk full, permissions); the previous
    complete ones are untouched. `needed` and `free` are bytes (0 when not known)."""

    def __init__(self, message: str, needed: int = 0, free: int = 0):
        super().__init__(message)
        self.needed, self.free = needed, free


class TimeLimitTooShort(UserError):
    """The job's time limit leaves room for one step at most: every job would train a single
    step, save and stop. `seconds_left` after setup (or after the first step), `seconds_needed`
    for one step, a state save and the margin."""

    def __init__(self, message: str, seconds_left: float = 0.0, seconds_needed: float = 0.0):
        super().__init__(message)
        self.seconds_left, self.seconds_needed = seconds_left, seconds_needed


class TrainingDiverged(UserError):
    """`training.max_bad_steps` optimizer steps in a row had a non-finite loss or gradient norm."""

    @classmethod
    def after(
        cls, step: int, bad_steps: int, *, learning_rate: float, mixed_precision: str, data_lines: list[str]
    ) -> "TrainingDiverged":
        first = step - bad_steps + 1
        return cls(
            f"training stopped at step {step}: the loss or gradient norm was not finite in {bad_steps} steps "
            f"in a row (steps {first} to {step}; they changed no weight). The resumable state of step {step} is saved. "
            f"Likely causes: a learning rate too high (training.learning_rate={learning_rate:g}), fp16 overflow "
            f"(training.mixed_precision={mixed_precision}: use bf16 where the GPU has it), or bad data (the last "
            f"bad step trained on {', '.join(data_lines)}). "
            "Fix the cause and start a new run (overwrite_output_dir=true); "
            "raise training.max_bad_steps and rerun to continue this one as it is",
            step=step,
        )

    def __init__(self, message: str, step: int = 0):
        super().__init__(message)
        self.step = step
