from __future__ import annotations

import contextlib
import logging

import pytest

from luksvm import journal


def test_journal_handler_gives_python_systemd_fields_it_sends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The real sendv checks every argument before it talks to journald; here it has no journald to
    # reach, so only an error in what we give it is ours.
    from systemd._journal import sendv

    sent: list[tuple[str, ...]] = []

    def send(*lines: str) -> None:
        sent.append(lines)
        with contextlib.suppress(OSError):  # no journald socket on this machine
            sendv(*lines)

    handler = journal.JournalHandler()
    assert handler._send is sendv
    handler._send = send
    errors: list[BaseException] = []
    monkeypatch.setattr(handler, "handleError", lambda _record: errors.append(Exception()))
    record = logging.LogRecord("luksvm", logging.INFO, __file__, 7, "guest %s", ("mail",), None)
    for name, value in journal.fields(guest="mail", message_id="guest-stopped").items():
        setattr(record, name, value)
    handler.emit(record)
    assert errors == []
    assert sent == [
        (
            "MESSAGE=guest mail",
            "PRIORITY=6",
            "SYSLOG_IDENTIFIER=luksvm",
            f"CODE_FILE={__file__}",
            "CODE_LINE=7",
            "CODE_FUNC=None",
            "LUKSVM_GUEST=mail",
            f"MESSAGE_ID={journal.MESSAGE_IDS['guest-stopped']}",
        )
    ]


def test_key_sources_takes_the_latest_unlocked_message_per_volume(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # journald does not run on the host tier: journalctl's JSON lines as it prints them
    from luksvm import run as run_module

    lines = [
        '{"LUKSVM_VOLUME":"cr_t","LUKSVM_KEY_SOURCE":"tpm2","__CURSOR":"a"}',
        '{"LUKSVM_VOLUME":"cr_n","LUKSVM_KEY_SOURCE":"tang"}',
        '{"LUKSVM_VOLUME":"cr_t","LUKSVM_KEY_SOURCE":"prompt"}',
        '{"LUKSVM_VOLUME":"cr_old"}',
        "not json",
    ]
    seen = []

    def fake(argv: list[str], **kw: object) -> run_module.Result:
        seen.append(argv)
        return run_module.Result(tuple(argv), 0, "\n".join(lines), "")

    monkeypatch.setattr(run_module, "run", fake)
    assert journal.key_sources() == {"cr_t": "prompt", "cr_n": "tang"}
    assert f"MESSAGE_ID={journal.MESSAGE_IDS['unlocked']}" in seen[0] and "-b" in seen[0]
