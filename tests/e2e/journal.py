"""The VM's systemd journal as the runner exported it (`journalctl -o json --all`, every boot).

Every entry carries its boot id and monotonic (per boot) and realtime timestamps, so tests can
prove ordering: "the volume was unlocked before libvirtd started", "the guest stopped before the
volume was locked during the shutdown of boot 1".

    journal = result.journal
    unlocked = journal.job("luksvm-unlock@cr_imap_encr.service", boot=result.boot_id)
    libvirtd = journal.job("libvirtd.service", boot=result.boot_id)
    assert_order(unlocked, libvirtd)
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

Pattern = Union[str, "re.Pattern[str]"]


@dataclass(frozen=True)
class Entry:
    fields: Mapping[str, Any]

    def get(self, name: str, default: str = "") -> str:
        value = self.fields.get(name)
        if value is None:
            return default
        if isinstance(value, list):  # journalctl -o json: binary data as a list of byte values
            if value and isinstance(value[0], int):
                return bytes(value).decode("utf-8", "replace")
            return str(value[0])  # a field repeated within one entry: its first value
        return str(value)

    @property
    def message(self) -> str:
        return self.get("MESSAGE")

    @property
    def boot_id(self) -> str:
        return self.get("_BOOT_ID")

    @property
    def monotonic(self) -> int:
        """Microseconds since this entry's boot."""
        return int(self.get("__MONOTONIC_TIMESTAMP", "0"))

    @property
    def realtime(self) -> int:
        """Microseconds since the epoch (the VM's clock)."""
        return int(self.get("__REALTIME_TIMESTAMP", "0"))

    @property
    def unit(self) -> str:
        """The unit that logged the entry (_SYSTEMD_UNIT)."""
        return self.get("_SYSTEMD_UNIT")

    @property
    def about(self) -> str:
        """The unit systemd's own messages are about (UNIT), e.g. "Started libvirtd.service"."""
        return self.get("UNIT")

    @property
    def identifier(self) -> str:
        return self.get("SYSLOG_IDENTIFIER")

    def __str__(self) -> str:
        seconds = self.monotonic / 1e6
        who = self.identifier or self.unit or "?"
        pid = self.get("_PID")
        return (
            f"[{self.boot_id[:8]} {seconds:11.6f}] {who}{f'[{pid}]' if pid else ''}: {self.message}"
        )


class Journal:
    def __init__(self, entries: Iterable[Entry]):
        self.entries = list(entries)

    @classmethod
    def load(cls, path: Path) -> Journal:
        if not path.exists():
            return cls([])
        entries = []
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.strip():
                    entries.append(Entry(json.loads(line)))
        return cls(entries)

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def boot_ids(self) -> list[str]:
        """Boot ids in the order the boots happened (the seed's boot comes first on a clone)."""
        first_seen: dict[str, int] = {}
        for entry in self.entries:
            first_seen.setdefault(entry.boot_id, entry.realtime)
        return sorted(first_seen, key=lambda boot: first_seen[boot])

    def find(
        self,
        message: Pattern | None = None,
        *,
        boot: str | None = None,
        unit: str | None = None,
        about: str | None = None,
        identifier: str | None = None,
        **fields: str,
    ) -> list[Entry]:
        """Entries matching every given filter; `message` is a regular expression (re.search)."""
        regex = re.compile(message) if isinstance(message, str) else message
        found = []
        for entry in self.entries:
            if boot is not None and entry.boot_id != boot:
                continue
            if unit is not None and entry.unit != unit:
                continue
            if about is not None and entry.about != about:
                continue
            if identifier is not None and entry.identifier != identifier:
                continue
            if any(entry.get(name) != value for name, value in fields.items()):
                continue
            if regex is not None and not regex.search(entry.message):
                continue
            found.append(entry)
        return found

    def first(self, message: Pattern | None = None, **filters: Any) -> Entry:
        """The first matching entry; an AssertionError that says what was searched for if none."""
        found = self.find(message, **filters)
        if not found:
            raise AssertionError(f"no journal entry matches {_describe(message, filters)}")
        return found[0]

    def last(self, message: Pattern | None = None, **filters: Any) -> Entry:
        found = self.find(message, **filters)
        if not found:
            raise AssertionError(f"no journal entry matches {_describe(message, filters)}")
        return found[-1]

    def job(
        self, unit: str, job_type: str = "start", *, boot: str | None = None, result: str = "done"
    ) -> Entry:
        """systemd's entry saying a start (or stop) job of `unit` ended ("Started X.", "Finished
        X.", "Stopped X."); `result` is the job result (done, failed, dependency, timeout...)."""
        return self.last(about=unit, JOB_TYPE=job_type, JOB_RESULT=result, boot=boot)

    def job_began(self, unit: str, job_type: str = "start", *, boot: str | None = None) -> Entry:
        """systemd's entry saying a start (or stop) job of `unit` began ("Starting X...")."""
        for entry in reversed(self.find(about=unit, JOB_TYPE=job_type, boot=boot)):
            if not entry.get("JOB_RESULT"):
                return entry
        raise AssertionError(f"no journal entry: {job_type} job of {unit} began (boot {boot})")

    def text(self, *, boot: str | None = None) -> str:
        """Human-readable lines, for failure messages and debugging."""
        return "\n".join(
            str(entry) for entry in self.entries if boot is None or entry.boot_id == boot
        )


def assert_order(*entries: Entry) -> None:
    """The entries happened in the given order, within one boot."""
    for earlier, later in zip(entries, entries[1:]):
        if earlier.boot_id != later.boot_id:
            raise AssertionError(f"entries from different boots:\n  {earlier}\n  {later}")
        if earlier.monotonic > later.monotonic:
            raise AssertionError(f"out of order:\n  {earlier}\nhappened after\n  {later}")


def _describe(message: Pattern | None, filters: Mapping[str, Any]) -> str:
    parts = []
    if message is not None:
        pattern = message if isinstance(message, str) else message.pattern
        parts.append(f"message ~ {pattern!r}")
    parts += [f"{name}={value!r}" for name, value in filters.items() if value is not None]
    return ", ".join(parts) or "anything"
