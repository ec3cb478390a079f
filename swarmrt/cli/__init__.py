"""The ``swarmrt`` console script: one subcommand per role (see :mod:`swarmrt.cli.main`)."""

from swarmrt.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
