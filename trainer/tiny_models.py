"""Tiny, randomly initialised causal LMs built locally: each family of trainer/families.py, or any config.

Tests and the embedded default job must run offline on a CPU, so nothing here
downloads anything: the tokenizer is trained on the caller's texts and the model
is built from a config with random weights. The results are ordinary Hugging
Face folders, so the trainer loads them exactly as it would load a real
checkpoint (`AutoTokenizer` / `AutoModelForCausalLM.from_pretrained`).

The tokenizer deliberately copies GPT-2's conventions, because those are the
conventions of the models users fine-tune (GPT-J, GPT-NeoX) and they hide traps
the trainer must handle:

- byte-level BPE, no prefix space, no BOS/EOS added on encode;
- one special token, ``<|endoftext|>``, which is BOS, EOS, UNK *and* PAD
  (pad == eos, so labels must be masked by position, never by token value).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from trainer.families import FAMILIES as FAMILY_ENTRIES

#: GPT-2's single special token; it is BOS, EOS, UNK and PAD at once.
ENDOFTEXT = "<|endoftext|>"

#: Model families `build_tiny_model` knows, as spelled in `config.model_type` (trainer/families.py).
FAMILIES = tuple(FAMILY_ENTRIES)

#: Long enough for any example the tests or the default job use; real GPT-J/NeoX use 2048.
MODEL_MAX_LENGTH = 2048


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a GPT-2-style byte-level BPE tokenizer on `texts`.

    The same texts and `vocab_size` always give the same vocabulary and merges.
    Because the initial alphabet is all 256 bytes, any string round-trips
    (``decode(encode(s)) == s``) even if it holds characters never seen in
    training. If the texts hold fewer distinct pairs than needed, the vocabulary
    simply ends up smaller than `vocab_size`.
    """
    tokenizer = Tokenizer(models.BPE())
    # add_prefix_space=False as in GPT-2: " Paris" and "Paris" are different tokens, and the
    # trainer must not silently add a space in front of a prompt.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,  # a merge seen once is noise, not vocabulary
        special_tokens=[ENDOFTEXT],  # id 0; registered as a special added token
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: nothing is ever unknown
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    # No post-processor: like GPT-2, encode adds no BOS/EOS, so the trainer has to append EOS
    # to completions itself (and we can test that it does).
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=ENDOFTEXT,
        eos_token=ENDOFTEXT,
        unk_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,  # pad == eos on purpose, exactly like GPT-2 / GPT-J / GPT-NeoX
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="right",
        clean_up_tokenization_spaces=False,  # otherwise decode(" ,") != " ," and round-trips break
    )


def _config_for(
    family: str,
    tokenizer: PreTrainedTokenizerFast,
    *,
    n_layer: int,
    n_embd: int,
    n_head: int,
    n_positions: int,
    **overrides,
):
    """A config for `family` sized to `tokenizer`, with dropout off so runs are deterministic."""
    if family not in FAMILY_ENTRIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")
    if n_embd % n_head:
        raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
    return FAMILY_ENTRIES[family].tiny_config(
        token_ids(tokenizer), n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions, **overrides
    )


def build_tiny_model(
    family: str,
    tokenizer: PreTrainedTokenizerFast,
    *,
    seed: int = 0,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_positions: int = 256,
    **overrides,
) -> PreTrainedModel:
    """Build a randomly initialised float32 causal LM of `family` for `tokenizer`.

    `family` is a key of `trainer.families.FAMILIES` ("gpt2", "gptj", "gpt_neox"). The sizes use
    GPT-2's names for every family; `overrides` go to the family's config class under its own names
    (e.g. ``activation_function="gelu"`` for gpt2, ``intermediate_size=96`` for gpt_neox).
    The same seed gives the same weights.
    """
    config = _config_for(
        family, tokenizer, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions, **overrides
    )
    return build_model_from_config(config, tokenizer, seed=seed)


def token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """The config keys that tie a model to `tokenizer`: vocabulary size and special token ids."""
    return dict(
        vocab_size=len(tokenizer),  # len() counts added tokens; vocab_size alone may not
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_model_from_config(config, tokenizer: PreTrainedTokenizerFast, *, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised float32 causal LM of any transformers `config` (sized to `tokenizer`
    with `token_ids`), e.g. of a family the trainer has no entry for. The same seed gives the same weights."""
    config.dtype = torch.float32  # saved into config.json, so from_pretrained loads fp32 too
    # fork_rng: seeding must not change the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config).to(torch.float32)
    # generate() reads these; pad == eos silences its "setting pad_token_id" warning and is
    # what the real GPT-2 family does.
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    model.eval()
    return model


def save_tiny_model(
    out_dir: str | Path, family: str, texts: Iterable[str], *, vocab_size: int = 1024, seed: int = 0, **model_kwargs
) -> Path:
    """Train a tokenizer on `texts`, build a tiny `family` model, save both to `out_dir`.

    The folder holds safetensors weights, config, generation config and tokenizer
    files, and loads offline with `AutoTokenizer` / `AutoModelForCausalLM`.
    `model_kwargs` are passed to `build_tiny_model`. Returns the folder's path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    model = build_tiny_model(family, tokenizer, seed=seed, **model_kwargs)
    model.save_pretrained(out)  # safetensors is the default (and only) format in transformers 5
    tokenizer.save_pretrained(out)
    return out
