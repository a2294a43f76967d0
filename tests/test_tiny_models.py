"""Tiny local models, their tokenizer, and the bundled example data.

Everything here runs offline on a CPU in a few seconds.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # so `pytest` works from any folder, not only `python -m pytest`
    sys.path.insert(0, str(REPO))

from trainer.tiny_models import (  # noqa: E402
    ENDOFTEXT,
    FAMILIES,
    build_tiny_model,
    save_tiny_model,
    train_tokenizer,
)

EXAMPLES = REPO / "examples"
TRAIN = EXAMPLES / "data" / "locations-train.jsonl"
VALID = EXAMPLES / "data" / "locations-valid.jsonl"
TINY_GPT2 = EXAMPLES / "tiny-gpt2"


def _load_script(name: str):
    """Import scripts/<name>.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_example_data = _load_script("make_example_data")
make_tiny_model = _load_script("make_tiny_model")

TEXTS = [
    "List the locations mentioned in the following text.\nText: Anna flew to Paris.\nLocations:",
    " Paris<|endoftext|>",
    "The train from Berlin to Tokyo was late. Café, naïve, Zürich.",
    " No locations mentioned<|endoftext|>",
] * 20


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=400)


def _read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# --- tokenizer ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "Hello world",
        " leading space",
        "two  spaces\nand\ttabs",
        " ,x",
        "naïve café in Zürich",
        "東京 and 🎉 never seen in training",
        "",
    ],
)
def test_tokenizer_round_trips(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_endoftext_in_text_is_the_single_eos_id(tokenizer):
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == tokenizer.unk_token_id
    ids = tokenizer(" Paris" + ENDOFTEXT)["input_ids"]
    assert ids[-1] == tokenizer.eos_token_id
    assert ids.count(tokenizer.eos_token_id) == 1
    assert tokenizer(ENDOFTEXT)["input_ids"] == [tokenizer.eos_token_id]


def test_pad_is_eos_and_nothing_is_added_on_encode(tokenizer):
    assert tokenizer.pad_token == tokenizer.eos_token == ENDOFTEXT
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    ids = tokenizer("Paris")["input_ids"]
    assert tokenizer.eos_token_id not in ids  # GPT-2 style: no BOS/EOS added automatically
    assert tokenizer.model_max_length == 2048


def test_tokenizer_training_is_deterministic(tokenizer):
    again = train_tokenizer(TEXTS, vocab_size=400)
    assert again.get_vocab() == tokenizer.get_vocab()
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


# --- models ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_family_saves_and_reloads_with_identical_logits(tmp_path, family):
    path = save_tiny_model(tmp_path / family, family, TEXTS, vocab_size=400, seed=3)
    assert (path / "model.safetensors").is_file()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == family
    assert model.dtype == torch.float32
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.pad_token_id == model.config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.eos_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id

    fresh = build_tiny_model(family, train_tokenizer(TEXTS, vocab_size=400), seed=3)
    ids = torch.tensor([tokenizer(TEXTS[0])["input_ids"]])
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, fresh(ids).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_seed_decides_the_weights(tokenizer, family):
    a, b = (build_tiny_model(family, tokenizer, seed=0) for _ in range(2))
    c = build_tiny_model(family, tokenizer, seed=1)
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert not all(torch.equal(pa[k], pc[k]) for k in pa)


def test_build_rejects_unknown_family(tokenizer):
    with pytest.raises(ValueError, match="unknown model family"):
        build_tiny_model("llama", tokenizer)


def test_committed_tiny_gpt2_loads_and_generates():
    tokenizer = AutoTokenizer.from_pretrained(TINY_GPT2)
    model = AutoModelForCausalLM.from_pretrained(TINY_GPT2)
    assert model.config.model_type == "gpt2"
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    size = sum(f.stat().st_size for f in TINY_GPT2.iterdir())
    assert size < 5_000_000  # committed to the repository: keep it small
    prompt = make_example_data.TEST_PROMPTS[0]["prompt"]
    inputs = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**inputs, do_sample=False, max_new_tokens=3)
    assert out.shape[1] <= inputs["input_ids"].shape[1] + 3


def test_make_tiny_model_defaults_reproduce_the_committed_folder(tmp_path):
    make_tiny_model.main(["--out", str(tmp_path), "--data", str(TRAIN)])
    committed = AutoTokenizer.from_pretrained(TINY_GPT2)
    rebuilt = AutoTokenizer.from_pretrained(tmp_path)
    assert rebuilt.get_vocab() == committed.get_vocab()
    want = load_file(TINY_GPT2 / "model.safetensors")
    got = load_file(tmp_path / "model.safetensors")
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    # Everything but the version of transformers that wrote the file.
    rebuilt_config, committed_config = (
        json.loads((folder / "config.json").read_text()) for folder in (tmp_path, TINY_GPT2)
    )
    assert rebuilt_config.pop("transformers_version") and committed_config.pop("transformers_version")
    assert rebuilt_config == committed_config


# --- example data ------------------------------------------------------------------------


@pytest.mark.parametrize("path", [TRAIN, VALID])
def test_example_data_follows_the_format(path):
    rows = _read_jsonl(path)
    assert len(rows) >= 50
    for row in rows:
        assert set(row) == {"prompt", "completion"}
        assert row["prompt"].startswith(make_example_data.INSTRUCTION + "\nText: ")
        assert row["prompt"].endswith("\nLocations:")
        assert row["completion"].startswith(" ")
        assert row["completion"].endswith("<|endoftext|>")
        assert row["completion"].count("<|endoftext|>") == 1


def test_answers_list_locations_in_text_order():
    for row in _read_jsonl(TRAIN) + _read_jsonl(VALID):
        sentence = row["prompt"].split("\nText: ")[1].removesuffix("\nLocations:")
        answer = row["completion"].removeprefix(" ").removesuffix("<|endoftext|>")
        found = sorted((sentence.index(p), p) for p in make_example_data.PLACES if p in sentence)
        expected = ", ".join(p for _, p in found) or "No locations mentioned"
        assert answer == expected, sentence


def test_splits_and_test_prompts_are_disjoint():
    train = [r["prompt"] for r in _read_jsonl(TRAIN)]
    valid = [r["prompt"] for r in _read_jsonl(VALID)]
    assert len(set(train)) == len(train) and len(set(valid)) == len(valid)
    assert not set(train) & set(valid)
    tests = [t["prompt"] for t in make_example_data.TEST_PROMPTS]
    assert len(tests) == 5
    assert not set(tests) & (set(train) | set(valid))
    counts = {
        t["expected"].count(",") + (t["expected"] != " No locations mentioned") for t in make_example_data.TEST_PROMPTS
    }
    assert counts == {0, 1, 2}  # the test prompts cover 0, 1 and 2 locations
    for t in make_example_data.TEST_PROMPTS:
        assert t["prompt"].endswith("\nLocations:") and t["expected"].startswith(" ")
        assert not t["expected"].endswith(ENDOFTEXT)


def test_example_data_script_reproduces_the_files(tmp_path):
    make_example_data.main(["--out", str(tmp_path)])
    assert (tmp_path / TRAIN.name).read_bytes() == TRAIN.read_bytes()
    assert (tmp_path / VALID.name).read_bytes() == VALID.read_bytes()
