"""`luksvm metrics`: the host's state as Prometheus metrics, for node_exporter's textfile collector.

The one writer of luksvm.prom. Each source (status, libvirt, doctor, header backups, the journal)
is read on its own; a source that cannot be read is itself a metric (`luksvm_libvirt_up 0`,
`luksvm_source_up{source="journal"} 0`) and the file is written all the same, so that alert rules
fire on it instead of on a missing file. No sample carries a timestamp; each family has one HELP
and one TYPE line; names follow Prometheus's conventions (base units, _seconds,
_timestamp_seconds, _total).

Journal entries (MESSAGE_IDs from luksvm.journal) give what happened: the last trim of each guest,
header backup failures in the current boot, and how each guest stopped at the last shutdown (the
newest boot before the current one that stopped guests).
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

from luksvm import __version__, backup, config, files, virt
from luksvm.config import Config
from luksvm.errors import LuksvmError
from luksvm.journal import MESSAGE_IDS

# How a guest stopped (LUKSVM_STOP_ACTION of a guest-stopped or guest-timeout entry). Every action
# is a series (0 or 1), so a changed action never leaves a stale series behind.
STOP_ACTIONS = ("shutdown", "destroyed", "saved", "left-running")
# doctor's status as a gauge: alert on > 0; a skipped check is -1, so it never counts as healthy.
DOCTOR_VALUES = {"OK": 0, "WARN": 1, "FAIL": 2, "SKIP": -1}
SOURCES = ("status", "doctor", "header-backups", "journal")
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")


@dataclass(frozen=True)
class Family:
    """One metric family: its HELP text, TYPE and samples (labels, value)."""

    name: str
    help: str
    type: str = "gauge"
    samples: tuple[tuple[tuple[tuple[str, str], ...], float], ...] = ()


@dataclass
class _Families:
    """Families in the order first declared; samples appended to them."""

    order: list[str] = field(default_factory=list)
    helps: dict[str, tuple[str, str]] = field(default_factory=dict)
    samples: dict[str, list[tuple[tuple[tuple[str, str], ...], float]]] = field(
        default_factory=dict
    )

    def declare(self, name: str, help: str, kind: str = "gauge") -> None:
        if not _NAME.match(name):
            raise ValueError(f"not a metric name: {name!r}")
        if name not in self.helps:
            self.order.append(name)
            self.helps[name] = (help, kind)
            self.samples[name] = []

    def add(self, name: str, value: float, **labels: str) -> None:
        self.samples[name].append((tuple(sorted(labels.items())), float(value)))

    def frozen(self) -> list[Family]:
        return [
            Family(n, self.helps[n][0], self.helps[n][1], tuple(self.samples[n]))
            for n in self.order
        ]


# --- the journal ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One luksvm journal entry: its MESSAGE_ID name (a key of journal.MESSAGE_IDS), boot, wall
    time (seconds since the epoch), priority and its LUKSVM_* fields."""

    message: str
    boot: str
    time: float
    priority: int
    fields: Mapping[str, str]


def read_journal(root: str) -> list[Entry] | None:
    """luksvm's entries of interest from the system journal (under ROOT: ROOT/var/log/journal),
    oldest first; None when there is no journal to read."""
    try:
        from systemd import journal as sd_journal
    except ImportError:
        return None
    names = {v: k for k, v in MESSAGE_IDS.items()}
    if os.path.realpath(root) == "/":
        reader = sd_journal.Reader(flags=sd_journal.SYSTEM_ONLY)
    else:
        directory = os.path.join(root, "var/log/journal")
        if not os.path.isdir(directory):
            return None
        reader = sd_journal.Reader(path=directory)
    with reader:
        for name in ("guest-stopped", "guest-timeout", "guest-trimmed", "header-backup-failed"):
            reader.add_match(MESSAGE_ID=MESSAGE_IDS[name])
            reader.add_disjunction()
        entries = []
        for raw in reader:
            message_id = raw.get("MESSAGE_ID")
            key = names.get(message_id.hex if hasattr(message_id, "hex") else str(message_id))
            if key is None:
                continue
            boot = raw.get("_BOOT_ID")
            entries.append(
                Entry(
                    key,
                    boot.hex if hasattr(boot, "hex") else str(boot),
                    raw["__REALTIME_TIMESTAMP"].timestamp(),
                    int(raw.get("PRIORITY", 6)),
                    {k: str(v) for k, v in raw.items() if k.startswith("LUKSVM_")},
                )
            )
    entries.sort(key=lambda e: e.time)
    return entries


def current_boot(root: str, entries: Sequence[Entry]) -> str:
    """The running boot's id: the kernel's on the live host; under another ROOT, the boot of the
    newest entry (that tree's journal speaks of another machine)."""
    if os.path.realpath(root) == "/":
        try:
            with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
                return f.read().strip().replace("-", "")
        except OSError:
            pass
    return entries[-1].boot if entries else ""


@dataclass(frozen=True)
class Shutdown:
    """How the guests stopped in the last boot before the current one that stopped any."""

    time: float  # the last stop entry of that boot
    actions: Mapping[str, str]  # guest → one of STOP_ACTIONS
    seconds: Mapping[str, float]  # guest → seconds from the ACPI request to stopped


def last_shutdown(entries: Sequence[Entry], boot: str) -> Shutdown | None:
    stops = [
        e
        for e in entries
        if e.boot != boot
        and e.fields.get("LUKSVM_GUEST")
        and (
            e.message == "guest-stopped"
            or (e.message == "guest-timeout" and e.fields.get("LUKSVM_STOP_ACTION"))
        )
    ]
    if not stops:
        return None
    previous = stops[-1].boot
    actions: dict[str, str] = {}
    seconds: dict[str, float] = {}
    for entry in (e for e in stops if e.boot == previous):
        guest = entry.fields["LUKSVM_GUEST"]
        action = entry.fields.get("LUKSVM_STOP_ACTION", "shutdown")
        if action in STOP_ACTIONS:
            actions[guest] = action
        if "LUKSVM_STOP_SECONDS" in entry.fields:
            with contextlib.suppress(ValueError):
                seconds[guest] = float(entry.fields["LUKSVM_STOP_SECONDS"])
    return Shutdown(max(e.time for e in stops if e.boot == previous), actions, seconds)


# --- gathering ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sources:
    """Where each part comes from; tests replace the live ones."""

    status: Callable[[Config], Mapping[str, Any]]
    libvirt_up: Callable[[str], bool]
    doctor: Callable[[str], Any]  # root → doctor.Report
    journal: Callable[[str], list[Entry] | None]


def _status(cfg: Config) -> Mapping[str, Any]:
    from luksvm import status

    return status.gather(cfg)


def _libvirt_up(uri: str) -> bool:
    try:
        with virt.connect(uri, readonly=True):
            return True
    except LuksvmError:
        return False


def _doctor(root: str) -> Any:
    from luksvm import doctor

    return doctor.doctor(root)


LIVE = Sources(_status, _libvirt_up, _doctor, read_journal)


def collect(root: str = "/", sources: Sources = LIVE, *, now: float | None = None) -> list[Family]:
    """Every family, read from the host under ROOT. Never raises for a source that cannot be
    read: that source's luksvm_source_up is 0 and its families have no samples."""
    began = time.monotonic()
    now = time.time() if now is None else now
    out = _Families()
    up: dict[str, bool] = {}
    out.declare(
        "luksvm_build_info", "luksvm's version and the Python running it; the value is always 1."
    )
    out.add("luksvm_build_info", 1, version=__version__, python=platform.python_version())
    cfg, problems = config.read(root)
    out.declare(
        "luksvm_config_problems",
        "Problems found in luksvm's configuration (luksvm config check lists them).",
    )
    out.add("luksvm_config_problems", len(problems))
    _state(out, cfg, sources, up)
    _backups(out, cfg, root, now, up)
    _journal(out, cfg, root, sources, up)
    _doctor_status(out, root, sources, up)
    out.declare("luksvm_source_up", "Whether luksvm metrics could read this source (1) or not (0).")
    for source in SOURCES:
        out.add("luksvm_source_up", int(up.get(source, False)), source=source)
    out.declare("luksvm_metrics_duration_seconds", "How long luksvm metrics took to gather.")
    out.add("luksvm_metrics_duration_seconds", round(time.monotonic() - began, 3))
    return out.frozen()


def _state(out: _Families, cfg: Config, sources: Sources, up: dict[str, bool]) -> None:
    out.declare("luksvm_libvirt_up", "Whether libvirt answered at luksvm's URI (1) or not (0).")
    out.add("luksvm_libvirt_up", int(sources.libvirt_up(cfg.settings.uri)))
    out.declare("luksvm_volume_unlocked", "Whether the volume's dm-crypt mapping is open.")
    out.declare(
        "luksvm_volume_device_present", "Whether the volume's backing device exists (1) or not."
    )
    out.declare(
        "luksvm_volume_needed",
        "Whether a guest that luksvm starts at boot uses the volume (its lock is an outage).",
    )
    out.declare("luksvm_guest_running", "Whether libvirt reports the guest running.")
    out.declare("luksvm_guest_may_start", "Whether all the guest's volumes are unlocked.")
    out.declare("luksvm_guest_boot_start", "Whether luksvm.target starts the guest at boot.")
    try:
        data = sources.status(cfg)
    except LuksvmError:
        up["status"] = False
        return
    up["status"] = True
    boot_guests = {g.name for g in cfg.guests if not any(v.noauto for v in cfg.volumes_of(g.name))}
    needed = {v for g in cfg.guests if g.name in boot_guests for v in g.volumes}
    for v in data["volumes"]:
        out.add("luksvm_volume_unlocked", int(v["state"] == "unlocked"), volume=v["name"])
        out.add("luksvm_volume_device_present", int(bool(v["device_present"])), volume=v["name"])
        out.add("luksvm_volume_needed", int(v["name"] in needed), volume=v["name"])
    for g in data["guests"]:
        out.add("luksvm_guest_running", int(g["state"] == "running"), guest=g["name"])
        out.add("luksvm_guest_may_start", int(bool(g["may_start"])), guest=g["name"])
        out.add("luksvm_guest_boot_start", int(g["name"] in boot_guests), guest=g["name"])


def _backups(out: _Families, cfg: Config, root: str, now: float, up: dict[str, bool]) -> None:
    out.declare(
        "luksvm_header_backup_last_success_timestamp_seconds",
        "When header-backup last took or confirmed the volume's newest header backup as current "
        "(absent: the volume has none).",
    )
    out.declare(
        "luksvm_header_backup_max_age_seconds",
        "[backup] max_age: doctor and the alert rules want a newer backup than this.",
    )
    out.add("luksvm_header_backup_max_age_seconds", cfg.settings.backup_max_age / 1_000_000)
    directory = os.path.join(root, cfg.settings.backup_dir.lstrip("/"))
    try:
        for volume in cfg.volumes:
            newest = next(
                (b for b in backup.list_backups(os.path.join(directory, volume.name)) if not b.raw),
                None,
            )
            if newest is not None:
                out.add(
                    "luksvm_header_backup_last_success_timestamp_seconds",
                    backup.last_confirmed(newest).timestamp(),
                    volume=volume.name,
                )
    except OSError:
        up["header-backups"] = False
        return
    up["header-backups"] = True


def _journal(out: _Families, cfg: Config, root: str, sources: Sources, up: dict[str, bool]) -> None:
    out.declare(
        "luksvm_header_backup_failures_total",
        "Header backups of the volume that failed since this boot (journal).",
        "counter",
    )
    out.declare(
        "luksvm_trim_last_success_timestamp_seconds",
        "When fstrim last ran inside the guest through luksvm trim (journal).",
    )
    out.declare(
        "luksvm_last_shutdown_timestamp_seconds",
        "When luksvm stopped the last guest at the last shutdown that stopped guests (journal).",
    )
    out.declare(
        "luksvm_last_shutdown_guest_stop_seconds",
        "How long the guest took to stop at the last shutdown, policy included (journal).",
    )
    out.declare(
        "luksvm_last_shutdown_guest_action",
        "How the guest stopped at the last shutdown: 1 for the action taken, 0 for the others.",
    )
    try:
        entries = sources.journal(root)
    except (OSError, ValueError):
        entries = None
    up["journal"] = entries is not None
    if entries is None:
        return
    boot = current_boot(root, entries)
    failures = {v.name: 0 for v in cfg.volumes}
    trims: dict[str, float] = {}
    for entry in entries:
        volume = entry.fields.get("LUKSVM_VOLUME", "")
        guest = entry.fields.get("LUKSVM_GUEST", "")
        if entry.message == "header-backup-failed" and entry.boot == boot and volume:
            failures[volume] = failures.get(volume, 0) + 1
        elif entry.message == "guest-trimmed" and guest:
            trims[guest] = entry.time
    for volume, count in failures.items():
        out.add("luksvm_header_backup_failures_total", count, volume=volume)
    for guest, moment in trims.items():
        out.add("luksvm_trim_last_success_timestamp_seconds", moment, guest=guest)
    shutdown = last_shutdown(entries, boot)
    if shutdown is None:
        return
    out.add("luksvm_last_shutdown_timestamp_seconds", shutdown.time)
    for guest, seconds in shutdown.seconds.items():
        out.add("luksvm_last_shutdown_guest_stop_seconds", seconds, guest=guest)
    for guest, taken in shutdown.actions.items():
        for action in STOP_ACTIONS:
            out.add(
                "luksvm_last_shutdown_guest_action",
                int(action == taken),
                guest=guest,
                action=action,
            )


def _doctor_status(out: _Families, root: str, sources: Sources, up: dict[str, bool]) -> None:
    out.declare(
        "luksvm_doctor_status",
        "luksvm doctor's result per check and subject (0 ok, 1 warning, 2 failure, -1 skipped).",
    )
    out.declare("luksvm_doctor_duration_seconds", "How long luksvm doctor's checks took.")
    try:
        report = sources.doctor(root)
    except LuksvmError:
        up["doctor"] = False
        return
    up["doctor"] = True
    worst: dict[tuple[str, str], int] = {}
    for f in report.findings:
        value = DOCTOR_VALUES[f.status]
        key = (f.check, f.subject)
        worst[key] = max(worst.get(key, value), value)
    for (check, subject), value in worst.items():
        out.add("luksvm_doctor_status", value, check=check, subject=subject)
    out.add("luksvm_doctor_duration_seconds", round(report.duration, 3))


# --- the text format ------------------------------------------------------------------------------


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    return repr(int(value)) if value == int(value) and abs(value) < 2**53 else repr(value)


def render(families: Iterable[Family]) -> str:
    """The Prometheus text exposition format: HELP and TYPE once per family, then its samples;
    no timestamps."""
    lines = []
    for family in families:
        lines.append(f"# HELP {family.name} {_help(family.help)}")
        lines.append(f"# TYPE {family.name} {family.type}")
        for labels, value in family.samples:
            text = ",".join(f'{k}="{_label(v)}"' for k, v in labels)
            lines.append(
                f"{family.name}{{{text}}} {_value(value)}"
                if text
                else f"{family.name} {_value(value)}"
            )
    return "\n".join(lines) + "\n"


def write_textfile(path: str, text: str) -> None:
    """Write the textfile so that node_exporter reads the old or the new file, never half (a
    temporary file in the same directory, renamed over it); readable by node_exporter (0644)."""
    path = os.path.abspath(path)
    why = ""
    if not os.path.isdir(os.path.dirname(path)):
        why = "no such directory"
    else:
        try:
            files.write_atomically(path, text, mode=0o644)
        except OSError as error:
            why = error.strerror or str(error)
    if why:
        raise LuksvmError(
            f"cannot write {path}: {why}",
            fix="give the directory node_exporter's --collector.textfile.directory reads "
            "(Debian: /var/lib/prometheus/node-exporter)",
        )
