"""`vgrpo tiny-model`: tiny random pipelines of every family (vgrpo/tiny_families.py) that plain diffusers
loads offline as the family's own class and that generate at the native size their vgrpo.json names."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vgrpo.tiny_families import build_tiny

PROMPT = "a photo of an orange triangle and a purple diamond"
CASES = {  # test id: (family, variant, pipeline class)
    "sd3": ("sd3", None, "StableDiffusion3Pipeline"),
    "flux-dev": ("flux", None, "FluxPipeline"),
    "flux-schnell": ("flux", "schnell", "FluxPipeline"),
    "qwen_image": ("qwen_image", None, "QwenImagePipeline"),
    "wan": ("wan", None, "WanPipeline"),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Each case built once; every test below reads these folders."""
    root = tmp_path_factory.mktemp("tiny_families")
    return {case: Path(build_tiny(fam, root / case, var)["path"]) for case, (fam, var, _) in CASES.items()}


def load(folder: Path):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("case", CASES)
def test_folder_is_small_float32_and_loads_as_the_family_class(folders, case):
    from safetensors import safe_open

    family, variant, cls = CASES[case]
    folder = folders[case]
    size_mb = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20
    assert size_mb < 20
    weights = list(folder.rglob("*.safetensors"))
    assert weights and not list(folder.rglob("*.bin"))
    for f in weights:
        with safe_open(f, "pt") as st:
            assert {st.get_slice(k).get_dtype() for k in st.keys()} == {"F32"}, f  # noqa: SIM118
    side = json.loads((folder / "vgrpo.json").read_text())
    expected_variant = (variant or "dev") if family == "flux" else None
    assert side["family"] == family and side["variant"] == expected_variant
    assert type(load(folder)).__name__ == cls


@pytest.mark.parametrize("case", CASES)
def test_native_size_fits_the_pipeline_and_generates_finite_output(folders, case):
    family, _, _ = CASES[case]
    pipe = load(folders[case])
    side = json.loads((folders[case] / "vgrpo.json").read_text())
    h, w, frames = side["height"], side["width"], side["frames"]
    assert h <= 64 and w <= 64
    kwargs = {}
    if family == "wan":
        spatial, temporal = pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal
        by = spatial * pipe.transformer.config.patch_size[1]
        assert frames == 5 and (frames - 1) % temporal == 0 and h % by == 0 and w % by == 0
        kwargs["num_frames"] = frames
    else:
        assert frames == 1
        if family in ("flux", "qwen_image"):  # 2×2 latent packing
            by = 2 * pipe.vae_scale_factor
            assert h % by == 0 and w % by == 0 and (h // by) * (w // by) <= 256
    out = pipe(
        prompt=PROMPT,
        height=h,
        width=w,
        num_inference_steps=2,
        generator=torch.Generator("cpu").manual_seed(0),
        output_type="np",
        **kwargs,
    )
    pixels = np.asarray(out.frames if family == "wan" else out.images)
    assert pixels.shape == ((1, frames, h, w, 3) if family == "wan" else (1, h, w, 3))
    assert np.isfinite(pixels).all()


def test_flux_variants_carry_the_real_guidance_and_shift_settings(folders):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    for case, guidance, dynamic, shift in (
        ("flux-dev", True, True, 3.0),
        ("flux-schnell", False, False, 1.0),
    ):
        transformer = FluxTransformer2DModel.load_config(folders[case] / "transformer")
        scheduler = FlowMatchEulerDiscreteScheduler.load_config(folders[case] / "scheduler")
        assert transformer["guidance_embeds"] is guidance
        assert scheduler["use_dynamic_shifting"] is dynamic and scheduler["shift"] == shift
        assert (scheduler["base_shift"], scheduler["max_shift"]) == (0.5, 1.15)
        assert (scheduler["base_image_seq_len"], scheduler["max_image_seq_len"]) == (256, 4096)


def test_qwen_template_prefix_is_exactly_the_tokens_the_pipeline_drops(folders):
    from vgrpo.tiny_models import GRAMMAR_WORDS

    pipe = load(folders["qwen_image"])
    tok, template = pipe.tokenizer, pipe.prompt_template_encode
    prefix = template.split("{}")[0]
    assert len(tok(prefix).input_ids) == pipe.prompt_template_encode_start_idx == 34
    # what survives the drop starts with the prompt itself, one token per grammar word
    ids = tok(template.format(PROMPT)).input_ids
    kept = tok.convert_ids_to_tokens(ids[pipe.prompt_template_encode_start_idx :])
    words = PROMPT.split()
    assert kept[: len(words)] == [words[0]] + ["Ġ" + w for w in words[1:]]
    assert kept[len(words)] == "<|im_end|>"
    for word in GRAMMAR_WORDS:
        assert len(tok(word).input_ids) == len(tok(" " + word).input_ids) == 1, word
    text = "Any other text, e.g. 'Zebra #42'."
    assert tok.decode(tok(text).input_ids) == text  # byte-level: nothing is unknown
    assert pipe.text_encoder.config.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")


def test_t5_tokenizer_gives_one_token_per_grammar_word(folders):
    tok = load(folders["wan"]).tokenizer
    ids = tok(PROMPT).input_ids
    assert len(ids) == len(PROMPT.split()) + 1 and ids[-1] == tok.eos_token_id
    assert tok.unk_token_id not in tok("Zebra 42!").input_ids


def test_same_command_gives_the_same_weights(folders, tmp_path):
    from safetensors.torch import load_file

    again = Path(build_tiny("wan", tmp_path / "wan")["path"])
    for f in folders["wan"].rglob("*.safetensors"):
        first, second = load_file(f), load_file(again / f.relative_to(folders["wan"]))
        assert first.keys() == second.keys()
        assert all(torch.equal(first[k], second[k]) for k in first)


def test_unknown_family_or_misplaced_variant_is_a_named_error(tmp_path):
    with pytest.raises(ValueError, match="sd3, flux, qwen_image, wan"):
        build_tiny("sdxl", tmp_path / "x")
    with pytest.raises(ValueError, match="only the flux family"):
        build_tiny("wan", tmp_path / "x", variant="dev")
    with pytest.raises(ValueError, match="dev, schnell"):
        build_tiny("flux", tmp_path / "x", variant="pro")
    assert not (tmp_path / "x").exists()


def vgrpo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vgrpo.cli", *args], capture_output=True, text=True, timeout=180
    )


def test_cli_builds_flux_and_rejects_an_unknown_family_without_traceback(tmp_path):
    ok = vgrpo("tiny-model", "--family", "flux", "--out", str(tmp_path / "flux"))
    assert ok.returncode == 0, ok.stderr
    # the last line is ours (on a machine without CUDA, DeepSpeed's accelerator notice may precede it)
    line = ok.stdout.splitlines()[-1]
    assert (
        line.startswith("built a tiny flux FluxPipeline") and "MB" in line and str(tmp_path / "flux") in line
    )
    assert (tmp_path / "flux" / "model_index.json").is_file()
    bad = vgrpo("tiny-model", "--family", "sdxl", "--out", str(tmp_path / "bad"))
    assert bad.returncode != 0
    assert "Traceback" not in bad.stderr and bad.stderr.strip().count("\n") == 0
    assert "sd3, flux, qwen_image, wan" in bad.stderr
