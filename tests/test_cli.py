"""How every command ends (trainer/cli.py): `classify` for each kind of ending, with its exact line
and exit code, and the `@command` wrapper: what it prints, on which rank, what it records, and what
it lets through."""

import errno

import pytest
import torch

from trainer.cli import (
    EVERY_KIND,
    INTERRUPTED,
    OUT_OF_MEMORY_FIX,
    USER_ERRORS,
    Ending,
    Failure,
    Kind,
    classify,
    command,
)
from trainer.errors import EXIT_INTERRUPTED, UsageError, UserError

BUG_TAIL = (
    ". This is a bug in the trainer or a library, not in your config or data: the traceback follows; report it "
    "with the output of `python -m trainer.doctor CONFIG`"
)


def test_a_user_error_is_its_own_message_and_exit_code():
    err = UserError("training.learning_rat: unknown key. Fix: training.learning_rate")
    assert classify(err) == Failure(
        Kind.USER, "error: training.learning_rat: unknown key. Fix: training.learning_rate", 1, error=err
    )
    usage = UsageError("no config file given")
    assert classify(usage) == Failure(Kind.USER, "error: no config file given", 2, error=usage)
    usage.shared = True  # every process raises it alike (trainer.distributed marks such errors)
    assert classify(usage).shared is True


@pytest.mark.parametrize("code, exit_code", [(0, 0), (2, 2), (None, 0), ("a message", 2)])
def test_argparse_exits_print_nothing_and_keep_their_code(code, exit_code):
    assert classify(SystemExit(code)) == Failure(Kind.EXIT, None, exit_code)


@pytest.mark.parametrize("path_must_be", ["writable", "readable"])
def test_the_environment_names_the_path_and_what_to_check(path_must_be):
    failure = classify(OSError(errno.EACCES, "Permission denied", "/runs/a"), path_must_be=path_must_be)
    line = f"Permission denied: /runs/a. Fix: check that this path is {path_must_be} and its disk has free space"
    assert (failure.kind, failure.message, failure.exit_code, failure.traceback) == (
        Kind.ENVIRONMENT,
        f"error: {line}",
        1,
        False,
    )
    assert type(failure.error) is UserError and str(failure.error) == line  # what status.json records


def test_a_second_ctrl_c_is_130_said_by_rank_0():
    interrupt = KeyboardInterrupt()
    assert classify(interrupt) == Failure(
        Kind.INTERRUPTED, INTERRUPTED, EXIT_INTERRUPTED, error=interrupt, shared=True
    )  # the error: train records it in status.json
    assert EXIT_INTERRUPTED == 130 and INTERRUPTED == (
        "\ninterrupted by a second Ctrl-C: stopped at once (a state save under way is not kept). Rerun the same "
        "command to continue from the newest resumable state"
    )


@pytest.mark.parametrize("gpu, memory", [(True, "GPU memory"), (False, "memory")])
def test_out_of_memory_is_the_fix_without_a_traceback(gpu, memory):
    failure = classify(torch.OutOfMemoryError("CUDA out of memory"), where=" at step 2 of 6", gpu=gpu)
    line = f"out of {memory} at step 2 of 6. {OUT_OF_MEMORY_FIX}"
    assert (failure.kind, failure.message, failure.exit_code, failure.traceback) == (
        Kind.OUT_OF_MEMORY,
        f"error: {line}",
        1,
        False,
    )
    assert type(failure.error) is UserError and str(failure.error) == line


def test_anything_else_is_a_bug_with_its_traceback():
    err = RuntimeError("boom from a library")
    assert classify(err, where=" during setup") == Failure(
        Kind.BUG,
        f"error: the run failed during setup with RuntimeError: boom from a library{BUG_TAIL}",
        1,
        traceback=True,
        error=err,
    )


# ---------------------------------------------------------------------------------------------
# The wrapper


def failing(err: BaseException, **options):
    @command(**options)
    def main(argv=None, **kwargs) -> int:
        raise err

    return main


def test_user_errors_end_in_one_line_and_the_rest_propagates_by_default(capsys):
    assert failing(UsageError("no config file given"))() == 2
    assert capsys.readouterr().err == "error: no config file given\n"
    assert failing(SystemExit(0))() == 0
    assert capsys.readouterr().err == ""
    for err in (OSError(errno.ENOSPC, "No space left on device", "/runs/a"), KeyboardInterrupt(), ValueError("x")):
        with pytest.raises(type(err)) as raised:
            failing(err)()
        assert raised.value is err  # Python's own traceback, as before the wrapper
    assert capsys.readouterr().err == ""


def test_a_bug_keeps_its_traceback_after_the_line(capsys):
    def deep():
        raise KeyError("step")

    @command(ends=EVERY_KIND)
    def main() -> int:
        deep()
        return 0

    assert main() == 1
    err = capsys.readouterr().err
    first, rest = err.split("\n", 1)
    assert first == f"error: the run failed with KeyError: 'step'{BUG_TAIL}"
    assert rest.startswith("Traceback (most recent call last):\n") and "in deep" in rest
    assert rest.endswith("KeyError: 'step'\n")


def test_a_keyboard_interrupt_gives_130(capsys):
    assert failing(KeyboardInterrupt(), ends=EVERY_KIND)() == 130
    assert capsys.readouterr().err == INTERRUPTED + "\n"


def test_the_environment_is_one_line_where_a_command_ends_it(capsys):
    main = failing(OSError(errno.EACCES, "Permission denied", "/data"), ends=USER_ERRORS | {Kind.ENVIRONMENT})
    assert main() == 1
    assert capsys.readouterr().err == (
        "error: Permission denied: /data. Fix: check that this path is writable and its disk has free space\n"
    )


class Recorded(Ending):
    """An ending that remembers what it was told, in order."""

    def __init__(self, rank: str = "0"):
        self.rank = rank
        self.events = []

    def where(self) -> str:
        return " at step 3 of 6"

    def failed(self, failure: Failure) -> None:
        self.events.append(("failed", failure.kind, failure.exit_code))

    def __enter__(self):
        self.events.append(("enter",))
        return self

    def __exit__(self, *exc) -> None:
        self.events.append(("exit",))


def run_with_ending(err: BaseException | None, rank: str = "0") -> tuple[int, Recorded]:
    endings = []

    def make() -> Recorded:
        endings.append(Recorded(rank))
        return endings[-1]

    @command(ends=EVERY_KIND, ending=make)
    def main(argv, *, ending: Recorded) -> int:
        ending.events.append(("main", argv))
        if err is not None:
            raise err
        return 0

    return main(["config.yaml"]), endings[0]


def test_the_ending_gets_main_where_the_failure_and_the_last_word(capsys):
    code, ending = run_with_ending(RuntimeError("boom"))
    assert code == 1
    assert ending.events == [("enter",), ("main", ["config.yaml"]), ("failed", Kind.BUG, 1), ("exit",)]
    assert capsys.readouterr().err.startswith(f"error: the run failed at step 3 of 6 with RuntimeError: boom{BUG_TAIL}")
    code, ending = run_with_ending(None)
    assert code == 0 and ending.events == [("enter",), ("main", ["config.yaml"]), ("exit",)]


def test_other_ranks_name_themselves_and_leave_shared_errors_to_rank_0(capsys):
    assert run_with_ending(UserError("only rank 2 has no data"), rank="2")[0] == 1
    assert capsys.readouterr().err == "[rank 2] error: only rank 2 has no data\n"
    shared = UserError("the config is wrong on every rank")
    shared.shared = True
    code, ending = run_with_ending(shared, rank="2")
    assert code == 1 and ending.events[-2] == ("failed", Kind.USER, 1)  # recorded all the same
    assert capsys.readouterr().err == ""
    assert run_with_ending(shared, rank="0")[0] == 1
    assert capsys.readouterr().err == "error: the config is wrong on every rank\n"
    assert run_with_ending(KeyboardInterrupt(), rank="1")[0] == 130
    assert capsys.readouterr().err == ""


def test_the_rank_of_a_training_process_comes_from_its_environment(monkeypatch):
    from trainer.train import RunEnding

    monkeypatch.setenv("RANK", "3")
    ending = RunEnding()
    assert (ending.rank, ending.where()) == ("3", " while starting")
    monkeypatch.delenv("RANK")
    assert RunEnding().rank == "0"


def test_train_without_a_config_is_a_usage_error(capsys):
    from trainer.train import main

    assert main([]) == 2
    assert capsys.readouterr().err == (
        "error: no config file given\nusage: accelerate launch trainer/train.py CONFIG.yaml [section.key=value ...]\n"
    )
