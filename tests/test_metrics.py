"""trainer/metrics.py directly: metrics.jsonl's rows."""

import json

from trainer.metrics import MetricsLog
from trainer.step import StepResult


def rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_each_write_appends_one_json_object_a_line_with_non_finite_numbers_as_null(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write(step=1, loss=float("nan"), grad_norm=float("inf"), low=float("-inf"), name="a")
    log.write(step=2, loss=0.5, count=3, flag=True, missing=None)
    text = (tmp_path / "metrics.jsonl").read_text(encoding="utf-8")
    assert text.count("\n") == 2 and text.endswith("\n") and "NaN" not in text and "Infinity" not in text
    assert rows(tmp_path / "metrics.jsonl") == [
        {"step": 1, "loss": None, "grad_norm": None, "low": None, "name": "a"},
        {"step": 2, "loss": 0.5, "count": 3, "flag": True, "missing": None},
    ]


def test_a_step_row_names_skipped_only_when_the_step_was_skipped(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    common = dict(learning_rate=1e-4, tokens=300, supervised_tokens=120, seconds=2.0)
    log.write_step(4, epoch=0.123456, result=StepResult(1.25, 0.5, False, False), **common)
    log.write_step(5, epoch=0.15, result=StepResult(float("nan"), float("inf"), True, True), **common)
    assert rows(tmp_path / "metrics.jsonl") == [
        {
            "step": 4,
            "epoch": 0.1235,
            "loss": 1.25,
            "learning_rate": 1e-4,
            "grad_norm": 0.5,
            "tokens": 300,
            "supervised_tokens": 120,
            "tokens_per_second": 150.0,
        },
        {
            "step": 5,
            "epoch": 0.15,
            "loss": None,
            "learning_rate": 1e-4,
            "grad_norm": None,
            "tokens": 300,
            "supervised_tokens": 120,
            "tokens_per_second": 150.0,
            "skipped": True,
        },
    ]


def test_an_eval_row_prefixes_each_task_metric_with_eval(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write_eval(6, epoch=1.0, eval_loss=0.75, task_metrics={"accuracy": 0.5, "macro_f1": float("nan")})
    log.write_eval(12, epoch=2.0, eval_loss=None, task_metrics={})
    assert rows(tmp_path / "metrics.jsonl") == [
        {"step": 6, "epoch": 1.0, "eval_loss": 0.75, "eval_accuracy": 0.5, "eval_macro_f1": None},
        {"step": 12, "epoch": 2.0, "eval_loss": None},
    ]


def test_a_disabled_log_writes_nothing(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl", enabled=False)
    log.write(step=1, loss=1.0)
    log.write_step(
        1,
        epoch=0.1,
        result=StepResult(1.0, 1.0, False, False),
        learning_rate=1.0,
        tokens=1,
        supervised_tokens=1,
        seconds=1.0,
    )
    log.write_eval(1, epoch=0.1, eval_loss=1.0, task_metrics={"accuracy": 1.0})
    assert list(tmp_path.iterdir()) == []


def test_the_reader_gives_back_what_the_writers_wrote_as_typed_records(tmp_path):
    from trainer.metrics import EvalRecord, StepRecord, read_metrics

    log = MetricsLog(tmp_path / "metrics.jsonl")
    common = dict(learning_rate=1e-4, tokens=300, supervised_tokens=120, seconds=2.0)
    log.write_step(1, epoch=0.5, result=StepResult(1.25, 0.5, False, False), **common)
    log.write_step(2, epoch=1.0, result=StepResult(float("nan"), float("inf"), True, True), **common)
    log.write_eval(2, epoch=1.0, eval_loss=0.75, task_metrics={"accuracy": 0.5})
    with (tmp_path / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 3, "loss": 0.9, "lear')  # cut by a kill
    history = read_metrics(tmp_path / "metrics.jsonl")
    assert history.steps == {
        1: StepRecord(1, 1.25, 1e-4, 0.5, 300, 120, 150.0, 0.5),
        2: StepRecord(2, None, 1e-4, None, 300, 120, 150.0, 1.0),
    }
    assert history.steps[2].skipped and not history.steps[1].skipped
    assert history.evals == {2: EvalRecord(2, 0.75, {"accuracy": 0.5}, 1.0)}
    losses = history.losses()
    assert (losses.train, losses.skipped, losses.evals) == ({1: 1.25}, [2], {2: 0.75})
    assert read_metrics(tmp_path / "missing.jsonl").steps == {}


def test_keep_until_rewinds_to_a_step_and_drops_a_cut_line(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in (1, 2, 3):
        log.write(step=step, loss=1.0)
    log.write(note="no step")
    with (tmp_path / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 4, "lo')
    log.keep_until(2)
    assert rows(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 1.0}]
    MetricsLog(tmp_path / "none.jsonl").keep_until(2)
    assert not (tmp_path / "none.jsonl").exists()
