"""How every command ends: the one wrapper for the entry points' `main` (train, doctor, export,
generate, serve, status, compare, prepare_data).

`classify` says what an exception that ended a command means, as a `Failure`: the line for
stderr, the exit code, and whether the traceback follows (trainer/errors.py has the codes):

    UserError             `error: <its message>`, its exit code (1, or 2 for the command line itself)
    SystemExit            argparse's own exit (`--help` 0, a malformed command line 2): nothing printed
    OSError               the environment (a folder that is not writable, a full disk): the path and
                          what to check, 1
    KeyboardInterrupt     a second Ctrl-C (the first only asks the run to stop): stopped at once, 130
    torch's out of memory the run's sizes, not a bug: the fix, 1
    anything else         a bug in the trainer or a library: one line, then the traceback, 1

`@command(ends=...)` ends the kinds a command names and lets the others propagate as Python's own
traceback (exit 1): train ends every kind, the doctor user errors and the environment's, the
other commands user errors (argparse's exits always). What one command adds (train: the rank,
where the run was, status.json, closing the run; doctor: `--json`) is an `Ending` subclass.
"""

from __future__ import annotations

import enum
import functools
import json
import sys
import traceback
from dataclasses import dataclass
from typing import Callable

from trainer.errors import EXIT_INTERRUPTED, EXIT_USER_ERROR, UserError

OUT_OF_MEMORY_FIX = (
    "Fix: lower training.micro_batch_size (raise gradient_accumulation_steps to keep the batch), "
    "set model.gradient_checkpointing=true, or lower data.max_seq_len; "
    "`python scripts/plan.py CONFIG` estimates the memory a config needs"
)

INTERRUPTED = (
    "\ninterrupted by a second Ctrl-C: stopped at once (a state save under way is not kept). Rerun the "
    "same command to continue from the newest resumable state"
)


class Kind(enum.Enum):
    """What ended a command (see the module docstring)."""

    USER = "user"
    EXIT = "exit"
    ENVIRONMENT = "environment"
    INTERRUPTED = "interrupted"
    OUT_OF_MEMORY = "out_of_memory"
    BUG = "bug"


#: What every command ends itself: its user errors and argparse's exits.
USER_ERRORS = frozenset({Kind.USER, Kind.EXIT})
#: Train ends everything: a batch job's log must say how the run ended, and status.json record it.
EVERY_KIND = frozenset(Kind)


@dataclass(frozen=True)
class Failure:
    """How a command ends after an exception."""

    kind: Kind
    message: str | None
    """The line for stderr (None: nothing to print; argparse printed its own)."""
    exit_code: int
    traceback: bool = False
    """Whether the traceback follows the line: only for a bug, which the user cannot fix."""
    error: BaseException | None = None
    """What a run records as its failure: the `UserError` the user reads (the environment's and
    the memory's made into one), the interrupt, or the bug itself; None for argparse's exit."""
    shared: bool = False
    """Every process meets it alike: rank 0 alone prints it (a `UserError` marked `shared`, Ctrl-C)."""


def _is_out_of_memory(err: BaseException) -> bool:
    torch = sys.modules.get("torch")  # not imported yet: not torch's out-of-memory
    return torch is not None and isinstance(err, torch.OutOfMemoryError)


def classify(
    err: Exception | KeyboardInterrupt | SystemExit,
    *,
    where: str = "",
    path_must_be: str = "writable",
    gpu: bool | None = None,
) -> Failure:
    """What `err` means for the user. `where` (" at step 3 of 6") places an out-of-memory or a bug
    in the run; `path_must_be` is what the environment's line asks to check of the path ("writable",
    "readable"); `gpu` words the out-of-memory line (None: ask torch, whose error it is)."""
    if isinstance(err, SystemExit):
        code = err.code if isinstance(err.code, int) else 0 if err.code is None else 2
        return Failure(Kind.EXIT, None, code)
    if isinstance(err, UserError):
        return Failure(Kind.USER, f"error: {err}", err.exit_code, error=err, shared=getattr(err, "shared", False))
    if isinstance(err, KeyboardInterrupt):
        return Failure(Kind.INTERRUPTED, INTERRUPTED, EXIT_INTERRUPTED, error=err, shared=True)
    if isinstance(err, OSError):
        user = UserError(
            f"{err.strerror or err}: {err.filename}. Fix: check that this path is {path_must_be} and its "
            "disk has free space"
        )
        return Failure(Kind.ENVIRONMENT, f"error: {user}", EXIT_USER_ERROR, error=user)
    if _is_out_of_memory(err):
        gpu = sys.modules["torch"].cuda.is_available() if gpu is None else gpu
        user = UserError(f"out of {'GPU ' if gpu else ''}memory{where}. {OUT_OF_MEMORY_FIX}")
        return Failure(Kind.OUT_OF_MEMORY, f"error: {user}", EXIT_USER_ERROR, error=user)
    return Failure(
        Kind.BUG,
        f"error: the run failed{where} with {type(err).__name__}: {err}. This is a bug in the trainer or a "
        "library, not in your config or data: the traceback follows; report it with the output of "
        "`python -m trainer.doctor CONFIG`",
        EXIT_USER_ERROR,
        traceback=True,
        error=err,
    )


class Ending:
    """A command's own part in how it ends; this base adds nothing.

    `@command(ending=Subclass)` makes one per call and passes it to `main` as the keyword
    `ending`, for `main` to fill in what it learns (train: its recipe). It is a context around the
    whole call: its `__exit__` runs last, after a failure was printed and `failed` was told."""

    rank = "0"
    """This process's rank: the others prefix their lines with it and leave shared errors to rank 0."""

    def where(self) -> str:
        """Where the command was when it failed (" at step 3 of 6"), for a bug or an out-of-memory."""
        return ""

    def failed(self, failure: Failure) -> None:
        """Told after the failure's line is printed (train records it in status.json)."""

    def __enter__(self) -> "Ending":
        return self

    def __exit__(self, *exc) -> None:
        pass


class JsonEnding(Ending):
    """For a command with `--json` (its `main` sets `as_json`): a user error is also the one JSON
    object on stdout, `{"ok": false, "error": ...}`, so a script reading stdout gets an answer."""

    as_json = False

    def failed(self, failure: Failure) -> None:
        if self.as_json and failure.kind is Kind.USER:
            print(json.dumps({"ok": False, "error": str(failure.error)}))


def _say(failure: Failure, rank: str) -> None:
    if failure.message is None or (failure.shared and rank != "0"):
        return
    # One that only a single rank hits must not vanish in a distributed job: it names its rank.
    prefix = "" if rank == "0" else f"[rank {rank}] "
    print(f"{prefix}{failure.message}", file=sys.stderr, flush=True)
    if failure.traceback:
        traceback.print_exc()


def command(
    main: Callable[..., int] | None = None,
    *,
    ends: frozenset[Kind] = USER_ERRORS,
    path_must_be: str = "writable",
    ending: Callable[[], Ending] | None = None,
):
    """`@command` or `@command(...)` on an entry point's `main`: the kinds in `ends` end in their
    line and exit code; the others propagate unchanged. `path_must_be` goes to `classify`;
    `ending` makes the command's `Ending` (a subclass; its `main` then takes the keyword `ending`)."""

    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(*args, **kwargs) -> int:
            hooks = ending() if ending is not None else Ending()
            if ending is not None:
                kwargs["ending"] = hooks
            with hooks:
                try:
                    return main(*args, **kwargs)
                # Not BaseException: a GeneratorExit or a test framework's outcome passes through.
                except (Exception, KeyboardInterrupt, SystemExit) as err:
                    failure = classify(err, where=hooks.where(), path_must_be=path_must_be)
                    if failure.kind not in ends:
                        raise
                    _say(failure, hooks.rank)
                    hooks.failed(failure)
                    return failure.exit_code

        return run

    return wrap(main) if main is not None else wrap
