"""The README is what a new user follows literally: keep its commands and reference true."""

import importlib.util

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


def test_readme_commands_name_configs_that_exist():
    for config in ("configs/tiny-gpt2.yaml", "configs/gptj.yaml", "configs/neox20b.yaml"):
        assert config in README and (REPO / config).is_file()


def test_shipped_configs_are_valid():
    from trainer.config import load_config

    for path in sorted((REPO / "configs").glob("*.yaml")):
        config = load_config(path)
        assert config.test_prompts, path
