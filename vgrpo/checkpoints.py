"""Reading a run directory's policies: the starting policy (step 0) or a checkpoint's weights, loaded into
a diffusers pipeline for evaluation and export."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from vgrpo.proto.config import RunConfig, load_config


class RunDirError(ValueError):
    """A run directory or step that cannot be read; the message names the path and the fix."""


def run_config(run_dir: Path) -> RunConfig:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise RunDirError(
            f"{path} does not exist; fix: --run-dir must be a directory written by `vgrpo train`"
        )
    return load_config(path)


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps with a complete checkpoint (its driver_state.json written last), ascending."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    steps = []
    for p in folder.iterdir():
        m = re.fullmatch(r"step_(\d+)", p.name)
        if m and (p / "policy.safetensors").is_file() and (p / "driver_state.json").is_file():
            steps.append(int(m.group(1)))
    return sorted(steps)


def policy_weights(
    run_dir: Path, step: int | None, ema: bool = True
) -> tuple[int, dict[str, torch.Tensor] | None]:
    """(step, trainable weights) of ``step`` (None: the last checkpoint; 0: the starting policy -> None).
    A run with ``train.ema`` saves the EMA of the policy beside it (``ema.safetensors``): that is the
    policy evaluated and exported (as Flow-GRPO and DiffusionNFT do), unless ``ema=False``."""
    from safetensors.torch import load_file

    if step == 0:
        return 0, None
    steps = checkpoint_steps(run_dir)
    if not steps:
        raise RunDirError(
            f"{run_dir} has no complete checkpoint; fix: --step 0 evaluates the starting policy"
        )
    if step is None:
        step = steps[-1]
    if step not in steps:
        raise RunDirError(
            f"{run_dir} has no checkpoint of step {step}; available: {steps} (and 0, the start)"
        )
    folder = run_dir / "checkpoints" / f"step_{step}"
    if ema and (folder / "ema.safetensors").is_file():
        return step, load_file(str(folder / "ema.safetensors"))
    return step, load_file(str(folder / "policy.safetensors"))


def load_run_pipeline(run_dir: Path, step: int | None, device: str = "cpu") -> tuple[Any, RunConfig, int]:
    """The run's pipeline with the policy of ``step`` in it (LoRA added and loaded, or full weights)."""
    from vgrpo.core.adapters import add_lora, load_weights
    from vgrpo.core.policy import load_pipeline

    cfg = run_config(run_dir)
    step, weights = policy_weights(run_dir, step)
    pipe: Any = load_pipeline(cfg.model.path, dtype=torch.float32, device=device)
    if cfg.model.lora is not None:
        add_lora(pipe.transformer, cfg.model.lora, seed=cfg.train.seed)
    if weights is not None:
        load_weights(pipe.transformer, weights)
    pipe.transformer.requires_grad_(False)
    return pipe, cfg, step


def export_policy(run_dir: Path, step: int | None, out: Path, merge: bool = False) -> tuple[int, str]:
    """Write the policy of ``step`` for diffusers users: LoRA weights that ``pipe.load_lora_weights(out)``
    loads, or with ``merge`` (or a full-weight run) a whole pipeline for ``from_pretrained(out)``.
    Returns (step, kind)."""
    from peft.utils import get_peft_model_state_dict

    pipe, cfg, step = load_run_pipeline(run_dir, step)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.model.lora is not None and not merge:
        state = get_peft_model_state_dict(pipe.transformer, adapter_name="default")
        # the adapter's own config (rank, alpha, targets) travels in the file's metadata: without it
        # diffusers would assume alpha = rank and scale the update differently than it was trained
        meta = pipe.transformer.peft_config["default"].to_dict()
        meta = {k: (sorted(v) if isinstance(v, set) else v) for k, v in meta.items()}
        type(pipe).save_lora_weights(
            str(out), transformer_lora_layers=state, transformer_lora_adapter_metadata=meta
        )
        return step, "lora"
    if cfg.model.lora is not None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in pipe.transformer.modules():
            if isinstance(module, BaseTunerLayer):
                module.merge(adapter_names=["default"])
        pipe.transformer.unload_lora()  # replace each LoRA wrapper by its (now merged) base layer
    pipe.save_pretrained(str(out))
    return step, "pipeline"
