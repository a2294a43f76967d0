"""The doctor's section 6: the model built as training builds it (one process, with random weights
when its own are not on this machine), the disk the run needs, and the startup self-test on
training's own first micro-batch."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.doctor.environment import weights_cached
from trainer.doctor.report import Report, _gb
from trainer.doctor.setup import Data, Resolved
from trainer.errors import UserError

#: A model larger than this is not built on a CPU: tens of GB in float32 and minutes per probe, for
#: a check that matters on the GPU node the job will run on.
CPU_PARAMETER_LIMIT = 1_500_000_000


# ---------------------------------------------------------------------------------------------
# 6. The model as training builds it, and the self-test


def _parameter_count(model_config) -> int:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(model_config).parameters())


@dataclass
class Built:
    model: torch.nn.Module
    optimizer: object
    strategy: object
    tokenizer: object | None


def build_and_self_test(
    report: Report, resolved: Resolved, device: torch.device, disk_folder: Path, data: Data
) -> Built | None:
    from accelerate.utils import set_seed

    from trainer.disk import check_free_space, run_bytes, tokenizer_bytes
    from trainer.errors import NotEnoughDisk
    from trainer.hub import hub_reachable, offline_fix
    from trainer.model import count_parameters
    from trainer.optim import build_optimizer
    from trainer.precision import torch_dtype
    from trainer.resolve import activation_dtype
    from trainer.selftest import failure, run_self_test
    from trainer.strategy import make_strategy

    report.heading("6. model and self-test (one process)")
    config, acc = resolved.config, resolved.recipe.accelerator
    name = config.model.name_or_path
    section: dict = {"weights": None, "passed": None}
    report.sections["self_test"] = section
    parameters = _parameter_count(resolved.model_config)
    if device.type == "cpu" and parameters > CPU_PARAMETER_LIMIT:
        section["skipped"] = f"{parameters:,} parameters: not built on a CPU"
        report.warn(
            "self-test",
            f"skipped: {name} has {parameters:,} parameters, too many to build and probe on a CPU "
            "in useful time. Run the doctor on the GPU node the job will use",
        )
        return None

    real = weights_cached(name)
    section["weights"] = "real" if real else "random"
    if not real:
        if hub_reachable():
            why = "not in the local Hugging Face cache (the doctor does not download them; training will)"
        else:
            why = "not in the local Hugging Face cache and the Hub cannot be reached"
            report.warn("weights", f"training cannot load them on this machine: {offline_fix(name)}")
        report.say(
            f"  weights of {name}: {why}. THE WEIGHTS ARE RANDOM: the model is built from "
            f"{resolved.shape_from} with random weights; the self-test checks the attention kernel and "
            "the batch layout, which do not depend on them"
        )

    set_seed(config.training.seed)
    started = time.perf_counter()
    try:
        one_process = config.model_copy(deep=True)
        one_process.distributed.strategy = resolved.self_test_strategy
        strategy = make_strategy(acc, one_process)
        model = strategy.build_model(random_weights=not real, model_config=resolved.model_config)
    except UserError as err:
        report.fail("self-test", f"the model could not be built: {err}")
        return None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    section["build_seconds"] = round(time.perf_counter() - started, 2)
    trainable, total = count_parameters(model)
    section.update(parameters=total, trainable_parameters=trainable)
    report.say(
        f"  built {name} ({'its weights' if real else 'random weights'}) in {section['build_seconds']:.1f} s: "
        f"{trainable:,} of {total:,} parameters trainable, {config.model.attention} attention"
    )

    tokenizer = data.tokenizer
    # The disk the run will need (trainer/disk.py), as training checks it before the first step:
    # a fresh run, every checkpoint still to be written.
    sizes = run_bytes(
        model,
        method=config.method,
        optimizer=config.training.optimizer,
        tokenizer_size=tokenizer_bytes(tokenizer) if tokenizer is not None else 0,
        checkpoint_dtype=torch_dtype(config.model.dtype),
    )
    needed = sizes.needed(config.checkpoints.count, 0)
    report.sections["disk"].update(needed_bytes=needed, checkpoint_bytes=sizes.checkpoint, state_bytes=sizes.state)
    report.say(
        f"  disk: the run needs about {_gb(needed)} ({config.checkpoints.count} checkpoints of "
        f"{_gb(sizes.checkpoint)}, resumable states of {_gb(sizes.state)}); "
        f"{_gb(report.sections['disk']['free_bytes'])} free"
    )
    try:
        check_free_space(disk_folder, sizes, checkpoints_left=config.checkpoints.count, states_present=0)
    except NotEnoughDisk as err:
        report.fail("disk", str(err))

    optimizer = build_optimizer(config, model, acc.device)
    model, optimizer = strategy.prepare(model, optimizer)
    if data.first_batch is None:
        report.say("  no first batch of the training data (section 4): the labels check is skipped")
    result = run_self_test(
        model,
        attention=config.model.attention,
        packing=config.data.packing,
        compute_dtype=activation_dtype(config),
        autocast=acc.autocast,
        device=acc.device,
        first_batch=data.first_batch,
        tokenizer=tokenizer,
        data_format=config.data.format,
    )
    section.update(
        passed=not result.failed,
        seconds=round(result.seconds, 3),
        checks=[
            {
                "name": c.name,
                "what": c.what,
                "difference": c.difference,
                "tolerance": c.tolerance,
                "passed": c.passed,
                "detail": c.detail,
            }
            for c in result.checks
        ],
    )
    report.say(f"  {result.summary()}")
    if result.failed:
        report.fail("self-test", str(failure(result)))
    return Built(model, optimizer, strategy, tokenizer)
