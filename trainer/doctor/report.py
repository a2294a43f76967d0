"""The doctor's report: its sections, failing items and warnings, printed line by line as the checks
run, or kept for the one JSON object of `--json`; and the helpers that render its messages and sizes."""

from __future__ import annotations

from dataclasses import dataclass, field

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
