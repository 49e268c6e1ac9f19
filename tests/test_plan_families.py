"""The planner's real-size families and its memory model (vgrpo/plan.py): FLUX.1-dev, Qwen-Image and
Wan2.1-T2V-1.3B numbers chosen from model.family / the hub id without reading a model file, ZeRO's
per-rank memory against a hand computation, the recipes in configs/ fitting 80 GB GPUs, and the refusal of
a learner that cannot fit. No Ray, no torch."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vgrpo import plan as PL
from vgrpo.cli import app
from vgrpo.proto.config import load_config

ROOT = Path(__file__).resolve().parents[1]
FAMILY_RECIPES = [
    ROOT / "configs" / name
    for name in (
        "flux1dev_vgrpo_geneval.yaml",
        "flux1dev_full_zero3.yaml",
        "qwen_image_vgrpo_ocr.yaml",
        "wan21_t2v_1_3b_vgrpo.yaml",
    )
]
GPU64 = '{"GPU": 64, "CPU": 1024}'
GB80 = 80e9


def cfg_of(*sets: str):
    return load_config(None, list(sets))


# ----------------------------------------------------------------------------------------------- families


def test_family_and_hub_id_pick_the_architecture_without_files() -> None:
    flux = cfg_of("model.path=black-forest-labs/FLUX.1-dev", "model.family=flux")
    assert PL.arch_of(flux) is PL.FLUX_DEV_ARCH
    # auto: the hub id names it
    assert PL.arch_of(cfg_of("model.path=black-forest-labs/FLUX.1-dev")) is PL.FLUX_DEV_ARCH
    assert PL.arch_of(cfg_of("model.path=Qwen/Qwen-Image")) is PL.QWEN_IMAGE_ARCH
    assert PL.arch_of(cfg_of("model.path=Wan-AI/Wan2.1-T2V-1.3B-Diffusers")) is PL.WAN21_1_3B_ARCH
    assert PL.arch_of(cfg_of("model.path=stabilityai/stable-diffusion-3.5-medium")) is PL.SD35M_ARCH
    # a family set with a path the table does not know: the family's numbers, said so
    other = PL.arch_of(cfg_of("model.path=/nowhere/my-flux-finetune", "model.family=flux"))
    assert other.layers == 19 and other.single_layers == 38 and "not in the table" in other.source
    # auto with an unknown hub id and no local folder: a clear error, as before
    with pytest.raises(PL.PlanError, match=r"model\.family"):
        PL.arch_of(cfg_of("model.path=someone/unknown-model"))


def test_a_local_family_folder_is_read_with_family_auto(tmp_path: Path) -> None:
    """A local FLUX pipeline (e.g. vgrpo/tiny_families.py's) gives its own shapes when model.family is auto;
    with the family named, the table's (no file read)."""
    import json

    (tmp_path / "transformer").mkdir()
    (tmp_path / "vae").mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    t = {"num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 1, "num_single_layers": 1}
    (tmp_path / "transformer" / "config.json").write_text(
        json.dumps(t | {"in_channels": 16, "patch_size": 1})
    )
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [8, 16, 16]}))
    (tmp_path / "vgrpo.json").write_text(json.dumps({"height": 64, "width": 64, "frames": 1}))
    a = PL.arch_of(cfg_of(f"model.path={tmp_path}"))
    assert (a.family, a.hidden, a.layers, a.single_layers, a.vae_scale, a.latent_channels) == (
        "flux",
        32,
        1,
        1,
        4,
        4,
    )
    assert PL.shape_of(cfg_of(f"model.path={tmp_path}"), a).image_tokens == (64 // 4 // 2) ** 2
    assert PL.lora_params(cfg_of(f"model.path={tmp_path}", "model.lora.rank=4"), a)[0] == 4 * 2 * 32 * (8 + 3)
    assert PL.arch_of(cfg_of(f"model.path={tmp_path}", "model.family=flux")).hidden == 3072


def test_sd3_numbers_are_unchanged() -> None:
    a = PL.SD35M_ARCH
    assert (a.layers, a.hidden, a.dual_layers, a.params, a.patch, a.native) == (24, 1536, 13, 2.5e9, 2, 1024)
    d, L, dual, img, txt = 1536, 24, 13, 1024, 77 + 128
    n = img + txt
    old = (
        2 * L * 12 * d * d * n + 2 * dual * 4 * d * d * img + 4 * L * n * n * d + 4 * dual * img**2 * d
    ) / 1e12
    assert PL.transformer_tflop(a, img, txt) == pytest.approx(old)
    shape = PL.shape_of(
        cfg_of(
            "model.path=stabilityai/stable-diffusion-3.5-medium",
            "model.max_sequence_length=128",
            "rollout.height=512",
            "rollout.width=512",
        ),
        a,
    )
    assert (shape.image_tokens, shape.text_tokens) == (1024, 205)
    # LoRA on the 8 default projections: the formula the planner always used
    lora = cfg_of("model.lora.rank=32")
    assert PL.lora_params(lora, a)[0] == 32 * 2 * d * (8 * L + 4 * dual)


def test_flux_qwen_wan_shapes_and_flops() -> None:
    d = 3072
    flux = cfg_of(
        "model.family=flux",
        "model.path=black-forest-labs/FLUX.1-dev",
        "model.max_sequence_length=512",
        "rollout.height=512",
        "rollout.width=512",
        "rollout.guidance_scale=3.5",
    )
    s = PL.shape_of(flux, PL.FLUX_DEV_ARCH)
    assert (s.image_tokens, s.text_tokens) == (32 * 32, 512)  # 64x64 latents packed 2x2; T5's 512
    n, L = 1536, 19 + 38
    hand = (2 * L * 12 * d * d * n + 4 * L * n * n * d) / 1e12
    assert PL.transformer_tflop(PL.FLUX_DEV_ARCH, 1024, 512) == pytest.approx(hand)
    assert 20 < hand < 23
    assert PL.cfg_forwards(flux, PL.FLUX_DEV_ARCH) == 1  # the guidance embedding: one forward a step
    qwen = cfg_of(
        "model.family=qwen_image",
        "model.path=Qwen/Qwen-Image",
        "rollout.guidance_scale=4",
        "model.max_sequence_length=1024",
    )
    assert PL.cfg_forwards(qwen, PL.QWEN_IMAGE_ARCH) == 2  # true CFG
    assert PL.shape_of(qwen, PL.QWEN_IMAGE_ARCH).text_tokens == 1024
    assert (
        PL.cfg_forwards(cfg_of("model.family=qwen_image", "rollout.guidance_scale=1"), PL.QWEN_IMAGE_ARCH)
        == 1
    )
    wan = cfg_of(
        "model.family=wan", "model.path=Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "model.max_sequence_length=512"
    )
    w = PL.shape_of(wan, PL.WAN21_1_3B_ARCH)  # the family's defaults: 81 frames at 480x832
    assert (w.height, w.width, w.frames, w.latent_frames) == (480, 832, 81, 21)
    assert w.image_tokens == 21 * 30 * 52 == 32760
    w33 = PL.shape_of(cfg_of("model.family=wan", "model.frames=33"), PL.WAN21_1_3B_ARCH)
    assert (w33.latent_frames, w33.image_tokens) == (9, 14040)
    assert PL.block_tokens(PL.WAN21_1_3B_ARCH, w33) == 14040  # cross-attention: the text is not in the blocks
    assert PL.cfg_forwards(cfg_of("model.family=wan", "rollout.guidance_scale=5"), PL.WAN21_1_3B_ARCH) == 2
    # params from the published shapes
    dw, f = 1536, 8960
    assert PL.WAN21_1_3B_ARCH.params == pytest.approx(30 * (8 * dw * dw + 2 * dw * f), rel=0.03)
    assert PL.QWEN_IMAGE_ARCH.params == pytest.approx(60 * 36 * d * d, rel=0.01)
    assert PL.FLUX_DEV_ARCH.params == pytest.approx(19 * 36 * d * d + 38 * 15 * d * d, rel=0.02)


def test_lora_params_counted_from_the_target_modules_shapes() -> None:
    d = 3072
    flux = cfg_of("model.family=flux", "model.lora.rank=32")
    # 8 projections in each of 19 double blocks, to_q/k/v in each of 38 single blocks, d x d each
    assert PL.lora_params(flux, PL.FLUX_DEV_ARCH)[0] == 32 * 2 * d * (19 * 8 + 38 * 3)
    qwen = cfg_of("model.family=qwen_image", "model.lora.rank=32")
    assert PL.lora_params(qwen, PL.QWEN_IMAGE_ARCH)[0] == 32 * 2 * d * 60 * 8
    wan = cfg_of("model.family=wan", "model.lora.rank=32")
    assert PL.lora_params(wan, PL.WAN21_1_3B_ARCH)[0] == 32 * 2 * 1536 * 30 * 8  # self + cross attention
    mlp = cfg_of(
        "model.family=flux", "model.lora.rank=8", "model.lora.target_modules=[ff.net.0.proj, nothing_here]"
    )
    n, notes = PL.lora_params(mlp, PL.FLUX_DEV_ARCH)
    assert n == 8 * (d + 4 * d) * 19 and "nothing_here" in notes[0]


# ----------------------------------------------------------------------------------------------- memory


def hand_full_ft(stage: int, ranks: int, offload_opt: bool, offload_par: bool) -> dict[str, float]:
    """ZeRO's accounting for a 1e9-parameter full fine-tune, written out independently of plan.py:
    2 B bf16 weight + 2 B gradient + 12 B Adam (fp32 master + 2 moments) per parameter; ZeRO-1 shards
    the 12 B, ZeRO-2 the gradient too, ZeRO-3 the weights too (gathering at most 1e9 parameters at a
    time); the learner's old policy is a whole bf16 copy outside DeepSpeed."""
    psi, n = 1e9, ranks
    old = 2 * psi
    if stage == 3:
        weights = old + 2 * min(psi, 1e9) + (0 if offload_par else 2 * psi / n)
    else:
        weights = old + 2 * psi
    grads = 2 * psi / n if stage >= 2 else 2 * psi
    if offload_opt:
        optim, host = 0.0, (12 + 4) * psi / n
    else:
        optim, host = (12 * psi / n if stage >= 1 else 12 * psi), 0.0
    if offload_par:
        host += 2 * psi / n
    return {"weights": weights, "gradients": grads, "optimizer": optim, "host": host}


@pytest.mark.parametrize(
    "stage,offload_opt,offload_par",
    [
        (0, False, False),
        (1, False, False),
        (2, False, False),
        (3, False, False),
        (1, True, False),
        (2, True, False),
        (3, True, False),
        (3, True, True),
        (3, False, True),
    ],
)
def test_zero_memory_of_a_1b_full_finetune_matches_the_hand_computation(
    stage: int, offload_opt: bool, offload_par: bool
) -> None:
    arch = replace(PL.SD35M_ARCH, params=1e9)
    cfg = cfg_of(
        "model.lora=null",
        f"learner.zero_stage={stage}",
        f"learner.offload_optimizer={str(offload_opt).lower()}",
        f"learner.offload_params={str(offload_par).lower()}",
        "learner.num_ranks=4",
        "algorithm.vgrpo.ref_kl_beta=0",
    )
    m = PL.learner_memory(cfg, arch)
    at = m.at(4)
    want = hand_full_ft(stage, 4, offload_opt, offload_par)
    for part in ("weights", "gradients", "optimizer"):
        assert at[part] == pytest.approx(want[part]), part
    assert m.host_total(4) == pytest.approx(want["host"])
    assert m.total(4) == pytest.approx(sum(at.values()))
    # a reference policy (V-GRPO's ref_kl_beta > 0) adds a second whole copy
    ref = PL.learner_memory(
        cfg.model_copy(update={"algorithm": cfg_of("algorithm.vgrpo.ref_kl_beta=0.5").algorithm}), arch
    )
    assert ref.at(4)["weights"] - at["weights"] == pytest.approx(2e9)


def test_activations_follow_the_stated_per_layer_model() -> None:
    """tokens x hidden x blocks x 56 B per forward held, without checkpointing; with it, a 2 B bf16 input
    per block + 8 B, and one block's 56 B for the micro batch while it is recomputed."""
    sets = [
        "model.path=stabilityai/stable-diffusion-3.5-medium",
        "model.max_sequence_length=128",
        "rollout.height=512",
        "rollout.width=512",
        "rollout.group_size=24",
        "learner.micro_batch_size=8",
        "algorithm.vgrpo.n_mc=4",
    ]
    b, f, t, d, L = 24, 4, 1229, 1536, 24  # the micro step is one whole group of 24, not micro_batch_size 8
    no = PL.learner_activations(cfg_of(*sets), PL.SD35M_ARCH)[0]
    assert no == pytest.approx(b * f * t * d * L * 56)
    ck = PL.learner_activations(cfg_of(*sets, "learner.activation_checkpointing=true"), PL.SD35M_ARCH)[0]
    assert ck == pytest.approx(b * f * t * d * (2 * L + 8) + b * t * d * 56)


def test_memory_model_reproduces_the_measured_sd35m_rows() -> None:
    """benchmarks/results/gpu.json (H200, SD3.5-M shapes, LoRA r32, V-GRPO N_MC 4): peak GiB per row; the
    model stays within -3 % / +15 % of each (it errs high: a margin). The rollout rows ran without text
    encoders."""
    base = [
        "model.path=stabilityai/stable-diffusion-3.5-medium",
        "model.max_sequence_length=128",
        "rollout.height=512",
        "rollout.width=512",
        "model.lora.rank=32",
        "algorithm.vgrpo.n_mc=4",
    ]
    gib = 2**30
    for micro, ckpt, measured in ((2, False, 24.72), (4, False, 43.8), (8, True, 8.85), (24, True, 16.49)):
        cfg = cfg_of(
            *base,
            f"rollout.group_size={micro}",
            f"learner.micro_batch_size={micro}",
            f"learner.activation_checkpointing={str(ckpt).lower()}",
        )
        model = PL.learner_memory(cfg, PL.SD35M_ARCH).total(1) / gib
        assert 0.97 * measured <= model <= 1.15 * measured, (micro, ckpt, model, measured)
    arch = replace(PL.SD35M_ARCH, text_encoder_params=0.0)
    for batch, measured in ((8, 8.86), (16, 12.88), (32, 20.91)):
        model = (
            PL.rollout_memory(
                cfg_of(*base, f"rollout.batch_size={batch}", "rollout.guidance_scale=1"), arch
            ).total()
            / gib
        )
        assert 0.97 * measured <= model <= 1.15 * measured, (batch, model, measured)


# ----------------------------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("recipe", FAMILY_RECIPES, ids=lambda p: p.name)
def test_family_recipe_fits_80gb_gpus(recipe: Path) -> None:
    cfg = load_config(recipe)
    assert cfg.model.family != "auto" and cfg.model.path.count("/") == 1  # a hub id, named family
    check = PL.memory_check(cfg, [{"GPU": 64, "CPU": 1024}])
    assert check.fits, check.problem
    assert any(line.lstrip().startswith("learner") for line in check.lines)
    arch = PL.arch_of(cfg)
    mem = PL.memory_of(cfg, arch)
    assert mem["learner"].total(cfg.learner.num_ranks) < GB80 and mem["rollout"].total() < GB80
    # the planner's own split fits too, with the config's settings (no activation checkpointing added)
    work = PL.workload_of(cfg)
    plan = PL.make_plan(PL.estimate_costs(cfg, work), work, PL.Cluster(64))
    assert plan.learner_memory == "learner" and not plan.memory_notes
    # the placement the recipe asks for
    res = CliRunner().invoke(app, ["train", "--config", str(recipe), "--dry-run", "--resources", GPU64])
    assert res.exit_code == 0, res.output
    assert res.output.strip().splitlines()[-1].startswith("fits:")


def test_flux_full_finetune_at_zero0_is_refused_with_role_and_bytes() -> None:
    recipe = ROOT / "configs" / "flux1dev_full_zero3.yaml"
    bad = ["learner.zero_stage=0", "learner.offload_optimizer=false"]
    cfg = load_config(recipe, bad)
    check = PL.memory_check(cfg, [{"GPU": 64, "CPU": 1024}])
    assert not check.fits
    assert "the learner needs" in check.problem and "80,000,000,000 bytes" in check.problem
    need = PL.learner_memory(cfg, PL.FLUX_DEV_ARCH).total(cfg.learner.num_ranks)
    assert f"{need:,.0f} bytes" in check.problem and need > 200e9
    assert "learner.zero_stage=3" in check.problem and "LoRA" in check.problem
    work = PL.workload_of(cfg)
    with pytest.raises(PL.InfeasibleError, match=r"the learner needs .* bytes .*ZeRO-0.*fix:"):
        PL.make_plan(PL.estimate_costs(cfg, work), work, PL.Cluster(64))
    res = CliRunner().invoke(
        app, ["plan", "--config", str(recipe), "--gpus", "64", *[x for s in bad for x in ("--set", s)]]
    )
    assert res.exit_code == 3, res.output
    assert "Traceback" not in res.output and "the learner needs" in res.output and "bytes" in res.output


def test_plan_adds_activation_checkpointing_only_when_it_is_what_fits() -> None:
    """The SD3.5-M recipe without checkpointing would hold 24 images x 4 forwards of activations (~250 GB);
    `vgrpo plan` plans it with checkpointing and says so."""
    cfg, _ = PL.default_config()
    work = PL.workload_of(cfg)
    plan = PL.make_plan(PL.estimate_costs(cfg, work), work, PL.Cluster(64))
    if cfg.learner.activation_checkpointing:
        assert not plan.memory_notes
    else:
        assert plan.learner_memory == "learner_planned"
        assert "activation_checkpointing=true" in plan.memory_notes[0]
        assert any("PLANNED WITH activation checkpointing" in line for line in PL.render(plan, "t"))


def test_a_family_dry_run_and_plan_open_no_model_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither `vgrpo plan` nor the dry run's memory check opens a file of the model (the recipes' hub ids
    are not on this machine), nor resolves its path."""
    import vgrpo.core.policy as policy

    def no_resolve(path: object) -> None:
        raise AssertionError(f"resolve_model_path({path!r}) called")

    monkeypatch.setattr(policy, "resolve_model_path", no_resolve)
    opened: list[str] = []
    active = [True]

    def hook(event: str, args: tuple) -> None:
        if active[0] and event == "open" and args and isinstance(args[0], (str, bytes, Path)):
            opened.append(str(args[0]))

    sys.addaudithook(hook)
    try:
        for recipe in FAMILY_RECIPES:
            cfg = load_config(recipe)
            # a local-looking path that does not exist, with the family named: still the table's numbers
            local = cfg.model_copy(
                update={"model": cfg.model.model_copy(update={"path": "/nonexistent/model"})}
            )
            assert PL.memory_check(local, None).fits
            res = CliRunner().invoke(app, ["plan", "--config", str(recipe), "--gpus", "64"])
            assert res.exit_code == 0, res.output
            assert "memory per GPU" in res.output
            res = CliRunner().invoke(
                app, ["train", "--config", str(recipe), "--dry-run", "--resources", GPU64]
            )
            assert res.exit_code == 0, res.output
    finally:
        active[0] = False
    # the model ids, the fake local path, and the Hugging Face cache's model folders (models--owner--name)
    ids = ("FLUX.1-dev", "Qwen-Image", "Wan2.1", "/nonexistent/model", "models--", ".cache/huggingface/hub")
    touched = [p for p in opened if any(i.lower() in p.lower() for i in ids)]
    assert not touched, touched
    assert any(p.endswith(FAMILY_RECIPES[0].name) for p in opened)  # the hook saw the opens
