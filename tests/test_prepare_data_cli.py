"""scripts/prepare_data.py end to end: exit codes, --json, --fix, and never overwriting the input."""

import importlib.util
import json
import os
import stat
import subprocess
import sys

import pytest

from tests.helpers import REPO, write_jsonl

EOS = "<|endoftext|>"
SCRIPT = REPO / "scripts" / "prepare_data.py"


def _load_cli():
    spec = importlib.util.spec_from_file_location("prepare_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cli = _load_cli()


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def rows(count: int = 75, *, eos: bool = True) -> list[dict]:
    colours = ("yellow", "green", "red")
    return [{"prompt": f"fruit {i} ->", "completion": f" {colours[i % 3]}{EOS if eos else ''}"} for i in range(count)]


def test_exit_codes_0_1_2_and_json(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", rows(eos=False))  # warnings only
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(good.read_bytes() + b"{oops\n")

    ok = run("validate", good, "--json")
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert report["ok"] is True and report["warning_counts"] == {"missing_eos": 75}

    failed = run("validate", bad)
    assert failed.returncode == 1
    assert "line 76: invalid JSON" in failed.stdout and "FAILED" in failed.stdout

    usage = run("validate", good, "--max-seq-len", "many")
    assert usage.returncode == 2 and "invalid int value" in usage.stderr
    assert run("validate").returncode == 2
    assert run("split", good, "--test-fraction", "1.5").returncode == 2


def test_fix_writes_a_copy_that_validates_and_refuses_the_input(tmp_path, capsys):
    source = write_jsonl(tmp_path / "data.jsonl", rows(eos=False))
    before = source.read_bytes()
    assert cli.main(["validate", str(source), "--fix", str(source)]) == 2
    assert "refusing to overwrite the input" in capsys.readouterr().err

    fixed = tmp_path / "fixed.jsonl"
    assert cli.main(["validate", str(source), "--fix", str(fixed), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fix"]["changes"]["missing_eos"] == 75 and out["warnings"] == [] and out["file"] == str(fixed)
    assert source.read_bytes() == before

    assert cli.main(["validate", str(source), "--fix", str(fixed)]) == 2  # exists: needs --force
    again = tmp_path / "again.jsonl"
    assert cli.main(["validate", str(fixed), "--fix", str(again)]) == 0
    assert again.read_bytes() == fixed.read_bytes()


def test_fix_is_not_written_when_the_file_has_errors(tmp_path, capsys):
    source = tmp_path / "data.jsonl"
    source.write_text('{"prompt": "a ->", "completion": 3}\n', encoding="utf-8")
    assert cli.main(["validate", str(source), "--fix", str(tmp_path / "out.jsonl")]) == 1
    assert not (tmp_path / "out.jsonl").exists()
    assert "not written: fix the errors first" in capsys.readouterr().out


def test_convert_then_validate(tmp_path, capsys):
    table = tmp_path / "data.csv"
    table.write_text('question,answer\n"banana, ripe",yellow\n"lime ""fresh""",green\n', encoding="utf-8")
    out = tmp_path / "data.jsonl"
    args = [
        "convert",
        str(table),
        str(out),
        "--prompt-column",
        "question",
        "--completion-column",
        "answer",
        "--separator",
        "\\n\\n###\\n\\n",
        "--add-eos",
        "--leading-space",
    ]
    assert cli.main(args) == 0
    assert [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] == [
        {"prompt": "banana, ripe\n\n###\n\n", "completion": " yellow" + EOS},
        {"prompt": 'lime "fresh"\n\n###\n\n', "completion": " green" + EOS},
    ]
    assert cli.main(args) == 2  # the output exists
    assert cli.main(args + ["--force"]) == 0
    assert cli.main(["convert", str(table), str(table), "--force"]) == 2  # never its own input
    assert cli.main(["convert", str(table), str(tmp_path / "x.jsonl")]) == 1  # no 'prompt' column
    assert "its columns are 'question', 'answer'" in capsys.readouterr().err


def test_split_writes_two_files_and_refuses_to_overwrite(tmp_path, capsys):
    source = write_jsonl(tmp_path / "data.jsonl", rows())
    assert cli.main(["split", str(source), "--test-fraction", "0.2", "--seed", "1"]) == 0
    train, test = tmp_path / "data-train.jsonl", tmp_path / "data-test.jsonl"
    assert len(train.read_text().splitlines()) == 60 and len(test.read_text().splitlines()) == 15
    assert "stratified by completion" in capsys.readouterr().out
    assert cli.main(["split", str(source)]) == 2
    first = test.read_bytes()
    assert cli.main(["split", str(source), "--test-fraction", "0.2", "--seed", "1", "--force"]) == 0
    assert test.read_bytes() == first


@pytest.mark.parametrize("too_long, code", [("error", 1), ("drop", 0)])
def test_config_gives_tokenizer_length_policy_and_test_prompts(tmp_path, tiny_model_dirs, capsys, too_long, code):
    data = rows()
    data[0]["completion"] = " yellow and a very long answer that goes on and on and on" + EOS
    train = write_jsonl(tmp_path / "train.jsonl", data)
    config = tmp_path / "config.yaml"
    config.write_text(
        f"model: {{name_or_path: '{tiny_model_dirs['gpt2']}'}}\n"
        f"data: {{train_file: '{train}', max_seq_len: 16, too_long: {too_long}}}\n"
        "test_prompts: ['fruit 3 ->', 'kiwi ->']\n",
        encoding="utf-8",
    )
    assert cli.main(["validate", "--config", str(config), "--json"]) == code
    report = json.loads(capsys.readouterr().out)
    assert report["stats"]["tokens"]["total"] > 0 and report["stats"]["lengths"]["over"] == 1
    assert [(w["kind"], w["line"]) for w in report["warnings"] if w["kind"].startswith("test_prompt")] == [
        ("test_prompt_in_data", 4)
    ]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_written_files_follow_the_umask(tmp_path, capsys, umask, mode):
    """convert, validate --fix and split write through a temporary file (0600 from mkstemp); each
    output gets the umask's permissions instead, the umask of the moment (0644 under umask 022)."""
    table = tmp_path / "data.csv"
    table.write_text("prompt,completion\n" + "".join(f"fruit {i} ->,yellow\n" for i in range(20)), encoding="utf-8")
    previous = os.umask(umask)
    try:
        assert cli.main(["convert", str(table), str(tmp_path / "data.jsonl")]) == 0
        assert cli.main(["validate", str(tmp_path / "data.jsonl"), "--fix", str(tmp_path / "fixed.jsonl")]) == 0
        assert cli.main(["split", str(tmp_path / "fixed.jsonl"), "--out-dir", str(tmp_path / "split")]) == 0
    finally:
        os.umask(previous)
    written = [
        tmp_path / "data.jsonl",
        tmp_path / "fixed.jsonl",
        tmp_path / "split" / "fixed-train.jsonl",
        tmp_path / "split" / "fixed-test.jsonl",
    ]
    assert {path.name: stat.S_IMODE(path.stat().st_mode) for path in written} == {path.name: mode for path in written}


def test_a_utf16_file_gets_one_message_with_the_utf16_fix(tmp_path, capsys):
    """100 lines of UTF-16 (as Windows 'Unicode' saves them): one error naming the encoding and the
    iconv command that converts it, not 101 (a CP1252 hint and an 'invalid JSON' for every line)."""
    source = tmp_path / "data.jsonl"
    source.write_bytes("".join(json.dumps(row) + "\n" for row in rows(100)).encode("utf-16"))
    assert cli.main(["validate", str(source)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        f"error: {source} is UTF-16 text (it starts with the UTF-16 byte-order mark), not UTF-8. Fix: convert it, "
        f"e.g. `iconv -f UTF-16 -t UTF-8 {source} > data-utf8.jsonl`, or 'Save as... UTF-8' in your editor\n"
    )


def test_with_json_a_file_that_cannot_be_read_is_also_one_json_object(tmp_path, capsys):
    source = tmp_path / "data.jsonl"
    source.write_bytes("".join(json.dumps(row) + "\n" for row in rows(3)).encode("utf-16"))
    assert cli.main(["validate", str(source), "--json"]) == 1
    out, err = capsys.readouterr()
    assert json.loads(out) == {"ok": False, "error": err.removeprefix("error: ").rstrip("\n")}
    assert "is UTF-16 text" in err
