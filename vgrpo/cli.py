"""The ``vgrpo`` command line. Heavy imports (torch, Ray, diffusers) happen inside the commands, so that
``--help`` and configuration errors answer in well under a second."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NoReturn

import typer

from vgrpo.proto.config import ConfigError, RunConfig, dump_config, load_config

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
        help="folder to write the diffusers pipeline to (the shipped one: vgrpo/assets/tiny_sd3)",
    ),
    seed: int = typer.Option(0, "--seed", help="seed of the whole recipe (data, init, noise)"),
    checkpoint_every: int = typer.Option(
        0, "--checkpoint-every", help="also save the EMA pipeline every N flow steps"
    ),
) -> None:
    """Rebuild the tiny SD3 model of the embedded default from a seed (VAE, then transformer + text encoders)."""
    from vgrpo.tiny_sd3 import PretrainConfig, pretrain

    def log(message: str) -> None:
        typer.echo(message)

    path = pretrain(out, seed=seed, config=PretrainConfig(checkpoint_every=checkpoint_every), log=log)
    typer.echo(f"saved the tiny SD3 pipeline to {path}; evaluate it with: vgrpo eval --model {path}")


@app.command("eval")
def eval_cmd(
    model: str | None = typer.Option(
        None, "--model", help="diffusers pipeline: a local folder, a hub id or builtin:tiny-sd3"
    ),
    run_dir: Path | None = typer.Option(None, "--run-dir", help="evaluate a training run's policy"),
    step: int | None = typer.Option(
        None, "--step", min=0, help="with --run-dir: 0 = the starting policy; default the last checkpoint"
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
    images_per_prompt: int = typer.Option(4, "--images-per-prompt", min=1, help="GenEval samples 4"),
    num_steps: int = typer.Option(10, "--num-steps", min=1, help="sampler steps"),
    guidance_scale: float = typer.Option(1.0, "--guidance-scale", min=0.0, help="CFG w (1 = off)"),
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

    from vgrpo.evaluate import evaluate_policy, load_prompt_rows, print_table, save_grid, strip_images
    from vgrpo.policy import ModelPathError, load_pipeline

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
    try:
        if run_dir is not None:
            from vgrpo.checkpoints import RunDirError, load_run_pipeline

            try:
                pipe, run_cfg, step = load_run_pipeline(run_dir, step, device=device)
            except RunDirError as e:
                fail(str(e))
            model = f"{run_dir} step {step}"
            r = run_cfg.rollout
            num_steps, guidance_scale = r.num_steps, r.guidance_scale
        else:
            pipe = load_pipeline(str(model), dtype=torch.float32, device=device)
    except ModelPathError as e:
        fail(str(e))
    from typing import Any

    eval_kwargs: dict[str, Any] = dict(
        images_per_prompt=images_per_prompt,
        seed=seed,
        num_steps=num_steps,
        guidance_scale=guidance_scale,
        sampler=sampler,
        batch_size=batch_size,
        keep_images=grid is not None,
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
        save_grid(result["images"], captions, grid, columns=max(4, images_per_prompt * 2))
        typer.echo(f"grid: {grid}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        payload = strip_images(result) | {"model": model, "prompts_file": prompts, "step": step}
        out.write_text(json.dumps(payload, indent=1))
        typer.echo(f"wrote {out}")


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
) -> None:
    """Score existing images: each output line is the input line plus "rewards", "score", or "error"."""
    from vgrpo.score import score_manifest

    raise typer.Exit(score_manifest([r.strip() for r in reward.split(",") if r.strip()], manifest, out))


@app.command("export")
def export_cmd(
    run_dir: Path = typer.Option(..., "--run-dir", help="the training run"),
    out: Path = typer.Option(..., "--out", help="output folder"),
    step: int | None = typer.Option(None, "--step", min=0, help="checkpoint step (default: the last)"),
    merge: bool = typer.Option(False, "--merge", help="write a whole pipeline with the LoRA merged"),
) -> None:
    """Export a run's policy for diffusers: LoRA weights (pipe.load_lora_weights) or a merged pipeline."""
    from vgrpo.checkpoints import RunDirError, export_policy

    try:
        step, kind = export_policy(run_dir, step, out, merge)
    except RunDirError as e:
        fail(str(e))
    how = "pipe.load_lora_weights(DIR)" if kind == "lora" else "StableDiffusion3Pipeline.from_pretrained(DIR)"
    typer.echo(f"exported step {step} ({kind}) to {out}; load with {how}")


IDENTITY_KEYS = ("model.path", "model.lora", "algorithm.name", "train.seed")


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
) -> None:
    """Train a policy online: rollout workers, reward servers and a DeepSpeed learner on Ray."""
    import time

    if resume:
        if run_dir is None:
            fail("--resume needs --run-dir DIR (the run to continue)")
        if config is not None:
            fail("--resume reads the run's own config.yaml; drop --config (use --set for capacity changes)")
        cfg = _resume_config(run_dir, sets)
    else:
        cfg = resolve_config(config, sets)
        if run_dir is None:
            run_dir = Path("runs") / (cfg.train.run_name or time.strftime("%Y%m%d-%H%M%S"))
    assert run_dir is not None
    from vgrpo.policy import ModelPathError, resolve_model_path

    try:
        resolve_model_path(cfg.model.path)
    except ModelPathError as e:
        fail(str(e))

    from vgrpo.driver import TrainingError, install_stop_handlers, train

    install_stop_handlers()

    try:
        last = train(cfg, run_dir, address=address, resume=resume)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except TrainingError as e:
        fail(str(e), code=1)
    typer.echo(f"done: {last} steps; run directory {run_dir}")


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


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
