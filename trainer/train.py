"""Fine-tune a causal language model from a YAML config: the training command.

    accelerate launch trainer/train.py CONFIG.yaml [section.key=value ...]
    python trainer/train.py CONFIG.yaml [section.key=value ...]
    python -m trainer.train CONFIG.yaml [section.key=value ...]

The config is read and validated, and (in one process) the data checked, before torch and
transformers are imported: a typo or a broken data line is reported in well under a second. The
recipe itself (setup, the loop, checkpoints, states) is trainer/recipe.py; how a failure is told,
trainer/cli.py. How a run ends:

    0    done (or already complete)        1    an error: the config, data or paths, or a failure
    2    the command line itself           75   stopped, resumable: run the same command to continue
    130  interrupted by a second Ctrl-C    (trainer/errors.py; status.json records it)
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python trainer/train.py`: make the `trainer` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.cli import EVERY_KIND, Ending, Failure, command
from trainer.config import load_config
from trainer.errors import EXIT_DONE, EXIT_STOPPED_RESUMABLE, UsageError
from trainer.stopping import StopSignals

USAGE = "usage: accelerate launch trainer/train.py CONFIG.yaml [section.key=value ...]"


def __getattr__(name: str):
    """`from trainer.train import FineTuneRecipe` still works, without importing torch for `main`."""
    if name == "FineTuneRecipe":
        from trainer.recipe import FineTuneRecipe

        return FineTuneRecipe
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _one_process() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) == 1


class RunEnding(Ending):
    """Train's part in how it ends (trainer/cli.py prints the line): this process's rank, where the
    run was, the failure recorded in status.json, and at the very end the run closed and the
    process group left by all processes together. The stop signals stay flag-only until then."""

    def __init__(self):
        self.rank = os.environ.get("RANK", "0")
        self.stop = StopSignals()
        self.recipe = None

    def where(self) -> str:
        return self.recipe.where() if self.recipe is not None else " while starting"

    def failed(self, failure: Failure) -> None:
        if self.recipe is not None and failure.error is not None:
            self.recipe.failed(failure.error, failure.exit_code)

    def __enter__(self) -> "RunEnding":
        self.stop.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.recipe is not None:
                self.recipe.close()
            if "torch" in sys.modules:
                from trainer.distributed import shutdown

                shutdown()  # all processes leave the process group together
        finally:
            self.stop.__exit__(*exc)


@command(ends=EVERY_KIND, ending=RunEnding)
def main(argv: list[str] | None = None, *, ending: RunEnding) -> int:
    argv = sys.argv[1:] if argv is None else argv
    started = time.time()
    if not argv or argv[0] in ("-h", "--help"):
        if argv:
            print(f"{USAGE}\n\n{__doc__}")
            return EXIT_DONE
        raise UsageError(f"no config file given\n{USAGE}")
    config = load_config(argv[0], argv[1:])
    # One process: the data preflight too, still before the heavy imports. With several, the
    # recipe's main process runs it, so that all processes stop together.
    reports = None
    if _one_process():
        from trainer.data.preflight import preflight_data

        reports = preflight_data(config, log=print)
    from transformers.utils import logging as hf_logging

    from trainer.recipe import FineTuneRecipe

    hf_logging.disable_progress_bar()  # transformers' per-file load/save bars drown the training log
    ending.recipe = FineTuneRecipe(config, stop=ending.stop, started=started, data_reports=reports)
    return EXIT_DONE if ending.recipe.run() == "complete" else EXIT_STOPPED_RESUMABLE


if __name__ == "__main__":
    sys.exit(main())
