"""The error types that carry luksvm's exit codes (0 ok, 1 warnings, 2 failure, 64 usage/config)."""

from __future__ import annotations

EXIT_OK = 0
EXIT_WARN = 1
EXIT_FAIL = 2
EXIT_USAGE = 64


class LuksvmError(Exception):
    """An expected failure: printed as one readable message, never as a traceback."""

    exit_code = EXIT_FAIL
    # True once the message went out through the log (with its journal fields): the log reaches
    # stderr or, in a unit, the journal that stderr would reach, so `main` does not print it again
    logged = False


class UsageError(LuksvmError):
    """Bad command line or bad configuration: nothing was changed."""

    exit_code = EXIT_USAGE
