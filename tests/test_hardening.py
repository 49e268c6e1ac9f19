"""Hardening: least exposure (the driver's metrics port on 127.0.0.1 unless opened, a private Ray token)
and the bounds of docs/training.md "Faults"."""

from __future__ import annotations

import socket
import stat
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp writes them) listening on ``port``."""
    out = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        addr, p = local.split(":")
        if int(p, 16) == port and state == "0A":  # LISTEN
            out.add(addr)
    return out


@pytest.mark.skipif(not Path("/proc/net/tcp").is_file(), reason="reads Linux's socket table")
def test_the_driver_metrics_port_listens_on_loopback_by_default():
    from vgrpo.core.metrics import _PromMirror

    port = _free_port()
    _PromMirror(port)  # observability.bind's default
    assert _listening(port) == {"0100007F"}  # 127.0.0.1, not 0.0.0.0


def test_the_ray_token_file_is_made_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from vgrpo.launch import private_token_file

    token = tmp_path / "auth_token"
    token.write_text("secret")
    token.chmod(0o644)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    private_token_file()
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    private_token_file()  # already private: nothing to do
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "absent"))
    private_token_file()  # no token: nothing to do


def test_an_empty_prompt_file_is_an_error(tmp_path: Path):
    from vgrpo.evaluate import load_benchmark_rows, load_prompt_rows

    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        load_prompt_rows(empty)
    with pytest.raises(ValueError, match="holds no prompts"):
        load_benchmark_rows(empty, "ocr")


def test_an_image_over_the_pixel_cap_is_refused_from_its_header(tmp_path: Path, png_header):
    import json

    import numpy as np
    from PIL import Image

    from vgrpo.reward_servers.http_client import ImageTooLargeError, decode_image, encode_png
    from vgrpo.score import score_manifest

    bomb = png_header(10000, 10000)
    with pytest.raises(ImageTooLargeError, match="10000 x 10000"):
        decode_image(bomb)
    with pytest.raises(ImageTooLargeError, match="over the cap"):  # above Pillow's own guard too
        decode_image(png_header(20000, 20000))
    small = encode_png(np.zeros((8, 8, 3), np.uint8))
    assert decode_image(small, max_pixels=64).shape == (8, 8, 3)
    with pytest.raises(ImageTooLargeError, match="8 x 8 = 64 pixels is over the cap of 63"):
        decode_image(small, max_pixels=63)
    (tmp_path / "bomb.png").write_bytes(bomb)
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(tmp_path / "ok.png")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        json.dumps({"image": "bomb.png", "prompt": "a photo of a circle"})
        + "\n"
        + json.dumps({"image": "ok.png", "prompt": "a photo of a circle"})
        + "\n"
    )
    out = tmp_path / "out.jsonl"
    assert score_manifest(["shapes"], manifest, out) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert "over the cap" in rows[0]["error"] and "score" in rows[1]


def test_a_run_directory_that_holds_a_run_is_refused_or_overwritten(tmp_path: Path):
    """No Ray starts: the refusal comes before anything runs, and the old run is left as it was."""
    import json

    from vgrpo.driver import train
    from vgrpo.proto.config import identity, load_config
    from vgrpo.roles import TrainingError
    from vgrpo.run_dir import RunDir

    run = tmp_path / "run"
    RunDir(run).append_metrics({"step": 1, "reward_mean": 0.5})
    (run / "config.yaml").write_text("old: config\n")
    with pytest.raises(
        TrainingError, match=r"already holds a run \(metrics.jsonl has 1 step\(s\)\).*--resume"
    ):
        train(load_config(None), run)
    assert (run / "config.yaml").read_text() == "old: config\n"
    assert json.loads((run / "metrics.jsonl").read_text())["step"] == 1

    # --resume with an edited config.yaml that changes the run's identity is refused, naming the key
    ckpt = run / "checkpoints" / "step_1"
    ckpt.mkdir(parents=True)
    recorded = identity(load_config(None))
    (ckpt / "driver_state.json").write_text(json.dumps({"step": 1, "identity": recorded}))
    (ckpt / "policy.safetensors").write_bytes(
        b""
    )  # a complete checkpoint has both (no manifest: older layout)
    with pytest.raises(TrainingError, match=r"algorithm\.name = 'dgpo'.*trained with 'vgrpo'"):
        train(load_config(None, ["algorithm.name=dgpo"]), run, resume=True)

    # --overwrite deletes what the run wrote (here checked without starting Ray)
    RunDir(run).clear()
    assert RunDir(run).holds_a_run() is None and not (run / "metrics.jsonl").exists()


def test_non_finite_weights_are_named():
    import torch

    from vgrpo.run_dir import non_finite

    ok = {"a": torch.zeros(2), "b": torch.ones(3)}
    assert non_finite(ok) == []
    assert non_finite({**ok, "c": torch.tensor([1.0, float("nan")])}) == ["c"]


def test_an_unreachable_address_fails_fast_naming_it():
    from vgrpo.launch import ClusterUnreachable, check_reachable

    port = _free_port()  # nothing listens there
    with pytest.raises(ClusterUnreachable, match=rf"--address 127\.0\.0\.1:{port}: nothing answers"):
        check_reachable(f"127.0.0.1:{port}", timeout_s=2.0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        check_reachable(f"127.0.0.1:{s.getsockname()[1]}", timeout_s=2.0)  # a listener answers
    check_reachable("auto")  # left to Ray


def test_prompt_files_are_checked_line_by_line_before_anything_starts(tmp_path: Path):
    from vgrpo.driver import Trainer
    from vgrpo.evaluate import load_prompt_rows
    from vgrpo.proto.config import load_config
    from vgrpo.roles import TrainingError
    from vgrpo.run_dir import RunDir

    rows = tmp_path / "p.jsonl"
    rows.write_text('{"prompt": "a photo of a circle"}\n{"text": "no prompt here"}\n')
    with pytest.raises(ValueError, match=r"p\.jsonl line 2 has no string 'prompt'"):
        load_prompt_rows(rows)
    rows.write_text('{"prompt": "a photo of a circle"}\n{not json\n')
    with pytest.raises(ValueError, match=r"line 2 is not JSON"):
        load_prompt_rows(rows)
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(ValueError, match="not UTF-8"):
        load_prompt_rows(binary)
    txt = tmp_path / "t.txt"
    txt.write_text("a photo of a circle\na photo of a hexagon\n")
    with pytest.raises(ValueError, match=r"t\.txt line 2.*hexagon"):
        load_prompt_rows(txt)  # strict (evaluation)
    cfg = load_config(None, [f"data.train_prompts={txt}"])
    with pytest.raises(TrainingError, match=r"prompt 2 \('a photo of a hexagon'\) is outside the shapes"):
        Trainer(cfg, RunDir(tmp_path / "run"))


def test_an_unwritable_out_fails_before_the_work(tmp_path: Path):
    """A path under a regular file cannot be written, even by root: refused before any evaluation."""
    from typer.testing import CliRunner

    from vgrpo.cli import app

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    r = CliRunner().invoke(app, ["eval", "--model", "builtin:tiny-sd3", "--out", str(blocker / "r.json")])
    assert r.exit_code != 0 and "--out" in r.output and "cannot write there" in r.output, r.output
    r = CliRunner().invoke(app, ["export", "--run-dir", str(tmp_path), "--out", str(blocker / "x")])
    assert r.exit_code != 0 and "cannot write there" in r.output, r.output


def _checkpoint(folder: Path, step: int, value: float) -> Path:
    import json

    import torch
    from safetensors.torch import save_file

    from vgrpo.checkpoints import write_manifest

    ckpt = folder / "checkpoints" / f"step_{step}"
    (ckpt / "learner").mkdir(parents=True)
    save_file({"w": torch.full((64,), value)}, str(ckpt / "policy.safetensors"))
    (ckpt / "learner" / "shard.bin").write_bytes(b"x" * 1000)
    (ckpt / "driver_state.json").write_text(json.dumps({"step": step}))
    write_manifest(ckpt)
    return ckpt


def test_checkpoints_heal_to_the_newest_complete_one(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    import logging

    from vgrpo.checkpoints import (
        RunDirError,
        checkpoint_problem,
        checkpoint_steps,
        newest_usable,
        policy_weights,
    )

    run = tmp_path / "run"
    _checkpoint(run, 2, 2.0)
    newest = _checkpoint(run, 4, 4.0)
    assert checkpoint_steps(run) == [2, 4] and checkpoint_problem(newest, hashes=True) is None
    shard = newest / "learner" / "shard.bin"
    shard.write_bytes(b"x" * 10)  # truncated
    assert "shard.bin has 10 bytes" in str(checkpoint_problem(newest))
    log = logging.getLogger("vgrpo.test")
    with caplog.at_level(logging.WARNING, logger="vgrpo.test"):
        assert newest_usable(run / "checkpoints", log) == (2, run / "checkpoints" / "step_2")
    assert "skipping checkpoint step 4" in caplog.text and "shard.bin" in caplog.text
    shard.write_bytes(b"y" * 1000)  # the right size, other bytes: only the sha256 tells
    assert checkpoint_problem(newest) is None and "sha256" in str(checkpoint_problem(newest, hashes=True))
    with pytest.warns(UserWarning, match="skipping checkpoint step 4"):
        step, weights = policy_weights(run, None)  # eval and export: the same rule as resume
    assert step == 2 and weights is not None and float(weights["w"][0]) == 2.0
    with pytest.raises(RunDirError, match=r"step 4 cannot be used.*sha256"):
        policy_weights(run, 4)
    (newest / "driver_state.json").write_text('{"step": 4')  # torn
    assert "driver_state.json is unreadable" in str(checkpoint_problem(newest))


def test_a_torn_metrics_line_is_dropped_on_resume(tmp_path: Path):
    import json

    from vgrpo.run_dir import RunDir

    run = RunDir(tmp_path / "run")
    for step in (1, 2, 3):
        run.append_metrics({"step": step})
    with run.metrics_path.open("a") as f:
        f.write('{"step": 4, "rew')  # a stop in the middle of a write
    run.truncate_metrics(2)
    assert [json.loads(x)["step"] for x in run.metrics_path.read_text().splitlines()] == [1, 2]


class _Payload:
    """A pickle that runs code when loaded: it would create ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_nothing_in_a_checkpoint_executes_code(tmp_path: Path):
    """The learner state is safetensors + JSON, the policy safetensors, the driver state JSON: a pickle
    planted in any of them (or beside them, named as DeepSpeed's shards) is never unpickled, and the
    error names the file."""
    import pickle

    import torch

    from vgrpo.checkpoints import RunDirError, checkpoint_problem, policy_weights
    from vgrpo.learner.engine import STATE_JSON, STATE_TENSORS, read_state, write_state

    marker = tmp_path / "ran"
    payload = pickle.dumps(_Payload(marker))
    state = {
        "format": 2,
        "world_size": 1,
        "zero_stage": 2,
        "weights": {"a": torch.ones(3), "b": torch.zeros(2, 2)},
        "old": {"a": torch.full((3,), 0.5), "b": torch.zeros(2, 2)},
        "optimizer": {"step": 4, "exp_avg": {"a": torch.ones(3)}, "exp_avg_sq": {"a": torch.ones(3)}},
        "scheduler": {"base_lrs": [0.001], "last_epoch": 4, "lr_lambdas": [None], "_last_lr": [0.001]},
        "global_steps": 4,
        "client": {"version": 4, "history": {3: {"a": torch.ones(3)}}, "ema": None, "ema_updates": 0},
    }
    folder = tmp_path / "learner"
    write_state(folder, state)
    back = read_state(folder)
    assert back["client"]["version"] == 4 and set(back["client"]["history"]) == {3}
    assert torch.equal(back["weights"]["a"], torch.ones(3)) and back["optimizer"]["step"] == 4
    assert back["scheduler"] == state["scheduler"] and back["client"]["ema"] is None
    # DeepSpeed-shaped pickles beside the state are never read
    (folder / "learner").mkdir()
    (folder / "learner" / "mp_rank_00_model_states.pt").write_bytes(payload)
    (folder / "consolidated.pt").write_bytes(payload)
    read_state(folder)
    # a pickle in place of each file the loaders read: refused, named, not run
    (folder / STATE_TENSORS).write_bytes(payload)
    with pytest.raises(ValueError, match=r"state\.safetensors is not a readable safetensors file"):
        read_state(folder)
    (folder / STATE_JSON).write_bytes(payload)
    with pytest.raises(ValueError, match=r"state\.json is not a learner state"):
        read_state(folder)
    ckpt = tmp_path / "run" / "checkpoints" / "step_1"
    ckpt.mkdir(parents=True)
    (ckpt / "policy.safetensors").write_bytes(payload)
    (ckpt / "driver_state.json").write_text("{}")
    with pytest.raises(RunDirError, match=r"policy\.safetensors is not a readable safetensors file"):
        policy_weights(tmp_path / "run", 1)
    (ckpt / "driver_state.json").write_bytes(payload)
    assert "driver_state.json is unreadable" in str(checkpoint_problem(ckpt))
    assert not marker.exists()


def test_the_health_watch_raises_and_clears_its_alarms(caplog: pytest.LogCaptureFixture):
    import logging

    from vgrpo.health import HealthWatch

    watch = HealthWatch()
    rows = []
    with caplog.at_level(logging.WARNING, logger="vgrpo"):
        for step in range(1, 61):  # the training reward climbs while the held-out score falls
            row: dict = {"step": step, "reward_mean": 0.3 + 0.01 * step, "adv/zero_std_frac": 0.2}
            if step % 20 == 0:
                row["eval/overall"] = 0.6 - 0.05 * (step // 20)
            row.update(watch.update(row))
            rows.append(row)
    assert [r["health/reward_hacking"] for r in rows[:59]] == [0.0] * 59 and rows[59][
        "health/reward_hacking"
    ] == 1.0
    assert "health/reward_hacking" in caplog.text and "samples/" in caplog.text

    honest = HealthWatch()  # the same rewards with a rising held-out score: no alarm
    for step in range(1, 61):
        row = {"step": step, "reward_mean": 0.3 + 0.01 * step}
        if step % 20 == 0:
            row["eval/overall"] = 0.4 + 0.05 * (step // 20)
        assert honest.update(row)["health/reward_hacking"] == 0.0

    flat = HealthWatch()
    got = [
        flat.update({"step": s, "reward_mean": 1.0, "adv/zero_std_frac": 1.0})["health/no_signal"]
        for s in range(1, 12)
    ]
    assert got == [0.0] * 9 + [1.0, 1.0]
    assert flat.update({"step": 12, "reward_mean": 0.5, "adv/zero_std_frac": 0.1})["health/no_signal"] == 0.0


def test_keep_best_records_and_protects_the_best_checkpoint(tmp_path: Path):
    from typer.testing import CliRunner

    from vgrpo.cli import app
    from vgrpo.run_dir import RunDir

    run = RunDir(tmp_path / "run")
    assert run.is_best(0.4) and not run.is_best(None)
    run.record_best(20, 0.55)
    assert not run.is_best(0.5) and run.is_best(0.56) and run.best() == {"step": 20, "eval/overall": 0.55}
    r = CliRunner().invoke(
        app,
        ["export", "--run-dir", str(tmp_path / "run"), "--best", "--step", "3", "--out", str(tmp_path / "o")],
    )
    assert r.exit_code != 0 and "drop --step" in r.output
    r = CliRunner().invoke(app, ["eval", "--run-dir", str(tmp_path / "nothing"), "--best"])
    assert r.exit_code != 0 and "train.keep_best" in r.output


def test_a_binary_yaml_and_a_lora_typo_are_named(tmp_path: Path):
    import torch

    from vgrpo.core.adapters import add_lora
    from vgrpo.proto.config import ConfigError, LoraConfig, load_config

    blob = tmp_path / "c.yaml"
    blob.write_bytes(b"\xff\xfe\x00\x81binary")
    with pytest.raises(ConfigError, match="not a text file"):
        load_config(blob)
    net = torch.nn.Sequential()
    net.add_module("attn", torch.nn.Module())
    net.attn.add_module("to_q", torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"model\.lora\.target_modules names \['to_qq'\].*to_q"):
        add_lora(net, LoraConfig(target_modules=["to_q", "to_qq"]))


def test_the_hacking_alarm_fires_on_a_real_run_that_collapsed():
    """Race v2's MixGRPO seed 1 (benchmarks/results/race_v2_runs): held-out 0.575 at step 60, 0.224 at 160
    while its training reward held up. Replayed step by step, the alarm rises at step 100, the second
    evaluation after the peak; DGPO seed 2, whose held-out score rose after an early dip, never raises it."""
    import json
    import logging

    from vgrpo.health import HealthWatch

    root = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "race_v2_runs"

    def first_alarm(run: str) -> int | None:
        d = json.loads((root / run / "result.json").read_text())
        evals = {e["step"]: e["overall"] for e in d["evals"]}
        watch = HealthWatch()
        for step, reward in zip(d["steps"], d["reward_mean"], strict=True):
            row = {
                "step": step,
                "reward_mean": reward,
                **({"eval/overall": evals[step]} if step in evals else {}),
            }
            if watch.update(row)["health/reward_hacking"]:
                return int(step)
        return None

    logging.getLogger("vgrpo").disabled = True
    try:
        assert first_alarm("mixgrpo_s1") == 100
        assert first_alarm("dgpo_s2") is None
    finally:
        logging.getLogger("vgrpo").disabled = False
