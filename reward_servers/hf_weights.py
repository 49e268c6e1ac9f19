"""Where a reward's Hugging Face weights come from, checked before any model is built: a local folder,
or a hub id already in the local cache (or downloadable when online). A missing path fails at
construction (start-up of a replica, never at `--dry-run`) with the config key to set and the command
that fetches the weights, instead of a deep `from_pretrained` traceback or a hang on a closed network."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class RewardWeightsError(FileNotFoundError, ValueError):
    """A reward's weights path (option `key`) is neither a local folder nor an obtainable hub id (a
    FileNotFoundError, and a ValueError for callers that treat bad options as such, e.g. `vgrpo score`)."""


def _looks_local(path: str) -> bool:
    """A filesystem path rather than a hub id `owner/name`: absolute, relative with ./ or ../, ~, or with
    more than one separator (hub ids have at most one)."""
    return (
        path.startswith(("/", "./", "../", "~", "."))
        or path.count("/") > 1
        or (os.sep != "/" and os.sep in path)
    )


def _offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # an old huggingface_hub without the constant
        return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(repo_id, local_files_only=True)
        return True
    except Exception:
        return False


def missing_weights_message(key: str, path: str, default_id: str, why: str) -> str:
    """The one message every missing-weights error uses: the key, the value, why, and how to fix it."""
    return (
        f"{key}={path!r}: {why}; fix: download the weights with "
        f"`huggingface-cli download {default_id} --local-dir DIR` (on a machine with network) and set "
        f"{key}=DIR (--set or the YAML config), or run once online so the hub cache holds {path!r}"
    )


def resolve_weights(path: str, key: str, default_id: str) -> str:
    """`path` itself when it is an existing local folder (or file) or a hub id the cache holds (or the
    hub can serve: online); raises RewardWeightsError naming `key` otherwise."""
    if not path:
        raise RewardWeightsError(missing_weights_message(key, path, default_id, "empty path"))
    expanded = os.path.expanduser(path)
    if Path(expanded).exists():
        return expanded
    if _looks_local(path):
        raise RewardWeightsError(missing_weights_message(key, path, default_id, "no such local path"))
    if _cached(path):
        return path
    if _offline():
        raise RewardWeightsError(
            missing_weights_message(
                key, path, default_id, "not in the Hugging Face cache and HF_HUB_OFFLINE is set"
            )
        )
    return path


def load_pretrained(loader: Callable[..., T], path: str, key: str, default_id: str, **kwargs: Any) -> T:
    """`loader(path, **kwargs)` (a `from_pretrained`), turning the OSError of an unreachable hub or an
    incomplete folder into a RewardWeightsError that names `key`."""
    try:
        return loader(path, **kwargs)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RewardWeightsError(
            missing_weights_message(key, path, default_id, f"cannot load it ({first[:200]})")
        ) from e
