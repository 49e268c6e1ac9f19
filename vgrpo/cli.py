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
    model: str = typer.Option(
        ..., "--model", help="diffusers pipeline: a local folder, a hub id or builtin:tiny-sd3"
    ),
    benchmark: str = typer.Option("shapes", "--benchmark", help="shapes (the GenEval-Shapes world)"),
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
) -> None:
    """Score a policy on held-out prompts with the deterministic sampler and fixed seeds (GenEval's table)."""
    import json

    if benchmark != "shapes":
        fail(f"--benchmark {benchmark!r} is not available here; fix: --benchmark shapes")
    if sampler not in ("dpm2", "euler"):
        fail(f"--sampler {sampler!r}: eval uses a deterministic ODE solver; fix: --sampler dpm2 or euler")
    import torch

    from vgrpo.evaluate import evaluate_policy, load_prompt_rows, print_table, save_grid, strip_images
    from vgrpo.policy import ModelPathError, load_pipeline

    try:
        rows = load_prompt_rows(prompts, max_prompts=max_prompts)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    try:
        pipe = load_pipeline(
            model, dtype=torch.float32, device="cuda" if torch.cuda.is_available() else "cpu"
        )
    except ModelPathError as e:
        fail(str(e))
    result = evaluate_policy(
        pipe,
        rows,
        images_per_prompt=images_per_prompt,
        seed=seed,
        num_steps=num_steps,
        guidance_scale=guidance_scale,
        sampler=sampler,  # type: ignore[arg-type]
        batch_size=batch_size,
        keep_images=grid is not None,
    )
    print_table(result, title=f"GenEval-Shapes: {model}")
    if grid is not None:
        captions = [p["prompt"] for p in result["prompts"] for _ in p["images"]]
        save_grid(result["images"], captions, grid, columns=max(4, images_per_prompt * 2))
        typer.echo(f"grid: {grid}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        payload = strip_images(result) | {"model": model, "prompts_file": prompts}
        out.write_text(json.dumps(payload, indent=1))
        typer.echo(f"wrote {out}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
