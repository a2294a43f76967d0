"""Load the tokenizer and the model, and prepare it for the chosen method (LoRA or full)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from trainer.attention import configure_attention, install_attention
from trainer.config import Config
from trainer.errors import UserError
from trainer.families import family_of
from trainer.hub import load_options, local_folder_hint, model_source, offline_fix
from trainer.precision import torch_dtype
from trainer.quantization import keep_4bit_training_layout, kernel_notice, quiet_bitsandbytes_import


def _load_error(config: Config, what: str, err: Exception) -> UserError:
    name = config.model.name_or_path
    if load_options(name).get("local_files_only"):
        return UserError(f"could not load the {what} of model.name_or_path='{name}': {offline_fix(name)}")
    return UserError(
        f"could not load the {what} from model.name_or_path='{name}': {local_folder_hint(name)}{err}\n"
        "Fix: give a local folder made by save_pretrained, or a Hugging Face model id that is in your "
        "local cache (or reachable from this machine)."
    )


def _source(config: Config) -> str:
    """model.name_or_path as from_pretrained takes it; a path that is not there stops here."""
    return model_source(config.model.name_or_path, "model.name_or_path")


def load_model_config(config: Config):
    """The model's transformers config (config.json only: cheap, no weights)."""
    source = _source(config)
    try:
        return AutoConfig.from_pretrained(
            source, trust_remote_code=config.model.trust_remote_code, **load_options(source)
        )
    except (OSError, ValueError) as err:
        raise _load_error(config, "model config", err) from None


def load_tokenizer(config: Config):
    source = _source(config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, trust_remote_code=config.model.trust_remote_code, **load_options(source)
        )
    except (OSError, ValueError) as err:
        raise _load_error(config, "tokenizer", err) from None
    if tokenizer.pad_token_id is None:
        # Safe because labels are masked by position, not by pad id (see data/tokenize.py).
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def storage_dtype(config: Config) -> torch.dtype:
    """The dtype the weights are kept in. Full fine-tuning keeps float32 master weights whatever
    `model.dtype` is (then the compute dtype, under autocast): AdamW applied to bfloat16 weights
    loses every update smaller than half a bfloat16 step. LoRA and QLoRA keep the frozen base in
    `model.dtype` (peft keeps the adapters in float32)."""
    return torch.float32 if config.method == "full" else torch_dtype(config.model.dtype)


def quantization_options(config: Config, device: torch.device) -> dict:
    """QLoRA: weights stored as 4-bit NF4 with double quantization (the quantization constants are
    quantized too, about 0.4 bits a parameter saved), matrix products computed in `model.dtype`."""
    if config.method != "qlora":
        return {}
    from transformers import BitsAndBytesConfig

    from trainer.optim import require_bitsandbytes

    require_bitsandbytes("method=qlora", device)
    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype(config.model.dtype),
        ),
        # A quantized model is placed at load time: each process on its own device (GPU, or the CPU).
        "device_map": {"": device.index or 0} if device.type == "cuda" else {"": device.type},
    }


def _from_pretrained(config: Config, device: torch.device) -> PreTrainedModel:
    source = _source(config)
    dtype = storage_dtype(config)  # outside the try: a config whose dtype is not resolved is no loading error
    try:
        return AutoModelForCausalLM.from_pretrained(
            source,
            dtype=dtype,
            trust_remote_code=config.model.trust_remote_code,
            **quantization_options(config, device),
            **load_options(source),
        )
    except (OSError, ValueError) as err:
        raise _load_error(config, "model", err) from None


def _from_config(config: Config, device: torch.device, model_config) -> PreTrainedModel:
    """The model of `model_config` with random weights, built directly on `device` in the dtype a
    checkpoint would load in; QLoRA's linear layers made 4-bit as loading a checkpoint makes them."""
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            model_config, dtype=storage_dtype(config), trust_remote_code=config.model.trust_remote_code
        )
    if config.method == "qlora":
        from trainer.quantization import quantize_to_4bit

        quantize_to_4bit(model, quantization_options(config, device)["quantization_config"], device)
    return model


def load_model(
    config: Config,
    device: torch.device = torch.device("cpu"),
    *,
    on_meta: bool = False,
    random_weights: bool = False,
    model_config=None,
) -> tuple[PreTrainedModel, str]:
    """The model, ready for `apply_method`, and the attention implementation installed in it.

    `on_meta`: the same model without any weights (FSDP's other processes, which receive their
    shards from the main process), built from config.json alone. `random_weights`: the same model
    with randomly initialised weights instead of the checkpoint's (the doctor, where the weights are
    not here), every other step as in training. Both build from `model_config` (a transformers
    config; default: model.name_or_path's config.json)."""
    if on_meta or random_weights:
        model_config = model_config if model_config is not None else load_model_config(config)
    if on_meta:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(
                model_config, dtype=storage_dtype(config), trust_remote_code=config.model.trust_remote_code
            )
    elif random_weights:
        model = _from_config(config, device, model_config)
    else:
        model = _from_pretrained(config, device)
    model.config.use_cache = False  # the KV cache is for generation; training only wastes memory on it
    # A resolved config names its backend, already checked against the dtype attention computes in
    # (trainer/resolve.py); `auto` (callers without resolution) is chosen from the weights' dtype,
    # so before k-bit preparation casts norms to fp32.
    attention = config.model.attention
    if attention == "auto":
        attention = configure_attention(model, attention, device)
    else:
        install_attention(model, attention)
    if config.method == "qlora":
        from peft import prepare_model_for_kbit_training

        # Evaluation and test prompts must not repack the 4-bit weights into bitsandbytes' CPU
        # inference layout: training cannot continue on it (trainer/quantization.py).
        keep_4bit_training_layout(model, device)
        _say_once_on_rank_zero(kernel_notice())
        # Casts norms and the head to fp32 and enables input gradients, as k-bit training needs.
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=config.model.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif config.model.gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs (LoRA) without extra hooks. Later
        # transformers 5 releases renamed the method; earlier ones only have the old name.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, attention


def _say_once_on_rank_zero(message: str | None) -> None:
    """Print `message` from one process of a group (every process loads the model)."""
    if message and not (torch.distributed.is_initialized() and torch.distributed.get_rank() != 0):
        print(message, flush=True)


def lora_target_modules(config: Config, model_config) -> list[str] | str:
    """`lora.target_modules`, with `auto` resolved from the model family (`model_config.model_type`)."""
    targets = config.lora.target_modules
    if targets != "auto":
        return targets
    family = family_of(model_config)
    return list(family.lora_targets) if family else "all-linear"


def apply_method(config: Config, model: PreTrainedModel) -> PreTrainedModel:
    """Full fine-tuning trains every weight; LoRA and QLoRA freeze them and wrap the targets with adapters."""
    if config.method == "full":
        model.requires_grad_(True)
        return model
    quiet_bitsandbytes_import()  # peft imports bitsandbytes whenever it is installed
    from peft import LoraConfig, get_peft_model

    targets = lora_target_modules(config, model.config)
    lora = LoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=targets,
        # GPT-2 stores its projections as Conv1D with transposed weights.
        fan_in_fan_out=bool(family_of(model) and family_of(model).conv1d_projections),
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as err:
        raise UserError(
            f"key 'lora.target_modules': {err}. Fix: name modules that exist in this model, or use auto"
        ) from None


def parameter_count(param: torch.Tensor) -> int:
    """How many weights a parameter holds: a 4-bit one (bitsandbytes) stores two per byte, so its
    own numel() counts half of them; its quantization state knows the real shape."""
    quant_state = getattr(param, "quant_state", None)
    return quant_state.shape.numel() if quant_state is not None else param.numel()


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, 4-bit weights counted as weights."""
    trainable = sum(parameter_count(p) for p in model.parameters() if p.requires_grad)
    total = sum(parameter_count(p) for p in model.parameters())
    return trainable, total
