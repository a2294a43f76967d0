"""The run folder (`output_dir`): one `RunFolder` owns everything under it.

Names come from trainer/layout.py; what is inside a checkpoint or a state folder is
trainer/checkpoint.py's and trainer/state.py's. `RunFolder` does the rest:

* `lock()`: one job at a time (trainer/run_lock.py);
* `contents()`: the checkpoints and the newest complete resumable state. A folder that holds
  neither is not a run (a failed start leaves only reports): it is reused;
* `prepare(decision, ...)`: make the folder this run's, once its data passed: a fresh run clears
  what an earlier run or a failed start left (`clear`); a resume rewinds the folder to its state's
  step (`rewind_to`), bringing the history of another folder first with `resume=PATH`;
* `status.json` (`write_status`, `read_status`): how the last job of this run ended (`running`,
  `stopped`, `complete`, `failed`), which `python -m trainer.status` reads for batch scripts,
  since launchers report any non-zero exit of a worker as 1;
* metrics.jsonl (`metrics_log`, `read_metrics`; rows in trainer/metrics.py), the resolved
  config, and the reports (report.md, report.html with its plots, recommendation.json).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from trainer.atomic import write_text_atomically
from trainer.layout import (
    CHECKPOINT_PREFIX,
    CONFIG_FILE,
    DATA_REPORT_FILE,
    LOCK_FILE,
    METRICS_FILE,
    REPORT_FILE,
    RUN_FILES,
    SKIPPED_LINES_FILE,
    STATE_PREFIX,
    STATUS_FILE,
)
from trainer.metrics import MetricsHistory, MetricsLog, read_metrics
from trainer.recommend import recommend, write_recommendation
from trainer.report import write_report
from trainer.report_html import write_html_report
from trainer.run_lock import RunLock
from trainer.state import SavedState, newest_state, step_of


@dataclass
class FolderContents:
    """What a run folder holds, as `RunFolder.contents()` found it."""

    path: Path
    checkpoint_steps: list[int] = field(default_factory=list)
    state: SavedState | None = None
    """The newest complete resumable state."""
    has_status: bool = False
    """Written by every job of this version at its start: a folder with checkpoints but no status
    comes from a version that could not resume."""

    @property
    def is_run(self) -> bool:
        """Holds a checkpoint or a resumable state: something a new run must not silently replace."""
        return bool(self.checkpoint_steps or self.state)

    def saved_config(self) -> dict | None:
        """The resolved config of the run in this folder: its state's, else its config.yaml."""
        if self.state is not None:
            return self.state.config
        try:
            return yaml.safe_load((self.path / CONFIG_FILE).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            return None


def _is_partial(path: Path) -> bool:
    """A checkpoint or state being written (or left by a crashed save): never read as complete."""
    return path.name.startswith(".") and path.name.endswith(".partial")


class RunFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # What it holds

    def contents(self) -> FolderContents:
        if not self.path.is_dir():
            return FolderContents(self.path)
        steps = sorted(
            s for p in self.path.glob(f"{CHECKPOINT_PREFIX}*") if (s := step_of(p, CHECKPOINT_PREFIX)) is not None
        )
        return FolderContents(self.path, steps, newest_state(self.path), (self.path / STATUS_FILE).is_file())

    def lock(self) -> RunLock:
        """Take the folder's lock (made if missing), or raise RunFolderBusy naming its holder."""
        return RunLock(self.path).acquire()

    # Making it this run's

    def prepare(self, decision, data_reports: list, skipped: list) -> None:
        """Main process, once the data passed: a fresh run clears the folder; a resume rewinds it to
        its state's step (with `resume=PATH` from another folder, that run's metrics and checkpoints
        up to the step come along first). Then the data report and the skipped lines are written."""
        from trainer.data.pipeline import write_skipped_lines
        from trainer.data.preflight import write_data_reports

        if decision.action == "fresh":
            self.clear()
        else:
            step = decision.state.step
            if decision.copy_history_from is not None:
                self.copy_history_from(decision.copy_history_from, step)
            self.rewind_to(step)
        write_data_reports(self.path / DATA_REPORT_FILE, data_reports)
        if skipped:
            write_skipped_lines(self.path / SKIPPED_LINES_FILE, skipped)

    def clear(self) -> None:
        """Remove everything a run writes (checkpoints, states, run files, leftovers of crashed
        saves), keeping the lock."""
        for path in self.path.iterdir():
            if path.name == LOCK_FILE:
                continue
            is_ours = (
                path.name in RUN_FILES
                or step_of(path, CHECKPOINT_PREFIX) is not None
                or step_of(path, STATE_PREFIX) is not None
                or _is_partial(path)
            )
            if is_ours:
                shutil.rmtree(path) if path.is_dir() else path.unlink()

    def rewind_to(self, step: int) -> None:
        """Make the folder look as it did when the state of `step` was saved: checkpoints after it,
        older states and half-written folders go, and metrics.jsonl keeps only the rows up to `step`."""
        for path in self.path.iterdir():
            checkpoint, state = step_of(path, CHECKPOINT_PREFIX), step_of(path, STATE_PREFIX)
            if (
                (checkpoint is not None and checkpoint > step)
                or (state is not None and state != step)
                or _is_partial(path)
            ):
                shutil.rmtree(path, ignore_errors=True)
        self.metrics_log().keep_until(step)

    def copy_history_from(self, source: Path, step: int) -> None:
        """`resume=PATH` from another run folder: its metrics and checkpoints up to `step` come
        along (`rewind_to` then drops what is after the step)."""
        self.clear()
        if (source / METRICS_FILE).exists():
            shutil.copyfile(source / METRICS_FILE, self.path / METRICS_FILE)
        for checkpoint in source.glob(f"{CHECKPOINT_PREFIX}*"):
            if step_of(checkpoint, CHECKPOINT_PREFIX) is not None:
                shutil.copytree(checkpoint, self.path / checkpoint.name)

    def save_config(self, config) -> None:
        from trainer.config import save_config

        save_config(config, self.path / CONFIG_FILE)

    # How the last job ended

    def write_status(self, status: str, **fields) -> None:
        """`status.json`: `running` | `stopped` | `complete` | `failed`, with the step and exit code."""
        record = {"status": status, **fields, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        text = json.dumps(record, indent=1) + "\n"
        try:
            write_text_atomically(self.path / STATUS_FILE, text)
        except OSError:
            # A full disk has no room for a second copy; overwriting in place frees the old file's
            # blocks first, so how the run ended is still recorded (a torn file reads as no status).
            (self.path / STATUS_FILE).write_text(text, encoding="utf-8")

    def read_status(self) -> dict | None:
        try:
            return json.loads((self.path / STATUS_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    # History and reports

    def metrics_log(self, enabled: bool = True) -> MetricsLog:
        return MetricsLog(self.path / METRICS_FILE, enabled=enabled)

    def read_metrics(self) -> MetricsHistory:
        return read_metrics(self.path / METRICS_FILE)

    def write_reports(self, test_prompts: list, checkpoints: list, primary_metric: str | None) -> str:
        """report.md, report.html (loss.png, metrics.png) and recommendation.json from the
        checkpoints so far; returns report.md's text."""
        title = f"Run report: {self.path}"
        recommendation = recommend(checkpoints, primary_metric)
        text = write_report(
            self.path / REPORT_FILE, title, [p.label for p in test_prompts], checkpoints, recommendation
        )
        write_html_report(self.path, title, test_prompts, checkpoints, recommendation)
        write_recommendation(self.path, recommendation)
        return text
