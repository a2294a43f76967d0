"""Errors a user can cause, and how the command line reports them.

Anything a user can get wrong (config keys, data files, paths) raises `UserError`
with a message that names the file, the line or key, and the fix. The entry
point prints that message alone (no traceback) and exits with code 1; usage
mistakes on the command line exit with code 2.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's config, data or paths. The message is the whole report."""

    exit_code = 1


class UsageError(UserError):
    """A malformed command line (missing config file, bad `key=value` override)."""

    exit_code = 2
