"""The tokenized-data cache: hit on a rerun, missed when the file, tokenizer, a setting or the code changes."""

import copy
import shutil

import pytest

from tests.helpers import fruit_rows, write_jsonl
from trainer.config import Config
from trainer.data import cache, pipeline
from trainer.data.cache import file_digest, tokenizer_digest
from trainer.data.pipeline import prepare_data
from trainer.errors import UserError


def make_config(tmp_path, train_file, **data):
    return Config.model_validate(
        {
            "model": {"name_or_path": "unused"},
            "data": {"train_file": str(train_file), "cache_dir": str(tmp_path / "cache"), **data},
        }
    )


@pytest.fixture
def counted(monkeypatch):
    """Counts the files read and tokenized (the work a cache hit must not do)."""
    calls = {"read": 0, "encode": 0}
    real_read, real_encode = pipeline.read_file, pipeline.encode_examples

    def read_file(*args, **kwargs):
        calls["read"] += 1
        return real_read(*args, **kwargs)

    def encode_examples(*args, **kwargs):
        calls["encode"] += 1
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(pipeline, "read_file", read_file)
    monkeypatch.setattr(pipeline, "encode_examples", encode_examples)
    return calls


def run(config, tokenizer):
    messages = []
    return prepare_data(config, tokenizer, messages.append), messages


def test_a_rerun_reads_and_tokenizes_nothing(tmp_path, tokenizer, counted):
    path = write_jsonl(tmp_path / "train.jsonl", fruit_rows(8))
    config = make_config(tmp_path, path, validation_split=0.25)
    first, messages = run(config, tokenizer)
    assert counted == {"read": 1, "encode": 1} and "tokenized with 1 process(es)" in messages[0]
    second, messages = run(config, tokenizer)
    assert counted == {"read": 1, "encode": 1} and "from the cache" in messages[0]
    assert list(second.train) == list(first.train) and list(second.valid) == list(first.valid)
    assert not list((tmp_path / "cache").glob(".*partial"))  # built under a temporary name, then renamed


def test_a_copied_file_hits_and_reports_its_own_path(tmp_path, tokenizer, counted):
    path = write_jsonl(tmp_path / "train.jsonl", fruit_rows(4))
    run(make_config(tmp_path, path), tokenizer)
    copy_path = tmp_path / "copy.jsonl"
    shutil.copy(path, copy_path)
    prepared, _ = run(make_config(tmp_path, copy_path), tokenizer)
    assert counted["encode"] == 1 and {e.source for e in prepared.train} == {str(copy_path)}


def test_a_changed_file_misses(tmp_path, tokenizer, counted):
    path = write_jsonl(tmp_path / "train.jsonl", fruit_rows(4))
    run(make_config(tmp_path, path), tokenizer)
    write_jsonl(path, fruit_rows(5))
    prepared, _ = run(make_config(tmp_path, path), tokenizer)
    assert counted["encode"] == 2 and len(prepared.train) == 5


def test_a_changed_tokenizer_misses(tmp_path, tokenizer, counted):
    path = write_jsonl(tmp_path / "train.jsonl", fruit_rows(4))
    run(make_config(tmp_path, path), tokenizer)
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["banana"])  # a new token: the same text now tokenizes differently
    prepared, _ = run(make_config(tmp_path, path), other)
    assert counted["encode"] == 2
    assert prepared.train[0].input_ids[0] == other.convert_tokens_to_ids("banana")


TAGGED_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.mark.parametrize(
    "setting",
    [{"train_on": "last_assistant"}, {"chat_template": TAGGED_TEMPLATE}, {"format": "chat"}, {"on_error": "skip"}],
)
def test_a_changed_setting_misses(tmp_path, tokenizer, counted, setting):
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}] * 3
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    run(make_config(tmp_path, path), tokenizer)
    run(make_config(tmp_path, path), tokenizer)
    assert counted["encode"] == 1
    run(make_config(tmp_path, path, **setting), tokenizer)
    assert counted["encode"] == 2


def test_changed_code_misses(tmp_path, tokenizer, counted, monkeypatch):
    path = write_jsonl(tmp_path / "train.jsonl", fruit_rows(4))
    run(make_config(tmp_path, path), tokenizer)
    monkeypatch.setattr(cache, "code_digest", lambda: "a fix to tokenize.py")
    run(make_config(tmp_path, path), tokenizer)
    assert counted["encode"] == 2


def test_the_length_policy_runs_on_load_without_tokenizing_again(tmp_path, tokenizer, counted):
    path = write_jsonl(tmp_path / "train.jsonl", fruit_rows(3) + [{"prompt": "kiwi ->", "completion": " green" * 30}])
    full, _ = run(make_config(tmp_path, path, max_seq_len=256), tokenizer)
    cut, messages = run(make_config(tmp_path, path, max_seq_len=16, too_long="truncate"), tokenizer)
    assert counted["encode"] == 1
    assert len(full.train[3].input_ids) > 16
    assert cut.train[3].input_ids == full.train[3].input_ids[:16] and cut.train[3].labels == full.train[3].labels[:16]
    assert "training data: 4 examples kept, 0 dropped, 1 truncated as too long (data.max_seq_len=16)" in messages


def test_a_broken_entry_is_rebuilt(tmp_path, tokenizer, counted):
    path = write_jsonl(tmp_path / "train.jsonl", fruit_rows(4))
    first, _ = run(make_config(tmp_path, path), tokenizer)
    [entry] = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    (entry / cache.META_FILE).unlink()
    again, _ = run(make_config(tmp_path, path), tokenizer)
    assert counted["encode"] == 2 and list(again.train) == list(first.train)


def test_several_processes_give_the_same_data(tmp_path, tokenizer, monkeypatch):
    rows = fruit_rows(30) + [{"prompt": "", "completion": "Hello world"}]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    one, _ = run(make_config(tmp_path, path), tokenizer)
    monkeypatch.setattr(pipeline, "ENCODE_BATCH", 4)  # so 31 rows are worth 3 processes
    three, messages = run(make_config(tmp_path, path, num_proc=3, cache_dir=str(tmp_path / "other")), tokenizer)
    assert "tokenized with 3 process(es)" in messages[0]
    assert len(three.train.parts) == 3 and list(three.train) == list(one.train)


def test_fingerprints(tmp_path, tokenizer, tiny_model_dirs):
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tiny_model_dirs["gpt2"])
    assert tokenizer_digest(again) == tokenizer_digest(tokenizer)
    again.backend_tokenizer.enable_truncation(8)  # call-time state is not identity
    assert (
        tokenizer_digest(again) == tokenizer_digest(tokenizer) and again.backend_tokenizer.truncation["max_length"] == 8
    )
    neox = AutoTokenizer.from_pretrained(tiny_model_dirs["gpt_neox"])  # same texts, same vocabulary
    assert tokenizer_digest(neox) == tokenizer_digest(tokenizer)
    (tmp_path / "a").write_bytes(b"abc")
    assert file_digest(tmp_path / "a") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_an_unusable_cache_dir_is_a_user_error(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", fruit_rows(2))
    (tmp_path / "cache").write_text("a file, not a folder")
    with pytest.raises(UserError, match=r"cannot write the tokenized-data cache in .*cache .*Fix: set data.cache_dir"):
        run(make_config(tmp_path, path), tokenizer)


def test_a_damaged_entry_is_rebuilt(tmp_path, tokenizer, counted):
    path = write_jsonl(tmp_path / "train.jsonl", fruit_rows(8))
    config = make_config(tmp_path, path)
    first, _ = run(config, tokenizer)
    expected = list(first.train)  # read before the damage: the rows are memory-mapped from the shard
    [entry] = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    [shard] = list(entry.glob("shard-*"))
    shard.write_bytes(shard.read_bytes()[:20])  # a crash or a full disk mid-write
    second, messages = run(config, tokenizer)
    assert counted == {"read": 2, "encode": 2} and "tokenized with" in messages[0]
    assert list(second.train) == expected
