"""Logging: readable lines on stderr and structured entries in journald; sd_notify for units.

Structured fields ride on log records as upper-case attributes: pass them with
`extra=fields(volume=..., guest=..., message_id=...)`.
"""

from __future__ import annotations

import logging
import os
import sys

from luksvm.errors import LuksvmError

JOURNAL_SOCKET = "/run/systemd/journal/socket"

# MESSAGE_IDs of key events (generated once with `systemd-id128 new`), so admins can
# `journalctl MESSAGE_ID=…`.
MESSAGE_IDS = {
    "unlocked": "3f1c7e1a9d8b4e5f8a2b6c4d0e9f1a27",
    "locked": "7b2d4c6e8f0a4b1c9d3e5f7a1b2c4d6e",
    "guest-started": "a1c3e5f7092b4d6f8a0c2e4f6b8d0a1c",
    "guest-stopped": "c2e4a6b8d0f24a6c8e0b2d4f6a8c0e2b",
    "guest-timeout": "e4a6c8e0b2d44f6a8c0e2b4d6f8a0c2e",
    "guest-start-refused": "50f7e0f532e64804b517c8081724a86c",
    "header-backup": "5d7f9b1d3f5a4c7e9b1d3f5a7c9e1b3d",
    "key-enrolled": "984e7fff631a47e2bdf056ee2a61883f",
    "key-removed": "9af8fb46b1f1441cb03332b8183f1270",
    "backup-stale": "5c3ac3f058384d99a70846225e08f006",
    "unlock-attempt-failed": "b78d0b12ce2845e28a2231caba460562",
    "header-backup-failed": "efd693e08b614030b418950fe381b1ae",
    "guest-trimmed": "2768f3cfb2a043d6acf9e6cfa6593bb2",
    "volume-grown": "965931c84545415299954d547d021dec",
    "shutdown-announced": "1f0f1944ac04491bbff12f67cd87187d",
}

log = logging.getLogger("luksvm")


def fields(
    *,
    volume: str | None = None,
    guest: str | None = None,
    message_id: str | None = None,
    key_source: str | None = None,
) -> dict[str, str]:
    out = {}
    if key_source is not None:
        out["LUKSVM_KEY_SOURCE"] = key_source
    if volume is not None:
        out["LUKSVM_VOLUME"] = volume
    if guest is not None:
        out["LUKSVM_GUEST"] = guest
    if message_id is not None:
        out["MESSAGE_ID"] = MESSAGE_IDS[message_id]
    return out


def logged_error(message: str, extra: dict[str, str], logger: logging.Logger = log) -> LuksvmError:
    """Log `message` as an error with its journal fields and return the error to raise: `main`
    prints no second copy of it."""
    logger.error("%s", message, extra=extra)
    error = LuksvmError(message)
    error.logged = True
    return error


class JournalHandler(logging.Handler):
    """Sends each record to journald with its upper-case extra attributes as fields."""

    def __init__(self) -> None:
        super().__init__()
        # Lazily: `luksvm --help` must not load systemd. The C module alone: systemd.journal,
        # which re-exports this sendv, also loads its journal reader, datetime and uuid: ~5 ms
        # on the host, ~70 ms in the e2e VM, in every guest unit's start and stop.
        try:
            from systemd._journal import sendv
        except ImportError:
            from systemd.journal import sendv
        self._send = sendv

    def emit(self, record: logging.LogRecord) -> None:
        try:
            extra = {k: v for k, v in vars(record).items() if k.isupper()}
            priority = {
                logging.DEBUG: 7,
                logging.INFO: 6,
                logging.WARNING: 4,
                logging.ERROR: 3,
                logging.CRITICAL: 2,
            }.get(record.levelno, 6)
            self._send(
                f"MESSAGE={self.format(record)}",
                f"PRIORITY={priority}",
                "SYSLOG_IDENTIFIER=luksvm",
                f"CODE_FILE={record.pathname}",
                f"CODE_LINE={record.lineno:d}",
                f"CODE_FUNC={record.funcName}",
                *(f"{name}={value}" for name, value in extra.items()),
            )
        except Exception:
            self.handleError(record)


def _stderr_is_journal() -> bool:
    """True when systemd connected our stderr to journald (JOURNAL_STREAM=dev:inode)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


def setup(verbose: bool = False) -> None:
    """stderr for people, journald (when there is one) for structured fields."""
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.handlers.clear()
    log.propagate = False
    to_journal = os.path.exists(JOURNAL_SOCKET)
    if to_journal:
        try:
            journal_handler = JournalHandler()
        except ImportError:
            to_journal = False
        else:
            log.addHandler(journal_handler)
    if not (to_journal and _stderr_is_journal()):
        stderr = logging.StreamHandler(sys.stderr)
        stderr.setFormatter(logging.Formatter("luksvm: %(message)s"))
        log.addHandler(stderr)


def notify(*lines: str) -> bool:
    """sd_notify(3): send `lines` to $NOTIFY_SOCKET. False when there is no socket (not a unit, or
    a unit without NotifyAccess= for this process)."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    import socket  # lazily: a guest start that waits for nothing sends nothing (~30 ms in the VM)

    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto("\n".join(lines).encode(), address)
        except OSError:
            return False
    return True


def key_sources(timeout: float = 10) -> dict[str, str]:
    """Volume → the LUKSVM_KEY_SOURCE of its latest "unlocked" message in this boot's journal
    (tpm2, tang, keyfile, …); {} when the journal cannot be read."""
    import json

    from luksvm.run import run

    result = run(
        [
            "journalctl", "-b", "-o", "json", "--no-pager",
            "--output-fields=LUKSVM_VOLUME,LUKSVM_KEY_SOURCE",
            f"MESSAGE_ID={MESSAGE_IDS['unlocked']}",
        ],
        timeout=timeout,
        check=False,
    )  # fmt: skip
    found: dict[str, str] = {}
    if result.returncode != 0:
        return found
    for line in result.stdout.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        volume, source = entry.get("LUKSVM_VOLUME"), entry.get("LUKSVM_KEY_SOURCE")
        if isinstance(volume, str) and isinstance(source, str):
            found[volume] = source  # oldest first: the latest wins
    return found
