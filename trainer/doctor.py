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
import importlib.metadata
import json
import os
import platform
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trainer.cli import USER_ERRORS, Ending, Failure, Kind, command
from trainer.errors import EXIT_DONE, EXIT_USER_ERROR, UsageError, UserError
from trainer.peak_memory import PeakMemory

USAGE = "usage: python -m trainer.doctor CONFIG.yaml [section.key=value ...] [--speed] [--steps N] [--gpus N] [--json]"

REPO = Path(__file__).resolve().parent.parent
CONSTRAINTS = REPO / "constraints.txt"

#: The distributions reported, in this order ("python" is the interpreter).
PACKAGES = (
    "python",
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "datasets",
    "bitsandbytes",
    "safetensors",
    "tokenizers",
    "huggingface_hub",
    "numpy",
    "pyarrow",
    "pydantic",
)

#: On a CPU the planner's verdict is against this GPU: 80 GiB, an A100/H100 "80GB" part.
REFERENCE_GPU_BYTES = 80 * 2**30

#: A model larger than this is not built on a CPU: tens of GB in float32 and minutes per probe, for
#: a check that matters on the GPU node the job will run on.
CPU_PARAMETER_LIMIT = 1_500_000_000

#: Keys a resolved config still holds as `auto`, and when training decides them.
LATER = {
    "data.format": "detected per data file as it is read",
    "resume": "decided by what the run folder holds",
}

#: Untimed optimizer steps before `--speed` starts its clock (allocator, kernel selection, lazy
#: optimizer state).
WARMUP_STEPS = 1


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
# The report: sections, failing items, warnings


@dataclass
class Report:
    json_only: bool
    sections: dict = field(default_factory=dict)
    failures: list[dict] = field(default_factory=list)
    warnings: list[dict] = field(default_factory=list)

    def fail(self, item: str, message: str) -> None:
        self.failures.append({"item": item, "message": message})
        self.say(f"  FAIL {item}: {_indented(message)}")

    def warn(self, item: str, message: str) -> None:
        self.warnings.append({"item": item, "message": message})
        self.say(f"  warning ({item}): {_indented(message)}")

    def say(self, line: str = "") -> None:
        """Text mode prints as it goes: on a GPU the model build and the timed steps take a while."""
        if not self.json_only:
            print(line, flush=True)

    def heading(self, title: str) -> None:
        self.say(f"\n== {title}")

    def to_json(self) -> dict:
        return {"ok": not self.failures, **self.sections, "failures": self.failures, "warnings": self.warnings}


def _indented(message: str) -> str:
    """A message of several lines (training's data errors list one per line) under its item."""
    return message.replace("\n", "\n      ")


def _gb(count: int | None) -> str:
    from trainer.disk import human

    return "n/a" if count is None else human(count)


# ---------------------------------------------------------------------------------------------
# 1. Versions


def installed_version(name: str) -> str | None:
    """The installed version of distribution `name` (or of the interpreter for "python"); None when
    it is not installed."""
    if name == "python":
        return platform.python_version()
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def tested_versions(path: Path = CONSTRAINTS) -> dict[str, str]:
    """The pins of constraints.txt by normalised name, and "python" from its header ("Generated ...
    on CPython X.Y.Z"). Empty when the file is not there (an installed package, not a checkout)."""
    if not path.is_file():
        return {}
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        python = re.search(r"\bon CPython (\d+\.\d+\.\d+)", line)
        if python:
            pins["python"] = python.group(1)
        match = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line.strip())
        if match:
            pins[_normalise(match.group(1))] = match.group(2)
    return pins


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _same(name: str, installed: str, tested: str) -> bool:
    if name == "python":  # the tested minor release; patch releases do not change behaviour we rely on
        return installed.split(".")[:2] == tested.split(".")[:2]
    if name == "torch":  # constraints pins the version, not the build: 2.13.0+cpu and +cu130 both match
        return installed.split("+")[0] == tested.split("+")[0]
    return installed == tested


def check_versions(report: Report) -> None:
    report.heading("1. versions (against constraints.txt)")
    pins = tested_versions()
    rows = []
    if not pins:
        report.warn("versions", f"{CONSTRAINTS} not found: versions not compared with the tested set")
    for name in PACKAGES:
        installed, tested = installed_version(name), pins.get(_normalise(name))
        status = (
            "not installed"
            if installed is None
            else "unpinned"
            if tested is None
            else "ok"
            if _same(name, installed, tested)
            else "differs"
        )
        rows.append({"name": name, "installed": installed, "tested": tested, "status": status})
        report.say(f"  {name:<16}{installed or '-':<18}{'tested ' + tested if tested else '':<22}{status}")
    differing = [r for r in rows if r["status"] == "differs"]
    if differing:
        listed = ", ".join(f"{r['name']} {r['installed']} (tested {r['tested']})" for r in differing)
        report.warn(
            "versions",
            f"not the tested versions: {listed}. Fix if the run misbehaves: pip install -c constraints.txt -e .",
        )
    report.sections["versions"] = {"constraints": str(CONSTRAINTS) if pins else None, "packages": rows}


# ---------------------------------------------------------------------------------------------
# 2. Device


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


def _memory_total() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def bitsandbytes_info() -> dict:
    """Installed or not, its version and the backend its native library was loaded for."""
    try:
        from trainer.quantization import import_bitsandbytes

        bnb = import_bitsandbytes()  # without its import-time kernel warning
    except ImportError:
        return {"installed": False, "version": None, "backend": None}
    except Exception as err:  # a broken native library must be reported, not crash the doctor
        return {"installed": True, "version": None, "backend": None, "error": f"{type(err).__name__}: {err}"}
    from bitsandbytes import cextension

    backend = getattr(cextension, "BNB_BACKEND", None)
    library = type(getattr(cextension, "lib", None)).__name__
    info = {"installed": True, "version": bnb.__version__, "backend": backend.lower() if backend else None}
    if "ErrorHandler" in library:  # bitsandbytes' stand-in when its native library did not load
        info["error"] = "its native library did not load"
    return info


def nearest_existing(path: Path) -> Path:
    """The nearest existing folder of `path`: itself, or its nearest parent (a file is not a folder:
    the free disk of an `output_dir` that is a file is that of the folder holding it)."""
    path = path.expanduser().absolute()
    while not path.is_dir() and path != path.parent:
        path = path.parent
    return path


def check_device(report: Report) -> torch.device:
    report.heading("2. device")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    info: dict = {"type": device.type, "cuda_version": torch.version.cuda}
    if cuda:
        properties = torch.cuda.get_device_properties(device)
        info.update(
            name=torch.cuda.get_device_name(device),
            memory_bytes=properties.total_memory,
            gpus_visible=torch.cuda.device_count(),
            bf16=torch.cuda.is_bf16_supported(),
            capability=".".join(map(str, torch.cuda.get_device_capability(device))),
        )
        report.say(
            f"  GPU {info['name']} ({_gb(info['memory_bytes'])}, compute capability {info['capability']}), "
            f"{info['gpus_visible']} visible; CUDA {info['cuda_version']}; bf16 {'yes' if info['bf16'] else 'no'}"
        )
    else:
        info.update(
            name=f"CPU ({_cpu_name()}, {os.cpu_count()} logical cores)",
            memory_bytes=_memory_total(),
            gpus_visible=0,
            bf16=None,
            torch_threads=torch.get_num_threads(),
        )
        report.say(
            f"  {info['name']}, {_gb(info['memory_bytes'])} memory; no CUDA GPU "
            f"(torch {torch.__version__}, CUDA {info['cuda_version'] or 'not built in'})"
        )
    info["bitsandbytes"] = bitsandbytes_info()
    bnb = info["bitsandbytes"]
    report.say(
        f"  bitsandbytes: "
        f"{bnb['version'] + ', backend ' + str(bnb['backend']) if bnb['installed'] else 'not installed'}"
        + (f" ({bnb['error']})" if bnb.get("error") else "")
    )
    report.sections["device"] = info
    return device


def check_output_dir(report: Report, output_dir: str) -> None:
    """Training's first act: take the run folder's lock (`RunFolder.lock`, trainer/run_lock.py),
    which makes the folder and refuses a file, a folder it cannot write to, or one another job
    holds. The doctor takes the lock as training would, gives it back at once and removes the
    folders that taking it made, so that checking leaves nothing behind."""
    from trainer.run_folder import RunFolder

    folder = Path(output_dir).absolute()  # as RunFolder takes it
    made = [path for path in (folder, *folder.parents) if not path.exists() and not path.is_symlink()]
    try:
        RunFolder(output_dir).lock().release()
    except UserError as err:
        report.fail("output_dir", str(err))
    finally:
        for path in made:  # the deepest first; a folder someone else wrote into meanwhile stays
            try:
                path.rmdir()
            except FileNotFoundError:  # the lock's release removed the folder it made
                continue
            except OSError:
                break


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


def check_disk_free(report: Report, output_dir: str) -> Path:
    from trainer.disk import free_bytes

    folder = nearest_existing(Path(output_dir))
    free = free_bytes(folder)
    report.sections["disk"] = {"output_dir": output_dir, "checked": str(folder), "free_bytes": free}
    report.say(
        f"  disk: {_gb(free)} free in {folder}"
        + ("" if folder == Path(output_dir).absolute() else f" (nearest existing folder of output_dir {output_dir})")
    )
    return folder


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


# ---------------------------------------------------------------------------------------------
# 6. The model as training builds it, and the self-test


def weights_cached(name_or_path: str) -> bool:
    """Whether `from_pretrained` finds the weights without downloading: a local folder, or every
    weight file of the Hub id in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    from trainer.hub import is_local, written_as_path

    if is_local(name_or_path) or written_as_path(name_or_path):
        return True  # a folder (a missing one is a config error, raised by the loader with its fix)
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        found = try_to_load_from_cache(name_or_path, index)
        if isinstance(found, str):
            shards = set(json.loads(Path(found).read_text(encoding="utf-8"))["weight_map"].values())
            return all(isinstance(try_to_load_from_cache(name_or_path, shard), str) for shard in shards)
    return any(
        isinstance(try_to_load_from_cache(name_or_path, f), str) for f in ("model.safetensors", "pytorch_model.bin")
    )


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


# ---------------------------------------------------------------------------------------------
# 7. Speed


def synthetic_rows(count: int, *, seq_len: int, vocab: int, seed: int) -> list:
    """`count` packed rows of exactly `seq_len` tokens of random ids, each a few examples (a half,
    a quarter and two eighths of the row, at least 2 tokens each) whose first 30% is a masked prompt."""
    from trainer.data.packing import PackedRow
    from trainer.data.tokenize import IGNORE_INDEX, TokenizedExample

    generator = torch.Generator().manual_seed(seed)
    parts = [seq_len // 2, seq_len // 4, seq_len // 8]
    parts = [p for p in parts if p >= 2]
    parts.append(seq_len - sum(parts))
    rows = []
    for row in range(count):
        examples = []
        for number, length in enumerate(parts):
            ids = torch.randint(0, vocab, (length,), generator=generator).tolist()
            prompt = min(length - 1, max(1, round(0.3 * length)))
            examples.append(
                TokenizedExample(
                    ids, [IGNORE_INDEX] * prompt + ids[prompt:], "synthetic", row * len(parts) + number + 1
                )
            )
        rows.append(PackedRow(tuple(examples)))
    return rows


def check_speed(
    report: Report,
    resolved: Resolved,
    built: Built,
    device: torch.device,
    steps: int,
    memory_estimate,
    memory: PeakMemory,
) -> None:
    from trainer.data.packing import collate_packed
    from trainer.families import model_shape
    from trainer.flops import gpu_peak, mfu, training_flops
    from trainer.step import optimizer_step

    report.heading(f"7. speed: {WARMUP_STEPS} warm-up + {steps} timed steps of trainer.step.optimizer_step")
    config, acc = resolved.config, resolved.recipe.accelerator
    seq_len, rows_per_micro = config.data.max_seq_len, config.training.micro_batch_size
    accumulation = config.training.gradient_accumulation_steps
    vocab = resolved.model_config.vocab_size
    pad_id = built.tokenizer.pad_token_id if built.tokenizer is not None else 0
    rows = synthetic_rows(
        (WARMUP_STEPS + steps) * rows_per_micro * accumulation, seq_len=seq_len, vocab=vocab, seed=config.training.seed
    )
    per_step = rows_per_micro * accumulation
    step_rows = [rows[i * per_step : (i + 1) * per_step] for i in range(WARMUP_STEPS + steps)]
    built.model.train()
    memory.before_steps()
    losses, started = [], time.perf_counter()
    for index, this_step in enumerate(step_rows):
        if index == WARMUP_STEPS:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
        batches = [
            collate_packed(this_step[i : i + rows_per_micro], pad_id) for i in range(0, per_step, rows_per_micro)
        ]
        result = optimizer_step(
            built.model,
            built.optimizer,
            batches,
            step_tokens=sum(row.supervised_tokens for row in this_step),
            learning_rate=config.training.learning_rate,
            max_grad_norm=config.training.max_grad_norm,
            accelerator=acc,
            strategy=built.strategy,
        )
        losses.append(result.loss)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    timed = [row for this_step in step_rows[WARMUP_STEPS:] for row in this_step]
    lengths = [length for row in timed for length in row.seq_lens]
    tokens = sum(lengths)
    trainable = [p for p in built.model.parameters() if p.requires_grad]
    adapter = sum(p.numel() for p in trainable if p.ndim == 2) if config.method != "full" else 0
    try:
        flops = training_flops(
            lengths, model_shape(resolved.model_config), method=config.method, adapter_params=adapter
        )
    except ValueError:  # a family without a FLOP formula
        flops = None
    peak = gpu_peak(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    peak_bytes = memory.peak_bytes()
    estimate = memory_estimate.per_gpu.total if memory_estimate is not None else None
    section = {
        "steps": steps,
        "warmup_steps": WARMUP_STEPS,
        "seq_len": seq_len,
        "rows_per_step": per_step,
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_second": tokens / seconds,
        "model_tflops_per_second": flops / seconds / 1e12 if flops else None,
        "mfu": mfu(flops, seconds, peak.tflops) if flops and peak else None,
        "peak": None if peak is None else {"name": peak.name, "tflops": peak.tflops},
        "loss_first_last": [losses[0], losses[-1]],
        "peak_memory_bytes": peak_bytes,
        "peak_memory": memory.label,
        "planner_estimate_bytes": estimate,
    }
    report.sections["speed"] = section
    report.say(
        f"  {tokens:,} tokens in {seconds:.2f} s: {section['tokens_per_second']:,.0f} tokens/s"
        + (f", {section['model_tflops_per_second']:.3g} model TFLOP/s" if flops else "")
        + (
            f", MFU {100 * section['mfu']:.1f}% of {peak.name} {peak.tflops:g} TFLOP/s"
            if section["mfu"] is not None
            else ", MFU n/a (no known peak for this device)"
        )
    )
    report.say(f"  loss {losses[0]:.4f} (warm-up step) -> {losses[-1]:.4f} (last step)")
    comparison = ""
    if peak_bytes is not None and estimate:
        comparison = f"; the planner estimated {_gb(estimate)} ({100 * peak_bytes / estimate:.0f}% measured)"
        if device.type != "cuda":
            comparison += " for a CUDA GPU, so the two are not comparable here"
    report.say(f"  peak memory {_gb(peak_bytes)} ({memory.label}){comparison}")


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


class DoctorEnding(Ending):
    """The doctor's part in how it ends (trainer/cli.py prints the line): with `--json`, a user
    error is also the one JSON object on stdout."""

    as_json = False

    def failed(self, failure: Failure) -> None:
        if self.as_json and failure.kind is Kind.USER:
            print(json.dumps({"ok": False, "error": str(failure.error)}))


# The environment (an unreadable folder, a full disk) is one line too; Ctrl-C and bugs keep Python's traceback.
@command(ends=USER_ERRORS | {Kind.ENVIRONMENT}, path_must_be="readable", ending=DoctorEnding)
def main(argv: list[str] | None = None, *, ending: DoctorEnding) -> int:
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


if __name__ == "__main__":
    sys.exit(main())
