import json

from tests.test_run_lock import finished_pid
from trainer.layout import LOCK_FILE
from trainer.run_folder import RunFolder
from trainer.run_lock import this_process
from trainer.status import describe, main


def test_the_exit_code_is_the_last_jobs(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(f"model: {{name_or_path: m}}\ndata: {{train_file: t.jsonl}}\noutput_dir: {tmp_path / 'run'}\n")
    assert main([str(config)]) == 1 and "no run has started here" in capsys.readouterr().out
    (tmp_path / "run").mkdir()
    RunFolder(tmp_path / "run").write_status(
        "stopped",
        step=5,
        total_steps=24,
        exit_code=75,
        message="stopped at step 5 of 24 (time limit)",
    )
    assert main([str(config)]) == 75 and "stopped at step 5 of 24 (time limit)" in capsys.readouterr().out
    RunFolder(tmp_path / "run").write_status(
        "complete", step=24, total_steps=24, exit_code=0, message="all 24 steps trained"
    )
    assert main([str(config)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{tmp_path / 'run'}: complete at ") and line.endswith(": all 24 steps trained")
    assert main([]) == 2


def test_a_running_status_whose_process_is_gone_was_killed(tmp_path):
    RunFolder(tmp_path).write_status("running", step=0, total_steps=24)
    me = this_process()
    (tmp_path / LOCK_FILE).write_text(json.dumps(me | {"pid": finished_pid(), "process_start": "1"}))
    line, code = describe(tmp_path)
    assert code == 1 and "killed" in line
    (tmp_path / LOCK_FILE).write_text(json.dumps(me))
    line, code = describe(tmp_path)
    assert code == 1 and line.startswith(f"{tmp_path}: running (pid {me['pid']}")


def test_help_prints_the_exit_codes(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "python -m trainer.status CONFIG.yaml" in out and "75 stopped early and resumable" in out
