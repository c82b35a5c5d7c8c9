"""Errors that reach users: each carries a one-line message and a process exit code."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
PLOT_NEEDS_MATPLOTLIB = "--plot needs matplotlib: pip install 'spa-compiler[plot]'"


class SpaError(Exception):
    """Base class for errors spa reports to users without a traceback."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class BadInputError(SpaError):
    """The input model (or an argument) is unusable: missing, malformed, invalid or unsafe."""

    exit_code = EXIT_BAD_INPUT


class UnsafeExternalDataError(BadInputError):
    """External data that would be read from outside the model's folder."""


class PassError(SpaError):
    """A compiler pass found its precondition or postcondition violated."""


class SpaWarning(UserWarning):
    """Something spa read and interpreted rather than refused; the command line prints it as
    one line (``spa: warning: ...``)."""
