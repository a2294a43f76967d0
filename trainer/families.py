"""One place for what the trainer knows about each model family: GPT-2, GPT-J, GPT-NeoX.

Every module that needs family knowledge asks `family_of(model or config)` instead of testing names:

* LoRA's default targets (`lora.target_modules: auto`) and whether projections are Conv1D (GPT-2);
* the transformer block class: FSDP shards each block, gradient checkpointing recomputes it;
* attention needs no entry: every family reaches every backend through transformers' public
  AttentionInterface (GPT-J since transformers 5.25), so nothing of a model's internals is patched;
* the FLOP shape (`trainer/flops.py`), the tiny test configuration (`trainer/tiny_models.py`) and
  the published configurations of the real models (the planner, the benchmark);
* the planner's activation model (`trainer/activations.py`), named here and imported on first use.

Adding a family (Pythia is GPT-NeoX and needs nothing; a Llama-style model would) is one `Family`
entry in `FAMILIES` plus its tests: the tests' tiny models (tests/conftest.py), the parametrized
family tests in tests/test_families.py, tests/test_attention.py, tests/test_loss.py and
tests/test_train_e2e.py, and scripts/compile_check.py pick it up from `FAMILIES`. A model without an
entry trains with generic defaults (tests/test_unknown_families.py).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from trainer.flops import ModelShape


@dataclass(frozen=True)
class Family:
    model_type: str
    """`config.model_type` in transformers."""
    lora_targets: tuple[str, ...]
    """Every attention and MLP projection (QLoRA paper: all linear layers matter)."""
    block_class: str
    """The transformer block's class name."""
    conv1d_projections: bool
    """Projections stored as Conv1D with transposed weights (LoRA needs fan_in_fan_out)."""
    shape: Callable[..., ModelShape]
    """config -> the FLOP shape (`trainer/flops.py`)."""
    tiny_config: Callable[..., object]
    """(token ids, n_layer, n_embd, n_head, n_positions, **overrides) -> config, dropout off."""
    activations: str | None = None
    """The planner's activation model of the family, as "module:name" of an `ActivationModel`
    (trainer/activations.py: the family's block replayed op by op). A name, not the object:
    trainer.activations imports torch and the loss, and this module stays cheap to import. None:
    the planner does not estimate this family's memory (it still trains)."""

    @property
    def activation_model(self):
        """The `ActivationModel` that `activations` names (imported on first use), or None."""
        if self.activations is None:
            return None
        module, _, name = self.activations.partition(":")
        return getattr(importlib.import_module(module), name)


def _gpt2_like_shape(config) -> ModelShape:
    d_ff = config.n_inner if config.n_inner is not None else 4 * config.n_embd
    return ModelShape(config.n_layer, config.n_embd, d_ff, config.vocab_size)


def _neox_shape(config) -> ModelShape:
    return ModelShape(config.num_hidden_layers, config.hidden_size, config.intermediate_size, config.vocab_size)


def _tiny_gpt2(token_ids: dict, *, n_layer: int, n_embd: int, n_head: int, n_positions: int, **overrides):
    from transformers import GPT2Config

    sizes = dict(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_positions=n_positions,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        summary_first_dropout=0.0,
    )
    return GPT2Config(**token_ids, **{**sizes, **overrides})


def _tiny_gptj(token_ids: dict, *, n_layer: int, n_embd: int, n_head: int, n_positions: int, **overrides):
    from transformers import GPTJConfig

    # GPT-J-6B rotates 64 of 256 dims per head; half the head is the tiny equivalent and keeps the
    # rotary and pass-through code paths both exercised. Must be even.
    rotary_dim = max(2, (n_embd // n_head // 2) // 2 * 2)
    sizes = dict(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_positions=n_positions,
        rotary_dim=rotary_dim,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPTJConfig(**token_ids, **{**sizes, **overrides})


def _tiny_neox(token_ids: dict, *, n_layer: int, n_embd: int, n_head: int, n_positions: int, **overrides):
    from transformers import GPTNeoXConfig

    # GPT-NeoX-20B rotates 25% of each head; keep it, but never fewer than 2 dims.
    partial = max(0.25, 2 / (n_embd // n_head))
    sizes = dict(
        num_hidden_layers=n_layer,
        hidden_size=n_embd,
        num_attention_heads=n_head,
        max_position_embeddings=n_positions,
        intermediate_size=4 * n_embd,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": partial},
        attention_dropout=0.0,
        hidden_dropout=0.0,
    )
    return GPTNeoXConfig(**token_ids, **{**sizes, **overrides})


FAMILIES: dict[str, Family] = {
    family.model_type: family
    for family in (
        Family(
            model_type="gpt2",
            lora_targets=("c_attn", "c_proj", "c_fc"),
            block_class="GPT2Block",
            conv1d_projections=True,
            shape=_gpt2_like_shape,
            tiny_config=_tiny_gpt2,
            activations="trainer.activations:GPT2",
        ),
        Family(
            model_type="gptj",
            lora_targets=("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"),
            block_class="GPTJBlock",
            conv1d_projections=False,
            shape=_gpt2_like_shape,
            tiny_config=_tiny_gptj,
            activations="trainer.activations:GPTJ",
        ),
        Family(
            model_type="gpt_neox",
            lora_targets=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
            block_class="GPTNeoXLayer",
            conv1d_projections=False,
            shape=_neox_shape,
            tiny_config=_tiny_neox,
            activations="trainer.activations:GPT_NEOX",
        ),
    )
}


def family_of(model_or_config) -> Family | None:
    """The family of a transformers model or config (through PEFT/DDP/FSDP/compile wrappers), or
    None for a family the trainer has no entry for (it still trains, with generic defaults)."""
    config = getattr(model_or_config, "config", model_or_config)
    while getattr(config, "config", None) is not None and not hasattr(config, "model_type"):
        config = config.config
    return FAMILIES.get(getattr(config, "model_type", None))


def require_family(model_or_config) -> Family:
    family = family_of(model_or_config)
    if family is None:
        config = getattr(model_or_config, "config", model_or_config)
        raise ValueError(
            f"no family entry for model_type {getattr(config, 'model_type', None)!r}; known: {', '.join(FAMILIES)}"
        )
    return family


def estimates_memory(model_or_config) -> bool:
    """Whether the planner (trainer/plan.py) can estimate this model's memory: its family has an
    entry and the entry names an activation model."""
    family = family_of(model_or_config)
    return family is not None and family.activations is not None


def memory_families() -> list[str]:
    """The `model_type`s the planner estimates memory for."""
    return [family.model_type for family in FAMILIES.values() if family.activations is not None]


def model_shape(config) -> ModelShape:
    """The FLOP shape (`trainer/flops.py`) of a GPT-2, GPT-J or GPT-NeoX config."""
    family = family_of(config)
    if family is None:
        raise ValueError(
            f"no FLOP formula for model_type {getattr(config, 'model_type', None)!r}; known: {', '.join(FAMILIES)}"
        )
    return family.shape(config)


def transformer_blocks(model) -> list:
    """The model's transformer blocks (the family's block class), in order."""
    family = require_family(model)
    return [module for module in model.modules() if type(module).__name__ == family.block_class]


# ---------------------------------------------------------------------------------------------
# The real models' published configurations (no download: the planner and the benchmark build
# them on the meta device or on a GPU with random weights).


def gptj_6b_config():
    """EleutherAI/gpt-j-6b's published hyperparameters (6,050,882,784 parameters in transformers)."""
    from transformers import GPTJConfig

    return GPTJConfig(
        vocab_size=50400,
        n_positions=2048,
        n_embd=4096,
        n_layer=28,
        n_head=16,
        rotary_dim=64,
        n_inner=None,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=1e-5,
        tie_word_embeddings=False,
        bos_token_id=50256,
        eos_token_id=50256,
        pad_token_id=50256,
    )


def neox_20b_config():
    """EleutherAI/gpt-neox-20b's published hyperparameters (20,554,567,680 parameters)."""
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        vocab_size=50432,
        hidden_size=6144,
        num_hidden_layers=44,
        num_attention_heads=64,
        intermediate_size=24576,
        hidden_act="gelu_fast",
        max_position_embeddings=2048,
        layer_norm_eps=1e-5,
        use_parallel_residual=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        attention_dropout=0.0,
        hidden_dropout=0.0,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )


def mid_gptj_config():
    """GPT-J's layer design and real 50,400-token vocabulary at a size a CPU trains in seconds:
    4 layers of width 256, 4 heads of 64 (a quarter of each rotated, as in GPT-J-6B)."""
    config = gptj_6b_config()
    config.update({"n_embd": 256, "n_layer": 4, "n_head": 4, "rotary_dim": 16})
    return config


#: Hugging Face ids whose shape is known without their config.json (no download needed to plan).
PUBLISHED_CONFIGS: dict[str, Callable[[], object]] = {
    "EleutherAI/gpt-j-6b": gptj_6b_config,
    "EleutherAI/gpt-neox-20b": neox_20b_config,
}
