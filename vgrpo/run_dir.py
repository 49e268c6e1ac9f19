"""The run directory (docs/training.md "The run directory"): config.yaml, metrics.jsonl, checkpoints/,
samples/, tb/, report.html (`RunDir`), and writing / restoring checkpoints and sample grids
(`Checkpointing`, a mixin of ``Trainer``)."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from vgrpo.checkpoints import checkpoint_folders, checkpoint_problem, newest_usable, write_manifest
from vgrpo.proto.config import RunConfig, dump_config, identity
from vgrpo.proto.messages import WeightUpdate
from vgrpo.roles import Roles, TrainingError

log = logging.getLogger("vgrpo")


class RunDir:
    """The run directory of DESIGN.md: config.yaml, metrics.jsonl, checkpoints/, samples/, tb/, report.html."""

    def __init__(self, root: Path):
        self.root = root
        self.checkpoints = root / "checkpoints"
        self.samples = root / "samples"
        root.mkdir(parents=True, exist_ok=True)
        self.checkpoints.mkdir(exist_ok=True)
        self.samples.mkdir(exist_ok=True)
        self.metrics_path = root / "metrics.jsonl"

    def holds_a_run(self) -> str | None:
        """What shows that a run was made here (None for a fresh or empty directory)."""
        if self.metrics_path.is_file() and self.metrics_path.stat().st_size > 0:
            n = sum(1 for line in self.metrics_path.read_text().splitlines() if line.strip())
            return f"metrics.jsonl has {n} step(s)"
        steps = sorted(p.name for p in self.checkpoints.iterdir() if p.name.startswith(("step_", ".step_")))
        if steps:
            return f"checkpoints/ holds {', '.join(steps[:3])}"
        return None

    def clear(self) -> None:
        """Delete what a run wrote here (``--overwrite``), keeping the directory itself."""
        for name in ("metrics.jsonl", "capacity.jsonl", "config.yaml", "report.html"):
            (self.root / name).unlink(missing_ok=True)
        for folder in (self.checkpoints, self.samples, self.root / "tb"):
            shutil.rmtree(folder, ignore_errors=True)
        self.checkpoints.mkdir(exist_ok=True)
        self.samples.mkdir(exist_ok=True)

    def check_identity(self, cfg: RunConfig) -> None:
        """A resume whose configuration changes the run's identity (``proto.config.IDENTITY_KEYS``)
        against the newest checkpoint's record is refused, naming the key."""
        ckpts = self.checkpoint_dirs()
        if not ckpts:
            return
        step, path = ckpts[-1]
        recorded = json.loads((path / "driver_state.json").read_text()).get("identity")
        if recorded is None:  # a checkpoint written before identities were recorded
            return
        now = identity(cfg)
        for key, value in recorded.items():
            if key in now and now[key] != value:
                raise TrainingError(
                    f"--resume: {self.root / 'config.yaml'} says {key} = {now[key]!r}, but checkpoint step "
                    f"{step} was trained with {value!r}; fix: set {key} back to {value!r}, or start a new "
                    "run with another --run-dir"
                )

    def write_config(self, cfg: RunConfig) -> None:
        tmp = self.root / "config.yaml.tmp"
        tmp.write_text(dump_config(cfg))
        os.replace(tmp, self.root / "config.yaml")

    def append_metrics(self, row: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def truncate_metrics(self, last_step: int) -> None:
        """Keep metric lines of steps <= last_step only (a resumed run continues with no duplicate); a
        line that is not JSON (torn by a crash mid-write) is dropped and named."""
        if not self.metrics_path.exists():
            return
        keep = []
        for n, line in enumerate(self.metrics_path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                log.warning("metrics.jsonl line %d is not JSON (torn by a stop mid-write): dropped", n)
                continue
            if isinstance(row, dict) and row.get("step", 0) <= last_step:
                keep.append(line)
        tmp = self.metrics_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.metrics_path)

    def checkpoint_dirs(self) -> list[tuple[int, Path]]:
        """Complete checkpoints, oldest first: every file as its manifest records (by size; partial
        ones are written under a .tmp name and never match)."""
        out = []
        for step, p in checkpoint_folders(self.checkpoints):
            problem = checkpoint_problem(p)
            if problem is None:
                out.append((step, p))
            else:
                log.warning("skipping checkpoint step %d (%s): %s", step, p, problem)
        return out

    def best(self) -> dict[str, Any] | None:
        """``best.json`` (``train.keep_best``): the step with the best held-out score so far, or None."""
        path = self.root / "best.json"
        try:
            return json.loads(path.read_text()) if path.is_file() else None
        except ValueError:
            log.warning(
                "%s is not JSON (torn?): the best checkpoint is unknown until the next evaluation", path
            )
            return None

    def is_best(self, score: float | None) -> bool:
        best = self.best()
        return score is not None and (best is None or score > float(best["eval/overall"]))

    def record_best(self, step: int, score: float) -> None:
        tmp = self.root / "best.json.tmp"
        tmp.write_text(json.dumps({"step": step, "eval/overall": score}))
        os.replace(tmp, self.root / "best.json")

    def clean_orphans(self) -> None:
        """Remove ``.step_N.tmp`` folders a stopped or crashed checkpoint left behind."""
        for p in self.checkpoints.glob(".step_*.tmp"):
            log.warning("removing %s, a checkpoint that was never completed", p)
            shutil.rmtree(p, ignore_errors=True)


def frame_strips(samples: np.ndarray) -> np.ndarray:
    """Images as they are; clips ``(B, F, H, W, 3)`` as frame strips ``(B, H, F·W, 3)`` (a video family's
    samples in the sample grid and the report)."""
    if samples.ndim != 5:
        return samples
    b, f, h, w, c = samples.shape
    return samples.transpose(0, 2, 1, 3, 4).reshape(b, h, f * w, c)


def image_grid(images_bhwc: np.ndarray, columns: int) -> np.ndarray:
    """The samples in rows of ``columns`` on white (clips as frame strips)."""
    images_bhwc = frame_strips(np.asarray(images_bhwc))
    b, h, w, c = images_bhwc.shape
    rows = math.ceil(b / columns)
    grid = np.full((rows * h, columns * w, c), 255, dtype=np.uint8)
    for k in range(b):
        r, col = divmod(k, columns)
        grid[r * h : (r + 1) * h, col * w : (col + 1) * w] = images_bhwc[k]
    return grid


def non_finite(state: dict[str, Any]) -> list[str]:
    """The names of the tensors of ``state`` that hold NaN or inf."""
    import torch

    return [k for k, v in state.items() if not bool(torch.isfinite(v).all())]


class Checkpointing:
    cfg: RunConfig
    run: RunDir
    version: int
    step: int
    source: Any
    tb: Any
    _last_batch: Any

    on_workers: Callable[..., dict[int, Any]]  # RoleCalls
    on_learners: Callable[[Roles, list[Any], str, int], list[Any]]  # RoleCalls
    _publish: Callable[[int, Any], Any]  # Publishing
    current_weights: Callable[[Roles, int], Any]  # Publishing
    ema_weights: Callable[[Roles, int], Any]  # Publishing

    def save_samples(self, step: int) -> None:
        from PIL import Image

        images, prompts, rewards = self._last_batch
        g = self.cfg.rollout.group_size
        folder = self.run.samples / f"step_{step}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image_grid(images, columns=g)).save(folder / "grid.png")
        rows = [
            {"prompt": prompts[i * g], "rewards": [round(float(x), 4) for x in rewards[i * g : (i + 1) * g]]}
            for i in range(len(prompts) // g)
        ]
        (folder / "samples.json").write_text(json.dumps(rows, indent=1))
        if self.tb is not None:
            self.tb.add_image("samples", image_grid(images, columns=g), step, dataformats="HWC")

    def checkpoint(self, roles: Roles, step: int) -> Path:
        """checkpoints/step_N/: learner shards (DeepSpeed), policy.safetensors, driver_state.json. Written
        under a .tmp name, its manifest last, and renamed when complete."""
        final = self.run.checkpoints / f"step_{step}"
        weights = self.current_weights(roles, step)
        broken = non_finite(weights)
        if broken:  # never written: the previous checkpoint stays the newest, and resumable
            raise TrainingError(
                f"step {step}: {len(broken)} trained tensor(s) hold NaN or inf (e.g. {broken[0]}); not "
                "checkpointed, the last checkpoint is kept; fix: lower learner.lr or learner.grad_clip, "
                "then --resume"
            )
        tmp = self.run.checkpoints / f".step_{step}.tmp"
        try:
            self._write_checkpoint(roles, step, weights, tmp, final)
        except (OSError, TrainingError) as e:
            shutil.rmtree(tmp, ignore_errors=True)  # never a half-written checkpoint left behind
            full = (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left" in str(e)
            if not full:
                raise
            kept = self.run.checkpoint_dirs()
            where = f"step {kept[-1][0]}" if kept else "none yet"
            raise TrainingError(
                f"no space left on {self.run.checkpoints} while writing checkpoint step {step}; the last "
                f"complete checkpoint ({where}) is kept; fix: free space, then `vgrpo train --run-dir "
                f"{self.run.root} --resume`"
            ) from None
        best = self.run.best()
        keep = {step, best["step"] if best else -1}  # the best checkpoint (train.keep_best) is never deleted
        for old_step, path in self.run.checkpoint_dirs()[: -self.cfg.train.keep_checkpoints]:
            if old_step not in keep:
                shutil.rmtree(path, ignore_errors=True)
        return final

    def _write_checkpoint(self, roles: Roles, step: int, weights: Any, tmp: Path, final: Path) -> None:
        from vgrpo.learner.engine import save_policy_weights

        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        lora = self.cfg.model.lora is not None
        self.on_learners(
            roles,
            [lrn.save_checkpoint.remote(str(tmp / "learner")) for lrn in roles.learners],
            "checkpoint",
            step,
        )
        save_policy_weights(weights, tmp / "policy.safetensors", step, lora)
        if self.cfg.train.ema is not None:  # what `vgrpo eval` and `vgrpo export` use for this step
            ema = self.ema_weights(roles, step)
            save_policy_weights(ema, tmp / "ema.safetensors", step, lora)
        state = {
            "step": step,
            "version": step,
            "data": self.source.state(),
            "python_random": repr(random.getstate()),
            "time": time.time(),
            "identity": identity(self.cfg),
        }
        (tmp / "driver_state.json").write_text(json.dumps(state))
        write_manifest(tmp)  # last: the checkpoint is complete once its manifest is there
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)

    def restore(self, roles: Roles) -> int:
        self.run.clean_orphans()
        found = newest_usable(self.run.checkpoints, log)  # every file checked against its sha256
        if found is None:
            self.run.truncate_metrics(0)
            return 0
        step, path = found
        state = json.loads((path / "driver_state.json").read_text())
        self.on_learners(
            roles,
            [lrn.load_checkpoint.remote(str(path / "learner")) for lrn in roles.learners],
            "resume",
            step,
        )
        self.source.load_state(state["data"])
        import ray
        from safetensors.torch import load_file

        self.version = step
        if roles.objective.rollout_policy(step) == "current":
            state = load_file(str(path / "policy.safetensors"))
        else:  # the rollout samples with the objective's old copy, restored by the learners just now
            state = self.on_learners(
                roles, [lrn.sampling_weights.remote() for lrn in roles.learners], "resume", step
            )[0]
        weights = self._publish(step, ray.put(WeightUpdate(step, state)))
        self.on_workers(
            roles,
            {i: (lambda w: w.update_weights.remote(weights)) for i in range(len(roles.workers))},
            "resume",
            step,
            redo_elsewhere=False,
        )
        self.run.truncate_metrics(step)
        return step
