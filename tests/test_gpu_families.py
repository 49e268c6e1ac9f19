"""benchmarks/gpu.py --family flux|wan --cpu-smoke: the FLUX.1-dev and Wan2.1 GPU benchmark's code path
(rollout batch through the family's velocity and decode, a V-GRPO learner micro step with activation
checkpointing, the weight round trips) on tiny versions of the same diffusers classes, on CPU.

The GPU run itself (docs/benchmarks.md, "Real-size families on a GPU") needs CUDA; the smoke runs check
that the command it documents builds, runs and reports: ~10-25 s a family on two CPU threads, so they are
marked ``slow`` (``pytest -m slow tests/test_gpu_families.py``); the option and preset checks are fast and
run by default."""

from __future__ import annotations

import json
import math

import pytest


@pytest.fixture(scope="module")
def gpu_bench(load_benchmark):
    return load_benchmark("gpu")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["flux", "wan"])
def test_cpu_smoke_of_a_family(gpu_bench, family, tmp_path):
    out = tmp_path / f"gpu_{family}.json"
    assert gpu_bench.main(["--family", family, "--cpu-smoke", "--no-docs", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    meta = data["meta"]
    assert meta["family"] == family and meta["mode"].startswith("cpu-smoke")
    for section in ("rollout", "learner"):
        rows = data[section]
        assert rows, f"no {section} rows"
        for row in rows:
            assert row["family"] == family and "error" not in row, row
            assert math.isfinite(row["seconds"]) and row["seconds"] > 0, row
            assert math.isfinite(row["images_per_s"]) and row["images_per_s"] > 0, row
    assert all(r["checkpointing"] for r in data["learner"])  # the families' rows are checkpointed
    assert all(math.isfinite(r["loss"]) for r in data["learner"])
    assert {r["kind"] for r in data["weights"]} == {"full", "lora"}
    assert all(r["family"] == family and r["tensors"] > 0 for r in data["weights"])
    flops = data["flops"]
    assert flops["transformer_forward_gflop"] > 0 and flops["learner_step_gflop"] > 0
    if family == "flux":  # guidance 3.5 through the embedding: one forward a step
        assert meta["guidance_mode"] == "embedded"
        assert [r["forwards_per_step"] for r in data["rollout"]] == [1]
        assert meta["latent_shape"] == [16, 8, 8]  # 64 packed channels = 16 latent channels
    else:  # CFG 5: [uncond; cond] in one forward of 2B; 5 frames -> 2 latent frames
        assert meta["guidance_mode"] == "cfg" and meta["sample_unit"] == "clip"
        assert [r["forwards_per_step"] for r in data["rollout"]] == [2]
        assert meta["latent_shape"] == [16, 2, 4, 6] and data["rollout"][0]["frames"] == 5
    section = gpu_bench.render_markdown(data)
    assert "clips/s" in section if family == "wan" else "guidance (embedded)" in section


def test_family_options_are_checked(gpu_bench, tmp_path):
    with pytest.raises(SystemExit, match="--family wan"):
        gpu_bench.main(["--family", "flux", "--frames", "5", "--cpu-smoke", "--json", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="4k \\+ 1"):
        gpu_bench.main(["--family", "wan", "--frames", "6", "--cpu-smoke", "--json", str(tmp_path / "x")])


def test_real_size_presets_match_the_recipes(gpu_bench):
    """What the GPU run would build: FLUX.1-dev at 512² (1024 packed tokens, 16 images, G 16) and Wan2.1
    at 33 frames of 480x832 (9 x 30 x 52 = 14,040 tokens, 4 clips, G 8), N_MC 4, LoRA r32."""
    import argparse

    flux = gpu_bench.preset_for(argparse.Namespace(family="flux", cpu_smoke=False, frames=None))
    assert gpu_bench.latent_shape(flux) == (16, 64, 64) and gpu_bench.image_tokens(flux) == 1024
    assert flux["rollout_batches"] == (16,) and flux["learner_ckpt"] == (16,) and flux["n_mc"] == 4
    assert flux["transformer"]["num_layers"] == 19 and flux["transformer"]["num_single_layers"] == 38
    assert 1.8 < flux["shift"] < 1.9  # FLUX's dynamic shift at 1024 tokens: exp(0.63)
    wan = gpu_bench.preset_for(argparse.Namespace(family="wan", cpu_smoke=False, frames=None))
    assert gpu_bench.latent_shape(wan) == (16, 9, 60, 104) and gpu_bench.image_tokens(wan) == 14040
    assert wan["rollout_batches"] == (4,) and wan["learner_ckpt"] == (8,) and wan["rollout_guidance"] == 5.0
    wan81 = gpu_bench.preset_for(argparse.Namespace(family="wan", cpu_smoke=False, frames=81))
    assert gpu_bench.latent_shape(wan81) == (16, 21, 60, 104)
