"""The recommended checkpoint: best primary metric (earlier on a tie), else lowest eval loss; written
atomically; a pure function of the summaries; `--best` in export, generate and serve."""

import json
import shutil
from dataclasses import asdict

import pytest

from trainer.errors import UsageError, UserError
from trainer.recommend import (
    RECOMMENDATION_FILE,
    Recommendation,
    read_recommendation,
    recommend,
    resolve_checkpoint_arg,
    write_recommendation,
)
from trainer.report import CheckpointSummary


def summary(step, eval_loss, metrics=None, examples=100):
    return CheckpointSummary(step, step / 10, 1.0, eval_loss, [], metrics, examples if metrics else 0)


def test_the_highest_primary_metric_wins_and_a_tie_goes_to_the_earlier_checkpoint():
    checkpoints = [
        summary(10, 0.9, {"exact_match": 0.5, "item_f1": 0.7}),
        summary(20, 0.5, {"exact_match": 0.93, "item_f1": 0.95}),
        summary(30, 0.4, {"exact_match": 0.93, "item_f1": 0.97}),
        summary(40, 0.45, {"exact_match": 0.91, "item_f1": 0.99}),
    ]
    assert recommend(checkpoints) == Recommendation(
        "checkpoint-20",
        "exact_match",
        0.93,
        "highest exact_match (0.9300 on 100 validation examples) of 4 checkpoints; checkpoint-30 ties with it "
        "and the earlier is preferred",
    )
    # Another primary metric (as eval.metrics lists it first), and any order of the summaries.
    assert recommend(list(reversed(checkpoints)), primary="item_f1") == Recommendation(
        "checkpoint-40", "item_f1", 0.99, "highest item_f1 (0.9900 on 100 validation examples) of 4 checkpoints"
    )


def test_without_task_metrics_the_lowest_eval_loss_and_without_either_nothing():
    checkpoints = [summary(10, 0.9), summary(20, 0.5), summary(30, 0.5), summary(40, float("nan"))]
    assert recommend(checkpoints) == Recommendation(
        "checkpoint-20",
        "eval_loss",
        0.5,
        "lowest eval loss (0.5000) of 3 checkpoints, as no task metric was computed; checkpoint-30 ties with it "
        "and the earlier is preferred",
    )
    assert recommend([summary(10, None), summary(20, None)]) is None
    assert recommend([]) is None


def test_a_metric_that_is_the_same_everywhere_leaves_it_to_the_eval_loss():
    """Every checkpoint answered every example wrong (or right): the metric tells them nothing."""
    checkpoints = [
        summary(2, 5.45, {"exact_match": 0.0}),
        summary(7, 4.56, {"exact_match": 0.0}),
        summary(9, 4.6, {"exact_match": 0.0}),
    ]
    assert recommend(checkpoints) == Recommendation(
        "checkpoint-7",
        "eval_loss",
        4.56,
        "exact_match is 0.0000 at every checkpoint, so the eval loss decides: lowest eval loss (4.5600) of 3 "
        "checkpoints",
    )
    alone = [summary(2, 5.45, {"exact_match": 0.0})]  # one checkpoint: nothing to tell apart
    assert recommend(alone).metric == "exact_match"
    no_loss = [summary(2, None, {"exact_match": 1.0}), summary(4, None, {"exact_match": 1.0})]
    assert recommend(no_loss).checkpoint == "checkpoint-2"  # no loss to ask: the earlier of equals


def test_a_resumed_run_recommends_what_an_uninterrupted_one_does():
    checkpoints = [summary(10, 0.9, {"accuracy": 0.8}), summary(20, 0.7, {"accuracy": 0.9})]
    saved = json.loads(json.dumps([asdict(c) for c in checkpoints]))  # the resumable state's round trip
    old_state = [
        {k: v for k, v in c.items() if k in ("step", "epoch", "train_loss", "eval_loss", "samples")} for c in saved
    ]
    assert recommend([CheckpointSummary(**c) for c in saved]) == recommend(checkpoints) == recommend(saved)
    assert recommend([CheckpointSummary(**c) for c in old_state]).metric == "eval_loss"  # an older state still loads


def test_recommendation_json_is_written_atomically_and_removed_when_there_is_none(tmp_path):
    write_recommendation(tmp_path, Recommendation("checkpoint-20", "accuracy", 0.9, "highest accuracy"))
    assert json.loads((tmp_path / RECOMMENDATION_FILE).read_text()) == {
        "checkpoint": "checkpoint-20",
        "metric": "accuracy",
        "value": 0.9,
        "why": "highest accuracy",
    }
    assert [p.name for p in tmp_path.iterdir()] == [RECOMMENDATION_FILE]  # no temporary file left
    assert read_recommendation(tmp_path).checkpoint == "checkpoint-20"
    write_recommendation(tmp_path, None)
    assert not (tmp_path / RECOMMENDATION_FILE).exists()


def make_run(tmp_path, checkpoint, steps=(3, 6), recommended=6):
    """A run folder holding copies of a real checkpoint as checkpoint-<step>, recommending one."""
    run = tmp_path / "run"
    for step in steps:
        shutil.copytree(checkpoint, run / f"checkpoint-{step}")
    if recommended is not None:
        write_recommendation(
            run, Recommendation(f"checkpoint-{recommended}", "accuracy", 1.0, "highest accuracy (1.0000)")
        )
    return run


def test_resolving_the_checkpoint_argument(tmp_path, trained_checkpoints):
    run = make_run(tmp_path, trained_checkpoints("gpt2", "lora"))
    path, chosen = resolve_checkpoint_arg(run, best=True)
    assert path == run / "checkpoint-6" and chosen.why == "highest accuracy (1.0000)"
    assert resolve_checkpoint_arg(run / "checkpoint-3", best=False) == (run / "checkpoint-3", None)
    with pytest.raises(UsageError) as err:
        resolve_checkpoint_arg(run, best=False)
    assert str(err.value) == (
        f"{run} is a run folder, not a checkpoint. Fix: give one of its checkpoints "
        "(checkpoint-3, checkpoint-6), or add --best for the recommended one (recommended: checkpoint-6)"
    )
    with pytest.raises(UsageError, match="--best takes a run folder, and .*checkpoint-3 is a checkpoint"):
        resolve_checkpoint_arg(run / "checkpoint-3", best=True)
    (run / RECOMMENDATION_FILE).unlink()
    with pytest.raises(UserError) as err:
        resolve_checkpoint_arg(run, best=True)
    assert str(err.value) == (
        f"{run} has no recommendation.json: a run writes it at its first checkpoint when it has "
        "validation data to rank them by. Fix: give one of its checkpoint folders "
        "(checkpoint-3, checkpoint-6) instead of --best"
    )
    write_recommendation(run, Recommendation("checkpoint-9", "accuracy", 1.0, "x"))
    with pytest.raises(UserError, match="recommends checkpoint-9, which is not in"):
        resolve_checkpoint_arg(run, best=True)
    (run / RECOMMENDATION_FILE).write_text("{not json")
    with pytest.raises(UserError, match="recommendation.json cannot be read"):
        resolve_checkpoint_arg(run, best=True)
    with pytest.raises(UserError, match="is not a run folder"):
        resolve_checkpoint_arg(tmp_path / "missing", best=True)


def test_generate_and_export_take_best(tmp_path, capsys, trained_checkpoints):
    from trainer.export import main as export_main
    from trainer.generate import main as generate_main

    checkpoint = trained_checkpoints("gpt2", "lora")
    run = make_run(tmp_path, checkpoint)
    assert generate_main([str(checkpoint), "--prompt", "banana ->", "--max-new-tokens", "4"]) == 0
    direct = capsys.readouterr().out
    assert generate_main([str(run), "--best", "--prompt", "banana ->", "--max-new-tokens", "4"]) == 0
    captured = capsys.readouterr()
    assert captured.out == direct
    assert captured.err.strip().endswith(f"--best: {run / 'checkpoint-6'} (highest accuracy (1.0000))")
    assert generate_main([str(run), "--prompt", "banana ->"]) == 2
    assert "is a run folder, not a checkpoint" in capsys.readouterr().err

    assert export_main([str(run), str(tmp_path / "out"), "--best"]) == 0
    record = json.loads((tmp_path / "out" / "export.json").read_text())
    assert record["source"] == str((run / "checkpoint-6").resolve())
    assert export_main([str(run), str(tmp_path / "out2")]) == 2
    assert "add --best for the recommended one" in capsys.readouterr().err


def test_serve_takes_best(tmp_path, capsys, monkeypatch, trained_checkpoints):
    import trainer.serve as serve

    run = make_run(tmp_path, trained_checkpoints("gpt2", "lora"))
    loaded = []

    def build_server(args, key):
        loaded.append(args.checkpoint)
        raise UserError("stop here")

    monkeypatch.setattr(serve, "build_server", build_server)
    monkeypatch.delenv(serve.API_KEY_VARIABLE, raising=False)
    assert serve.main([str(run), "--best", "--port", "0"]) == 1
    assert loaded == [run / "checkpoint-6"]
    assert serve.main([str(run), "--port", "0"]) == 2
    assert "is a run folder, not a checkpoint" in capsys.readouterr().err
