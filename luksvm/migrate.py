"""Move a guest's disk onto a new LUKS-encrypted raw LV: size, format, copy, verify, repoint.

The planner is pure; the executor runs its steps in order and records each one done in a state file
under /var/lib/luksvm/migrate, so an interrupted run resumes where it stopped. Nothing of the source
is ever written: it is only read by `qemu-img convert` and `qemu-img compare`.
"""

from __future__ import annotations

import copy
import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from luksvm.errors import LuksvmError, UsageError
from luksvm.sizes import SECTOR, round_up

# The payload offset is pinned (16 MiB, the LUKS2 default) and checked after formatting, so the size
# computed before formatting is the size the guest gets, for LUKS1 and LUKS2 alike.
PAYLOAD_OFFSET_SECTORS = 32768
PAYLOAD_OFFSET = PAYLOAD_OFFSET_SECTORS * SECTOR
STATE_DIR = "var/lib/luksvm/migrate"
LUKS_TYPES = ("luks1", "luks2")


@dataclass(frozen=True)
class SourceDisk:
    path: str
    format: str  # raw or qcow2: what qemu-img reads
    block: bool  # a block device rather than a file
    virtual_size: int  # bytes the guest sees

    @staticmethod
    def from_qemu_img_info(path: str, info_json: str, *, block: bool) -> SourceDisk:
        """From `qemu-img info --output=json PATH`."""
        info = json.loads(info_json)
        fmt = str(info.get("format", ""))
        if fmt not in ("raw", "qcow2"):
            raise UsageError(f"{path}: disk format {fmt!r} is not supported; raw or qcow2 only")
        if info.get("backing-filename") or info.get("full-backing-filename"):
            # qemu-img reads through the chain, so the copy is complete; the domain's
            # <backingStore> goes with the old source.
            pass
        return SourceDisk(path, fmt, block, int(info["virtual-size"]))


def target_size(source: SourceDisk, extent_size: int) -> int:
    """Bytes of the new LV: the guest's disk plus the LUKS header area, in whole extents."""
    return round_up(source.virtual_size + PAYLOAD_OFFSET, extent_size)


# --- domain XML ---------------------------------------------------------------------------------


def _parse(xml: str) -> ET.Element:
    parser = ET.XMLParser(target=ET.TreeBuilder(insert_comments=True))
    return ET.fromstring(xml, parser=parser)


def find_disk(domain: ET.Element, target_dev: str) -> ET.Element:
    for disk in domain.findall("./devices/disk"):
        target = disk.find("target")
        if target is not None and target.get("dev") == target_dev:
            return disk
    devs = [t.get("dev", "?") for t in domain.findall("./devices/disk/target") if t is not None]
    raise UsageError(
        f"domain {domain.findtext('name', '?')!r} has no disk with target dev {target_dev!r} "
        f"(its disks: {', '.join(devs) or 'none'})"
    )


@dataclass(frozen=True)
class DomainDisk:
    target: str
    type: str  # file, block, …
    device: str  # disk, cdrom, …
    source: str  # the file or device path
    driver_type: str  # raw, qcow2, …


def domain_disk(xml: str, target_dev: str) -> DomainDisk:
    disk = find_disk(_parse(xml), target_dev)
    source = disk.find("source")
    driver = disk.find("driver")
    path = ""
    if source is not None:
        path = source.get("file") or source.get("dev") or ""
    return DomainDisk(
        target_dev,
        disk.get("type", ""),
        disk.get("device", "disk"),
        path,
        driver.get("type", "raw") if driver is not None else "raw",
    )


def rewrite_domain_xml(xml: str, target_dev: str, mapping_path: str) -> str:
    """The same domain with one disk's source replaced by the mapping as a raw block device.

    Everything else (UUID, MACs, other disks, addresses) stays as it was.
    """
    domain = _parse(xml)
    disk = find_disk(domain, target_dev)
    if disk.get("device", "disk") != "disk":
        raise UsageError(f"disk {target_dev} is a {disk.get('device')}, not a disk")
    disk.set("type", "block")
    driver = disk.find("driver")
    if driver is None:
        driver = ET.Element("driver", {"name": "qemu"})
        disk.insert(0, driver)
    driver.set("type", "raw")
    driver.set("discard", "unmap")  # lets guest TRIM reach dm-crypt (and the SSD below)
    for child in list(disk):
        if child.tag in ("source", "backingStore"):
            index = list(disk).index(child)
            disk.remove(child)
            if child.tag == "source":
                disk.insert(index, ET.Element("source", {"dev": mapping_path}))
    if disk.find("source") is None:
        disk.insert(list(disk).index(driver) + 1, ET.Element("source", {"dev": mapping_path}))
    return ET.tostring(domain, encoding="unicode")


def canonical(xml: str) -> ET.Element:
    """A copy of the parsed domain with white space normalised, for comparisons in tests/checks."""
    domain = copy.deepcopy(_parse(xml))
    for element in domain.iter():
        if element.text is not None and not element.text.strip():
            element.text = None
        if element.tail is not None and not element.tail.strip():
            element.tail = None
    return domain


# --- the plan -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    guest: str
    disk: str  # target dev in the domain, e.g. vda
    vg: str
    lv: str
    mapping: str
    luks_type: str = "luks2"
    cipher: str = ""  # empty: cryptsetup's default
    verify: str = "full"  # full or sample

    def __post_init__(self) -> None:
        if self.luks_type not in LUKS_TYPES:
            raise UsageError(f"--luks-type {self.luks_type!r}: expected luks1 or luks2")
        if self.verify not in ("full", "sample"):
            raise UsageError(f"--verify {self.verify!r}: expected full or sample")

    @property
    def lv_path(self) -> str:
        return f"/dev/{self.vg}/{self.lv}"

    @property
    def mapping_path(self) -> str:
        return f"/dev/mapper/{self.mapping}"


@dataclass(frozen=True)
class Step:
    name: str  # stable id, recorded in the state file when done
    argv: tuple[str, ...]  # empty for steps luksvm does itself (XML, config)
    what: str  # one line for the plan listing
    secret_stdin: bool = False  # the key goes to this command's stdin


def verify_target(request: Request, source: SourceDisk) -> str:
    """A qemu-img block spec for the first virtual_size bytes of the mapping: the rest of the LV
    (rounding to whole extents) holds decrypted noise, not zeros, and is not compared."""
    spec = {
        "driver": "raw",
        "size": source.virtual_size,
        "file": {"driver": "host_device", "filename": request.mapping_path},
    }
    return "json:" + json.dumps(spec, separators=(",", ":"))


def plan(request: Request, source: SourceDisk, extent_size: int) -> tuple[Step, ...]:
    size = target_size(source, extent_size)
    format_argv = [
        "cryptsetup",
        "luksFormat",
        "--batch-mode",
        "--type",
        request.luks_type,
        "--offset",
        str(PAYLOAD_OFFSET_SECTORS),
        "--key-file=-",
    ]
    if request.luks_type == "luks2":
        # A partition table inside counts 512-byte LBAs; LUKS2 would pick 4096 on many disks.
        format_argv += ["--sector-size", "512"]
    if request.cipher:
        format_argv += ["--cipher", request.cipher]
    format_argv.append(request.lv_path)
    steps = [
        Step(
            "create-lv",
            ("lvcreate", "--yes", "--size", f"{size}b", "--name", request.lv, request.vg),
            f"create {request.lv_path}: {size:,} bytes",
        ),
        Step("format", tuple(format_argv), f"LUKS-format {request.lv_path}", secret_stdin=True),
        Step(
            "open",
            ("cryptsetup", "open", "--key-file=-", request.lv_path, request.mapping),
            f"open it as {request.mapping_path}",
            secret_stdin=True,
        ),
        Step(
            "copy",
            (
                "qemu-img",
                "convert",
                "-p",
                "-n",
                "-S",
                "0",  # write every byte: a skipped hole would read back as decrypted noise
                "-f",
                source.format,
                "-O",
                "raw",
                source.path,
                request.mapping_path,
            ),
            f"copy {source.virtual_size:,} bytes from {source.path}",
        ),
    ]
    if request.verify == "full":
        steps.append(
            Step(
                "verify",
                (
                    "qemu-img",
                    "compare",
                    "-f",
                    source.format,
                    source.path,
                    verify_target(request, source),
                ),
                f"compare all {source.virtual_size:,} bytes of source and mapping",
            )
        )
    else:
        steps.append(Step("verify", (), "compare sampled blocks of source and mapping"))
    steps += [
        Step("redefine", (), f"point {request.guest}'s {request.disk} at {request.mapping_path}"),
        Step("configure", (), f"add {request.mapping} to /etc/luksvm/crypttab.d and apply"),
        Step("header-backup", (), f"back up the LUKS header of {request.mapping}"),
    ]
    return tuple(steps)


def check_payload_offset(offset: int) -> None:
    if offset != PAYLOAD_OFFSET:
        raise LuksvmError(
            f"the new LUKS header's payload offset is {offset:,} bytes, not the "
            f"{PAYLOAD_OFFSET:,} the size was computed for; nothing was copied"
        )
