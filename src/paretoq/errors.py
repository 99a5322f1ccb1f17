"""Errors a user can cause. The CLI prints them as one line on stderr and exits with status 2."""


class UserError(Exception):
    """A mistake in the user's input (file, flag, folder): the message says what and how to fix it."""


class DataError(UserError):
    """A bad data file or line (the message names the file and the line number)."""


class ModelFolderError(UserError):
    """A model folder that is missing, incomplete or corrupt."""
