"""The error types that carry luksvm's exit codes (0 ok, 1 warnings, 2 failure, 64 usage/config)."""

from __future__ import annotations

EXIT_OK = 0
EXIT_WARN = 1
EXIT_FAIL = 2
EXIT_USAGE = 64


class LuksvmError(Exception):
    """An expected failure: printed as one readable message, never as a traceback.

    `message` says what was found and where; `fix` (optional) what to do about it. Both travel as
    data: doctor shows them as a finding and its fix, the command line prints them as one line
    ("MESSAGE; fix: FIX"), and nothing parses them back out of the text.
    """

    exit_code = EXIT_FAIL
    # True once the message went out through the log (with its journal fields): the log reaches
    # stderr or, in a unit, the journal that stderr would reach, so `main` does not print it again
    logged = False

    def __init__(self, message: str, *, fix: str = "", exit_code: int | None = None) -> None:
        self.message = message
        self.fix = fix
        if exit_code is not None:
            self.exit_code = exit_code
        super().__init__(self.text())

    def text(self) -> str:
        """The message with its fix, as printed."""
        return f"{self.message}; fix: {self.fix}" if self.fix else self.message


class UsageError(LuksvmError):
    """Bad command line or bad configuration: nothing was changed."""

    exit_code = EXIT_USAGE
