"""Errors a user can cause. The CLI prints them as one line on stderr and exits with status 2."""

import argparse


class UserError(Exception):
    """A mistake in the user's input (file, flag, folder): the message says what and how to fix it."""


class DataError(UserError):
    """A bad data file or line (the message names the file and the line number)."""


class QuantConfigError(UserError, ValueError):
    """An invalid quantization setting; the message says the fix."""


class ModelFolderError(UserError):
    """A model folder that is missing, incomplete or corrupt."""


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose mistakes raise ``UserError`` instead of printing usage and exiting."""

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")
