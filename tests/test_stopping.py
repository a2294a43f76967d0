import signal

import pytest

from trainer.config import Config
from trainer.errors import TimeLimitTooShort
from trainer.stopping import (
    MARGIN_FACTOR,
    MARGIN_SECONDS,
    Deadline,
    StopSignals,
    parse_duration,
    parse_slurm_time_left,
    slurm_seconds_left,
)


def test_durations():
    assert parse_duration("23h30m") == 23 * 3600 + 30 * 60
    assert parse_duration("90m") == 5400
    assert parse_duration("1d12h") == 36 * 3600
    assert parse_duration("3600s") == parse_duration("3600") == parse_duration(3600) == 3600
    assert parse_duration("1.5h") == 5400
    for bad in ("", "soon", "10x", "h", "-5m", "0"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_a_bad_time_limit_is_a_config_error_naming_the_forms():
    with pytest.raises(ValueError, match="23h30m"):
        Config.model_validate(
            {"model": {"name_or_path": "m"}, "data": {"train_file": "t"}, "training": {"time_limit": "tomorrow"}}
        )


def test_slurm_time_left():
    assert parse_slurm_time_left("1-02:03:04") == ((24 + 2) * 60 + 3) * 60 + 4
    assert parse_slurm_time_left("02:03:04") == (2 * 60 + 3) * 60 + 4
    assert parse_slurm_time_left("03:04\n") == 3 * 60 + 4
    for unlimited in ("UNLIMITED", "NOT_SET", "INVALID", ""):
        assert parse_slurm_time_left(unlimited) is None
    assert slurm_seconds_left({}) is None  # not under SLURM
    assert slurm_seconds_left({"SLURM_JOB_ID": "7", "SLURM_JOB_END_TIME": "1000"}, now=400.0) == 600.0


def test_the_deadline_keeps_a_margin_for_a_step_a_checkpoint_and_a_state_save():
    deadline = Deadline(end=1000.0)
    for kind, seconds in (("step", 10.0), ("step", 20.0), ("checkpoint", 100.0), ("state", 30.0)):
        deadline.record(kind, seconds)
    assert deadline.longest == {"step": 20.0, "checkpoint": 100.0, "state": 30.0}
    without = MARGIN_FACTOR * (20 + 30) + MARGIN_SECONDS
    with_checkpoint = MARGIN_FACTOR * (20 + 30 + 100) + MARGIN_SECONDS
    assert deadline.margin(False) == without and deadline.margin(True) == with_checkpoint
    assert not deadline.must_stop(1000.0 - without - 1, next_step_has_checkpoint=False)
    assert deadline.must_stop(1000.0 - without + 1, next_step_has_checkpoint=False)
    assert deadline.must_stop(1000.0 - without - 1, next_step_has_checkpoint=True)
    assert not Deadline(end=None).must_stop(1e12, True)


def test_the_time_limit_counts_from_the_start_and_slurm_gives_the_default():
    assert Deadline.for_job("2h", started=100.0, environ={}).end == 100.0 + 7200
    assert Deadline.for_job(None, started=100.0, environ={}).end is None
    under_slurm = Deadline.for_job(None, started=0.0, environ={"SLURM_JOB_ID": "7", "SLURM_JOB_END_TIME": "4102444800"})
    assert under_slurm.end == pytest.approx(4102444800, abs=5)


def test_signals_set_a_flag_a_second_ctrl_c_raises_and_handlers_come_back():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    with StopSignals() as stop:
        assert stop.requested is None
        signal.raise_signal(signal.SIGUSR1)
        assert stop.requested == "SIGUSR1"
        signal.raise_signal(signal.SIGTERM)  # a later signal does not change the reason
        assert stop.requested == "SIGUSR1"
    assert {sig: signal.getsignal(sig) for sig in before} == before

    with StopSignals() as stop:
        signal.raise_signal(signal.SIGINT)
        assert stop.requested == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)


def test_a_time_limit_with_no_room_for_a_second_step_is_refused_with_the_numbers():
    from trainer.errors import TimeLimitTooShort
    from trainer.stopping import Deadline

    deadline = Deadline(end=1000.0)
    assert deadline.too_short(980.0, "90s", after_first_step=False) is None  # 20 s left, 10 s needed
    err = deadline.too_short(995.0, "90s", after_first_step=False)  # 5 s left after setup
    assert isinstance(err, TimeLimitTooShort) and (err.seconds_left, err.seconds_needed) == (5.0, 10.0)
    assert str(err) == (
        "training.time_limit=90s leaves this job 5 s after setup, but one step, a state save and the margin need "
        "10 s (1.2 x (no step measured yet) + 10 s): every job would train a single step. Fix: give the job more "
        "time (training.time_limit), at least 50 s"
    )
    deadline.record("step", 20.0)
    deadline.record("state", 5.0)
    err = deadline.too_short(970.0, None, after_first_step=True)  # the first step used the time
    assert err.seconds_needed == pytest.approx(40.0) and str(err).startswith(
        "the SLURM job's time limit leaves this job 30 s after its first step, but one step, a state save and the "
        "margin need 40 s (1.2 x (step 20.0 s, state 5.0 s) + 10 s): every job would train a single step. "
        "The resumable state is saved. Fix: give the job more time (sbatch --time)"
    )
    assert Deadline(end=None).too_short(0.0, None, after_first_step=True) is None


def test_the_stop_policy_asks_every_process_and_gives_the_reason():
    """`at_boundary` sums the flags over the processes through `agree`: another process's signal
    stops this one too; the state interval and the time limit come from the main process."""
    from types import SimpleNamespace

    from trainer.stopping import StopPolicy

    checkpoints = SimpleNamespace(state_every_minutes=0, state_every_steps=3)
    signals = SimpleNamespace(requested=None)
    policy = StopPolicy(signals, Deadline(None), checkpoints, time_limit=None, is_main=True)
    seen = []

    def alone(flags):
        seen.append(list(flags))
        return [int(f) for f in flags]

    assert policy.at_boundary(1, [4, 8], alone) == (False, False, "interval")
    assert policy.at_boundary(3, [4, 8], alone) == (False, True, "interval")  # state_every_steps
    assert policy.at_boundary(4, [4, 8], alone) == (False, True, "checkpoint")
    assert seen[0] == [False, False, False]
    another_process_signalled = lambda flags: [1, 0, 0]
    assert policy.at_boundary(5, [4, 8], another_process_signalled) == (True, False, "stop signal on another process")
    signals.requested = "SIGUSR1"
    assert policy.at_boundary(5, [4, 8], alone) == (True, False, "signal SIGUSR1")
    signals.requested = None
    policy.deadline = Deadline(0.0)  # long past
    assert policy.at_boundary(5, [4, 8], alone) == (True, False, "time limit")
    with pytest.raises(TimeLimitTooShort):
        policy.refuse_too_short(after_first_step=False)
    policy.state_every_minutes, policy.last_state_time = 1, 0.0  # a minute has passed long ago
    policy.deadline = Deadline(None)
    assert policy.at_boundary(7, [4, 8], alone) == (False, True, "interval")
    policy.state_saved()
    assert policy.at_boundary(7, [4, 8], alone) == (False, False, "interval")
