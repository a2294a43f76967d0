"""scripts/check_newest.py's pure parts, and the pins it starts from: constraints.txt covers what
pyproject.toml declares, within its ranges, and every install command in the repository uses it.
No virtual environment is built here."""

import importlib.util
import re
import subprocess
import sys

import pytest

from tests.helpers import REPO


def load_script():
    spec = importlib.util.spec_from_file_location("check_newest", REPO / "scripts" / "check_newest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_newest = load_script()
PINS = check_newest.read_pins((REPO / "constraints.txt").read_text(encoding="utf-8"))


def test_every_selected_compatibility_test_is_collected():
    """A renamed or deleted test must not silently drop out of the newest-releases check."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:xdist", *check_newest.COMPATIBILITY_TESTS],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    collected = [line for line in result.stdout.splitlines() if "::" in line]
    for selection in check_newest.COMPATIBILITY_TESTS:
        prefix = selection + ("::" if selection.endswith(".py") else "")
        assert any(test == selection or test.startswith((prefix, selection + "[")) for test in collected), selection


def test_version_table_marks_changed_new_and_gone_packages_and_ignores_local_labels():
    table = check_newest.version_table(
        {"torch": "2.13.0", "transformers": "5.25.0", "dill": "0.4.1", "numpy": "2.4.6"},
        {"torch": "2.13.0+cpu", "transformers": "5.26.1", "numpy": "2.4.6", "kernels": "0.20.0"},
    )
    assert table == "\n".join(
        [
            "package       constraints.txt -> newest",
            "dill                    0.4.1 -> -           gone",
            "kernels                     - -> 0.20.0      new",
            "numpy                   2.4.6 -> 2.4.6",
            "torch                  2.13.0 -> 2.13.0+cpu",
            "transformers           5.25.0 -> 5.26.1      *",
            "3 of 5 packages differ from constraints.txt",
        ]
    )


def test_read_pins_takes_exact_pins_by_canonical_name_and_rejects_anything_else():
    assert check_newest.read_pins("# header\n\nJinja2==3.1.6\ntyping_extensions==4.16.0  # why\n") == {
        "jinja2": "3.1.6",
        "typing-extensions": "4.16.0",
    }
    with pytest.raises(ValueError, match=r"constraints line 2: 'numpy>=2' is not an exact pin"):
        check_newest.read_pins("torch==2.13.0\nnumpy>=2\n")


def test_failures_lists_each_failed_or_erroring_test_with_the_first_line_of_its_error():
    junit = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="5">
      <testcase classname="tests.test_attention" name="test_backend_matches_eager_padded_and_packed[gptj-sdpa]">
        <failure message="AttributeError: 'GPTJAttention' object has no attribute '_split_heads'">traceback</failure>
      </testcase>
      <testcase classname="tests.test_train_e2e" name="test_each_family_and_method_end_to_end[gpt2-lora]">
        <failure message="AssertionError: assert 1 == 0&#10; +  where 1 = main([...])">traceback</failure>
        <system-err>Traceback (most recent call last):
  File "peft/peft_model.py", line 37, in &lt;module&gt;
ImportError: cannot import name 'HybridCache' from 'transformers'
</system-err>
      </testcase>
      <testcase classname="tests.data.test_packing" name="test_packing_stats_padding_fraction"/>
      <testcase classname="tests.test_serve" name="test_the_openai_client_works_unchanged">
        <error message="failed on setup with &quot;ImportError: cannot import name 'X'&#10;second line&quot;">x</error>
      </testcase>
      <testcase classname="tests.test_methods" name="test_skipped"><skipped message="no GPU"/></testcase>
    </testsuite></testsuites>"""
    assert check_newest.failures(junit) == [
        (
            "tests/test_attention.py::test_backend_matches_eager_padded_and_packed[gptj-sdpa]",
            "AttributeError: 'GPTJAttention' object has no attribute '_split_heads'",
        ),
        (
            "tests/test_train_e2e.py::test_each_family_and_method_end_to_end[gpt2-lora]",
            "AssertionError: assert 1 == 0 (stderr: ImportError: cannot import name 'HybridCache' from 'transformers')",
        ),
        (
            "tests/test_serve.py::test_the_openai_client_works_unchanged",
            "failed on setup with \"ImportError: cannot import name 'X'",
        ),
    ]


def declared_requirements():
    """Every requirement pyproject.toml declares: dependencies and all optional dependencies."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]


def test_constraints_pin_every_declared_dependency_inside_its_range():
    from packaging.requirements import Requirement

    outside = []
    for text in declared_requirements():
        requirement = Requirement(text)
        name = check_newest.canonical(requirement.name)
        if name not in PINS or not requirement.specifier.contains(PINS[name], prereleases=True):
            outside.append(f"{text}: constraints.txt has {PINS.get(name, 'no pin')}")
    assert outside == []


def test_constraints_pin_torch_by_version_alone_and_leave_cuda_packages_out():
    """`torch==2.13.0` admits the CPU build and every CUDA build; CUDA's own packages are the CUDA
    build's business, and pinning them would break one of the two installs."""
    assert re.fullmatch(r"\d+\.\d+\.\d+", PINS["torch"])
    assert [name for name in PINS if re.match(r"nvidia-|cuda-|triton$", name) or name == "pip"] == []


def test_every_install_of_the_project_uses_the_constraints_and_the_pinned_torch():
    files = {name: (REPO / name).read_text(encoding="utf-8") for name in ("README.md", ".ci/run", "Dockerfile")}
    quick_start = files["README.md"].split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    files["README.md"] = quick_start  # the install commands; later sections add one extra each
    installs = [
        (name, line.strip())
        for name, text in files.items()
        for line in text.splitlines()
        if "pip install" in line and re.search(r" -e [.\"]", line)
    ]
    # Quick start, tests and GPU in the README; CI; the image.
    assert sorted(name for name, _ in installs) == [".ci/run", "Dockerfile", "README.md", "README.md", "README.md"]
    assert [line for _, line in installs if "-c constraints.txt" not in line] == []
    torch_versions = set(re.findall(r"torch==([\d.]+)", files["README.md"]))
    torch_versions |= set(re.findall(r"pytorch/pytorch:([\d.]+)-cuda", files["Dockerfile"]))
    assert torch_versions == {PINS["torch"]}
