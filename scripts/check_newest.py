"""Try the newest release of every dependency before it reaches a user: build a scratch virtual
environment, install the project there without constraints.txt (the newest releases pyproject.toml
allows), show each package's pinned -> newest version, run the compatibility-critical tests, and
list what broke. Exit 0 when every selected test passes, 1 when anything broke.

    python scripts/check_newest.py                 # a throwaway environment in a temporary folder
    python scripts/check_newest.py --venv /tmp/nv  # build (or reuse and upgrade) this one, kept
    python scripts/check_newest.py --torch 2.14.1  # another torch than the pinned one

torch stays pinned (constraints.txt's version unless --torch says otherwise): its build decides CPU
or CUDA, and this check is about the libraries around it. It is installed as a plain version, as the
README's commands do; where that version resolves to a CUDA build (Linux, from PyPI) and you want
the CPU one, pass --torch-index-url with PyTorch's CPU wheel index.

When it passes, constraints.txt can be regenerated with the newest set (the commands are in its
header); when it fails, the broken tests say what to fix first.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONSTRAINTS = REPO / "constraints.txt"

# What a new release of transformers / peft / accelerate / datasets / tokenizers / bitsandbytes /
# fastapi / openai / tensorboard / wandb most often breaks, chosen to run in a few minutes on CPU.
COMPATIBILITY_TESTS = (
    # Every attention backend equals eager for every family: padded, packed, and with a KV cache;
    # GPT-J goes through transformers' attention interface; the startup self-test passes.
    "tests/test_attention.py::test_backend_matches_eager_padded_and_packed",
    "tests/test_attention.py::test_generation_with_a_kv_cache_matches_eager",
    "tests/test_attention.py::test_gptj_attends_through_the_chosen_function_not_its_fp32_eager_scores",
    "tests/test_attention.py::test_varlen_takes_the_batch_boundaries_and_the_other_backends_ignore_them",
    "tests/test_selftest.py::test_every_family_and_cpu_backend_passes_packed_and_padded",
    # Packed loss and gradients equal unpacked for every family and backend; a 2D mask still leaks.
    "tests/data/test_packing.py::test_packed_loss_and_gradients_equal_unpacked",
    "tests/data/test_packing.py::test_a_2d_attention_mask_would_let_packed_examples_see_each_other",
    # The prompt's tokens in training are the inference tokens (tokenizers).
    "tests/data/test_tokenize.py",
    # One run per family and method, packed, chat data, and under `accelerate launch`.
    "tests/test_train_e2e.py::test_each_family_and_method_end_to_end",
    "tests/test_train_e2e.py::test_packed_training_end_to_end",
    "tests/test_train_e2e.py::test_chat_data_end_to_end",
    "tests/test_train_e2e.py::test_accelerate_launch_runs_the_job",
    # QLoRA per family, 8-bit AdamW, bfloat16 full fine-tuning over float32 master weights.
    "tests/test_methods.py",
    # Exact resume after kill -9 (accelerate's saved RNG and optimizer state).
    "tests/test_resume_e2e.py::test_killed_at_three_points_then_rerun_equals_the_uninterrupted_run",
    # Using checkpoints: the PEFT merge per family; the OpenAI client against the server.
    "tests/test_export.py::test_merged_export_reproduces_the_checkpoint",
    "tests/test_serve.py::test_the_openai_client_works_unchanged",
    # TensorBoard and W&B (offline).
    "tests/test_tracking.py",
)


def canonical(name: str) -> str:
    """PEP 503 name: `Jinja2`, `typing_extensions` and `typing-extensions` compare equal."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(text: str) -> dict[str, str]:
    """{canonical name: version} of a constraints file's `name==version` lines."""
    pins = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        if not match:
            raise ValueError(f"constraints line {number}: {line!r} is not an exact pin `name==version`")
        pins[canonical(match[1])] = match[2]
    return pins


def public(version: str) -> str:
    """The version without its local label: 2.13.0+cpu and 2.13.0+cu130 are both torch 2.13.0."""
    return version.split("+", 1)[0]


def version_table(pinned: dict[str, str], newest: dict[str, str]) -> str:
    """One row per package: the constraints.txt version -> the newest environment's, changes marked
    (`*` a different version, `new` not in constraints.txt, `gone` no longer installed)."""
    rows = [("package", "constraints.txt", "newest", "")]
    for name in sorted(pinned.keys() | newest.keys()):
        old, new = pinned.get(name), newest.get(name)
        mark = "new" if old is None else "gone" if new is None else "" if public(old) == public(new) else "*"
        rows.append((name, old or "-", new or "-", mark))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"{a:<{widths[0]}}  {b:>{widths[1]}} -> {c:<{widths[2]}}  {d}".rstrip() for a, b, c, d in rows]
    changed = sum(1 for row in rows[1:] if row[3])
    return "\n".join([*lines, f"{changed} of {len(rows) - 1} packages differ from constraints.txt"])


def node_id(classname: str, name: str) -> str:
    """pytest's node id from a JUnit testcase: tests.data.test_packing + test_x[a] ->
    tests/data/test_packing.py::test_x[a] (classes in a module keep their `::Class`)."""
    parts = classname.split(".")
    for cut in range(len(parts), 0, -1):
        path = Path(*parts[:cut]).with_suffix(".py")
        if (REPO / path).is_file():
            return "::".join([path.as_posix(), *parts[cut:], name])
    return "::".join([classname.replace(".", "/") + ".py", name])


def printed_exception(case: ET.Element) -> str | None:
    """The last exception line on the test's captured stderr. The trainer reports an internal error
    there and returns 1, which the test's assertion alone shows as `assert 1 == 0`."""
    text = "".join(part.text or "" for part in case.findall("system-err"))
    lines = [line.strip() for line in text.splitlines() if re.match(r"[\w.]*(Error|Exception)\b.*:", line.strip())]
    return lines[-1] if lines else None


def failures(junit_xml: str) -> list[tuple[str, str]]:
    """(node id, one-line error) of every failed or erroring test in pytest's JUnit XML."""
    broken = []
    for case in ET.fromstring(junit_xml).iter("testcase"):
        for problem in [*case.findall("failure"), *case.findall("error")]:
            message = (problem.get("message") or problem.text or "").strip()
            first = next((line.strip() for line in message.splitlines() if line.strip()), "(no message)")
            printed = printed_exception(case)
            if printed and printed not in first:
                first = f"{first} (stderr: {printed})"
            broken.append((node_id(case.get("classname", ""), case.get("name", "")), first[:300]))
    return broken


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts" if os.name == "nt" else "bin") / ("python.exe" if os.name == "nt" else "python")


def run_logged(command: list[str], log: Path, **kwargs) -> int:
    with log.open("a", encoding="utf-8") as out:
        out.write("$ " + " ".join(command) + "\n")
        out.flush()
        return subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, **kwargs).returncode


def tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--venv", type=Path, help="virtual environment to build or reuse (kept); default: a temporary one"
    )
    parser.add_argument("--torch", help="torch version to install (default: constraints.txt's)")
    parser.add_argument("--torch-index-url", help="pip index for torch alone (e.g. PyTorch's CPU wheel index)")
    args = parser.parse_args(argv)

    pinned = read_pins(CONSTRAINTS.read_text(encoding="utf-8"))
    torch_version = args.torch or public(pinned["torch"])
    scratch = None if args.venv else Path(tempfile.mkdtemp(prefix="check-newest-"))
    venv = args.venv or scratch / "venv"
    log = (scratch or venv.parent) / f"{venv.name}-check-newest.log"
    log.write_text("", encoding="utf-8")
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PIP_CONSTRAINT", None)  # the point is to leave our pins out
    try:
        python = venv_python(venv)
        if not python.exists():
            print(f"creating {venv}", flush=True)
            if run_logged([sys.executable, "-m", "venv", str(venv)], log) != 0:
                print(f"could not create the virtual environment:\n{tail(log)}")
                return 1
        pip = [str(python), "-m", "pip", "install", "--upgrade"]
        print(
            f"installing the newest releases with torch=={torch_version}" + (f" (log: {log})" if args.venv else ""),
            flush=True,
        )
        if (
            args.torch_index_url
            and run_logged([*pip, f"torch=={torch_version}", "--index-url", args.torch_index_url], log, env=env) != 0
        ):
            print(f"torch=={torch_version} did not install from {args.torch_index_url}:\n{tail(log)}")
            return 1
        # eager: a reused environment gets every dependency upgraded, not only the ones named here.
        if (
            run_logged(
                [*pip, "--upgrade-strategy", "eager", f"torch=={torch_version}", "-e", f"{REPO}[dev]"],
                log,
                env=env,
                cwd=REPO,
            )
            != 0
        ):
            print(f"the newest releases do not install together:\n{tail(log)}")
            return 1
        listed = subprocess.run(
            [str(python), "-m", "pip", "list", "--format=json", "--exclude-editable"],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        ).stdout
        newest = {canonical(p["name"]): p["version"] for p in json.loads(listed) if canonical(p["name"]) != "pip"}
        print(version_table(pinned, newest), flush=True)

        junit = (scratch or venv.parent) / f"{venv.name}-check-newest-junit.xml"
        junit.unlink(missing_ok=True)
        print(f"\nrunning {len(COMPATIBILITY_TESTS)} compatibility selections (a few minutes)", flush=True)
        tests = subprocess.run(
            [
                str(python),
                "-m",
                "pytest",
                "-p",
                "no:xdist",
                "-q",
                f"--junitxml={junit}",
                "-o",
                "junit_logging=system-err",
                *COMPATIBILITY_TESTS,
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            env=env,
        )
        summary = tests.stdout.strip().splitlines()[-1:] or ["(pytest printed nothing)"]
        print(f"pytest: {summary[0]}")
        if not junit.exists() or tests.returncode not in (0, 1):
            # Not a test failure: pytest itself stopped (a selected test no longer exists, a conftest
            # import failed, ...). Its own words say which.
            print(
                f"pytest exited {tests.returncode} before reporting results:\n"
                + "\n".join((tests.stdout + tests.stderr).strip().splitlines()[-30:])
            )
            return 1
        broken = failures(junit.read_text(encoding="utf-8"))
        if broken:
            print(f"\nBROKEN with the newest releases ({len(broken)}):")
            for test, error in broken:
                print(f"  {test}\n      {error}")
            if pinned.keys() == newest.keys() and all(public(pinned[n]) == public(v) for n, v in newest.items()):
                print(
                    "every installed version equals constraints.txt's: these fail with the tested versions too, "
                    "so the code or the tests broke them, not a new release"
                )
            return 1
        print("\nevery compatibility test passes with the newest releases")
        return 0
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
