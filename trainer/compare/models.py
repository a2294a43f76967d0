"""The checkpoints' weights for the compare page, and completions made as `trainer.generate` makes them.

LoRA (and QLoRA) checkpoints of a run share one base model in memory: the base is loaded once
(unquantized, in the chosen dtype, as `trainer.loading` loads it) and wrapped by peft, each
checkpoint's adapter is added under a name of its own (`load_adapter`) and chosen with
`set_adapter` before it generates; an adapter is a few MB, the base is the model. Adapters are not
merged (merging would change the shared base), so a completion is computed as base + adapter rather
than with merged weights: the same function, rounded differently; on float32 the tokens agree with
`trainer.generate`'s (tested), in bfloat16 a near-tie between two tokens may rarely break the other
way. Full checkpoints are whole models: they are loaded on demand and at most `max_loaded` are held
(least recently used goes first). A checkpoint folder that a rerun replaced is loaded again.

Not thread-safe on purpose: one generation thread owns every model (trainer/compare/app.py), so two
forward passes never run at once and the adapter chosen is the one that generates.
"""

from __future__ import annotations

import gc
import itertools
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from trainer.compare.folder import Checkpoint
from trainer.config import TestPrompt
from trainer.errors import UserError
from trainer.generate import Completion, Row, generate_all, prompt_row
from trainer.hub import load_options
from trainer.loading import (
    ADAPTER_CONFIG,
    _base_fix,
    _first_line,
    base_model_name,
    inspect_checkpoint,
    load_checkpoint_model,
    load_checkpoint_tokenizer,
    position_limit,
)

DEFAULT_MAX_LOADED = 2


class PromptTooLong(UserError):
    """The prompt leaves no room for a completion in the model's context."""

    def __init__(self, message: str, tokens: int = 0, context: int = 0):
        super().__init__(message)
        self.tokens, self.context = tokens, context


@dataclass
class LoadStats:
    """What was loaded (tests read it: one base for all adapters, evictions past max_loaded)."""

    bases: int = 0
    adapters: int = 0
    full_models: int = 0
    evicted: list[str] = field(default_factory=list)


@dataclass
class _Adapter:
    base: str
    name: str
    identity: tuple


class CheckpointModels:
    def __init__(
        self, device: torch.device, dtype: torch.dtype, *, base: str | None = None, max_loaded: int = DEFAULT_MAX_LOADED
    ):
        if max_loaded < 1:
            raise ValueError("max_loaded must be at least 1")
        self.device, self.dtype, self.base_override, self.max_loaded = device, dtype, base, max_loaded
        self.stats = LoadStats()
        self._bases: dict[str, object] = {}  # base model name -> the PeftModel holding its adapters
        self._adapters: dict[str, _Adapter] = {}  # checkpoint folder -> its adapter
        self._full: OrderedDict[str, tuple[tuple, object]] = OrderedDict()  # folder -> (identity, model), oldest first
        self._tokenizers: dict[str, tuple[tuple, object]] = {}
        self._names = itertools.count()

    @property
    def loaded_full(self) -> list[str]:
        """Folders of the full models held now, least recently used first."""
        return list(self._full)

    def complete(self, checkpoint: Checkpoint, test_prompt: TestPrompt, seed: int | None) -> tuple[Row, Completion]:
        """`checkpoint`'s completion of `test_prompt`, as `python -m trainer.generate` makes it: the
        prompt encoded as training encodes it, greedy or sampled with `seed` (None: the run's
        training.seed, generate's default)."""
        info = inspect_checkpoint(checkpoint.path)
        model = self._model(checkpoint, info)
        tokenizer = self._tokenizer(checkpoint, info)
        row = prompt_row(tokenizer, test_prompt, (info.training_seed or 0) if seed is None else seed)
        context = position_limit(model)
        if len(row.prompt_ids) >= context:
            raise PromptTooLong(
                f"prompt: {len(row.prompt_ids)} tokens, but the model's context is {context} tokens: "
                f"at most {context - 1} leave room for a completion. Fix: shorten the prompt",
                tokens=len(row.prompt_ids),
                context=context,
            )
        [completion] = generate_all(model, tokenizer, [row])
        return row, completion

    # -----------------------------------------------------------------------------------------

    def _tokenizer(self, checkpoint: Checkpoint, info):
        held = self._tokenizers.get(str(checkpoint.path))
        if held is None or held[0] != checkpoint.identity:
            held = (checkpoint.identity, load_checkpoint_tokenizer(info))
            self._tokenizers[str(checkpoint.path)] = held
        return held[1]

    def _model(self, checkpoint: Checkpoint, info):
        if info.kind == "adapter":
            return self._adapter_model(checkpoint, info)
        key = str(checkpoint.path)
        held = self._full.get(key)
        if held is not None and held[0] == checkpoint.identity:
            self._full.move_to_end(key)
            return held[1]
        self._drop_full(key)
        while len(self._full) >= self.max_loaded:
            self._drop_full(next(iter(self._full)))
        model = load_checkpoint_model(info, self.dtype).to(self.device)
        self.stats.full_models += 1
        self._full[key] = (checkpoint.identity, model)
        return model

    def _drop_full(self, key: str) -> None:
        held = self._full.pop(key, None)
        if held is None:
            return
        self.stats.evicted.append(key)
        del held
        gc.collect()  # the model's tensors go now, not at some later collection
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _adapter_model(self, checkpoint: Checkpoint, info):
        from trainer.quantization import quiet_bitsandbytes_import

        quiet_bitsandbytes_import()  # peft imports bitsandbytes whenever it is installed
        from peft import PeftModel

        key = str(checkpoint.path)
        base_name = base_model_name(info, self.base_override)
        known = self._adapters.get(key)
        if known is not None and (known.identity != checkpoint.identity or known.base != base_name):
            self._bases[known.base].delete_adapter(known.name)  # the folder was replaced by a rerun's
            del self._adapters[key]
            known = None
        peft_model = self._bases.get(base_name)
        if known is None:
            name = f"step_{checkpoint.step}_{next(self._names)}"  # unique: a replaced folder gets a new name
            try:
                with warnings.catch_warnings():  # peft asks transformers a deprecated question; not the user's concern
                    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
                    if peft_model is None:
                        base_model = self._load_base(base_name, info)
                        peft_model = PeftModel.from_pretrained(
                            base_model, checkpoint.path, adapter_name=name, is_trainable=False
                        )
                        peft_model.to(self.device).eval()
                        self._bases[base_name] = peft_model
                    else:
                        peft_model.load_adapter(checkpoint.path, adapter_name=name, is_trainable=False)
            except (ValueError, RuntimeError, KeyError) as err:
                raise UserError(
                    f"the adapter in {checkpoint.path} does not fit the base model {base_name}: "
                    f"{_first_line(err)}. {_base_fix(info)}"
                ) from None
            self.stats.adapters += 1
            known = self._adapters[key] = _Adapter(base_name, name, checkpoint.identity)
        peft_model.set_adapter(known.name)
        return peft_model

    def _load_base(self, name: str, info):
        from transformers import AutoModelForCausalLM

        try:
            # No quantization_config: the base is loaded in the chosen dtype also for QLoRA runs (loading.py).
            model = AutoModelForCausalLM.from_pretrained(
                name, dtype=self.dtype, trust_remote_code=False, **load_options(name)
            )
        except (OSError, ValueError) as err:
            raise UserError(
                f"base model {name} (from {info.path / ADAPTER_CONFIG}) could not be loaded "
                f"({_first_line(err)}). {_base_fix(info)}"
            ) from None
        model.config.use_cache = True  # training saves it off; generation wants the KV cache
        self.stats.bases += 1
        return model
