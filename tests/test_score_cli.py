"""`vgrpo score` (DESIGN.md "What a user touches"): per-line results and errors, every input field carried
back, exit 0 when every line was handled and non-zero only when nothing could be."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from vgrpo.reward_servers.shapes.spec import Scene, SceneObject
from vgrpo.shapes.render import render_scene


def vgrpo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vgrpo.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_score_manifest_with_a_missing_image(tmp_path: Path) -> None:
    scene = Scene([SceneObject("circle", "red", 18, 40, 21), SceneObject("square", "blue", 46, 20, 16)])
    Image.fromarray(render_scene(scene)).save(tmp_path / "a.png")
    big = np.asarray(Image.fromarray(render_scene(scene)).resize((512, 512), Image.Resampling.NEAREST))
    (tmp_path / "imgs").mkdir()
    Image.fromarray(big).save(tmp_path / "imgs" / "big.png")
    rows = [
        {"image": "a.png", "prompt": "a photo of a circle left of a square", "id": 1},
        {"image": "imgs/big.png", "prompt": "a photo of a green circle", "id": 2, "extra": {"k": [1]}},
        {"image": "missing.png", "prompt": "a photo of a circle", "id": 3},
        {"image": "a.png", "prompt": "a photo of a hexagon", "id": 4},
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n{not json\n")
    out = tmp_path / "out" / "o.jsonl"
    res = vgrpo("score", "--reward", "shapes", "--manifest", str(manifest), "--out", str(out))
    assert res.returncode == 0, res.stderr
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(got) == 5
    for want, line in zip(rows, got[:4], strict=True):
        assert {k: line[k] for k in want} == want  # every input field carried back, in input order
    assert got[0]["rewards"] == {"shapes": 1.0} and got[0]["score"] == 1.0
    assert got[1]["rewards"]["shapes"] == 0.5 and got[1]["score"] == 0.5  # a circle, but red
    assert "error" not in got[0] and "error" not in got[1]
    assert "missing.png" in got[2]["error"] and "rewards" not in got[2]
    assert "hexagon" in got[3]["error"]
    assert "not JSON" in got[4]["error"]
    clauses = got[1]["details"]["shapes"]["clauses"]
    assert [c["passed"] for c in clauses] == [True, False] and "red" in clauses[1]["why"]


def test_score_writes_stdout_and_refuses_unknown_rewards(tmp_path: Path) -> None:
    Image.fromarray(render_scene(Scene([SceneObject("ring", "white", 32, 32, 20)]))).save(tmp_path / "r.png")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"image": "r.png", "prompt": "a photo of a white ring"}) + "\n")
    res = vgrpo("score", "--reward", "shapes", "--manifest", str(manifest))
    assert res.returncode == 0 and json.loads(res.stdout)["score"] == 1.0
    res = vgrpo("score", "--reward", "shapes,no_such_reward", "--manifest", str(manifest))
    assert res.returncode != 0 and "no_such_reward" in res.stderr and "shapes" in res.stderr
    assert "Traceback" not in res.stderr
    res = vgrpo("score", "--reward", "shapes", "--manifest", str(tmp_path / "nope.jsonl"))
    assert res.returncode != 0 and "nope.jsonl" in res.stderr and "Traceback" not in res.stderr


def test_weights_and_plugin_rewards(tmp_path: Path) -> None:
    from vgrpo.reward_servers.base import Reward, ScoredItem
    from vgrpo.reward_servers.registry import _REGISTERED, register_reward
    from vgrpo.score import score_manifest

    class Half(Reward):
        name = "half"

        def score(self, images, prompts, metadata=None):
            return [ScoredItem(0.5) for _ in images]

    Image.fromarray(render_scene(Scene([SceneObject("cross", "green", 30, 30, 18)]))).save(tmp_path / "c.png")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"image": "c.png", "prompt": "a photo of a red cross"}) + "\n")
    register_reward("half", lambda options: Half())
    try:
        out = tmp_path / "o.jsonl"
        assert score_manifest(["shapes", "half"], manifest, out, {"shapes": 2.0, "half": -1.0}) == 0
        row = json.loads(out.read_text())
        assert row["rewards"] == {"shapes": 0.5, "half": 0.5} and row["score"] == 2.0 * 0.5 - 0.5
        assert score_manifest(["shapes"], manifest, out, {"nope": 1.0}) == 2
    finally:
        _REGISTERED.pop("half")
