"""The doctor's sections 3 to 5, training's setup before the model exists, through training's own
functions: the config resolved as training resolves it (with what training would do with the run
folder), the data checked, tokenized and batched as training does it (`check_data`, whose first
micro-batch the self-test gets), and the planner's memory estimate for this GPU."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.doctor.environment import weights_cached
from trainer.doctor.report import Report, _gb
from trainer.errors import UserError

#: On a CPU the planner's verdict is against this GPU: 80 GiB, an A100/H100 "80GB" part.
REFERENCE_GPU_BYTES = 80 * 2**30


#: Keys a resolved config still holds as `auto`, and when training decides them.
LATER = {
    "data.format": "detected per data file as it is read",
    "resume": "decided by what the run folder holds",
}


# ---------------------------------------------------------------------------------------------
# 3. The config, resolved as training resolves it


@dataclass
class Resolved:
    config: object
    """trainer.config.Config with every `auto` filled in."""
    requested: object
    """The config as loaded (before resolution): the planner resolves it as on a CUDA GPU."""
    recipe: object
    """The FineTuneRecipe whose Accelerator the model is built under."""
    model_config: object
    shape_from: str
    self_test_strategy: str
    """The strategy this one process builds the model with (`config`'s is for `--gpus` processes)."""


def _autos(requested: dict, resolved: dict, prefix: str = "") -> dict[str, object]:
    """Every key whose requested value was `auto`, with its resolved value."""
    found = {}
    for key, value in requested.items():
        if isinstance(value, dict):
            found.update(_autos(value, resolved.get(key, {}), f"{prefix}{key}."))
        elif value == "auto":
            found[prefix + key] = resolved.get(key)
    return found


def resolve(report: Report, config, gpus: int) -> Resolved | None:
    """The recipe's own resolution (see the module docstring); None after a failing item."""
    from trainer.data.jsonl import require_files
    from trainer.data.pipeline import data_paths
    from trainer.families import PUBLISHED_CONFIGS
    from trainer.model import load_model_config
    from trainer.optim import require_device_features
    from trainer.resolve import resolve_config, resolve_strategy
    from trainer.strategy import check_fsdp_config
    from trainer.train import FineTuneRecipe

    report.heading("3. config, resolved as training resolves it")
    requested = config.model_copy(deep=True)
    try:
        recipe = FineTuneRecipe(config)  # resolves the precision and makes the Accelerator, as training does
        require_files(data_paths(config))  # `epochs: auto` reads the training files' sizes
        try:
            model_config, shape_from = load_model_config(config), "config.json"
        except UserError:
            name = config.model.name_or_path
            if name not in PUBLISHED_CONFIGS:
                raise
            model_config, shape_from = PUBLISHED_CONFIGS[name](), "the published configuration (trainer/families.py)"
            # Said once, with its fix, where the weights are looked for (section 5).
            report.warn("config", f"config.json of {name} is not available here; resolved with {shape_from}")
        # The self-test builds the model in this one process, as a one-process job would: the strategy
        # `auto` (or the launcher's) is for it; the config is resolved as a job of `gpus` processes.
        self_test_strategy = resolve_strategy(config, recipe.accelerator.num_processes)
        resolve_config(config, device=recipe.accelerator.device, model_config=model_config, num_processes=gpus)
        require_device_features(config, recipe.accelerator.device)
        strategy = config.distributed.strategy
        if strategy == "fsdp":
            check_fsdp_config(config)
    except UserError as err:
        report.fail("config", str(err))
        report.sections["config"] = None
        return None
    resolved = config.model_dump(mode="json")
    autos = _autos(requested.model_dump(mode="json"), resolved)
    # What stays `auto` in a resolved config is decided later, by training itself: the format of
    # each data file as it is read, the run folder's state (resume) and LoRA targets of a full run
    # (none). The strategy is shown with the number of processes it was resolved for (--gpus).
    later = {key: LATER[key] for key, value in autos.items() if value == "auto" and key in LATER}
    autos = {key: value for key, value in autos.items() if value != "auto" and key != "distributed.strategy"}
    if requested.distributed.strategy == "auto":
        autos[f"distributed.strategy (on {gpus} process{'es' if gpus > 1 else ''})"] = strategy
    report.sections["config"] = {
        "resolved": resolved,
        "auto": autos,
        "auto_at_run_time": later,
        "model_type": model_config.model_type,
        "shape_from": shape_from,
        "strategy": strategy,
        "gpus": gpus,
    }
    report.say(
        f"  {config.model.name_or_path} ({model_config.model_type}; shape from {shape_from}), method "
        f"{config.method}, {config.training.micro_batch_size} x {config.data.max_seq_len} tokens x "
        f"{config.training.gradient_accumulation_steps} micro-batches a step"
    )
    for key, value in autos.items():
        report.say(f"  {key}: auto -> {value}")
    for key, when in later.items():
        report.say(f"  {key}: auto, {when}")
    fixed = {
        "model.dtype": config.model.dtype,
        "training.mixed_precision": config.training.mixed_precision,
        "model.attention": config.model.attention,
        "data.packing": config.data.packing,
        "training.epochs": config.training.epochs,
        "lora.target_modules": config.lora.target_modules,
    }
    for key, value in fixed.items():
        if key not in autos and not (key == "lora.target_modules" and config.method == "full"):
            report.say(f"  {key}: {value}")
    return Resolved(config, requested, recipe, model_config, shape_from, self_test_strategy)


def check_run_decision(report: Report, config, gpus: int) -> None:
    """What training would do with what output_dir holds (trainer/resume.py `decide_run`, on the
    resolved config): start a fresh run, continue the saved one, find it complete, or refuse."""
    from trainer.resume import decide_run

    try:
        decision = decide_run(config, gpus)
    except UserError as err:
        report.fail("run folder", str(err))
        return
    report.sections["run_folder"] = {"action": decision.action, "step": decision.state.step if decision.state else 0}
    if decision.action == "complete":
        report.warn(
            "run folder",
            f"the run in {config.output_dir} is already complete (step {decision.state.step}): training would do "
            "nothing. Fix: overwrite_output_dir=true to train again, or another output_dir",
        )
    elif decision.action == "resume":
        step = decision.state.step
        report.say(f"  run folder: training would resume the run in {config.output_dir} from step {step}")
    else:
        report.say(f"  run folder: a fresh run{f' ({decision.note})' if decision.note else ''}")


# ---------------------------------------------------------------------------------------------
# 4. The data, as training checks, tokenizes and batches it


@dataclass
class Data:
    """What the data stage gives the self-test: the tokenizer, and training's first micro-batch."""

    tokenizer: object | None = None
    first_batch: tuple | None = None
    """(items, collated batch) of process 0's first micro-batch of step 1, as training's self-test
    gets it; None when there is none (no tokenizer, or the data failed)."""


def _tokenizer(config):
    from trainer.data.chat import resolve_chat_template
    from trainer.model import load_tokenizer

    tokenizer = load_tokenizer(config)
    tokenizer.chat_template = resolve_chat_template(tokenizer, config.data.chat_template)
    return tokenizer


def _lines(log: list[str]):
    return lambda message: log.extend(str(message).splitlines())


def _data_warning(checked) -> str:
    """One line for a file the preflight lets through with warnings (or errors that
    data.on_error=skip leaves out); the section above shows them as training prints them."""
    from trainer.data.validation_report import plural

    found = []
    if checked.errors:
        found.append(f"{plural(len(checked.errors), 'error')}, lines that data.on_error=skip leaves out")
    if checked.warnings:
        kinds = ", ".join(f"{count} {kind}" for kind, count in checked.warning_kinds().items())
        found.append(f"{plural(len(checked.warnings), 'warning')} ({kinds})")
    return (
        f"{checked.path}: {'; '.join(found)}: training runs, but results may suffer. "
        f"Details and fixes: python scripts/prepare_data.py validate {checked.path}"
    )


def check_data(report: Report, resolved: Resolved, gpus: int) -> Data:
    """Training's own data stage, through its own functions: the tokenizer, the preflight
    (trainer/data/preflight.py: errors fail, warnings warn), the tokenized data and
    its length policy (trainer/data/pipeline.py), the test prompts encoded, the training rows
    (packed or not), each step's batches for `gpus` processes and the schedule (the checkpoint
    steps); then process 0's first micro-batch of step 1, for the self-test's `labels` check."""
    from trainer.data import reads
    from trainer.data.batching import TrainingBatches
    from trainer.data.packing import training_rows
    from trainer.data.pipeline import data_paths, prepare_data
    from trainer.data.preflight import preflight_data
    from trainer.generate import encode_test_prompt
    from trainer.schedule import RunSchedule

    report.heading("4. data, checked, tokenized and batched as training does")
    config = resolved.config
    section: dict = {"log": []}
    report.sections["data"] = section
    # The tokenizer first (training loads it after the preflight): a tokenizer that does not load and
    # a data error are both reported, and the disk estimate (section 6) counts the tokenizer's files.
    tokenizer = None
    try:
        tokenizer = _tokenizer(config)
    except UserError as err:
        if weights_cached(config.model.name_or_path):
            report.fail("tokenizer", str(err))
        else:  # training will download it with the weights
            section["tokenizer_error"] = str(err)
            report.say(
                "  tokenizer: not available here, like its weights: the tokenized data, the schedule and "
                "the labels check are skipped"
            )
    checked_ok = False
    try:
        # As training runs it (no tokenizer: trainer/train.py runs it before torch loads); what it
        # finds is shown below, and each file with warnings is also a warning item.
        reports = preflight_data(config, log=lambda _: None)
    except UserError as err:
        report.fail("data", str(err))
    else:
        checked_ok = True
        section["files"] = [{"file": r.path, "errors": len(r.errors), "warnings": len(r.warnings)} for r in reports]
        for checked in reports:
            if checked.warnings or checked.errors or checked.notes:  # what training prints
                report.say("\n".join(f"  {line}" if line else "" for line in checked.render(stats=False).splitlines()))
            if checked.warnings or checked.errors:  # errors here are lines data.on_error=skip leaves out
                report.warn("data", _data_warning(checked))
    if tokenizer is None or not checked_ok:
        for path in data_paths(config):
            reads.drop_rows(path)  # what the preflight kept for tokenizing, which will not happen here
        return Data(tokenizer)

    log = section["log"]
    try:
        data = prepare_data(config, tokenizer, _lines(log))
        for test_prompt in config.test_prompts:  # a template that cannot render one fails training's setup
            encode_test_prompt(tokenizer, test_prompt, config.data.chat_template)
        rows, collate_rows = training_rows(data.train, config.data, _lines(log))
        batches = TrainingBatches.for_run(
            rows, collate_rows, tokenizer.pad_token_id, config.training, rank=0, world_size=gpus
        )
    except UserError as err:
        for line in log:
            report.say(f"  {line}")
        report.fail("data", str(err))
        return Data(tokenizer)
    try:
        schedule = RunSchedule.of(config.training, config.checkpoints, batches.schedule)
    except UserError as err:  # checkpoints.count against the optimizer steps the data makes
        for line in log:
            report.say(f"  {line}")
        report.fail("schedule", str(err))
        return Data(tokenizer)
    warned = {f"warning: {warning}" for warning in data.warnings}
    for line in log:
        if line not in warned:  # said once, as a warning item
            report.say(f"  {line}")
    for warning in data.warnings:
        report.warn("data", warning)

    items, batch, real = batches.first_micro_batch(1)
    members = [member for item in items for member in getattr(item, "examples", (item,))]
    unit = "rows" if config.data.packing else "examples"
    section.update(
        training_items=len(rows),
        unit=unit,
        validation_examples=len(data.valid),
        total_steps=schedule.total_steps,
        checkpoint_steps=schedule.checkpoint_steps,
        first_batch={
            "items": len(items),
            "examples": len(members),
            "lines": [f"{member.source} line {member.line}" for member in members],
        },
    )
    report.say(
        f"  {len(rows)} training {unit} and {len(data.valid)} validation examples; {config.training.epochs:g} "
        f"epochs = {schedule.total_steps} optimizer steps on {gpus} process{'es' if gpus > 1 else ''}; "
        f"checkpoints at steps {schedule.checkpoint_steps}"
    )
    report.say(
        f"  step 1's first micro-batch (process 0): {len(items)} {unit}"
        + (f", {len(members)} examples" if config.data.packing else "")
    )
    return Data(tokenizer, (items, batch) if real else None)


# ---------------------------------------------------------------------------------------------
# 5. The planner's estimate


def check_memory_estimate(report: Report, resolved: Resolved, device: torch.device, gpus: int):
    from trainer.families import FAMILIES, family_of
    from trainer.plan import estimate_run

    report.heading("5. memory estimate (trainer/plan.py)")
    cuda = device.type == "cuda"
    memory = torch.cuda.get_device_properties(device).total_memory if cuda else REFERENCE_GPU_BYTES
    # On a GPU the planner gets what training gives it (the resolved config); on a CPU the config as
    # loaded, which the planner resolves as a CUDA GPU with bf16 would (a CPU resolves dtype auto to
    # float32, which no GPU run uses).
    config = resolved.config if cuda else resolved.requested
    if family_of(resolved.model_config) is None:  # estimate_run assumes a known family when given a model config
        report.warn(
            "memory",
            f"not estimated: the planner models the families {', '.join(FAMILIES)}, and "
            f"{config.model.name_or_path} is a {resolved.model_config.model_type!r} model",
        )
        report.sections["memory_plan"] = None
        return None
    try:
        estimate = estimate_run(config, gpus=gpus, gpu_memory_bytes=memory, model_config=resolved.model_config)
    except UserError as err:
        report.warn("memory", f"not estimated: {err}")
        report.sections["memory_plan"] = None
        return None
    b = estimate.per_gpu
    against = "this GPU" if cuda else "a reference 80 GiB GPU (the planner models CUDA GPUs; this machine has none)"
    report.sections["memory_plan"] = {"against": against, **estimate.to_json()}
    report.say(
        f"  per GPU on {gpus} GPU(s), {estimate.settings.strategy}: weights {_gb(b.weights)}, gradients "
        f"{_gb(b.gradients)}, optimizer {_gb(b.optimizer)}, activations {_gb(b.activations)}; total {_gb(b.total)}"
    )
    report.say(f"  against {against}: {estimate.verdict()}")
    if not estimate.fits:
        message = estimate.warning()
        if cuda:
            report.fail("memory", message)
        else:
            report.warn("memory", f"on a reference 80 GiB GPU: {message}")
    return estimate
