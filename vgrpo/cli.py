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


CONFIG_OPT = typer.Option(None, "--config", "-c", help="YAML run configuration (default: the embedded default)")
SET_OPT = typer.Option(
    None, "--set", "-s", metavar="KEY=VALUE", help="override one field, e.g. --set train.steps=10 (repeatable)"
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


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
