"""LUKS header backups: verified, atomic, deduplicated and rotated; and restoring one.

A backup is exactly the file `cryptsetup luksHeaderBackup` writes, stored as
DIR/NAME/<UTC time>_<LUKS UUID>.luksheader. Beside each lies <backup>.json with the SHA-256 of the
backup file and of the device's LUKS metadata (cryptsetup.metadata_size: 4 KiB for LUKS1, 32 KiB
for a default LUKS2 header) as it was when the backup was taken.

"Has the header changed?" is then one small read and hash per volume, no luksDump: every change
cryptsetup makes (luksAddKey, luksKillSlot, luksChangeKey, tokens, reencryption) rewrites the
metadata. Hashing the whole 16 MiB area instead would cost 800 MiB of reads for 50 volumes each
week, and would take bit rot in a keyslot's key material for a change and back it up. The record
stays right for LUKS1, whose backup is not a byte copy of the device (cryptsetup zeroes the gap
after the LUKS1 header and pads to a page). A backup without its .json costs one extra backup on
the next run. The file hash lets a restore refuse a backup that rotted.

The record also holds the backup file's stamp (size, mtime, ctime, inode) as of its last full
hash, and when that was. doctor (every 15 minutes) and an unchanged header-backup rerun hash the
16 MiB file again only when the stamp differs — any write through the filesystem moves ctime, also
when mtime is set back — or when the last full hash is older than [backup] max_age (doctor) or
REHASH_AFTER (header-backup, which then records the new stamp). What the stamp cannot see is a
change beneath the filesystem (media bit rot, a write to the raw disk, an offline edit): that is
found by the next full hash, within a week of weekly header-backup runs. A restore always hashes.

Each header-backup run that finds a volume's header unchanged and its newest backup intact records
when (header_confirmed): the backup is then as good as one taken that moment. doctor and the
metrics measure a backup's age from the later of its creation and that confirmation, so the
max_age warning of a header that never changes clears with the next header-backup run instead of
standing forever.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import re
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Callable

from luksvm import blockdev, cryptsetup, files, journal
from luksvm.config import Config, Volume
from luksvm.cryptsetup import LuksHeader
from luksvm.errors import LuksvmError, UsageError

log = logging.getLogger("luksvm.backup")

SUFFIX = ".luksheader"
BACKUP_NAME = re.compile(r"^(\d{8}T\d{6}\.\d{3}Z)_([0-9A-Za-z-]+)\.luksheader$")
RAW_NAME = re.compile(r"^(\d{8}T\d{6}\.\d{3}Z)_raw-before-restore\.bin$")
TEMP_SUFFIX = ".tmp"
LOCK_FILE = ".lock"
CHUNK = 1 << 20

PASSPHRASE_WARNING = (
    "a header backup keeps every passphrase it holds valid for as long as the file exists "
    "(cryptsetup FAQ): after removing or changing a passphrase (luksKillSlot, luksRemoveKey, "
    "luksChangeKey), purge the older backups with `luksvm header-backup --prune-before now`"
)


# --- names and times ----------------------------------------------------------------------------


def stamp(moment: datetime) -> str:
    """20240501T120000.123Z: UTC to the millisecond, sorts as it reads."""
    return moment.strftime("%Y%m%dT%H%M%S") + f".{moment.microsecond // 1000:03d}Z"


def parse_stamp(text: str) -> datetime:
    moment = datetime.strptime(text[:15], "%Y%m%dT%H%M%S")
    return moment.replace(microsecond=int(text[16:19]) * 1000, tzinfo=timezone.utc)


def iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + f".{moment.microsecond // 1000:03d}Z"


def parse_date(text: str, now: datetime | None = None) -> datetime:
    """--prune-before: `now`, a date (local midnight) or an ISO 8601 date and time (local time
    unless it carries an offset or Z)."""
    now = now or datetime.now(timezone.utc)
    if text == "now":
        return now
    try:
        moment = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
    except ValueError:
        raise UsageError(
            f"--prune-before {text!r}: expected now, a date such as 2024-05-01 or a time such as "
            "2024-05-01T12:00 (local time; append Z for UTC)"
        ) from None
    try:
        if moment.tzinfo is None:
            moment = moment.astimezone()  # the admin's local time
        return moment.astimezone(timezone.utc)
    except (ValueError, OverflowError):
        raise UsageError(
            f"--prune-before {text!r}: out of the range of dates (years 1 to 9999 in UTC)",
            fix="give a date such as 2024-05-01, or now",
        ) from None


@dataclass(frozen=True)
class Backup:
    path: str
    created: datetime
    uuid: str  # "" for a raw copy
    raw: bool  # a raw copy of a header area that no longer read as LUKS, saved before a restore

    @property
    def record_path(self) -> str:
        return self.path + ".json"


def list_backups(directory: str) -> list[Backup]:
    """Backups and raw copies in one volume's folder, newest first. Other files are not ours."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        match = BACKUP_NAME.match(name)
        raw = RAW_NAME.match(name)
        if match:
            found.append(
                Backup(os.path.join(directory, name), parse_stamp(match[1]), match[2], False)
            )
        elif raw:
            found.append(Backup(os.path.join(directory, name), parse_stamp(raw[1]), "", True))
    found.sort(key=lambda b: (b.created, b.path), reverse=True)
    return found


def deletions(
    backups: Sequence[Backup], *, keep: int, adding: bool, prune_before: datetime | None = None
) -> list[Backup]:
    """What to delete once this run's backup (if `adding`) is safely in place; `backups` newest
    first. Rotation keeps the newest `keep` LUKS backups, counting the one being added. Pruning
    deletes everything created before `prune_before`, raw copies too (they may still hold old
    keyslots), except the newest backup when none is added: it is the copy of the live header."""
    luks = [b for b in backups if not b.raw]
    doomed = luks[max(keep - 1, 0) if adding else keep :]
    if prune_before is not None:
        protected = luks[0] if luks and not adding else None
        doomed += [
            b
            for b in backups
            if b.created < prune_before and b is not protected and b not in doomed
        ]
    return sorted(doomed, key=lambda b: (b.created, b.path), reverse=True)


# --- verification -------------------------------------------------------------------------------


def keyslot_layout(header: LuksHeader) -> tuple[tuple[int, str, int], ...]:
    return tuple((k.number, k.kdf, k.key_bits) for k in header.keyslots)


def header_differences(live: LuksHeader, copy: LuksHeader) -> list[str]:
    """How a copy's header differs from the live one: UUID, LUKS version, cipher, payload offset,
    keyslot layout. Empty when the copy verifies."""
    pairs: list[tuple[str, object, object]] = [
        ("UUID", live.uuid, copy.uuid),
        ("LUKS version", live.version, copy.version),
        ("cipher", live.cipher, copy.cipher),
        ("data offset", live.data_offset, copy.data_offset),
        ("keyslots (number, kdf, key bits)", keyslot_layout(live), keyslot_layout(copy)),
    ]
    return [f"{what} {b} where the device has {a}" for what, a, b in pairs if a != b]


def sha256_of(path: str, size: int | None = None) -> str:
    """SHA-256 of the first `size` bytes of `path` (all of it when None), read in 1 MiB pieces."""
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    left = size
    with open(path, "rb", buffering=0) as f:
        while left is None or left > 0:
            want = CHUNK if left is None else min(CHUNK, left)
            got = f.readinto(view[:want])
            if not got:
                break
            digest.update(view[:got])
            if left is not None:
                left -= got
    return digest.hexdigest()


@dataclass(frozen=True)
class FileStamp:
    """What the filesystem says of a backup file. A write through the filesystem changes size or
    mtime, and always ctime, which no unprivileged call can set back (`touch -d` restores mtime
    and moves ctime); a replaced file has another inode."""

    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int

    @classmethod
    def of(cls, path: str) -> FileStamp:
        st = os.stat(path)
        return cls(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


@dataclass(frozen=True)
class Record:
    """What <backup>.json holds."""

    file_sha256: str
    metadata_bytes: int
    metadata_sha256: str
    # the file as it was when file_sha256 was last computed, and when that was; None in records
    # written before luksvm kept them (the file is then hashed, and header-backup adds them)
    stamp: FileStamp | None = None
    hashed: datetime | None = None
    # when header-backup last found the header unchanged and this backup intact (None: never)
    confirmed: datetime | None = None


def read_record(backup: Backup) -> Record | None:
    try:
        with open(backup.record_path, encoding="utf-8") as f:
            data = json.load(f)
        record = Record(
            str(data["file_sha256"]), int(data["metadata_bytes"]), str(data["metadata_sha256"])
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    with contextlib.suppress(ValueError, KeyError, TypeError):  # unreadable: never confirmed
        record = dataclasses.replace(record, confirmed=parse_iso(data["header_confirmed"]))
    try:  # a stamp that does not read only costs a full hash
        stamp = FileStamp(**{k: int(v) for k, v in data["file_stamp"].items()})
        hashed = parse_iso(data["file_hashed"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return record
    return dataclasses.replace(record, stamp=stamp, hashed=hashed)


def parse_iso(value: object) -> datetime:
    """A time as iso() writes it; ValueError for anything else (also one without a zone)."""
    moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    if moment.tzinfo is None:
        raise ValueError(f"no time zone in {value!r}")
    return moment


def last_confirmed(backup: Backup) -> datetime:
    """When `backup` was last known to hold the current header: taken, or confirmed unchanged by
    a later header-backup run (see the module's docstring)."""
    record = read_record(backup)
    if record is None or record.confirmed is None:
        return backup.created
    return max(backup.created, record.confirmed)


def write_record(backup: Backup, fields: dict[str, object], record: Record) -> None:
    """<backup>.json: `fields` (volume, device, uuid, …) and the record's hashes and stamp."""
    data = dict(fields)
    data.update(
        file_sha256=record.file_sha256,
        metadata_bytes=record.metadata_bytes,
        metadata_sha256=record.metadata_sha256,
    )
    if record.stamp is not None and record.hashed is not None:
        data["file_stamp"] = dataclasses.asdict(record.stamp)
        data["file_hashed"] = iso(record.hashed)
    if record.confirmed is not None:
        data["header_confirmed"] = iso(record.confirmed)
    files.write_atomically(backup.record_path, json.dumps(data, indent=2) + "\n")


# How often header-backup hashes the newest backup in full although its stamp is unchanged: what
# the filesystem cannot see (bit rot, writes beneath it) is found within a week of weekly runs.
REHASH_AFTER = timedelta(days=7)


def file_intact(
    backup: Backup, record: Record, *, now: datetime, rehash_after: timedelta
) -> tuple[bool, Record | None]:
    """Whether the backup file still hashes as recorded. Hashed in full only when the file's stamp
    differs from the recorded one or the last full hash is older than `rehash_after`; otherwise
    the stamp answers (see FileStamp for what that does and does not see). The second value is
    the record to write back after a full hash that matched (None: nothing new to record)."""
    stamp = FileStamp.of(backup.path)
    if (
        record.stamp == stamp
        and record.hashed is not None
        and timedelta(0) <= now - record.hashed < rehash_after
    ):
        return True, None
    if sha256_of(backup.path) != record.file_sha256:
        return False, None
    return True, dataclasses.replace(record, stamp=stamp, hashed=now)


def metadata_digest(device: str) -> tuple[int, str]:
    """(bytes, SHA-256) of the LUKS metadata at the start of `device`; (0, "") when none."""
    with open(device, "rb") as f:
        size = cryptsetup.metadata_size(f.read(cryptsetup.METADATA_PROBE))
    return (size, sha256_of(device, size)) if size else (0, "")


# --- the backup directory -----------------------------------------------------------------------


def directory_on_volumes(
    directory: str,
    volumes: Sequence[Volume],
    *,
    sys_dir: str = blockdev.SYS_DIR,
    mountinfo: str = blockdev.MOUNTINFO,
    number: str | None = None,
) -> str | None:
    """Why `directory` must not hold the backups (its filesystem lies on one of `volumes`), or
    None. A volume counts when its mapping or its encrypted source device is in the stack.
    `number`: the filesystem's device number, when the caller knows it."""
    number = number or blockdev.filesystem_device(directory, mountinfo)
    if number is None:
        return None
    devices = blockdev.stack(number, sys_dir)
    numbers = {d.number for d in devices}
    path = " → ".join(d.label for d in devices)
    for volume in volumes:
        source = blockdev.number_of(volume.device)
        if any(d.dm_name == volume.name for d in devices) or (source and source in numbers):
            return (
                f"backup dir {directory} is on the encrypted volume {volume.name} it backs up "
                f"({path}): a lost volume would take its header backups with it; set [backup] "
                "dir in luksvm.conf to a directory on another device"
            )
    return None


def prepare_directory(path: str) -> None:
    """Create `path` mode 0700 if needed; refuse one not owned by us (someone else could swap the
    backups), tighten a looser mode."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)
    except OSError as error:
        found = files.blocker(path)
        raise LuksvmError(
            f"cannot make the header backup folder {path}: "
            + (f"{found} is not a folder" if found else str(error.strerror)),
            fix="move it out of the way, or set [backup] dir in luksvm.conf to a folder",
        ) from None
    if not stat.S_ISDIR(st.st_mode):
        raise LuksvmError(f"{path} is not a directory; header backups need a directory there")
    if st.st_uid != os.geteuid():
        raise LuksvmError(
            f"{path} is owned by uid {st.st_uid}, not {os.geteuid()}: header backups must be "
            f"root's alone; chown root:root {path} or choose another [backup] dir"
        )
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)


@contextlib.contextmanager
def locked(directory: str) -> Iterator[None]:
    """One backup or restore at a time per backup directory."""
    fd = os.open(os.path.join(directory, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LuksvmError(
                f"another luksvm header-backup or header-restore is using {directory} "
                f"(it holds {os.path.join(directory, LOCK_FILE)}); try again when it has finished"
            ) from None
        yield
    finally:
        os.close(fd)


def _remove_stale_temporaries(directory: str) -> None:
    """Temporary files of a run that was killed (we hold the lock: no run is writing them)."""
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(directory):
            if name.startswith(".") and name.endswith(TEMP_SUFFIX):
                os.unlink(os.path.join(directory, name))
                log.info("removed %s, left by an interrupted run", os.path.join(directory, name))


# --- one volume ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """One volume's result; `file` is the newest backup after the run."""

    volume: str
    device: str
    file: str = ""
    size: int = 0
    uuid: str = ""
    created: str = ""
    changed: bool = False
    removed: tuple[str, ...] = ()
    commands: tuple[tuple[str, ...], ...] = ()  # what a dry run would have run
    error: str = ""

    def as_dict(self) -> dict[str, object]:
        return {
            "volume": self.volume,
            "device": self.device,
            "file": self.file,
            "size": self.size,
            "uuid": self.uuid,
            "created": self.created,
            "changed": self.changed,
            "removed": list(self.removed),
            "error": self.error or None,
        }


def unchanged_since(backup: Backup, device: str) -> bool:
    """True when the device's LUKS metadata hashes as it did when `backup` was taken."""
    record = read_record(backup)
    if record is None:
        return False
    try:
        return metadata_digest(device) == (record.metadata_bytes, record.metadata_sha256)
    except OSError:
        return False  # the caller's cryptsetup call says why the device cannot be read


@dataclass(frozen=True)
class Verification:
    intact: bool  # the file is what was written (its recorded hash), or reads as a LUKS header
    current: bool  # it holds the device's current LUKS metadata: no header change since
    problem: str  # why not, "" when both hold


def verify_backup(
    backup: Backup,
    device: str,
    *,
    now: datetime | None = None,
    rehash_after: timedelta = REHASH_AFTER,
) -> Verification:
    """Whether `backup` can restore `device` as it is now. With its .json record: the file as
    recorded (its stamp, or its hash: see file_intact) and the device's metadata hash (no
    process); without: the headers compared (cryptsetup). Writes nothing."""
    record = read_record(backup)
    if record is None:
        try:
            differences = header_differences(
                cryptsetup.read_header(device), cryptsetup.read_header(backup.path)
            )
        except LuksvmError as error:
            return Verification(False, False, str(error))
        return Verification(True, not differences, "; ".join(differences))
    intact, _ = file_intact(
        backup, record, now=now or datetime.now(timezone.utc), rehash_after=rehash_after
    )
    if not intact:
        return Verification(
            False, False, f"{backup.path} no longer hashes as recorded in {backup.record_path}"
        )
    if not unchanged_since(backup, device):
        return Verification(
            True,
            False,
            "the LUKS header changed since (a keyslot or token added, removed or changed)",
        )
    return Verification(True, True, "")


def backup_volume(
    volume: Volume,
    directory: str,
    *,
    keep: int,
    prune_before: datetime | None = None,
    dry_run: bool = False,
    now: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
) -> Outcome:
    """Back up one volume's header into `directory` unless it is unchanged, then rotate/prune."""
    device = volume.device
    backups = list_backups(directory)
    newest = next((b for b in backups if not b.raw), None)
    # The metadata digest answers "unchanged" with one small read: that header was verified as
    # LUKS when it was backed up. Only a changed (or unrecorded) header is asked of cryptsetup.
    changed = newest is None or not unchanged_since(newest, device)
    if newest is not None and not changed and not dry_run:
        changed = not _still_intact(volume, newest, now())
    if changed and not cryptsetup.is_luks(device):
        hint = (
            f"; restore the newest backup with: luksvm header-restore {volume.name} --from "
            f"{newest.path}"
            if newest
            else ""
        )
        raise LuksvmError(
            f"{volume.name}: {device} does not read as LUKS (cryptsetup isLuks){hint}"
        )
    doomed = deletions(backups, keep=keep, adding=changed, prune_before=prune_before)
    removed = tuple(b.path for b in doomed)
    if dry_run:
        commands: tuple[tuple[str, ...], ...] = ()
        if changed:
            uuid = cryptsetup.read_header(device).uuid
            target = os.path.join(directory, f"{stamp(now())}_{uuid}{SUFFIX}")
            commands = (("cryptsetup", "luksHeaderBackup", device, "--header-backup-file", target),)
        commands += tuple(("rm", "--", path) for path in removed)
        if changed or newest is None:
            return Outcome(volume.name, device, changed=True, removed=removed, commands=commands)
        return _outcome(volume, newest, changed=False, removed=removed, commands=commands)
    if changed:
        newest = _write_backup(volume, directory, now())
    assert newest is not None
    for backup in doomed:
        for path in (backup.path, backup.record_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    if doomed:
        files.fsync(directory)
    return _outcome(volume, newest, changed=changed, removed=removed)


def _still_intact(volume: Volume, newest: Backup, moment: datetime) -> bool:
    """The newest backup of an unchanged header still hashes as recorded (hashed in full when its
    stamp changed or REHASH_AFTER passed); then it is recorded as confirmed at `moment`, with the
    refreshed stamp. A backup that does not is left for the admin to look at, and a new one is
    taken."""
    record = read_record(newest)
    if record is None:
        return False
    intact, refreshed = file_intact(newest, record, now=moment, rehash_after=REHASH_AFTER)
    if not intact:
        log.warning(
            "%s no longer hashes as recorded in %s: taking a new backup of %s",
            newest.path,
            newest.record_path,
            volume.name,
            extra=journal.fields(volume=volume.name),
        )
        return False
    try:
        with open(newest.record_path, encoding="utf-8") as f:
            fields = json.load(f)
    except (OSError, ValueError):
        fields = {}
    confirmed = dataclasses.replace(refreshed or record, confirmed=moment)
    write_record(newest, fields if isinstance(fields, dict) else {}, confirmed)
    return True


def _outcome(
    volume: Volume,
    newest: Backup,
    *,
    changed: bool,
    removed: tuple[str, ...],
    commands: tuple[tuple[str, ...], ...] = (),
) -> Outcome:
    return Outcome(
        volume=volume.name,
        device=volume.device,
        file=newest.path,
        size=os.path.getsize(newest.path),
        uuid=newest.uuid,
        created=iso(newest.created),
        changed=changed,
        removed=removed,
        commands=commands,
    )


def _write_backup(volume: Volume, directory: str, moment: datetime) -> Backup:
    """luksHeaderBackup into a temporary file beside the final one, verify it against the live
    header, fsync, link it under its final name (never over an existing file), record its hashes."""
    device = volume.device
    live = cryptsetup.read_header(device)
    before = metadata_digest(device)
    temporary = os.path.join(directory, f".{stamp(moment)}.{os.getpid()}{TEMP_SUFFIX}")
    try:
        cryptsetup.header_backup(device, temporary)
        try:
            copy = cryptsetup.read_header(temporary)
        except LuksvmError as error:
            raise LuksvmError(f"{volume.name}: the backup does not verify: {error}") from None
        differences = header_differences(live, copy)
        if differences:
            raise LuksvmError(
                f"{volume.name}: the backup does not verify: " + "; ".join(differences)
            )
        if metadata_digest(device) != before:
            raise LuksvmError(
                f"{volume.name}: the header of {device} changed while it was backed up; run again"
            )
        os.chmod(temporary, 0o600)
        files.fsync(temporary)
        file_sha256 = sha256_of(temporary)
        final = os.path.join(directory, f"{stamp(moment)}_{live.uuid}{SUFFIX}")
        os.link(temporary, final)  # fails rather than replace an existing backup
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
    backup = Backup(final, moment, live.uuid, False)
    fields: dict[str, object] = {
        "volume": volume.name,
        "device": device,
        "uuid": live.uuid,
        "luks_version": live.version,
        "created": iso(moment),
    }
    written = FileStamp.of(final)  # after the link and the unlink, which changed its ctime
    write_record(backup, fields, Record(file_sha256, before[0], before[1], written, moment))
    files.fsync(directory)
    log.info(
        "backed up the LUKS%d header of %s (%s) to %s",
        live.version,
        volume.name,
        device,
        final,
        extra=journal.fields(volume=volume.name, message_id="header-backup"),
    )
    return backup


# --- a run over the configured volumes ----------------------------------------------------------


@dataclass(frozen=True)
class BackupReport:
    directory: str
    outcomes: tuple[Outcome, ...]
    warning: str = PASSPHRASE_WARNING
    pruned_before: str = ""

    @property
    def failed(self) -> bool:
        return any(o.error for o in self.outcomes)

    def as_dict(self) -> dict[str, object]:
        return {
            "backup_dir": self.directory,
            "volumes": [o.as_dict() for o in self.outcomes],
            "pruned_before": self.pruned_before or None,
            "warning": self.warning,
        }


def selected(config: Config, names: Sequence[str]) -> list[Volume]:
    return [config.volume(n) for n in names] if names else list(config.volumes)


def backup_headers(
    config: Config,
    names: Sequence[str] = (),
    *,
    prune_before: datetime | None = None,
    dry_run: bool = False,
    sys_dir: str = blockdev.SYS_DIR,
    mountinfo: str = blockdev.MOUNTINFO,
) -> BackupReport:
    """Back up the headers of the named volumes (all configured ones when none are named). One
    volume's failure is reported in its Outcome; the others go on."""
    volumes = selected(config, names)
    settings = config.settings
    directory = settings.backup_dir
    reason = directory_on_volumes(directory, config.volumes, sys_dir=sys_dir, mountinfo=mountinfo)
    if reason:
        raise LuksvmError(reason)
    outcomes = []
    with contextlib.ExitStack() as stack:
        if not dry_run:
            prepare_directory(directory)
            stack.enter_context(locked(directory))
        for volume in volumes:
            folder = os.path.join(directory, volume.name)
            try:
                if not dry_run:
                    prepare_directory(folder)
                    _remove_stale_temporaries(folder)
                outcome = backup_volume(
                    volume,
                    folder,
                    keep=settings.backup_keep,
                    prune_before=prune_before,
                    dry_run=dry_run,
                )
            except (LuksvmError, OSError) as error:
                message = (
                    str(error) if isinstance(error, LuksvmError) else f"{volume.name}: {error}"
                )
                log.error(
                    "%s",
                    message,
                    extra=journal.fields(volume=volume.name, message_id="header-backup-failed"),
                )
                outcome = Outcome(volume.name, volume.device, error=message)
            outcomes.append(outcome)
    return BackupReport(
        directory, tuple(outcomes), pruned_before=iso(prune_before) if prune_before else ""
    )


# --- restore ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RestorePlan:
    volume: Volume
    device: str
    backup_file: str
    backup: LuksHeader  # the header in the backup file
    live: LuksHeader | None  # None: the device no longer reads as LUKS
    matched_by: str  # device UUID | configured UUID= | backup folder name | --force-uuid-mismatch
    folder: str  # where the current header is saved first
    notes: tuple[str, ...] = field(default=())

    @property
    def area_bytes(self) -> int:
        """Bytes the restore overwrites: the backup file's length."""
        return os.path.getsize(self.backup_file)

    def describe(self) -> list[str]:
        lines = [
            f"volume:   {self.volume.name} on {self.device}",
            f"backup:   {self.backup_file} (LUKS{self.backup.version}, UUID {self.backup.uuid}, "
            f"keyslots {', '.join(str(k.number) for k in self.backup.keyslots) or 'none'}; "
            f"matched by {self.matched_by})",
        ]
        if self.live is not None:
            lines.append(
                f"current:  LUKS{self.live.version}, UUID {self.live.uuid}; backed up first to "
                f"{self.folder}/"
            )
        else:
            lines.append(
                f"current:  not LUKS; its first {self.area_bytes} bytes are copied first to "
                f"{self.folder}/…_raw-before-restore.bin"
            )
        lines += list(self.notes)
        lines.append(
            "run:      "
            + " ".join(
                [
                    "cryptsetup luksHeaderRestore --batch-mode",
                    self.device,
                    "--header-backup-file",
                    self.backup_file,
                ]
            )
        )
        return lines


def plan_restore(
    config: Config,
    name: str,
    backup_file: str,
    *,
    device: str | None = None,
    force_uuid_mismatch: bool = False,
) -> RestorePlan:
    """Every check before a restore; runs nothing that writes. LuksvmError says why not."""
    volume = config.volume(name)
    device = device or volume.device
    backup_file = os.path.abspath(backup_file)
    if not os.path.isfile(backup_file):
        raise UsageError(f"--from {backup_file}: no such file")
    if not os.path.exists(device):
        raise LuksvmError(
            f"{name}: device {device} does not exist; when its header is gone a UUID= source "
            "no longer resolves: name the device with --device"
        )
    try:
        backup = cryptsetup.read_header(backup_file)
    except LuksvmError as error:
        raise LuksvmError(
            f"{backup_file} does not verify as a LUKS header backup: {error}"
        ) from None
    record = read_record(Backup(backup_file, datetime.now(timezone.utc), backup.uuid, False))
    if record is not None and sha256_of(backup_file) != record.file_sha256:
        raise LuksvmError(
            f"{backup_file} changed since it was written (its SHA-256 differs from the one in "
            f"{backup_file}.json): the file is damaged; choose another backup"
        )
    live = cryptsetup.read_header(device) if cryptsetup.is_luks(device) else None
    matched_by, mismatch = _match(volume, backup, backup_file, live)
    if mismatch:
        if not force_uuid_mismatch:
            raise LuksvmError(
                f"{name}: {mismatch}; nothing changed (--force-uuid-mismatch overrides)"
            )
        matched_by = "--force-uuid-mismatch"
    _refuse_unless_locked(volume, device)
    folder = os.path.join(config.settings.backup_dir, volume.name)
    return RestorePlan(volume, device, backup_file, backup, live, matched_by, folder)


def _match(
    volume: Volume, backup: LuksHeader, backup_file: str, live: LuksHeader | None
) -> tuple[str, str]:
    """(how the backup matched, why it does not match)."""
    if live is not None:
        if backup.uuid == live.uuid:
            return "device UUID", ""
        return "", f"the backup's UUID {backup.uuid} is not the device's {live.uuid}"
    tag, _, value = volume.source.partition("=")
    if tag == "UUID":
        if backup.uuid.lower() == value.lower():
            return "configured UUID=", ""
        return "", f"the backup's UUID {backup.uuid} is not the configured UUID={value}"
    folder = os.path.basename(os.path.dirname(backup_file))
    if folder == volume.name:
        return "backup folder name", ""
    return "", (
        f"{volume.device} does not read as LUKS and the backup is in folder {folder!r}, not "
        f"{volume.name!r}: nothing ties it to this volume"
    )


def _refuse_unless_locked(volume: Volume, device: str) -> None:
    if os.path.exists(volume.mapper_path) or cryptsetup.status(volume.name).active:
        raise LuksvmError(
            f"{volume.name} is unlocked ({volume.mapper_path}): lock it first "
            f"(luksvm lock {volume.name}); a header is never restored under an open mapping"
        )
    held_by = blockdev.describe(device).holders if blockdev.number_of(device) else ()
    if held_by:
        raise LuksvmError(
            f"{volume.name}: {device} is held by {', '.join(held_by)}; close what is open on it "
            "first"
        )


def confirm(name: str, device: str, ask: Callable[[str], str] = input) -> None:
    """The admin types the mapping name back; anything else changes nothing."""
    try:
        answer = ask(f"Type the mapping name {name} to overwrite the LUKS header on {device}: ")
    except EOFError:
        answer = ""
    if answer.strip() != name:
        raise LuksvmError(f"not confirmed (expected {name!r}); nothing changed")


def restore_header(plan: RestorePlan, config: Config) -> str:
    """Save the current header (a verified backup, or the raw area when it is not LUKS), restore,
    verify. Returns where the current header was saved."""
    settings = config.settings
    prepare_directory(settings.backup_dir)
    with locked(settings.backup_dir):
        prepare_directory(plan.folder)
        if plan.live is not None:
            volume = dataclasses.replace(plan.volume, device=plan.device)
            saved = backup_volume(volume, plan.folder, keep=settings.backup_keep).file
        else:
            saved = _copy_raw_area(plan.device, plan.folder, plan.area_bytes)
        cryptsetup.header_restore(plan.device, plan.backup_file)
    restored = cryptsetup.read_header(plan.device)
    differences = header_differences(plan.backup, restored)
    if differences:
        raise LuksvmError(
            f"{plan.volume.name}: after the restore the header of {plan.device} differs from "
            f"the backup: {'; '.join(differences)}; the previous header is in {saved}"
        )
    log.info(
        "restored the header of %s (%s) from %s; the previous one is in %s",
        plan.volume.name,
        plan.device,
        plan.backup_file,
        saved,
        extra=journal.fields(volume=plan.volume.name, message_id="header-backup"),
    )
    return saved


def _copy_raw_area(device: str, folder: str, size: int) -> str:
    moment = datetime.now(timezone.utc)
    final = os.path.join(folder, f"{stamp(moment)}_raw-before-restore.bin")
    temporary = os.path.join(folder, f".{stamp(moment)}.{os.getpid()}{TEMP_SUFFIX}")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as out, open(device, "rb") as source:
            left = size
            while left > 0:
                piece = source.read(min(CHUNK, left))
                if not piece:
                    break
                out.write(piece)
                left -= len(piece)
            out.flush()
            os.fsync(out.fileno())
        os.link(temporary, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
    files.fsync(folder)
    return final


# --- key hygiene: backups that still hold a removed key -----------------------------------------

STALE_SUFFIX = ".stale"  # beside a backup: it still holds a key removed from the live header


def stale_marker(backup: Backup) -> str:
    return backup.path + STALE_SUFFIX


def mark_stale(folder: str, salts: frozenset[str], *, keep: str, why: str) -> tuple[str, ...]:
    """Mark every backup in `folder` whose header still has a keyslot with one of `salts` (the
    keyslots just removed), never `keep` (the backup of the live header). Returns their paths."""
    from luksvm import tokens

    marked = []
    for backup in list_backups(folder):
        if backup.raw or backup.path == keep or not salts:
            continue
        try:
            held = tokens.read_inventory(backup.path).salts()
        except LuksvmError:
            continue  # a backup that does not read as LUKS holds no usable keyslot either
        if held & salts:
            text = json.dumps({"marked": iso(datetime.now(timezone.utc)), "why": why})
            files.write_atomically(stale_marker(backup), text + "\n", mode=0o600)
            marked.append(backup.path)
    return tuple(marked)


def stale_backups(folder: str) -> list[Backup]:
    """The backups in `folder` marked as holding a removed key, newest first; never the newest
    backup (the copy of the live header) even if marked."""
    backups = [b for b in list_backups(folder) if not b.raw]
    return [b for b in backups[1:] if os.path.exists(stale_marker(b))]


def prune_stale(config: Config, names: Sequence[str] = (), *, dry_run: bool = False) -> list[str]:
    """Delete the backups marked stale (with their records and markers); the backup of the live
    header is always kept. Returns the paths deleted (or that would be)."""
    removed = []
    for volume in selected(config, names):
        folder = os.path.join(config.settings.backup_dir, volume.name)
        for backup in stale_backups(folder):
            removed.append(backup.path)
            if dry_run:
                continue
            for path in (backup.path, backup.record_path, stale_marker(backup)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            log.info(
                "%s: deleted header backup %s: it still held a removed key",
                volume.name,
                backup.path,
                extra=journal.fields(volume=volume.name),
            )
    return removed
