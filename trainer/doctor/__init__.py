"""Check a machine for a run before the long job starts: `python -m trainer.doctor CONFIG.yaml`.

    python -m trainer.doctor CONFIG.yaml [section.key=value ...] [--speed] [--steps N] [--gpus N] [--json]

It reports, in order, and exits 0 when every item passes, 1 with the failing items listed last:

1. versions: python and the libraries against the tested pins in constraints.txt (a difference is
   a warning: the run may well work, but it is not the tested set);
2. device: the GPU (name, memory, CUDA, bf16) or the CPU, bitsandbytes and its backend; `output_dir`
   checked as training checks it first (its lock taken and given back, trainer/run_lock.py: a
   file, a folder that cannot be written or one another job holds fails with training's message;
   folders the check made are removed again), and the free disk of its nearest existing folder;
3. config: resolved exactly as training resolves it (`FineTuneRecipe` makes the Accelerator and
   settles the precision, then `load_model_config` and `resolve_config`): every `auto` filled in;
4. data: training's own data stage, through its functions: the preflight (`preflight_data`: its
   errors are a failing item with training's message, its warnings warnings), the tokenized data
   with its length policy (`prepare_data`, which fills training's tokenized-data cache), the test
   prompts encoded, the training rows (`training_rows`, packed or not), each step's batches for
   `--gpus` processes (`TrainingBatches`) and the schedule (`RunSchedule.of`: `checkpoints.count`
   against the optimizer steps); the first micro-batch of step 1 is the self-test's;
5. memory: the planner's per-GPU estimate (`trainer.plan.estimate_run`) against this GPU's memory, for
   `--gpus` processes (default: the GPUs visible). The planner models CUDA GPUs: on a CPU the
   estimate is of the config as a GPU would run it, with a verdict against a reference 80 GiB GPU
   that is a warning, never a failure (this machine will not run it);
6. self-test: the model built as training builds it (`make_strategy(...).build_model()`, one
   process), the optimizer and `strategy.prepare`, then the startup self-test
   (`trainer.selftest.run_self_test`) with its `labels` check on training's own first micro-batch
   (process 0's of step 1, section 4); and the disk the run's checkpoints and resumable states need
   (trainer/disk.py). Weights come from a local folder or the local Hugging Face cache; when they
   are not there (the doctor never downloads them) the model is built from its config (or the
   published one) with random weights, and the output says so: the checks compare kernels and
   layouts, not what was learned (and without a tokenizer section 4 stops after the preflight);
7. speed (`--speed`): `--steps` optimizer steps (default 20, after one untimed warm-up step) of the
   trainer's own step (`trainer.step.optimizer_step`) on synthetic rows of `data.max_seq_len` tokens,
   packed as training packs them, `micro_batch_size` x `gradient_accumulation_steps` rows a step:
   tokens/s, MFU where the GPU's peak is known (trainer/flops.py), and the peak memory measured
   against the planner's estimate.

Failing items: whatever training would refuse at its start (an `output_dir` it cannot use, data
errors, examples too long for `data.too_long`, more checkpoints than optimizer steps, a config that
cannot run here), a failed self-test, not enough disk, a run the planner says does not fit this GPU.
A config that does not load at all (a missing file, an unknown key) is one line on stderr and exit
1, as with the training command. Not checked: what the run folder already holds (a resume, a run
already complete, a refused resume), which training decides from the folder.

Designed to take under 8 minutes on one 80 GB GPU for configs/gptj.yaml --speed (weights not cached;
not yet measured on a GPU): seconds for everything before the build (the planner's meta-device model
included), seconds to build GPT-J-6B in bf16 directly on the GPU, about a second for the self-test,
and 21 steps of 8 x 2048 tokens, which dominate (tens of seconds). With the weights in the cache,
loading 12 GB from disk is added, as at the start of training. The data stage takes what training's
takes: the first time the tokenization of the data files (training then finds them in the cache),
afterwards seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

import torch

from trainer.cli import USER_ERRORS, JsonEnding, Kind, command
from trainer.doctor.environment import check_device, check_disk_free, check_output_dir, check_versions
from trainer.doctor.model import build_and_self_test
from trainer.doctor.report import Report, _indented
from trainer.doctor.setup import check_data, check_memory_estimate, check_run_decision, resolve
from trainer.doctor.speed import check_speed
from trainer.errors import EXIT_DONE, EXIT_USER_ERROR, UsageError
from trainer.peak_memory import PeakMemory

USAGE = "usage: python -m trainer.doctor CONFIG.yaml [section.key=value ...] [--speed] [--steps N] [--gpus N] [--json]"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would exit 2 itself; the entry point prints it
        raise UsageError(f"{message}\n{USAGE}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = _Parser(prog="python -m trainer.doctor", description=__doc__.split("\n\n")[0], add_help=False)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="section.key=value, as for training")
    parser.add_argument("--speed", action="store_true", help="also time the trainer's own step on synthetic rows")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps of --speed (default 20)")
    parser.add_argument("--gpus", type=int, help="processes the job will run (default: the GPUs visible, 1 on a CPU)")
    parser.add_argument("--json", action="store_true", help="print everything as one JSON object")
    args = parser.parse_intermixed_args(argv)  # options may come before, between or after the overrides
    if args.steps < 1:
        raise UsageError(f"--steps {args.steps}: must be at least 1\n{USAGE}")
    if args.gpus is not None and args.gpus < 1:
        raise UsageError(f"--gpus {args.gpus}: must be at least 1\n{USAGE}")
    return args


# ---------------------------------------------------------------------------------------------
# The command


def _quiet() -> None:
    """No progress bars or library chatter: the report is the output."""
    from transformers.utils import logging as hf_logging

    from trainer.quantization import quiet_bitsandbytes_import

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    quiet_bitsandbytes_import()
    # peft asks for gradient checkpointing under transformers' old name (as scripts/bench.py notes).
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*", category=FutureWarning)


def run(args: argparse.Namespace, report: Report) -> None:
    from trainer.config import load_config

    config = load_config(args.config, args.overrides)  # a config that does not load: one line, exit 1
    report.sections["command"] = "python -m trainer.doctor " + " ".join([args.config, *args.overrides])
    check_versions(report)
    device = check_device(report)
    check_output_dir(report, config.output_dir)
    disk_folder = check_disk_free(report, config.output_dir)
    gpus = args.gpus or (torch.cuda.device_count() if device.type == "cuda" else 1)
    memory = PeakMemory(device)
    memory.before_model()  # CPU: the RSS before the model exists is the measure's baseline
    resolved = resolve(report, config, gpus)
    if resolved is None:
        return
    try:
        check_run_decision(report, resolved.config, gpus)
        data = check_data(report, resolved, gpus)
        memory_estimate = check_memory_estimate(report, resolved, device, gpus)
        built = None
        try:
            built = build_and_self_test(report, resolved, device, disk_folder, data)
        except torch.OutOfMemoryError as err:  # a finding about this machine, not a crash
            report.fail("self-test", f"out of memory while building or probing the model: {_first_line(err)}")
        if args.speed:
            if built is None:
                report.warn("speed", "not measured: no model was built")
            else:
                try:
                    check_speed(report, resolved, built, device, args.steps, memory_estimate, memory)
                except torch.OutOfMemoryError as err:
                    report.fail(
                        "speed",
                        f"out of memory during the training steps: {_first_line(err)}. Fix: "
                        "lower training.micro_batch_size or data.max_seq_len, or turn on "
                        "model.gradient_checkpointing (scripts/plan.py shows what fits)",
                    )
    finally:
        resolved.recipe.close()


def _first_line(err: Exception) -> str:
    return str(err).splitlines()[0][:200] if str(err) else type(err).__name__


# The environment (an unreadable folder, a full disk) is one line too; Ctrl-C and bugs keep Python's traceback.
# With --json a user error is also the one JSON object on stdout (JsonEnding).
@command(ends=USER_ERRORS | {Kind.ENVIRONMENT}, path_must_be="readable", ending=JsonEnding)
def main(argv: list[str] | None = None, *, ending: JsonEnding) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(f"{USAGE}\n\n{__doc__}")
        return EXIT_DONE
    _quiet()
    ending.as_json = as_json = "--json" in argv
    report = Report(json_only=as_json)
    started = time.perf_counter()
    if not argv:
        raise UsageError(f"no config file given\n{USAGE}")
    run(parse_args(argv), report)
    report.sections["seconds"] = round(time.perf_counter() - started, 2)
    if as_json:
        print(json.dumps(report.to_json(), default=str))
    else:
        report.heading("result")
        for warning in report.warnings:
            report.say(f"  warning ({warning['item']}): {_indented(warning['message'])}")
        if report.failures:
            report.say(
                f"  FAILED ({len(report.failures)} item{'s' if len(report.failures) > 1 else ''}, "
                f"{report.sections['seconds']:.0f} s):"
            )
            for failed in report.failures:
                report.say(f"  - {failed['item']}: {_indented(failed['message'])}")
        else:
            warned = (
                f" ({len(report.warnings)} warning{'s' if len(report.warnings) > 1 else ''} above)"
                if report.warnings
                else ""
            )
            report.say(f"  no failing item{warned}: done in {report.sections['seconds']:.0f} s")
        if (report.sections.get("self_test") or {}).get("weights") == "random":
            report.say("  (the model had random weights: its own were not on this machine)")
    return EXIT_USER_ERROR if report.failures else EXIT_DONE
