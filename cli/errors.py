"""The CLI's error tree. ``CliError`` carries one line for the user; ``main`` prints it to stderr
and exits non-zero, never with a traceback."""

from __future__ import annotations


class CliError(Exception):
    exit_code = 1


class InputError(CliError):
    """A flag or a spec file is wrong; the message names the field and the fix."""

    exit_code = 2


class ApiError(CliError):
    """The controller refused the call or could not be reached."""
