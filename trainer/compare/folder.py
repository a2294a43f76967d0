"""Read a run folder for the compare page, read-only and while the run writes it.

What is read: `checkpoint-<step>/` folders (never a `.checkpoint-<step>.partial` being written; the
lock is never taken), each one's checkpoint.json (step, losses and, when present, a `"metrics"`
object of task metrics), samples.jsonl (its answers to the test prompts) and predictions.jsonl
or eval_predictions.jsonl (its predictions on the validation examples, when the run computes task
metrics), plus the run's
config.yaml, metrics.jsonl and status.json. Every reader tolerates what a running (or crashed) job
can leave: a missing file, a half-written last line, a checkpoint removed while it is read. A
checkpoint's files never change after its folder is renamed into place, so they are read once per
folder (its inode and mtime tell a replaced folder from the one read before).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trainer.checkpoint import CHECKPOINT_PREFIX, INFO_FILE, SAMPLES_FILE
from trainer.errors import UserError
from trainer.layout import CONFIG_FILE, LOCK_FILE, METRICS_FILE, STATUS_FILE
from trainer.loading import ADAPTER_CONFIG
from trainer.metrics import finite
from trainer.report_html import _parameters, _prompt_text
from trainer.state import step_of

# A checkpoint's validation predictions, {"prompt", "reference", "prediction", "correct"} a line: the
# first of these names that exists (trainer/evaluation.py writes the second).
PREDICTIONS_FILES = ("predictions.jsonl", "eval_predictions.jsonl")
METRIC_COUNT_KEY = "examples"  # in checkpoint.json's "metrics": how many examples, not a metric


def _read_json_lines(path: Path) -> list[dict]:
    """The whole JSON objects of a JSON-lines file (others skipped); [] when it cannot be read."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except (OSError, ValueError):
        return None


def _identity(path: Path) -> tuple | None:
    """What tells this folder from one renamed into its place later (a rerun's)."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_ino, stat.st_mtime_ns)


@dataclass
class Checkpoint:
    """One checkpoint folder as read."""

    name: str
    step: int
    path: Path
    identity: tuple
    kind: str  # "adapter" or "full"
    epoch: float | None = None
    train_loss: float | None = None
    eval_loss: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    """Task metrics from checkpoint.json's "metrics" (numbers only; the example count is apart)."""
    metric_examples: int | None = None
    samples: list[dict] = field(default_factory=list)
    predictions: list[dict] | None = None
    """predictions.jsonl's rows, or None when the checkpoint has none."""

    def summary(self) -> dict:
        return {
            "name": self.name,
            "step": self.step,
            "kind": self.kind,
            "epoch": self.epoch,
            "train_loss": self.train_loss,
            "eval_loss": self.eval_loss,
            "metrics": self.metrics,
            "metric_examples": self.metric_examples,
            "predictions": self.predictions is not None,
        }


def read_checkpoint(path: Path, identity: tuple) -> Checkpoint | None:
    """The checkpoint in `path`, or None when it is not (or no longer) a checkpoint."""
    step = step_of(path, CHECKPOINT_PREFIX)
    kind = "adapter" if (path / ADAPTER_CONFIG).is_file() else "full" if (path / "config.json").is_file() else None
    if step is None or kind is None:
        return None
    info = _read_json(path / INFO_FILE)
    info = info if isinstance(info, dict) else {}
    checkpoint = Checkpoint(
        path.name,
        step,
        path,
        identity,
        kind,
        finite(info.get("epoch")),
        finite(info.get("train_loss")),
        finite(info.get("eval_loss")),
    )
    metrics = info.get("metrics")
    if isinstance(metrics, dict):
        for name, value in metrics.items():
            if name == METRIC_COUNT_KEY:
                count = value if isinstance(value, int) and not isinstance(value, bool) else None
                checkpoint.metric_examples = count
            elif (number := finite(value)) is not None:
                checkpoint.metrics[str(name)] = number
    examples = info.get("eval_examples")  # the count as trainer/evaluation.py's summary gives it
    if checkpoint.metric_examples is None and isinstance(examples, int) and not isinstance(examples, bool):
        checkpoint.metric_examples = examples
    checkpoint.samples = _read_json_lines(path / SAMPLES_FILE)
    predictions = next((path / name for name in PREDICTIONS_FILES if (path / name).is_file()), None)
    if predictions is not None:
        checkpoint.predictions = [_prediction(row) for row in _read_json_lines(predictions)]
    return checkpoint


def _prediction(row: dict) -> dict:
    """A predictions.jsonl row with the fields the page shows, as text (and `correct` as a bool or None)."""

    def text(value: Any) -> str:
        return value if isinstance(value, str) else "" if value is None else json.dumps(value, ensure_ascii=False)

    correct = row.get("correct")
    return {
        "prompt": text(row.get("prompt")),
        "reference": text(row.get("reference")),
        "prediction": text(row.get("prediction")),
        "correct": correct if isinstance(correct, bool) else None,
    }


class RunReader:
    """The run folder, read again on every call (cheap: checkpoint folders are read once each)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._checkpoints: dict[str, Checkpoint] = {}

    def checkpoints(self) -> list[Checkpoint]:
        """The complete checkpoints now in the folder, by step."""
        found: dict[str, Checkpoint] = {}
        try:
            entries = list(os.scandir(self.path))
        except OSError:
            entries = []
        for entry in entries:
            # `.checkpoint-<step>.partial` starts with a dot: never a checkpoint, whatever is in it.
            if step_of(Path(entry.name), CHECKPOINT_PREFIX) is None or not entry.is_dir():
                continue
            path = self.path / entry.name
            identity = _identity(path)
            known = self._checkpoints.get(entry.name)
            if known is not None and known.identity == identity:
                found[entry.name] = known
            elif identity is not None and (checkpoint := read_checkpoint(path, identity)) is not None:
                found[entry.name] = checkpoint
        self._checkpoints = found
        return sorted(found.values(), key=lambda c: c.step)

    def checkpoint(self, name: str) -> Checkpoint | None:
        return next((c for c in self.checkpoints() if c.name == name), None)

    def status(self) -> dict | None:
        status = _read_json(self.path / STATUS_FILE)
        return status if isinstance(status, dict) else None

    def config(self) -> dict:
        try:
            config = yaml.safe_load((self.path / CONFIG_FILE).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            return {}
        return config if isinstance(config, dict) else {}

    def signature(self, checkpoints: list[Checkpoint]) -> str:
        """Changes whenever anything the page shows changes: a checkpoint comes, goes or is replaced,
        metrics.jsonl grows, status.json is rewritten."""
        parts = [(c.name, c.identity) for c in checkpoints]
        for name in (METRICS_FILE, STATUS_FILE):
            try:
                stat = (self.path / name).stat()
                parts.append((name, stat.st_size, stat.st_mtime_ns))
            except OSError:
                parts.append((name, None))
        return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def test_prompts(config: dict, checkpoints: list[Checkpoint]) -> list[dict]:
    """The run's test prompts: {"label", "prompt" or "messages", "parameters"}: from config.yaml's
    test_prompts, else (or beyond them) from the checkpoints' samples."""
    configured = config.get("test_prompts") if isinstance(config.get("test_prompts"), list) else []
    count = max([len(configured)] + [len(c.samples) for c in checkpoints])
    prompts = []
    for index in range(count):
        prompt = configured[index] if index < len(configured) and isinstance(configured[index], dict) else None
        samples = [c.samples[index] for c in checkpoints if index < len(c.samples)]
        label = _prompt_text(prompt) if prompt is not None else ""
        if not label and not (prompt or {}).get("messages"):
            label = next((str(s["prompt"]) for s in samples if isinstance(s.get("prompt"), str) and s["prompt"]), label)
        entry = {"label": label, "parameters": _parameters(prompt if prompt is not None else "", samples)}
        messages = (prompt or {}).get("messages") or next((s["messages"] for s in samples if s.get("messages")), None)
        if isinstance(messages, list):
            entry["messages"] = messages
        else:
            text = (prompt or {}).get("prompt")
            entry["prompt"] = (
                text
                if isinstance(text, str)
                else next((s["prompt"] for s in samples if isinstance(s.get("prompt"), str)), "")
            )
        prompts.append(entry)
    return prompts


def answers(checkpoint: Checkpoint, count: int) -> list[dict | None]:
    """The checkpoint's answer to each of `count` test prompts: {"completion", "finish_reason"} or None."""
    out: list[dict | None] = []
    for index in range(count):
        sample = checkpoint.samples[index] if index < len(checkpoint.samples) else None
        if sample is None:
            out.append(None)
            continue
        completion = sample.get("completion")
        finish = sample.get("finish_reason")
        out.append(
            {
                "completion": "" if completion is None else str(completion),
                "finish_reason": None if finish is None else str(finish),
            }
        )
    return out


# ---------------------------------------------------------------------------------------------
# Validation predictions of several checkpoints, side by side

FILTERS = ("all", "wrong", "disagree")


def prediction_table(checkpoints: list[Checkpoint]) -> tuple[list[str], list[dict]]:
    """(names of the checkpoints with predictions, rows): one row per validation example,
    {"prompt", "reference", "predictions": {name: {"prediction", "correct"}}}. Rows are matched
    across checkpoints by (prompt, reference, occurrence), so a repeated example stays apart and a
    checkpoint that wrote its predictions in another order still lines up."""
    names = [c.name for c in checkpoints if c.predictions is not None]
    rows: dict[tuple, dict] = {}
    for checkpoint in checkpoints:
        if checkpoint.predictions is None:
            continue
        seen: dict[tuple, int] = {}
        for prediction in checkpoint.predictions:
            key = (prediction["prompt"], prediction["reference"])
            occurrence = seen.get(key, 0)
            seen[key] = occurrence + 1
            row = rows.setdefault((*key, occurrence), {"prompt": key[0], "reference": key[1], "predictions": {}})
            row["predictions"][checkpoint.name] = {
                "prediction": prediction["prediction"],
                "correct": prediction["correct"],
            }
    return names, list(rows.values())


def is_wrong(row: dict, name: str | None) -> bool:
    """`name` got it wrong (any checkpoint, when `name` is None). A missing prediction is not wrong."""
    predictions = row["predictions"]
    if name is None:
        return any(p["correct"] is False for p in predictions.values())
    return name in predictions and predictions[name]["correct"] is False


def disagree(row: dict) -> bool:
    """The checkpoints that predicted this example do not all give the same prediction."""
    return len({p["prediction"] for p in row["predictions"].values()}) > 1


def filter_predictions(rows: list[dict], how: str, name: str | None) -> list[dict]:
    if how == "wrong":
        return [row for row in rows if is_wrong(row, name)]
    if how == "disagree":
        return [row for row in rows if disagree(row)]
    return rows


def check_run_folder(path: Path) -> Path:
    """`path` as a run folder the page can watch, or a UserError naming it and the fix."""
    path = Path(path)
    fix = "Fix: give a run's output_dir (the folder that holds metrics.jsonl, status.json and checkpoint-<step>/)"
    if not path.exists():
        raise UserError(f"{path} does not exist. {fix}")
    if not path.is_dir():
        raise UserError(f"{path} is a file, not a run folder. {fix}")
    if step_of(path, CHECKPOINT_PREFIX) is not None:
        raise UserError(
            f"{path} is a checkpoint, not a run folder. Fix: give the run folder that holds it, {path.parent}"
        )
    # config.yaml alone is no mark: users keep their config file beside their runs.
    markers = (METRICS_FILE, STATUS_FILE, LOCK_FILE)

    def is_run(folder: Path) -> bool:
        return any((folder / name).exists() for name in markers) or any(
            step_of(child, CHECKPOINT_PREFIX) is not None for child in folder.iterdir()
        )

    if is_run(path):
        return path
    runs = sorted(child.name for child in path.iterdir() if child.is_dir() and is_run(child))
    hint = f" It holds these runs: {', '.join(runs[:10])}." if runs else ""
    raise UserError(
        f"{path} is not a run folder: it has no {METRICS_FILE}, {STATUS_FILE} or checkpoint-<step>/.{hint} {fix}"
    )
