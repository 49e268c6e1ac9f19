"""The rewards beside GenEval, PickScore and OCR: JPEG (in)compressibility, CLIPScore and the LAION
aesthetic predictor on a tiny CLIP built from config (weights in the upstream layout, loaded through the
same functions as real ones), and the VLM judge against a real HTTP server on 127.0.0.1 speaking the
chat-completions protocol."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from vgrpo.reward_servers.registry import get_reward


def _images(n: int = 4, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    flat = np.full((32, 32, 3), 128, np.uint8)
    noisy = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    return [flat if i % 2 == 0 else noisy for i in range(n)]


def test_jpeg_rewards_follow_ddpo():
    images = _images()
    sizes = []
    for im in images:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="JPEG", quality=95)
        sizes.append(buf.tell() / 1000)  # upstream's computation, written out
    comp = get_reward("jpeg_compressibility").score(images, [""] * 4)
    inc = get_reward("jpeg_incompressibility").score(images, [""] * 4)
    assert [c.value for c in comp] == pytest.approx([-s / 500 for s in sizes])
    assert [c.value for c in inc] == pytest.approx(sizes)
    assert comp[0].value > comp[1].value  # the flat image compresses better
    with pytest.raises(ValueError, match="scale"):
        get_reward("jpeg_compressibility", {"scale": 0})


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vgrpo.tiny_rewards import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("clip"))


def test_clipscore_is_w_times_the_clipped_cosine(clip_dir: Path):
    from transformers import CLIPModel, CLIPProcessor

    reward = get_reward("clipscore", {"model_path": str(clip_dir), "device": "cpu"})
    images, prompts = _images(), ["a photo of a red circle", "a photo of two squares"] * 2
    got = reward.score(images, prompts)
    model, proc = CLIPModel.from_pretrained(clip_dir), CLIPProcessor.from_pretrained(clip_dir)
    with torch.no_grad():  # an independent computation through CLIP's own feature methods
        inputs = proc(text=prompts, images=images, return_tensors="pt", padding=True)
        out = model(**inputs)
        cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds, dim=-1)
    assert [g.details["cos"] for g in got] == pytest.approx(cos.tolist(), abs=1e-5)
    assert [g.value for g in got] == pytest.approx([2.5 * max(c, 0.0) for c in cos.tolist()], abs=1e-5)


def test_aesthetic_loads_the_upstream_mlp_layout_safely(clip_dir: Path, tmp_path: Path):
    from transformers import CLIPModel, CLIPProcessor

    from vgrpo.reward_servers.clip_rewards import aesthetic_mlp

    dim = CLIPModel.from_pretrained(clip_dir).config.projection_dim
    torch.manual_seed(0)
    mlp = aesthetic_mlp()
    mlp[0] = torch.nn.Linear(dim, 1024)
    pth = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save({f"layers.{k}": v for k, v in mlp.state_dict().items()}, pth)  # upstream's key layout
    reward = get_reward("aesthetic", {"mlp_path": str(pth), "clip_path": str(clip_dir), "device": "cpu"})
    images = _images()
    got = [g.value for g in reward.score(images, [""] * 4)]
    model, proc = CLIPModel.from_pretrained(clip_dir), CLIPProcessor.from_pretrained(clip_dir)
    with torch.no_grad():  # upstream's AestheticScorer.__call__, written out
        embed = model(**proc(text=[""] * 4, images=images, return_tensors="pt", padding=True)).image_embeds
        embed = embed / torch.linalg.vector_norm(embed, dim=-1, keepdim=True)
        want = mlp.eval()(embed).squeeze(1)
    assert got == pytest.approx(want.tolist(), abs=1e-5)
    with pytest.raises(FileNotFoundError, match="mlp_path is not set"):
        get_reward("aesthetic", {"clip_path": str(clip_dir)})
    bad = tmp_path / "evil.pth"

    class Boom:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "ran",))

    torch.save({"layers.0.weight": Boom()}, bad)
    with pytest.raises(ValueError, match="not a state dict of tensors"):
        get_reward("aesthetic", {"mlp_path": str(bad), "clip_path": str(clip_dir)})
    assert not (tmp_path / "ran").exists()


class _Judge(BaseHTTPRequestHandler):
    """A chat-completions server: 'good' captions get 'Final Score: 4', 'garbled' an answer without a
    score, 'flaky' a 500 on its first request, 'slow' an answer after 3 s."""

    seen: dict[str, int] = {}
    active = 0
    peak = 0
    lock = threading.Lock()

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        content = body["messages"][0]["content"]
        image_url = next(c["image_url"]["url"] for c in content if c["type"] == "image_url")
        text = next(c["text"] for c in content if c["type"] == "text")
        assert self.path == "/v1/chat/completions" and body["temperature"] == 0
        Image.open(io.BytesIO(base64.b64decode(image_url.split(",", 1)[1]))).load()  # a real PNG
        with _Judge.lock:
            _Judge.active += 1
            _Judge.peak = max(_Judge.peak, _Judge.active)
            n = _Judge.seen[text] = _Judge.seen.get(text, 0) + 1
        try:
            time.sleep(0.05)
            if "flaky" in text and n == 1:
                self.send_response(500)
                self.end_headers()
                return
            if "slow" in text:
                time.sleep(3)
            answer = "hmm, hard to say" if "garbled" in text else "The image fits.\nFinal Score: 4"
            reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)
        finally:
            with _Judge.lock:
                _Judge.active -= 1


def test_the_vlm_judge_scores_retries_bounds_and_names_failures():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}/v1"
        reward = get_reward(
            "vlm_judge",
            {"endpoint": endpoint, "timeout_s": 1.0, "retries": 1, "max_concurrency": 2, "image_size": 64},
        )
        prompts = ["good 1", "good 2", "good 3", "garbled", "flaky", "slow"]
        got = reward.score(_images(6), prompts)
        for g in got[:3]:
            assert g.value == pytest.approx((4 - 1) / (5 - 1)) and g.details["raw"] == 4.0
        assert got[3].value is None and "no score" in str(got[3].error)
        assert got[4].value == pytest.approx(0.75)  # retried after its 500
        assert got[5].value is None and "after 2 attempts" in str(got[5].error)
        assert _Judge.peak <= 2  # max_concurrency
    finally:
        server.shutdown()
    with pytest.raises(ValueError, match="endpoint"):
        get_reward("vlm_judge", {"endpoint": "127.0.0.1:8000"})
    with pytest.raises(ValueError, match="prompt"):
        get_reward("vlm_judge", {"rubric": "no placeholder"})


def test_vgrpo_score_ranks_jpeg_compressibility_and_takes_options(tmp_path: Path):
    """The issue's acceptance case: a flat grey PNG above a smooth gradient above uniform noise for
    jpeg_compressibility, the other way for jpeg_incompressibility; --set reaches the reward's options."""
    from typer.testing import CliRunner

    from vgrpo.cli import app

    side = 64
    ramp = np.tile(np.linspace(0, 255, side, dtype=np.float64), (side, 1))
    images = {
        "flat.png": np.full((side, side, 3), 128, np.uint8),
        "gradient.png": np.stack([ramp] * 3, axis=-1).round().astype(np.uint8),
        "noise.png": np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8),
    }
    for name, im in images.items():
        Image.fromarray(im).save(tmp_path / name)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"image": n, "prompt": ""}) + "\n" for n in images))
    for reward, order in (("jpeg_compressibility", [0, 1, 2]), ("jpeg_incompressibility", [2, 1, 0])):
        out = tmp_path / f"{reward}.jsonl"
        r = CliRunner().invoke(
            app, ["score", "--reward", reward, "--manifest", str(manifest), "--out", str(out)]
        )
        assert r.exit_code == 0, r.output
        scores = [json.loads(x)["score"] for x in out.read_text().splitlines()]
        assert sorted(range(3), key=lambda i: -scores[i]) == order, scores
    out = tmp_path / "scaled.jsonl"
    r = CliRunner().invoke(
        app,
        ["score", "--reward", "jpeg_incompressibility", "--manifest", str(manifest), "--out", str(out),
         "--set", "reward.servers.jpeg_incompressibility.options.scale=1000"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    from vgrpo.reward_servers.jpeg import jpeg_kb

    rows = [json.loads(x) for x in out.read_text().splitlines()]
    want = jpeg_kb(np.asarray(Image.open(tmp_path / "noise.png").convert("RGB"))) / 1000
    assert rows[2]["rewards"]["jpeg_incompressibility"] == pytest.approx(want)


def test_a_reward_server_can_have_its_own_runtime_env():
    from vgrpo.proto.config import ConfigError, load_config
    from vgrpo.reward_servers.serve import _deployment_options

    cfg = load_config(
        None,
        [
            "reward.servers.geneval.runtime_env={pip: [mmdet==3.3.0], env_vars: {OMP_NUM_THREADS: '1'}}",
            "reward.servers.geneval.gpus=0.25",
        ],
    )
    opts = _deployment_options("geneval", cfg.reward.server("geneval"))
    assert opts["ray_actor_options"]["runtime_env"] == {
        "pip": ["mmdet==3.3.0"],
        "env_vars": {"OMP_NUM_THREADS": "1"},
    }
    assert opts["ray_actor_options"]["num_gpus"] == 0.25
    with pytest.raises(ConfigError, match="runtime_env keys"):
        load_config(None, ["reward.servers.geneval.runtime_env={pipx: [a]}"])
