"""An ``argparse`` parser whose mistakes become ``UserError`` (one line on stderr, exit 2)."""

from __future__ import annotations

import argparse

from paretoq.errors import UserError


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` that raises ``UserError`` instead of printing usage and exiting."""

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")
