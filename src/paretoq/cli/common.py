"""What the subcommands share: the model argument, given as ``--model DIR`` or as a positional ``DIR``."""

from __future__ import annotations

import argparse

from paretoq.errors import UserError


def add_model_argument(parser: argparse.ArgumentParser, help: str) -> None:
    """``paretoq <cmd> DIR`` and ``paretoq <cmd> --model DIR`` alike (a folder or a cached Hub id)."""
    parser.add_argument("model_folder", nargs="?", metavar="MODEL", help=f"{help} (or --model)")
    parser.add_argument("--model", help=help)


def model_argument(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The model the user named, once; a mistake raises ``UserError``."""
    given = [m for m in (args.model_folder, args.model) if m]
    if not given:
        raise UserError(f"the model is required: {parser.prog} --model DIR (or {parser.prog} DIR)")
    if len(given) == 2 and given[0] != given[1]:
        raise UserError(f"two models given ({given[0]} and --model {given[1]}): give one")
    args.model = given[0]
    return given[0]
