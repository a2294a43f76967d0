"""Models named by Hugging Face id: whether the Hub can be reached, asked once and quickly.

Without this, a machine that cannot reach the Hub (a cluster node, a laptop offline) spends a
minute on huggingface_hub's retries for every file before it even looks in the local cache. One
short request decides it: unreachable means the model must come from the local cache
(`local_files_only`), and a model that is not there fails at once with the fix.
"""

from __future__ import annotations

import functools
from pathlib import Path

PROBE_SECONDS = 5.0


def is_local(name_or_path: str) -> bool:
    return Path(name_or_path).exists()


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


def offline_fix(name_or_path: str) -> str:
    """How to get a model onto a machine that cannot reach the Hub."""
    from huggingface_hub import constants

    return (
        f"the Hub ({constants.ENDPOINT}) cannot be reached from this machine and '{name_or_path}' is not in the "
        f"local cache ({constants.HF_HUB_CACHE}). Fix: download it where there is network "
        f"(`hf download {name_or_path}`) into a cache this machine reads (set HF_HOME), or copy a folder made by "
        "save_pretrained and give its path; on machines without network set HF_HUB_OFFLINE=1"
    )
