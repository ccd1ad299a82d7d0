"""The shrink planner on captured real reports, the seed figures worked out by hand, and properties
that must hold for every layout."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from luksvm import blockdev, cryptsetup, extfs, lvm, shrink
from luksvm.errors import UsageError
from luksvm.lvm import PhysicalVolume, PvSegment, VgLayout
from luksvm.shrink import HostLv, Layout, PlanRefused

DATA = Path(__file__).parent / "data"
GiB = 1024**3
MiB = 1024**2


@functools.cache
def seed_layout() -> Layout:
    """The seed host, from reports captured on real tools (tests/unit/data/capture-seed.sh)."""
    vg = lvm.parse_vg_layout(
        "vgseed",
        lvm.parse_report((DATA / "seed-pvs.json").read_text()),
        lvm.parse_report((DATA / "seed-lvs.json").read_text()),
    )
    luks = cryptsetup.parse_luks1_dump("/dev/sda2", (DATA / "seed-luksdump.txt").read_text())
    fs = extfs.parse(
        "/dev/mapper/vgseed-lvroot",
        "ext4",
        (DATA / "seed-dumpe2fs.txt").read_text(),
        (DATA / "seed-resize2fs-P.txt").read_text(),
    )
    part = blockdev.parse_partition(
        "/dev/sda2", "/dev/sda", 2, json.loads((DATA / "seed-sfdisk.json").read_text())
    )
    return Layout(
        vg=vg,
        lv="lvroot",
        lv_path="/dev/mapper/vgseed-lvroot",
        filesystem=fs,
        mounted=(),
        pv_device="/dev/mapper/cr_seed",
        end_mda=0,
        mapping_name="cr_seed",
        mapping_size=218_038_271 * 512,
        luks=luks,
        container=part,
        lvm_fs_option=False,
    )


def test_captured_reports_read_as_the_seed_host() -> None:
    layout = seed_layout()
    assert layout.luks.data_offset == 65_537 * 512
    assert layout.container_size == 104 * GiB
    assert layout.vg.extent_size == 4 * MiB
    assert layout.vg.pe_counts == (26_615,)
    assert [(s.pe_start, s.pe_count, s.lv) for s in layout.vg.segments] == [
        (0, 20_480, "lvroot"),
        (20_480, 5_120, ""),
        (25_600, 512, "lvswap"),
        (26_112, 503, ""),
    ]
    assert layout.filesystem.block_count == 20_971_520
    assert layout.filesystem.min_blocks == 245_751


def test_seed_plan_matches_the_figures_worked_out_by_hand() -> None:
    # By hand: 60 GiB = 15,360 extents of 4 MiB = 15,728,640 blocks of 4 KiB. lvswap (512
    # extents at PE 25,600) moves to PE 15,360, so 15,872 extents stay allocated.
    # PV = 1 MiB pe_start + 15,872 × 4 MiB = 66,573,041,664 B = 130,025,472 sectors.
    # Partition needs 65,537 + 130,025,472 = 130,091,009 sectors from sector 2,099,200, so it
    # would end at 132,190,208; aligned to 2,048 sectors (1 MiB) the end is 132,192,255.
    # The mapping then fills 130,093,056 - 65,537 = 130,027,519 sectors, which still holds only
    # 15,872 whole extents. Freed: (220,203,007 - 132,192,255) × 512 B = 45,061,505,024 B.
    p = shrink.plan(seed_layout(), shrink.parse_target("60GiB", 4 * MiB), backup_dir="/b")
    t = p.targets
    assert (t.lv_size, t.lv_extents, t.fs_blocks) == (64_424_509_440, 15_360, 15_728_640)
    assert (t.allocated_extents, t.pv_min_size) == (15_872, 66_573_041_664)
    assert t.crypt_min_sectors == 130_025_472
    assert t.container_min_size == 130_091_009 * 512
    assert (t.partition_end, t.container_size) == (132_192_255, 130_093_056 * 512)
    assert (t.crypt_final_sectors, t.pv_final_extents) == (130_027_519, 15_872)
    assert t.freed == 45_061_505_024
    assert p.moves == (shrink.Move("lvswap", 0, 25_600, 15_360, 512),)
    assert [list(s.argv) for s in p.steps] == [
        ["cryptsetup", "luksHeaderBackup", "/dev/sda2", "--header-backup-file",
         "/b/luks-header-13aca1cc-6826-459c-ab7c-23d1e185ac5d.img"],
        ["vgcfgbackup", "--devices", "/dev/mapper/cr_seed", "-f", "/b/vgseed.vg", "vgseed"],
        ["e2fsck", "-f", "-p", "/dev/mapper/vgseed-lvroot"],
        ["resize2fs", "/dev/mapper/vgseed-lvroot", "15728640"],
        ["e2fsck", "-f", "-p", "/dev/mapper/vgseed-lvroot"],
        ["lvreduce", "--devices", "/dev/mapper/cr_seed", "--yes", "-L", "64424509440b",
         "vgseed/lvroot"],
        ["pvmove", "--devices", "/dev/mapper/cr_seed", "--alloc", "anywhere", "-n", "lvswap",
         "/dev/mapper/cr_seed:25600-26111", "/dev/mapper/cr_seed:15360-15871"],
        ["pvresize", "--devices", "/dev/mapper/cr_seed", "--yes", "--setphysicalvolumesize",
         "66573041664b", "/dev/mapper/cr_seed"],
        ["cryptsetup", "resize", "--size", "130025472", "cr_seed"],
        ["sfdisk", "--no-reread", "--no-tell-kernel", "--wipe", "never", "--wipe-partitions",
         "never", "-N", "2", "/dev/sda"],
        ["partx", "--update", "--nr", "2", "/dev/sda"],
        ["cryptsetup", "resize", "--size", "130027519", "cr_seed"],
        ["pvresize", "--devices", "/dev/mapper/cr_seed", "--yes", "/dev/mapper/cr_seed"],
        ["resize2fs", "/dev/mapper/vgseed-lvroot"],
        ["e2fsck", "-f", "-p", "/dev/mapper/vgseed-lvroot"],
    ]  # fmt: skip
    sfdisk = p.steps[9]
    assert sfdisk.stdin == "2099200,130093056\n"
    assert sfdisk.check.expected == 130_093_056
    assert not any(s.needs_key for s in p.steps)  # LUKS1 resize needs no key


def test_plan_text_shows_every_step_with_its_check_and_both_units() -> None:
    text = shrink.format_plan(shrink.plan(seed_layout(), 60 * GiB))
    assert " 7. move 512 extents of lvswap" in text
    assert "check: pvs: 15,872 extents" in text
    assert "130,025,472 sectors × 512 B = 66,573,041,664 B" in text
    assert "parted `unit s` end 132192255" in text
    assert "echo 2099200,130093056 | sfdisk" in text
    data = shrink.describe(shrink.plan(seed_layout(), 60 * GiB))
    assert data["targets"]["partition_end"] == 132_192_255  # type: ignore[index]
    assert json.loads(json.dumps(data)) == data


def test_a_size_below_minimum_plus_margin_is_refused_naming_the_minimum() -> None:
    layout = seed_layout()
    fs = dataclasses.replace(layout.filesystem, free_blocks=20_971_520 - 8_000_000)
    fs = dataclasses.replace(fs, min_blocks=9_000_000)
    layout = dataclasses.replace(layout, filesystem=fs)
    # 9,000,000 + 25% of 8,000,000 = 11,000,000 blocks = 45,056,000,000 B → 10,743e (4 MiB).
    with pytest.raises(PlanRefused, match=r"11,000,000 blocks.*--to 10743e") as error:
        shrink.plan(layout, 40 * GiB)
    assert error.value.exit_code == 2
    assert shrink.plan(layout, 10_743 * 4 * MiB).targets.fs_blocks >= 11_000_000
    with pytest.raises(PlanRefused):
        shrink.plan(layout, 10_742 * 4 * MiB)


def test_margin_is_configurable() -> None:
    layout = seed_layout()
    fs = dataclasses.replace(layout.filesystem, free_blocks=0, min_blocks=15_000_000)
    layout = dataclasses.replace(layout, filesystem=fs)
    with pytest.raises(PlanRefused):
        shrink.plan(layout, 60 * GiB)  # 15,000,000 + 5,242,880 > 15,728,640
    assert shrink.plan(layout, 60 * GiB, margin_percent=3).targets.fs_blocks == 15_728_640


def test_target_sizes_need_units_and_whole_extents() -> None:
    with pytest.raises(UsageError, match="ambiguous") as error:
        shrink.parse_target("60G", 4 * MiB)
    assert error.value.exit_code == 64
    assert shrink.parse_target("15360e", 4 * MiB) == 60 * GiB
    assert shrink.parse_target("64424509440B", 4 * MiB) == 60 * GiB
    with pytest.raises(UsageError, match=r"14305e .*14306e"):
        shrink.parse_target("60GB", 4 * MiB)


@pytest.mark.parametrize(
    ("layout_change", "message"),
    [
        ({"mounted": ("/mnt",)}, "mounted on /mnt"),
        ({"pv_device": "/dev/mapper/other"}, "not on the LUKS mapping"),
        ({"lv": "nosuch"}, "nosuch not found"),
    ],
)
def test_unsupported_layouts_are_refused_with_the_reason(
    layout_change: dict[str, object], message: str
) -> None:
    layout = dataclasses.replace(seed_layout(), **layout_change)  # type: ignore[arg-type]
    with pytest.raises(PlanRefused, match=message):
        shrink.plan(layout, 60 * GiB)


def test_snapshots_thin_and_several_pvs_are_refused() -> None:
    layout = seed_layout()
    swap = layout.vg.lvs[1]
    snap = dataclasses.replace(swap, attr="swi-a-s---", segtypes=("snapshot",), origin="lvroot")
    vg = dataclasses.replace(layout.vg, lvs=(layout.vg.lvs[0], snap))
    with pytest.raises(PlanRefused, match="lvswap is snapshot"):
        shrink.plan(dataclasses.replace(layout, vg=vg), 60 * GiB)
    two = dataclasses.replace(layout.vg, pvs=layout.vg.pvs * 2)
    with pytest.raises(PlanRefused, match="has 2 PVs"):
        shrink.plan(dataclasses.replace(layout, vg=two), 60 * GiB)
    moving = dataclasses.replace(swap, name="pvmove0", attr="p-C-aom---", segtypes=("mirror",))
    vg = dataclasses.replace(layout.vg, lvs=(layout.vg.lvs[0], moving))
    with pytest.raises(PlanRefused, match="interrupted pvmove"):
        shrink.plan(dataclasses.replace(layout, vg=vg), 60 * GiB)


def test_growing_is_refused() -> None:
    with pytest.raises(UsageError, match="only shrinks"):
        shrink.plan(seed_layout(), 81 * GiB)


def host_lv_layout(luks_version: int = 2) -> Layout:
    """The seed guest disk: a 40 GiB host LV with LUKS2 (16 MiB offset) holding the guest's VG."""
    seed = seed_layout()
    luks = dataclasses.replace(
        seed.luks, version=luks_version, data_offset=16 * MiB, sector_size=4096
    )
    mapping = 40 * GiB - 16 * MiB
    mapping_path = "/dev/mapper/cr_imap_encr"
    pe_count = (mapping - MiB) // (4 * MiB)  # 10,235
    segments = (
        PvSegment(0, 5_120, "root", 0),
        PvSegment(5_120, 2_000, "", 0),
        PvSegment(7_120, 1_000, "root", 5_120),
        PvSegment(8_120, 256, "swap", 0),
        PvSegment(8_376, pe_count - 8_376, "", 0),
    )
    vg = VgLayout(
        name="vgmail",
        extent_size=4 * MiB,
        pvs=(PhysicalVolume(mapping_path, "vgmail", pe_count * 4 * MiB, mapping, MiB),),
        pe_counts=(pe_count,),
        mda_counts=(1,),
        segments=segments,
        lvs=(
            dataclasses.replace(
                seed.vg.lvs[0], name="root", size=6_120 * 4 * MiB, segtypes=("linear", "linear")
            ),
            dataclasses.replace(seed.vg.lvs[1], name="swap", size=GiB),
        ),
    )
    fs = dataclasses.replace(seed.filesystem, block_count=6_120 * 1024)
    return Layout(
        vg=vg,
        lv="root",
        lv_path="/dev/mapper/vgmail-root",
        filesystem=fs,
        mounted=(),
        pv_device="/dev/mapper/cr_imap_encr",
        end_mda=0,
        mapping_name="cr_imap_encr",
        mapping_size=mapping,
        luks=luks,
        container=HostLv("/dev/volgrp4/lvimap_hd0", "volgrp4", "lvimap_hd0", 40 * GiB, 4 * MiB),
        lvm_fs_option=True,
    )


def test_host_lv_plan_cuts_the_root_lv_across_segments_and_shrinks_the_host_lv() -> None:
    # root keeps 4,000 extents (16,000 MiB): all of its first segment (5,120) is more than that,
    # so its second segment (PE 7,120…) is dropped entirely and swap (PE 8,120) moves to 4,000.
    p = shrink.plan(host_lv_layout(), shrink.parse_target("4000e", 4 * MiB), backup_dir="/b")
    t = p.targets
    assert t.allocated_extents == 4_256
    assert p.moves == (shrink.Move("swap", 0, 8_120, 4_000, 256),)
    # PV 1 MiB + 4,256 × 4 MiB; + 16 MiB LUKS2 header = 17,041 MiB → whole 4 MiB host extents:
    # 17,044 MiB. The mapping then gets 17,028 MiB = 34,873,344 sectors: 4,256 extents again.
    assert t.container_size == 17_044 * MiB
    assert t.crypt_final_sectors == 17_028 * MiB // 512
    assert t.pv_final_extents == 4_256
    assert t.partition_end == -1
    argvs = [s.argv for s in p.steps]
    assert (
        "lvreduce", "--devices", "/dev/mapper/cr_imap_encr", "--yes", "--fs", "ignore",
        "-L", f"{4000 * 4 * MiB}b", "vgmail/root",
    ) in argvs  # fmt: skip
    assert (
        "lvreduce",
        "--yes",
        "--fs",
        "ignore",
        "-L",
        f"{17_044 * MiB}b",
        "volgrp4/lvimap_hd0",
    ) in argvs
    assert ("vgcfgbackup", "-f", "/b/volgrp4.vg", "volgrp4") in argvs
    resizes = [s for s in p.steps if s.argv[:2] == ("cryptsetup", "resize")]
    assert [(s.needs_key, s.argv[2]) for s in resizes] == [(True, "--key-file=-")] * 2


def test_an_end_metadata_area_is_left_room_after_the_last_extent() -> None:
    layout = dataclasses.replace(host_lv_layout(), end_mda=MiB)
    t = shrink.plan(layout, 4000 * 4 * MiB).targets
    assert t.pv_min_size == MiB + 4_256 * 4 * MiB + MiB
    assert t.pv_final_extents == 4_256


def test_a_resumed_plan_skips_what_is_done() -> None:
    """After the filesystem, the LV and the move are done, re-planning yields only what is left,
    with the same final figures."""
    layout = seed_layout()
    full = shrink.plan(layout, 60 * GiB)
    cut = 20_971_520 - 15_728_640  # resize2fs removed free blocks only
    fs = dataclasses.replace(
        layout.filesystem, block_count=15_728_640, free_blocks=layout.filesystem.free_blocks - cut
    )
    lvs = (dataclasses.replace(layout.vg.lvs[0], size=60 * GiB), layout.vg.lvs[1])
    segments = (
        PvSegment(0, 15_360, "lvroot", 0),
        PvSegment(15_360, 512, "lvswap", 0),
        PvSegment(15_872, 26_615 - 15_872, "", 0),
    )
    vg = dataclasses.replace(layout.vg, lvs=lvs, segments=segments)
    resumed = shrink.plan(dataclasses.replace(layout, filesystem=fs, vg=vg), 60 * GiB)
    assert resumed.targets == full.targets
    assert resumed.moves == ()
    assert [s.argv[0] for s in resumed.steps if s.check.kind not in shrink.BOOKKEEPING] == [
        "pvresize", "cryptsetup", "sfdisk", "partx", "cryptsetup", "pvresize",
    ]  # fmt: skip
    # Once everything has its final size there is nothing left to do.
    part = dataclasses.replace(layout.container, size=130_093_056)  # type: ignore[type-var]
    pv = dataclasses.replace(vg.pvs[0], size=15_872 * 4 * MiB)
    done = dataclasses.replace(
        layout,
        filesystem=fs,
        vg=dataclasses.replace(vg, pvs=(pv,), segments=segments[:2]),
        container=part,
        mapping_size=130_027_519 * 512,
    )
    assert shrink.plan(done, 60 * GiB).nothing_to_do


# --- properties ----------------------------------------------------------------------------------


@st.composite
def layouts(draw: st.DrawFn) -> tuple[Layout, int]:
    """A random single-PV VG (several LVs in several segments, gaps between) on a partition or a
    host LV, and a target size for one of its LVs."""
    ext = draw(st.sampled_from([MiB, 4 * MiB, 32 * MiB, 512 * 1024]))
    runs = draw(
        st.lists(
            st.tuples(st.sampled_from(["a", "b", "c", ""]), st.integers(1, 40)),
            min_size=1,
            max_size=12,
        )
    )
    assume(any(lv == "a" for lv, _ in runs))
    segments, pe, next_le = [], 0, {"a": 0, "b": 0, "c": 0}
    for lv, count in runs:
        segments.append(PvSegment(pe, count, lv, next_le.get(lv, 0) if lv else 0))
        if lv:
            next_le[lv] += count
        pe += count
    tail = draw(st.integers(0, 50))
    if tail:
        segments.append(PvSegment(pe, tail, "", 0))
    pe_count = pe + tail
    pe_start = draw(st.sampled_from([MiB, 192 * 1024, 3 * MiB]))
    end_mda = draw(st.sampled_from([0, MiB, 3 * MiB]))
    sector_size = draw(st.sampled_from([512, 4096]))
    data_offset = draw(st.sampled_from([65_537 * 512, 2 * MiB, 16 * MiB, 4096 * 512]))
    assume(data_offset % sector_size == 0)
    slack = draw(st.integers(0, 3 * MiB // 512)) * 512
    mapping = sizes_round_up(pe_start + pe_count * ext + end_mda + slack, sector_size)
    block_size = draw(st.sampled_from([1024, 4096]))
    lv_sizes = {lv: n * ext for lv, n in next_le.items() if n}
    lvs = tuple(
        dataclasses.replace(seed_layout().vg.lvs[0], name=lv, size=size, segtypes=("linear",))
        for lv, size in lv_sizes.items()
    )
    vg = VgLayout(
        "vgp",
        ext,
        (PhysicalVolume("/dev/mapper/cr_p", "vgp", pe_count * ext, mapping, pe_start),),
        (pe_count,),
        (2 if end_mda else 1,),
        tuple(segments),
        lvs,
    )
    block_count = lv_sizes["a"] // block_size
    used = draw(st.integers(0, block_count))
    min_blocks = draw(st.integers(used // 2, max(used, 1)))
    fs = extfs.ExtFilesystem("/dev/mapper/vgp-a", "ext4", block_size, block_count,
                             block_count - used, min_blocks, "clean")  # fmt: skip
    luks = dataclasses.replace(seed_layout().luks, data_offset=data_offset, sector_size=sector_size)
    if draw(st.booleans()):
        lba = draw(st.sampled_from([512, 4096]))
        start = draw(st.sampled_from([2048, 63, 34, 2_099_200])) * 512 // lba
        lbas = -(-(data_offset + mapping) // lba) + draw(st.integers(0, 5000))
        container: shrink.Container = blockdev.Partition(
            "/dev/sdx3", "/dev/sdx", 3, start, lbas, lba, "gpt"
        )
    else:
        host_ext = draw(st.sampled_from([4 * MiB, 32 * MiB]))
        container = HostLv(
            "/dev/h/lv", "h", "lv", sizes_round_up(data_offset + mapping, host_ext), host_ext
        )
    layout = Layout(vg, "a", "/dev/mapper/vgp-a", fs, (), "/dev/mapper/cr_p", end_mda, "cr_p",
                    mapping, luks, container, False)  # fmt: skip
    target_extents = draw(st.integers(1, lv_sizes["a"] // ext))
    return layout, target_extents * ext


def sizes_round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def simulate(layout: Layout, p: shrink.Plan) -> dict[int, tuple[str, int]]:
    """PE → (LV, LE) after the LV shrinks and every move of the plan is carried out."""
    t = p.targets
    owner: dict[int, tuple[str, int]] = {}
    for seg in layout.vg.segments:
        for i in range(seg.pe_count):
            if seg.lv and not (seg.lv == layout.lv and seg.le_start + i >= t.lv_extents):
                owner[seg.pe_start + i] = (seg.lv, seg.le_start + i)
    for move in p.moves:
        for i in range(move.count):
            assert owner.pop(move.source + i) == (move.lv, move.le_start + i)
            assert move.target + i not in owner
            owner[move.target + i] = (move.lv, move.le_start + i)
    return owner


@settings(max_examples=120, deadline=None)
@given(layouts())
def test_plans_keep_every_extent_below_the_new_end_and_sizes_exact(
    case: tuple[Layout, int],
) -> None:
    layout, target = case
    try:
        p = shrink.plan(layout, target)
    except PlanRefused as refused:
        # Only ever refused for the filesystem's minimum, and then rightly so.
        assert "cannot shrink" in str(refused)
        fs = layout.filesystem
        assert target // fs.block_size < shrink.required_blocks(fs, 25)
        return
    t, fs, luks, ext = p.targets, layout.filesystem, layout.luks, layout.vg.extent_size
    pv = layout.vg.pvs[0]
    # never below the filesystem's minimum plus margin (unless it is not shrunk at all)
    assert t.fs_blocks >= shrink.required_blocks(fs, 25) or t.fs_blocks >= fs.block_count
    assert t.fs_blocks * fs.block_size <= t.lv_size == t.lv_extents * ext
    owner = simulate(layout, p)
    lvs_after = {lv: n for lv, n in ((s.lv, 0) for s in layout.vg.segments if s.lv)}
    for _pe, (lv, _le) in owner.items():
        lvs_after[lv] += 1
    assert len(owner) == t.allocated_extents  # nothing lost, nothing doubled
    if t.freed:
        assert max(owner) < t.allocated_extents  # no extent beyond the new PV end
    assert max(owner) < t.pv_final_extents
    # each layer holds the one above, exactly and with the tools' units
    assert t.pv_min_size == pv.pe_start + t.allocated_extents * ext + layout.end_mda
    assert t.crypt_min_sectors * 512 >= t.pv_min_size
    assert (t.crypt_min_sectors * 512) % luks.sector_size == 0
    assert t.crypt_min_sectors * 512 - t.pv_min_size < luks.sector_size
    assert t.container_min_size == luks.data_offset + t.crypt_min_sectors * 512
    assert t.container_min_size <= t.container_size <= layout.container_size
    final = t.crypt_final_sectors * 512
    assert (
        luks.data_offset + final <= t.container_size < luks.data_offset + final + luks.sector_size
    )
    assert pv.pe_start + t.pv_final_extents * ext + layout.end_mda <= final
    assert t.pv_final_extents >= t.allocated_extents
    assert t.freed == layout.container_size - t.container_size
    if isinstance(layout.container, blockdev.Partition):
        part = layout.container
        assert t.container_size == (t.partition_end - part.start + 1) * part.sector_size
        aligned = (t.partition_end + 1) * part.sector_size % shrink.PARTITION_ALIGNMENT == 0
        assert aligned or t.partition_end == part.end
    else:
        assert t.container_size % layout.container.extent_size == 0
    # sizes in the commands round-trip to the planned bytes
    for step in p.steps:
        if step.argv[:2] == ("cryptsetup", "resize"):
            assert int(step.argv[-2]) * 512 in (t.crypt_min_sectors * 512, final)
        if step.argv[0] == "resize2fs" and len(step.argv) == 3:
            assert int(step.argv[2]) * fs.block_size <= t.lv_size
    assert shrink.parse_target(f"{t.lv_extents}e", ext) == t.lv_size
    assert shrink.parse_target(f"{t.lv_size}B", ext) == t.lv_size
    assert shrink.parse_target(f"{t.lv_size // 512}s", ext) == t.lv_size


# --- the command line: usage errors come before any device is touched -----------------------------


def test_bare_g_is_a_usage_error_naming_gib_and_gb(capsys: pytest.CaptureFixture[str]) -> None:
    from luksvm.cli import main

    assert main(["shrink", "plan", "--lv", "vgseed/lvroot", "--to", "60G"]) == 64
    err = capsys.readouterr().err
    assert "64,424,509,440 bytes" in err and "60,000,000,000 bytes" in err
    assert "write 60GiB or 60GB" in err


def test_run_without_the_backup_confirmation_is_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from luksvm.cli import main

    assert main(["shrink", "run", "--lv", "vgseed/lvroot", "--to", "60GiB"]) == 64
    assert "--yes-i-have-a-backup" in capsys.readouterr().err
