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


OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's pixel statistics (ViT preprocessing)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def load_tensor_file(path: str, key: str, url: str) -> dict[str, Any]:
    """A file of tensors a reward's upstream publishes (a ``.pt`` / ``.pth`` state dict, read with
    ``torch.load(weights_only=True)``: tensors and plain containers only, no code runs; or a
    ``.safetensors`` file), as a dict. Raises FileNotFoundError naming ``key`` and where to download it,
    and ValueError for a file that is not tensors (a pickle with code in it is refused, not run)."""
    import torch

    file = Path(path).expanduser()
    if not path or not file.is_file():
        raise FileNotFoundError(
            f"{key}={path!r}: no such file; fix: download {url} (on a machine with network) and set {key}=FILE"
        )
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(file)))
    try:
        obj = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{key}={path!r}: not a state dict of tensors ({str(e)[:200]})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{key}={path!r}: not a state dict of tensors (a {type(obj).__name__})")
    return obj


def padded_tokens(tokenizer: Any, prompts: list[str], max_length: int, device: str) -> Any:
    """The prompts tokenised as upstream scorers do: padded to ``max_length``, truncated there."""
    return tokenizer(
        list(prompts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    ).to(device)


def clip_pixels(images: list[Any], size: int, prepare: Callable[[Any, int], Any]) -> Any:
    """A (B, 3, size, size) float tensor: each image through ``prepare(image, size)`` (an upstream's
    resize/crop/pad, giving H x W x 3 floats in [0, 1]), normalised with OpenAI CLIP's mean and std."""
    import torch

    mean, std = torch.tensor(OPENAI_MEAN).view(3, 1, 1), torch.tensor(OPENAI_STD).view(3, 1, 1)
    return torch.stack([(torch.from_numpy(prepare(im, size)).permute(2, 0, 1) - mean) / std for im in images])
