"""Model families (docs/families.md): SD3/SD3.5, FLUX.1, Qwen-Image and Wan2.1, each one module here
behind :class:`Family`. A checkpoint's family is read from its ``model_index.json`` (the pipeline class);
``model.family`` overrides it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vgrpo.core.families.base import Family, FamilyError, TextCond
from vgrpo.core.families.flux import Flux
from vgrpo.core.families.qwen_image import QwenImage
from vgrpo.core.families.sd3 import SD3
from vgrpo.core.families.wan import Wan

FAMILIES: dict[str, Family] = {f.name: f for f in (SD3(), Flux(), QwenImage(), Wan())}
_BY_CLASS = {cls: f for f in FAMILIES.values() for cls in (f.pipeline_class, f.transformer_class)}

__all__ = ["FAMILIES", "Family", "FamilyError", "TextCond", "family_named", "family_of", "resolve_family"]


def _choices() -> str:
    return ", ".join(FAMILIES)


def family_named(name: str) -> Family:
    if name not in FAMILIES:
        raise FamilyError(f"model.family = {name!r} is not a known family; choose one of {_choices()}")
    return FAMILIES[name]


def model_index(path: str) -> dict[str, Any] | None:
    """A pipeline's model_index.json: from a local folder, or a hub id's copy in the local cache (never
    a download); None when neither is there."""
    local = Path(path) / "model_index.json"
    if local.is_file():
        return json.loads(local.read_text())
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(path, "model_index.json")
    except Exception:
        return None
    return json.loads(Path(cached).read_text()) if isinstance(cached, str) else None


def resolve_family(path: str, override: str = "auto") -> Family:
    """The family of the checkpoint at ``path`` (resolved: a folder or a hub id): ``override`` when not
    ``auto``, else the pipeline class its model_index.json names. A checkpoint whose family cannot be
    told is a FamilyError naming the families and the fix."""
    if override != "auto":
        return family_named(override)
    index = model_index(path)
    if index is None:
        raise FamilyError(
            f"model.path = {path!r}: no model_index.json to read the model family from; fix: set "
            f"model.family to one of {_choices()}"
        )
    cls = str(index.get("_class_name", ""))
    if cls not in _BY_CLASS:
        raise FamilyError(
            f"model.path = {path!r} is a {cls or 'pipeline of unknown class'}, not a family vgrpo trains "
            f"({', '.join(f'{f.name}: {f.pipeline_class}' for f in FAMILIES.values())}); fix: set "
            "model.family if it is one of them under another pipeline class"
        )
    return _BY_CLASS[cls]


def family_of(obj: Any) -> Family:
    """The family of a loaded pipeline or transformer, by its class (or a base class) name."""
    for cls in type(obj).__mro__:
        if cls.__name__ in _BY_CLASS:
            return _BY_CLASS[cls.__name__]
    raise FamilyError(
        f"{type(obj).__name__} belongs to no known model family ({_choices()}); fix: load a "
        + ", ".join(f.pipeline_class for f in FAMILIES.values())
    )
