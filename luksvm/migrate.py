"""Move a guest's disk onto a new LUKS-encrypted raw LV: size, format, copy, verify, repoint.

    luksvm migrate GUEST --disk vda --to VG/LV --name MAPPING [--key KEYSPEC] …
    luksvm migrate --rollback GUEST

The planner is pure (sizes, exact commands, the rewritten domain XML). The executor runs the steps
in order and records each one in a state file under /var/lib/luksvm/migrate, so that running the
same command again after an interruption resumes: finished steps are skipped, an interrupted copy
starts over, and the copy is verified again before the domain is repointed. Nothing of the source
is ever written: only `qemu-img convert` and `qemu-img compare` open it, read-only.

What other parts of luksvm do (stopping a guest, locking a volume, header backups, doctor) is
called through `Services`, never done again here.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import getpass
import json
import logging
import os
import re
import shlex
import stat
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from luksvm import config, cryptsetup, files, lvm, qemuimg, virt
from luksvm.config import Config, Volume
from luksvm.errors import LuksvmError, UsageError
from luksvm.run import CommandError, run, stream
from luksvm.sizes import SECTOR, GiB, MiB, human, round_up

log = logging.getLogger("luksvm.migrate")

# The payload offset is pinned per format (cryptsetup's own defaults: 2 MiB for LUKS1 with a
# 512-bit key, 16 MiB for LUKS2) and checked after formatting, so the size computed before
# formatting is the size the guest gets.
PAYLOAD_OFFSET_SECTORS = {"luks1": 4096, "luks2": 32768}
LUKS_TYPES = tuple(PAYLOAD_OFFSET_SECTORS)
VERIFY_MODES = ("full", "sample")
STATE_DIR = "var/lib/luksvm/migrate"
FRAGMENT_NAME = "60-migrate-{}.conf"
SAMPLE_WINDOWS = 64  # --verify=sample compares this many windows, spread over the disk
SAMPLE_WINDOW = MiB
COPY_TIMEOUT = 7 * 24 * 3600  # a multi-TiB disk on slow storage takes days; never cut it short
FORMAT_TIMEOUT = 600  # the KDF benchmark and a real argon2 KDF take seconds to minutes
LVM_NAME = re.compile(r"^[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,126}$")
SHUT_OFF = "shutoff"

STEP_NAMES = (
    "create-lv",
    "format",
    "check-header",
    "open",
    "copy",
    "verify",
    "redefine",
    "configure",
    "adopt",
    "header-backup",
)


def payload_offset(luks_type: str) -> int:
    return PAYLOAD_OFFSET_SECTORS[luks_type] * SECTOR


# --- what is migrated ------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceDisk:
    path: str
    format: str  # raw or qcow2: what qemu-img reads
    block: bool  # a block device rather than a file
    virtual_size: int  # bytes the guest sees

    @staticmethod
    def from_qemu_img_info(path: str, info_json: str, *, block: bool) -> SourceDisk:
        """From `qemu-img info --output=json PATH` (a qcow2 backing chain is read through by
        qemu-img, so the copy is complete; the domain's <backingStore> goes with the old source)."""
        try:
            info = qemuimg.parse_info(path, info_json)
        except LuksvmError as error:
            raise UsageError(str(error)) from None
        return SourceDisk(path, info.format, block, info.virtual_size)


def target_size(source: SourceDisk, extent_size: int, luks_type: str = "luks2") -> int:
    """Bytes of the new LV: the guest's disk plus the LUKS header area, in whole extents."""
    return round_up(source.virtual_size + payload_offset(luks_type), extent_size)


# --- domain XML ------------------------------------------------------------------------------


def _parse(xml: str) -> ET.Element:
    parser = ET.XMLParser(target=ET.TreeBuilder(insert_comments=True))
    return ET.fromstring(xml, parser=parser)


def _keep_prefixes(xml: str) -> None:
    """Make ElementTree write the document's own namespace prefixes (libosinfo:, …) back."""
    import io

    for _event, item in ET.iterparse(io.StringIO(xml), events=("start-ns",)):
        prefix, uri = (str(x) for x in item)  # start-ns events carry (prefix, uri)
        if prefix and not re.match(r"ns\d+$", prefix):
            ET.register_namespace(prefix, uri)


def find_disk(domain: ET.Element, target_dev: str) -> ET.Element:
    for disk in domain.findall("./devices/disk"):
        target = disk.find("target")
        if target is not None and target.get("dev") == target_dev:
            return disk
    devs = [t.get("dev", "?") for t in domain.findall("./devices/disk/target")]
    raise UsageError(
        f"domain {domain.findtext('name', '?')!r} has no disk with target dev {target_dev!r} "
        f"(its disks: {', '.join(devs) or 'none'})"
    )


def domain_disk(xml: str, target_dev: str) -> virt.Disk:
    """The domain's disk at `target_dev` (UsageError naming the domain's disks when none)."""
    find_disk(_parse(xml), target_dev)
    return next(d for d in virt.disks_from_xml(xml) if d.target == target_dev)


def rewrite_domain_xml(xml: str, target_dev: str, mapping_path: str) -> str:
    """The same domain with one disk's source replaced by the mapping as a raw block device.

    Everything else (UUID, MACs, other disks, addresses, comments) stays as it was; the disk
    loses only what described the old image: its source, any <backingStore>, driver type.
    """
    _keep_prefixes(xml)
    domain = _parse(xml)
    disk = find_disk(domain, target_dev)
    if disk.get("device", "disk") != "disk":
        raise UsageError(f"disk {target_dev} is a {disk.get('device')}, not a disk")
    disk.set("type", "block")
    driver = disk.find("driver")
    if driver is None:
        driver = ET.Element("driver", {"name": "qemu"})
        driver.tail = disk.text
        disk.insert(0, driver)
    driver.set("type", "raw")
    driver.set("discard", "unmap")  # lets guest TRIM reach dm-crypt (and the SSD below)
    children = list(disk)
    for child in children:
        if child.tag in ("source", "backingStore"):
            if child.tag == "source":
                # Insert the new source where the old one was; the old one's children (seclabel,
                # reservations of a file image) describe the old image only.
                new = ET.Element("source", {"dev": mapping_path})
                new.tail = child.tail
                disk.insert(list(disk).index(child), new)
            else:
                _drop_with_whitespace(disk, child)
                continue
            disk.remove(child)
    if disk.find("source") is None:
        new = ET.Element("source", {"dev": mapping_path})
        new.tail = driver.tail
        disk.insert(list(disk).index(driver) + 1, new)
    return ET.tostring(domain, encoding="unicode")


def _drop_with_whitespace(parent: ET.Element, child: ET.Element) -> None:
    """Remove child and keep the indentation of what follows it."""
    index = list(parent).index(child)
    if index > 0:
        parent[index - 1].tail = child.tail
    else:
        parent.text = child.tail
    parent.remove(child)


def canonical(xml: str) -> ET.Element:
    """A copy of the parsed domain with white space normalised, for comparisons."""
    domain = copy.deepcopy(_parse(xml))
    for element in domain.iter():
        if element.text is not None and not element.text.strip():
            element.text = None
        if element.tail is not None and not element.tail.strip():
            element.tail = None
    return domain


def same_domain(a: str, b: str) -> bool:
    return ET.tostring(canonical(a)) == ET.tostring(canonical(b))


# --- the request -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    guest: str
    disk: str  # target dev in the domain, e.g. vda
    vg: str
    lv: str
    mapping: str
    luks_type: str = "luks2"
    cipher: str = ""  # empty: cryptsetup's default
    hash: str = ""
    key_size: int = 0
    pbkdf: str = ""
    pbkdf_iterations: int = 0
    pbkdf_memory: int = 0  # KiB
    verify: str = "full"  # full or sample
    key: str = "-"  # the key field of the fragment: a keyfile path, keyring:S/U, or - to ask

    def __post_init__(self) -> None:
        if self.luks_type not in LUKS_TYPES:
            raise UsageError(f"--luks-type {self.luks_type!r}: expected luks1 or luks2")
        if self.verify not in VERIFY_MODES:
            raise UsageError(f"--verify {self.verify!r}: expected full or sample")
        if not config.MAPPING_NAME.match(self.mapping):
            raise UsageError(
                f"--name {self.mapping!r}: a mapping name is 1-127 of A-Z a-z 0-9 # + - . : = @ _"
            )
        if not config.GUEST_NAME.match(self.guest):
            raise UsageError(f"guest name {self.guest!r} cannot be written in crypttab.d")
        for what, name in (("VG", self.vg), ("LV", self.lv)):
            if not LVM_NAME.match(name) or name in (".", ".."):
                raise UsageError(
                    f"--to {self.vg}/{self.lv}: {what} name {name!r} is not a valid LVM name "
                    "(letters, digits, + _ . -, not starting with -)"
                )
        if self.pbkdf and self.pbkdf not in ("pbkdf2", "argon2i", "argon2id"):
            raise UsageError(f"--pbkdf {self.pbkdf!r}: expected pbkdf2, argon2i or argon2id")
        if self.luks_type == "luks1" and self.pbkdf not in ("", "pbkdf2"):
            raise UsageError("LUKS1 knows only pbkdf2; use --luks-type luks2 for argon2")

    @property
    def lv_path(self) -> str:
        return f"/dev/{self.vg}/{self.lv}"

    @property
    def mapping_path(self) -> str:
        return f"/dev/mapper/{self.mapping}"

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Request:
        names = {f.name for f in dataclasses.fields(Request)}
        return Request(**{k: v for k, v in data.items() if k in names})


def split_vg_lv(text: str) -> tuple[str, str]:
    vg, _, lv = text.partition("/")
    if not vg or not lv or "/" in lv:
        raise UsageError(f"--to {text!r}: expected VG/LV, e.g. volgrp4/lvmail_hd0")
    return vg, lv


# --- the config fragment ---------------------------------------------------------------------


def fragment_path(root: str, mapping: str) -> str:
    return os.path.join(root, config.CRYPTTAB_DIR, FRAGMENT_NAME.format(mapping))


def fragment_text(request: Request) -> str:
    return (
        f"# written by luksvm migrate {request.guest} --disk {request.disk}; "
        f"luksvm migrate --rollback {request.guest} removes it\n"
        f"{request.mapping} {request.lv_path} {request.key} "
        f"luks,discard,x-luksvm.guest={request.guest}\n"
    )


def fragment_volume(request: Request) -> Volume:
    """The volume the fragment defines, parsed as luksvm reads it (this checks --key too)."""
    path = FRAGMENT_NAME.format(request.mapping)
    volumes, problems = config.parse_crypttab(fragment_text(request), path)
    if problems:
        raise UsageError("; ".join(p.message.replace("key ", "--key ", 1) for p in problems))
    return volumes[0]


# --- the plan --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    name: str  # stable id, recorded in the state file when done
    what: str  # one line for the plan listing
    commands: tuple[tuple[str, ...], ...] = ()  # empty for steps luksvm does itself
    secret_stdin: bool = False  # the key goes to each command's stdin

    @property
    def argv(self) -> tuple[str, ...]:
        return self.commands[0] if self.commands else ()


def sample_offsets(
    size: int, windows: int = SAMPLE_WINDOWS, window: int = SAMPLE_WINDOW
) -> list[int]:
    """Start offsets of the windows --verify=sample compares: the first and last window and the
    rest evenly between, 512-aligned (qemu's raw driver takes only whole sectors)."""
    if size <= windows * window:
        return list(range(0, size, window))  # a small disk: every window, the whole disk
    last = (size - window) // SECTOR * SECTOR
    return sorted({i * last // (windows - 1) // SECTOR * SECTOR for i in range(windows)})


def verify_commands(
    request: Request, source: SourceDisk, scratch: str = ""
) -> tuple[tuple[str, ...], ...]:
    """full: one qemu-img compare of the whole disk against the first virtual_size bytes of the
    mapping (the rest of the LV, rounding to whole extents, holds decrypted noise and belongs
    to no one). sample: qemu-img dd of each window into `scratch`, which luksvm then compares
    with the same bytes of the mapping."""
    size = source.virtual_size
    if request.verify == "full":
        return (
            qemuimg.compare_argv(
                source.path, source.format, qemuimg.raw_head(request.mapping_path, size)
            ),
        )
    scratch = scratch or os.path.join("/", STATE_DIR, f"{request.guest}.{request.disk}.sample")
    return tuple(
        qemuimg.dd_argv(
            source.path, source.format, offset, min(SAMPLE_WINDOW, size - offset), scratch
        )
        for offset in sample_offsets(size)
    )


def format_argv(request: Request) -> tuple[str, ...]:
    argv = [
        "cryptsetup",
        "luksFormat",
        "--batch-mode",
        "--type",
        request.luks_type,
        "--offset",
        str(PAYLOAD_OFFSET_SECTORS[request.luks_type]),
        "--key-file=-",
    ]
    if request.luks_type == "luks2":
        # A partition table inside counts 512-byte LBAs; LUKS2 would pick 4096 on 4K/512e disks
        # and image files, and the guest's disk would change its logical sector size.
        argv += ["--sector-size", "512"]
    for option, value in (
        ("--cipher", request.cipher),
        ("--hash", request.hash),
        ("--key-size", str(request.key_size) if request.key_size else ""),
        ("--pbkdf", request.pbkdf),
        ("--pbkdf-force-iterations", str(request.pbkdf_iterations or "")),
        ("--pbkdf-memory", str(request.pbkdf_memory or "")),
    ):
        if value:
            argv += [option, value]
    argv.append(request.lv_path)
    return tuple(argv)


def open_argv(request: Request) -> tuple[str, ...]:
    # --allow-discards: as the fragment's `discard` will open it at boot, so the unit that adopts
    # this mapping later finds it as configured.
    return (
        "cryptsetup",
        "open",
        "--type",
        "luks",
        "--allow-discards",
        "--key-file=-",
        request.lv_path,
        request.mapping,
    )


def plan(request: Request, source: SourceDisk, extent_size: int) -> tuple[Step, ...]:
    size = target_size(source, extent_size, request.luks_type)
    offset = payload_offset(request.luks_type)
    return (
        Step(
            "create-lv",
            f"create {request.lv_path}: {human(size)} = disk {source.virtual_size:,} B + LUKS "
            f"header {offset:,} B, rounded up to whole {human(extent_size)} extents",
            (("lvcreate", "--yes", "--size", f"{size}b", "--name", request.lv, request.vg),),
        ),
        Step(
            "format",
            f"LUKS-format {request.lv_path} ({request.luks_type}, payload at {offset:,} B)",
            (format_argv(request),),
            secret_stdin=True,
        ),
        Step(
            "check-header",
            f"check the new header: payload offset {offset:,} B, 512-byte sectors",
        ),
        Step(
            "open",
            f"open it as {request.mapping_path}",
            (open_argv(request),),
            secret_stdin=True,
        ),
        Step(
            "copy",
            f"copy all {source.virtual_size:,} B of {source.path} ({source.format}), zeros too",
            (qemuimg.convert_argv(source.path, source.format, request.mapping_path),),
        ),
        Step(
            "verify",
            f"compare all {source.virtual_size:,} B of source and mapping"
            if request.verify == "full"
            else f"compare {len(sample_offsets(source.virtual_size))} sampled windows of "
            f"{SAMPLE_WINDOW // MiB} MiB of source and mapping",
            verify_commands(request, source),
        ),
        Step(
            "redefine",
            f"point {request.guest}'s {request.disk} at {request.mapping_path} (type='block', "
            "discard='unmap'); the previous domain XML is kept for --rollback",
        ),
        Step(
            "configure",
            f"write {config.CRYPTTAB_DIR}/{FRAGMENT_NAME.format(request.mapping)} and run apply",
        ),
        Step("adopt", f"hand {request.mapping_path} to its unlock unit (when systemd runs)"),
        Step("header-backup", f"back up the LUKS header of {request.mapping}"),
    )


def format_plan(steps: Sequence[Step]) -> list[str]:
    lines = []
    for number, step in enumerate(steps, 1):
        lines.append(f"{number:2}. {step.what}")
        shown = step.commands if len(step.commands) <= 2 else step.commands[:1]
        for argv in shown:
            lines.append(
                "      " + shlex.join(argv) + ("   < key on stdin" if step.secret_stdin else "")
            )
        if len(step.commands) > len(shown):
            lines.append(f"      … and {len(step.commands) - 1} more windows like it")
    return lines


def check_header(header: cryptsetup.LuksHeader, request: Request) -> None:
    expected = payload_offset(request.luks_type)
    if header.data_offset != expected:
        raise LuksvmError(
            f"the new LUKS header on {request.lv_path} puts the payload at {header.data_offset:,} "
            f"bytes, not the {expected:,} the size was computed for; nothing was copied"
        )
    if header.sector_size != SECTOR:
        raise LuksvmError(
            f"the new LUKS header on {request.lv_path} has {header.sector_size}-byte sectors; "
            "the guest's disk has 512-byte sectors; nothing was copied"
        )


def check_payload_offset(offset: int, luks_type: str = "luks2") -> None:
    if offset != payload_offset(luks_type):
        raise LuksvmError(
            f"the new LUKS header's payload offset is {offset:,} bytes, not the "
            f"{payload_offset(luks_type):,} the size was computed for; nothing was copied"
        )


# --- preconditions ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Situation:
    """What the preconditions of a new migration are judged on (read by survey())."""

    guest_state: str  # libvirt state name: shutoff, running, …
    managed_save: bool
    disk: virt.Disk
    source_kind: str  # file | block | missing | other
    source_is_crypt: bool  # the source is a dm-crypt mapping already
    vg_found: bool
    extent_size: int
    vg_free: int
    lv_exists: bool
    mapping_exists: bool
    config_volumes: tuple[Volume, ...]
    lv_device: str  # realpath of the LV path, for comparing with config sources
    source_real: str


def refusals(
    request: Request, situation: Situation, size: int | None, *, shutdown: bool
) -> list[str]:
    """Why a new migration must not start (empty: it may). size: the planned LV size, if known."""
    s, r = situation, request
    out: list[str] = []
    if s.guest_state != SHUT_OFF and not shutdown:
        out.append(
            f"guest {r.guest} is {s.guest_state}; shut it off first, or pass --shutdown to stop "
            "it through luksvm's guest stop"
        )
    if s.managed_save:
        out.append(
            f"guest {r.guest} has a saved state (managedsave): its RAM still expects the old disk; "
            f"start it and shut it down, or drop the state: virsh managedsave-remove {r.guest}"
        )
    d = s.disk
    if d.device != "disk":
        out.append(f"{r.guest}'s {r.disk} is a {d.device}, not a disk")
    if d.type not in ("file", "block"):
        out.append(
            f"{r.guest}'s {r.disk} is a disk of type {d.type!r}; luksvm migrates file and "
            "block disks only"
        )
    if d.driver_type not in qemuimg.FORMATS:
        out.append(f"{r.guest}'s {r.disk} is {d.driver_type}; luksvm migrates raw and qcow2 only")
    if d.encrypted:
        out.append(f"{r.guest}'s {r.disk} is encrypted by qemu already (<encryption>)")
    if s.source_kind == "missing":
        out.append(f"{r.guest}'s {r.disk} source {d.source or '(none)'} does not exist")
    elif d.type == "file" and s.source_kind != "file":
        out.append(f"{d.source} is not a regular file, as the domain's type='file' says")
    elif d.type == "block" and s.source_kind != "block":
        out.append(f"{d.source} is not a block device, as the domain's type='block' says")
    if s.source_is_crypt:
        out.append(f"{d.source} is a dm-crypt mapping: {r.guest}'s {r.disk} is encrypted already")
    if not s.vg_found:
        out.append(f"VG {r.vg} not found (vgs {r.vg}); name a VG of this host in --to")
    elif size is not None and s.vg_free < size:
        out.append(
            f"VG {r.vg} has {human(s.vg_free)} free; the new LV needs {human(size)}; "
            "free space first (vgextend, or another VG)"
        )
    if s.lv_exists:
        out.append(f"LV {r.vg}/{r.lv} exists already; name a new LV (luksvm never writes over one)")
    if s.mapping_exists:
        out.append(f"{r.mapping_path} exists already; choose another --name")
    for volume in s.config_volumes:
        if volume.name == r.mapping:
            out.append(f"mapping name {r.mapping} is configured already ({volume.where})")
        elif s.lv_device and os.path.realpath(volume.device) in (s.lv_device, r.lv_path):
            out.append(
                f"{r.lv_path} is the source of configured volume {volume.name} ({volume.where})"
            )
    if s.source_real and s.source_real == s.lv_device:
        out.append(f"{d.source} is {r.lv_path} itself")
    return out


def source_kind(path: str) -> str:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return "missing"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISBLK(mode):
        return "block"
    return "other"


# --- the outside world: libvirt and the rest of luksvm ---------------------------------------


class Domains(Protocol):
    """The libvirt calls migrate makes (LibvirtDomains; a fake in tests)."""

    def state(self, guest: str) -> str: ...

    def has_managed_save(self, guest: str) -> bool: ...

    def defined_xml(self, guest: str) -> str: ...

    def define(self, xml: str) -> None: ...


class LibvirtDomains:
    """Domains over libvirt-python.

    The XML is the persistent definition with secrets (VIR_DOMAIN_XML_INACTIVE|SECURE): without
    SECURE a redefine would drop VNC/SPICE passwords. TODO(lead): once virt.py (branch guests) is
    in main, move defined_xml/define into virt.Domain/Connection so they get its call deadlines."""

    STATES: ClassVar[dict[int, str]] = {0: "nostate", 1: "running", 2: "blocked", 3: "paused",
        4: "shutdown", 5: SHUT_OFF, 6: "crashed", 7: "pmsuspended"}  # fmt: skip

    def __init__(self, uri: str) -> None:
        import libvirt

        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        self._libvirt = libvirt
        try:
            self._conn = libvirt.open(uri)
        except libvirt.libvirtError as error:
            raise LuksvmError(f"cannot connect to libvirt at {uri}: {error}") from None
        self.uri = uri

    def _domain(self, guest: str) -> Any:
        try:
            return self._conn.lookupByName(guest)
        except self._libvirt.libvirtError:
            raise LuksvmError(f"no libvirt domain {guest!r} at {self.uri}") from None

    def _call(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except self._libvirt.libvirtError as error:
            raise LuksvmError(f"{what}: {error.get_error_message() or error}") from None

    def state(self, guest: str) -> str:
        number, _reason = self._call(f"state of {guest}", self._domain(guest).state)
        return self.STATES.get(number, "nostate")

    def has_managed_save(self, guest: str) -> bool:
        dom = self._domain(guest)
        return bool(self._call(f"saved state of {guest}", dom.hasManagedSaveImage, 0))

    def defined_xml(self, guest: str) -> str:
        flags = self._libvirt.VIR_DOMAIN_XML_INACTIVE | self._libvirt.VIR_DOMAIN_XML_SECURE
        text: str = self._call(f"XML of {guest}", self._domain(guest).XMLDesc, flags)
        return text

    def define(self, xml: str) -> None:
        self._call("define the domain", self._conn.defineXML, xml)

    def close(self) -> None:
        with contextlib.suppress(self._libvirt.libvirtError):
            self._conn.close()


@dataclass(frozen=True)
class Services:
    """What migrate asks of the rest of luksvm (wired in cli.py; fakes in tests)."""

    stop_guest: Callable[[Config, str], None]  # ACPI stop, timeout, policy: guests.py
    lock_volume: Callable[[Config, str], None]  # lock = guest VGs off, close: unlock.py
    adopt: Callable[[Config, str], None]  # the unit takes over an open mapping
    backup_header: Callable[[Config, str], str]  # header backup; returns what was done
    doctor: Callable[[str], str]  # the doctor's report for ROOT
    apply: Callable[[Config], list[str]]  # luksvm apply; returns its report lines
    check_keyfile: Callable[[str, str], None]  # (volume, path): refuses unsafe keyfiles
    keyring_secret: Callable[[Volume, Config], bytes]
    ask: Callable[[str], str] = getpass.getpass  # a passphrase prompt on the terminal
    can_ask: Callable[[], bool] = lambda: sys.stdin is not None and sys.stdin.isatty()


# --- the state file --------------------------------------------------------------------------


def state_dir(root: str) -> str:
    return os.path.join(root, STATE_DIR)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class State:
    """One migration's record: what was asked, what was read, which steps are done."""

    path: str
    request: Request
    source: SourceDisk
    size: int
    extent_size: int
    done: list[str] = field(default_factory=list)
    started: str = field(default_factory=_now)
    finished: str = ""

    @property
    def stem(self) -> str:
        return self.path[: -len(".json")]

    @property
    def previous_xml_path(self) -> str:
        return self.stem + ".previous.xml"

    @property
    def defined_xml_path(self) -> str:
        return self.stem + ".defined.xml"

    def save(self) -> None:
        data = {
            "request": self.request.as_dict(),
            "source": dataclasses.asdict(self.source),
            "size": self.size,
            "extent_size": self.extent_size,
            "done": self.done,
            "started": self.started,
            "finished": self.finished,
        }
        files.write_atomically(self.path, json.dumps(data, indent=2) + "\n")

    def mark(self, step: str) -> None:
        if step not in self.done:
            self.done.append(step)
        self.save()

    @staticmethod
    def load(path: str) -> State:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            return State(
                path,
                Request.from_dict(data["request"]),
                SourceDisk(**data["source"]),
                int(data["size"]),
                int(data["extent_size"]),
                list(data["done"]),
                str(data["started"]),
                str(data.get("finished", "")),
            )
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise LuksvmError(
                f"{path}: unreadable migration record ({error}); move it aside to start over"
            ) from None


def state_path(root: str, guest: str, disk: str) -> str:
    return os.path.join(state_dir(root), f"{guest}.{disk}.json")


def states_of(root: str, guest: str) -> list[State]:
    """The open (not rolled back) migration records of `guest`, oldest first."""
    directory = state_dir(root)
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    except OSError as error:
        raise LuksvmError(
            f"cannot read migration records in {directory}: {error.strerror}",
            fix="it must be a folder: move what is there out of the way",
        ) from None
    found = [
        State.load(os.path.join(directory, n))
        for n in sorted(names)
        if n.startswith(guest + ".")
        and n.endswith(".json")
        and n.count(".") == guest.count(".") + 2
    ]
    return sorted((s for s in found if s.request.guest == guest), key=lambda s: s.started)


# --- progress --------------------------------------------------------------------------------


def _span(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60:02} s"
    return f"{seconds} s"


def _amount(size: float) -> str:
    if size >= GiB:
        return f"{size / GiB:.2f} GiB"
    return f"{size / MiB:.1f} MiB"


def progress_text(fraction: float, total: int, elapsed: float) -> str:
    """`5.00 GiB of 20.00 GiB (25.0 %), 170.7 MiB/s, 1 min 30 s left` from qemu-img's share."""
    done = fraction * total
    text = f"{_amount(done)} of {_amount(total)} ({fraction * 100:.1f} %)"
    if elapsed > 0 and done > 0:
        rate = done / elapsed
        text += f", {_amount(rate)}/s"
        if fraction < 1:
            text += f", {_span((total - done) / rate)} left"
    return text


class Progress:
    """Turns qemu-img -p output into bytes, rate and ETA: one updating line on a terminal, a
    line per 10 % otherwise (logs, journald)."""

    def __init__(
        self,
        label: str,
        total: int,
        out: Callable[[str], None],
        *,
        tty: bool,
        clock: Callable[[], float],
    ) -> None:
        self.label, self.total, self.out, self.tty, self.clock = label, total, out, tty, clock
        self.began = clock()
        self.shown = -1.0

    def __call__(self, text: str) -> None:
        fraction = qemuimg.progress_fraction(text)
        # qemu-img repeats its last share (100 % at the end): nothing new, nothing printed
        if fraction is None or fraction <= self.shown:
            return
        if not self.tty and fraction < 1 and fraction - self.shown < 0.1:
            return
        self.shown = fraction
        line = f"  {self.label}: {progress_text(fraction, self.total, self.clock() - self.began)}"
        if self.tty:
            sys.stderr.write("\r\033[K" + line)
            if fraction >= 1:
                sys.stderr.write("\n")
            sys.stderr.flush()
        else:
            self.out(line)


# --- the executor ----------------------------------------------------------------------------


@dataclass
class Context:
    root: str
    config: Config
    domains: Domains
    services: Services
    out: Callable[[str], None]
    tty: bool = False
    clock: Callable[[], float] = time.monotonic


def survey(request: Request, ctx: Context, disk: virt.Disk) -> Situation:
    """Read everything the preconditions are judged on. Reads; changes nothing."""
    rows = (
        lvm.report("vgs", ["vg_name", "vg_extent_size", "vg_free"], [request.vg])
        if _vg_exists(request.vg)
        else []
    )
    vg = rows[0] if rows else {}
    lv_rows = lvm.report("lvs", ["lv_name"], [request.vg]) if vg else []
    kind = source_kind(disk.source) if disk.source else "missing"
    is_crypt = False
    if kind == "block":
        from luksvm import blockdev

        is_crypt = blockdev.describe(disk.source).is_crypt
    return Situation(
        guest_state=ctx.domains.state(request.guest),
        managed_save=ctx.domains.has_managed_save(request.guest),
        disk=disk,
        source_kind=kind,
        source_is_crypt=is_crypt,
        vg_found=bool(vg),
        extent_size=int(vg.get("vg_extent_size", 0) or 0),
        vg_free=int(vg.get("vg_free", 0) or 0),
        lv_exists=any(row["lv_name"] == request.lv for row in lv_rows),
        mapping_exists=os.path.lexists(request.mapping_path),
        config_volumes=ctx.config.volumes,
        lv_device=os.path.realpath(request.lv_path) if os.path.exists(request.lv_path) else "",
        source_real=os.path.realpath(disk.source) if disk.source else "",
    )


def _vg_exists(vg: str) -> bool:
    result = run(["vgs", "--reportformat", "json", "-o", "vg_name", vg], timeout=lvm.TIMEOUT,
                 check=False)  # fmt: skip
    return result.returncode == 0 and bool(lvm.parse_report(result.stdout))


def read_source(disk: virt.Disk, kind: str) -> SourceDisk:
    info = qemuimg.info(disk.source, disk.driver_type)
    if info.virtual_size % SECTOR:
        raise LuksvmError(
            f"{disk.source}: {info.virtual_size:,} bytes is not a whole number of 512-byte "
            "sectors; a guest's disk is (pad it: qemu-img resize -f raw PATH +N)"
        )
    return SourceDisk(disk.source, info.format, kind == "block", info.virtual_size)


def migrate(
    request: Request, ctx: Context, *, shutdown: bool = False, dry_run: bool = False
) -> None:
    """Plan, check and carry out (or resume) one migration; with dry_run only print the plan."""
    path = state_path(ctx.root, request.guest, request.disk)
    state = State.load(path) if os.path.exists(path) else None
    if state is not None and state.request != request:
        raise UsageError(
            f"a migration of {request.guest}'s {request.disk} to "
            f"{state.request.vg}/{state.request.lv} as {state.request.mapping} is recorded in "
            f"{path}; run that same command again to resume it, or undo it: "
            f"luksvm migrate --rollback {request.guest}"
        )
    if state is not None and state.finished:
        ctx.out(
            f"{request.guest}'s {request.disk} was migrated to {request.mapping_path} on "
            f"{state.finished}; nothing to do"
        )
        return
    if state is None:
        state = _begin(request, ctx, path, shutdown=shutdown, dry_run=dry_run)
        if state is None:
            return
    else:
        ctx.out(
            f"resuming the migration recorded in {path} "
            f"(done: {', '.join(state.done) or 'nothing'})"
        )
        if dry_run:
            steps = plan(request, state.source, state.extent_size)
            ctx.out("\n".join(format_plan([s for s in steps if s.name not in state.done])))
            return
        _check_resumable(state, ctx, shutdown=shutdown)
    _run(state, ctx)


def _begin(
    request: Request, ctx: Context, path: str, *, shutdown: bool, dry_run: bool
) -> State | None:
    fragment_volume(request)  # --key and the names read as luksvm will read them
    xml = ctx.domains.defined_xml(request.guest)
    disk = domain_disk(xml, request.disk)
    situation = survey(request, ctx, disk)
    source: SourceDisk | None = None
    size: int | None = None
    if situation.source_kind in ("file", "block") and disk.driver_type in qemuimg.FORMATS:
        source = read_source(disk, situation.source_kind)
        if situation.extent_size:
            size = target_size(source, situation.extent_size, request.luks_type)
    problems = refusals(request, situation, size, shutdown=shutdown)
    if problems:
        raise LuksvmError("cannot migrate:\n  " + "\n  ".join(problems))
    assert source is not None and size is not None
    steps = plan(request, source, situation.extent_size)
    ctx.out(
        f"{request.guest}'s {request.disk}: {source.path} ({source.format}, "
        f"{human(source.virtual_size)}) → {request.mapping_path} on {request.lv_path} "
        f"({human(size)})"
    )
    if dry_run:
        if situation.guest_state != SHUT_OFF:
            ctx.out(f" 0. stop guest {request.guest} (it is {situation.guest_state})")
        ctx.out("\n".join(format_plan(steps)))
        return None
    if situation.guest_state != SHUT_OFF:
        ctx.out(f"stopping guest {request.guest}")
        ctx.services.stop_guest(ctx.config, request.guest)
        _require_shut_off(request, ctx)
    state = State(path, request, source, size, situation.extent_size)
    state.save()
    return state


def _require_shut_off(request: Request, ctx: Context) -> None:
    now = ctx.domains.state(request.guest)
    if now != SHUT_OFF:
        raise LuksvmError(
            f"guest {request.guest} is {now}; it must stay shut off while its disk moves "
            f"(the run stopped; run the same command again once it is shut off)"
        )


def _check_resumable(state: State, ctx: Context, *, shutdown: bool) -> None:
    """A resumed run: the guest off again, the source unchanged, the LV still ours."""
    request = state.request
    if "redefine" not in state.done:
        if ctx.domains.state(request.guest) != SHUT_OFF:
            if not shutdown:
                _require_shut_off(request, ctx)
            ctx.services.stop_guest(ctx.config, request.guest)
            _require_shut_off(request, ctx)
        info = qemuimg.info(state.source.path, state.source.format)
        if info.virtual_size != state.source.virtual_size:
            raise LuksvmError(
                f"{state.source.path} is {info.virtual_size:,} bytes now, "
                f"{state.source.virtual_size:,} when the migration began; roll back "
                f"(luksvm migrate --rollback {request.guest}) and start over"
            )
        # The guest may have run on the old disk in between: compare again before repointing.
        if "verify" in state.done:
            state.done.remove("verify")
            state.save()


def _run(state: State, ctx: Context) -> None:
    request = state.request
    steps = {step.name: step for step in plan(request, state.source, state.extent_size)}
    key: bytes | None = None

    def need_key() -> bytes:
        nonlocal key
        if key is None:
            key = obtain_key(request, ctx, new="format" not in state.done)
        return key

    for name in STEP_NAMES:
        if name in state.done and name != "open":
            continue
        step = steps[name]
        if name == "create-lv":
            if _lv_size(request) is None:
                _execute(step)
            elif _lv_size(request) != state.size:
                raise LuksvmError(f"{request.lv_path} exists with another size than planned")
        elif name == "format":
            _execute(step, need_key())
        elif name == "check-header":
            check_header(cryptsetup.read_header(request.lv_path), request)
        elif name == "open":
            if "redefine" in state.done:
                continue  # the mapping is the configured volume's from here on
            if not _opened_on(request):
                _execute(step, need_key())
                from luksvm import blockdev

                blockdev.settle()
            _check_mapping_size(state)
        elif name == "copy":
            _require_shut_off(request, ctx)
            ctx.out(f"copying {human(state.source.virtual_size)} from {state.source.path}")
            _stream(step.argv, Progress("copied", state.source.virtual_size, ctx.out,
                                        tty=ctx.tty, clock=ctx.clock))  # fmt: skip
        elif name == "verify":
            _verify(step, state, ctx)
        elif name == "redefine":
            _require_shut_off(request, ctx)
            _redefine(state, ctx)
        elif name == "configure":
            _configure(state, ctx)
        elif name == "adopt":
            ctx.services.adopt(ctx.config, request.mapping)
        elif name == "header-backup":
            ctx.out(ctx.services.backup_header(ctx.config, request.mapping))
        state.mark(name)
        ctx.out(f"done: {step.what}")
    state.finished = _now()
    state.save()
    _closing(state, ctx)


def _execute(step: Step, key: bytes | None = None) -> None:
    for argv in step.commands:
        run(argv, timeout=FORMAT_TIMEOUT, stdin=key if step.secret_stdin else None,
            secret=step.secret_stdin)  # fmt: skip


def _stream(argv: Sequence[str], progress: Progress) -> None:
    stream(argv, timeout=COPY_TIMEOUT, on_output=progress)


def _lv_size(request: Request) -> int | None:
    rows = lvm.report("lvs", ["lv_name", "lv_size"], [request.vg])
    for row in rows:
        if row["lv_name"] == request.lv:
            return int(row["lv_size"])
    return None


def _opened_on(request: Request) -> bool:
    """True when the mapping is open; refuse when it is open on something else than our LV."""
    status = cryptsetup.status(request.mapping)
    if not status.active:
        return False
    if os.path.realpath(status.device) != os.path.realpath(request.lv_path):
        raise LuksvmError(
            f"{request.mapping_path} is open on {status.device}, not on {request.lv_path}"
        )
    return True


def _check_mapping_size(state: State) -> None:
    status = cryptsetup.status(state.request.mapping)
    if status.size_sectors * SECTOR < state.source.virtual_size:
        raise LuksvmError(
            f"{state.request.mapping_path} holds {status.size_sectors * SECTOR:,} bytes, less "
            f"than the {state.source.virtual_size:,} of the disk; nothing was copied"
        )


def _verify(step: Step, state: State, ctx: Context) -> None:
    request = state.request
    size = state.source.virtual_size
    if request.verify == "full":
        try:
            stream(step.argv, timeout=COPY_TIMEOUT, on_output=Progress(
                "compared", size, ctx.out, tty=ctx.tty, clock=ctx.clock))  # fmt: skip
        except CommandError as error:
            if error.returncode != 1:
                raise
            where = re.search(r"mismatch at offset (\d+)", error.stdout_tail + error.stderr_tail)
            _differs(state, int(where.group(1)) if where else None)
        ctx.out(f"verified: all {human(size)} identical")
        return
    scratch = state.stem + ".sample"
    offsets = sample_offsets(size)
    try:
        with open(request.mapping_path, "rb") as mapping:
            for offset, argv in zip(offsets, verify_commands(request, state.source, scratch)):
                run(argv, timeout=qemuimg.TIMEOUT)
                with open(scratch, "rb") as f:
                    expected = f.read()
                if len(expected) != min(SAMPLE_WINDOW, size - offset):
                    raise LuksvmError(
                        f"{shlex.join(argv)} read {len(expected):,} bytes, not a window of "
                        f"{min(SAMPLE_WINDOW, size - offset):,}; nothing was changed"
                    )
                got = os.pread(mapping.fileno(), len(expected), offset)
                if got != expected:
                    first = next(i for i, (a, b) in enumerate(zip(got, expected)) if a != b)
                    _differs(state, offset + first)
    finally:
        if os.path.exists(scratch):
            os.unlink(scratch)
    ctx.out(f"verified: {len(offsets)} windows of {human(SAMPLE_WINDOW)} identical")


def _differs(state: State, at: int | None) -> None:
    request = state.request
    where = f" at byte {at:,}" if at is not None else ""
    raise LuksvmError(
        f"the copy on {request.mapping_path} differs from {state.source.path}{where}; the "
        "domain still uses the old disk. Run the same command again to copy again, or roll "
        f"back: luksvm migrate --rollback {request.guest}"
    )


def _redefine(state: State, ctx: Context) -> None:
    request = state.request
    current = ctx.domains.defined_xml(request.guest)
    disk = domain_disk(current, request.disk)
    if not (disk.type == "block" and disk.source == request.mapping_path):
        if not os.path.exists(state.previous_xml_path):
            files.write_atomically(state.previous_xml_path, current)
        ctx.domains.define(rewrite_domain_xml(current, request.disk, request.mapping_path))
    defined = ctx.domains.defined_xml(request.guest)
    now = domain_disk(defined, request.disk)
    if not (now.type == "block" and now.source == request.mapping_path):
        raise LuksvmError(
            f"libvirt did not take the new definition of {request.guest}: {request.disk} is "
            f"{now.type} {now.source}"
        )
    files.write_atomically(state.defined_xml_path, defined)


def _configure(state: State, ctx: Context) -> None:
    request = state.request
    path = fragment_path(ctx.root, request.mapping)
    files.write_atomically(path, fragment_text(request), mode=0o644)
    try:
        ctx.config = config.load(ctx.root)
    except LuksvmError:
        os.unlink(path)
        raise
    for line in ctx.services.apply(ctx.config):
        ctx.out(line)


def _closing(state: State, ctx: Context) -> None:
    request, source = state.request, state.source
    ctx.out("")
    ctx.out(
        f"{request.guest}'s {request.disk} now runs from {request.mapping_path} "
        f"({request.luks_type} on {request.lv_path}, {human(state.size)})."
    )
    ctx.out("doctor says:")
    for line in ctx.services.doctor(ctx.root).rstrip("\n").splitlines():
        ctx.out("  " + line)
    ctx.out(
        f"Start the guest: systemctl start luksvm-guest@{request.guest}.service "
        f"(or virsh start {request.guest})."
    )
    ctx.out(
        f"Undo: luksvm migrate --rollback {request.guest} (previous XML: {state.previous_xml_path})"
    )
    ctx.out(f"The old disk {source.path} is untouched and no longer used. {delete_hint(source)}")


def delete_hint(source: SourceDisk) -> str:
    if not source.block:
        return f"Delete it when satisfied: rm -- {shlex.quote(source.path)}"
    lv = _lv_of(source.path)
    if lv:
        return f"Delete it when satisfied: lvremove {shlex.quote(lv)}"
    return f"Wipe or reuse {source.path} when satisfied (wipefs -a, then as you like)"


def _lv_of(path: str) -> str:
    parts = path.split("/")
    if len(parts) == 4 and parts[1] == "dev" and parts[2] not in ("mapper", "disk"):
        return f"{parts[2]}/{parts[3]}"
    return ""


# --- the key ---------------------------------------------------------------------------------


def obtain_key(request: Request, ctx: Context, *, new: bool) -> bytes:
    """The key for format/open: the keyfile's bytes, the keyring secret, or a passphrase asked on
    the terminal (twice for a new volume). Never on argv; handed to cryptsetup on stdin."""
    volume = fragment_volume(request)
    kind = volume.key.kind
    if kind == "file":
        ctx.services.check_keyfile(request.mapping, volume.key.path)
        with open(os.path.join(ctx.root, volume.key.path.lstrip("/")), "rb") as f:
            key = f.read()
        if not key:
            raise LuksvmError(f"keyfile {volume.key.path} is empty")
    elif kind == "keyring":
        key = ctx.services.keyring_secret(volume, ctx.config)
    else:
        if not ctx.services.can_ask():
            raise LuksvmError(
                f"{request.mapping} needs a passphrase and there is no terminal to ask on; run "
                "luksvm in a terminal (ssh -t), or give a keyfile with --key"
            )
        first = ctx.services.ask(f"New passphrase for {request.mapping}: " if new else
                                 f"Passphrase for {request.mapping}: ")  # fmt: skip
        if not first:
            raise UsageError("empty passphrase")
        if new and ctx.services.ask(f"Repeat the passphrase for {request.mapping}: ") != first:
            raise UsageError("the two passphrases differ; nothing was changed")
        key = first.encode("utf-8")
    if not new and not cryptsetup.test_passphrase(request.lv_path, key):
        raise LuksvmError(
            f"the key for {request.mapping} opens none of {request.lv_path}'s keyslots"
        )
    return key


# --- rollback --------------------------------------------------------------------------------


def rollback(guest: str, disk: str | None, ctx: Context, *, dry_run: bool = False) -> None:
    """Undo the newest migration of `guest` (or of its `disk`): the previous domain XML exactly,
    the fragment gone and applied, the volume locked. The new LV stays."""
    states = states_of(ctx.root, guest)
    if not states:
        raise UsageError(f"no migration of {guest} is recorded in {state_dir(ctx.root)}")
    chosen = [s for s in states if disk is None or s.request.disk == disk]
    if not chosen:
        raise UsageError(
            f"no migration of {guest}'s {disk} is recorded; recorded: "
            + ", ".join(s.request.disk for s in states)
        )
    state = chosen[-1]
    later = [s for s in states if s.started > state.started and "redefine" in s.done]
    if later and "redefine" in state.done:
        raise UsageError(
            f"{guest}'s {later[-1].request.disk} was migrated after {state.request.disk}; roll "
            f"that back first: luksvm migrate --rollback {guest} --disk {later[-1].request.disk}"
        )
    request = state.request
    redefined = "redefine" in state.done or os.path.exists(state.defined_xml_path)
    state_now = ctx.domains.state(guest)
    if state_now != SHUT_OFF:
        raise LuksvmError(f"guest {guest} is {state_now}; shut it off first (luksvm stop {guest})")
    restore = ""
    if redefined and os.path.exists(state.previous_xml_path):
        with open(state.previous_xml_path, encoding="utf-8") as f:
            restore = f.read()
        current = ctx.domains.defined_xml(guest)
        if not same_domain(current, restore):
            _check_unchanged_since(state, current)
        else:
            restore = ""  # restored already (an interrupted rollback)
    fragment = fragment_path(ctx.root, request.mapping)
    configured = any(v.name == request.mapping for v in ctx.config.volumes)
    lines = [
        f"lock {request.mapping_path}" + (" (through its unit)" if configured else ""),
        f"define {guest} from {state.previous_xml_path}" if restore else "",
        f"remove {fragment} and apply" if os.path.exists(fragment) else "",
        f"keep {request.lv_path}; delete it when sure: lvremove {request.vg}/{request.lv}",
    ]
    if dry_run:
        ctx.out(f"rollback of {guest}'s {request.disk} (record {state.path}):")
        for number, line in enumerate((x for x in lines if x), 1):
            ctx.out(f"{number:2}. {line}")
        return
    if configured:
        ctx.services.lock_volume(ctx.config, request.mapping)
    elif cryptsetup.status(request.mapping).active:
        cryptsetup.close_mapping(request.mapping)
    if restore:
        ctx.domains.define(restore)
        if not same_domain(ctx.domains.defined_xml(guest), restore):
            raise LuksvmError(f"libvirt did not take back {state.previous_xml_path}")
        ctx.out(f"{guest}: previous definition restored ({request.disk} on {state.source.path})")
    if os.path.exists(fragment):
        os.unlink(fragment)
        ctx.config = config.load(ctx.root)
        for line in ctx.services.apply(ctx.config):
            ctx.out(line)
    stamp = _now().replace(":", "")
    for path in (state.path, state.previous_xml_path, state.defined_xml_path):
        if os.path.exists(path):
            os.replace(
                path,
                path.replace(
                    f"{guest}.{request.disk}.", f"{guest}.{request.disk}.rolled-back-{stamp}.", 1
                ),
            )
    ctx.out(
        f"rolled back: {guest} uses {state.source.path} again. {request.lv_path} is kept "
        f"(LUKS, {request.mapping} locked); delete it when sure: lvremove {request.vg}/{request.lv}"
    )


def _check_unchanged_since(state: State, current: str) -> None:
    """Restore only over the definition migrate made: later edits by the admin are not ours to
    undo silently."""
    if not os.path.exists(state.defined_xml_path):
        return  # interrupted right after define: nothing else can have changed it
    with open(state.defined_xml_path, encoding="utf-8") as f:
        defined = f.read()
    if not same_domain(current, defined):
        raise LuksvmError(
            f"{state.request.guest}'s definition changed after migrate defined it "
            f"({state.defined_xml_path}); restoring {state.previous_xml_path} would undo those "
            "changes too. Merge them by hand and define it: virsh define "
            f"{state.previous_xml_path}"
        )


def describe_states(root: str, guest: str) -> Iterator[str]:
    for state in states_of(root, guest):
        yield f"{state.request.disk}: {', '.join(state.done)}"


# --- wiring: the rest of luksvm --------------------------------------------------------------


def backup_header(cfg: Config, name: str) -> str:
    from luksvm import backup

    report = backup.backup_headers(cfg, [name])
    outcome = report.outcomes[0]
    if outcome.error:
        raise LuksvmError(f"header backup of {name} failed: {outcome.error}")
    return f"header backup: {outcome.file}"


def adopt(cfg: Config, name: str) -> None:
    """Start the volume's unlock unit: it finds the mapping open (no prompt), and from then on
    owns it, so the mapping is locked at shutdown. Without systemd there is no unit to start."""
    from luksvm import systemctl, units

    if systemctl.systemd_running(cfg.root):
        run(["systemctl", "start", units.unlock_unit(name)], timeout=120)


def default_services() -> Services:
    """The real implementations (fakes replace them in tests). Doctor is wired in cli.py's
    handler when it is part of the build."""
    from luksvm import apply, guests, keys, unlock

    def apply_config(cfg: Config) -> list[str]:
        result = apply.apply(cfg)
        return [
            *apply.describe(result, dry_run=False, diff=False),
            *apply.warnings(result),
            *guests.apply_autostart_policy(cfg, take_over=False, dry_run=False),
        ]

    def stop_guest(cfg: Config, name: str) -> None:
        guests.stop_guest(cfg, name, guests.connector(cfg))

    def lock_volume(cfg: Config, name: str) -> None:
        unlock.lock(cfg, [cfg.volume(name)], from_unit=False, dry_run=False)

    return Services(
        stop_guest=stop_guest,
        lock_volume=lock_volume,
        adopt=adopt,
        backup_header=backup_header,
        doctor=lambda _root: "(doctor is not part of this build)",
        apply=apply_config,
        check_keyfile=keys.check_keyfile,
        keyring_secret=lambda volume, cfg: keys.keyring_secret(volume, cfg.settings),
    )
