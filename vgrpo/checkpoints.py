"""Reading a run directory's policies: the starting policy (step 0) or a checkpoint's weights, loaded into
a diffusers pipeline for evaluation and export."""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
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


MANIFEST = "manifest.json"  # written last into a checkpoint: every file's size and sha256


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    """Record every file of a checkpoint folder (size, sha256) in ``manifest.json``, written last and
    atomically: a checkpoint is complete exactly when its manifest says so."""
    files = {
        str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp")
    }
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"format": 1, "files": files}, indent=1))
    os.replace(tmp, folder / MANIFEST)


def checkpoint_problem(folder: Path, hashes: bool = False) -> str | None:
    """Why the checkpoint ``folder`` cannot be used (None: it can): no manifest or driver state, a file
    missing, of another size, or (``hashes``) with other contents than its manifest records. A folder
    written before manifests existed is judged by its driver_state.json and policy.safetensors."""
    for name in ("driver_state.json", "policy.safetensors"):
        if not (folder / name).is_file():
            return f"{name} is missing"
    try:
        json.loads((folder / "driver_state.json").read_text())
    except (ValueError, OSError) as e:
        return f"driver_state.json is unreadable ({e})"
    path = folder / MANIFEST
    if not path.is_file():
        return None if not any(folder.glob("*.tmp")) else "it was being written (a .tmp file is left)"
    try:
        files = json.loads(path.read_text())["files"]
    except (ValueError, KeyError, OSError) as e:
        return f"{MANIFEST} is unreadable ({e})"
    for rel, want in files.items():
        f = folder / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != want["bytes"]:
            return f"{rel} has {f.stat().st_size} bytes, its manifest {want['bytes']} (truncated?)"
        if hashes and _sha256(f) != want["sha256"]:
            return f"{rel} does not match its manifest's sha256 (changed or corrupt)"
    return None


def checkpoint_folders(checkpoints: Path) -> list[tuple[int, Path]]:
    """``step_N`` folders of a run, ascending by step (complete or not)."""
    if not checkpoints.is_dir():
        return []
    out = []
    for p in checkpoints.iterdir():
        m = re.fullmatch(r"step_(\d+)", p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def newest_usable(checkpoints: Path, log: Any = None) -> tuple[int, Path] | None:
    """The newest checkpoint whose every file matches its manifest (sha256 checked); each newer one
    skipped is named with the reason (``log``: a logger, else ``warnings``)."""
    for step, path in reversed(checkpoint_folders(checkpoints)):
        problem = checkpoint_problem(path, hashes=True)
        if problem is None:
            return step, path
        message = f"skipping checkpoint step {step} ({path}): {problem}"
        if log is not None:
            log.warning(message)
        else:
            warnings.warn(message, stacklevel=2)
    return None


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps with a complete checkpoint (every file as its manifest records, by size), ascending."""
    return [
        step for step, path in checkpoint_folders(run_dir / "checkpoints") if checkpoint_problem(path) is None
    ]


def policy_weights(
    run_dir: Path, step: int | None, ema: bool = True
) -> tuple[int, dict[str, torch.Tensor] | None]:
    """(step, trainable weights) of ``step`` (None: the last checkpoint; 0: the starting policy -> None).
    A run with ``train.ema`` saves the EMA of the policy beside it (``ema.safetensors``): that is the
    policy evaluated and exported (as Flow-GRPO and DiffusionNFT do), unless ``ema=False``."""
    from safetensors.torch import load_file

    if step == 0:
        return 0, None
    if step is None:
        found = newest_usable(run_dir / "checkpoints")  # the newest whose files match their manifest
        if found is None:
            raise RunDirError(
                f"{run_dir} has no complete checkpoint; fix: --step 0 evaluates the starting policy"
            )
        step, folder = found
    else:
        folder = run_dir / "checkpoints" / f"step_{step}"
        problem = checkpoint_problem(folder, hashes=True) if folder.is_dir() else "it does not exist"
        if problem is not None:
            raise RunDirError(
                f"{run_dir}: checkpoint step {step} cannot be used ({problem}); complete ones: "
                f"{checkpoint_steps(run_dir)} (and 0, the start)"
            )
    path = folder / "ema.safetensors" if ema and (folder / "ema.safetensors").is_file() else None
    path = path or folder / "policy.safetensors"
    try:
        return step, load_file(str(path))  # safetensors: reading it runs no code
    except Exception as e:  # safetensors' own error types: a truncated or foreign file
        raise RunDirError(f"{path} is not a readable safetensors file ({e})") from None


def load_run_pipeline(run_dir: Path, step: int | None, device: str = "cpu") -> tuple[Any, RunConfig, int]:
    """The run's pipeline with the policy of ``step`` in it (LoRA added and loaded, or full weights)."""
    from vgrpo.core.adapters import add_lora, load_weights
    from vgrpo.core.policy import load_pipeline

    cfg = run_config(run_dir)
    step, weights = policy_weights(run_dir, step)
    pipe: Any = load_pipeline(cfg.model.path, dtype=torch.float32, device=device, family=cfg.model.family)
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
