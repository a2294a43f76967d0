"""Experiment trackers, through accelerate's: TensorBoard and Weights & Biases (`tracking.report_to`).

What a run reports: the resolved config at the start; per optimizer step the train loss, learning
rate, gradient norm and tokens per second; at each checkpoint the eval loss and the test-prompt
samples as a table under its own name (`samples/checkpoint-<step>`), so no checkpoint's table
overwrites another's. TensorBoard writes to `<output_dir>/logs/<project>/`, W&B to
`<output_dir>/wandb/` (with `WANDB_MODE=offline` nothing leaves the machine; `wandb sync` uploads it
later). The W&B run id is kept in the resumable state, so a resumed run continues the same W&B run.
"""

from __future__ import annotations

import importlib.util
import secrets
from pathlib import Path

from trainer.config import Config, flatten
from trainer.errors import UserError
from trainer.layout import LOG_DIR, WANDB_DIR
from trainer.report import markdown_cell

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def trackers(config: Config) -> list[str]:
    setting = config.tracking.report_to
    return [] if setting == "none" else ["tensorboard", "wandb"] if setting == "all" else [setting]


def check_installed(config: Config) -> None:
    """A missing tracker package is a user error before anything loads."""
    missing = [PACKAGES[name] for name in trackers(config) if importlib.util.find_spec(PACKAGES[name]) is None]
    if missing:
        raise UserError(
            f"tracking.report_to={config.tracking.report_to} needs {' and '.join(missing)}: "
            "pip install -c constraints.txt -e '.[tracking]' "
            f"(or pip install {' '.join(missing)}), or set tracking.report_to=none"
        )


def accelerator_options(config: Config) -> dict:
    """`Accelerator(...)` arguments for the configured trackers (none: no arguments)."""
    names = trackers(config)
    if not names:
        return {}
    from accelerate.utils import ProjectConfiguration

    output_dir = Path(config.output_dir)
    return {
        "log_with": names,
        "project_config": ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / LOG_DIR)),
    }


def new_run_id() -> str:
    """A W&B-style run id (8 lowercase letters and digits)."""
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    return "".join(secrets.choice(alphabet) for _ in range(8))


def flat_config(config: Config) -> dict:
    """The resolved config as `section.key` -> bool/int/float/str (what TensorBoard's hparams take)."""
    return {
        key: value if isinstance(value, (bool, int, float, str)) else str(value)
        for key, value in flatten(config.model_dump(mode="json")).items()
    }


def start(accelerator, config: Config, run_id: str) -> None:
    """Open the trackers (every process calls it; accelerate runs them on the main one)."""
    if not trackers(config):
        return
    output_dir = Path(config.output_dir)
    if "wandb" in trackers(config) and accelerator.is_main_process:
        (output_dir / WANDB_DIR).mkdir(parents=True, exist_ok=True)  # wandb.init's `dir` must exist
    accelerator.init_trackers(
        config.tracking.project,
        config=flat_config(config),
        init_kwargs={"wandb": {"dir": str(output_dir), "id": run_id, "resume": "allow", "name": output_dir.name}},
    )


def log_samples(accelerator, config: Config, step: int, samples: list[dict]) -> None:
    """The test prompts' samples of checkpoint `step`, as a table of its own in each tracker."""
    if not trackers(config) or not accelerator.is_main_process:
        return
    name = f"samples/checkpoint-{step}"
    rows = [[s["prompt"], s["completion"], s["finish_reason"], str(s["parameters"])] for s in samples]
    if "wandb" in trackers(config):
        import wandb

        table = wandb.Table(columns=["prompt", "completion", "finish_reason", "parameters"], data=rows)
        accelerator.get_tracker("wandb", unwrap=True).log({name: table}, step=step)
    if "tensorboard" in trackers(config):
        lines = ["| prompt | completion | finish | parameters |", "|---|---|---|---|"]
        lines += ["| " + " | ".join(markdown_cell(cell) for cell in row) + " |" for row in rows]
        accelerator.get_tracker("tensorboard", unwrap=True).add_text(name, "\n".join(lines), global_step=step)


def log_step(accelerator, step: int, result, *, learning_rate: float, tokens_per_second: float) -> None:
    """An optimizer step's figures (trainer/step.py's result)."""
    if accelerator.trackers:
        figures = {
            "train/loss": result.loss,
            "train/learning_rate": learning_rate,
            "train/grad_norm": result.grad_norm,
            "train/tokens_per_second": tokens_per_second,
        }
        accelerator.log(figures, step=step)


def log_eval(accelerator, step: int, eval_loss: float | None, metrics: dict[str, float]) -> None:
    """A checkpoint's eval loss and task metrics, each as `eval/<name>` (none: nothing is logged)."""
    figures = {f"eval/{name}": value for name, value in {"loss": eval_loss, **metrics}.items() if value is not None}
    if figures:
        accelerator.log(figures, step=step)
