"""LoRA adapters on the transformer of any model family (targets: the family's unless configured), shared
by rollout workers and the learner (docs/algorithms.md §9.7).

The trainable adapter is ``default``; the learner may add a frozen ``old`` adapter (the behaviour policy
for V-GRPO's ratio, the EMA copy for DGPO / DiffusionNFT); the reference policy is the base model with
adapters disabled. Weights cross process boundaries as a flat ``{canonical name: tensor}`` dict whose
names carry no adapter key, so the same payload loads into ``default`` on a rollout worker and into
``old`` on the learner.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from vgrpo.proto.config import LoraConfig

TRAIN_ADAPTER = "default"
OLD_ADAPTER = "old"


def add_lora(
    transformer: Any, cfg: LoraConfig, adapters: tuple[str, ...] = (TRAIN_ADAPTER,), seed: int = 0
) -> None:
    """Add LoRA adapters (peft, through diffusers' ``add_adapter``); only ``default`` is trainable.

    Every adapter starts from the same initialisation (seeded), so with B = 0 (gaussian / default init)
    the adapted model equals the base model at version 0 on every process."""
    from peft import LoraConfig as PeftLoraConfig

    # peft matches a target to a module whose dotted name is it or ends with "." + it; a target that
    # matches no linear layer would train nothing (or fail deep inside peft): name it now
    from vgrpo.core.families import family_of

    targets = list(cfg.target_modules or family_of(transformer).lora_targets)
    linear = [name for name, m in transformer.named_modules() if isinstance(m, nn.Linear)]
    unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n in linear)]
    if unknown:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise ValueError(
            f"model.lora.target_modules names {unknown}, which match no linear layer of "
            f"{type(transformer).__name__}; fix: choose among {', '.join(leaves[:24])}"
        )
    init: Any = {"gaussian": "gaussian", "default": True, "zeros": False}[cfg.init]
    peft_cfg = PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        init_lora_weights=init,  # type: ignore[arg-type]
        target_modules=targets,
    )
    for name in adapters:
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            # peft warns "Already found a `peft_config` attribute … multiple adapters" for every adapter
            # after the first: the learner keeps its `old` copy as a second adapter on purpose
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            transformer.add_adapter(peft_cfg, adapter_name=name)
    set_active_adapter(transformer, TRAIN_ADAPTER)
    for pname, p in transformer.named_parameters():
        p.requires_grad_(f".{TRAIN_ADAPTER}." in pname and "lora_" in pname)


def _tuner_layers(model: nn.Module) -> Iterator[Any]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for m in model.modules():
        if isinstance(m, BaseTunerLayer):
            yield m


def has_lora(model: nn.Module) -> bool:
    return next(_tuner_layers(model), None) is not None


def set_active_adapter(model: nn.Module, name: str) -> None:
    """Route every LoRA layer through adapter ``name`` without touching requires_grad (peft's own
    ``set_adapter`` also flips requires_grad, which would change what the optimiser sees)."""
    for layer in _tuner_layers(model):
        layer._active_adapter = [name]


@contextmanager
def use_adapter(model: nn.Module, name: str) -> Iterator[None]:
    """Forward passes inside run through adapter ``name``; the trainable adapter is restored after."""
    set_active_adapter(model, name)
    try:
        yield
    finally:
        set_active_adapter(model, TRAIN_ADAPTER)


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """The reference policy: the base model with every adapter off."""
    layers = list(_tuner_layers(model))
    saved = [layer._disable_adapters for layer in layers]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer, was in zip(layers, saved, strict=True):
            layer._disable_adapters = was


def _canonical(name: str, adapter: str) -> str | None:
    key = f".{adapter}."
    if "lora_" not in name or key not in name:
        return None
    return name.replace(key, ".")


def adapter_params(model: nn.Module, adapter: str = TRAIN_ADAPTER) -> dict[str, nn.Parameter]:
    """{canonical name: parameter} of one adapter."""
    out = {}
    for name, p in model.named_parameters():
        canon = _canonical(name, adapter)
        if canon is not None:
            out[canon] = p
    return out


def trainable_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """What the learner trains and broadcasts: the ``default`` adapter with LoRA, else every parameter."""
    return adapter_params(model, TRAIN_ADAPTER) if has_lora(model) else dict(model.named_parameters())


@torch.no_grad()
def load_weights(model: nn.Module, state: dict[str, torch.Tensor], adapter: str = TRAIN_ADAPTER) -> None:
    """Copy a published payload into ``adapter`` (LoRA) or into the whole model (full weights). Every
    name must match and every shape agree: a partial update would mix versions."""
    params = adapter_params(model, adapter) if has_lora(model) else dict(model.named_parameters())
    missing = sorted(set(params) - set(state))
    extra = sorted(set(state) - set(params))
    if missing or extra:
        raise ValueError(
            f"weight update does not match the model: {len(missing)} missing (e.g. {missing[:2]}), "
            f"{len(extra)} unexpected (e.g. {extra[:2]})"
        )
    for name, p in params.items():
        src = state[name]
        if tuple(src.shape) != tuple(p.shape):
            raise ValueError(f"weight update {name}: shape {tuple(src.shape)} != model {tuple(p.shape)}")
    for name, p in params.items():
        p.copy_(state[name].to(device=p.device, dtype=p.dtype))
