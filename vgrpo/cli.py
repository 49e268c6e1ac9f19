"""The ``vgrpo`` command line. Heavy imports (torch, Ray, diffusers) happen inside the commands, so that
``--help`` and configuration errors answer in well under a second."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import NoReturn

import typer

from vgrpo.proto.config import IDENTITY_KEYS, ConfigError, RunConfig, dump_config, load_config

app = typer.Typer(
    name="vgrpo",
    help="Online RL for text-to-image flow-matching models (V-GRPO, DGPO, Flow-GRPO, DiffusionNFT) on Ray.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Online RL for text-to-image flow-matching models on Ray. Every command has --help."""


CONFIG_OPT = typer.Option(
    None, "--config", "-c", help="YAML run configuration (default: the embedded default)"
)
SET_OPT = typer.Option(
    None,
    "--set",
    "-s",
    metavar="KEY=VALUE",
    help="override one field, e.g. --set train.steps=10 (repeatable)",
)


def fail(message: str, code: int = 2) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def resolve_config(config: Path | None, sets: list[str] | None) -> RunConfig:
    """The one way every command turns --config/--set into a RunConfig, or exits 2 with the problems."""
    try:
        return load_config(config, sets or [])
    except ConfigError as e:
        lines = "\n".join(f"  - {p}" for p in e.problems)
        fail(f"invalid configuration ({len(e.problems)} problem{'s' * (len(e.problems) > 1)}):\n{lines}")


@app.command("config")
def config_cmd(config: Path | None = CONFIG_OPT, sets: list[str] | None = SET_OPT) -> None:
    """Print the resolved configuration as YAML, or the errors that make it invalid."""
    typer.echo(dump_config(resolve_config(config, sets)), nl=False)


@app.command("pretrain-tiny")
def pretrain_tiny_cmd(
    out: Path = typer.Option(
        Path("tiny_sd3"),
        "--out",
        help="folder to write the diffusers pipeline to (the shipped one: core/assets/tiny_sd3)",
    ),
    recipe: str = typer.Option(
        "cpu-hour",
        "--recipe",
        help="cpu-hour (from scratch, < 1 h on 2 CPU cores), shipped (the shipped weights' seven stages, "
        "one on a GPU) or base (one plain stage, e.g. a refinement with --init-from)",
    ),
    seed: int = typer.Option(0, "--seed", help="seed of the whole recipe (data, init, noise)"),
    checkpoint_every: int = typer.Option(
        0, "--checkpoint-every", help="also save the EMA pipeline every N flow steps"
    ),
    init_from: Path | None = typer.Option(
        None, "--init-from", help="refine a saved pipeline (stage 2 only, its VAE reused)"
    ),
    flow_steps: int | None = typer.Option(
        None, "--flow-steps", min=1, help="stage-2 steps (of its first stage)"
    ),
    flow_lr: float | None = typer.Option(
        None, "--flow-lr", min=0.0, help="stage-2 learning rate (of its first stage)"
    ),
    sets: list[str] | None = typer.Option(
        None,
        "--set",
        help="KEY=VALUE of the recipe (vgrpo.pretrain_tiny.PretrainConfig; VALUE as JSON), e.g. layout=slots, "
        "caption_noise='{\"colors\": 0.4}'",
    ),
) -> None:
    """Rebuild the tiny SD3 model of the embedded default from a seed (VAE, then transformer + text encoders)."""
    from vgrpo.pretrain_tiny import pretrain, recipe_config

    def log(message: str) -> None:
        typer.echo(message)

    stage0 = {"flow_steps": flow_steps, "flow_lr": flow_lr}
    try:
        cfg = recipe_config(
            recipe,
            sets or [],
            checkpoint_every=checkpoint_every,
            **{k: v for k, v in stage0.items() if v is not None},
        )
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    try:
        path = pretrain(out, seed=seed, config=cfg, log=log, init_from=init_from)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"saved the tiny SD3 pipeline to {path}; evaluate it with: vgrpo eval --model {path}")


@app.command("tiny-model")
def tiny_model_cmd(
    family: str = typer.Option(..., "--family", help="sd3, flux, qwen_image or wan"),
    out: Path = typer.Option(..., "--out", help="folder to write the diffusers pipeline to"),
    variant: str | None = typer.Option(
        None, "--variant", help="flux only: dev (guidance-distilled, dynamic shift; default) or schnell"
    ),
) -> None:
    """Build a tiny, randomly initialised pipeline of a model family (no download), for trying the
    family's code paths on a CPU; its vgrpo.json names the native size to train at."""
    from vgrpo.tiny_families import build_tiny

    try:
        info = build_tiny(family, out, variant)
    except ValueError as e:
        fail(str(e))
    typer.echo(f"built a tiny {family} {info['class']} in {info['path']} ({info['mb']:.1f} MB)")


@app.command("eval")
def eval_cmd(
    model: str | None = typer.Option(
        None, "--model", help="diffusers pipeline: a local folder, a hub id or builtin:tiny-sd3"
    ),
    run_dir: Path | None = typer.Option(None, "--run-dir", help="evaluate a training run's policy"),
    step: int | None = typer.Option(
        None, "--step", min=0, help="with --run-dir: 0 = the starting policy; default the last checkpoint"
    ),
    best: bool = typer.Option(
        False, "--best", help="with --run-dir: the checkpoint with the best held-out score (train.keep_best)"
    ),
    benchmark: str = typer.Option(
        "shapes",
        "--benchmark",
        help="shapes (the GenEval-Shapes world), geneval (GenEval's table), ocr or pickscore",
    ),
    prompts: str = typer.Option(
        "builtin:shapes/heldout", "--prompts", help="prompt file (.jsonl / .txt) or builtin:shapes/<split>"
    ),
    out: Path | None = typer.Option(None, "--out", help="write the JSON result here"),
    images_per_prompt: int | None = typer.Option(
        None, "--images-per-prompt", min=1, help="default data.eval_images_per_prompt (GenEval: 4)"
    ),
    num_steps: int | None = typer.Option(
        None, "--num-steps", min=1, help="sampler steps (default data.eval_num_steps)"
    ),
    guidance_scale: float | None = typer.Option(
        None, "--guidance-scale", min=0.0, help="CFG w, 1 = off (default data.eval_guidance_scale)"
    ),
    sampler: str = typer.Option("dpm2", "--sampler", help="deterministic ODE solver: dpm2 or euler"),
    seed: int = typer.Option(0, "--seed", help="first image seed (fixed seeds make evaluations comparable)"),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="images per sampler forward pass"),
    grid: Path | None = typer.Option(
        None, "--grid", help="also save a PNG grid of the samples with their prompts"
    ),
    max_prompts: int | None = typer.Option(
        None, "--max-prompts", min=1, hidden=True, help="evaluate only the first N prompts"
    ),
    config: Path | None = typer.Option(
        None,
        "--config",
        "-c",
        help="YAML whose reward.servers.<benchmark>.options give the reward's model paths "
        "(default: the run's config.yaml with --run-dir, else the reward's defaults)",
    ),
) -> None:
    """Score a policy on held-out prompts with the deterministic sampler and fixed seeds (GenEval's table)."""
    import json

    if benchmark not in ("shapes", "geneval", "ocr", "pickscore"):
        fail(f"--benchmark {benchmark!r} is not available; fix: shapes, geneval, ocr or pickscore")
    if best:
        step = best_step(run_dir, step)
    for flag, path in (("--out", out), ("--grid", grid)):  # before the evaluation, not after it
        if path is not None:
            check_writable(path, flag)
    reward_model = None
    if benchmark != "shapes":
        from vgrpo.evaluate import load_benchmark_rows
        from vgrpo.reward_servers.registry import get_reward

        if prompts.startswith("builtin:"):
            fail(f"--benchmark {benchmark} needs its prompt file; fix: --prompts FILE (.jsonl or .txt)")
        try:
            bench_rows = load_benchmark_rows(prompts, benchmark, max_prompts=max_prompts)
        except (FileNotFoundError, ValueError) as e:
            fail(str(e))
        cfg_path = config
        if cfg_path is None and run_dir is not None and (run_dir / "config.yaml").is_file():
            cfg_path = run_dir / "config.yaml"
        options = dict(resolve_config(cfg_path, None).reward.server(benchmark).options) if cfg_path else {}
        try:
            reward_model = get_reward(benchmark, options)
        except (FileNotFoundError, ValueError, TypeError, ImportError) as e:
            fail(str(e))
    if sampler not in ("dpm2", "euler"):
        fail(f"--sampler {sampler!r}: eval uses a deterministic ODE solver; fix: --sampler dpm2 or euler")
    import torch

    from vgrpo.core.families import FamilyError
    from vgrpo.core.policy import ModelPathError, load_pipeline
    from vgrpo.evaluate import evaluate_policy, load_prompt_rows, print_table, save_grid, strip_images

    try:
        rows = load_prompt_rows(prompts, max_prompts=max_prompts) if reward_model is None else bench_rows
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    if (model is None) == (run_dir is None):
        fail("give exactly one of --model PATH or --run-dir DIR")
    if step is not None and run_dir is None:
        fail("--step needs --run-dir")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # sampler settings: flags, else --config's data.eval_*, else the run's, else the defaults
    eval_data = resolve_config(config, None).data if config is not None else RunConfig().data
    geometry: dict = {}
    try:
        if run_dir is not None:
            from vgrpo.checkpoints import RunDirError, load_run_pipeline

            try:
                pipe, run_cfg, step = load_run_pipeline(run_dir, step, device=device)
            except RunDirError as e:
                fail(str(e))
            model = f"{run_dir} step {step}"
            if config is None:
                eval_data = run_cfg.data
            # the run's samples: its rollout size, frames and prompt length
            geometry = dict(
                height=run_cfg.rollout.height,
                width=run_cfg.rollout.width,
                frames=run_cfg.model.frames,
                max_sequence_length=run_cfg.model.max_sequence_length,
            )
        else:
            pipe = load_pipeline(str(model), dtype=torch.float32, device=device)
    except (ModelPathError, FamilyError) as e:
        fail(str(e))
    from typing import Any

    eval_kwargs: dict[str, Any] = dict(
        images_per_prompt=images_per_prompt or eval_data.eval_images_per_prompt,
        seed=seed,
        num_steps=num_steps or eval_data.eval_num_steps,
        guidance_scale=eval_data.eval_guidance_scale if guidance_scale is None else guidance_scale,
        sampler=sampler,
        batch_size=batch_size,
        keep_images=grid is not None,
        **geometry,
    )
    if reward_model is None:
        result = evaluate_policy(pipe, rows, **eval_kwargs)
    else:
        from vgrpo.evaluate import evaluate_with_reward

        result = evaluate_with_reward(pipe, rows, reward_model, benchmark, **eval_kwargs)
    typer.echo(f"model: {model}  prompts: {prompts}")
    titles = {"shapes": "GenEval-Shapes", "geneval": "GenEval", "ocr": "OCR", "pickscore": "PickScore"}
    print_table(result, titles[benchmark])
    if grid is not None:
        captions = [p["prompt"] for p in result["prompts"] for _ in p["images"]]
        save_grid(result["images"], captions, grid, columns=max(4, eval_kwargs["images_per_prompt"] * 2))
        typer.echo(f"grid: {grid}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        payload = strip_images(result) | {"model": model, "prompts_file": prompts, "step": step}
        out.write_text(json.dumps(payload, indent=1))
        typer.echo(f"wrote {out}")


def best_step(run_dir: Path | None, step: int | None) -> int:
    """The step ``best.json`` names (``train.keep_best``), or fail saying why there is none."""
    if run_dir is None or step is not None:
        fail("--best picks a --run-dir's best checkpoint; fix: give --run-dir and drop --step")
    path = run_dir / "best.json"
    try:
        return int(json.loads(path.read_text())["step"])
    except (OSError, ValueError, KeyError) as e:
        fail(
            f"--best: {path} is missing or unreadable ({e}); the run needs train.keep_best and train.eval_every"
        )


def check_writable(path: Path, flag: str) -> None:
    """``path`` can be written (its folder made, a probe file created and removed), or fail naming it."""
    import tempfile

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".vgrpo-probe-"):
            pass
    except OSError as e:
        fail(f"{flag} {path}: cannot write there ({e.strerror or e}); fix: choose a writable path")


@app.command("score")
def score_cmd(
    reward: str = typer.Option(
        ..., "--reward", "-r", metavar="NAME[,NAME]", help="reward(s) to score with, e.g. shapes"
    ),
    manifest: Path = typer.Option(
        ...,
        "--manifest",
        "-m",
        help='JSONL, one {"image": "path.png", "prompt": "..."} a line (paths relative to it)',
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="output JSONL (default: stdout)"),
    config: Path | None = CONFIG_OPT,
    sets: list[str] | None = SET_OPT,
) -> None:
    """Score existing images: each output line is the input line plus "rewards", "score", or "error".
    `--config` / `--set` give the rewards' options (reward.servers.<name>.options: weight paths,
    endpoints), the pixel cap (reward.max_image_pixels) and, for names in reward.weights, their weights."""
    from vgrpo.score import score_manifest

    names = [r.strip() for r in reward.split(",") if r.strip()]
    cfg = resolve_config(config, sets) if (config is not None or sets) else None
    options = {n: dict(cfg.reward.server(n).options) for n in names} if cfg is not None else None
    weights = {n: float(cfg.reward.weights[n]) for n in names if n in cfg.reward.weights} if cfg else None
    pixels = cfg.reward.max_image_pixels if cfg is not None else None
    raise typer.Exit(score_manifest(names, manifest, out, weights or None, options, pixels))


@app.command("export")
def export_cmd(
    run_dir: Path = typer.Option(..., "--run-dir", help="the training run"),
    out: Path = typer.Option(..., "--out", help="output folder"),
    step: int | None = typer.Option(None, "--step", min=0, help="checkpoint step (default: the last)"),
    best: bool = typer.Option(
        False, "--best", help="the checkpoint with the best held-out score (train.keep_best)"
    ),
    merge: bool = typer.Option(False, "--merge", help="write a whole pipeline with the LoRA merged"),
) -> None:
    """Export a run's policy for diffusers: LoRA weights (pipe.load_lora_weights) or a merged pipeline."""
    from vgrpo.checkpoints import RunDirError, export_policy

    check_writable(out / "model_index.json", "--out")  # before loading the pipeline
    if best:
        step = best_step(run_dir, step)

    try:
        step, kind = export_policy(run_dir, step, out, merge)
    except RunDirError as e:
        fail(str(e))
    how = "pipe.load_lora_weights(DIR)" if kind == "lora" else "StableDiffusion3Pipeline.from_pretrained(DIR)"
    typer.echo(f"exported step {step} ({kind}) to {out}; load with {how}")


def _resume_config(run_dir: Path, sets: list[str] | None) -> RunConfig:
    """The run's own config.yaml with --set applied; a change of the run's identity is refused."""
    stored = run_dir / "config.yaml"
    if not stored.is_file():
        fail(f"--resume: {stored} does not exist; fix: point --run-dir at an existing run directory")
    base = resolve_config(stored, None)
    cfg = resolve_config(stored, sets)
    for key in IDENTITY_KEYS:
        a, b = base, cfg
        for part in key.split("."):
            a, b = getattr(a, part), getattr(b, part)
        if a != b:
            fail(
                f"--resume: --set {key} would change the run's identity ({a!r} -> {b!r}); capacity "
                "(rollout.num_workers, learner.num_ranks, ...) may change on resume, identity may not; "
                "fix: start a new run with another --run-dir"
            )
    return cfg


@app.command("train")
def train_cmd(
    config: Path | None = CONFIG_OPT,
    sets: list[str] | None = SET_OPT,
    address: str | None = typer.Option(
        None, "--address", help="join this Ray cluster (default: RAY_ADDRESS, else an embedded local Ray)"
    ),
    run_dir: Path | None = typer.Option(None, "--run-dir", help="run directory (default: runs/<name>)"),
    resume: bool = typer.Option(
        False, "--resume", help="continue the run in --run-dir from its last checkpoint"
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="start over in a --run-dir that holds a run (its files are deleted)"
    ),
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="validate the config and print the placement plan against the cluster, start nothing; "
        "exit 0 fits, 2 config error, 3 does not fit",
    ),
    resources: str | None = typer.Option(
        None,
        "--resources",
        metavar="JSON",
        help='with --dry-run: the cluster, e.g. \'{"GPU": 64, "CPU": 1024}\' or a per-node list '
        '\'[{"GPU": 8, "CPU": 96}, ...]\' (default: --address\'s cluster, else this machine)',
    ),
) -> None:
    """Train a policy online: rollout workers, reward servers and a DeepSpeed learner on Ray."""
    import time

    if resources is not None and not dry_run:
        fail("--resources describes a cluster for --dry-run; fix: add --dry-run (or drop --resources)")
    if resume and overwrite:
        fail("--resume continues the run in --run-dir, --overwrite deletes it; fix: choose one")
    if resume:
        if run_dir is None:
            fail("--resume needs --run-dir DIR (the run to continue)")
        if config is not None:
            fail("--resume reads the run's own config.yaml; drop --config (use --set for capacity changes)")
        cfg = _resume_config(run_dir, sets)
    else:
        cfg = resolve_config(config, sets)
    from vgrpo import storage

    try:
        storage.check_storage(cfg.train.storage, check_path=not dry_run)
    except ConfigError as e:
        fail("invalid configuration:\n" + "\n".join(f"  - {p}" for p in e.problems))
    run_name = run_dir.name if run_dir is not None else cfg.train.run_name or time.strftime("%Y%m%d-%H%M%S")
    mirror_to = storage.remote_run_dir(cfg.train.storage, run_name)
    if run_dir is None:
        run_dir = storage.default_run_dir(cfg.train.storage, run_name)
    if dry_run:
        raise typer.Exit(_dry_run(cfg, address, resources, run_dir, mirror_to))
    from vgrpo.core.policy import ModelPathError, resolve_model_path

    try:
        resolve_model_path(cfg.model.path)
    except ModelPathError as e:
        fail(str(e))

    from vgrpo.driver import train
    from vgrpo.launch import install_stop_handlers
    from vgrpo.roles import TrainingError

    install_stop_handlers()

    try:
        last = train(cfg, run_dir, address=address, resume=resume, overwrite=overwrite)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except TrainingError as e:
        fail(str(e), code=1)
    finally:
        if mirror_to is not None and run_dir.is_dir():
            try:
                n = storage.mirror_run_dir(run_dir, mirror_to)
                typer.echo(f"mirrored {n} files of {run_dir} to {mirror_to}", err=True)
            except Exception as e:  # the run's own outcome matters more; say what was not copied
                typer.echo(f"warning: could not mirror {run_dir} to {mirror_to}: {e}", err=True)
    typer.echo(f"done: {last} steps; run directory {run_dir}")


def _dry_run(
    cfg: RunConfig, address: str | None, resources: str | None, run_dir: Path, mirror_to: str | None
) -> int:
    """`vgrpo train --dry-run`: the placement plan against --resources, --address's cluster or this
    machine; 0 fits, 2 configuration error, 3 does not fit. Checks no model path and starts no Ray
    (unless --address is given, to read that cluster's resources)."""
    import os

    from vgrpo import placement
    from vgrpo import plan as PL

    try:
        placement.check_reward_names(cfg)
        if resources is not None:
            nodes, aggregate = placement.parse_resources(resources)
            source = "--resources"
        elif address or os.environ.get("RAY_ADDRESS"):
            where = address or os.environ["RAY_ADDRESS"]
            try:
                nodes = placement.cluster_from_address(where)
            except (ConnectionError, RuntimeError, TimeoutError, ValueError) as e:
                fail(f"--address {where}: cannot read the cluster's resources ({e})", code=1)
            aggregate, source = False, f"the cluster at {where}"
        else:
            nodes, aggregate = placement.local_cluster(cfg), False
            source = "this machine, as the embedded Ray would see it"
        plan = placement.plan_placement(cfg, nodes, aggregate, source)
        # memory per role on its GPUs (vgrpo/plan.py); reads no model file when model.family is set
        memory = PL.memory_check(cfg, nodes)
    except ConfigError as e:
        fail("invalid configuration:\n" + "\n".join(f"  - {p}" for p in e.problems))
    except placement.ResourcesError as e:
        fail(str(e))
    typer.echo(
        f"config: valid ({cfg.algorithm.name}, model {cfg.model.path}, rewards {', '.join(cfg.reward.weights)})"
    )
    typer.echo(f"run directory: {run_dir}" + (f" (mirrored to {mirror_to})" if mirror_to else ""))
    typer.echo("\n".join(memory.lines))  # before the plan: its last line stays the verdict
    typer.echo(placement.format_plan(plan))
    if plan.fits and memory.fits:
        return 0
    if not memory.fits:  # the verdict, last: the role, the bytes needed and held, the fixes
        typer.echo(f"does not fit in GPU memory: {memory.problem}")
        if plan.fits:
            return 3
    typer.echo(
        f"error: the cluster cannot hold this plan ({', '.join(plan.short)} short); fix: a bigger cluster, "
        "or fewer actors/resources (rollout.num_workers, learner.num_ranks, reward.servers.<name>.num_replicas, "
        "*.gpus / cpus)",
        err=True,
    )
    return 3


@app.command("serve-rewards")
def serve_rewards_cmd(
    config: Path | None = CONFIG_OPT,
    sets: list[str] | None = SET_OPT,
    rewards: str | None = typer.Option(
        None,
        "--rewards",
        "-r",
        metavar="NAME[,NAME]",
        help="rewards to serve (default: the keys of reward.weights); served rewards not in weights weigh 1",
    ),
    host: str = typer.Option(
        "127.0.0.1", "--host", help="interface to listen on (0.0.0.0 exposes it to the network)"
    ),
    port: int = typer.Option(8000, "--port", "-p", min=1, max=65535, help="HTTP port"),
) -> None:
    """Run the reward servers alone behind HTTP `POST /score` (Ray Serve), for other trainers or a shared
    reward tier. Joins RAY_ADDRESS if set, else starts a local Ray; SIGTERM or Ctrl-C stops everything."""
    cfg = resolve_config(config, sets)
    from vgrpo.reward_servers.serve import serve_forever

    names = [r.strip() for r in rewards.split(",") if r.strip()] if rewards else None

    def log(message: str) -> None:
        typer.echo(message, err=message.startswith(("error", "warning")))

    raise typer.Exit(serve_forever(cfg.reward, names, host, port, log))


@app.command("report")
def report_cmd(
    run_dir: Path = typer.Option(..., "--run-dir", help="run directory (finished, interrupted or running)"),
) -> None:
    """(Re)write RUN_DIR/report.html: curves, phase breakdown, sample grids and config, self-contained."""
    if not (run_dir / "metrics.jsonl").is_file() and not (run_dir / "config.yaml").is_file():
        fail(f"--run-dir {run_dir}: no metrics.jsonl or config.yaml there; is it a vgrpo run directory?")
    from vgrpo.report import write_report

    path = write_report(run_dir)
    typer.echo(f"wrote {path} ({path.stat().st_size / 1024:.0f} KB)")


@app.command("plan")
def plan_cmd(
    gpus: int | None = typer.Option(None, "--gpus", min=1, help="GPUs of the cluster, e.g. --gpus 64"),
    config: Path | None = typer.Option(
        None,
        "--config",
        "-c",
        help="YAML run configuration (default: the SD3.5-Medium V-GRPO recipe, configs/ or built in)",
    ),
    sets: list[str] | None = SET_OPT,
    embedded: bool = typer.Option(
        False, "--embedded", help="plan the embedded default (tiny SD3 + GenEval-Shapes) instead"
    ),
    batch: str | None = typer.Option(
        None, "--batch", metavar="PxG", help="target batch: prompts x group size (default: the config's)"
    ),
    cpus: int | None = typer.Option(None, "--cpus", min=1, help="a CPU-only cluster of N cores instead"),
    resources: str | None = typer.Option(
        None,
        "--resources",
        metavar="JSON",
        help='cluster as JSON or a JSON file: ray.cluster_resources() ({"GPU": 64, "CPU": 512}) or '
        '{"nodes": [...]}, optionally "gpu_memory_gb"',
    ),
    staleness: int | None = typer.Option(
        None, "--staleness", min=0, help="train.max_staleness to plan for (default: the config's)"
    ),
    measure: bool = typer.Option(
        False, "--measure", help="measure the per-phase costs on this machine with the real engines (~1 min)"
    ),
    costs_file: Path | None = typer.Option(
        None, "--costs", help="per-phase costs from a JSON (--save-costs output) or a run's metrics.jsonl"
    ),
    save_costs: Path | None = typer.Option(None, "--save-costs", help="write the costs used to this JSON"),
    gpu_type: str = typer.Option("H100", "--gpu-type", help="for FLOP estimates: H100, H200, A100, B200"),
    granularity: str = typer.Option(
        "prompt", "--granularity", help="prompt: whole groups per worker/rank (the driver); image: ideal"
    ),
    out: Path | None = typer.Option(None, "--out", help="also write the plan as JSON"),
) -> None:
    """Predict the throughput-optimal split of a cluster between rollout, reward and learner, the images/s
    and the bottleneck, from measured, benchmarked or FLOP-estimated per-phase costs."""
    import json
    import os

    from vgrpo import plan as PL

    if sum(x is not None for x in (gpus, cpus, resources)) > 1:
        fail("give one of --gpus N, --cpus N or --resources JSON")
    if granularity not in ("prompt", "image"):
        fail(f"--granularity {granularity!r}: choose prompt or image")
    if measure and costs_file is not None:
        fail("give --measure or --costs, not both")
    if config is not None or embedded:
        cfg = resolve_config(config, sets)
        title = (
            str(config) if config is not None else "the embedded default (tiny SD3 + GenEval-Shapes, V-GRPO)"
        )
    else:
        try:
            cfg, title = PL.default_config(sets)
        except ConfigError as e:
            fail("invalid configuration:\n" + "\n".join(f"  - {p}" for p in e.problems))
    try:
        work = PL.workload_of(cfg, batch, staleness)
        work.granularity = granularity  # type: ignore[assignment]
        if resources is not None:
            cluster = PL.parse_resources(resources)
        elif gpus is not None:
            cluster = PL.Cluster(gpus, "GPU")
        elif cpus is not None:
            cluster = PL.Cluster(cpus, "CPU", cpus=cpus, devices_per_node=cpus, memory_gb=1e9)
        elif measure or embedded:
            n = os.cpu_count() or 1
            cluster = PL.Cluster(n, "CPU", cpus=n, devices_per_node=n, memory_gb=1e9)
        else:
            fail("give the cluster: --gpus N (e.g. --gpus 64), --cpus N or --resources JSON")

        def costs_for(w: PL.Workload) -> PL.Costs:
            if measure:
                typer.echo("measuring per-phase costs on this machine ...", err=True)
                return PL.measure_costs(cfg, w, log=lambda m: typer.echo(m, err=True))
            if costs_file is not None:
                return PL.load_costs(costs_file)
            return PL.estimate_costs(cfg, w, "CPU" if cluster.kind == "CPU" else gpu_type)

        costs = costs_for(work)
        if costs.device != cluster.kind:
            fail(
                f"the costs are per {costs.device} ({costs.source}) but the cluster is of {cluster.kind}s; "
                f"fix: {'--cpus N' if costs.device == 'CPU' else '--gpus N'}, or costs measured on a "
                f"{cluster.kind}"
            )
        result = PL.make_plan(costs, work, cluster)
        sync = None
        if work.max_staleness >= 1:
            w0 = PL.Workload(work.prompts, work.group_size, 0, work.granularity)
            c0 = (
                costs
                if (measure or costs_file)
                else PL.estimate_costs(cfg, w0, "CPU" if cluster.kind == "CPU" else gpu_type)
            )
            sync = PL.make_plan(c0, w0, cluster)
    except PL.InfeasibleError as e:
        fail(str(e), code=3)
    except PL.PlanError as e:
        fail(str(e))
    for line in PL.render(result, title, sync):
        typer.echo(line)
    if save_costs is not None:
        save_costs.parent.mkdir(parents=True, exist_ok=True)
        save_costs.write_text(json.dumps(costs.to_json(), indent=1))
        typer.echo(f"wrote {save_costs}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(PL.plan_to_json(result), indent=1))
        typer.echo(f"wrote {out}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
