"""The doctor's sections 1 and 2, this machine as the run will find it: python and the libraries
against the tested pins of constraints.txt, the device and bitsandbytes, `output_dir` as training
takes it first, the free disk of its nearest existing folder; and whether a model's weights are on
this machine (a local folder or the local Hugging Face cache), which sections 4 and 6 ask."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
from pathlib import Path

import torch

from trainer.doctor.report import Report, _gb
from trainer.errors import UserError

REPO = Path(__file__).resolve().parent.parent.parent  # the checkout: this file is trainer/doctor/environment.py
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
    holds. The doctor takes the lock as training would and gives it back at once; the lock removes
    the empty folders it made, so that checking leaves nothing behind."""
    from trainer.run_folder import RunFolder

    try:
        RunFolder(output_dir).lock().release()
    except UserError as err:
        report.fail("output_dir", str(err))


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
# The weights on this machine (sections 4 and 6)


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
