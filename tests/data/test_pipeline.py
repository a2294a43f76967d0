"""The data stage of a run: files (JSONL, parquet, arrow, lists of them) -> checked, tokenized, split."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers import fruit_rows, write_jsonl
from trainer.config import Config
from trainer.data.examples import read_examples, read_file, split_validation
from trainer.data.pipeline import SKIPPED_LINES_FILE, prepare_data, write_skipped_lines
from trainer.data.tokenize import tokenize_examples
from trainer.errors import UserError

GOOD = {"prompt": "banana ->", "completion": " yellow<|endoftext|>"}


def make_config(tmp_path, **data):
    data.setdefault("cache_dir", str(tmp_path / "cache"))
    return Config.model_validate({"model": {"name_or_path": "unused"}, "data": data})


def prepare(config, tokenizer):
    messages = []
    return prepare_data(config, tokenizer, messages.append), messages


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_arrow(path, rows, stream=True):
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(path), "wb") as sink:
        writer = pa.ipc.new_stream(sink, table.schema) if stream else pa.ipc.new_file(sink, table.schema)
        writer.write_table(table)
        writer.close()
    return path


@pytest.mark.parametrize("kind", ["parquet", "arrow-stream", "arrow-file"])
def test_tables_read_like_jsonl_with_row_numbers(tmp_path, kind):
    rows = fruit_rows(5)
    jsonl = read_examples(write_jsonl(tmp_path / "a.jsonl", rows))
    if kind == "parquet":
        path = write_parquet(tmp_path / "a.parquet", rows)
    else:
        path = write_arrow(tmp_path / "a.arrow", rows, stream=kind == "arrow-stream")
    table = read_examples(path)
    assert [(e.prompt, e.completion, e.line) for e in table] == [(e.prompt, e.completion, e.line) for e in jsonl]
    assert table[0].source == str(path)


def test_table_rows_get_the_same_checks_and_nulls_are_missing_keys(tmp_path):
    path = write_parquet(tmp_path / "bad.parquet", [GOOD, {"prompt": "lime ->", "completion": None}])
    with pytest.raises(UserError) as info:
        read_examples(path)
    assert "1 problem:" in str(info.value) and "row 2: missing key 'completion'" in str(info.value)
    chats = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}]
    [example] = read_examples(write_parquet(tmp_path / "chat.parquet", chats))
    assert example.messages == (("user", "Hi"), ("assistant", "Hello"))


def test_a_corrupt_table_is_a_user_error(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(UserError, match="is not a readable parquet file"):
        read_examples(path)


def test_a_list_of_files_of_different_kinds(tmp_path, tokenizer):
    first = write_jsonl(tmp_path / "a.jsonl", fruit_rows(4))
    second = write_parquet(tmp_path / "b.parquet", fruit_rows(3))
    third = write_jsonl(tmp_path / "c.jsonl", [{"text": "Hello world"}])
    prepared, _ = prepare(make_config(tmp_path, train_file=[str(first), str(second), str(third)]), tokenizer)
    assert [(e.source, e.line) for e in prepared.train] == (
        [(str(first), n) for n in range(1, 5)] + [(str(second), n) for n in range(1, 4)] + [(str(third), 1)]
    )
    assert len(prepared.valid) == 0


def test_missing_files_are_named_before_anything_is_read(tmp_path, tokenizer):
    good = write_jsonl(tmp_path / "a.jsonl", fruit_rows(2))
    with pytest.raises(UserError, match=r"data file .*nope1.jsonl does not exist; .*nope2.jsonl does not exist"):
        prepare(
            make_config(
                tmp_path,
                train_file=[str(good), str(tmp_path / "nope1.jsonl")],
                validation_file=str(tmp_path / "nope2.jsonl"),
            ),
            tokenizer,
        )


def bad_file(tmp_path):
    lines = [json.dumps(GOOD), "{broken", json.dumps({"prompt": "a"}), json.dumps(GOOD), json.dumps({"text": "x"})]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_on_error_skip_leaves_out_invalid_lines_and_lists_them(tmp_path, tokenizer):
    path = bad_file(tmp_path)
    with pytest.raises(UserError, match="3 problems"):
        prepare(make_config(tmp_path, train_file=str(path)), tokenizer)
    prepared, messages = prepare(make_config(tmp_path, train_file=str(path), on_error="skip"), tokenizer)
    assert [e.line for e in prepared.train] == [1, 4]
    assert [(s.source, s.line) for s in prepared.skipped] == [(str(path), 2), (str(path), 3), (str(path), 5)]
    assert prepared.skipped[1].message == "missing key 'completion'. Fix: every line needs 'prompt' and 'completion'"
    assert any("skipped 3 invalid lines" in m and SKIPPED_LINES_FILE in m for m in messages)
    write_skipped_lines(tmp_path / SKIPPED_LINES_FILE, prepared.skipped)
    written = [json.loads(line) for line in (tmp_path / SKIPPED_LINES_FILE).read_text().splitlines()]
    assert written[1] == {"file": str(path), "line": 3, "message": prepared.skipped[1].message}
    # Reading the file directly agrees.
    direct = read_file(path, on_error="skip")
    assert [e.line for e in direct.examples] == [1, 4] and direct.skipped == prepared.skipped


def test_a_file_with_no_valid_line_is_an_error_even_when_skipping(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("{\n[1]\n")
    with pytest.raises(UserError, match="2 problems"):
        read_file(path, on_error="skip")


def test_prepared_data_equals_the_in_memory_path(tmp_path, tokenizer):
    rows = fruit_rows(20) + [
        {"prompt": "kiwi ->", "completion": " green" * 30},
        {"prompt": "", "completion": "Hello world"},
    ]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    config = make_config(tmp_path, train_file=str(path), validation_split=0.2, max_seq_len=24, too_long="truncate")
    prepared, messages = prepare(config, tokenizer)
    # The reference: read, split and tokenize in memory, with no cache and no worker processes.
    examples = read_file(path).examples
    raw_train, raw_valid = split_validation(examples, 0.2, config.training.seed)
    train, _ = tokenize_examples(raw_train, tokenizer, max_seq_len=24, too_long="truncate")
    valid, _ = tokenize_examples(raw_valid, tokenizer, max_seq_len=24, too_long="truncate")
    assert list(prepared.train) == train and list(prepared.valid) == valid
    assert len(prepared.valid) == 4 and any(len(e.input_ids) == 24 for e in train)
    assert prepared.train.lengths.tolist() == [len(e.input_ids) for e in train]
    assert prepared.train.supervised_tokens.tolist() == [e.supervised_tokens for e in train]
    assert "training data: 18 examples kept, 0 dropped, 1 truncated as too long (data.max_seq_len=24)" in messages


def test_too_long_error_names_the_lines(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", fruit_rows(3) + [{"prompt": "kiwi ->", "completion": " green" * 30}])
    with pytest.raises(
        UserError, match=r"1 examples are longer than data.max_seq_len=16:\n  .*train.jsonl line 4 \(\d+ tokens\)"
    ):
        prepare(make_config(tmp_path, train_file=str(path), max_seq_len=16), tokenizer)


def test_chat_file_with_agent_role_logs_the_warning(tmp_path, tokenizer):
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "agent", "content": "Hello"}]}] * 2
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    prepared, messages = prepare(make_config(tmp_path, train_file=str(path)), tokenizer)
    assert len(prepared.train) == 2 and prepared.train[0].supervised_tokens > 0
    assert prepared.warnings == [w.removeprefix("warning: ") for w in messages if w.startswith("warning: ")]
    assert prepared.warnings[0].startswith(f"{path}: lines 1, 2 use the role 'agent'")


def test_the_benchmark_data_is_deterministic_and_valid(tmp_path):
    import importlib.util

    from tests.helpers import REPO

    spec = importlib.util.spec_from_file_location("bench_data", REPO / "scripts" / "bench_data.py")
    bench_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_data)
    rows = bench_data.generate(tmp_path / "a.jsonl", 0.05)
    bench_data.generate(tmp_path / "b.jsonl", 0.05)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    examples = read_examples(tmp_path / "a.jsonl")
    assert len(examples) == rows and all(
        e.prompt.endswith("\n\n###\n\n") and e.completion.startswith(" ") for e in examples
    )


def test_a_start_reads_each_file_once_the_preflight_read(tmp_path, tokenizer, monkeypatch):
    """The preflight parses and hashes every file; the data stage then neither parses nor hashes it
    again, on a cold cache (it tokenizes the preflight's rows) or a warm one (a resume)."""
    from trainer.data import readers, reads
    from trainer.data.preflight import preflight_data

    path = write_jsonl(tmp_path / "train.jsonl", fruit_rows(40))
    config = make_config(tmp_path, train_file=str(path), validation_split=0.25)
    real_read = readers.read_jsonl
    calls = []
    monkeypatch.setattr(readers, "read_jsonl", lambda *a, **k: calls.append("parse") or real_read(*a, **k))
    real_open = open
    monkeypatch.setattr(reads, "open", lambda *a, **k: calls.append("hash") or real_open(*a, **k), raising=False)
    for cache in ("cold", "warm"):
        preflight_data(config, log=lambda message: None)
        prepared, messages = prepare(config, tokenizer)
        assert calls == ["parse"], cache
        assert (len(prepared.train), len(prepared.valid)) == (30, 10)
        assert ("from the cache" in messages[0]) == (cache == "warm")
        assert reads.take_rows(path) is None  # the kept rows were used or dropped, not left in memory
        calls.clear()
