"""Growing LVM-on-LUKS, online: an exact planner (pure), the guards, and the checked executor.

Two commands, the mirror image of shrink:

    grow GUEST [--disk T] (--by|--to) SIZE
        host LV --lvextend (whole extents)--> LUKS mapping --cryptsetup resize (512-byte sectors)-->
        the running QEMU --libvirt block resize (bytes)--> the guest sees the new capacity; then
        the steps inside the guest, read from its agent (printed, or run with --inside)
    grow --lv VG/LV (--by|--to) SIZE      (the host's own stack: partition | host LV → LUKS → PV →
        VG → LV → ext4; the container grows only when the VG lacks free extents)

Each layer is grown to exactly the size that holds the layer above; every step is followed by a
check of its result, and a rerun resumes at the first check that does not hold.
"""

from __future__ import annotations

import base64
import datetime
import json
import logging
import os
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from luksvm import (
    blockdev,
    config,
    cryptsetup,
    extfs,
    journal,
    keys,
    lvm,
    shrink,
    sizes,
    stack,
    virt,
)
from luksvm.blockdev import Partition
from luksvm.cryptsetup import LuksHeader
from luksvm.errors import LuksvmError, UsageError
from luksvm.run import run
from luksvm.shrink import LayerRow
from luksvm.sizes import SECTOR, human
from luksvm.stack import (
    Check,
    HostLv,
    Step,
    describe_blocks,
    describe_extents,
    describe_sectors,
    numbered,
)

log = logging.getLogger("luksvm.grow")

BACKUP_ROOT = "/var/lib/luksvm/grow"


class GrowRefused(LuksvmError):
    """The disk or the requested size cannot be grown safely; nothing was changed."""


# --- arguments (checked before anything on the host is read) --------------------------------------


@dataclass(frozen=True)
class Amount:
    """--by or --to, as given: `text` is checked for an unambiguous unit at once; sizes in
    extents (`e`) become bytes only once the VG's extent size is known."""

    kind: Literal["by", "to"]
    text: str

    def bytes(self, extent_size: int) -> int:
        return sizes.parse_size(self.text, extent_size=extent_size)

    @property
    def option(self) -> str:
        return f"--{self.kind} {self.text}"


def parse_amount(by: str | None, to: str | None) -> Amount:
    """Exactly one of --by/--to, with an explicit unit and above zero (usage errors, exit 64)."""
    if (by is None) == (to is None):
        raise UsageError("grow needs exactly one of --by SIZE and --to SIZE, e.g. --by 10GiB")
    amount = Amount("by", by) if by is not None else Amount("to", str(to))
    size = amount.bytes(1)  # a unit check; "e" counts 1-byte extents here
    if size <= 0:
        raise UsageError(f"{amount.option}: the size must be above zero")
    return amount


def split_lv(text: str) -> tuple[str, str]:
    return shrink.split_lv(text)


# --- a guest's disk: host LV → LUKS → the running QEMU --------------------------------------------


@dataclass(frozen=True)
class GuestDisk:
    """What grow GUEST reads from the host, libvirt and the LUKS header (see read_guest_disk)."""

    guest: str
    target: str  # the disk as libvirt names it: vda
    volume: str  # the luksvm volume (= the mapping's name)
    host: HostLv  # the LUKS container
    luks: LuksHeader
    mapping_size: int | None  # bytes; None when the mapping is closed
    running: bool
    capacity: int | None  # bytes QEMU reports for the disk; None when the guest is not running
    host_free_extents: int
    uri: str = virt.DEFAULT_URI


@dataclass(frozen=True)
class InsideStep:
    """A command to run inside the guest (through the agent's guest-exec with --inside)."""

    argv: tuple[str, ...]
    why: str


@dataclass(frozen=True)
class Inside:
    """The guest's own layers on the grown disk, as its agent reported them."""

    source: Literal["agent", "none"]
    steps: tuple[InsideStep, ...]
    notes: tuple[str, ...]


@dataclass(frozen=True)
class GrowPlan:
    subject: str  # "guest mail, disk vda (cr_imap_encr)" or "vgmail/root"
    today: int  # bytes: the size of the top layer now
    target: int  # bytes it will have
    layers: tuple[LayerRow, ...]
    steps: tuple[Step, ...]
    notes: tuple[str, ...] = ()
    inside: Inside | None = None

    @property
    def nothing_to_do(self) -> bool:
        return all(step.check.kind in stack.BOOKKEEPING for step in self.steps)


def plan_guest(disk: GuestDisk, amount: Amount, *, backup_dir: str) -> GrowPlan:
    """The exact plan to grow a guest's disk: host LV (whole extents), the open mapping (512-byte
    sectors), the running QEMU (bytes). The guest's capacity after it = the mapping's size."""
    host, luks = disk.host, disk.luks
    ext = host.extent_size
    fill_now = stack.mapping_fill(host.size, luks.data_offset, luks.sector_size)
    # today: the top layer, so that a rerun after an interruption plans the same target
    if disk.capacity is not None:
        today = disk.capacity
    elif disk.mapping_size is not None:
        today = disk.mapping_size
    else:
        today = fill_now
    amount_bytes = amount.bytes(ext)
    target = amount_bytes if amount.kind == "to" else today + amount_bytes
    container = luks.data_offset + target
    if container % ext or target % luks.sector_size:
        below = sizes.round_down(container, ext) - luks.data_offset
        above = below + ext
        raise UsageError(
            f"{amount.option}: a disk of {target:,} B needs a host LV of {container:,} B (data "
            f"offset {luks.data_offset:,} B + the disk), not a whole number of the "
            f"{human(ext)} extents of VG {host.vg}",
            fix=f"use --to {below}B or --to {above}B",
        )
    if target <= today:
        raise GrowRefused(
            f"{amount.option}: guest {disk.guest}'s disk {disk.target} is {human(today)} today; "
            f"{human(target)} is not larger, and luksvm grow only grows",
            fix="to make it smaller, shut the guest off and use luksvm shrink",
        )
    new_extents = container // ext
    need = new_extents - host.size // ext
    if need > disk.host_free_extents:
        raise GrowRefused(
            f"VG {host.vg} has {disk.host_free_extents:,} free extents; growing "
            f"{host.vg}/{host.lv} to {human(container)} needs {need:,} "
            f"({describe_extents(need, ext)})",
            fix=f"add a PV to {host.vg} (vgextend) or grow by less",
        )
    sectors = target // SECTOR
    steps: list[Step] = [
        shrink.host_vg_backup_step(host.vg, f"{backup_dir}/{host.vg}.vg"),
        Step(
            0,
            f"grow host LV {host.vg}/{host.lv} to {new_extents:,} extents",
            ("lvextend", "--yes", "-l", str(new_extents), f"{host.vg}/{host.lv}"),
            Check(
                "lv_size",
                f"{host.vg}/{host.lv}",
                container,
                f"lvs: {host.vg}/{host.lv} is {container:,} B",
            ),
            (
                f"before: {describe_extents(host.size // ext, ext)}",
                f"after: {describe_extents(new_extents, ext)} = data offset "
                f"{luks.data_offset:,} B + disk {target:,} B",
            ),
            timeout=300,
        ),
    ]
    if disk.mapping_size is not None:
        steps.append(
            shrink.mapping_resize_step(
                disk.volume,
                luks,
                sectors,
                f"grow the LUKS mapping {disk.volume} to {human(target)}",
                f"after: {describe_sectors(sectors)} (--size counts 512-byte sectors; a "
                f"multiple of the {luks.sector_size:,} B encryption sector)",
            )
        )
    if disk.running:
        steps.append(block_resize_step(disk, target))
    rows = [
        LayerRow(
            "host LV",
            f"{host.vg}/{host.lv}",
            describe_extents(host.size // ext, ext),
            describe_extents(new_extents, ext),
        ),
        LayerRow(
            f"LUKS{luks.version} mapping",
            disk.volume,
            describe_sectors(disk.mapping_size // SECTOR) if disk.mapping_size else "closed",
            describe_sectors(sectors) if disk.mapping_size is not None else "closed",
        ),
        LayerRow(
            f"guest disk {disk.target}",
            disk.guest,
            human(disk.capacity) if disk.capacity is not None else "not running",
            human(target) if disk.running else "not running",
        ),
    ]
    notes = [
        f"LUKS{luks.version} data offset {luks.data_offset:,} B, encryption sector "
        f"{luks.sector_size:,} B; host VG {host.vg}: {disk.host_free_extents:,} extents free"
    ]
    if disk.mapping_size is None:
        notes.append(
            f"{disk.volume} is closed: its size is computed when it is opened, so only the "
            "host LV grows"
        )
    elif not disk.running:
        notes.append(f"guest {disk.guest} is not running: it sees the new size when it starts")
    else:
        notes.append(
            "a virtio-blk guest sees the new capacity at once; SCSI/SATA disks need a rescan "
            "inside the guest (echo 1 > /sys/class/block/sdX/device/rescan)"
        )
    return GrowPlan(
        subject=f"guest {disk.guest}, disk {disk.target} ({disk.volume})",
        today=today,
        target=target,
        layers=tuple(rows),
        steps=numbered(steps),
        notes=tuple(notes),
    )


def block_resize_step(disk: GuestDisk, size: int) -> Step:
    argv = ("virsh", "-c", disk.uri, "blockresize", disk.guest, disk.target, f"{size}B")
    return Step(
        0,
        f"tell guest {disk.guest}'s QEMU that {disk.target} is {human(size)}",
        argv,
        Check(
            "block_capacity",
            disk.target,
            size,
            f"libvirt block info: {disk.target} capacity {size:,} B",
        ),
        (f"{size:,} B (VIR_DOMAIN_BLOCK_RESIZE_BYTES, through libvirt-python)",),
        timeout=virt.BLOCK_RESIZE_DEADLINE,
        action="libvirt-block-resize",
        call=(disk.guest, disk.target, size),
    )


# --- inside the guest: the layout its agent reports, and the steps for it -------------------------

GROWABLE_FS = {"ext2", "ext3", "ext4", "xfs"}


def plan_inside(
    pci: tuple[int, int, int, int] | None,
    target: str,
    disks: Sequence[dict[str, Any]] | None,
    filesystems: Sequence[dict[str, Any]] | None,
) -> Inside:
    """Steps inside the guest for the layout its agent reported (guest-get-disks and
    guest-get-fsinfo replies). The disk is the one at libvirt's PCI address of `target`; without
    an answer or a match nothing is guessed: the generic steps are described instead."""
    if disks is None or filesystems is None:
        return _inside_unknown("the guest agent did not answer (not installed or not running)")
    if pci is None:
        return _inside_unknown(f"disk {target} has no PCI address in the domain XML")
    disk = next((d for d in disks if not d.get("partition") and _pci_of(d) == pci), None)
    if disk is None:
        return _inside_unknown(
            f"the agent reports no disk at PCI address {_pci_text(pci)} (libvirt's {target})"
        )
    name = str(disk["name"])
    above = _holders(disks, name)
    notes = [f"the agent reports {target} as {name}"]
    steps: list[InsideStep] = []
    fs_names = {str(f.get("name", "")): f for f in filesystems}
    partitions = [d for d in above if d.get("partition")]
    if len(partitions) > 1:
        last = max(partitions, key=lambda d: _partition_number(str(d["name"]), name))
        lower = [str(d["name"]) for d in partitions if d is not last]
        notes.append(f"{name} has partitions {', '.join(lower)} before {last['name']}")
        partitions = [last]
    if partitions:
        part = str(partitions[0]["name"])
        number = _partition_number(part, name)
        steps.append(
            InsideStep(
                ("growpart", name, str(number)),
                f"grow partition {number} to the disk's end (on GPT it moves the backup header "
                "to the new end first)",
            )
        )
        device, above = part, _holders(disks, part)
    else:
        device = name
    lvs = [d for d in above if not d.get("partition") and d.get("alias")]
    if lvs:
        steps.append(InsideStep(("pvresize", device), f"the PV on {device} fills it"))
        if len(lvs) != 1:
            names = ", ".join("/".join(lvm.split_dm_name(str(d["alias"]))) for d in lvs)
            notes.append(
                f"the PV holds {len(lvs)} LVs ({names}): choose which gets the space, "
                "e.g. lvextend -l +100%FREE VG/LV, then grow its filesystem"
            )
            return Inside("agent", tuple(steps), tuple(notes))
        vg, lv = lvm.split_dm_name(str(lvs[0]["alias"]))
        if not lv:
            notes.append(f"{lvs[0]['alias']} on {device} is not an LVM LV: stopping here")
            return Inside("agent", tuple(steps), tuple(notes))
        steps.append(
            InsideStep(
                ("lvextend", "-l", "+100%FREE", f"{vg}/{lv}"), f"LV {vg}/{lv} takes the new extents"
            )
        )
        device = str(lvs[0]["name"])
    fs = fs_names.get(os.path.basename(device))
    if fs is None:
        notes.append(f"no mounted filesystem on {device} reported: grow it when it is in use")
    elif str(fs.get("type")) in {"ext2", "ext3", "ext4"}:
        why = f"{fs['type']} on {fs.get('mountpoint')} grows online"
        steps.append(InsideStep(("resize2fs", device), why))
    elif fs.get("type") == "xfs":
        steps.append(
            InsideStep(
                ("xfs_growfs", str(fs.get("mountpoint"))),
                f"xfs on {fs.get('mountpoint')} grows online",
            )
        )
    else:
        notes.append(f"{fs.get('type')} on {fs.get('mountpoint')}: luksvm knows no online grow")
    return Inside("agent", tuple(steps), tuple(notes))


def _inside_unknown(why: str) -> Inside:
    return Inside(
        "none",
        (),
        (
            f"luksvm could not read the guest's layout: {why}. Inside the guest: grow the "
            "partition on this disk if there is one (growpart DISK N; on GPT that also moves "
            "the backup header to the new end), then pvresize that partition or disk if it is "
            "an LVM PV, lvextend the LV, and grow its filesystem (resize2fs DEVICE for ext4, "
            "xfs_growfs MOUNTPOINT for XFS)",
        ),
    )


def _pci_of(disk: dict[str, Any]) -> tuple[int, int, int, int] | None:
    address = disk.get("address") or {}
    pci = address.get("pci-controller")
    if not pci:
        return None
    return (int(pci["domain"]), int(pci["bus"]), int(pci["slot"]), int(pci["function"]))


def _pci_text(pci: tuple[int, int, int, int]) -> str:
    return f"{pci[0]:04x}:{pci[1]:02x}:{pci[2]:02x}.{pci[3]:x}"


def _holders(disks: Sequence[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [d for d in disks if name in (d.get("dependencies") or [])]


def _partition_number(part: str, disk: str) -> int:
    rest = part[len(disk) :] if part.startswith(disk) else part
    digits = rest.lstrip("p")
    return int(digits) if digits.isdigit() else -1


def describe_inside(inside: Inside) -> list[str]:
    lines = []
    for number, step in enumerate(inside.steps, start=1):
        lines.append(f"  {number}. {shlex.join(step.argv)}   # {step.why}")
    lines += [f"  note: {note}" for note in inside.notes]
    return lines


EXEC_TIMEOUT = 600.0  # seconds one command inside the guest may take


def run_inside(domain: virt.Domain, inside: Inside, progress: Callable[[str], None]) -> None:
    """Run the inside steps through the agent's guest-exec, one after the other; stop at the
    first that does not exit 0."""
    for number, step in enumerate(inside.steps, start=1):
        progress(f"  {number}. in the guest: {shlex.join(step.argv)}")
        rc, out, err = agent_exec(domain, step.argv)
        if rc != 0:
            tail = "\n".join((err or out).strip().splitlines()[-5:])
            raise LuksvmError(
                f"inside guest {domain.name}: {shlex.join(step.argv)} exited {rc}: {tail}; "
                "the host side is done: finish the remaining steps in the guest"
            )
        progress("      ok: exit status 0")


def agent_exec(
    domain: virt.Domain, argv: Sequence[str], *, poll: float = 0.2, timeout: float = EXEC_TIMEOUT
) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of argv run in the guest by its agent (guest-exec)."""
    started = virt.agent_command(
        domain, "guest-exec", {"path": argv[0], "arg": list(argv[1:]), "capture-output": True}
    )
    pid = int(started["pid"])
    end = time.monotonic() + timeout
    while True:
        status = virt.agent_command(domain, "guest-exec-status", {"pid": pid})
        if status.get("exited"):
            break
        if time.monotonic() > end:
            raise LuksvmError(f"inside guest {domain.name}: {argv[0]} still runs after {timeout} s")
        time.sleep(poll)
    out = base64.b64decode(status.get("out-data", "")).decode(errors="replace")
    err = base64.b64decode(status.get("err-data", "")).decode(errors="replace")
    return int(status.get("exitcode", -1)), out, err


# --- the host's own stack: partition | host LV → LUKS → PV → VG → LV → ext4 -----------------------


@dataclass(frozen=True)
class Room:
    """How far the container may grow: the last LBA a partition may reach (and why), or the free
    extents of a host LV's VG."""

    last_lba: int = -1
    why: str = ""
    host_free_extents: int = 0


@dataclass(frozen=True)
class LvLayout:
    layout: shrink.Layout  # every layer, as shrink reads it
    room: Room


def refuse_unsupported(layout: shrink.Layout) -> None:
    vg = layout.vg
    if len(vg.pvs) != 1 or vg.pvs[0].name != layout.pv_device:
        raise GrowRefused(
            f"VG {vg.name} lies on {', '.join(pv.name for pv in vg.pvs)}; luksvm grows a VG on "
            f"exactly one LUKS mapping ({layout.pv_device})"
        )
    for lv in vg.lvs:
        if lv.attr.startswith("p") or "pvmove" in lv.name:
            raise GrowRefused(
                f"VG {vg.name} has an interrupted pvmove ({lv.name})",
                fix="finish it with `pvmove` (no arguments) or undo it with `pvmove --abort`, "
                "then run again",
            )
    if vg.lv(layout.lv) is None:
        raise GrowRefused(f"LV {vg.name}/{layout.lv} not found in VG {vg.name}")
    if layout.filesystem.state not in {"clean", "not clean"}:
        raise GrowRefused(
            f"{layout.lv_path}: filesystem state is {layout.filesystem.state!r}",
            fix=f"run e2fsck -f {layout.lv_path} first",
        )


def plan_lv(found: LvLayout, amount: Amount, *, backup_dir: str) -> GrowPlan:
    """The exact plan to grow LV and filesystem; the PV, mapping and container grow only by what
    the VG lacks, each to the smallest aligned size holding the layer above."""
    layout, room = found.layout, found.room
    refuse_unsupported(layout)
    vg, fs, luks, pv = layout.vg, layout.filesystem, layout.luks, layout.vg.pvs[0]
    ext = vg.extent_size
    lv = vg.lv(layout.lv)
    assert lv is not None  # refuse_unsupported checked it
    name = f"{vg.name}/{lv.name}"
    today = fs.block_count * fs.block_size  # the top layer: a rerun plans the same target
    amount_bytes = amount.bytes(ext)
    target = amount_bytes if amount.kind == "to" else today + amount_bytes
    if target % ext:
        below = sizes.round_down(target, ext)
        raise UsageError(
            f"{amount.option}: {name} would be {target:,} B, not a whole number of the VG's "
            f"{human(ext)} extents; LVM would round it",
            fix=f"Use --to {below // ext}e ({below:,} B) or --to {below // ext + 1}e "
            f"({below + ext:,} B)",
        )
    if target <= today or target < lv.size:
        raise GrowRefused(
            f"{amount.option}: {name} is {human(max(today, lv.size))} today; {human(target)} is "
            "not larger, and luksvm grow only grows",
            fix="to make it smaller use luksvm shrink (offline)",
        )
    pe_count = pv.size // ext
    allocated = sum(s.pe_count for s in vg.segments if s.lv)
    free = pe_count - allocated
    need = target // ext - lv.size // ext
    extra = max(0, need - free)
    pv_min = stack.pv_size_for(pv.pe_start, pe_count + extra, ext, layout.end_mda)
    crypt_min = stack.mapping_size_for(pv_min, luks.sector_size)
    container_min = luks.data_offset + crypt_min
    container = layout.container
    size_now = layout.container_size
    partition_end = -1
    if isinstance(container, Partition):
        new_size, partition_end = stack.partition_for(container, container_min)
        if new_size <= size_now:
            new_size, partition_end = size_now, container.end
        elif partition_end > room.last_lba:
            raise GrowRefused(
                f"no room after partition {container.number} of {container.disk}: to hold "
                f"{human(container_min)} it must end at sector {partition_end:,}, but "
                f"{room.why} (sector {room.last_lba:,} is the last it may use)",
                fix=f"{name} can grow by at most {human(free * ext)} (the VG's free extents); "
                "for more, make room after the partition first",
            )
    else:
        new_size = max(size_now, stack.host_lv_for(container, container_min))
        host_need = (new_size - size_now) // container.extent_size
        if host_need > room.host_free_extents:
            raise GrowRefused(
                f"VG {container.vg} has {room.host_free_extents:,} free extents; growing "
                f"{container.vg}/{container.lv} to {human(new_size)} needs {host_need:,} "
                f"({describe_extents(host_need, container.extent_size)})",
                fix=f"add a PV to {container.vg} (vgextend) or grow by less",
            )
    crypt_final = stack.mapping_fill(new_size, luks.data_offset, luks.sector_size)
    pv_final = stack.pv_fill(crypt_final, pv.pe_start, layout.end_mda, ext)
    assert pv_final >= pe_count + extra  # the container holds what the LV needs
    on_pv = ("--devices", layout.pv_device)
    vg_file = f"{backup_dir}/{vg.name}.vg"
    steps: list[Step] = [
        Step(
            0,
            f"back up the LVM metadata of VG {vg.name}",
            ("vgcfgbackup", *on_pv, "-f", vg_file, vg.name),
            Check("file", vg_file, 0, f"{vg_file} exists"),
            timeout=120,
        )
    ]
    if new_size > size_now:
        if isinstance(container, Partition):
            steps += shrink.partition_steps(
                container, new_size, partition_end, f"holds {container_min:,} B", verb="grow"
            )
        else:
            steps += _host_lv_extend_steps(container, new_size, backup_dir)
    if layout.mapping_size != crypt_final:
        steps.append(
            shrink.mapping_resize_step(
                layout.mapping_name,
                luks,
                crypt_final // SECTOR,
                f"grow the LUKS mapping {layout.mapping_name} to fill its container",
                f"after: {describe_sectors(crypt_final // SECTOR)} = container {new_size:,} B "
                f"- data offset {luks.data_offset:,} B",
            )
        )
    if pe_count != pv_final:
        steps.append(
            Step(
                0,
                f"grow PV {layout.pv_device} to fill the mapping",
                ("pvresize", *on_pv, "--yes", layout.pv_device),
                Check("pv_extents", layout.pv_device, pv_final, f"pvs: {pv_final:,} extents"),
                (f"after: {describe_extents(pv_final, ext)}",),
            )
        )
    steps.append(
        Step(
            0,
            f"grow LV {name} to {target // ext:,} extents",
            ("lvextend", *on_pv, "--yes", "-l", str(target // ext), name),
            Check("lv_size", name, target, f"lvs: {name} is {target:,} B"),
            (
                f"before: {describe_extents(lv.size // ext, ext)}",
                f"after: {describe_extents(target // ext, ext)}",
            ),
        )
    )
    blocks = target // fs.block_size
    if not layout.mounted:
        steps.append(
            Step(
                0,
                "check the filesystem (resize2fs grows an unmounted one only after e2fsck -f)",
                ("e2fsck", "-f", "-p", layout.lv_path),
                Check("fsck", layout.lv_path, 0, "e2fsck exits 0 (clean, nothing changed)"),
                always=True,
            )
        )
    steps.append(
        Step(
            0,
            "grow the filesystem to fill the LV"
            + (f" (online, mounted on {', '.join(layout.mounted)})" if layout.mounted else ""),
            ("resize2fs", layout.lv_path),
            Check("fs_blocks", layout.lv_path, blocks, f"dumpe2fs: block count {blocks:,}"),
            (f"after: {describe_blocks(blocks, fs.block_size)}",),
        )
    )
    rows = [
        LayerRow(
            f"filesystem ({fs.fs_type})",
            layout.lv_path,
            describe_blocks(fs.block_count, fs.block_size),
            describe_blocks(blocks, fs.block_size),
        ),
        LayerRow(
            "LV", name, describe_extents(lv.size // ext, ext), describe_extents(target // ext, ext)
        ),
        LayerRow(
            "PV", layout.pv_device, describe_extents(pe_count, ext), describe_extents(pv_final, ext)
        ),
        LayerRow(
            f"LUKS{luks.version} mapping",
            layout.mapping_name,
            describe_sectors(layout.mapping_size // SECTOR),
            describe_sectors(crypt_final // SECTOR),
        ),
    ]
    if isinstance(container, Partition):
        rows.append(
            LayerRow(
                "partition",
                container.path,
                f"sectors {container.start:,}-{container.end:,} = {human(size_now)}",
                f"sectors {container.start:,}-{partition_end:,} = {human(new_size)}",
            )
        )
    else:
        hext = container.extent_size
        rows.append(
            LayerRow(
                "host LV",
                f"{container.vg}/{container.lv}",
                describe_extents(size_now // hext, hext),
                describe_extents(new_size // hext, hext),
            )
        )
    notes = [
        f"VG {vg.name}: {free:,} extents free, {need:,} needed"
        + (f"; the PV grows by {extra:,}" if extra else "; no layer below the LV changes"),
        f"LUKS{luks.version} data offset {luks.data_offset:,} B, encryption sector "
        f"{luks.sector_size:,} B",
    ]
    return GrowPlan(
        subject=name,
        today=today,
        target=target,
        layers=tuple(rows),
        steps=numbered(steps),
        notes=tuple(notes),
    )


def _host_lv_extend_steps(host: HostLv, new_size: int, backup_dir: str) -> list[Step]:
    ext = host.extent_size
    name = f"{host.vg}/{host.lv}"
    return [
        shrink.host_vg_backup_step(host.vg, f"{backup_dir}/{host.vg}.vg"),
        Step(
            0,
            f"grow host LV {name} to {new_size // ext:,} extents",
            ("lvextend", "--yes", "-l", str(new_size // ext), name),
            Check("lv_size", name, new_size, f"lvs: {name} is {new_size:,} B"),
            (
                f"before: {describe_extents(host.size // ext, ext)}",
                f"after: {describe_extents(new_size // ext, ext)}",
            ),
            timeout=300,
        ),
    ]


def parse_room(part: Partition, table: dict[str, Any], disk_sectors: int) -> Room:
    """How far partition `part` may grow: up to the next partition's start, or the last usable
    sector (GPT's lastlba; a DOS table may use the whole disk)."""
    pt = table["partitiontable"]
    starts = sorted(
        (int(p["start"]), str(p["node"]))
        for p in pt.get("partitions", [])
        if int(p["start"]) > part.start
    )
    last = int(pt["lastlba"]) if "lastlba" in pt else disk_sectors - 1
    if starts and starts[0][0] - 1 < last:
        return Room(starts[0][0] - 1, f"{starts[0][1]} starts at sector {starts[0][0]:,}")
    if pt.get("label") == "dos" and part.number > 4:
        return Room(part.end, "it is a logical partition (luksvm grows primary ones)")
    return Room(last, f"the disk ends there (last usable sector {last:,})")


# --- showing a plan -------------------------------------------------------------------------------


def describe(plan_: GrowPlan) -> dict[str, object]:
    """The plan as JSON-ready data (`luksvm grow … --dry-run --json`)."""
    data: dict[str, object] = {
        "subject": plan_.subject,
        "today": plan_.today,
        "target": plan_.target,
        "nothing_to_do": plan_.nothing_to_do,
        "layers": [
            {"layer": r.layer, "device": r.device, "before": r.before, "after": r.after}
            for r in plan_.layers
        ],
        "steps": [shrink.describe_step(s) for s in plan_.steps],
        "notes": list(plan_.notes),
    }
    if plan_.inside is not None:
        data["inside"] = {
            "source": plan_.inside.source,
            "steps": [{"argv": list(s.argv), "why": s.why} for s in plan_.inside.steps],
            "notes": list(plan_.inside.notes),
        }
    return data


def format_plan(plan_: GrowPlan) -> str:
    lines = [f"Grow {plan_.subject}: {human(plan_.today)} → {human(plan_.target)}", ""]
    header = ("LAYER", "DEVICE", "BEFORE", "AFTER")
    rows = [header] + [(r.layer, r.device, r.before, r.after) for r in plan_.layers]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.append("")
    lines += [f"note: {n}" for n in plan_.notes]
    lines.append("")
    for step in plan_.steps:
        lines.append(f"{step.number:>2}. {step.title}")
        lines.append(f"      $ {shrink.command_line(step)}")
        lines += [f"      {s}" for s in step.sizes]
        lines.append(f"      check: {step.check.text}")
    if plan_.inside is not None:
        lines += ["", "Inside the guest:", *describe_inside(plan_.inside)]
    return "\n".join(lines)


# --- the key for cryptsetup resize of LUKS2 -------------------------------------------------------


def with_key(steps: Sequence[Step], key: keys.Key) -> tuple[Step, ...]:
    """The steps as they hand `key` to cryptsetup: a token key unlocks by itself (--token-only,
    nothing on stdin); any other goes on stdin (--key-file=-)."""
    if not key.token_only:
        return tuple(steps)
    return tuple(
        replace(step, argv=key.command(step.argv), needs_key=False) if step.needs_key else step
        for step in steps
    )


# --- reading the host (impure) --------------------------------------------------------------------


def read_guest_disk(
    cfg: config.Config, conn: virt.Connection, guest: str, target: str | None
) -> tuple[GuestDisk, virt.Domain, config.Volume]:
    """Find the guest's luksvm disk and every layer under it; refuse what grow cannot do."""
    domain = conn.domain(guest)
    disks = domain.disks()
    by_path = {v.mapper_path: v for v in cfg.volumes}
    if target is not None:
        disk = next((d for d in disks if d.target == target), None)
        if disk is None:
            raise UsageError(
                f"guest {guest} has no disk {target} (its disks: "
                f"{', '.join(d.target for d in disks) or 'none'})"
            )
    else:
        ours = [d for d in disks if d.source in by_path]
        if not ours:
            raise GrowRefused(
                f"no disk of guest {guest} is a luksvm volume (its disks: "
                f"{', '.join(d.target + '=' + (d.source or '-') for d in disks) or 'none'})",
                fix="luksvm grows /dev/mapper/NAME disks whose NAME is a volume in "
                "/etc/luksvm/crypttab.d; configure it there (luksvm migrate moves a disk onto one)",
            )
        if len(ours) > 1:
            raise UsageError(
                f"guest {guest} has {len(ours)} luksvm disks ({', '.join(d.target for d in ours)})",
                fix="name one with --disk TARGET",
            )
        disk = ours[0]
    volume = by_path.get(disk.source)
    if volume is None:
        raise GrowRefused(
            f"disk {disk.target} of guest {guest} ({disk.source or 'no source'}) is not a luksvm "
            "volume",
            fix="luksvm grows /dev/mapper/NAME disks whose NAME is a volume in "
            "/etc/luksvm/crypttab.d; configure it there (luksvm migrate moves a disk onto one)",
        )
    users = sorted(set(volume.guests) | {guest})
    if len(users) > 1:
        raise GrowRefused(
            f"volume {volume.name} is the disk of guests {', '.join(users)}: growing it changes "
            "the disk under every one of them, and only one can be told of the new size; luksvm "
            "refuses",
            fix="detach it from all but one guest, then grow",
        )
    mapping = blockdev.crypt_mapping_on(volume.device)
    running = domain.is_running()
    if running and not mapping:
        raise GrowRefused(
            f"guest {guest} is running but {volume.name} is closed: the guest cannot be using "
            f"this volume as its disk {disk.target}",
            fix="look at `luksvm status` and the guest's domain XML (virsh dumpxml)",
        )
    if mapping and mapping != volume.name:
        raise GrowRefused(
            f"{volume.device} is open as {mapping}, not as {volume.name}",
            fix=f"close it and open it as {volume.name} (luksvm unlock {volume.name})",
        )
    lv = shrink.host_lv_of(volume.device)
    if lv is None:
        raise GrowRefused(
            f"volume {volume.name} lies on {volume.device}, not on an LV of the host; grow GUEST "
            "grows host LVs",
            fix="for a partition use luksvm grow --lv VG/LV",
        )
    host = shrink.read_host_lv(volume.device, *lv)
    free = lvm.report("vgs", ["vg_free_count"], [host.vg])
    disk_info = GuestDisk(
        guest=guest,
        target=disk.target,
        volume=volume.name,
        host=host,
        luks=cryptsetup.read_header(volume.device),
        mapping_size=blockdev.describe(volume.mapper_path).size if mapping else None,
        running=running,
        capacity=virt.block_capacity(domain, disk.target) if running else None,
        host_free_extents=int(free[0]["vg_free_count"]) if free else 0,
        uri=conn.uri,
    )
    return disk_info, domain, volume


def read_inside(domain: virt.Domain, target: str) -> Inside:
    pci = virt.disk_pci_address(domain.xml(), target)
    try:
        disks = virt.agent_command(domain, "guest-get-disks")
        filesystems = virt.agent_command(domain, "guest-get-fsinfo")
    except virt.VirtError as error:
        log.info("no layout from the guest agent of %s: %s", domain.name, error)
        return plan_inside(pci, target, None, None)
    return plan_inside(pci, target, disks, filesystems)


def read_lv_layout(where: shrink.Where) -> LvLayout:
    found = extfs.fs_type(where.lv_path)
    if found not in extfs.EXT_TYPES:
        what = f"a {found} filesystem" if found else "no filesystem blkid recognises"
        raise GrowRefused(
            f"{where.lv_path} holds {what}; luksvm grow --lv grows ext2/3/4",
            fix="for XFS: lvextend, then xfs_growfs MOUNTPOINT",
        )
    layout = shrink.read_layout(where)
    container = layout.container
    if isinstance(container, Partition):
        table = json.loads(run(["sfdisk", "--json", container.disk], timeout=60).stdout)
        disk_bytes = _size_of(container.disk)
        return LvLayout(layout, parse_room(container, table, disk_bytes // container.sector_size))
    free = lvm.report("vgs", ["vg_free_count"], [container.vg])
    return LvLayout(layout, Room(host_free_extents=int(free[0]["vg_free_count"]) if free else 0))


def _size_of(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return blockdev.describe(path).size


def measure(check: Check, where: shrink.Where, domain: virt.Domain | None) -> int:
    if check.kind == "block_capacity":
        if domain is None:
            return -1
        return virt.block_capacity(domain, check.subject)
    return shrink.measure(check, where)


def resize_block(domain: virt.Domain) -> Callable[[Step], None]:
    def act(step: Step) -> None:
        assert step.call is not None and step.action == "libvirt-block-resize"
        _guest, target, size = step.call
        virt.block_resize(domain, target, size)

    return act


def default_backup_dir(name: str) -> str:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{BACKUP_ROOT}/{name.replace('/', '-')}-{stamp}"


def run_plan(
    plan_: GrowPlan,
    where: shrink.Where,
    *,
    key: bytes | None,
    domain: virt.Domain | None,
    backup_dir: str,
    command: str,
    progress: Callable[[str], None],
) -> None:
    os.makedirs(backup_dir, mode=0o700, exist_ok=True)
    with open(f"{backup_dir}/plan.json", "w", encoding="utf-8") as f:
        json.dump(describe(plan_), f, indent=2)
    progress(f"plan, backups and step log: {backup_dir}")
    shrink.run_steps(
        plan_.steps,
        lambda check: measure(check, where, domain),
        key=key,
        journal_path=f"{backup_dir}/steps.jsonl",
        progress=progress,
        command=command,
        replan=f"{command} --dry-run",
        call=resize_block(domain) if domain is not None else None,
    )
    log.info(
        "grew %s from %s to %s",
        plan_.subject,
        human(plan_.today),
        human(plan_.target),
        extra=journal.fields(volume=where.mapping_name, message_id="volume-grown"),
    )


# --- the two commands -----------------------------------------------------------------------------

Progress = Callable[[str], None]


def grow_guest(
    root: str,
    guest: str,
    target: str | None,
    amount: Amount,
    *,
    dry_run: bool,
    inside: bool,
    key_file: str | None,
    progress: Progress,
) -> GrowPlan:
    """grow GUEST: plan; unless dry_run, carry it out (and the inside steps with `inside`)."""
    cfg = config.load(root)
    with virt.connect(cfg.settings.uri) as conn:
        disk, domain, volume = read_guest_disk(cfg, conn, guest, target)
        backup_dir = default_backup_dir(f"{guest}-{disk.target}")
        plan_ = plan_guest(disk, amount, backup_dir=backup_dir)
        if disk.running:
            plan_ = replace(plan_, inside=read_inside(domain, disk.target))
        if inside and (plan_.inside is None or plan_.inside.source != "agent"):
            raise GrowRefused(
                f"--inside needs guest {guest} running with its QEMU guest agent answering; "
                + (plan_.inside.notes[0] if plan_.inside else f"guest {guest} is not running")
                + "; nothing was changed"
            )
        if dry_run:
            return plan_
        where = shrink.Where(
            vg=disk.host.vg,
            lv=disk.host.lv,
            container=volume.device,
            mapping=volume.mapper_path,
            mapping_name=volume.name,
            lv_path="",
            host_lv=(disk.host.vg, disk.host.lv),
        )
        key = _key_if_needed(
            plan_,
            where,
            domain=domain,
            volume=volume,
            key_file=key_file,
            root=root,
            settings=cfg.settings,
        )
        if key is not None:
            plan_ = replace(plan_, steps=with_key(plan_.steps, key))
        progress(format_plan(plan_) + "\n")
        run_plan(
            plan_,
            where,
            key=key.stdin if key else None,
            domain=domain,
            backup_dir=backup_dir,
            command=f"luksvm grow {guest} {amount.option}",
            progress=progress,
        )
        if inside and plan_.inside is not None:
            run_inside(domain, plan_.inside, progress)
    return plan_


def grow_lv(
    root: str,
    vg_lv: str,
    device: str | None,
    amount: Amount,
    *,
    dry_run: bool,
    key_file: str | None,
    progress: Progress,
) -> GrowPlan:
    """grow --lv VG/LV: plan; unless dry_run, carry it out. What luksvm opened it closes again."""
    with shrink.session(vg_lv, device, root=root) as (where, _key):
        backup_dir = default_backup_dir(vg_lv)
        plan_ = plan_lv(read_lv_layout(where), amount, backup_dir=backup_dir)
        if dry_run:
            return plan_
        try:
            cfg: config.Config | None = config.load(root)
        except config.ConfigError:
            cfg = None
        volume = next(
            (v for v in (cfg.volumes if cfg else ()) if v.name == where.mapping_name), None
        )
        settings = cfg.settings if cfg else config.Settings()
        key = _key_if_needed(
            plan_,
            where,
            domain=None,
            volume=volume,
            key_file=key_file,
            root=root,
            settings=settings,
        )
        if key is not None:
            plan_ = replace(plan_, steps=with_key(plan_.steps, key))
        progress(format_plan(plan_) + "\n")
        command = f"luksvm grow --lv {vg_lv} {amount.option}"
        run_plan(
            plan_,
            where,
            key=key.stdin if key else None,
            domain=None,
            backup_dir=backup_dir,
            command=command,
            progress=progress,
        )
    return plan_


def _key_if_needed(
    plan_: GrowPlan,
    where: shrink.Where,
    *,
    domain: virt.Domain | None,
    volume: config.Volume | None,
    key_file: str | None,
    root: str,
    settings: config.Settings,
) -> keys.Key | None:
    """The key (keys.obtain_key: tokens, configured key, --key-file, terminal), before the first
    change, when a step that needs it will run (not when a rerun finds that step done); with none
    it refuses naming the step, and nothing has changed."""
    for step in plan_.steps:
        if step.needs_key and measure(step.check, where, domain) != step.check.expected:
            return keys.obtain_key(
                where.container,
                step=f"step {step.number} ({step.title})",
                volume=volume,
                settings=settings,
                root=root,
                key_file=key_file,
            )
    return None
