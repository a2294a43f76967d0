"""The README is what a new user follows literally: keep its commands and reference true."""

import importlib.util
import re

from tests.helpers import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")


def load_reference_script():
    spec = importlib.util.spec_from_file_location("config_reference", REPO / "scripts" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_reference_matches_the_config_models():
    start, end = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"
    in_readme = README[README.index(start) + len(start) : README.index(end)]
    assert in_readme == load_reference_script().reference(), (
        "run: python scripts/config_reference.py and paste it into README.md"
    )


def test_ci_runs_the_readme_test_command():
    test_command = "python -m pytest -n 2"
    assert f'pip install -c constraints.txt -e ".[dev]" && {test_command}' in README
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert 'python -m pip install -q -c constraints.txt -e ".[dev]"' in ci and test_command in ci


#: Files of the repository as the README names them (commands, the layout section).
REPO_PATH = re.compile(
    r"\b((?:trainer|scripts|configs|tests|examples|docs)/[\w/.-]*\w\.(?:py|yaml|sbatch|jsonl|json|md))"
)


def test_every_file_the_readme_names_exists():
    named = set(REPO_PATH.findall(README))
    assert {
        "configs/tiny-gpt2.yaml",
        "scripts/prepare_data.py",
        "scripts/slurm/train.sbatch",
    } <= named  # the regex finds them
    assert sorted(path for path in named if not (REPO / path).is_file()) == []


def test_every_shipped_config_and_script_is_in_the_readme_and_each_config_has_test_prompts():
    from trainer.config import load_config

    configs = sorted((REPO / "configs").glob("*.yaml"))
    scripts = sorted((REPO / "scripts").glob("*.py"))
    assert configs and scripts
    assert [path.name for path in configs + scripts if path.name not in README] == []
    assert [path.name for path in configs if not load_config(path).test_prompts] == []
