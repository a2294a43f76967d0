"""Models named by Hugging Face id: whether the Hub can be reached, asked once and quickly.

Without this, a machine that cannot reach the Hub (a cluster node, a laptop offline) spends a
minute on huggingface_hub's retries for every file before it even looks in the local cache. One
short request decides it: unreachable means the model must come from the local cache
(`local_files_only`), and a model that is not there fails at once with the fix. A value written as
a path (`/...`, `./...`, `~/...`) is never a Hub id: when it is not there, the folder is missing.
"""

from __future__ import annotations

import functools
from pathlib import Path

from trainer.errors import UserError

PROBE_SECONDS = 5.0


def is_local(name_or_path: str) -> bool:
    return Path(name_or_path).expanduser().exists()


class ModelFolderMissing(UserError):
    """A model given as a path (`key` in the config or on the command line) whose folder is not there."""

    def __init__(self, message: str, key: str = "", path: str = ""):
        super().__init__(message)
        self.key, self.path = key, path


def written_as_path(name_or_path: str) -> bool:
    """Absolute, `./`, `../` or `~`: a path, never a Hugging Face id (ids start with a letter or digit)."""
    return (
        name_or_path.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or name_or_path in (".", "..")
        or (Path(name_or_path).is_absolute())
    )


def model_source(name_or_path: str, key: str) -> str:
    """What to give `from_pretrained` for the model that `key` names: a value written as a path is
    that folder, with `~` expanded (transformers would take `~/model` for a malformed Hub id), and
    must exist: a missing one is said to be missing at once, rather than looked for on the Hub (with
    the advice `hf download /some/path`). Anything else is a local folder or a Hub id, as it is
    (`examples/nope` too: when it fails to load, `local_folder_hint` says the folder is not there)."""
    if not written_as_path(name_or_path):
        return name_or_path
    expanded = Path(name_or_path).expanduser()
    if expanded.exists():
        return str(expanded)
    shown = f"{name_or_path} ({expanded})" if name_or_path.startswith("~") else name_or_path
    relative = "" if expanded.is_absolute() else f" (relative paths start at {Path.cwd()})"
    raise ModelFolderMissing(
        f"{key}: the folder {shown} does not exist. Fix: give the path of a model folder made by save_pretrained"
        f"{relative}, or a Hugging Face model id such as EleutherAI/gpt-j-6b",
        key=key,
        path=name_or_path,
    )


@functools.lru_cache(maxsize=1)
def hub_reachable() -> bool:
    """One HEAD request to the Hub's endpoint (through the proxies huggingface_hub uses)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.is_offline_mode():
        return False
    try:
        get_session().head(constants.ENDPOINT, timeout=PROBE_SECONDS)
    except Exception:  # DNS, refused, timeout, proxy errors: all mean "not from here"
        return False
    return True


def load_options(name_or_path: str) -> dict:
    """Extra `from_pretrained` arguments: `local_files_only` when the Hub cannot be reached."""
    if is_local(name_or_path) or hub_reachable():
        return {}
    return {"local_files_only": True}


def local_folder_hint(name_or_path: str) -> str:
    """For `examples/nope` beside a folder `examples/`: "there is no folder examples/nope here (examples/
    holds a, b); " -- most likely a typo in a path, which is otherwise taken for a Hub id."""
    parent = Path(name_or_path).parent
    if parent == Path(".") or not parent.is_dir() or Path(name_or_path).exists():
        return ""
    held = sorted(p.name for p in parent.iterdir() if p.is_dir() and not p.name.startswith("."))
    listed = f" holds {', '.join(held[:5])}{', ...' if len(held) > 5 else ''}" if held else " holds no folder"
    return f"there is no folder {name_or_path} here ({parent}/{listed}); as a Hugging Face id: "


def offline_fix(name_or_path: str) -> str:
    """How to get a model onto a machine that cannot reach the Hub."""
    from huggingface_hub import constants

    return local_folder_hint(name_or_path) + (
        f"the Hub ({constants.ENDPOINT}) cannot be reached from this machine and '{name_or_path}' is not in the "
        f"local cache ({constants.HF_HUB_CACHE}). Fix: download it where there is network "
        f"(`hf download {name_or_path}`) into a cache this machine reads (set HF_HOME), or copy a folder made by "
        "save_pretrained and give its path; on machines without network set HF_HUB_OFFLINE=1"
    )
