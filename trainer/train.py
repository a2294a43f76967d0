"""Fine-tune a causal language model from a YAML config: the training command.

    accelerate launch trainer/train.py CONFIG.yaml [section.key=value ...]
    python trainer/train.py CONFIG.yaml [section.key=value ...]
    python -m trainer.train CONFIG.yaml [section.key=value ...]

The config is read and validated, and (in one process) the data checked, before torch and
transformers are imported: a typo or a broken data line is reported in well under a second. The
recipe itself (setup, the loop, checkpoints, states) is trainer/recipe.py. How a run ends:

    0    done (or already complete)        1    an error: the config, data or paths, or a failure
    2    the command line itself           75   stopped, resumable: run the same command to continue
    130  interrupted by a second Ctrl-C    (trainer/errors.py; status.json records it)
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # `python trainer/train.py`: make the `trainer` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.config import load_config
from trainer.errors import (
    EXIT_DONE,
    EXIT_INTERRUPTED,
    EXIT_STOPPED_RESUMABLE,
    EXIT_USER_ERROR,
    UsageError,
    UserError,
)
from trainer.stopping import StopSignals

USAGE = "usage: accelerate launch trainer/train.py CONFIG.yaml [section.key=value ...]"

OUT_OF_MEMORY_FIX = (
    "Fix: lower training.micro_batch_size (raise gradient_accumulation_steps to keep the batch), "
    "set model.gradient_checkpointing=true, or lower data.max_seq_len; "
    "`python scripts/plan.py CONFIG` estimates the memory a config needs"
)


def __getattr__(name: str):
    """`from trainer.train import FineTuneRecipe` still works, without importing torch for `main`."""
    if name == "FineTuneRecipe":
        from trainer.recipe import FineTuneRecipe

        return FineTuneRecipe
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _is_out_of_memory(err: BaseException) -> bool:
    torch = sys.modules.get("torch")  # not imported yet: not torch's out-of-memory
    return torch is not None and isinstance(err, torch.OutOfMemoryError)


def _one_process() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) == 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    started = time.time()
    rank = os.environ.get("RANK", "0")
    prefix = "" if rank == "0" else f"[rank {rank}] "
    recipe = None
    with StopSignals() as stop:
        try:
            if not argv or argv[0] in ("-h", "--help"):
                if argv:
                    print(f"{USAGE}\n\n{__doc__}")
                    return EXIT_DONE
                raise UsageError(f"no config file given\n{USAGE}")
            config = load_config(argv[0], argv[1:])
            # One process: the data preflight too, still before the heavy imports. With several,
            # the recipe's main process runs it, so that all processes stop together.
            reports = None
            if _one_process():
                from trainer.data.preflight import preflight_data

                reports = preflight_data(config, log=print)
            from transformers.utils import logging as hf_logging

            from trainer.recipe import FineTuneRecipe

            hf_logging.disable_progress_bar()  # transformers' per-file load/save bars drown the training log
            recipe = FineTuneRecipe(config, stop=stop, started=started, data_reports=reports)
            return EXIT_DONE if recipe.run() == "complete" else EXIT_STOPPED_RESUMABLE
        except UserError as err:
            # Usually every process hits the same error (a shared one is printed by rank 0 alone), but
            # one that only a single rank hits must not vanish: it is printed with its rank.
            if rank == "0" or not getattr(err, "shared", False):
                print(f"{prefix}error: {err}", file=sys.stderr)
            if recipe is not None:
                recipe.failed(err, err.exit_code)
            return err.exit_code
        except OSError as err:  # the environment: a folder that is not writable, a full disk
            err = UserError(
                f"{err.strerror or err}: {err.filename}. Fix: check that this path is writable and its "
                "disk has free space"
            )
            print(f"{prefix}error: {err}", file=sys.stderr)
            if recipe is not None:
                recipe.failed(err, EXIT_USER_ERROR)
            return EXIT_USER_ERROR
        except KeyboardInterrupt:
            if rank == "0":
                print(
                    "\ninterrupted by a second Ctrl-C: stopped at once, without saving. Rerun the same command to "
                    "continue from the newest resumable state",
                    file=sys.stderr,
                )
            return EXIT_INTERRUPTED
        except Exception as err:
            where = recipe.where() if recipe is not None else " while starting"
            if _is_out_of_memory(err):  # the run's sizes, not a bug: the fix, no traceback
                gpu = sys.modules["torch"].cuda.is_available()
                err = UserError(f"out of {'GPU ' if gpu else ''}memory{where}. {OUT_OF_MEMORY_FIX}")
                print(f"{prefix}error: {err}", file=sys.stderr)
            else:  # not the user's: a library's error, or a bug of ours
                print(
                    f"{prefix}error: the run failed{where} with {type(err).__name__}: {err}. This is a bug in the "
                    "trainer or a library, not in your config or data: the traceback follows; report it with the "
                    "output of `python -m trainer.doctor CONFIG`",
                    file=sys.stderr,
                    flush=True,
                )
                traceback.print_exc()
            if recipe is not None:
                recipe.failed(err, EXIT_USER_ERROR)
            return EXIT_USER_ERROR
        finally:
            if recipe is not None:
                recipe.close()
            if "torch" in sys.modules:
                from trainer.distributed import shutdown

                shutdown()  # all processes leave the process group together


if __name__ == "__main__":
    sys.exit(main())
