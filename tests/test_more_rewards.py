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


# --- HPSv2.1 and ImageReward: upstream checkpoint layouts, independent reference forwards ---------------


def _ln(x: torch.Tensor, sd: dict, p: str, eps: float) -> torch.Tensor:
    return torch.nn.functional.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps)


def _lin(x: torch.Tensor, sd: dict, p: str) -> torch.Tensor:
    return torch.nn.functional.linear(x, sd[p + ".weight"], sd[p + ".bias"])


def _open_clip_block(
    x: torch.Tensor, sd: dict, p: str, heads: int, mask: torch.Tensor | None
) -> torch.Tensor:
    """open_clip's ResidualAttentionBlock: nn.MultiheadAttention on the packed in_proj, GELU MLP."""
    width = x.shape[-1]
    attn = torch.nn.MultiheadAttention(width, heads, batch_first=True)
    attn.load_state_dict(
        {
            "in_proj_weight": sd[p + "attn.in_proj_weight"],
            "in_proj_bias": sd[p + "attn.in_proj_bias"],
            "out_proj.weight": sd[p + "attn.out_proj.weight"],
            "out_proj.bias": sd[p + "attn.out_proj.bias"],
        }
    )
    h = _ln(x, sd, p + "ln_1", 1e-5)
    x = x + attn(h, h, h, need_weights=False, attn_mask=mask)[0]
    h = _lin(
        torch.nn.functional.gelu(_lin(_ln(x, sd, p + "ln_2", 1e-5), sd, p + "mlp.c_fc")), sd, p + "mlp.c_proj"
    )
    return x + h


def _open_clip_random(width: int, layers: int, vocab: int, image: int, patch: int, embed: int) -> dict:
    """A random open_clip CLIP state dict in upstream's key layout (HPS_v2.1_compressed.pt's)."""
    g = torch.Generator().manual_seed(0)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.2

    sd = {
        "token_embedding.weight": r(vocab, width),
        "positional_embedding": r(77, width),
        "logit_scale": torch.tensor(4.6),
    }
    sd["text_projection"], sd["visual.proj"] = r(width, embed), r(width, embed)
    sd["visual.class_embedding"] = r(width)
    sd["visual.positional_embedding"] = r((image // patch) ** 2 + 1, width)
    sd["visual.conv1.weight"] = r(width, 3, patch, patch)
    for ln in ("ln_final", "visual.ln_pre", "visual.ln_post"):
        sd[ln + ".weight"], sd[ln + ".bias"] = 1 + r(width), r(width)
    for tower in ("transformer", "visual.transformer"):
        for i in range(layers):
            p = f"{tower}.resblocks.{i}."
            sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"] = r(3 * width, width), r(3 * width)
            sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"] = r(width, width), r(width)
            sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"] = r(4 * width, width), r(4 * width)
            sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"] = r(width, 4 * width), r(width)
            for ln in ("ln_1", "ln_2"):
                sd[p + ln + ".weight"], sd[p + ln + ".bias"] = 1 + r(width), r(width)
    return sd


def test_hpsv2_loads_upstreams_open_clip_checkpoint_and_scores_as_upstream(tmp_path: Path):
    from PIL import Image
    from transformers import AutoTokenizer, CLIPConfig

    from vgrpo.tiny_rewards import TOKENIZER

    width, heads, layers, image, patch, embed = 32, 2, 2, 28, 14, 16
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    act = {"hidden_act": "gelu", "hidden_size": width, "intermediate_size": 4 * width}
    act |= {"num_hidden_layers": layers, "num_attention_heads": heads}
    text = dict(act, vocab_size=len(tok), max_position_embeddings=77, eos_token_id=tok.eos_token_id)
    CLIPConfig(text_config=text, vision_config=dict(act, image_size=image, patch_size=patch), projection_dim=embed).save_pretrained(tmp_path / "clip")  # fmt: skip
    tok.save_pretrained(tmp_path / "clip")
    sd = _open_clip_random(width, layers, len(tok), image, patch, embed)
    torch.save({"state_dict": sd, "epoch": 1}, tmp_path / "HPS_v2.1_compressed.pt")
    reward = get_reward(
        "hpsv2", {"checkpoint": str(tmp_path / "HPS_v2.1_compressed.pt"), "clip_path": str(tmp_path / "clip")}
    )
    rng = np.random.default_rng(1)
    images = [
        rng.integers(0, 256, (40, 24, 3), dtype=np.uint8),
        rng.integers(0, 256, (28, 28, 3), dtype=np.uint8),
    ]
    prompts = ["a photo of a red circle", "two blue squares"]
    got = [g.value for g in reward.score(images, prompts)]

    def pixels(im: np.ndarray) -> torch.Tensor:  # upstream's ResizeMaxSize + zero pad + Normalize
        h, w = im.shape[:2]
        s = image / max(h, w)
        nh, nw = round(h * s), round(w * s)
        x = np.asarray(Image.fromarray(im).resize((nw, nh), Image.Resampling.BICUBIC), np.float32) / 255
        t = torch.nn.functional.pad(torch.from_numpy(x).permute(2, 0, 1), ((image - nw) // 2, image - nw - (image - nw) // 2, (image - nh) // 2, image - nh - (image - nh) // 2))  # fmt: skip
        m, sdv = (
            torch.tensor([0.48145466, 0.4578275, 0.40821073]),
            torch.tensor([0.26862954, 0.26130258, 0.27577711]),
        )
        return (t - m.view(3, 1, 1)) / sdv.view(3, 1, 1)

    with torch.no_grad():  # open_clip's CLIP.encode_image / encode_text, written out
        x = torch.nn.functional.conv2d(
            torch.stack([pixels(im) for im in images]), sd["visual.conv1.weight"], stride=patch
        )
        x = x.flatten(2).transpose(1, 2)
        x = (
            torch.cat([sd["visual.class_embedding"].expand(len(images), 1, width), x], 1)
            + sd["visual.positional_embedding"]
        )
        x = _ln(x, sd, "visual.ln_pre", 1e-5)
        for i in range(layers):
            x = _open_clip_block(x, sd, f"visual.transformer.resblocks.{i}.", heads, None)
        img = _ln(x[:, 0], sd, "visual.ln_post", 1e-5) @ sd["visual.proj"]
        ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")[
            "input_ids"
        ]
        t = sd["token_embedding.weight"][ids] + sd["positional_embedding"]
        causal = torch.full((77, 77), float("-inf")).triu(1)
        for i in range(layers):
            t = _open_clip_block(t, sd, f"transformer.resblocks.{i}.", heads, causal)
        t = _ln(t, sd, "ln_final", 1e-5)[torch.arange(len(prompts)), ids.argmax(-1)] @ sd["text_projection"]
        want = (torch.nn.functional.normalize(img, dim=-1) * torch.nn.functional.normalize(t, dim=-1)).sum(-1)
    assert got == pytest.approx(want.tolist(), abs=1e-5)
    assert len(set(got)) == 2
    with pytest.raises(FileNotFoundError, match=r"hpsv2\.options\.checkpoint.*HPS_v2\.1_compressed\.pt"):
        get_reward("hpsv2", {"clip_path": str(tmp_path / "clip")})
    del sd["visual.proj"]
    torch.save({"state_dict": sd}, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match="not an HPSv2"):
        get_reward("hpsv2", {"checkpoint": str(tmp_path / "broken.pt"), "clip_path": str(tmp_path / "clip")})


def _blip_random(vocab: int, width: int, text_width: int, image: int, patch: int) -> dict:
    """A random ImageReward state dict in upstream's key layout (ImageReward.pt's: BLIP's ViT, its
    BERT with cross-attention, the MLP)."""
    g = torch.Generator().manual_seed(0)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.2

    def lin(p: str, o: int, i: int) -> None:
        sd[p + ".weight"], sd[p + ".bias"] = r(o, i), r(o)

    def ln(p: str, n: int) -> None:
        sd[p + ".weight"], sd[p + ".bias"] = 1 + r(n), r(n)

    v, t = "blip.visual_encoder.", "blip.text_encoder."
    sd = {v + "cls_token": r(1, 1, width), v + "pos_embed": r(1, (image // patch) ** 2 + 1, width)}
    sd[v + "patch_embed.proj.weight"], sd[v + "patch_embed.proj.bias"] = r(width, 3, patch, patch), r(width)
    lin(v + "blocks.0.attn.qkv", 3 * width, width)
    lin(v + "blocks.0.attn.proj", width, width)
    lin(v + "blocks.0.mlp.fc1", 4 * width, width)
    lin(v + "blocks.0.mlp.fc2", width, 4 * width)
    for n in ("blocks.0.norm1", "blocks.0.norm2", "norm"):
        ln(v + n, width)
    sd[t + "embeddings.word_embeddings.weight"] = r(vocab, text_width)
    sd[t + "embeddings.position_embeddings.weight"] = r(40, text_width)
    sd[t + "embeddings.position_ids"] = torch.arange(40).unsqueeze(0)
    ln(t + "embeddings.LayerNorm", text_width)
    e = t + "encoder.layer.0."
    for att, kv in (("attention", text_width), ("crossattention", width)):
        lin(e + att + ".self.query", text_width, text_width)
        lin(e + att + ".self.key", text_width, kv)
        lin(e + att + ".self.value", text_width, kv)
        lin(e + att + ".output.dense", text_width, text_width)
        ln(e + att + ".output.LayerNorm", text_width)
    lin(e + "intermediate.dense", 2 * text_width, text_width)
    lin(e + "output.dense", text_width, 2 * text_width)
    ln(e + "output.LayerNorm", text_width)
    for i, (o, n) in {0: (1024, text_width), 2: (128, 1024), 4: (64, 128), 6: (16, 64), 7: (1, 16)}.items():
        lin(f"mlp.layers.{i}", o, n)
    return sd


def _attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, bias: torch.Tensor | None
) -> torch.Tensor:
    b, n, d = q.shape
    split = [x.reshape(b, x.shape[1], heads, d // heads).transpose(1, 2) for x in (q, k, v)]
    scores = split[0] @ split[1].transpose(-1, -2) / (d // heads) ** 0.5
    if bias is not None:
        scores = scores + bias
    return (scores.softmax(-1) @ split[2]).transpose(1, 2).reshape(b, n, d)


def test_imagereward_loads_upstreams_checkpoint_and_scores_as_upstream(tmp_path: Path):
    from PIL import Image
    from transformers import BertTokenizer

    words = ["a", "photo", "of", "red", "circle", "two", "blue", "squares"]
    (tmp_path / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n"
    )
    tok = BertTokenizer(str(tmp_path / "vocab.txt"))
    tok.save_pretrained(tmp_path / "bert")
    width, text_width, image, patch, heads = 128, 128, 32, 16, 2  # heads of width 64, as ViT-L and BERT-base
    sd = _blip_random(len(tok) + 2, width, text_width, image, patch)  # + BLIP's [DEC] and [ENC]
    torch.save(sd, tmp_path / "ImageReward.pt")
    reward = get_reward(
        "imagereward",
        {"checkpoint": str(tmp_path / "ImageReward.pt"), "tokenizer_path": str(tmp_path / "bert")},
    )
    rng = np.random.default_rng(2)
    images = [
        rng.integers(0, 256, (48, 40, 3), dtype=np.uint8),
        rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
    ]
    prompts = ["a photo of a red circle", "two blue squares"]
    got = [g.value for g in reward.score(images, prompts)]

    def pixels(im: np.ndarray) -> torch.Tensor:  # torchvision Resize(32, bicubic) + CenterCrop + Normalize
        h, w = im.shape[:2]
        nh, nw = (image, int(image * w / h)) if h <= w else (int(image * h / w), image)
        x = np.asarray(Image.fromarray(im).resize((nw, nh), Image.Resampling.BICUBIC), np.float32) / 255
        top, left = round((nh - image) / 2), round((nw - image) / 2)
        x = torch.from_numpy(x[top : top + image, left : left + image]).permute(2, 0, 1)
        m, s = (
            torch.tensor([0.48145466, 0.4578275, 0.40821073]),
            torch.tensor([0.26862954, 0.26130258, 0.27577711]),
        )
        return (x - m.view(3, 1, 1)) / s.view(3, 1, 1)

    v, t, gelu = "blip.visual_encoder.", "blip.text_encoder.", torch.nn.functional.gelu
    with torch.no_grad():  # BLIP's VisionTransformer and med.BertModel, written out
        x = torch.nn.functional.conv2d(torch.stack([pixels(im) for im in images]), sd[v + "patch_embed.proj.weight"], sd[v + "patch_embed.proj.bias"], stride=patch)  # fmt: skip
        x = (
            torch.cat([sd[v + "cls_token"].expand(2, 1, width), x.flatten(2).transpose(1, 2)], 1)
            + sd[v + "pos_embed"]
        )
        h = _ln(x, sd, v + "blocks.0.norm1", 1e-6)
        q, k, vv = _lin(h, sd, v + "blocks.0.attn.qkv").chunk(3, dim=-1)
        x = x + _lin(_attention(q, k, vv, heads, None), sd, v + "blocks.0.attn.proj")
        x = x + _lin(
            gelu(_lin(_ln(x, sd, v + "blocks.0.norm2", 1e-6), sd, v + "blocks.0.mlp.fc1")),
            sd,
            v + "blocks.0.mlp.fc2",
        )
        img = _ln(x, sd, v + "norm", 1e-6)
        enc = tok(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        pad = (1.0 - enc["attention_mask"][:, None, None, :].float()) * torch.finfo(torch.float32).min
        y = (
            sd[t + "embeddings.word_embeddings.weight"][enc["input_ids"]]
            + sd[t + "embeddings.position_embeddings.weight"][:35]
        )
        y = _ln(y, sd, t + "embeddings.LayerNorm", 1e-12)
        e = t + "encoder.layer.0."
        for att, kv, bias in (("attention", None, pad), ("crossattention", img, None)):
            src = y if kv is None else kv
            a = _attention(_lin(y, sd, e + att + ".self.query"), _lin(src, sd, e + att + ".self.key"), _lin(src, sd, e + att + ".self.value"), heads, bias)  # fmt: skip
            y = _ln(_lin(a, sd, e + att + ".output.dense") + y, sd, e + att + ".output.LayerNorm", 1e-12)
        y = _ln(
            _lin(gelu(_lin(y, sd, e + "intermediate.dense")), sd, e + "output.dense") + y,
            sd,
            e + "output.LayerNorm",
            1e-12,
        )
        z = y[:, 0]
        for i in (0, 2, 4, 6, 7):
            z = _lin(z, sd, f"mlp.layers.{i}")
        want = (z.squeeze(1) - 0.16717362830052426) / 1.0333394966054072
    assert got == pytest.approx(want.tolist(), abs=1e-4)
    assert len(set(got)) == 2
    with pytest.raises(FileNotFoundError, match=r"imagereward\.options\.checkpoint.*ImageReward\.pt"):
        get_reward("imagereward", {"tokenizer_path": str(tmp_path / "bert")})
    with pytest.raises(ValueError, match=r"tokenizer_path.*bert-base-uncased"):
        sd[t + "embeddings.word_embeddings.weight"] = torch.zeros(len(tok) + 5, text_width)
        torch.save(sd, tmp_path / "other.pt")
        get_reward(
            "imagereward",
            {"checkpoint": str(tmp_path / "other.pt"), "tokenizer_path": str(tmp_path / "bert")},
        )


_ISOLATED_REWARD = '''
import os

from vgrpo.reward_servers.base import Reward, ScoredItem


class EnvReward(Reward):
    """A plug-in that exists only in its server's working_dir and reads its server's env_vars."""

    name = "env"

    def score(self, images, prompts, metadata=None):
        extra = 0.0
        if os.environ.get("VGRPO_TEST_NEEDS_PIP"):
            import tomli_w  # installed into this server's runtime_env only

            extra = float(len(tomli_w.dumps({"a": 1})))
        value = float(os.environ["VGRPO_TEST_REWARD_VALUE"]) + extra
        return [ScoredItem(value) for _ in images]
'''


def _isolated_reward(ray_cluster: dict[str, Any], tmp_path: Path, env: dict[str, Any]) -> list[float]:
    """Deploys `isolated_reward:EnvReward` from a working_dir the driver cannot import, with `env` as its
    runtime_env (besides the working_dir), and scores two images through it."""
    import importlib.util

    from vgrpo.proto.config import RewardConfig, RewardServerConfig
    from vgrpo.reward_servers.registry import UnknownRewardError
    from vgrpo.reward_servers.serve import RewardClient, check_reward_names, deploy_rewards, shutdown_rewards

    pkg = tmp_path / "reward_pkg"
    pkg.mkdir()
    (pkg / "isolated_reward.py").write_text(_ISOLATED_REWARD)
    name = "isolated_reward:EnvReward"
    assert importlib.util.find_spec("isolated_reward") is None  # not importable by the driver ...
    with pytest.raises(UnknownRewardError, match="isolated_reward"):
        check_reward_names([name])  # ... so without a runtime_env it is refused before anything starts
    server = RewardServerConfig(cpus=0.1, runtime_env={"working_dir": str(pkg), **env})
    cfg = RewardConfig(weights={name: 1.0}, servers={name: server}, timeout_s=600)
    handles = deploy_rewards(cfg, quiet=True, timeout_s=600)
    try:
        scores = RewardClient(handles, cfg).score(_images(2), ["a", "b"])
        return scores.values[name].tolist()
    finally:
        shutdown_rewards()


def test_a_plug_in_reward_runs_in_its_own_runtime_env(ray_cluster: dict[str, Any], tmp_path: Path):
    """reward.servers.<name>.runtime_env: the replicas get their own working_dir and env_vars, which the
    trainer's process does not have."""
    import os

    got = _isolated_reward(ray_cluster, tmp_path, {"env_vars": {"VGRPO_TEST_REWARD_VALUE": "0.25"}})
    assert got == [0.25, 0.25] and "VGRPO_TEST_REWARD_VALUE" not in os.environ


@pytest.mark.slow  # Ray builds a virtualenv and pip-installs into it (needs the package index): ~1 min
def test_a_reward_server_pip_installs_what_only_it_needs(ray_cluster: dict[str, Any], tmp_path: Path):
    import importlib.util

    assert importlib.util.find_spec("tomli_w") is None, "tomli_w must not be in the trainer's environment"
    env = {
        "pip": ["tomli-w==1.0.0"],
        "env_vars": {"VGRPO_TEST_REWARD_VALUE": "1", "VGRPO_TEST_NEEDS_PIP": "1"},
    }
    assert _isolated_reward(ray_cluster, tmp_path, env) == [7.0, 7.0]  # 1 + len('a = 1\n')
