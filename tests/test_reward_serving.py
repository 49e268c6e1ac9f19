"""Reward servers on real Ray Serve (the session's local cluster): batches that really fill, values equal
to the in-process reward, weights, errors that name the reward and the image, a killed replica replaced
and its requests retried, and the HTTP wire format of `vgrpo serve-rewards`."""

from __future__ import annotations

import base64
import json
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from vgrpo.proto.config import RewardConfig, RewardServerConfig
from vgrpo.reward_servers.base import Reward, ScoredItem
from vgrpo.reward_servers.http_client import (
    RewardHTTPClient,
    decode_image,
    encode_png,
    to_uint8_rgb,
)
from vgrpo.reward_servers.registry import UnknownRewardError, get_reward, register_reward
from vgrpo.reward_servers.shapes.spec import FAMILIES
from vgrpo.shapes.prompts import make_prompt, scene_for_prompt
from vgrpo.shapes.render import render_scene


class BrightnessReward(Reward):
    """A second reward to combine with shapes: the mean pixel value in [0, 1]."""

    name = "test-brightness"

    def score(self, images, prompts, metadata=None):
        return [ScoredItem(float(np.mean(im)) / 255.0) for im in images]


class TroubleReward(Reward):
    """1.0, except: 'nan' in the prompt -> NaN, 'boom' -> raises, 'slow' -> the batch takes 1.5 s."""

    name = "test-trouble"

    def score(self, images, prompts, metadata=None):
        if any("boom" in p for p in prompts):
            raise RuntimeError("boom: this image breaks the reward")
        if any("slow" in p for p in prompts):
            time.sleep(1.5)
        return [ScoredItem(float("nan") if "nan" in p else 1.0) for p in prompts]


class MotionReward(Reward):
    """A video reward: the mean absolute change between consecutive frames of a clip, in [0, 1]."""

    name = "test-motion"
    video = True

    def score(self, images, prompts, metadata=None):
        return [
            ScoredItem(float(np.abs(np.diff(c.astype(np.float64), axis=0)).mean()) / 255.0) for c in images
        ]


register_reward("test-brightness", lambda opts: BrightnessReward(), replace=True)
register_reward("test-trouble", lambda opts: TroubleReward(), replace=True)
register_reward("test-motion", lambda opts: MotionReward(), replace=True)

WEIGHTS = {"shapes": 1.0, "test-brightness": 0.5, "test-trouble": 0.0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scenes(n: int, seed: int = 0) -> tuple[list[np.ndarray], list[str]]:
    """n rendered scenes; every third is scored against another image's prompt, so values vary."""
    rng = np.random.default_rng(seed)
    prompts = [make_prompt(FAMILIES[i % len(FAMILIES)], rng) for i in range(n)]
    images = [render_scene(scene_for_prompt(p, rng)) for p in prompts]
    prompts = [prompts[(i + 1) % n] if i % 3 == 2 else p for i, p in enumerate(prompts)]
    return images, prompts


@pytest.fixture(scope="module")
def served(ray_cluster: dict[str, Any]) -> Any:
    """The three rewards plus the HTTP ingress, deployed once for the module; removed at its end."""
    from ray import cloudpickle

    from vgrpo.reward_servers import serve as rs

    # the test rewards live in this module, which replicas cannot import: ship them by value
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    # Serve's HTTP settings are fixed while it runs: one left by an earlier module (without HTTP) goes
    if rs._serve_is_running():
        from ray import serve

        serve.shutdown()
    port = _free_port()
    cfg = RewardConfig(
        weights=WEIGHTS,
        servers={
            "shapes": RewardServerConfig(max_batch_size=8, batch_wait_timeout_s=0.1, cpus=0.1),
            "test-brightness": RewardServerConfig(max_batch_size=8, cpus=0.1),
            "test-trouble": RewardServerConfig(max_batch_size=8, batch_wait_timeout_s=0.05, cpus=0.1),
        },
        timeout_s=30,
        retries=3,
        max_request_mb=1.0,
    )
    handles = rs.deploy_rewards(cfg, http=True, port=port, quiet=True)
    try:
        yield rs, cfg, handles, f"http://127.0.0.1:{port}"
    finally:
        rs.shutdown_rewards()


def test_images_of_any_form_become_uint8_rgb() -> None:
    grey_u16 = np.full((4, 5), 65535, np.uint16)
    assert to_uint8_rgb(grey_u16).shape == (4, 5, 3) and to_uint8_rgb(grey_u16).max() == 255
    chw = np.zeros((3, 6, 7), np.float32)
    chw[0] = 1.0
    rgb = to_uint8_rgb(chw)
    assert rgb.shape == (6, 7, 3) and rgb.dtype == np.uint8 and (rgb[..., 0] == 255).all()
    rgba = np.zeros((2, 2, 4), np.uint8)
    assert to_uint8_rgb(rgba).shape == (2, 2, 3)
    assert (decode_image(encode_png(np.full((3, 3), 0.5))) == 128).all()
    with pytest.raises(ValueError, match="channels"):
        to_uint8_rgb(np.zeros((5, 5, 2)))


def test_unknown_reward_and_unfillable_batches_fail_before_anything_starts() -> None:
    from vgrpo.reward_servers import serve as rs

    with pytest.raises(UnknownRewardError, match=r"available: .*shapes"):
        rs.check_reward_names(["shapes", "no-such-reward"])
    with pytest.raises(ValueError, match="max_ongoing_requests=4 < max_batch_size=8"):
        rs._deployment_options("shapes", RewardServerConfig(max_batch_size=8, max_ongoing_requests=4))
    auto = rs._deployment_options("shapes", RewardServerConfig(num_replicas="auto", max_batch_size=16))
    assert auto["max_ongoing_requests"] == 64 and "num_replicas" not in auto
    assert auto["autoscaling_config"]["target_ongoing_requests"] == 16


def test_values_match_in_process_batches_fill_and_weights_combine(served: Any) -> None:
    rs, cfg, handles, _ = served
    client = rs.RewardClient({k: handles[k] for k in ("shapes", "test-brightness")}, cfg)
    images, prompts = _scenes(16)
    # float images in [0, 1] are converted exactly as the in-process reward sees uint8
    floats = [im.astype(np.float32) / 255.0 for im in images]
    scores = client.score(np.stack(floats), prompts)
    want = [it.value for it in get_reward("shapes").score(images, prompts)]
    np.testing.assert_allclose(scores.values["shapes"], want)
    assert len(set(want)) > 1  # the check could fail: not every image passes its prompt
    bright = np.array([im.mean() / 255.0 for im in images])
    np.testing.assert_allclose(scores.values["test-brightness"], bright)
    np.testing.assert_allclose(scores.total, np.array(want) + 0.5 * bright)
    # 16 concurrent single-image requests share batches of at most max_batch_size
    assert 1 < max(scores.batch_sizes["shapes"]) <= 8, scores.batch_sizes
    assert "clauses" in scores.details["shapes"][0] and scores.retries == 0


def test_clips_go_whole_to_a_video_reward_and_frame_by_frame_to_an_image_reward(served: Any) -> None:
    """A video family's samples (F, H, W, 3): the image reward's value is the mean of its per-frame
    values, the video reward sees the whole clip (frame-to-frame motion is not a per-frame quantity)."""
    rs, _, handles, _ = served
    video_cfg = RewardConfig(
        weights={"test-brightness": 0.5, "test-motion": 2.0},
        servers={"test-motion": RewardServerConfig(max_batch_size=4, cpus=0.1)},
        timeout_s=30,
    )
    motion = rs.deploy_rewards(video_cfg, names=["test-motion"], quiet=True)  # beside the module's apps
    client = rs.RewardClient({"test-brightness": handles["test-brightness"], **motion}, video_cfg)
    clips = np.random.default_rng(0).integers(0, 256, size=(3, 5, 16, 16, 3), dtype=np.uint8)
    scores = client.score(clips, ["a clip", "another", "a third"])
    bright = clips.reshape(3, 5, -1).mean(axis=2).mean(axis=1) / 255.0  # each frame, then over frames
    moves = np.abs(np.diff(clips.astype(np.float64), axis=1)).mean(axis=(1, 2, 3, 4)) / 255.0
    np.testing.assert_allclose(scores.values["test-brightness"], bright)
    np.testing.assert_allclose(scores.values["test-motion"], moves)
    np.testing.assert_allclose(scores.total, 0.5 * bright + 2.0 * moves)
    assert scores.details["test-brightness"][0]["frames"] == 5
    # held-out evaluation through the served rewards scores clips the same way
    for name, want in (("test-brightness", bright), ("test-motion", moves)):
        items = rs.ServedReward(client, name).score_samples(list(clips), ["a clip", "another", "a third"])
        np.testing.assert_allclose([it.value for it in items], want)


def test_a_served_reward_scores_held_out_images_as_the_in_process_one(served: Any) -> None:
    """The driver's held-out table through the served shapes reward equals the in-process table: the same
    binary scores, partial rewards and failed clauses; a reward that fails an image gives an item error."""
    from vgrpo.evaluate import HeldoutTable, shapes_reward

    rs, cfg, handles, _ = served
    client = rs.RewardClient(handles, cfg)
    images, prompts = _scenes(12, seed=3)
    rows = [{"prompt": p, "tag": "t"} for p in prompts]
    jobs = [(i, 0, 100 + i) for i in range(len(rows))]
    tables = []
    for reward in (rs.ServedReward(client, "shapes"), shapes_reward()):
        table = HeldoutTable(rows, reward, "shapes", {"images_per_prompt": 1})
        table.add(jobs, np.stack(images))
        tables.append(table.result())
    assert tables[0] == tables[1]
    assert 0 < tables[0]["overall"] < 1  # some images pass their prompt, some do not
    items = rs.ServedReward(client, "test-trouble").score(images[:2], ["nan", "fine"])
    assert items[0].value is None and items[0].error and items[1].error is None
    with pytest.raises(ValueError, match="not served"):
        rs.ServedReward(client, "pickscore")


def test_non_finite_and_raising_rewards_name_the_reward_and_image(served: Any) -> None:
    rs, cfg, handles, _ = served
    client = rs.RewardClient({"test-trouble": handles["test-trouble"]}, cfg.model_copy(update={"retries": 1}))
    images, _ = _scenes(3)
    with pytest.raises(rs.RewardError, match=r"'test-trouble' failed on image 1 .*'nan please'.*non-finite"):
        client.score(images, ["fine", "nan please", "fine"])
    with pytest.raises(rs.RewardError) as e:
        client.score(images, ["fine", "fine", "boom"])
    assert (e.value.reward, e.value.index, e.value.prompt) == ("test-trouble", 2, "boom")
    assert "after 2 attempt(s)" in str(e.value) and "RuntimeError: boom" in str(e.value)
    assert len(e.value.failures) == 1  # its batch-mates were rescored alone and passed
    # reward.on_failure=drop_group: the failure is marked (NaN value, its cause listed), never a zero
    kept = client.score(images, ["fine", "fine", "boom"], keep_failures=True).check("test", 3)
    assert kept.failed is not None and kept.failed.tolist() == [False, False, True]
    assert np.isnan(kept.values["test-trouble"][2]) and np.isfinite(kept.total[:2]).all()
    assert len(kept.errors) == 1 and "'boom'" in kept.errors[0] and "RuntimeError: boom" in kept.errors[0]


def test_killed_replica_is_replaced_and_its_requests_retried(served: Any) -> None:
    import ray

    rs, cfg, handles, _ = served
    handle = handles["test-trouble"]
    before = handle.describe.remote().result(timeout_s=30)
    client = rs.RewardClient({"test-trouble": handle}, cfg)
    images, _ = _scenes(8)
    done: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: done.update(s=client.score(images, ["slow"] * 8)))
    worker.start()
    time.sleep(0.7)  # the batch is inside its 1.5 s reward call
    ray.kill(ray.get_actor(before["actor_name"], namespace="serve"), no_restart=True)
    worker.join(timeout=60)
    assert "s" in done, "the scoring call did not return"
    scores = done["s"]
    assert list(scores.values["test-trouble"]) == [1.0] * 8 and scores.retries >= 8
    after = handle.describe.remote().result(timeout_s=30)
    assert after["pid"] != before["pid"]


def _post(url: str, body: bytes) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url + "/score", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_http_ingress_answers_the_wire_format(served: Any) -> None:
    _, _, _, url = served
    images, prompts = _scenes(6, seed=1)
    want_shapes = [it.value for it in get_reward("shapes").score(images, prompts)]
    client = RewardHTTPClient(url)
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda _: client.score(images, prompts), range(8)))
    for results in outs:
        assert [r["rewards"]["shapes"] for r in results] == want_shapes
        for r, im in zip(results, images, strict=True):
            assert set(r["rewards"]) == set(WEIGHTS)
            want = r["rewards"]["shapes"] + 0.5 * im.mean() / 255.0 + 0.0
            assert r["score"] == pytest.approx(want)
    # an item a reward cannot score carries its error; the others still get their values
    mixed = client.score(images[:2], [prompts[0], "a photo of a hexagon"])
    assert "rewards" in mixed[0] and "hexagon" in mixed[1]["error"] and "score" not in mixed[1]
    b64 = base64.b64encode(encode_png(images[0])).decode()
    for body, says in [
        (b"{not json", "not JSON"),
        (b'{"images": []}', '"items"'),
        (json.dumps({"items": [{"image_b64": b64}]}).encode(), "items[0].prompt"),
        (json.dumps({"items": [{"image_b64": "@@", "prompt": "x"}]}).encode(), "base64"),
        (json.dumps({"items": [{"image_b64": "aGVsbG8=", "prompt": "x"}]}).encode(), "image"),
    ]:
        status, reply = _post(url, body)
        assert status == 400 and says in reply["error"], (body, reply)
    status, reply = _post(url, json.dumps({"items": [{"image_b64": b64, "prompt": prompts[0]}]}).encode())
    assert status == 200 and reply["results"][0]["rewards"]["shapes"] == want_shapes[0]


def test_the_ingress_bounds_bodies_and_images(served: Any, png_header: Any) -> None:
    _, _, _, url = served
    big = json.dumps({"items": [{"image_b64": "A" * (1 << 20), "prompt": "x"}]}).encode()
    status, reply = _post(url, big)
    assert status == 413 and "max_request_mb" in reply["error"]
    bomb = base64.b64encode(png_header(10000, 10000)).decode()
    status, reply = _post(url, json.dumps({"items": [{"image_b64": bomb, "prompt": "x"}]}).encode())
    assert status == 400 and "10000 x 10000" in reply["error"] and "cap" in reply["error"]


def test_a_reward_rescaled_mid_run_keeps_its_running_replica(served: Any) -> None:
    """The capacity re-planner's move on a reward (vgrpo/capacity.py): a redeploy with another replica
    count starts the difference and keeps the replica that was serving (no reload of its model)."""
    from ray import serve

    rs, cfg, handles, _ = served
    handle = handles["test-brightness"]

    def pids(n: int = 24) -> set[int]:
        return {handle.describe.remote().result()["pid"] for _ in range(n)}

    def running() -> int:
        app = serve.status().applications[rs.app_name("test-brightness")]
        return sum(d.replica_states.get("RUNNING", 0) for d in app.deployments.values())

    before = pids()
    assert len(before) == 1 and running() == 1
    try:
        rs.rescale_reward(cfg, "test-brightness", 2)
        assert running() == 2
        after = pids(48)
        assert before < after and len(after) == 2  # the old replica still serves, beside a new one
        one = RewardConfig(weights={"test-brightness": 1.0}, timeout_s=30)
        client = rs.RewardClient({"test-brightness": handle}, one)
        images = np.full((2, 8, 8, 3), 51, np.uint8)
        scores = client.score(images, ["a", "b"])
        np.testing.assert_allclose(scores.values["test-brightness"], [0.2, 0.2])
    finally:
        rs.rescale_reward(cfg, "test-brightness", 1)
    deadline = time.monotonic() + 60
    while running() != 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert running() == 1
