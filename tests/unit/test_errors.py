"""LuksvmError carries its fix and exit code as data."""

from __future__ import annotations

import pytest

from luksvm import cli
from luksvm.errors import EXIT_FAIL, EXIT_USAGE, LuksvmError, UsageError


def test_the_fix_travels_as_data_and_prints_after_the_message() -> None:
    error = LuksvmError("keyfile /k has mode 0644", fix="chmod 0400 /k")
    assert (error.message, error.fix, error.exit_code) == (
        "keyfile /k has mode 0644",
        "chmod 0400 /k",
        EXIT_FAIL,
    )
    assert str(error) == "keyfile /k has mode 0644; fix: chmod 0400 /k"
    assert str(LuksvmError("plain")) == "plain"


def test_exit_code_is_the_class_default_unless_given() -> None:
    assert UsageError("bad").exit_code == EXIT_USAGE
    assert LuksvmError("odd", exit_code=EXIT_USAGE).exit_code == EXIT_USAGE
    assert UsageError("bad", exit_code=3).exit_code == 3


def test_main_prints_message_and_fix_and_returns_the_code(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def fail(_args: object) -> int:
        raise LuksvmError("it broke", fix="mend it", exit_code=EXIT_USAGE)

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    status = parser._subparsers._group_actions[0].choices["status"]  # type: ignore[union-attr]
    status.set_defaults(func=fail)
    assert cli.main(["status"]) == EXIT_USAGE
    assert capsys.readouterr().err == "luksvm: it broke; fix: mend it\n"
