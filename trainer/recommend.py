"""The recommended checkpoint of a run: `recommendation.json`, and `--best` for the commands that use one.

`recommend` is a pure function of the checkpoint summaries (trainer/report.py `CheckpointSummary`,
or their dicts from the resumable state), so a resumed run recommends exactly what an uninterrupted
run does. The rule: the highest value of the primary task metric (the first of `eval.metrics`,
trainer/task_metrics.py), the earlier checkpoint on a tie (less trained, as good on the task); with
no task metric, or one that is the same at every checkpoint (0 everywhere tells nothing), the lowest
eval loss (the earlier on a tie); with neither, no recommendation.

`write_recommendation` writes `{"checkpoint", "metric", "value", "why"}` into the run folder
atomically. `resolve_checkpoint_arg(path, best)` is how `python -m trainer.export`, `trainer.generate`
and `trainer.serve` read a checkpoint argument: a checkpoint folder as given, or with `--best` a run
folder's recommended checkpoint.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from trainer.atomic import write_text_atomically
from trainer.errors import UsageError, UserError
from trainer.layout import CHECKPOINT_PREFIX, RECOMMENDATION_FILE

LOWER_IS_BETTER = frozenset({"eval_loss"})


@dataclass(frozen=True)
class Recommendation:
    checkpoint: str  # the folder's name inside the run folder: checkpoint-<step>
    metric: str  # a task metric's name, or eval_loss
    value: float
    why: str  # one line


def _get(thing: Any, name: str, default: Any = None) -> Any:
    return thing.get(name, default) if isinstance(thing, dict) else getattr(thing, name, default)


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def primary_metric(checkpoints: Sequence) -> str | None:
    """The first metric of the first checkpoint that has task metrics (`eval.metrics`' order)."""
    for checkpoint in checkpoints:
        metrics = _get(checkpoint, "metrics")
        if isinstance(metrics, dict) and metrics:
            return next(iter(metrics))
    return None


def recommend(checkpoints: Sequence, primary: str | None = None) -> Recommendation | None:
    """The recommended checkpoint (see the module docstring), or None without a metric to rank by."""
    ordered = sorted((c for c in checkpoints if isinstance(_get(c, "step"), int)), key=lambda c: _get(c, "step"))
    primary = primary or primary_metric(ordered)
    scored = [(c, _finite((_get(c, "metrics") or {}).get(primary))) for c in ordered] if primary else []
    scored = [(c, v) for c, v in scored if v is not None]
    losses = [(c, v) for c, v in ((c, _finite(_get(c, "eval_loss"))) for c in ordered) if v is not None]
    undecided = None
    if len(scored) > 1 and len({v for _, v in scored}) == 1 and losses:
        # The metric does not tell the checkpoints apart (all wrong, or all right): the loss does.
        undecided = f"{primary} is {scored[0][1]:.4f} at every checkpoint, so the eval loss decides: "
        scored = []
    if scored:
        metric, lower = primary, False
    else:
        scored, metric, lower = losses, "eval_loss", True
    if not scored:
        return None
    best_value = min(v for _, v in scored) if lower else max(v for _, v in scored)
    tied = [c for c, v in scored if v == best_value]
    chosen = tied[0]  # sorted by step: the earliest of equals
    name = f"{CHECKPOINT_PREFIX}{_get(chosen, 'step')}"
    if metric == "eval_loss":
        why = f"lowest eval loss ({best_value:.4f}) of {len(scored)} checkpoint{'s' if len(scored) != 1 else ''}"
        why = undecided + why if undecided else why + ", as no task metric was computed"
    else:
        examples = _get(chosen, "eval_examples")
        over = f" on {examples} validation examples" if examples else ""
        why = f"highest {metric} ({best_value:.4f}{over}) of {len(scored)} checkpoint{'s' if len(scored) != 1 else ''}"
    if len(tied) > 1:
        others = ", ".join(f"{CHECKPOINT_PREFIX}{_get(c, 'step')}" for c in tied[1:])
        why += f"; {others} {'ties' if len(tied) == 2 else 'tie'} with it and the earlier is preferred"
    return Recommendation(name, metric, best_value, why)


def write_recommendation(output_dir: str | Path, recommendation: Recommendation | None) -> None:
    """`recommendation.json` in the run folder, replaced atomically; removed when there is none."""
    path = Path(output_dir) / RECOMMENDATION_FILE
    if recommendation is None:
        path.unlink(missing_ok=True)
        return
    write_text_atomically(path, json.dumps(asdict(recommendation), indent=1, ensure_ascii=False) + "\n")


def read_recommendation(run_dir: str | Path) -> Recommendation:
    """The run folder's recommendation; a `UserError` naming the file and the fix when there is none."""
    run_dir = Path(run_dir)
    path = run_dir / RECOMMENDATION_FILE
    checkpoints = _checkpoint_names(run_dir)
    listed = f" ({', '.join(checkpoints[:5])}{', ...' if len(checkpoints) > 5 else ''})" if checkpoints else ""
    fix = f"Fix: give one of its checkpoint folders{listed} instead of --best"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        why = (
            "a run writes it at its first checkpoint when it has validation data to rank them by"
            if checkpoints
            else "it holds no checkpoint yet"
        )
        raise UserError(f"{run_dir} has no {RECOMMENDATION_FILE}: {why}. {fix}") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserError(f"{path} cannot be read ({type(err).__name__}: {err}). {fix}") from None
    try:
        return Recommendation(
            str(record["checkpoint"]), str(record["metric"]), float(record["value"]), str(record["why"])
        )
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{path} is not a recommendation (it needs checkpoint, metric, value and why). {fix}") from None


def _checkpoint_names(folder: Path) -> list[str]:
    try:
        found = [
            p
            for p in folder.iterdir()
            if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and p.name[len(CHECKPOINT_PREFIX) :].isdigit()
        ]
    except OSError:
        return []
    return [p.name for p in sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))]


def _is_model_folder(folder: Path) -> bool:
    return (folder / "adapter_config.json").is_file() or (folder / "config.json").is_file()


def resolve_checkpoint_arg(path: str | Path, best: bool) -> tuple[Path, Recommendation | None]:
    """The checkpoint a command should load, and the recommendation when `--best` chose it.

    Without `best`, `path` is returned as given (the loader checks it), except a run folder, which
    is a usage error naming its checkpoints and `--best`. With `best`, `path` must be a run folder
    with a `recommendation.json`; its recommended checkpoint is returned."""
    path = Path(path)
    if not best:
        if path.is_dir() and not _is_model_folder(path) and _checkpoint_names(path):
            names = _checkpoint_names(path)
            hint = ""
            if (path / RECOMMENDATION_FILE).is_file():
                try:
                    hint = f" (recommended: {read_recommendation(path).checkpoint})"
                except UserError:
                    pass
            raise UsageError(
                f"{path} is a run folder, not a checkpoint. Fix: give one of its checkpoints "
                f"({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}), or add --best for the "
                f"recommended one{hint}"
            )
        return path, None
    if not path.is_dir():
        raise UserError(
            f"{path} is not a run folder (it {'is a file' if path.exists() else 'does not exist'}). "
            "Fix: with --best give the run's output_dir"
        )
    if _is_model_folder(path) and not _checkpoint_names(path):
        raise UsageError(
            f"--best takes a run folder, and {path} is a checkpoint. Fix: drop --best to use it, or give "
            f"its run folder ({path.parent}) with --best"
        )
    recommendation = read_recommendation(path)
    chosen = path / recommendation.checkpoint
    if not chosen.is_dir():
        raise UserError(
            f"{path / RECOMMENDATION_FILE} recommends {recommendation.checkpoint}, which is not in {path}. "
            "Fix: give one of its checkpoint folders instead of --best"
        )
    return chosen, recommendation


def add_checkpoint_arguments(
    parser,
    metavar: str = "CHECKPOINT_OR_EXPORT",
    what: str = "a checkpoint-<step> folder (LoRA or full) or an exported model",
) -> None:
    """The first argument of a command that runs a checkpoint (export, generate, serve), and `--best`."""
    parser.add_argument("checkpoint", metavar=metavar, help=f"{what}; with --best a run folder")
    parser.add_argument(
        "--best",
        action="store_true",
        help=f"the first argument is a run folder: use its recommended checkpoint ({RECOMMENDATION_FILE}: "
        "the best task metric on the validation data, else the lowest eval loss)",
    )


def checkpoint_from_args(checkpoint: str | Path, best: bool, log=None) -> Path:
    """`resolve_checkpoint_arg`, saying on stderr (or `log`) which checkpoint `--best` chose and why."""
    import sys

    path, recommendation = resolve_checkpoint_arg(checkpoint, best)
    if recommendation is not None:
        message = f"--best: {path} ({recommendation.why})"
        (log or (lambda text: print(text, file=sys.stderr, flush=True)))(message)
    return path
