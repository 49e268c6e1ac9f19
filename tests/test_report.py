"""report.html is built from a run directory alone, is self-contained, and shows every curve it can.

The run directory is written by the test with the driver's own writers (RunDir, image_grid, the resolved
default config) and real PNG grids, so the report reads exactly the formats a run writes; the
observability check additionally builds it from a real `vgrpo train`.
"""

from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vgrpo.proto.config import load_config
from vgrpo.report import read_metrics, write_report
from vgrpo.run_dir import RunDir, image_grid

PROMPTS = ["a photo of a red circle", "a photo of two blue squares", "a photo of a ring left of a cross"]
G = 4


def fake_row(step: int) -> dict:
    """A metrics.jsonl row with the keys Trainer.train_step writes (values shaped like a real run's)."""
    reward = 0.2 + 0.1 * step
    return {
        "step": step,
        "policy_version": step,
        "reward_mean": reward,
        "reward_std": 0.05 + 0.01 * step,
        "loss": 0.02 / step,
        "staleness": step % 2,
        "images_per_s": 10.0 + step,
        "time/rollout": 0.4,
        "time/reward": 0.2,
        "time/learner": 1.5 - 0.1 * step,
        "time/weight_sync": 0.03,
        "time/step": 2.2,
        "time/sample_compute": 0.6,
        "grad_norm": 0.001 * step,
        "lr": 3e-4,
        "weight_sync_bytes": 380928,
        "reward_retries": 0,
        "adv/zero_std_frac": 0.25,
        "reward/shapes": reward,
        "learner/clip_frac": 0.1,
        "learner/kl": 0.001 * step,
    }


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    run = RunDir(tmp_path / "run")
    run.write_config(load_config(None, ["train.steps=5"]))
    rng = np.random.default_rng(0)
    for step in range(1, 6):
        row = fake_row(step)
        if step == 5:
            row.update({"eval/overall": 0.4, "eval/counting": 0.3, "eval/colors": 0.5})
        run.append_metrics(row)
        if step in (2, 5):  # samples_every-style: two sample folders
            images = rng.integers(0, 256, size=(len(PROMPTS) * G, 64, 64, 3), dtype=np.uint8)
            folder = run.samples / f"step_{step}"
            folder.mkdir(parents=True)
            Image.fromarray(image_grid(images, columns=G)).save(folder / "grid.png")
            rows = [{"prompt": p, "rewards": [round(0.25 * j, 4) for j in range(G)]} for p in PROMPTS]
            (folder / "samples.json").write_text(json.dumps(rows))
    with run.metrics_path.open("a") as f:  # a run killed mid-write leaves a torn last line
        f.write('{"step": 6, "reward_m')
    return run.root


def test_report_is_self_contained_with_every_chart_and_the_samples(run_dir: Path):
    path = write_report(run_dir)
    assert path == run_dir / "report.html"
    text = path.read_text()
    assert path.stat().st_size > 20 * 1024

    # every curve of the run's keys, each an inline SVG with data drawn in it
    for chart in (
        "chart-reward",
        "chart-rewards",
        "chart-eval",
        "chart-loss",
        "chart-grad-norm",
        "chart-throughput",
        "chart-phases",
        "chart-staleness",
        "chart-weight-sync",
        "chart-learner",
    ):
        m = re.search(rf"<figure class='chart' id='{chart}'>(.*?)</figure>", text, re.S)
        assert m, f"{chart} missing"
        drawn = ("<polyline", "<rect", "<circle")  # a 1-point curve (one eval) is a marker
        assert "<svg" in m.group(1) and any(d in m.group(1) for d in drawn), chart
    # the phase breakdown stacks the four phases of every step: 5 steps x 4 phases
    phases = re.search(r"id='chart-phases'>(.*?)</figure>", text, re.S)
    assert phases is not None and phases.group(1).count("<rect") == 5 * 4

    # nothing a browser would fetch: no remote URL at all, no external script/style
    assert "http://" not in text and "https://" not in text
    assert not re.search(r"""(src|href)\s*=\s*['"](?!data:|#)""", text)
    assert "<script" not in text and "@import" not in text

    # the sample grids are embedded byte for byte, with their prompts and rewards
    uris = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", text)
    assert len(uris) == 2
    assert base64.b64decode(uris[-1]) == (run_dir / "samples" / "step_5" / "grid.png").read_bytes()
    for p in PROMPTS:
        assert p in text
    assert "id='samples-step-2'" in text and "id='samples-step-5'" in text
    assert "0.00 0.25 0.50 0.75" in text  # per-image rewards

    # the resolved config, and the summary from the rows (the torn line is skipped, not fatal)
    assert "train_prompts:" in text and "max_staleness:" in text
    assert "0.3000 → 0.7000" in text


def test_report_of_a_run_that_has_not_logged_yet(tmp_path: Path):
    run = RunDir(tmp_path / "fresh")
    run.write_config(load_config(None, []))
    text = write_report(run.root).read_text()
    assert "no metrics yet" in text and "no sample grids" in text


def test_read_metrics_keeps_the_last_row_of_a_rewritten_step(tmp_path: Path):
    run = RunDir(tmp_path / "r")
    for step, loss in ((1, 1.0), (2, 2.0), (2, 3.0)):  # a resumed run re-logs step 2
        run.append_metrics({"step": step, "loss": loss})
    rows = read_metrics(run.root)
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["loss"] == 3.0
    assert all(math.isfinite(r["loss"]) for r in rows)
