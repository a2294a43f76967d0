"""trainer/run_folder.py: what a run folder holds, clearing and rewinding it, its status."""

import json

from trainer.layout import LOCK_FILE
from trainer.run_folder import RunFolder


def test_what_makes_a_folder_a_run(tmp_path):
    folder = tmp_path / "run"
    assert not RunFolder(folder).contents().is_run  # missing
    folder.mkdir()
    (folder / "data_report.json").write_text("[]")
    (folder / "metrics.jsonl").write_text("")
    (folder / "checkpoint-notanumber").mkdir()
    (folder / "state-3").mkdir()  # no COMPLETE marker: never used
    assert not RunFolder(folder).contents().is_run
    (folder / "checkpoint-4").mkdir()
    assert RunFolder(folder).contents().checkpoint_steps == [4] and RunFolder(folder).contents().is_run


def test_rewind_keeps_each_step_once_and_drops_what_came_after_the_state(tmp_path):
    folder = tmp_path
    for name in (
        "checkpoint-4",
        "checkpoint-8",
        "state-6",
        "state-5",
        ".checkpoint-9.partial",
        ".state-9.partial",
        "keep-me",
    ):
        (folder / name).mkdir()
    lines = [{"step": s, "loss": 1.0} for s in range(1, 10)] + [{"step": 8, "eval_loss": 2.0}]
    text = "".join(json.dumps(line) + "\n" for line in lines)
    (folder / "metrics.jsonl").write_text(text + '{"step": 10, "lo')  # a line cut by the kill
    RunFolder(folder).rewind_to(6)
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-4", "keep-me", "metrics.jsonl", "state-6"]
    assert [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
        3,
        4,
        5,
        6,
    ]


def test_clear_removes_what_a_run_writes_and_nothing_else(tmp_path):
    for name in ("checkpoint-4", "state-6", ".state-9.partial", "notes"):
        (tmp_path / name).mkdir()
    for name in ("metrics.jsonl", "report.md", "config.yaml", "status.json", LOCK_FILE, "README.txt"):
        (tmp_path / name).write_text("x")
    RunFolder(tmp_path).clear()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.txt", "notes", LOCK_FILE]


def test_status_file(tmp_path):
    assert RunFolder(tmp_path).read_status() is None
    RunFolder(tmp_path).write_status("stopped", step=5, exit_code=75)
    status = RunFolder(tmp_path).read_status()
    assert (status["status"], status["step"], status["exit_code"]) == ("stopped", 5, 75)


def test_resume_from_another_folder_brings_its_history_up_to_the_state(tmp_path):
    source, target = tmp_path / "old", tmp_path / "new"
    for step in (2, 4):
        (source / f"checkpoint-{step}").mkdir(parents=True)
        (source / f"checkpoint-{step}" / "checkpoint.json").write_text(json.dumps({"step": step}))
    (source / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4)))
    target.mkdir()
    (target / "report.md").write_text("an earlier run's")
    folder = RunFolder(target)
    folder.copy_history_from(source, 3)
    folder.rewind_to(3)
    assert sorted(p.name for p in target.iterdir()) == ["checkpoint-2", "metrics.jsonl"]
    assert sorted(folder.read_metrics().steps) == [1, 2, 3]
    assert sorted(p.name for p in source.iterdir()) == ["checkpoint-2", "checkpoint-4", "metrics.jsonl"]  # untouched


def test_reports_name_the_recommended_checkpoint(tmp_path):
    from trainer.config import TestPrompt
    from trainer.report import CheckpointSummary

    folder = RunFolder(tmp_path)
    folder.metrics_log().write_eval(4, epoch=1.0, eval_loss=0.5, task_metrics={})
    checkpoints = [
        CheckpointSummary(2, 0.5, 1.0, 0.9, [{"prompt": "p", "completion": " a"}]),
        CheckpointSummary(4, 1.0, 0.6, 0.5, [{"prompt": "p", "completion": " b"}]),
    ]
    text = folder.write_reports([TestPrompt(prompt="p")], checkpoints, primary_metric=None)
    assert text == (tmp_path / "report.md").read_text(encoding="utf-8") and "checkpoint-4" in text
    assert json.loads((tmp_path / "recommendation.json").read_text())["checkpoint"] == "checkpoint-4"
    assert (tmp_path / "report.html").is_file() and (tmp_path / "loss.png").is_file()
