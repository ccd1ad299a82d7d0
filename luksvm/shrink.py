"""Shrinking LVM-on-LUKS: an exact planner (pure) and a step-by-step, checked executor.

Two stacks are handled, both read from the real devices:

    partition → LUKS → PV → VG → LVs      (a host's own disk, shrunk from a rescue system)
    host LV   → LUKS → PV → VG → LVs      (a guest's disk, guest shut off)

The admin names the LV and its new size. Every layer below is shrunk to the smallest aligned size
that holds the layer above, so the freed space appears at the bottom (partition end / host VG).
All arithmetic is on integers: bytes, 512-byte sectors (cryptsetup), logical sectors (the partition
table), filesystem blocks (resize2fs), extents (LVM). No tool ever gets a size without its unit.
"""

from __future__ import annotations

import contextlib
import datetime
import getpass
import json
import logging
import os
import re
import shlex
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

from luksvm import blockdev, config, cryptsetup, devmapper, extfs, lvm, sizes, stack
from luksvm.blockdev import Partition
from luksvm.cryptsetup import LuksHeader
from luksvm.errors import LuksvmError, UsageError
from luksvm.extfs import ExtFilesystem
from luksvm.lvm import PvSegment, VgLayout
from luksvm.run import run
from luksvm.sizes import SECTOR, human
from luksvm.stack import (
    BOOKKEEPING,
    PARTITION_ALIGNMENT,
    Check,
    Container,
    HostLv,
    Step,
    describe_blocks,
    describe_extents,
    describe_sectors,
    numbered,
)

log = logging.getLogger("luksvm.shrink")

DEFAULT_MARGIN_PERCENT = 25  # free space above resize2fs's minimum, as a share of the used blocks


# --- what the planner reads ----------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Everything the planner needs, as read from the devices (see probe())."""

    vg: VgLayout  # the VG inside the LUKS container
    lv: str  # the LV to shrink
    lv_path: str  # the block device holding its filesystem
    filesystem: ExtFilesystem
    mounted: tuple[str, ...]  # where the LV's filesystem is mounted (must be nowhere)
    pv_device: str  # the PV as LVM names it (the open LUKS mapping)
    end_mda: int  # bytes of LVM metadata area at the PV's end (0 when there is none)
    mapping_name: str  # the open LUKS mapping, as `cryptsetup resize` takes it
    mapping_size: int  # bytes
    luks: LuksHeader
    container: Container
    lvm_fs_option: bool  # lvreduce knows `--fs` (lvm2 >= 2.03.17)

    @property
    def container_size(self) -> int:
        return stack.container_size(self.container)


# --- what the planner returns --------------------------------------------------------------------


@dataclass(frozen=True)
class Move:
    """pvmove of `count` extents of `lv` (its LEs le_start…) from PE `source` to PE `target`."""

    lv: str
    le_start: int
    source: int
    target: int
    count: int


@dataclass(frozen=True)
class LayerRow:
    layer: str
    device: str
    before: str
    after: str


@dataclass(frozen=True)
class Targets:
    """The exact figures the plan works to (all bytes unless the name says otherwise)."""

    lv_size: int
    lv_extents: int
    fs_blocks: int
    fs_required_blocks: int  # resize2fs minimum + margin
    allocated_extents: int  # in the VG after the LV shrinks
    pv_min_size: int  # pe_start + extents + metadata area at the end
    crypt_min_sectors: int
    container_min_size: int  # data offset + crypt_min
    container_size: int  # aligned (partition) or whole extents (host LV)
    partition_end: int  # last LBA (inclusive), -1 for a host LV
    crypt_final_sectors: int  # the mapping filling the container again
    pv_final_extents: int
    freed: int  # bytes given back at the bottom


@dataclass(frozen=True)
class Plan:
    vg: str
    lv: str
    targets: Targets
    moves: tuple[Move, ...]
    steps: tuple[Step, ...]
    layers: tuple[LayerRow, ...]
    notes: tuple[str, ...] = field(default=())

    @property
    def nothing_to_do(self) -> bool:
        """Only backups and checks left: every layer already has its planned size."""
        return all(step.check.kind in BOOKKEEPING for step in self.steps)


class PlanRefused(LuksvmError):
    """The layout or the requested size cannot be shrunk safely; nothing was changed."""


# --- the planner (pure) --------------------------------------------------------------------------


def parse_target(text: str, extent_size: int) -> int:
    """Bytes of `--to`, which must be a whole number of extents (LVM would round it silently)."""
    size = sizes.parse_size(text, extent_size=extent_size)
    if size <= 0:
        raise UsageError(f"--to {text}: the size must be above zero")
    if size % extent_size:
        below = sizes.round_down(size, extent_size)
        above = below + extent_size
        raise UsageError(
            f"--to {text} = {size:,} B is not a whole number of the VG's "
            f"{human(extent_size)} extents; LVM would round it. Use "
            f"{below // extent_size}e ({below:,} B) or {above // extent_size}e ({above:,} B)"
        )
    return size


def required_blocks(fs: ExtFilesystem, margin_percent: int) -> int:
    """resize2fs's minimum plus a margin of `margin_percent` of the used blocks (rounded up)."""
    return fs.min_blocks + sizes.ceil_div(fs.used_blocks * margin_percent, 100)


def refuse_unsupported(layout: Layout) -> None:
    """Layouts the planner cannot shrink safely, each with the reason and what to do."""
    vg = layout.vg
    if len(vg.pvs) != 1:
        names = ", ".join(pv.name for pv in vg.pvs)
        raise PlanRefused(
            f"VG {vg.name} has {len(vg.pvs)} PVs ({names}); luksvm shrinks a VG on one "
            "LUKS container only"
        )
    if vg.pvs[0].name != layout.pv_device:
        raise PlanRefused(
            f"VG {vg.name} lies on {vg.pvs[0].name}, not on the LUKS mapping {layout.pv_device}"
        )
    for lv in vg.lvs:
        if lv.attr.startswith("p") or "pvmove" in lv.name:
            raise PlanRefused(
                f"VG {vg.name} has an interrupted pvmove ({lv.name}); finish it with `pvmove` "
                "(no arguments) or undo it with `pvmove --abort`, then plan again"
            )
        odd = [t for t in lv.segtypes if t != "linear"]
        if odd or lv.origin or lv.pool or lv.attr[:1] in {"s", "S", "o", "O", "t", "V", "r"}:
            kind = odd[0] if odd else (lv.layout or lv.attr)
            raise PlanRefused(
                f"LV {vg.name}/{lv.name} is {kind} (snapshot, thin, raid, mirror or cache); "
                "luksvm moves only linear LVs: remove or convert it first"
            )
    if layout.vg.lv(layout.lv) is None:
        raise PlanRefused(f"LV {vg.name}/{layout.lv} not found in VG {vg.name}")
    if layout.mounted:
        raise PlanRefused(
            f"{layout.lv_path} is mounted on {', '.join(layout.mounted)}; unmount it (boot a "
            "rescue system for a root filesystem) and run again"
        )
    if layout.filesystem.state not in {"clean", "not clean"}:
        raise PlanRefused(
            f"{layout.lv_path}: filesystem state is {layout.filesystem.state!r}; "
            f"run e2fsck -f {layout.lv_path} and plan again"
        )


def segments_after_reduce(
    segments: Sequence[PvSegment], lv: str, new_extents: int
) -> list[PvSegment]:
    """The PV's segments once `lv` keeps its first `new_extents` LEs (lvreduce cuts the end)."""
    result: list[PvSegment] = []
    for seg in segments:
        if seg.lv != lv or seg.le_start + seg.pe_count <= new_extents:
            result.append(seg)
        elif seg.le_start >= new_extents:
            result.append(PvSegment(seg.pe_start, seg.pe_count, "", 0))
        else:
            kept = new_extents - seg.le_start
            result.append(PvSegment(seg.pe_start, kept, lv, seg.le_start))
            result.append(PvSegment(seg.pe_start + kept, seg.pe_count - kept, "", 0))
    return sorted(result, key=lambda s: s.pe_start)


def pack_moves(segments: Sequence[PvSegment], new_end: int) -> list[Move]:
    """Moves that bring every allocated extent at or above PE `new_end` into the free extents below
    it, lowest free extent first. Needs as many free extents below as allocated ones above."""
    holes: list[list[int]] = []  # [first PE, count] of free runs below new_end
    for seg in segments:
        if not seg.lv and seg.pe_start < new_end:
            holes.append([seg.pe_start, min(seg.pe_end, new_end) - seg.pe_start])
    moves: list[Move] = []
    for seg in segments:
        if not seg.lv or seg.pe_end <= new_end:
            continue
        skip = max(0, new_end - seg.pe_start)  # the part below the new end stays
        source, le, left = seg.pe_start + skip, seg.le_start + skip, seg.pe_count - skip
        while left:
            if not holes:
                raise PlanRefused(
                    f"not enough free extents below PE {new_end} to move {seg.lv} into"
                )
            hole = holes[0]
            count = min(left, hole[1])
            moves.append(Move(seg.lv, le, source, hole[0], count))
            source, le, left = source + count, le + count, left - count
            hole[0] += count
            hole[1] -= count
            if not hole[1]:
                holes.pop(0)
    return moves


def _container_target(container: Container, minimum: int) -> tuple[int, int]:
    """(bytes, last LBA) of the smallest aligned container holding `minimum` bytes, never larger
    than it is now. For a host LV the last LBA is -1."""
    if isinstance(container, Partition):
        size, end = stack.partition_for(container, minimum)
        if end > container.end:
            return container.size_bytes, container.end
        return size, end
    return min(stack.host_lv_for(container, minimum), container.size), -1


def plan(
    layout: Layout,
    target: int,
    *,
    margin_percent: int = DEFAULT_MARGIN_PERCENT,
    backup_dir: str = "/var/lib/luksvm/shrink/NEW",
) -> Plan:
    """The exact plan to shrink layout.lv to `target` bytes and every layer below to fit."""
    refuse_unsupported(layout)
    vg, fs, luks = layout.vg, layout.filesystem, layout.luks
    ext = vg.extent_size
    pv = vg.pvs[0]
    lv = vg.lv(layout.lv)
    assert lv is not None  # refuse_unsupported checked it
    if target > lv.size:
        raise UsageError(
            f"--to {target:,} B is larger than {vg.name}/{lv.name} ({human(lv.size)}); "
            "luksvm shrink only shrinks"
        )
    lv_extents = target // ext
    fs_blocks = sizes.to_blocks(target, fs.block_size)
    need = required_blocks(fs, margin_percent)
    if fs_blocks < need and fs_blocks < fs.block_count:
        smallest = sizes.round_up(need * fs.block_size, ext)
        raise PlanRefused(
            f"{vg.name}/{lv.name} cannot shrink to {human(target)}: its filesystem needs "
            f"{need:,} blocks of {fs.block_size:,} B (resize2fs -P minimum {fs.min_blocks:,} + "
            f"{margin_percent}% of {fs.used_blocks:,} used blocks); the minimum is "
            f"{human(need * fs.block_size)}, in whole extents --to {smallest // ext}e "
            f"({smallest:,} B)"
        )

    after = segments_after_reduce(vg.segments, lv.name, lv_extents)
    allocated = sum(s.pe_count for s in after if s.lv)
    pv_min = stack.pv_size_for(pv.pe_start, allocated, ext, layout.end_mda)
    crypt_min = stack.mapping_size_for(pv_min, luks.sector_size)
    container_min = luks.data_offset + crypt_min
    container_size, partition_end = _container_target(layout.container, container_min)
    if luks.data_offset + layout.mapping_size > layout.container_size:
        raise PlanRefused(
            f"the LUKS mapping {layout.mapping_name} ({layout.mapping_size:,} B from offset "
            f"{luks.data_offset:,} B) reaches beyond its container {luks.device} "
            f"({layout.container_size:,} B): the container was shrunk before the mapping. Grow "
            "the container back to its old size (the LUKS header and LVM metadata backups "
            "name it) before anything else"
        )
    crypt_final = stack.mapping_fill(container_size, luks.data_offset, luks.sector_size)
    pv_final = stack.pv_fill(crypt_final, pv.pe_start, layout.end_mda, ext)
    shrink_container = container_size < layout.container_size
    # An interrupted run may have left the container shrunk and the mapping or PV not grown back.
    lower_changes = (
        shrink_container or layout.mapping_size != crypt_final or pv.size // ext != pv_final
    )
    moves = pack_moves(after, allocated) if shrink_container else []
    targets = Targets(
        lv_size=target,
        lv_extents=lv_extents,
        fs_blocks=fs_blocks,
        fs_required_blocks=need,
        allocated_extents=allocated,
        pv_min_size=pv_min,
        crypt_min_sectors=crypt_min // SECTOR,
        container_min_size=container_min,
        container_size=container_size,
        partition_end=partition_end,
        crypt_final_sectors=crypt_final // SECTOR,
        pv_final_extents=pv_final,
        freed=layout.container_size - container_size,
    )
    steps = _steps(
        layout,
        targets,
        moves,
        backup_dir=backup_dir,
        shrink_container=shrink_container,
        lower_changes=lower_changes,
    )
    return Plan(
        vg=vg.name,
        lv=lv.name,
        targets=targets,
        moves=tuple(moves),
        steps=steps,
        layers=_layers(layout, targets),
        notes=_notes(layout, targets, margin_percent),
    )


def _steps(
    layout: Layout,
    t: Targets,
    moves: Sequence[Move],
    *,
    backup_dir: str,
    shrink_container: bool,
    lower_changes: bool,
) -> tuple[Step, ...]:
    """Every step in order, from typed phase functions (each returns unnumbered steps)."""
    lv = layout.vg.lv(layout.lv)
    assert lv is not None  # refuse_unsupported checked it
    fs = layout.filesystem
    fs_changes = fs.block_count != t.fs_blocks
    lv_changes = fs_changes or lv.size != t.lv_size
    steps = _backup_steps(layout, backup_dir, host_vg_too=shrink_container)
    if lv_changes:
        steps.append(_fsck_step(layout, "before"))
    if fs_changes:
        steps += [_shrink_fs_step(layout, t), _fsck_step(layout, "after resize2fs")]
    if lv.size != t.lv_size:
        steps.append(_lvreduce_step(layout, t))
    steps += [_move_step(layout, t, move) for move in moves]
    if shrink_container:
        steps += _shrink_lower_steps(layout, t)
    if lower_changes:
        steps += _fill_lower_steps(layout, t)
    if lv_changes:
        steps += [_fill_fs_step(layout, t), _fsck_step(layout, "at the end")]
    return numbered(steps)


def _on_pv(layout: Layout) -> tuple[str, ...]:
    """LVM looks at the mapping alone (a guest's VG must not be looked for anywhere else)."""
    return ("--devices", layout.pv_device)


def _key_option(luks: LuksHeader) -> tuple[str, ...]:
    return ("--key-file=-",) if luks.version == 2 else ()  # LUKS2 resize asks for the key


def _backup_steps(layout: Layout, backup_dir: str, *, host_vg_too: bool) -> list[Step]:
    luks, vg = layout.luks, layout.vg
    header_file = f"{backup_dir}/luks-header-{luks.uuid}.img"
    vg_file = f"{backup_dir}/{vg.name}.vg"
    steps = [
        Step(
            0,
            "back up the LUKS header",
            ("cryptsetup", "luksHeaderBackup", luks.device, "--header-backup-file", header_file),
            # Not a size check: LUKS1 saves up to its last keyslot's end (4,040 sectors with a
            # 512-bit key), short of the payload offset; LUKS2 its metadata and keyslot area.
            Check(
                "header_backup", header_file, 1, f"{header_file} reads back as header {luks.uuid}"
            ),
            (f"header area: {human(luks.data_offset)}",),
            timeout=120,
        ),
        Step(
            0,
            f"back up the LVM metadata of VG {vg.name}",
            ("vgcfgbackup", *_on_pv(layout), "-f", vg_file, vg.name),
            Check("file", vg_file, 0, f"{vg_file} exists"),
            timeout=120,
        ),
    ]
    host = layout.container
    if host_vg_too and isinstance(host, HostLv):
        steps.append(host_vg_backup_step(host.vg, f"{backup_dir}/{host.vg}.vg"))
    return steps


def host_vg_backup_step(vg: str, path: str) -> Step:
    return Step(
        0,
        f"back up the LVM metadata of host VG {vg}",
        ("vgcfgbackup", "-f", path, vg),
        Check("file", path, 0, f"{path} exists"),
        timeout=120,
    )


def _fsck_step(layout: Layout, when: str) -> Step:
    return Step(
        0,
        f"check the filesystem {when}",
        ("e2fsck", "-f", "-p", layout.lv_path),
        Check("fsck", layout.lv_path, 0, "e2fsck exits 0 (clean, nothing changed)"),
        always=True,
    )


def _shrink_fs_step(layout: Layout, t: Targets) -> Step:
    fs = layout.filesystem
    return Step(
        0,
        f"shrink the filesystem to {human(t.fs_blocks * fs.block_size)}",
        ("resize2fs", layout.lv_path, str(t.fs_blocks)),
        Check("fs_blocks", layout.lv_path, t.fs_blocks, f"dumpe2fs: block count {t.fs_blocks:,}"),
        (
            f"before: {describe_blocks(fs.block_count, fs.block_size)}",
            f"after: {describe_blocks(t.fs_blocks, fs.block_size)} (resize2fs reads blocks)",
            f"required: {describe_blocks(t.fs_required_blocks, fs.block_size)}",
        ),
    )


def _lvreduce_step(layout: Layout, t: Targets) -> Step:
    ext = layout.vg.extent_size
    lv = layout.vg.lv(layout.lv)
    assert lv is not None
    name = f"{layout.vg.name}/{layout.lv}"
    fs_opt = ("--fs", "ignore") if layout.lvm_fs_option else ()
    return Step(
        0,
        f"shrink LV {name} to {human(t.lv_size)}",
        ("lvreduce", *_on_pv(layout), "--yes", *fs_opt, "-L", f"{t.lv_size}b", name),
        Check("lv_size", name, t.lv_size, f"lvs: {name} is {t.lv_size:,} B"),
        (
            f"before: {describe_extents(lv.size // ext, ext)}",
            f"after: {describe_extents(t.lv_extents, ext)} (-L {t.lv_size}b)",
        ),
    )


def _move_step(layout: Layout, t: Targets, move: Move) -> Step:
    ext = layout.vg.extent_size
    src = f"{layout.pv_device}:{move.source}-{move.source + move.count - 1}"
    dst = f"{layout.pv_device}:{move.target}-{move.target + move.count - 1}"
    return Step(
        0,
        f"move {move.count:,} extents of {move.lv} (LE {move.le_start:,}…) below PE "
        f"{t.allocated_extents:,}",
        ("pvmove", *_on_pv(layout), "--alloc", "anywhere", "-n", move.lv, src, dst),
        Check(
            "segment",
            layout.pv_device,
            move.target,
            f"pvs --segments: PE {move.target:,}-{move.target + move.count - 1:,} hold "
            f"{move.lv} LE {move.le_start:,}-{move.le_start + move.count - 1:,}",
            (move.lv, str(move.le_start), str(move.count)),
        ),
        (f"{describe_extents(move.count, ext)}: PE {move.source:,} → PE {move.target:,}",),
    )


def _shrink_lower_steps(layout: Layout, t: Targets) -> list[Step]:
    """PV to its allocated extents, the mapping to the PV, the container to the mapping."""
    luks, pv, ext = layout.luks, layout.vg.pvs[0], layout.vg.extent_size
    steps: list[Step] = []
    pe_now = pv.size // ext
    if pe_now != t.allocated_extents:
        steps.append(
            Step(
                0,
                f"shrink PV {layout.pv_device} to {t.allocated_extents:,} extents",
                (
                    "pvresize",
                    *_on_pv(layout),
                    "--yes",
                    "--setphysicalvolumesize",
                    f"{t.pv_min_size}b",
                    layout.pv_device,
                ),
                Check(
                    "pv_extents",
                    layout.pv_device,
                    t.allocated_extents,
                    f"pvs: {t.allocated_extents:,} extents",
                ),
                (
                    f"before: {describe_extents(pe_now, ext)}",
                    f"after: {t.pv_min_size:,} B = pe_start {pv.pe_start:,} B + "
                    f"{describe_extents(t.allocated_extents, ext)} + end metadata area "
                    f"{layout.end_mda:,} B",
                ),
            )
        )
    steps.append(
        Step(
            0,
            f"shrink the LUKS mapping {layout.mapping_name} to its PV",
            (
                "cryptsetup",
                "resize",
                *_key_option(luks),
                "--size",
                str(t.crypt_min_sectors),
                layout.mapping_name,
            ),
            Check(
                "mapping_size",
                layout.mapping_name,
                t.crypt_min_sectors,
                f"mapping is {t.crypt_min_sectors:,} sectors",
            ),
            (
                f"before: {describe_sectors(layout.mapping_size // SECTOR)}",
                f"after: {describe_sectors(t.crypt_min_sectors)} (--size counts 512-byte "
                f"sectors; a multiple of the {luks.sector_size:,} B encryption sector)",
            ),
            needs_key=luks.version == 2,
        )
    )
    container = layout.container
    if isinstance(container, Partition):
        steps += partition_steps(container, t.container_size, t.partition_end,
                                 f"needs {t.container_min_size:,} B", verb="shrink")  # fmt: skip
    else:
        steps.append(_host_lv_reduce_step(layout, container, t))
    return steps


def partition_steps(
    part: Partition, new_bytes: int, new_end: int, why: str, *, verb: str
) -> list[Step]:
    """Rewrite the partition's end in its table (sfdisk, sectors), then tell the kernel through
    BLKPG (partx --update): that works on a partition in use, which a re-read does not."""
    lba = part.sector_size
    new_size = new_bytes // lba
    return [
        Step(
            0,
            f"{verb} partition {part.number} of {part.disk} to end at sector {new_end:,}",
            (
                "sfdisk",
                "--no-reread",
                "--no-tell-kernel",
                "--wipe",
                "never",
                "--wipe-partitions",
                "never",
                "-N",
                str(part.number),
                part.disk,
            ),
            Check(
                "partition_size",
                part.path,
                new_size,
                f"sfdisk --json: partition {part.number} is {new_size:,} sectors "
                f"from {part.start:,}",
            ),
            (
                f"before: sectors {part.start:,}-{part.end:,} "
                f"({part.size:,} × {lba} B = {human(part.size_bytes)})",
                f"after: sectors {part.start:,}-{new_end:,} "
                f"({new_size:,} × {lba} B = {human(new_bytes)}); parted `unit s` end "
                f"{new_end}; {why}, end aligned to {human(PARTITION_ALIGNMENT)}",
            ),
            stdin=f"{part.start},{new_size}\n",
        ),
        Step(
            0,
            f"tell the kernel the new size of {part.path}",
            ("partx", "--update", "--nr", str(part.number), part.disk),
            Check(
                "kernel_size",
                part.path,
                new_bytes,
                f"the kernel sees {part.path} as {new_bytes:,} B",
            ),
            timeout=120,
        ),
    ]


def _host_lv_reduce_step(layout: Layout, host: HostLv, t: Targets) -> Step:
    name = f"{host.vg}/{host.lv}"
    fs_opt = ("--fs", "ignore") if layout.lvm_fs_option else ()
    ext = host.extent_size
    return Step(
        0,
        f"shrink host LV {name} to {human(t.container_size)}",
        ("lvreduce", "--yes", *fs_opt, "-L", f"{t.container_size}b", name),
        Check("lv_size", name, t.container_size, f"lvs: {name} is {t.container_size:,} B"),
        (
            f"before: {describe_extents(host.size // ext, ext)}",
            f"after: {describe_extents(t.container_size // ext, ext)}"
            f" (-L {t.container_size}b); needs {t.container_min_size:,} B",
        ),
    )


def _fill_lower_steps(layout: Layout, t: Targets) -> list[Step]:
    """The mapping grows back to fill its container, the PV to fill the mapping."""
    luks, ext = layout.luks, layout.vg.extent_size
    rounded = (t.container_size - luks.data_offset) % luks.sector_size
    return [
        mapping_resize_step(
            layout.mapping_name,
            luks,
            t.crypt_final_sectors,
            f"grow the LUKS mapping {layout.mapping_name} to fill its container",
            f"after: {describe_sectors(t.crypt_final_sectors)} = container "
            f"{t.container_size:,} B - data offset {luks.data_offset:,} B"
            + (f", rounded down to {luks.sector_size:,} B" if rounded else ""),
        ),
        Step(
            0,
            f"grow PV {layout.pv_device} to fill the mapping",
            ("pvresize", *_on_pv(layout), "--yes", layout.pv_device),
            Check(
                "pv_extents",
                layout.pv_device,
                t.pv_final_extents,
                f"pvs: {t.pv_final_extents:,} extents",
            ),
            (f"after: {describe_extents(t.pv_final_extents, ext)}",),
        ),
    ]


def mapping_resize_step(
    mapping_name: str, luks: LuksHeader, sectors: int, title: str, why: str
) -> Step:
    """cryptsetup resize of an open mapping to exactly `sectors` 512-byte sectors."""
    return Step(
        0,
        title,
        ("cryptsetup", "resize", *_key_option(luks), "--size", str(sectors), mapping_name),
        Check("mapping_size", mapping_name, sectors, f"mapping is {sectors:,} sectors"),
        (why,),
        needs_key=luks.version == 2,
    )


def _fill_fs_step(layout: Layout, t: Targets) -> Step:
    fs = layout.filesystem
    blocks = t.lv_size // fs.block_size
    return Step(
        0,
        "grow the filesystem to fill the LV exactly",
        ("resize2fs", layout.lv_path),
        Check("fs_blocks", layout.lv_path, blocks, f"dumpe2fs: block count {blocks:,}"),
        (f"after: {describe_blocks(blocks, fs.block_size)}",),
        always=True,
    )


def _layers(layout: Layout, t: Targets) -> tuple[LayerRow, ...]:
    vg, fs, luks, pv = layout.vg, layout.filesystem, layout.luks, layout.vg.pvs[0]
    ext = vg.extent_size
    lv = vg.lv(layout.lv)
    assert lv is not None
    final_blocks = t.lv_size // fs.block_size
    rows = [
        LayerRow(
            f"filesystem ({fs.fs_type})",
            layout.lv_path,
            describe_blocks(fs.block_count, fs.block_size),
            describe_blocks(final_blocks, fs.block_size),
        ),
        LayerRow(
            "LV",
            f"{vg.name}/{lv.name}",
            describe_extents(lv.size // ext, ext),
            describe_extents(t.lv_extents, ext),
        ),
        LayerRow(
            "PV",
            layout.pv_device,
            describe_extents(pv.size // ext, ext),
            describe_extents(t.pv_final_extents, ext),
        ),
        LayerRow(
            f"LUKS{luks.version} mapping",
            layout.mapping_name,
            describe_sectors(layout.mapping_size // SECTOR),
            describe_sectors(t.crypt_final_sectors),
        ),
    ]
    container = layout.container
    if isinstance(container, Partition):
        rows.append(
            LayerRow(
                "partition",
                container.path,
                f"sectors {container.start:,}-{container.end:,} = {human(container.size_bytes)}",
                f"sectors {container.start:,}-{t.partition_end:,} = {human(t.container_size)}",
            )
        )
    else:
        rows.append(
            LayerRow(
                "host LV",
                f"{container.vg}/{container.lv}",
                describe_extents(container.size // container.extent_size, container.extent_size),
                describe_extents(t.container_size // container.extent_size, container.extent_size),
            )
        )
    return tuple(rows)


def _notes(layout: Layout, t: Targets, margin_percent: int) -> tuple[str, ...]:
    fs = layout.filesystem
    notes = [
        f"filesystem minimum: resize2fs -P {fs.min_blocks:,} blocks + {margin_percent}% of "
        f"{fs.used_blocks:,} used blocks = {describe_blocks(t.fs_required_blocks, fs.block_size)}",
        f"LUKS{layout.luks.version} data offset {layout.luks.data_offset:,} B "
        f"({layout.luks.data_offset // SECTOR:,} sectors), encryption sector "
        f"{layout.luks.sector_size:,} B",
        f"freed at the bottom: {human(t.freed)}",
    ]
    if t.freed == 0:
        notes.append("the container keeps its size: the freed extents stay free in the VG")
    return tuple(notes)


# --- showing a plan ------------------------------------------------------------------------------


def describe(plan_: Plan) -> dict[str, object]:
    """The plan as JSON-ready data (`luksvm shrink plan --json`)."""
    t = plan_.targets
    return {
        "vg": plan_.vg,
        "lv": plan_.lv,
        "nothing_to_do": plan_.nothing_to_do,
        "targets": {name: getattr(t, name) for name in t.__dataclass_fields__},
        "moves": [
            {
                "lv": m.lv,
                "le_start": m.le_start,
                "source_pe": m.source,
                "target_pe": m.target,
                "extents": m.count,
            }
            for m in plan_.moves
        ],
        "layers": [
            {"layer": r.layer, "device": r.device, "before": r.before, "after": r.after}
            for r in plan_.layers
        ],
        "steps": [describe_step(s) for s in plan_.steps],
        "notes": list(plan_.notes),
    }


def describe_step(s: Step) -> dict[str, object]:
    """One step as JSON-ready data; a libvirt call also names its guest, disk and bytes."""
    shown: dict[str, object] = {
        "number": s.number,
        "title": s.title,
        "argv": list(s.argv),
        "command": shlex.join(s.argv),
        "stdin": "LUKS key" if s.needs_key else s.stdin,
        "always": s.always,
        "sizes": list(s.sizes),
        "check": {
            "kind": s.check.kind,
            "subject": s.check.subject,
            "expected": s.check.expected,
            "args": list(s.check.args),
            "text": s.check.text,
        },
    }
    if s.call is not None:
        shown["libvirt"] = {"guest": s.call[0], "disk": s.call[1], "bytes": s.call[2]}
    return shown


def command_line(step: Step) -> str:
    line = shlex.join(step.argv)
    if step.action == "libvirt-block-resize":
        line += "   # through libvirt-python, with VIR_DOMAIN_BLOCK_RESIZE_BYTES"
    elif step.needs_key:
        line += "   # key on stdin"
    elif step.stdin:
        line = f"echo {shlex.quote(step.stdin.strip())} | {line}"
    return line


def format_plan(plan_: Plan) -> str:
    """The plan as an admin reads it: layers before/after, then numbered steps with checks."""
    lines = [f"Shrink {plan_.vg}/{plan_.lv}", ""]
    header = ("LAYER", "DEVICE", "BEFORE", "AFTER")
    rows = [header] + [(r.layer, r.device, r.before, r.after) for r in plan_.layers]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.append("")
    lines += [f"note: {n}" for n in plan_.notes]
    lines.append("")
    if plan_.nothing_to_do:
        lines.append("Nothing to do: every layer already has its planned size.")
        return "\n".join(lines)
    for step in plan_.steps:
        lines.append(f"{step.number:>2}. {step.title}")
        lines.append(f"      $ {command_line(step)}")
        lines += [f"      {s}" for s in step.sizes]
        lines.append(f"      check: {step.check.text}")
    return "\n".join(lines)


# --- reading the devices (impure) ----------------------------------------------------------------


@dataclass(frozen=True)
class Where:
    """Where each layer is: resolved from the command line (locate()) or given by a test."""

    vg: str
    lv: str
    container: str  # the LUKS container: a partition or a host LV
    mapping: str  # the open LUKS mapping (the PV), as LVM names it
    mapping_name: str  # as `cryptsetup resize` takes it
    lv_path: str  # the block device of the LV's filesystem
    host_lv: tuple[str, str] | None = None  # (VG, LV) when the container is a host LV
    partition: tuple[str, int] | None = None  # (disk, number) when it is a partition


def read_host_lv(path: str, vg: str, lv: str) -> HostLv:
    rows = lvm.report("lvs", ["lv_size", "vg_extent_size"], [f"{vg}/{lv}"])
    if not rows:
        raise LuksvmError(f"host LV {vg}/{lv} not found")
    return HostLv(path, vg, lv, int(rows[0]["lv_size"]), int(rows[0]["vg_extent_size"]))


def host_lv_of(device: str) -> tuple[str, str] | None:
    """(VG, LV) when `device` is an LV of the host, else None."""
    found = blockdev.describe(device)
    if not found.is_lvm:
        return None
    for row in lvm.report("lvs", ["vg_name", "lv_name", "lv_dm_path"]):
        if row["lv_dm_path"] == f"/dev/mapper/{found.dm_name}":
            return row["vg_name"], row["lv_name"]
    return None


def read_layout(where: Where) -> Layout:
    """Read every layer from the devices; unsupported content is refused and named."""
    vg = lvm.vg_layout(where.vg, [where.mapping])
    luks = cryptsetup.read_header(where.container)
    if where.host_lv is not None:
        container: Container = read_host_lv(where.container, *where.host_lv)
    elif where.partition is not None:
        container = blockdev.read_partition(where.container, *where.partition)
    else:
        raise PlanRefused(
            f"{where.container} is neither a partition nor an LV of the host; luksvm "
            "shrinks LUKS on a partition or on a host LV"
        )
    end_mda = lvm.end_metadata_area_size(where.mapping) if max(vg.mda_counts) > 1 else 0
    return Layout(
        vg=vg,
        lv=where.lv,
        lv_path=where.lv_path,
        filesystem=extfs.read(where.lv_path),
        mounted=tuple(blockdev.mountpoints(where.lv_path)),
        pv_device=where.mapping,
        end_mda=end_mda,
        mapping_name=where.mapping_name,
        mapping_size=blockdev.describe(where.mapping).size,
        luks=luks,
        container=container,
        lvm_fs_option=lvm.supports_fs_option(lvm.version()),
    )


# --- measuring what a step did -------------------------------------------------------------------


def measure(check: Check, where: Where) -> int:
    """The value on the devices that `check.expected` is compared with."""
    kind, subject = check.kind, check.subject
    if kind == "file":
        if not os.path.exists(subject):
            return -1
        return os.path.getsize(subject) if check.expected else 0
    if kind == "header_backup":
        return _header_backup_verifies(subject, where.container)
    if kind == "fs_blocks":
        header = run(["dumpe2fs", "-h", subject], timeout=extfs.TIMEOUT).stdout
        match = re.search(r"^Block count:\s*(\d+)", header, re.MULTILINE)
        return int(match.group(1)) if match else -1
    if kind == "lv_size":
        devices = [] if where.host_lv and subject == "/".join(where.host_lv) else [where.mapping]
        args = [a for d in devices for a in ("--devices", d)]
        rows = lvm.report("lvs", ["lv_size"], [*args, subject])
        return int(rows[0]["lv_size"]) if rows else -1
    if kind == "pv_extents":
        rows = lvm.report("pvs", ["pv_pe_count"], ["--devices", subject, subject])
        return int(rows[0]["pv_pe_count"]) if rows else -1
    if kind == "segment":
        lv, le_start, count = check.args[0], int(check.args[1]), int(check.args[2])
        layout = lvm.vg_layout(where.vg, [where.mapping])
        for i in range(count):
            pe = check.expected + i
            seg = next((s for s in layout.segments if s.pe_start <= pe < s.pe_end), None)
            if seg is None or seg.lv != lv or seg.le_start + pe - seg.pe_start != le_start + i:
                return -1
        return check.expected
    if kind == "mapping_size":
        return blockdev.describe(f"/dev/mapper/{subject}").size // SECTOR
    if kind == "partition_size":
        if where.partition is None:
            return -1
        return blockdev.read_partition(subject, *where.partition).size
    if kind == "kernel_size":
        return blockdev.describe(subject).size
    raise ValueError(f"unknown check {kind}")


def _header_backup_verifies(path: str, container: str) -> int:
    """1 when `path` reads back as `container`'s LUKS header, 0 when it differs, -1 when absent."""
    from luksvm import backup

    if not os.path.exists(path):
        return -1
    try:
        copy = cryptsetup.read_header(path)
    except LuksvmError:
        return 0
    return 0 if backup.header_differences(cryptsetup.read_header(container), copy) else 1


# --- carrying a plan out -------------------------------------------------------------------------


class StepFailed(LuksvmError):
    """A step failed or its check found something else than planned; later steps did not run."""


def execute(
    plan_: Plan,
    where: Where,
    *,
    key: bytes | None = None,
    journal_path: str | None = None,
    progress: Callable[[str], None] = lambda line: None,
) -> None:
    """Run the plan's steps in order. A step whose check already holds is skipped (resume);
    after every step its check must hold, or the run stops there."""
    run_steps(
        plan_.steps,
        lambda check: measure(check, where),
        key=key,
        journal_path=journal_path,
        progress=progress,
        command="luksvm shrink run",
        replan="luksvm shrink plan",
    )


# A step that is not a process (a libvirt call): it runs, or raises LuksvmError.
CallStep = Callable[[Step], None]


def run_steps(
    steps: Sequence[Step],
    measure_: Callable[[Check], int],
    *,
    key: bytes | None = None,
    journal_path: str | None = None,
    progress: Callable[[str], None] = lambda line: None,
    command: str,
    replan: str,
    call: CallStep | None = None,
) -> None:
    """The executor shrink and grow share: each step whose check does not hold yet runs, then its
    check must hold, or the run stops there. `command` is what the admin reruns to resume, `replan`
    what shows the plan from the devices as they are."""
    for step in steps:
        before = None if step.check.kind == "fsck" else measure_(step.check)
        if not step.always and before == step.check.expected:
            _record(journal_path, step, "already done", before, before)
            progress(f"{step.number:>2}. {step.title}: already done ({step.check.text})")
            continue
        progress(f"{step.number:>2}. {step.title}\n      $ {command_line(step)}")
        if step.needs_key and key is None:
            raise StepFailed(f"step {step.number} needs the LUKS key, and none was given")
        if step.action != "process":
            if call is None:
                raise StepFailed(f"step {step.number} ({step.title}) needs libvirt, not given")
            try:
                call(step)
            except LuksvmError as error:
                _record(journal_path, step, "failed", before, None)
                raise StepFailed(
                    f"step {step.number} ({step.title}) failed: {error}\nnothing after it ran; "
                    f"fix the cause and run `{command}` again with the same arguments to resume"
                ) from None
            after = measure_(step.check)
        else:
            stdin = key if step.needs_key else (step.stdin.encode() if step.stdin else None)
            result = run(
                step.argv, timeout=step.timeout, stdin=stdin, secret=step.needs_key, check=False
            )
            if step.check.kind == "fsck":
                after = result.returncode
            elif result.returncode != 0:
                tail = "\n".join(result.stderr.strip().splitlines()[-5:])
                _record(journal_path, step, "failed", before, None, exit_status=result.returncode)
                raise StepFailed(
                    f"step {step.number} ({step.title}) failed with exit status "
                    f"{result.returncode}: {tail}\nnothing after it ran; fix the cause and run "
                    f"`{command}` again with the same arguments to resume"
                )
            else:
                after = measure_(step.check)
        _record(journal_path, step, "done" if after == step.check.expected else "MISMATCH",
                before, after)  # fmt: skip
        if after != step.check.expected:
            what = (
                f"e2fsck exited {after} (1: it corrected errors; 4 and up: errors left)"
                if step.check.kind == "fsck"
                else f"expected {step.check.expected:,}, found {after:,}"
            )
            raise StepFailed(
                f"step {step.number} ({step.title}): check failed: {step.check.text}: {what}; "
                f"stopped before the next step. Look at the devices, then run `{replan}` "
                "again: it plans from the state they are in now"
            )
        progress(f"      ok: {step.check.text}")


# What became of a step, as steps.jsonl and the journal record it.
Outcome = Literal["already done", "done", "MISMATCH", "failed"]


def _record(
    path: str | None,
    step: Step,
    outcome: Outcome,
    before: int | None,
    after: int | None,
    *,
    exit_status: int | None = None,
) -> None:
    entry = {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "step": step.number,
        "title": step.title,
        "command": shlex.join(step.argv),
        "check": step.check.text,
        "expected": step.check.expected,
        "before": before,
        "after": after,
        "outcome": outcome,
    }
    if exit_status is not None:
        entry["exit_status"] = exit_status
    log.info("step %d %s: %s (before %s, after %s)", step.number, step.title, outcome,
             before, after)  # fmt: skip
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")


# --- the commands: find the layers, open what is closed, close it again --------------------------


def check_size_syntax(text: str) -> None:
    """Refuse an ambiguous or unit-less --to before anything is opened (extents come later)."""
    if not text.strip().endswith("e"):
        sizes.parse_size(text)


def split_lv(text: str) -> tuple[str, str]:
    vg, _, lv = text.partition("/")
    if not vg or not lv or "/" in lv:
        raise UsageError(f"--lv {text}: expected VG/LV, e.g. vgmail/root")
    return vg, lv


def _configured_volume(root: str, container: str, mapping_name: str) -> config.Volume | None:
    try:
        cfg = config.load(root)
    except config.ConfigError as error:
        log.warning("configuration not usable, not looking for the volume in it: %s", error)
        return None
    real = os.path.realpath(container)
    for volume in cfg.volumes:
        if volume.name == mapping_name or os.path.realpath(volume.device) == real:
            return volume
    return None


def read_key(volume: config.Volume | None, container: str) -> bytes:
    """The key for `container`: the configured volume's keyfile or keyring entry, else a prompt."""
    if volume is not None and volume.key.kind == "file":
        with open(volume.key.path, "rb") as f:
            key = f.read()
    elif volume is not None and volume.key.kind == "keyring":
        import keyring

        secret = keyring.get_password(volume.key.service, volume.key.user)
        if secret is None:
            raise LuksvmError(f"keyring has no secret for {volume.key} (volume {volume.name})")
        key = secret.encode()
    else:
        if not sys.stdin.isatty():
            raise LuksvmError(
                f"{container} needs its passphrase and there is no terminal to ask on; "
                "run luksvm in a terminal (ssh -t)"
            )
        key = getpass.getpass(f"Enter passphrase for {container}: ").encode()
    if not cryptsetup.test_passphrase(container, key):
        raise LuksvmError(f"the key for {container} opens none of its keyslots")
    return key


@contextlib.contextmanager
def session(
    vg_lv: str, device: str | None, *, root: str = "/", need_key: bool = False
) -> Iterator[tuple[Where, bytes | None]]:
    """Find every layer of VG/LV; open the LUKS container and activate the VG (on that device
    alone) if they are not; yield; then close and deactivate exactly what was opened here."""
    vg, lv = split_lv(vg_lv)
    container, mapping_name = _find_container(vg, device)
    volume = _configured_volume(root, container, mapping_name)
    opened = activated = False
    key: bytes | None = None
    was_active: list[str] = []
    try:
        luks = cryptsetup.read_header(container)
        if not mapping_name or (need_key and luks.version == 2):
            key = read_key(volume, container)
        if not mapping_name:
            mapping_name = volume.name if volume else f"luksvm-shrink-{os.path.basename(container)}"
            log.info("opening %s as %s", container, mapping_name)
            cryptsetup.open_with_key(container, mapping_name, key or b"")
            opened = True
            blockdev.settle()
        mapping = f"/dev/mapper/{mapping_name}"
        if not opened:
            _refuse_if_held(mapping_name, mapping, volume)
        layout = lvm.vg_layout(vg, [mapping])
        target = layout.lv(lv)
        if target is None:
            raise PlanRefused(f"LV {vg}/{lv} not found on {mapping}")
        was_active = [x.name for x in layout.lvs if x.active]
        if not target.active:
            run(["vgchange", "--devices", mapping, "-ay", vg], timeout=lvm.TIMEOUT)
            activated = True
            blockdev.settle()
        where = Where(
            vg=vg,
            lv=lv,
            container=container,
            mapping=mapping,
            mapping_name=mapping_name,
            lv_path=target.dm_path,
            host_lv=host_lv_of(container),
            partition=blockdev.partition_of(container),
        )
        yield where, key
    finally:
        if activated:
            _deactivate(vg, f"/dev/mapper/{mapping_name}", was_active)
        if opened:
            blockdev.settle()
            log.info("closing %s again", mapping_name)
            cryptsetup.close_mapping(mapping_name)


def _find_container(vg: str, device: str | None) -> tuple[str, str]:
    """(LUKS container, name of its open mapping or "")."""
    if device is None:
        pvs = [pv.name for pv in lvm.physical_volumes() if pv.vg_name == vg]
        if not pvs:
            raise LuksvmError(
                f"VG {vg} is not visible to the host's LVM; name its LUKS container with "
                "--device (a guest's VG inside a host LV is found that way)"
            )
        if len(pvs) > 1:
            raise PlanRefused(f"VG {vg} has {len(pvs)} PVs ({', '.join(pvs)}); luksvm shrinks "
                              "a VG on one LUKS container only")  # fmt: skip
        device = pvs[0]
    found = blockdev.describe(device)
    if found.is_crypt:
        if len(found.slaves) != 1:
            raise LuksvmError(f"{device}: a LUKS mapping on {len(found.slaves)} devices")
        return blockdev.dev_path(found.slaves[0]), found.dm_name
    if not cryptsetup.is_luks(device):
        raise LuksvmError(f"{device} is neither a LUKS container nor an open LUKS mapping")
    return device, blockdev.crypt_mapping_on(device)


def _refuse_if_held(name: str, mapping: str, volume: config.Volume | None) -> None:
    """An open mapping held by more than the LVs stacked on it is in use by a process: a guest."""
    device = devmapper.by_name(devmapper.devices()).get(name)
    if device is not None and device.open_count > len(device.holders):
        users = devmapper.users([device.kernel]).get(device.kernel, ())
        guests = (
            f" (guests using it: {', '.join(volume.guests)})" if volume and volume.guests else ""
        )
        held = f" ({'; '.join(map(str, users))})" if users else ""
        raise PlanRefused(
            f"{mapping} is held open by a process{held}{guests}; shut the guest off first "
            "(luksvm stop GUEST) and run again"
        )


def _deactivate(vg: str, mapping: str, was_active: Sequence[str]) -> None:
    if not was_active:
        run(["vgchange", "--devices", mapping, "-an", vg], timeout=lvm.TIMEOUT)
        return
    for lv in lvm.vg_layout(vg, [mapping]).lvs:
        if lv.active and lv.name not in was_active:
            run(["lvchange", "--devices", mapping, "-an", f"{vg}/{lv.name}"], timeout=lvm.TIMEOUT)


def default_backup_dir(vg: str, lv: str) -> str:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"/var/lib/luksvm/shrink/{vg}-{lv}-{stamp}"


def plan_for(where: Where, to: str, *, margin_percent: int, backup_dir: str) -> tuple[Layout, Plan]:
    layout = read_layout(where)
    target = parse_target(to, layout.vg.extent_size)
    return layout, plan(layout, target, margin_percent=margin_percent, backup_dir=backup_dir)


def run_plan(
    where: Where,
    plan_: Plan,
    key: bytes | None,
    backup_dir: str,
    progress: Callable[[str], None],
) -> None:
    """Carry the plan out, keeping the plan and a log of every step in backup_dir."""
    os.makedirs(backup_dir, mode=0o700, exist_ok=True)
    with open(f"{backup_dir}/plan.json", "w", encoding="utf-8") as f:
        json.dump(describe(plan_), f, indent=2)
    progress(f"backups, plan and step log: {backup_dir} (copy it off a rescue system)")
    execute(plan_, where, key=key, journal_path=f"{backup_dir}/steps.jsonl", progress=progress)
