"""Print the config reference (every key, its default, its meaning) as a markdown table.

    python scripts/config_reference.py                 # print it
    python scripts/config_reference.py --write-readme  # replace README.md's copy

The README's "Config reference" section is this output; a test keeps the two in step.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pydantic import BaseModel  # noqa: E402
from pydantic_core import PydanticUndefined  # noqa: E402

from trainer.config import Config, TestPrompt  # noqa: E402


def _default(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        return "(section)"
    return f"`{json.dumps(value)}`"


def _rows(model: type[BaseModel], prefix: str = "") -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        key = prefix + name
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows.extend(_rows(annotation, key + "."))
            continue
        description = " ".join((field.description or "").split()).replace("|", "\\|")
        rows.append(f"| `{key}` | {_default(field)} | {description} |")
        if name == "test_prompts":
            rows.extend(_rows(TestPrompt, "test_prompts[].")[0:])
    return rows


def reference() -> str:
    return "\n".join(["| key | default | meaning |", "|---|---|---|", *_rows(Config)]) + "\n"


README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"


def write_readme() -> None:
    text = README.read_text(encoding="utf-8")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    README.write_text(head + START + reference() + END + tail, encoding="utf-8")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-readme"]:
        write_readme()
    else:
        print(reference(), end="")
