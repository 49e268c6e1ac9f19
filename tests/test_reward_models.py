"""The real reward models, offline: GenEval (tiny Mask2Former + tiny CLIP built from config, saved and
loaded through the production `from_pretrained` path), PickScore the same, OCR for real on rendered text,
missing-weights errors, and the user rewards (a Python function, an entry point, a remote HTTP service)."""

from __future__ import annotations

import contextlib
import json
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from vgrpo.reward_servers.registry import available_rewards, get_reward
from vgrpo.tiny_rewards import PERSON, build_tiny_clip, build_tiny_mask2former


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def tiny_detector(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every query of this tiny Mask2Former says "person", so the test knows what it must find."""
    return build_tiny_mask2former(tmp_path_factory.mktemp("mask2former"), force_class=PERSON)


@pytest.fixture(scope="module")
def geneval(tiny_detector: Path, tiny_clip: Path) -> Any:
    return get_reward(
        "geneval", {"detector_path": str(tiny_detector), "clip_path": str(tiny_clip), "image_size": 64}
    )


def _images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [
        rng.integers(0, 256, (48, 64, 3), dtype=np.uint8),
        rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
    ]


# ---------------------------------------------------------------------------------------------- GenEval


def test_geneval_end_to_end_on_tiny_models(geneval: Any) -> None:
    from vgrpo.reward_servers.geneval import COLORS

    images = _images()
    single = {
        "tag": "single_object",
        "include": [{"class": "person", "count": 1}],
        "prompt": "a photo of a person",
    }
    colour = {"tag": "colors", "include": [{"class": "person", "count": 1, "color": "red"}]}
    out = geneval.score(
        [*images, images[0]], ["a photo of a person", "a photo of a red person", "x"], [single, colour, {}]
    )
    assert out[2].value is None and "'tag' and 'include'" in (out[2].error or "")
    first = out[0]
    people = first.details["detections"]["person"]
    n = len(people)
    assert 1 <= n <= 6  # one detection per query at most, all "person"
    assert set(first.details["detections"]) == {"person"}
    assert first.details["correct"] is True and first.details["score"] == 1.0  # >= 1 person
    assert first.value == pytest.approx(1 - abs(1 - n))  # partial: exact count wanted, may be negative
    h, w = images[0].shape[:2]
    for x1, y1, x2, y2, s in people:
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h and 0.3 < s <= 1
    assert [p[4] for p in people] == sorted((p[4] for p in people), reverse=True)
    # colour: CLIP picked one of GenEval's colours for the top person; the verdict follows it
    reason = out[1].details["reason"]
    assert out[1].details["correct"] == (reason == "")
    assert reason == "" or any(f"1 {c}" in reason for c in COLORS)


def test_geneval_detections_masks_boxes_and_counting_threshold(geneval: Any) -> None:
    image = _images()[0]
    dets = geneval.detect([image])[0]
    assert len(dets) == 100  # mmdet's max_per_image (6 queries x 80 classes > 100)
    top = sorted(dets, key=lambda d: -d.score)[:3]
    for d in top:
        assert d.mask.shape == image.shape[:2]
        ys, xs = np.nonzero(d.mask)
        assert d.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    meta = {
        "tag": "counting",
        "include": [{"class": "person", "count": 2}],
        "exclude": [{"class": "person", "count": 3}],
    }
    normal = {**meta, "tag": "two_object"}
    res_c, res_n = geneval.score([image, image], ["c", "n"], [meta, normal])
    n_counting = len(res_c.details["detections"].get("person", []))
    n_normal = len(res_n.details["detections"].get("person", []))
    assert n_counting == sum(d.score > 0.9 and d.label == "person" for d in dets)
    assert n_normal == sum(d.score > 0.3 and d.label == "person" for d in dets)


def test_geneval_crop_composites_on_grey(geneval: Any) -> None:
    from vgrpo.reward_servers.geneval import Detection

    image = np.zeros((20, 30, 3), np.uint8)
    image[..., 0] = 255  # all red
    mask = np.zeros((20, 30), bool)
    mask[5:15, 10:20] = True
    mask[5, 10] = False  # a pixel of the box outside the mask
    crop = np.asarray(geneval.crop(image, Detection("cat", 0.9, (10.0, 5.0, 20.0, 15.0), mask)))
    assert crop.shape == (10, 10, 3)
    assert tuple(crop[0, 0]) == (0x99, 0x99, 0x99) and tuple(crop[5, 5]) == (255, 0, 0)


# -------------------------------------------------------------------------------------------- PickScore


def test_pickscore_matches_clip_logits_and_scales_by_26(tiny_clip: Path) -> None:
    import torch
    from transformers import CLIPModel, CLIPProcessor

    reward = get_reward("pickscore", {"processor_path": str(tiny_clip), "model_path": str(tiny_clip)})
    images = _images()
    prompts = ["a photo of a red circle", "a blue square " * 60]  # the second is > 77 tokens: truncated
    out = reward.score(images, prompts)
    model, proc = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)
    inputs = proc(
        text=prompts, images=images, padding=True, truncation=True, max_length=77, return_tensors="pt"
    )
    with torch.no_grad():
        expected = model(**inputs).logits_per_image.diag()  # exp(logit_scale) * cos
    for item, e in zip(out, expected.tolist(), strict=True):
        assert item.details["raw"] == pytest.approx(e, rel=1e-4, abs=1e-4)
        assert item.value == pytest.approx(e / 26.0, rel=1e-4, abs=1e-5)
    assert out[0].details["raw"] != pytest.approx(out[1].details["raw"])


# --------------------------------------------------------------------------------------- missing weights


def test_missing_weights_fail_at_construction_naming_the_key(tmp_path: Path, tiny_clip: Path) -> None:
    from vgrpo.reward_servers.hf_weights import RewardWeightsError

    with pytest.raises(RewardWeightsError) as e:
        get_reward("geneval", {"detector_path": str(tmp_path / "no_such_dir"), "clip_path": str(tiny_clip)})
    msg = str(e.value)
    assert "reward.servers.geneval.options.detector_path" in msg
    assert "huggingface-cli download facebook/mask2former-swin-small-coco-instance" in msg


def test_uncached_hub_id_offline_names_the_key(monkeypatch: pytest.MonkeyPatch, tiny_clip: Path) -> None:
    from huggingface_hub import constants

    from vgrpo.reward_servers.hf_weights import RewardWeightsError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        RewardWeightsError,
        match=r"reward\.servers\.pickscore\.options\.model_path.*yuvalkirstain/PickScore_v1",
    ):
        get_reward("pickscore", {"processor_path": str(tiny_clip), "model_path": "nobody/not-a-cached-model"})


# -------------------------------------------------------------------------------------------------- OCR


def _text_image(text: str, size: tuple[int, int] = (320, 96)) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    im = Image.new("RGB", size, (250, 250, 245))
    font = ImageFont.load_default(size=40)
    ImageDraw.Draw(im).text((16, 24), text, fill=(20, 20, 30), font=font)
    return np.asarray(im)


def test_ocr_real_on_rendered_text() -> None:
    reward = get_reward("ocr", {"num_threads": 1})
    open_sign = _text_image("OPEN 24")
    out = reward.score(
        [open_sign, open_sign, _text_image("Hello World")],
        ['a neon sign that says "open 24"', 'a sign reading "CLOSED FOREVER"', 'a poster with "hello world"'],
    )
    assert out[0].value == pytest.approx(1.0) and out[2].value == pytest.approx(1.0), [o.details for o in out]
    assert out[1].value is not None and out[1].value < 0.5
    assert out[0].details["exact"] is True


def test_ocr_prompt_rules() -> None:
    from vgrpo.reward_servers.ocr import OcrPromptError, extract_target, ocr_reward, validate_prompts

    assert extract_target('a cake with "Happy Birthday" and "more"') == "Happy Birthday"
    assert ocr_reward("HAPPYBIRTHDAY!! 2024", "happy birthday") == 1.0  # substring after normalisation
    assert ocr_reward("hapy birthday", "happy birthday") == pytest.approx(1 - 1 / 13)
    assert ocr_reward("x" * 50, "abc") == 0.0  # dist clamped to len(target)
    validate_prompts(['a "fine" prompt', 'another "one"'])
    with pytest.raises(OcrPromptError, match=r"prompt 1: .*'a prompt without quotes'"):
        validate_prompts(['ok "yes"', "a prompt without quotes", "bad too"])
    item = get_reward("ocr").score([np.zeros((8, 8, 3), np.uint8)], ["no quotes here"])[0]
    assert item.value is None and "no quotes here" in (item.error or "")


def test_ocr_distance_is_levenshtein_not_indel() -> None:
    from vgrpo.reward_servers.ocr import levenshtein, ocr_reward

    # normalised "halloworld" vs "helloworld": one substitution (Levenshtein 1, Indel 2) over 10 characters
    assert ocr_reward("hallo world", "hello world") == pytest.approx(0.9)
    assert ocr_reward("Hallo World", "hello world") == pytest.approx(0.9)
    assert (
        levenshtein("kitten", "sitting") == 3 and levenshtein("", "abc") == 3 and levenshtein("abc", "") == 3
    )


def test_ocr_levenshtein_fallback_matches_rapidfuzz(monkeypatch: pytest.MonkeyPatch) -> None:
    rapidfuzz_levenshtein = pytest.importorskip("rapidfuzz.distance").Levenshtein
    from vgrpo.reward_servers import ocr

    rng = np.random.default_rng(0)
    pairs = [
        tuple("".join(rng.choice(list("abc"), size=int(rng.integers(0, 9)))) for _ in range(2))
        for _ in range(300)
    ]
    expected = [int(rapidfuzz_levenshtein.distance(a, b)) for a, b in pairs]
    assert [ocr.levenshtein(a, b) for a, b in pairs] == expected  # through rapidfuzz
    monkeypatch.setitem(sys.modules, "rapidfuzz.distance", None)  # the import fails: the pure-Python path
    with pytest.raises(ImportError):
        from rapidfuzz.distance import Levenshtein  # noqa: F401
    assert [ocr.levenshtein(a, b) for a, b in pairs] == expected
    assert ocr.ocr_reward("hallo world", "hello world") == pytest.approx(0.9)


# ------------------------------------------------------------------------------------------ user rewards


PLUGIN = """
import numpy as np

def brightness(images, prompts, metadata, gamma=1.0):
    return [float((im.mean() / 255.0) ** gamma) for im in images]
"""


@pytest.fixture
def plugin_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name = f"vgrpo_test_plugin_{tmp_path.name}"
    (tmp_path / f"{name}.py").write_text(PLUGIN)
    dist = tmp_path / "vgrpo_test_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vgrpo-test-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[vgrpo.rewards]\ntest_brightness = {name}:brightness\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_python_function_reward_and_entry_point(plugin_module: str) -> None:
    images = [np.full((4, 4, 3), 255, np.uint8), np.zeros((4, 4, 3), np.uint8)]
    fn_reward = get_reward(f"{plugin_module}:brightness", {"gamma": 2.0})
    assert [i.value for i in fn_reward.score(images, ["a", "b"])] == [1.0, 0.0]
    assert "test_brightness" in available_rewards()
    ep_reward = get_reward("test_brightness")
    assert [i.value for i in ep_reward.score(images, ["a", "b"])] == [1.0, 0.0]


class _Service(BaseHTTPRequestHandler):
    """A scoring service: `/json` answers the simple format (mean brightness), `/score` the vgrpo format;
    the first `fail_first` requests get a 503, and `sleep_s` delays every answer."""

    calls = 0
    fail_first = 0
    sleep_s = 0.0

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        import base64
        import io
        import time

        from PIL import Image

        type(self).calls += 1
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        time.sleep(self.sleep_s)
        if type(self).calls <= self.fail_first:
            self._send(503, {"error": "warming up"})
            return

        def mean(b64: str) -> float:
            return float(np.asarray(Image.open(io.BytesIO(base64.b64decode(b64)))).mean() / 255.0)

        if self.path == "/json":
            self._send(
                200,
                {
                    "scores": [
                        mean(b) if p else None for b, p in zip(body["images"], body["prompts"], strict=True)
                    ]
                },
            )
        else:
            self._send(
                200,
                {
                    "results": [
                        {"rewards": {"bright": mean(it["image_b64"])}, "score": 2 * mean(it["image_b64"])}
                        for it in body["items"]
                    ]
                },
            )

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError):  # the client timed out first (the timeout test)
            self.wfile.write(data)


@pytest.fixture
def service() -> Iterator[tuple[str, type[_Service]]]:
    handler = type("Handler", (_Service,), {"calls": 0, "fail_first": 0, "sleep_s": 0.0})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()
    server.server_close()


def test_remote_reward_json_and_vgrpo_formats_with_retries(service: tuple[str, type[_Service]]) -> None:
    url, handler = service
    images = [np.full((4, 4, 3), 255, np.uint8), np.zeros((4, 4, 3), np.uint8)]
    handler.fail_first = 1  # the first request gets a 503 and is retried
    remote = get_reward("remote", {"url": url + "/json", "format": "json", "retries": 2, "backoff_s": 0.01})
    out = remote.score(images, ["a", ""])
    assert out[0].value == 1.0 and out[1].value is None and out[1].error
    assert handler.calls == 2
    vg = get_reward("remote", {"url": url, "key": "bright", "retries": 0})
    assert [i.value for i in vg.score(images, ["a", "b"])] == [1.0, 0.0]
    vg_total = get_reward("remote", {"url": url, "retries": 0})
    assert [i.value for i in vg_total.score(images, ["a", "b"])] == [2.0, 0.0]


def test_remote_reward_times_out_after_retries(service: tuple[str, type[_Service]]) -> None:
    from vgrpo.reward_servers.remote import RemoteRewardError

    url, handler = service
    handler.sleep_s = 1.0
    remote = get_reward(
        "remote", {"url": url + "/json", "format": "json", "timeout_s": 0.2, "retries": 1, "backoff_s": 0.01}
    )
    with pytest.raises(RemoteRewardError, match="after 2 attempt"):
        remote.score([np.zeros((4, 4, 3), np.uint8)], ["a"])


# ------------------------------------------------------------------------------------------- evaluation


def test_evaluate_with_reward_tables(tmp_path: Path) -> None:
    """GenEval's table is the mean of per-tag binary accuracies; OCR reports exact matches; the samples
    use the same fixed seeds as the shapes benchmark."""
    from vgrpo.core.policy import load_pipeline
    from vgrpo.evaluate import evaluate_with_reward, load_benchmark_rows
    from vgrpo.reward_servers.base import Reward, ScoredItem
    from vgrpo.reward_servers.ocr import OcrPromptError

    class Scripted(Reward):
        """Correct for the `single_object` prompt, wrong for the others; OCR-like values by prompt."""

        name = "scripted"

        def score(self, images: Any, prompts: Any, metadata: Any = None) -> list[ScoredItem]:
            assert metadata is not None and len(metadata) == len(images)
            assert all(im.dtype == np.uint8 and im.ndim == 3 for im in images)
            ok = [m["tag"] == "single_object" for m in metadata]
            return [ScoredItem(1.0 if o else 0.25, details={"score": float(o), "raw": 20.0}) for o in ok]

    rows_file = tmp_path / "meta.jsonl"
    rows_file.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {
                    "tag": "single_object",
                    "include": [{"class": "cat", "count": 1}],
                    "prompt": "a photo of a cat",
                },
                {
                    "tag": "counting",
                    "include": [{"class": "cat", "count": 2}],
                    "prompt": "a photo of two cats",
                },
                {
                    "tag": "counting",
                    "include": [{"class": "dog", "count": 2}],
                    "prompt": "a photo of two dogs",
                },
            ]
        )
    )
    rows = load_benchmark_rows(rows_file, "geneval")
    pipe = load_pipeline("builtin:tiny-sd3")
    result = evaluate_with_reward(pipe, rows, Scripted(), "geneval", images_per_prompt=2, num_steps=2)
    assert result["families"] == {"single_object": 1.0, "counting": 0.0}
    assert result["overall"] == 0.5  # mean of the tags, not of the images (which would be 1/3)
    assert [im["seed"] for p in result["prompts"] for im in p["images"]] == list(range(6))
    ocr = evaluate_with_reward(pipe, rows, Scripted(), "ocr", images_per_prompt=1, num_steps=2)
    assert ocr["overall"] == pytest.approx(0.5) and ocr["exact_match"] == pytest.approx(1 / 3)
    (tmp_path / "bad.txt").write_text('a sign saying "ok"\na prompt without a quote\n')
    with pytest.raises(OcrPromptError, match="prompt 1"):
        load_benchmark_rows(tmp_path / "bad.txt", "ocr")
    (tmp_path / "nometa.jsonl").write_text('{"prompt": "a photo of a cat", "tag": "single_object"}\n')
    with pytest.raises(ValueError, match="'include'"):
        load_benchmark_rows(tmp_path / "nometa.jsonl", "geneval")
