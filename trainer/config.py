"""The run configuration: typed, validated once, saved into the run folder.

A config is a YAML file plus `section.key=value` overrides from the command line
(values are parsed as YAML, so `training.learning_rate=3e-4` is a number and
`checkpoints.count=7` an integer). Every field has a docstring: they are the
config reference (`python scripts/config_reference.py` prints it for the README).

Unknown keys, wrong types and impossible combinations raise `UserError` naming
the key, where it came from (the file or the command line) and the fix.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trainer.errors import UsageError, UserError
from trainer.precision import DTYPE_CHOICES
from trainer.stopping import parse_duration


class _Section(BaseModel):
    """Base for every config section: unknown keys are errors, docstrings are descriptions."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class ModelConfig(_Section):
    name_or_path: str
    """Hugging Face model id (e.g. `EleutherAI/gpt-j-6b`: from the local HF cache, or downloaded where
    the machine can reach the Hub) or a local folder made by `save_pretrained`."""

    dtype: Literal[DTYPE_CHOICES] = "auto"
    """The compute dtype. LoRA and QLoRA keep the frozen base in it; full fine-tuning keeps float32
    master weights and optimizer state and computes in it under autocast (AdamW on bfloat16 weights
    would lose every update smaller than half a bfloat16 step). `auto`: bfloat16 on a CUDA GPU that
    supports it, else float32."""

    trust_remote_code: bool = False
    """Run Python code shipped with the model repository. Off unless you trust the source."""

    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: much less memory, about 30% more compute."""

    attention: Literal["auto", "eager", "sdpa", "varlen", "flex"] = "auto"
    """Attention kernel. `auto` picks the fastest correct one for the device and model (checked at
    start); `eager` is transformers' reference path; `sdpa` is torch's scaled_dot_product_attention;
    `varlen` and `flex` attend within each packed example without padding (CUDA)."""


class LoraConfig(_Section):
    r: int = Field(16, gt=0)
    """LoRA rank."""

    alpha: float = Field(32.0, gt=0)
    """LoRA scaling numerator: the update is scaled by alpha / r."""

    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    """Dropout on the LoRA input."""

    target_modules: Union[Literal["auto", "all-linear"], list[str]] = "auto"
    """Modules that get adapters. `auto` picks per family: GPT-J q_proj, k_proj, v_proj, out_proj,
    fc_in, fc_out; GPT-NeoX query_key_value, dense, dense_h_to_4h, dense_4h_to_h; GPT-2 c_attn,
    c_proj, c_fc; any other family: every linear layer (`all-linear`). Or a list of module names."""


class DataConfig(_Section):
    train_file: Union[str, Annotated[list[str], Field(min_length=1)]]
    """Training data, one file or a list: JSONL (UTF-8, one JSON object a line), or local parquet /
    arrow files. Rows are `{"prompt", "completion"}` (an empty prompt makes an open-ended example),
    `{"messages": [{"role", "content"}, ...]}` (chat) or `{"text"}` (open-ended text)."""

    validation_file: Union[str, list[str], None] = None
    """Held-out data in the same format(s), for the eval loss at each checkpoint."""

    format: Literal["auto", "prompt_completion", "chat", "text"] = "auto"
    """Row format. `auto` detects it per file; a file that mixes formats is an error."""

    train_on: Literal["all_assistant", "last_assistant"] = "all_assistant"
    """Chat data: train every assistant turn of a thread, or only the last one."""

    chat_template: str | None = None
    """Chat data: a Jinja chat template. Default: the tokenizer's own template, or for models without
    one (GPT-J, GPT-NeoX) a plain-text template; the same one renders chat test prompts."""

    on_error: Literal["error", "skip"] = "error"
    """Invalid lines stop the run before training (`error`), or are skipped and listed in the run
    folder (`skip`)."""

    packing: Union[bool, Literal["auto"]] = "auto"
    """Pack several examples into each `max_seq_len` row (no padding, so no compute wasted on it);
    each example still attends only to itself and keeps its own positions, so the loss and the
    gradients equal the unpacked ones. `auto`: on for the families in trainer/families.py (GPT-2,
    GPT-J, GPT-NeoX: tested exact), off for others. With packing, `training.micro_batch_size`
    counts rows."""

    cache_dir: str | None = None
    """Where tokenized data is cached (keyed by file content, tokenizer and settings), so a rerun
    does not tokenize again. Default: the `datasets` cache."""

    num_proc: int | None = Field(None, ge=1)
    """Processes for tokenization. Default: several for large data, one for small."""

    validation_split: float = Field(0.0, ge=0.0, lt=1.0)
    """Fraction of the training file held out for validation (deterministic, by `training.seed`),
    when there is no `validation_file`. 0 means no eval loss."""

    max_seq_len: int = Field(2048, gt=0)
    """Longest example in tokens (prompt + completion + EOS)."""

    too_long: Literal["error", "drop", "truncate"] = "error"
    """What to do with an example over `max_seq_len`: stop with its line number (`error`), skip it
    (`drop`), or cut the completion's end (`truncate`; an example whose prompt alone is too long is
    dropped). The number affected is reported either way."""

    @model_validator(mode="after")
    def _one_validation_source(self) -> "DataConfig":
        if self.validation_file and self.validation_split > 0:
            raise ValueError("set either data.validation_file or data.validation_split, not both (remove one of them)")
        return self


class TrainingConfig(_Section):
    epochs: Union[Annotated[float, Field(gt=0)], Literal["auto"]] = "auto"
    """Passes over the training data (may be fractional, must be above 0). `auto` uses the table by
    training-file size: under 10 MB 4, under 100 MB 3, under 500 MB 2, larger 1 (the upper end of
    the usual range, because the checkpoints let you pick an earlier one)."""

    micro_batch_size: int = Field(4, gt=0)
    """Examples per forward pass on each process; with `data.packing` (the default for known
    families), rows of up to `data.max_seq_len` tokens, each holding several examples."""

    gradient_accumulation_steps: int = Field(1, gt=0)
    """Micro-batches per optimizer step. The loss is normalized by the supervised tokens of the
    whole step, so accumulation gives the same update as one large batch."""

    learning_rate: float = Field(1e-4, gt=0)
    """Peak learning rate (AdamW)."""

    lr_scheduler: Literal["constant", "linear", "cosine"] = "cosine"
    """Shape after warmup: constant, linear decay to 0, or cosine decay to 0."""

    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    """Fraction of the optimizer steps spent warming up linearly from 0 to the peak."""

    weight_decay: float = Field(0.0, ge=0.0)
    """AdamW weight decay (not applied to biases and norm weights)."""

    max_grad_norm: float | None = Field(1.0, ge=0.0)
    """Clip the global gradient norm to this value; 0 or null turns clipping off."""

    seed: int = 42
    """Seed for initialisation, data order, dropout, the validation split and sampling."""

    mixed_precision: Literal["auto", "bf16", "fp16", "no"] = "auto"
    """Autocast for the forward pass. `auto`: in `model.dtype` when it is bfloat16 or float16, else
    none."""

    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = "adamw"
    """`adamw` (torch); `adamw_8bit` and `paged_adamw_8bit` keep optimizer state in 8 bits
    (bitsandbytes; CUDA, or the CPU with bitsandbytes >= 0.50): 6 bytes less per trained parameter."""

    compile: bool = False
    """Compile the model with torch.compile (slower start, faster steps)."""

    time_limit: str | None = None
    """Wall-clock budget of this job, e.g. `23h30m`, `90m`, `1d`, `3600s`. Before it runs out the
    run saves its resumable state and stops (exit code 75), leaving a margin measured from its
    longest step, checkpoint and state save so far. Default: under SLURM the job's end time,
    otherwise none."""

    max_bad_steps: int = Field(10, ge=1)
    """A step whose loss or gradient norm is not finite is skipped (no update). After this many in a
    row the run saves its state and stops with an error naming the step."""

    self_test: bool = True
    """Before step 1, on the real model, device and dtype, check that the attention backend matches
    eager attention, that training's batch layout (packed or padded) matches each example alone,
    and that the first batch supervises exactly its completions (trainer/selftest.py). A failure
    stops the run before any training, naming the check, the difference and the fix. About a
    second; `false` skips it."""

    @field_validator("time_limit")
    @classmethod
    def _duration(cls, value: str | None) -> str | None:
        if value is not None:
            parse_duration(value)  # raises ValueError naming the accepted forms
        return value


class CheckpointsConfig(_Section):
    count: int = Field(5, ge=1)
    """How many checkpoints to save, at evenly spaced optimizer steps; the last is the final step.
    Checkpoint i of N is at step ceil(i * total_steps / N)."""

    state_every_minutes: float | None = Field(30.0, ge=0)
    """Also save the resumable state (optimizer, RNG, step) this often, so a killed job loses at
    most this much work; 0 or null turns it off. It is always saved at each checkpoint and when the
    job is told to stop."""

    state_every_steps: int | None = Field(None, ge=1)
    """Also save the resumable state every this many optimizer steps (null: off)."""


class DistributedConfig(_Section):
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    """How several processes share the work. `ddp`: each process holds the whole model (fine for
    LoRA and QLoRA); `fsdp`: PyTorch FSDP2 shards weights, gradients and optimizer state over the
    processes (each transformer block, then the rest), for full fine-tuning beyond one GPU's memory.
    `auto`: fsdp for full fine-tuning on more than one process, else ddp."""

    reshard_after_forward: bool = True
    """FSDP: free each block's gathered weights after its forward pass and gather them again for the
    backward pass (less memory, one more all-gather per block)."""

    cpu_offload: bool = False
    """FSDP: keep the sharded weights, gradients and optimizer state in CPU memory and move each
    block to the GPU when it runs (much less GPU memory, much slower steps)."""


class TrackingConfig(_Section):
    report_to: Literal["none", "tensorboard", "wandb", "all"] = "none"
    """Experiment trackers (through accelerate): TensorBoard (`<output_dir>/logs/`), Weights & Biases
    (`<output_dir>/wandb/`; `WANDB_MODE=offline` keeps it local), or both. They get the resolved
    config, per-step loss, learning rate, gradient norm and tokens/s, and at each checkpoint the eval
    loss and the samples. Needs `pip install -c constraints.txt -e '.[tracking]'`."""

    project: str = "trainer"
    """The W&B project and the TensorBoard run name."""


class EvalConfig(_Section):
    metrics: Union[
        Literal["auto", "none"],
        Annotated[list[Literal["exact_match", "f1", "item_f1", "accuracy"]], Field(min_length=1)],
    ] = "auto"
    """Task metrics every checkpoint is scored by on the validation data, answering each example's
    prompt greedily as its test prompts are answered. `auto` picks by what the data preflight found:
    classification -> `accuracy` (with per-class precision, recall, F1 and a confusion matrix);
    list-like completions ("Tokyo, Berlin") -> `exact_match`, `item_f1`; other short generation ->
    `f1` (SQuAD's token F1), `exact_match`; open-ended text -> none. Or a list of those names. The
    first is the one the recommended checkpoint is chosen by (`recommendation.json`); `none` (or no
    validation data) recommends by the lowest eval loss. Answers are compared after stripping,
    casefolding and collapsing whitespace."""

    max_examples: int | None = Field(200, ge=1)
    """Validation examples scored at each checkpoint: the first this many in an order shuffled by
    `training.seed` (the same examples at every checkpoint, and after a resume); null scores all.
    Scoring costs a greedy generation per example at each checkpoint."""

    stop: list[str] | None = None
    """Stop sequences that end an answer (it also ends at EOS). Default: the validation completions'
    common ending when they share one (e.g. a newline), else EOS alone."""

    max_new_tokens: int | None = Field(None, gt=0)
    """Longest answer in tokens. Default: the longest validation completion plus a quarter (at least
    4 tokens), so a right answer always fits and a rambling one is cut soon."""


class ChatMessage(_Section):
    role: Literal["system", "user", "assistant"]
    """Who speaks."""

    content: str
    """What they say."""


class TestPrompt(_Section):
    __test__: ClassVar[bool] = False  # not a pytest test class, despite the name

    prompt: str | None = None
    """Text given to the model at every checkpoint, exactly as at inference (include the separator)."""

    messages: list[ChatMessage] | None = None
    """A chat-form test prompt instead of `prompt`: rendered with the same chat template as the
    training data, ending with the assistant's turn to speak."""

    temperature: float = Field(0.0, ge=0.0)
    """Sampling temperature; 0 means greedy decoding."""

    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling: keep the smallest set of tokens whose probability sums to top_p."""

    top_k: int = Field(0, ge=0)
    """Keep only the k most likely tokens; 0 turns this filter off."""

    max_new_tokens: int = Field(64, gt=0)
    """Longest completion in tokens."""

    stop: list[str] = Field(default_factory=list)
    """Stop sequences: the completion is cut before the first one. It also ends at EOS."""

    @field_validator("stop", mode="before")
    @classmethod
    def _single_stop_string(cls, value: Any) -> Any:
        value = [value] if isinstance(value, str) else value
        # An empty stop string would match at once and cut every completion to one token.
        return [stop for stop in value if stop != ""] if isinstance(value, list) else value

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> "TestPrompt":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give a test prompt either `prompt` (text) or `messages` (chat), exactly one of them")
        return self

    @property
    def label(self) -> str:
        """How the prompt is shown in reports."""
        if self.prompt is not None:
            return self.prompt
        return " | ".join(f"{m.role}: {m.content}" for m in self.messages)


class Config(_Section):
    model: ModelConfig
    """The base model."""

    method: Literal["lora", "full", "qlora"] = "lora"
    """`lora` trains low-rank adapters on frozen weights; `qlora` does the same on 4-bit NF4 weights
    (bitsandbytes; CUDA, or the CPU with bitsandbytes >= 0.50); `full` trains every weight."""

    lora: LoraConfig = Field(default_factory=LoraConfig)
    """LoRA settings, used when `method` is `lora` or `qlora`."""

    data: DataConfig
    """Training and validation data."""

    training: TrainingConfig = Field(default_factory=TrainingConfig)
    """Optimisation settings."""

    checkpoints: CheckpointsConfig = Field(default_factory=CheckpointsConfig)
    """Checkpoint schedule."""

    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    """Several processes (GPUs, nodes)."""

    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    """Experiment trackers."""

    eval: EvalConfig = Field(default_factory=EvalConfig)
    """Task metrics at each checkpoint and the recommended checkpoint."""

    test_prompts: list[TestPrompt] = Field(default_factory=list)
    """Prompts every checkpoint answers, each with its own sampling parameters. A plain string is a
    prompt with the defaults."""

    output_dir: str = "runs/run"
    """The run folder: resolved config, metrics.jsonl, checkpoint-<step>/ folders, report.md."""

    overwrite_output_dir: bool = False
    """Start over in an `output_dir` that already holds a run: its checkpoints, state and metrics
    are removed first (once the new run's data has passed its checks)."""

    resume: str = "auto"
    """`auto`: when `output_dir` holds a resumable state of the same run (same config, data and
    number of processes), continue it exactly where it stopped; a run with another config is
    refused, naming the keys that differ. `never`: refuse any `output_dir` that holds a run.
    Or the path of a `state-<step>` folder (or of a run folder) to continue from, also into another
    `output_dir`; once `output_dir` has a state of its own, that one is continued."""

    @field_validator("test_prompts", mode="before")
    @classmethod
    def _plain_string_prompts(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"prompt": item} if isinstance(item, str) else item for item in value]
        return value

    @model_validator(mode="after")
    def _method_is_available(self) -> "Config":
        if self.training.optimizer != "adamw" and self.method != "full":
            raise ValueError(
                f"training.optimizer={self.training.optimizer} is for full fine-tuning (adapters are small): "
                "set training.optimizer=adamw or method=full"
            )
        if self.method == "full" and self.model.dtype == "float16":
            raise ValueError(
                "full fine-tuning cannot train float16 weights (the optimizer state underflows): "
                "set model.dtype to bfloat16 or float32"
            )
        return self


# ---------------------------------------------------------------------------------------------
# Loading


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`["training.learning_rate=3e-4", ...]` -> `{"training.learning_rate": 0.0003, ...}`.

    Values are YAML, so numbers, booleans, lists and null are typed as in the file.
    """
    overrides: dict[str, Any] = {}
    for arg in args:
        key, sep, raw = arg.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise UsageError(
                f"override '{arg}' is not of the form section.key=value (example: training.learning_rate=3e-4)"
            )
        try:
            overrides[key] = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as err:
            mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None) or "unreadable"
            where = f" at column {mark.column + 1}" if mark else ""
            raise UsageError(
                f"override '{arg}': the value is not valid YAML ({problem}{where}). Fix: quote it "
                f"('{key}=\"...\"') or close its brackets ({key}=[a, b])"
            ) from None
    return overrides


def _apply_override(tree: dict[str, Any], dotted_key: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted_key.split(".")
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[leaf] = value


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        relative = "" if path.is_absolute() else f" (it is relative to {Path.cwd()})"
        raise UserError(f"config file {path} does not exist: check the path{relative}")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not UTF-8 text: re-save it as UTF-8") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise UserError(f"config file {path} is not valid YAML{where}: {problem}. Fix the syntax there.") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise UserError(
            f"config file {path} must be a mapping of sections (model:, data:, ...), not a {type(tree).__name__}"
        )
    return tree


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(_known_keys(annotation, prefix + name + "."))
    return keys


# Names other trainers (transformers' TrainingArguments, axolotl) give to keys of this config.
_OTHER_NAMES = {
    "lr": "learning_rate",
    "num_epochs": "epochs",
    "num_train_epochs": "epochs",
    "batch_size": "micro_batch_size",
    "per_device_train_batch_size": "micro_batch_size",
    "max_length": "max_seq_len",
    "sequence_len": "max_seq_len",
    "lr_scheduler_type": "lr_scheduler",
}


def _suggest_keys(unknown: str) -> list[str]:
    """The keys an unknown one was probably meant to be, searched across sections: the same name in
    another section (`epochs` -> `training.epochs`), a near spelling of the whole dotted key
    (`training.learnin_rate`), else a near spelling of its last part (`epoch` -> `training.epochs`)."""
    # The section an unknown key sits in is no suggestion for it (`training` for `training.lr`).
    known = [key for key in _known_keys(Config) if key != unknown and not unknown.startswith(key + ".")]
    leaf = unknown.rsplit(".", 1)[-1]
    by_leaf: dict[str, list[str]] = {}
    for key in known:
        by_leaf.setdefault(key.rsplit(".", 1)[-1], []).append(key)
    leaf = leaf if leaf in by_leaf else _OTHER_NAMES.get(leaf, leaf)
    if leaf in by_leaf:
        return by_leaf[leaf]
    close = difflib.get_close_matches(unknown, known, n=1, cutoff=0.6)
    if close:
        return close
    close = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.7)
    return by_leaf[close[0]] if close else []


def _field_path(loc: tuple) -> tuple:
    """The part of an error location that names config keys: pydantic appends the member of a
    union that failed (e.g. `training.epochs.float`), which means nothing to a user."""
    path: list = []
    model: Any = Config
    for part in loc:
        if isinstance(part, int):
            path.append(part)
            continue
        fields = getattr(model, "model_fields", {})
        if part not in fields:
            break
        path.append(part)
        annotation = fields[part].annotation
        inner = (
            getattr(annotation, "__args__", (annotation,))[0]
            if getattr(annotation, "__origin__", None) is list
            else annotation
        )
        model = inner if isinstance(inner, type) and issubclass(inner, BaseModel) else None
    return tuple(path) if path else tuple(loc)


def _merge_union_errors(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One error per key: a union's per-member failures become 'X or Y'."""
    merged: dict[tuple, dict[str, Any]] = {}
    for error in errors:
        # An unknown or missing key is named in full; other errors by the key that holds the value.
        path = error["loc"] if error["type"] in ("extra_forbidden", "missing") else _field_path(error["loc"])
        if path in merged:
            merged[path]["msg"] += " or " + error["msg"][0].lower() + error["msg"][1:]
        else:
            merged.setdefault(path, dict(error, loc=path))
    return list(merged.values())


def _describe_error(error: dict[str, Any], source: Path, overrides: dict[str, Any]) -> str:
    loc = ".".join(str(part) for part in error["loc"])
    from_cli = any(loc == key or loc.startswith(key + ".") or key.startswith(loc + ".") for key in overrides)
    where = "on the command line" if from_cli else f"in {source}"
    kind = error["type"]
    if kind == "extra_forbidden":
        close = _suggest_keys(loc)
        hint = (
            f"did you mean {' or '.join(repr(k) for k in close)}?"
            if close
            else "remove it (see the config reference in README.md)"
        )
        return f"unknown key '{loc}' {where}: {hint}"
    if kind == "missing":
        return f"missing key '{loc}' {where}: add it (see the config reference in README.md)"
    if not error["loc"]:  # a cross-field check on the whole config
        return f"{error['msg'].removeprefix('Value error, ')} ({where})"
    message = error["msg"].removeprefix("Value error, ")
    got = error.get("input")
    shown = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
    return f"key '{loc}' {where}: {message}{shown}"


def load_config(path: str | Path, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Read, override and validate a config. Raises `UserError` with every problem found."""
    path = Path(path)
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    overrides = overrides or {}
    tree = _read_yaml(path)
    for key, value in overrides.items():
        _apply_override(tree, key, value)
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        problems = [_describe_error(e, path, overrides) for e in _merge_union_errors(err.errors())]
        if len(problems) == 1:  # it names the key and the file: entry points print it after "error: "
            raise UserError(problems[0]) from None
        listed = "\n".join(f"  - {p}" for p in problems)
        raise UserError(f"config has {len(problems)} errors:\n{listed}") from None


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML; it loads back with `load_config` to the same values."""
    Path(path).write_text(
        yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True), encoding="utf-8"
    )


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`; lists stay whole values."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat
