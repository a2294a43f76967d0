"""How every command ends: one wrapper for the entry points' `main` (train's own handles more).

A user error (trainer.errors.UserError) is one line on stderr, `error: ...`, and its exit code (1,
or 2 for the command line itself); argparse's own exits pass through (`--help` 0, a malformed
command line 2). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable

from trainer.errors import UserError


def command(main: Callable[..., int]) -> Callable[..., int]:
    @functools.wraps(main)
    def run(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except SystemExit as exit:  # argparse: --help (0) or a malformed command line (2)
            return exit.code if isinstance(exit.code, int) else 0 if exit.code is None else 2
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            return err.exit_code

    return run
