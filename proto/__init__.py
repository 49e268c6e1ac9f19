"""Contracts between the roles: the run configuration and the messages that cross actor boundaries.

Imports no role, no torch and no Ray (DESIGN.md "Conventions")."""

from vgrpo.proto.config import ALGORITHMS, ConfigError, RunConfig, dump_config, load_config

__all__ = ["ALGORITHMS", "ConfigError", "RunConfig", "dump_config", "load_config"]
