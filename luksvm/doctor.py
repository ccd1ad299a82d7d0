"""Health checks: what is wrong on this host, why it matters, and the exact fix.

Each check is one function registered with @check; it looks at the host through `Host` (whose
probes run each command at most once, however many checks ask) and yields Findings. The runner
runs the checks concurrently and returns their findings in registry order.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, Callable, Final, Literal, TypeVar

from luksvm import (
    apply,
    backup,
    blockdev,
    config,
    cryptsetup,
    guests,
    keys,
    lvm,
    systemctl,
    tokens,
    trim,
    units,
)
from luksvm.config import Config, Problem, Volume
from luksvm.cryptsetup import LuksHeader
from luksvm.durations import format_timespan
from luksvm.errors import EXIT_FAIL, EXIT_OK, EXIT_WARN, LuksvmError, UsageError

Status = Literal["OK", "WARN", "FAIL", "SKIP"]
OK: Final = "OK"
WARN: Final = "WARN"
FAIL: Final = "FAIL"
SKIP: Final = "SKIP"
STATUSES: tuple[Status, ...] = (SKIP, OK, WARN, FAIL)  # from best to worst
EXIT_CODES: dict[Status, int] = {OK: EXIT_OK, SKIP: EXIT_OK, WARN: EXIT_WARN, FAIL: EXIT_FAIL}
HOST = "host"  # the subject of findings about the host as a whole

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Finding:
    status: Status
    subject: str  # the volume, guest, file or "host" it speaks of
    message: str  # what was found and why it matters
    fix: str = ""  # a command or config line to paste
    check: str = ""  # set by the runner

    @classmethod
    def ok(cls, subject: str, message: str) -> Finding:
        return cls(OK, subject, message)

    @classmethod
    def warn(cls, subject: str, message: str, *, fix: str = "") -> Finding:
        return cls(WARN, subject, message, fix)

    @classmethod
    def fail(cls, subject: str, message: str, *, fix: str = "") -> Finding:
        return cls(FAIL, subject, message, fix)

    @classmethod
    def skip(cls, subject: str, reason: str) -> Finding:
        return cls(SKIP, subject, reason)


@dataclass(frozen=True)
class Check:
    name: str
    description: str
    function: Callable[[Host], Iterable[Finding]]


CHECKS: list[Check] = []


def check(name: str, description: str) -> Callable[[Callable[[Host], Iterable[Finding]]], Any]:
    """Register a check; the registry order is the order of the report."""

    def register(function: Callable[[Host], Iterable[Finding]]) -> Any:
        CHECKS.append(Check(name, description, function))
        return function

    return register


# --- what checks look at ----------------------------------------------------------------------


class _Once:
    """Values computed at most once per key, also when several threads ask at the same time.
    A LuksvmError is remembered like a value and raised to every asker."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key_locks: dict[object, threading.Lock] = {}
        self._values: dict[object, tuple[bool, object]] = {}

    def get(self, key: object, compute: Callable[[], T]) -> T:
        with self._lock:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            if key not in self._values:
                try:
                    self._values[key] = (True, compute())
                except LuksvmError as error:
                    self._values[key] = (False, error)
            ok, value = self._values[key]
        if not ok:
            raise value  # type: ignore[misc]
        return value  # type: ignore[return-value]


# Unit files doctor asks systemd about, in one `list-unit-files` call.
UNIT_FILE_PATTERNS = (
    "luksvm*",
    "lvm2-lvmetad.*",
    "libvirtd.*",
    "virtqemud.*",
    "libvirt-guests.service",
    "fstrim.timer",
)


class Host:
    """The host as checks see it. Files (configuration, keyfiles, lvm.conf, unit files) are read
    under `root`; running state (devices, /proc, /sys, systemd, libvirt) only on the live host."""

    def __init__(
        self,
        root: str = "/",
        *,
        sys: str = "/sys",
        dev: str = "/dev",
        proc: str = "/proc",
        live: bool | None = None,
        workers: int = 8,
    ) -> None:
        self.root = os.path.abspath(root)
        # live: ROOT is the running system, so devices, /proc, /sys and systemd speak of it
        self.live = os.path.realpath(self.root) == "/" if live is None else live
        self.sys, self.dev, self.proc = sys, dev, proc
        self.workers = workers
        self._once = _Once()
        cfg, problems = config.read(self.root)
        self.config: Config = cfg
        self.config_problems: list[Problem] = problems

    def path(self, absolute: str) -> str:
        """Where a host path such as /etc/luksvm/keys/x.key is under root."""
        return os.path.join(self.root, absolute.lstrip("/"))

    def each(self, function: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """function over items concurrently (for per-volume commands), results in item order.
        function must not call each() itself."""
        if len(items) < 2:
            return [function(item) for item in items]
        with ThreadPoolExecutor(min(self.workers, len(items))) as pool:
            return list(pool.map(function, items))

    # probes: each one command (or one file), remembered

    def header(self, volume: Volume) -> LuksHeader:
        """The LUKS header of the volume's source; LuksvmError says why not."""
        return self._once.get(("header", volume.device), lambda: _read_header(volume))

    def headers(self, volumes: Sequence[Volume]) -> list[LuksHeader | LuksvmError]:
        def one(volume: Volume) -> LuksHeader | LuksvmError:
            try:
                return self.header(volume)
            except LuksvmError as error:
                return error

        return self.each(one, volumes)

    @property
    def lvm_system_dir(self) -> str:
        if self.live:
            return os.environ.get("LVM_SYSTEM_DIR", "/etc/lvm")
        return self.path("/etc/lvm")

    def lvm_config(self) -> dict[str, lvm.ConfigValue]:
        """Effective LVM settings (built-in defaults included)."""
        return self._once.get("lvm-full", lambda: lvm.config("full", self._lvm_dir_override()))

    def lvm_config_set(self) -> dict[str, lvm.ConfigValue]:
        """Only what lvm.conf/lvmlocal.conf set explicitly."""
        return self._once.get(
            "lvm-current", lambda: lvm.config("current", self._lvm_dir_override())
        )

    def _lvm_dir_override(self) -> str | None:
        return None if self.live else self.lvm_system_dir

    def lvm_version(self) -> tuple[int, int, int]:
        return self._once.get("lvm-version", lvm.version)

    def lvmetad_in_use(self) -> bool:
        """LVM before 2.03 with use_lvmetad = 1: scanning and event autoactivation go through
        lvmetad, which applies only devices/global_filter."""
        return self.lvm_version() < (2, 3, 0) and self.lvm_config().get("global/use_lvmetad") == 1

    def devices_file(self) -> str | None:
        """The LVM devices file when LVM uses one (then filters are ignored), else None."""
        settings = self.lvm_config()
        if settings.get("devices/use_devicesfile") != 1:
            return None
        name = str(settings.get("devices/devicesfile") or "system.devices")
        path = os.path.join(self.lvm_system_dir, "devices", name)
        return path if os.path.exists(path) else None

    def physical_volumes(self) -> list[lvm.PhysicalVolume]:
        return self._once.get("pvs", lvm.physical_volumes)

    def guest_lvm(self, volume: Volume) -> tuple[list[str], list[str]]:
        """(VGs with a PV directly on the open mapping, their LVs active on the host)."""

        def probe() -> tuple[list[str], list[str]]:
            vgs = lvm.vgs_on(self.mapping_path(volume))
            if not vgs:
                return [], []
            active: list[str] = []
            for vg in vgs:
                try:
                    layout = lvm.vg_layout(vg, [self.mapping_path(volume)])
                except LuksvmError:
                    continue  # e.g. a VG spanning mappings not all open: activity unknown
                active += [f"{vg}/{lv.name}" for lv in layout.lvs if lv.active]
            return vgs, active

        return self._once.get(("guest-lvm", volume.name), probe)

    def mapping_path(self, volume: Volume) -> str:
        return os.path.join(self.dev, "mapper", volume.name)

    def is_open(self, volume: Volume) -> bool:
        return self.live and os.path.exists(self.mapping_path(volume))

    def mapping_names(self, volume: Volume) -> list[str]:
        """The names the host's LVM sees the volume's mapping by: the real ones when it is open;
        else the ones it will get (/dev/dm-N with the next free N, by-id names from the header)."""
        if self.is_open(volume):
            return blockdev.aliases(self.mapping_path(volume), self.dev)
        names = [
            volume.mapper_path,
            f"/dev/{blockdev.next_dm_name(self.sys)}",
            f"/dev/disk/by-id/dm-name-{volume.name}",
        ]
        try:
            header = self.header(volume)
        except LuksvmError:
            return names
        uuid = header.uuid.replace("-", "")
        names.append(f"/dev/disk/by-id/dm-uuid-CRYPT-LUKS{header.version}-{uuid}-{volume.name}")
        return names

    @property
    def libvirt_reachable(self) -> bool:
        """libvirt speaks of this host only when ROOT is the running system; the test driver
        (test:///FILE) serves any root."""
        return self.live or self.config.settings.uri.startswith("test:")

    def domains(self) -> dict[str, DomainFacts]:
        """What libvirt says of every configured guest, over one read-only connection."""

        def probe() -> dict[str, DomainFacts]:
            from luksvm import virt

            facts = {}
            with virt.connect(self.config.settings.uri, readonly=True) as conn:
                for guest in self.config.guests:
                    domain = conn.find(guest.name)
                    if domain is None:
                        facts[guest.name] = DomainFacts(guest.name, False, "", False)
                    else:
                        facts[guest.name] = DomainFacts(
                            guest.name, True, domain.xml(), domain.autostart()
                        )
            return facts

        return self._once.get("domains", probe)

    def unit_files(self) -> dict[str, str]:
        return self._once.get(
            "unit-files", lambda: systemctl.unit_file_states(UNIT_FILE_PATTERNS, self.root)
        )

    @property
    def systemd_running(self) -> bool:
        return self.live and systemctl.systemd_running("/")

    def unit_properties(
        self, units: Sequence[str], properties: Sequence[str]
    ) -> dict[str, dict[str, str]]:
        key = ("show", tuple(units), tuple(properties))
        return self._once.get(key, lambda: systemctl.show(units, properties))


@dataclass(frozen=True)
class DomainFacts:
    name: str
    defined: bool
    xml: str  # the domain's XML ("" when not defined)
    autostart: bool


def _read_header(volume: Volume) -> LuksHeader:
    if not volume.device:
        raise LuksvmError(f"source {volume.source!r} is not valid (see check config)")
    if not os.path.exists(volume.device):
        raise LuksvmError(f"source {volume.device} does not exist")
    return cryptsetup.read_header(volume.device)


# --- running checks and reporting ---------------------------------------------------------------


def select(names: Sequence[str]) -> list[Check]:
    """The checks named (all of them when none are), in registry order; unknown names → exit 64."""
    known = [c.name for c in CHECKS]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UsageError(
            f"unknown check{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
            f"known checks: {', '.join(known)}"
        )
    return [c for c in CHECKS if not names or c.name in names]


def run_checks(host: Host, checks: Sequence[Check]) -> list[Finding]:
    """Run `checks` concurrently (most wait on processes); findings in registry order."""
    if not checks:
        return []
    with ThreadPoolExecutor(max_workers=len(checks)) as pool:
        groups = list(pool.map(lambda c: _run_one(host, c), checks))
    return [finding for group in groups for finding in group]


def _run_one(host: Host, chk: Check) -> list[Finding]:
    try:
        findings = list(chk.function(host))
    except LuksvmError as error:
        # A probe failed in a way the check did not expect: say so, do not hide it as OK.
        findings = [Finding.warn(HOST, f"could not run this check: {error}")]
    if not findings:
        findings = [Finding.skip(HOST, "nothing to check")]
    return [replace(f, check=chk.name) for f in findings]


def exit_code(findings: Iterable[Finding]) -> int:
    return max((EXIT_CODES[f.status] for f in findings), default=EXIT_OK)


def worst(findings: Iterable[Finding]) -> Status:
    return max((f.status for f in findings), key=STATUSES.index, default=SKIP)


def as_json(findings: Iterable[Finding]) -> list[dict[str, str]]:
    return [
        {
            "check": f.check,
            "status": f.status,
            "subject": f.subject,
            "message": f.message,
            "fix": f.fix,
        }
        for f in findings
    ]


def format_report(checks: Sequence[Check], findings: Sequence[Finding]) -> str:
    """One line per check (its worst status); below it every finding that is not OK, with its
    fix. Checks whose findings are all OK stay on one line."""
    width = max((len(c.name) for c in checks), default=0)
    lines: list[str] = []
    indent = " " * (6 + width + 2)
    for chk in checks:
        mine = [f for f in findings if f.check == chk.name]
        status = worst(mine)
        head = f"{status:<5} {chk.name:<{width}}  "
        problems = [f for f in mine if f.status != OK]
        if len(mine) == 1:
            lines.append(head + _subject_message(mine[0]))
            lines.extend(_fix_lines(mine[0], indent))
            continue
        oks = [f.subject for f in mine if f.status == OK]
        summary = chk.description
        if oks:
            summary += f"; ok: {_names(oks)}"
        lines.append(head + summary)
        first_with_fix: dict[str, str] = {}
        for finding in problems:
            lines.append(f"{indent}{finding.status} {_subject_message(finding)}")
            if finding.fix in first_with_fix:  # one filter fixes every volume: print it once
                lines.append(f"{indent}  fix: as for {first_with_fix[finding.fix]}")
                continue
            first_with_fix.setdefault(finding.fix, finding.subject)
            lines.extend(_fix_lines(finding, indent + "  "))
    counts = {s: sum(1 for f in findings if f.status == s) for s in (FAIL, WARN, OK, SKIP)}
    lines.append(
        f"\n{counts[FAIL]} failed, {counts[WARN]} warnings, {counts[OK]} ok, {counts[SKIP]} skipped"
    )
    return "\n".join(lines) + "\n"


def _subject_message(finding: Finding) -> str:
    return f"{finding.subject}: {finding.message}" if finding.subject != HOST else finding.message


def _fix_lines(finding: Finding, indent: str) -> list[str]:
    if not finding.fix:
        return []
    first, *rest = finding.fix.splitlines()
    return [f"{indent}fix: {first}"] + [f"{indent}     {line}" for line in rest]


def _names(names: Sequence[str], shown: int = 6) -> str:
    if len(names) <= shown:
        return ", ".join(names)
    return ", ".join(names[:shown]) + f" and {len(names) - shown} more"


@dataclass(frozen=True)
class Report:
    checks: tuple[Check, ...]
    findings: tuple[Finding, ...]
    duration: float
    finished: float

    @property
    def exit_code(self) -> int:
        return exit_code(self.findings)


def doctor(root: str = "/", names: Sequence[str] = ()) -> Report:
    """Run the named checks (all when none are named) against the host under ROOT."""
    checks = select(names)
    start = time.monotonic()
    host = Host(root)
    findings = run_checks(host, checks)
    return Report(tuple(checks), tuple(findings), time.monotonic() - start, time.time())


# --- the checks ----------------------------------------------------------------------------------


def _volume_at(cfg: Config, problem: Problem) -> str:
    for volume in cfg.volumes:
        if volume.where.path == problem.where.path and volume.where.line == problem.where.line:
            return volume.name
    return problem.where.path


@check("config", "the configuration parses and is consistent")
def config_valid(host: Host) -> Iterator[Finding]:
    cfg = host.config
    for problem in host.config_problems:
        yield Finding.fail(
            _volume_at(cfg, problem),
            str(problem),
            fix=f"edit {problem.where.path} line {problem.where.line}; "
            "`luksvm config check` shows what is left",
        )
    if host.config_problems:
        return
    if not cfg.volumes:
        directory = host.path(f"/{config.CRYPTTAB_DIR}")
        yield Finding.warn(
            HOST,
            f"no volumes configured in {directory}/*.conf",
            fix=f"write a line such as `cr_data /dev/vg0/lv_data - luks,x-luksvm.guest=NAME` into "
            f"{directory}/10-NAME.conf",
        )
        return
    yield Finding.ok(
        HOST,
        f"{len(cfg.volumes)} volumes, {len(cfg.guests)} guests in {len(cfg.files)} files",
    )


def _convert_fix(volume: Volume, header: LuksHeader) -> str:
    device = shlex.quote(volume.device)
    backup = shlex.quote(f"/root/{volume.name}.luks1-header")
    return (
        f"luksvm lock {volume.name}; "
        f"cryptsetup luksHeaderBackup {device} --header-backup-file {backup}; "
        f"cryptsetup convert --type luks2 {device}; "
        + "; ".join(
            f"cryptsetup luksConvertKey --key-slot {slot.number} --pbkdf argon2id {device}"
            for slot in header.keyslots
        )
    )


@check("luks", "every source exists and is a LUKS2 device with memory-hard keyslots")
def luks_devices(host: Host) -> Iterator[Finding]:
    volumes = host.config.volumes
    for volume, header in zip(volumes, host.headers(volumes)):
        if isinstance(header, LuksvmError):
            yield _source_finding(volume, header)
        elif header.version == 1:
            yield Finding.warn(
                volume.name,
                f"{volume.device} has a LUKS1 header: its keyslots use PBKDF2, which GPUs "
                "brute-force cheaply, and the header has no checksum or second copy",
                fix=_convert_fix(volume, header),
            )
        else:
            weak = [
                s.number
                for s in header.keyslots
                if s.kdf == "pbkdf2" and s.number not in header.token_keyslots
            ]
            if weak:
                device = shlex.quote(volume.device)
                yield Finding.warn(
                    volume.name,
                    f"keyslot{'s' if len(weak) > 1 else ''} {', '.join(map(str, weak))} of "
                    f"{volume.device} use{'s' if len(weak) == 1 else ''} PBKDF2, which GPUs "
                    "brute-force cheaply (argon2id is memory-hard)",
                    fix="; ".join(
                        f"cryptsetup luksConvertKey --key-slot {n} --pbkdf argon2id {device}"
                        for n in weak
                    ),
                )
            else:
                kdfs = sorted({s.kdf for s in header.keyslots}) or ["no keyslots"]
                yield Finding.ok(volume.name, f"LUKS2 on {volume.device}, {', '.join(kdfs)}")


def _source_finding(volume: Volume, error: LuksvmError) -> Finding:
    if not volume.device:
        return Finding.skip(volume.name, str(error))
    if not os.path.exists(volume.device):
        if volume.has_flag("nofail"):
            return Finding.warn(
                volume.name,
                f"source {volume.device} does not exist (nofail: its guests will not start)",
                fix="attach the device, or correct the source at " + str(volume.where),
            )
        return Finding.fail(
            volume.name,
            f"source {volume.device} does not exist: the volume cannot be unlocked and "
            f"its guests ({', '.join(volume.guests) or 'none'}) cannot start",
            fix=f"correct the source at {volume.where} (`lsblk -o NAME,FSTYPE,UUID` shows LUKS "
            "containers as crypto_LUKS; an inactive LV has no node: `lvchange -ay VG/LV`)",
        )
    return Finding.fail(
        volume.name,
        error_text(error),
        fix=f"point the source at {volume.where} to the LUKS container "
        "(`blkid -t TYPE=crypto_LUKS` lists them)",
    )


@check("recovery-key", "every volume has a second keyslot (a recovery key)")
def recovery_key(host: Host) -> Iterator[Finding]:
    volumes = host.config.volumes
    for volume, header in zip(volumes, host.headers(volumes)):
        if isinstance(header, LuksvmError):
            yield Finding.skip(
                volume.name, f"header not readable (see check luks): {error_text(header)}"
            )
            continue
        slots = [s.number for s in header.keyslots]
        device = shlex.quote(volume.device)
        if not slots:
            yield Finding.fail(
                volume.name,
                f"{volume.device} has no keyslot in use: nothing can unlock it",
                fix=f"restore a header backup: cryptsetup luksHeaderRestore {device} "
                "--header-backup-file FILE",
            )
        elif len(slots) == 1:
            what = "TPM2/FIDO2 token" if slots[0] in header.token_keyslots else "key"
            authenticate = (
                f"--key-file {shlex.quote(volume.key.path)} " if volume.key.kind == "file" else ""
            )
            yield Finding.warn(
                volume.name,
                f"only keyslot {slots[0]} of {volume.device} is in use: if that {what} is lost "
                "or the keyslot damaged, the data is gone",
                fix=f"cryptsetup luksAddKey {authenticate}{device}   "
                "(type a recovery passphrase; keep it offline)",
            )
        else:
            yield Finding.ok(volume.name, f"keyslots {', '.join(map(str, slots))} in use")


def error_text(error: LuksvmError) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


# --- header backups ----------------------------------------------------------------------------


@check("header-backup", "every header has a backup that verifies, is recent, and is current")
def header_backup(host: Host) -> Iterator[Finding]:
    volumes = host.config.volumes
    settings = host.config.settings
    max_age = settings.backup_max_age / 1_000_000
    now = time.time()

    def look(volume: Volume) -> Finding:
        try:
            host.header(volume)
        except LuksvmError as error:
            return Finding.skip(
                volume.name, f"header not readable (see check luks): {error_text(error)}"
            )
        directory = os.path.join(host.path(settings.backup_dir), volume.name)
        fix = f"luksvm header-backup {volume.name}"
        newest = next((b for b in backup.list_backups(directory) if not b.raw), None)
        if newest is None:
            return Finding.fail(
                volume.name,
                f"no header backup in {directory}: a damaged LUKS header loses all of the "
                "volume's data",
                fix=f"{fix}; systemctl enable --now luksvm-header-backup.timer",
            )
        # the file is hashed in full when its stamp changed or its last hash is older than
        # max_age; otherwise its recorded stamp answers (16 MiB a volume every 15 minutes saved)
        verdict = backup.verify_backup(
            newest, volume.device, rehash_after=timedelta(microseconds=settings.backup_max_age)
        )
        name = os.path.basename(newest.path)
        if not verdict.intact:
            return Finding.fail(
                volume.name, f"backup {name} does not verify: {verdict.problem}", fix=fix
            )
        if not verdict.current:
            return Finding.warn(
                volume.name,
                f"backup {name} predates the last header change ({verdict.problem}): restoring "
                "it would bring back the old keyslots",
                fix=fix,
            )
        # its age: since header-backup last took it or found the header unchanged (a header that
        # never changes is never backed up again, and its warning must clear all the same)
        age = now - backup.last_confirmed(newest).timestamp()
        if age > max_age:
            return Finding.warn(
                volume.name,
                f"newest backup {name} was last taken or confirmed current by header-backup "
                f"{format_timespan(int(age) * 1_000_000)} ago, longer than [backup] max_age = "
                f"{format_timespan(settings.backup_max_age)}",
                fix=f"{fix}; systemctl enable --now luksvm-header-backup.timer",
            )
        return Finding.ok(volume.name, f"backup {name} verifies and is current")

    yield from host.each(look, volumes)


# --- units and their ordering --------------------------------------------------------------------


def _unit_subjects(cfg: Config) -> dict[str, str]:
    """{unit name: the volume or guest it is for}."""
    subjects = {units.unlock_unit(v.name): v.name for v in cfg.volumes}
    subjects.update({units.guest_unit(g.name): g.name for g in cfg.guests})
    return subjects


def _subject_of_path(path: str, subjects: dict[str, str]) -> str:
    for unit, subject in subjects.items():
        if f"/{unit}" in path:
            return subject
    return HOST


@check("units", "the units are applied, in sync with the configuration, enabled and not failed")
def units_applied(host: Host) -> Iterator[Finding]:
    cfg = host.config
    if host.config_problems:
        yield Finding.skip(
            HOST, "the configuration has errors (see check config); apply refuses it"
        )
        return
    if not cfg.volumes:
        yield Finding.skip(HOST, "no volumes configured")
        return
    subjects = _unit_subjects(cfg)
    try:
        plan = apply.plan(cfg, luksvm_path=apply.luksvm_path())
    except LuksvmError as error:
        yield Finding.fail(HOST, " ".join(error.message.splitlines()), fix=error.fix)
        return
    if plan.changes and plan.unchanged == 0 and all(c.old is None for c in plan.changes):
        yield Finding.fail(
            HOST,
            "the units were never applied: nothing unlocks the volumes or starts the guests "
            "at boot",
            fix="luksvm apply && systemctl enable luksvm.target",
        )
    else:
        changed: dict[str, list[str]] = {}
        for change in plan.changes:
            subject = _subject_of_path(change.path, subjects)
            changed.setdefault(subject, []).append(f"{change.verb} {change.path}")
        for subject, what in changed.items():
            yield Finding.warn(
                subject,
                "the units differ from the configuration (a config change not applied yet): "
                f"apply would {_names(what, 3)}",
                fix="luksvm apply --dry-run --diff   (to see it), then luksvm apply",
            )
        for subject in sorted(set(subjects.values()) - changed.keys()):
            yield Finding.ok(subject, "units in sync with the configuration")
    for path in plan.left:
        yield Finding.warn(
            _subject_of_path(path, subjects),
            f"{os.path.join(plan.root, path)} was written by apply, edited since, and the "
            "configuration no longer asks for it",
            fix=f"rm {shlex.quote(os.path.join(plan.root, path))}",
        )
    state = host.unit_files().get(units.TARGET, "not installed")
    if state not in systemctl.ENABLED_STATES:
        yield Finding.fail(
            units.TARGET,
            f"{units.TARGET} is {state}: nothing unlocks the volumes or starts the guests at boot",
            fix=f"systemctl enable {units.TARGET}",
        )
    else:
        yield Finding.ok(units.TARGET, state)
    if host.systemd_running:
        for row in systemctl.list_units(["luksvm*"], state="failed"):
            unit = row.get("unit", "")
            yield Finding.fail(
                subjects.get(unit, unit),
                f"{unit} failed",
                fix=f"journalctl -b -u {shlex.quote(unit)}   (why), then "
                f"systemctl restart {shlex.quote(unit)}",
            )


LIBVIRT_SOCKETS = {"libvirtd.service": "libvirtd.socket", "virtqemud.service": "virtqemud.socket"}


def libvirt_daemons_in_use(host: Host) -> list[str]:
    """The libvirt daemon services this host runs or starts (itself or through its socket),
    as the running systemd says."""
    names = [*units.LIBVIRT_DAEMONS, *(LIBVIRT_SOCKETS[d] for d in units.LIBVIRT_DAEMONS)]
    states = host.unit_properties(names, ("LoadState", "ActiveState", "UnitFileState"))

    def used(unit: str) -> bool:
        state = states.get(unit, {})
        active = state.get("ActiveState") in ("active", "activating", "reloading")
        return active or state.get("UnitFileState") in systemctl.ENABLED_STATES

    return [d for d in units.LIBVIRT_DAEMONS if used(d) or used(LIBVIRT_SOCKETS[d])]


@check("ordering", "unlock units come before the libvirt daemon this host uses; guests after it")
def ordering(host: Host) -> Iterator[Finding]:
    cfg = host.config
    if not host.systemd_running:
        yield Finding.skip(HOST, "systemd is not running here: ordering is read from it")
        return
    if not cfg.volumes:
        yield Finding.skip(HOST, "no volumes configured")
        return
    daemons = libvirt_daemons_in_use(host)
    if not daemons:
        yield Finding.warn(
            HOST,
            "no libvirt daemon (libvirtd or virtqemud) is enabled or running: no guest can start",
            fix="systemctl enable --now virtqemud.socket   (or libvirtd.service)",
        )
        return
    unlock = {v.name: units.unlock_unit(v.name) for v in cfg.volumes}
    guest = {g.name: units.guest_unit(g.name) for g in cfg.guests}
    properties = host.unit_properties(
        [*unlock.values(), *guest.values()], ("LoadState", "Before", "After")
    )
    fix = "luksvm apply   (writes the ordering), then check again"
    for volume in cfg.volumes:
        unit = unlock[volume.name]
        state = properties.get(unit, {})
        if state.get("LoadState") != "loaded":
            yield Finding.fail(
                volume.name, f"{unit} is {state.get('LoadState', 'unknown')}", fix=fix
            )
        elif volume.interactive:
            yield Finding.ok(
                volume.name,
                "asks for a passphrase: deliberately not before libvirt (one pending prompt must "
                "not hold back every guest); its guests wait for it",
            )
        else:
            missing = [d for d in daemons if d not in state.get("Before", "").split()]
            if missing:
                yield Finding.fail(
                    volume.name,
                    f"{unit} is not ordered before {' and '.join(missing)}: libvirt can start "
                    "guests before their disks are unlocked",
                    fix=fix,
                )
            else:
                yield Finding.ok(volume.name, f"unlocked before {', '.join(daemons)}")
    for name, unit in guest.items():
        state = properties.get(unit, {})
        missing = [d for d in daemons if d not in state.get("After", "").split()]
        if state.get("LoadState") != "loaded" or missing:
            yield Finding.fail(
                name,
                f"{unit} is not ordered after {' and '.join(missing) or 'libvirt'}: at shutdown "
                "libvirt can stop before the guest's graceful stop is done",
                fix=fix,
            )
        else:
            yield Finding.ok(name, f"started after {', '.join(daemons)}")


# --- guests in libvirt ----------------------------------------------------------------------------

MAPPING_SOURCE = re.compile(r"/dev/(?:mapper/|disk/by-id/dm-name-)([^/]+)")


@check("guests", "guests exist in libvirt with exactly their luksvm disks; libvirt neither "
       "autostarts them nor saves them to an unencrypted disk")  # fmt: skip
def guests_in_libvirt(host: Host) -> Iterator[Finding]:
    cfg = host.config
    if not cfg.guests:
        yield Finding.skip(HOST, "no guests configured (x-luksvm.guest=)")
        return
    if not host.libvirt_reachable:
        yield Finding.skip(HOST, f"{host.root} is not the running system: libvirt not asked")
        return
    try:
        domains = host.domains()
    except LuksvmError as error:
        yield Finding.warn(
            HOST,
            f"cannot ask libvirt at {cfg.settings.uri}: {error_text(error)}",
            fix="systemctl start virtqemud.socket   (or libvirtd.service)",
        )
        return
    configured = {v.name: v for v in cfg.volumes}
    for guest in cfg.guests:
        facts = domains[guest.name]
        where = configured[guest.volumes[0]].where
        if not facts.defined:
            yield Finding.fail(
                guest.name,
                f"no libvirt domain {guest.name} at {cfg.settings.uri}: its unit cannot start it",
                fix=f"virsh define {guest.name}.xml, or correct x-luksvm.guest={guest.name} "
                f"at {where}",
            )
            continue
        yield from _guest_disks(guest.name, guest.volumes, facts, configured)
        if facts.autostart:
            yield Finding.warn(
                guest.name,
                "libvirt autostart is on: libvirt starts it when the daemon starts, whether or "
                "not its volumes are unlocked",
                fix=f"luksvm apply --take-over   (or virsh autostart --disable {guest.name})",
            )
    yield _libvirt_guests(host)
    yield from _libvirt_guests_on_boot(host)


def _guest_disks(
    guest: str, volumes: Sequence[str], facts: DomainFacts, configured: dict[str, Volume]
) -> Iterator[Finding]:
    from luksvm import virt

    disks = virt.disks_from_xml(facts.xml)
    on_disks = {}
    problems = 0
    for disk in disks:
        match = MAPPING_SOURCE.fullmatch(disk.source)
        if not match:
            continue
        name = match.group(1)
        on_disks[name] = disk.target
        volume = configured.get(name)
        if volume is None:
            problems += 1
            yield Finding.fail(
                guest,
                f"disk {disk.target} is {disk.source}, which luksvm does not configure: nothing "
                "unlocks it before the guest starts or locks it at shutdown",
                fix=f"add a line `{name} SOURCE KEY luks,x-luksvm.guest={guest}` to a file in "
                f"/{config.CRYPTTAB_DIR}/, then luksvm apply",
            )
        elif guest not in volume.guests:
            problems += 1
            yield Finding.fail(
                guest,
                f"disk {disk.target} is volume {name}, whose options lack x-luksvm.guest={guest}: "
                "the guest can start before it is unlocked",
                fix=f"add x-luksvm.guest={guest} to the options at {volume.where}, "
                "then luksvm apply",
            )
    for name in volumes:
        if name not in on_disks:
            problems += 1
            yield Finding.fail(
                guest,
                f"volume {name} names this guest (x-luksvm.guest={guest}), but the domain has no "
                f"disk /dev/mapper/{name}",
                fix=f"virsh attach-disk {guest} /dev/mapper/{name} vdX --persistent, or remove "
                f"x-luksvm.guest={guest} at {configured[name].where}",
            )
    if not problems:
        pairs = ", ".join(f"{target}={name}" for name, target in on_disks.items())
        yield Finding.ok(guest, f"defined; luksvm disks {pairs}")


def _libvirt_guests(host: Host) -> Finding:
    """libvirt-guests saves running guests' RAM at shutdown (ON_SHUTDOWN=suspend, its default).
    luksvm stops its guests first, but one it could not stop would be saved there."""
    state = host.unit_files().get("libvirt-guests.service", "not installed")
    if state not in systemctl.ENABLED_STATES:
        return Finding.ok("libvirt-guests", f"libvirt-guests.service is {state}")
    path, settings = guests.libvirt_guests_settings(host.config)
    action = settings.get("ON_SHUTDOWN", "")
    if action != "suspend":
        return Finding.ok("libvirt-guests", f"ON_SHUTDOWN={action}: guests are not saved")
    refusal = guests.save_dir_refusal(host.config)
    if refusal is None:
        return Finding.ok("libvirt-guests", "suspends to an encrypted save directory")
    where = path or "/etc/default/libvirt-guests"
    return Finding.fail(
        "libvirt-guests",
        f"libvirt-guests.service suspends running guests at shutdown (ON_SHUTDOWN=suspend"
        f"{'' if path else ', its default'}) into /{guests.SAVE_DIR}, which is not encrypted: "
        "a guest luksvm could not stop leaves its decrypted memory on disk",
        fix=f"set ON_SHUTDOWN=shutdown in {where} (luksvm stops its guests before "
        "libvirt-guests runs)",
    )


def _libvirt_guests_on_boot(host: Host) -> Iterator[Finding]:
    """libvirt-guests with ON_BOOT=start (its default) starts at boot the guests it found running
    at the last shutdown: a luksvm guest left running then (on_timeout=fail) is started outside
    its unit, before it, whether or not its volumes are unlocked."""
    if host.unit_files().get("libvirt-guests.service") not in ("enabled", "enabled-runtime"):
        return
    path, settings = guests.libvirt_guests_settings(host.config)
    if settings.get("ON_BOOT") != "start":
        return
    where = path or "/etc/default/libvirt-guests"
    yield Finding.warn(
        "libvirt-guests ON_BOOT",
        f"libvirt-guests.service starts at boot the guests it found running at the last shutdown "
        f"(ON_BOOT=start{'' if path else ', its default'}): a luksvm guest still running then "
        "(on_timeout=fail) is started by libvirt-guests, not by its unit, whether or not its "
        "volumes are unlocked",
        fix=f"set ON_BOOT=ignore in {where} (luksvm starts its guests after their volumes)",
    )


# --- libvirt's own shutdown of guests (libvirt >= 11.2) ------------------------------------------

QEMU_CONF = "/etc/libvirt/qemu.conf"
AUTO_SHUTDOWN_SINCE = (11, 2, 0)
# setting → (values that leave luksvm's persistent guests alone, what libvirt does to the guests)
AUTO_SHUTDOWN_ACTIONS = {
    "auto_shutdown_try_save": (("none",), "saves their memory (managed save)"),
    "auto_shutdown_try_shutdown": (("none", "transient"), "shuts them down (ACPI)"),
    "auto_shutdown_poweroff": (("none", "transient"), "powers them off"),
}
CONF_ASSIGNMENT = re.compile(
    r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(?:\"([^\"]*)\"|'([^']*)'|(-?[0-9]+))\s*(?:#.*)?"
)


@dataclass(frozen=True)
class ConfSetting:
    value: str
    line: int  # 1-based, in the file it came from


def conf_settings(text: str) -> dict[str, ConfSetting]:
    """The string and number assignments of a libvirt config file (virConf: `name = "value"`,
    `name = 1`, `#` comments); the last one of a name wins. Lists are not read."""
    found = {}
    for number, line in enumerate(text.splitlines(), 1):
        match = CONF_ASSIGNMENT.fullmatch(line)
        if match:
            name, double, single, integer = match.groups()
            value = next(v for v in (double, single, integer) if v is not None)
            found[name] = ConfSetting(value, number)
    return found


def _libvirt_version(host: Host) -> tuple[int, int, int] | None:
    """The host's libvirt version when doctor looks at the running system, else None."""
    if not host.live:
        return None
    from luksvm import virt

    try:
        return virt.library_version()
    except ImportError:
        return None


@check("libvirt-shutdown", "libvirt does not stop or save luksvm's guests itself at host "
       "shutdown (qemu.conf auto_shutdown_*, libvirt 11.2 and later)")  # fmt: skip
def libvirt_shutdown(host: Host) -> Iterator[Finding]:
    cfg = host.config
    if not cfg.guests:
        yield Finding.skip(HOST, "no guests configured (x-luksvm.guest=)")
        return
    version = _libvirt_version(host)
    shown = ".".join(map(str, version)) if version else ""
    if version is not None and version < AUTO_SHUTDOWN_SINCE:
        yield Finding.ok(
            HOST, f"libvirt {shown} does not stop guests itself at host shutdown (11.2 does)"
        )
        return
    try:
        with open(host.path(QEMU_CONF), encoding="utf-8", errors="replace") as f:
            settings = conf_settings(f.read())
    except FileNotFoundError:
        settings = {}
    except OSError as error:
        yield Finding.warn(HOST, f"cannot read {QEMU_CONF}: {error.strerror}")
        return
    restart = "then restart the daemon (systemctl restart libvirtd, or virtqemud: guests keep "
    restart += "running)"
    acting = []
    for name, (allowed, does) in AUTO_SHUTDOWN_ACTIONS.items():
        setting = settings.get(name)
        value = setting.value if setting else "none"
        if value in allowed:
            continue
        acting.append(name)
        where = f"{QEMU_CONF}:{setting.line}" if setting else QEMU_CONF
        which = {"all": "every guest", "persistent": "every persistent guest"}.get(
            value, f"{value!r} guests"
        )
        message = (
            f'{where}: {name} = "{value}": libvirt {does} for {which}, luksvm\'s included, as '
            "soon as logind announces the shutdown, before systemd stops any unit: unit order "
            "cannot put luksvm's stop (ACPI wait, its policy, guest VGs off, close) first"
        )
        if name == "auto_shutdown_try_save" and guests.save_dir_refusal(cfg) is not None:
            message += f"; the saved memory lands in /{guests.SAVE_DIR}, which is not encrypted"
        if host.unit_files().get("libvirt-guests.service") in ("enabled", "enabled-runtime"):
            message += "; libvirt-guests.service is enabled too (libvirt warns of dueling actions)"
        transient = ' (or "transient": luksvm\'s guests are persistent)' if len(allowed) > 1 else ""
        yield Finding.fail(
            name, message, fix=f'set {name} = "none"{transient} in {QEMU_CONF}, {restart}'
        )
    restore = settings.get("auto_shutdown_restore")
    if acting and (restore is None or restore.value != "0"):
        where = f"{QEMU_CONF}:{restore.line}" if restore else f"{QEMU_CONF} (default 1)"
        yield Finding.fail(
            "auto_shutdown_restore",
            f"{where}: auto_shutdown_restore = {restore.value if restore else 1}: at the next "
            "start libvirt restores the guests it stopped, luksvm's included, whether or not "
            "their volumes are unlocked (a passphrase volume is not, when libvirt starts)",
            fix=f"set auto_shutdown_restore = 0 in {QEMU_CONF}, {restart}",
        )
    if not acting:
        values = ", ".join(
            f"{name.replace('auto_shutdown_', '')}="
            + (settings[name].value if name in settings else "none")
            for name in AUTO_SHUTDOWN_ACTIONS
        )
        about = f"libvirt {shown}" if shown else "libvirt"
        yield Finding.ok(
            HOST, f"{about} leaves luksvm's guests to luksvm at host shutdown ({values})"
        )


# --- LVM: the guest VG leak and lvmetad -----------------------------------------------------------


@dataclass(frozen=True)
class Visibility:
    """How the host's LVM treats a volume's mapping."""

    scanned: bool  # LVM commands on the host read it
    autoactivated: bool  # boot-time/event autoactivation would activate VGs on it
    why: str


def visibility(host: Host, volume: Volume) -> Visibility:
    settings = host.lvm_config()
    names = host.mapping_names(volume)
    devices_file = host.devices_file()
    if devices_file is not None:
        listed = _devices_file_matches(devices_file, volume, names)
        if listed:
            return Visibility(True, True, f"the LVM devices file {devices_file} lists it")
        return Visibility(
            False, False, f"the LVM devices file {devices_file} does not list it (filters unused)"
        )
    global_filter = _patterns(settings.get("devices/global_filter"))
    device_filter = _patterns(settings.get("devices/filter"))
    if not lvm.filter_accepts(global_filter, names):
        return Visibility(False, False, "devices/global_filter rejects it")
    if not lvm.filter_accepts(device_filter, names):
        if host.lvmetad_in_use():
            return Visibility(
                False,
                True,
                "devices/filter rejects it, but lvmetad and its event autoactivation "
                "(pvscan --cache -aay) apply only devices/global_filter",
            )
        return Visibility(False, False, "devices/filter rejects it")
    accepted_as = [n for n in names if lvm.filter_accepts(global_filter, [n])]
    accepted_as = [n for n in accepted_as if lvm.filter_accepts(device_filter, [n])] or names
    # the kernel name first: it is the one a reject pattern in front of a catch-all misses
    accepted_as.sort(key=lambda n: (not n.startswith("/dev/dm-"), not n.startswith("/dev/mapper/")))
    return Visibility(True, True, f"the LVM filters accept it as {_names(accepted_as, 3)}")


def _patterns(value: object) -> list[str]:
    if isinstance(value, list):
        return [str(v) for v in value]
    return [str(value)] if value else []


def _devices_file_matches(path: str, volume: Volume, names: Sequence[str]) -> list[dict[str, str]]:
    try:
        entries = lvm.devices_file_entries(path)
    except OSError:
        return []
    found = []
    for entry in entries:
        idname, devname = entry.get("IDNAME", ""), entry.get("DEVNAME", "")
        by_crypt_uuid = idname.startswith("CRYPT-") and idname.endswith(f"-{volume.name}")
        if by_crypt_uuid or devname in names or idname in names:
            found.append(entry)
    return found


def _initramfs_command(host: Host) -> str:
    for command, path in (
        ("update-initramfs -u", "/usr/sbin/update-initramfs"),
        ("dracut -f", "/usr/bin/dracut"),
    ):
        if os.path.exists(host.path(path)) or (host.live and shutil.which(command.split()[0])):
            return command
    return "update-initramfs -u (Debian) or dracut -f (RHEL, Fedora)"


def proposed_global_filter(host: Host) -> str:
    """A global_filter accepting exactly the host's own PVs (by their current name and a stable
    by-id name) and rejecting every other device — no catch-all accept, which would let the
    mappings through under their /dev/dm-N names."""
    mappings = set()
    for volume in host.config.volumes:
        mappings.add(volume.mapper_path)
        mappings.add(os.path.realpath(host.mapping_path(volume)))
    try:
        pvs = host.physical_volumes()
    except LuksvmError:
        pvs = []
    patterns: list[str] = []
    for pv in pvs:
        if pv.name in mappings or os.path.realpath(pv.name) in mappings:
            continue
        names = [pv.name]
        alias = blockdev.stable_alias(blockdev.aliases(pv.name, host.dev))
        if alias:
            names.append(alias)
        patterns += [lvm.filter_pattern("a", n) for n in names if "|" not in n]
    if not patterns:
        patterns = ["a|^/dev/disk/by-id/YOUR-HOST-PV$|"]  # pvs found none: the admin must name them
    patterns.append("r|.*|")
    return "global_filter = [ " + ", ".join(f'"{p}"' for p in dict.fromkeys(patterns)) + " ]"


def _filter_fix(host: Host) -> str:
    return (
        "in the devices { } section of /etc/lvm/lvm.conf set (it accepts only the host's own PVs; "
        'a reject in front of "a|.*|" would still let /dev/dm-N through):\n'
        f"    {proposed_global_filter(host)}\n"
        "then `pvs -a` must list only the host's PVs; rebuild the initramfs copy of lvm.conf "
        f"({_initramfs_command(host)}) and reboot"
    )


WHY_LEAK = (
    "while the host holds the guest's LVs the mapping cannot be closed (shutdown hangs at "
    "cryptsetup close), and two kernels writing one VG corrupt it"
)


def _autoactivation_excludes(host: Host, vgs: Sequence[str]) -> bool:
    """activation/auto_activation_volume_list is set and names none of `vgs`."""
    allowed = host.lvm_config().get("activation/auto_activation_volume_list")
    if not isinstance(allowed, list):
        return False
    entries = [str(a) for a in allowed]
    if any(e.startswith("@") for e in entries):
        return False  # tags: cannot tell from here
    return not any(e.split("/")[0] in vgs for e in entries)


@check("guest-vg-leak", "the host's LVM does not see or activate VGs inside decrypted volumes")
def guest_vg_leak(host: Host) -> Iterator[Finding]:
    volumes = host.config.volumes
    if not volumes:
        yield Finding.skip(HOST, "no volumes configured")
        return

    def look(volume: Volume) -> tuple[Visibility, tuple[list[str], list[str]] | None]:
        view = visibility(host, volume)
        seen = view.scanned or view.autoactivated
        return view, _guest_lvm_or_none(host, volume) if seen else None

    devices_file = host.devices_file()
    filter_fix = ""  # the same for every volume: built once, when a volume first needs it
    for volume, (view, guest_lvm) in zip(volumes, host.each(look, volumes)):
        fix = ""
        if view.scanned or view.autoactivated:
            if devices_file:
                fix = (
                    f"lvmdevices --deldev {volume.mapper_path}   (while it is unlocked; "
                    "`lvmdevices` lists the entries)"
                )
            else:
                fix = filter_fix = filter_fix or _filter_fix(host)
        if not view.scanned and not view.autoactivated:
            yield Finding.ok(volume.name, f"hidden from the host's LVM: {view.why}")
        elif guest_lvm is None:
            yield Finding.warn(
                volume.name,
                f"when unlocked, the host's LVM will scan {volume.mapper_path} ({view.why}); "
                f"if the guest put a PV on the whole disk its VGs leak to the host; {WHY_LEAK}",
                fix=fix,
            )
        elif not guest_lvm[0]:
            yield Finding.ok(
                volume.name,
                f"the host's LVM scans {volume.mapper_path} ({view.why}) but no PV lies directly "
                "on it (the host does not scan partitions on device-mapper devices)",
            )
        else:
            vgs, active = guest_lvm
            now = f"; active on the host now: {', '.join(active)}" if active else ""
            if _autoactivation_excludes(host, vgs) and not active:
                yield Finding.warn(
                    volume.name,
                    f"the host's LVM sees guest VG {', '.join(vgs)} in {volume.mapper_path} "
                    f"({view.why}); activation/auto_activation_volume_list keeps it inactive, "
                    f"but any `vgchange -ay` activates it; {WHY_LEAK}",
                    fix=fix,
                )
            else:
                yield Finding.fail(
                    volume.name,
                    f"the host's LVM sees and auto-activates guest VG {', '.join(vgs)} in "
                    f"{volume.mapper_path} ({view.why}){now}; {WHY_LEAK}",
                    fix=fix,
                )


def _guest_lvm_or_none(host: Host, volume: Volume) -> tuple[list[str], list[str]] | None:
    """None when the mapping is closed (its content cannot be seen)."""
    if not host.is_open(volume):
        return None
    try:
        return host.guest_lvm(volume)
    except LuksvmError:
        return None


LVMETAD_UNITS = ("lvm2-lvmetad.socket", "lvm2-lvmetad.service")


def _version_text(version: tuple[int, int, int]) -> str:
    return f"{version[0]}.{version[1]:02d}.{version[2]}"


@check("lvmetad", "lvmetad runs exactly when this LVM version needs it")
def lvmetad(host: Host) -> Iterator[Finding]:
    version = host.lvm_version()
    text = _version_text(version)
    if version >= (2, 3, 0):
        if "global/use_lvmetad" in host.lvm_config_set():
            yield Finding.warn(
                HOST,
                f"LVM {text} has no lvmetad (removed in 2.03), but lvm.conf still sets "
                "global/use_lvmetad: a 2.02 leftover that misleads whoever reads the file",
                fix="delete the use_lvmetad line from the global { } section of /etc/lvm/lvm.conf",
            )
        else:
            yield Finding.ok(
                HOST, f"LVM {text} has no lvmetad (removed in 2.03): nothing needs to run"
            )
    elif host.lvm_config().get("global/use_lvmetad") != 1:
        yield Finding.ok(HOST, f"LVM {text} with use_lvmetad = 0: LVM scans devices itself")
    else:
        yield from _lvmetad_units(host, text)
    yield from _autoactivation(host)


def _lvmetad_units(host: Host, version: str) -> Iterator[Finding]:
    fix = "systemctl enable --now lvm2-lvmetad.socket lvm2-lvmetad.service"
    why = (
        'without it LVM commands fall back to scanning and print "Failed to connect to '
        'lvmetad. Falling back to internal scanning" (grub2-mkconfig shows it at every kernel '
        "update), and event autoactivation does not work"
    )
    states = host.unit_files()
    bad = [u for u in LVMETAD_UNITS if states.get(u) not in systemctl.ENABLED_STATES]
    if bad:
        described = ", ".join(f"{u} is {states.get(u, 'not installed')}" for u in bad)
        yield Finding.fail(
            HOST, f"LVM {version} with use_lvmetad = 1, but {described}: {why}", fix=fix
        )
        return
    if not host.systemd_running:
        yield Finding.ok(
            HOST,
            f"LVM {version} with use_lvmetad = 1 and lvmetad's units enabled "
            "(not the running system: active state not checked)",
        )
        return
    properties = host.unit_properties(LVMETAD_UNITS, ("ActiveState",))
    inactive = [u for u in LVMETAD_UNITS if properties.get(u, {}).get("ActiveState") != "active"]
    if inactive:
        yield Finding.fail(
            HOST,
            f"LVM {version} with use_lvmetad = 1, but {' and '.join(inactive)} "
            f"{'is' if len(inactive) == 1 else 'are'} not active: {why}",
            fix=fix,
        )
    else:
        yield Finding.ok(HOST, f"LVM {version} with use_lvmetad = 1: lvmetad enabled and active")


def _autoactivation(host: Host) -> Iterator[Finding]:
    """Event autoactivation must honour the same device selection as the leak check relies on."""
    explicit = host.lvm_config_set()
    devices_file = host.devices_file()
    filters = [k for k in ("devices/filter", "devices/global_filter") if k in explicit]
    if devices_file and filters:
        yield Finding.warn(
            "autoactivation",
            f"LVM uses the devices file {devices_file}, so the {' and '.join(filters)} set in "
            "lvm.conf have no effect",
            fix="manage devices with lvmdevices (--adddev/--deldev), or set "
            "use_devicesfile = 0 in the devices { } section to use the filters",
        )
        return
    if host.lvmetad_in_use():
        leaky = [
            v.name
            for v in host.config.volumes
            if "devices/filter rejects it, but lvmetad" in visibility(host, v).why
        ]
        if leaky:
            yield Finding.fail(
                "autoactivation",
                f"devices/filter hides {', '.join(leaky)}, but with lvmetad event autoactivation "
                "(pvscan --cache -aay from udev) applies only devices/global_filter: their "
                "guest VGs are activated at boot anyway",
                fix="move the reject patterns from filter to global_filter in /etc/lvm/lvm.conf",
            )
            return
        yield Finding.ok(
            "autoactivation", "lvmetad's event autoactivation applies devices/global_filter"
        )
        return
    if host.lvm_config().get("global/event_activation") == 0:
        yield Finding.ok(
            "autoactivation",
            "event_activation = 0: VGs are activated once at boot by lvm2-activation*.service, "
            "through the same filters",
        )
    else:
        yield Finding.ok(
            "autoactivation",
            "event autoactivation (pvscan --cache from udev) applies the same filters "
            "as the guest-vg-leak check",
        )


# --- keys and swap -------------------------------------------------------------------------------


@check("keys", "keyfiles are root's and private, not on plain disks; keyring: keys resolve")
def keys_check(host: Host) -> Iterator[Finding]:
    cfg = host.config
    if not cfg.volumes:
        yield Finding.skip(HOST, "no volumes configured")
    for volume in cfg.volumes:
        if volume.key.kind == "file":
            path = host.path(volume.key.path)
            try:
                keys.check_keyfile(volume.name, path)  # what unlock refuses, doctor reports
            except LuksvmError as error:
                message = _without_name(volume, error)
                if _attaches_directly(host, volume):
                    # apply checked it; at boot nothing does (the unit runs systemd-cryptsetup)
                    message += "; its unit runs systemd-cryptsetup, which uses the keyfile as it is"
                yield Finding.fail(volume.name, message, fix=error.fix)
                continue
            yield _keyfile_at_rest(host, volume, path)
        elif volume.key.kind == "keyring":
            yield _keyring_key(host, volume)
        else:
            yield Finding.ok(volume.name, "passphrase asked at unlock (nothing stored on the host)")


def _attaches_directly(host: Host, volume: Volume) -> bool:
    """The volume's applied unit runs `systemd-cryptsetup attach` itself (see apply)."""
    dropin = host.path(f"/etc/systemd/system/{units.unlock_unit(volume.name)}.d/{units.DROPIN}")
    try:
        with open(dropin, encoding="utf-8") as f:
            return "systemd-cryptsetup attach" in f.read()
    except OSError:
        return False


def _without_name(volume: Volume, error: LuksvmError) -> str:
    """keys' messages start with the volume's name, which a finding shows as its subject."""
    prefix = f"{volume.name}: "
    return error.message[len(prefix) :] if error.message.startswith(prefix) else error.message


def _keyring_key(host: Host, volume: Volume) -> Finding:
    """Resolve the secret as the unlock unit will: with [keys] keyring_backend, the backend the
    units get through PYTHON_KEYRING_BACKEND (a system unit has no session bus for any other)."""
    settings = host.config.settings
    if not settings.keyring_backend:
        return Finding.fail(
            volume.name,
            f"key {volume.key} needs python keyring, but [keys] keyring_backend is not set: the "
            "unlock unit has no session bus, so keyring's default backend cannot answer it "
            "(a shell here may still resolve it)",
            fix=f"set keyring_backend = {keys.EXAMPLE_BACKEND} (or the backend holding the "
            f"secret) in [keys] of /{config.SETTINGS_FILE}, then luksvm apply",
        )
    try:
        keys.keyring_secret(volume, settings)  # the bytes are dropped at once
    except LuksvmError as error:
        return Finding.fail(volume.name, _without_name(volume, error), fix=error.fix)
    return Finding.ok(volume.name, f"{volume.key} resolves through {settings.keyring_backend}")


def _keyfile_at_rest(host: Host, volume: Volume, path: str) -> Finding:
    backing = blockdev.backing_of_file(path, host.sys, host.proc)
    if backing.encrypted or backing.memory:
        return Finding.ok(volume.name, f"keyfile {volume.key.path} lies on {backing.description}")
    if backing.encrypted is None:
        return Finding.skip(volume.name, f"cannot tell whether {backing.description} is encrypted")
    return Finding.warn(
        volume.name,
        f"keyfile {volume.key.path} lies on {backing.description}, which is not encrypted: "
        "whoever takes the host's disks takes the key, so the volume is protected at rest only "
        "against someone who gets its disk alone; that is the price of unlocking without a "
        "person at boot",
        fix=f"to protect it at rest: a TPM2 or Tang key (`luksvm enroll {volume.name} --tpm2`, or "
        f"`--tang URL --thumbprint TP`; then key `-` at {volume.where}), a passphrase (key `-`, "
        f"then `luksvm unlock {volume.name}` over ssh -t), or keep the keys on an encrypted "
        "filesystem",
    )


@check("discard", "discards reach the disks: each guest disk's chain, host filesystems")
def discard(host: Host) -> Iterator[Finding]:
    yield from _discard_chains(host)
    yield from _fstrim_timer(host)


def _discard_chains(host: Host) -> Iterator[Finding]:
    """trim's check of every link, guest disk → dm-crypt → backing device, for each guest volume."""
    cfg = host.config
    if not cfg.guests or not host.libvirt_reachable:
        return
    try:
        domains = host.domains()
    except LuksvmError:
        return  # the guests check says why
    closed = {v.name for v in cfg.volumes if not host.is_open(v)}

    def mapping(name: str) -> cryptsetup.MappingStatus:
        # a closed mapping needs no `cryptsetup status` (one process per volume saved)
        if name in closed:
            return cryptsetup.MappingStatus(name, False, False, "", 0, 0, False)
        return trim.HOST.mapping(name)

    probe = trim.Probe(
        header_flags=lambda device: _header_flags(host, device),
        mapping=mapping,
        stack=trim.HOST.stack if host.live else lambda device: [],
    )
    pairs = [
        (guest.name, volume)
        for guest in cfg.guests
        if domains[guest.name].defined
        for volume in cfg.volumes_of(guest.name)
    ]

    def chain(pair: tuple[str, Volume]) -> trim.DiskChain:
        guest, volume = pair
        from luksvm import virt

        return trim.check_chain(guest, volume, virt.disks_from_xml(domains[guest].xml), probe)

    for (guest, volume), result in zip(pairs, host.each(chain, pairs)):
        broken = result.broken
        if broken is not None:
            yield Finding.warn(
                volume.name,
                f"guest {guest}'s discards stop at {broken.name}: {broken.detail}",
                fix=broken.fix,
            )
        elif any(link.ok is None for link in result.links):
            unknown = next(link for link in result.links if link.ok is None)
            yield Finding.skip(volume.name, f"{unknown.name}: {unknown.detail}")
        else:
            yield Finding.ok(volume.name, f"guest {guest}'s discards reach the disk")


def _header_flags(host: Host, device: str) -> tuple[str, ...]:
    volume = next(v for v in host.config.volumes if v.device == device)
    try:
        return host.header(volume).flags
    except LuksvmError:
        return ()


def _fstrim_timer(host: Host) -> Iterator[Finding]:
    state = host.unit_files().get("fstrim.timer", "not installed")
    fix = "systemctl enable --now fstrim.timer"
    why = "the host's filesystems are not trimmed: SSDs slow down and thin pools do not shrink"
    if state not in systemctl.ENABLED_STATES:
        yield Finding.warn("fstrim.timer", f"fstrim.timer is {state}: {why}", fix=fix)
    elif host.systemd_running:
        active = host.unit_properties(["fstrim.timer"], ("ActiveState",))
        if active.get("fstrim.timer", {}).get("ActiveState") != "active":
            yield Finding.warn(
                "fstrim.timer", f"fstrim.timer is enabled but not active: {why}", fix=fix
            )
        else:
            yield Finding.ok("fstrim.timer", "enabled and active (host filesystems weekly)")
    else:
        yield Finding.ok("fstrim.timer", "enabled (host filesystems weekly)")


@check("swap", "host swap is encrypted (guest memory can be paged out to it)")
def swap(host: Host) -> Iterator[Finding]:
    if not host.live:
        yield Finding.skip(HOST, f"{host.root} is not the running system")
        return
    if not host.config.volumes:
        yield Finding.skip(HOST, "no volumes configured")
        return
    areas = blockdev.swaps(host.proc)
    if not areas:
        yield Finding.ok(HOST, "no swap in use")
        return
    for area in areas:
        if area.kind == "file":
            backing = blockdev.backing_of_file(area.path, host.sys, host.proc)
        else:
            backing = blockdev.backing_of_device(area.path, host.sys, host.proc)
        if backing.encrypted or backing.memory:
            yield Finding.ok(area.path, f"swap on {backing.description}")
        elif backing.encrypted is None:
            yield Finding.skip(area.path, f"cannot tell whether {backing.description} is encrypted")
        else:
            yield Finding.warn(
                area.path,
                f"swap on {backing.description} is not encrypted: the guests' memory (their "
                "decrypted data and page cache) can be paged out to it in clear",
                fix=f"encrypt it with a fresh key per boot: in /etc/crypttab "
                f"`cryptswap {area.path} /dev/urandom swap,cipher=aes-xts-plain64,size=512` "
                "and /dev/mapper/cryptswap in /etc/fstab (better by PARTUUID=); or swap to "
                f"zram; or `swapoff {shlex.quote(area.path)}` and drop it from /etc/fstab",
            )


# --- unattended keys (TPM2, Tang) and key hygiene ------------------------------------------------

UNATTENDED_TOKEN_KINDS = ("tpm2", "tang", "sss", "fido2", "pkcs11")


def _inventory(volume: Volume) -> tokens.Inventory | LuksvmError:
    try:
        if not volume.device or not os.path.exists(volume.device):
            raise LuksvmError(f"source {volume.device or volume.source} does not exist")
        return tokens.read_inventory(volume.device)
    except LuksvmError as error:
        return error


@check(
    "unattended-keys",
    "each TPM2/Tang key would unlock its volume now, and a way back exists besides them",
)
def unattended_keys(host: Host) -> Iterator[Finding]:
    volumes = list(host.config.volumes)
    if not volumes:
        yield Finding.skip(HOST, "no volumes configured")
    for volume, inventory in zip(volumes, host.each(_inventory, volumes)):
        if isinstance(inventory, LuksvmError):
            yield Finding.skip(volume.name, f"header not readable: {error_text(inventory)}")
            continue
        yield from _unattended_findings(host, volume, inventory)


def _unattended_findings(
    host: Host, volume: Volume, inventory: tokens.Inventory
) -> Iterator[Finding]:
    from luksvm import enroll

    name = volume.name
    held = [t for t in inventory.tokens if t.kind in UNATTENDED_TOKEN_KINDS]
    if not held and not volume.unattended:
        yield Finding.ok(name, "no TPM2 or Tang keys (nothing to check)")
        return
    if volume.token_source and not inventory.tokens_of(volume.token_source):
        yield Finding.fail(
            name,
            f"{volume.where}: {volume.token_source}-device option set, but {volume.device} has "
            f"no {volume.token_source} token: that attempt fails at every boot",
            fix=f"luksvm enroll {name} --{volume.token_source}",
        )
    if volume.tang and not (inventory.tokens_of("tang") or inventory.tokens_of("sss")):
        yield Finding.fail(
            name,
            f"{volume.where}: x-luksvm.tang set, but {volume.device} has no Tang token",
            fix=f"luksvm enroll {name} --tang URL --thumbprint TP",
        )
    for token in held:
        if token.kind == "tpm2" and not volume.token_source:
            yield Finding.warn(
                name,
                f"token {token.number} ({token.describe()}) is never tried: no tpm2-device= "
                f"option at {volume.where}",
                fix=f"add tpm2-device=auto to the options of {name}, then luksvm apply",
            )
        if token.kind in ("tang", "sss") and not volume.tang:
            yield Finding.warn(
                name,
                f"token {token.number} ({token.describe()}) is never tried: no x-luksvm.tang "
                f"option at {volume.where}",
                fix=f"add x-luksvm.tang to the options of {name}, then luksvm apply",
            )
    for result in enroll.checks(volume, host.config, inventory):
        if result.source in ("keyfile", "keyring"):
            continue  # check "keys" speaks of those
        if result.state == "fail":
            yield Finding.fail(
                name,
                f"{result.what}: {result.detail}",
                fix=f"luksvm keys {name}; re-enrol with luksvm enroll {name} "
                f"--{'tpm2' if result.source == 'tpm2' else 'tang URL --thumbprint TP'}, then "
                f"luksvm enroll {name} --remove token:N for the old one",
            )
        elif result.state == "ok":
            yield Finding.ok(name, f"{result.what}: {result.detail}")
        else:
            yield Finding.skip(name, f"{result.what}: {result.detail}")
    yield _way_back(host, volume, inventory)


def _way_back(host: Host, volume: Volume, inventory: tokens.Inventory) -> Finding:
    """A passphrase or recovery key besides the unattended keys (and the configured key)."""
    keyfile_slot = None
    if volume.key.kind == "file":
        try:
            with open(host.path(volume.key.path), "rb") as f:
                keyfile_slot = tokens.key_slot(volume.device, f.read())
        except OSError:
            keyfile_slot = None
    back = [
        s.number
        for s in inventory.keyslots
        if (s.passphrase and s.number != keyfile_slot)
        or any(inventory.token(t).kind == "recovery" for t in s.tokens)
    ]
    if back:
        return Finding.ok(
            volume.name,
            f"keyslot(s) {', '.join(map(str, back))} (passphrase or recovery key) unlock it "
            "when the unattended keys fail",
        )
    return Finding.warn(
        volume.name,
        f"nothing but its unattended keys unlocks {volume.device}: when the TPM's PCRs change "
        "or the Tang server is gone, no one can unlock it",
        fix=f"luksvm enroll {volume.name} --recovery-key   (in a terminal; keep the key offline)",
    )


@check("stale-backups", "no header backup still holds a key that was removed")
def stale_header_backups(host: Host) -> Iterator[Finding]:
    cfg = host.config
    if not cfg.volumes:
        yield Finding.skip(HOST, "no volumes configured")
    for volume in cfg.volumes:
        folder = os.path.join(host.path(cfg.settings.backup_dir), volume.name)
        stale = backup.stale_backups(folder)
        if not stale:
            yield Finding.ok(volume.name, "no header backup holds a removed key")
            continue
        yield Finding.warn(
            volume.name,
            f"{len(stale)} header backup(s) still hold a removed key, which unlocks the volume "
            f"with them: {_names([b.path for b in stale])}",
            fix=f"luksvm header-backup --prune-stale {volume.name}   (deleting does not erase on "
            "journalling/copy-on-write filesystems or SSDs: keep the backup directory encrypted)",
        )
