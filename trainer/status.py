"""How the last job of a run ended, for batch scripts and people:

    python -m trainer.status CONFIG.yaml [section.key=value ...]

prints one line about the run in the config's `output_dir` and exits with the code its last job
ended with: 0 complete, 75 stopped early and resumable, 130 interrupted by a second Ctrl-C, 1
failed or killed, and 1 while a job is still running (2 with a usage error).
`accelerate launch` and `torchrun` report any failed worker as exit code 1, so
scripts/slurm/train.sbatch asks this to know whether a job stopped in a resumable way.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.cli import command
from trainer.config import load_config
from trainer.errors import EXIT_USER_ERROR, UsageError
from trainer.layout import LOCK_FILE
from trainer.run_folder import RunFolder
from trainer.run_lock import RunLock, holder_is_gone, this_process


def describe(folder: Path) -> tuple[str, int]:
    """(one line, exit code) for the run folder `folder`."""
    status = RunFolder(folder).read_status()
    if status is None:
        return f"{folder}: no run has started here", EXIT_USER_ERROR
    where = f"step {status.get('step', '?')} of {status.get('total_steps', '?')}"
    if status["status"] == "running":
        try:
            lock = folder / LOCK_FILE
            holder, age = json.loads(lock.read_text()), time.time() - lock.stat().st_mtime
        except (OSError, ValueError):
            return f"{folder}: killed (its job ended without saying how; last known {where})", EXIT_USER_ERROR
        if holder_is_gone(holder, age, this_process(), RunLock.STALE_SECONDS):
            return f"{folder}: killed (pid {holder.get('pid')} on {holder.get('host')} is gone)", EXIT_USER_ERROR
        return f"{folder}: running (pid {holder.get('pid')} on {holder.get('host')})", EXIT_USER_ERROR
    message = status.get("message", "")
    return f"{folder}: {status['status']} at {status.get('updated')}: {message}", int(
        status.get("exit_code", EXIT_USER_ERROR)
    )


@command
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if not argv:
        raise UsageError("usage: python -m trainer.status CONFIG.yaml [section.key=value ...]")
    config = load_config(argv[0], argv[1:])
    line, code = describe(Path(config.output_dir))
    print(line)
    return code


if __name__ == "__main__":
    sys.exit(main())
