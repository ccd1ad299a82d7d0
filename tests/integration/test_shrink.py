"""Planning (and the steps that need no device-mapper) against real LUKS headers and real LVM
metadata on loop devices. The host kernel has no device-mapper, so the "open mapping" is a loop
device at the LUKS payload offset and the LV's filesystem a loop device at the LV's extents."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from luksvm import blockdev, cryptsetup, keys, lvm, shrink
from luksvm.errors import LuksvmError
from tests.conftest import write_config
from tests.integration.conftest import make_luks, sh, unique

MiB = 1024**2
EXT = 4 * MiB
PART_START = 2048  # sectors
PART_SECTORS = 300 * MiB // 512

Attach = Callable[..., str]


@dataclasses.dataclass
class Stack:
    where: shrink.Where
    image: Path
    disk: str
    data_offset: int
    pe_start: int
    vg: str
    files: dict[str, bytes]


def build_stack(
    tmp_path: Path,
    env: dict[str, str],
    attach: Attach,
    *,
    luks_version: int,
    metadata_copies: int = 1,
) -> Stack:
    """GPT disk image, partition 1 (300 MiB at sector 2048) → LUKS → PV (4 MiB extents) →
    root (48 extents at PE 0) and swap (8 extents at PE 60, behind a gap) → ext4 on root."""
    image = tmp_path / "disk.img"
    sh("truncate", "-s", "320M", str(image))
    sh(
        "sfdisk",
        "-q",
        str(image),
        stdin=f"label: gpt\nstart={PART_START}, size={PART_SECTORS}\n".encode(),
    )
    # No partition nodes for loop devices on this host: a loop device at the partition's offset
    # stands for the partition; the table itself is real and read (and changed) by sfdisk.
    disk = str(image)
    part = attach(image, PART_START * 512, PART_SECTORS * 512)
    make_luks(Path(part), b"k", version=luks_version)
    data_offset = cryptsetup.read_header(part).data_offset
    mapping_offset = PART_START * 512 + data_offset
    mapping = attach(image, mapping_offset, PART_SECTORS * 512 - data_offset)
    vg = unique("shr")
    sh("pvcreate", "-q", "--pvmetadatacopies", str(metadata_copies), mapping, env=env)
    sh("vgcreate", "-q", "-s", "4m", vg, mapping, env=env)
    sh("lvcreate", "-q", "-an", "-Zn", "-l", "48", "-n", "root", vg, f"{mapping}:0-47", env=env)
    sh("lvcreate", "-q", "-an", "-Zn", "-l", "8", "-n", "swap", vg, f"{mapping}:60-67", env=env)
    pe_start = lvm.physical_volumes([mapping])[0].pe_start
    content = tmp_path / "content"
    content.mkdir()
    files = {f"f{i}": bytes([i]) * (i * 70_001) for i in range(1, 12)}
    for name, data in files.items():
        (content / name).write_bytes(data)
    fs_device = attach(image, mapping_offset + pe_start, 48 * EXT)
    sh("mkfs.ext4", "-q", "-b", "4096", "-d", str(content), fs_device)
    where = shrink.Where(vg, "root", part, mapping, "cr_test", fs_device, partition=(disk, 1))
    return Stack(where, image, disk, data_offset, pe_start, vg, files)


@pytest.fixture
def stacks(lvm_env: dict[str, str]) -> Iterator[list[Stack]]:
    made: list[Stack] = []
    yield made
    for stack in made:
        sh("vgremove", "-q", "-f", stack.vg, env=lvm_env)


@pytest.mark.parametrize("versions", [(1, 1), (2, 2)], ids=["luks1-1mda", "luks2-2mdas"])
def test_plan_from_real_headers_and_metadata_matches_the_arithmetic(
    tmp_path: Path,
    lvm_env: dict[str, str],
    loop_device: Attach,
    stacks: list[Stack],
    versions: tuple[int, int],
) -> None:
    luks_version, copies = versions
    stack = build_stack(tmp_path, lvm_env, loop_device, luks_version=luks_version,
                        metadata_copies=copies)  # fmt: skip
    stacks.append(stack)
    layout = shrink.read_layout(stack.where)
    assert layout.filesystem.block_count == 48 * EXT // 4096
    assert layout.end_mda == (0 if copies == 1 else stack.pe_start)  # same size as the first
    assert isinstance(layout.container, blockdev.Partition)
    assert (layout.container.start, layout.container.size) == (PART_START, PART_SECTORS)

    plan = shrink.plan(layout, shrink.parse_target("32e", EXT))
    t = plan.targets
    # root keeps PE 0-31; swap (PE 60-67) moves to PE 32-39; 40 extents stay allocated.
    assert plan.moves == (shrink.Move("swap", 0, 60, 32, 8),)
    assert t.allocated_extents == 40
    pv_min = stack.pe_start + 40 * EXT + layout.end_mda
    assert t.pv_min_size == pv_min
    crypt_min = -(-pv_min // layout.luks.sector_size) * layout.luks.sector_size
    assert t.crypt_min_sectors == crypt_min // 512
    end = -(-(PART_START + (stack.data_offset + crypt_min) // 512) // 2048) * 2048 - 1
    assert t.partition_end == end
    assert t.freed == (PART_START + PART_SECTORS - 1 - end) * 512
    text = shrink.format_plan(plan)
    assert f"--no-tell-kernel --wipe never --wipe-partitions never -N 1 {stack.disk}" in text


def test_cli_refuses_a_size_below_the_minimum_with_exit_2(
    tmp_path: Path, lvm_env: dict[str, str], loop_device: Attach, stacks: list[Stack]
) -> None:
    stack = build_stack(tmp_path, lvm_env, loop_device, luks_version=2)
    stacks.append(stack)
    layout = shrink.read_layout(stack.where)
    need = shrink.required_blocks(layout.filesystem, 25)
    too_small = (need * 4096) // EXT  # whole extents just below the minimum plus margin
    with pytest.raises(shrink.PlanRefused, match=r"cannot shrink .* the minimum is") as error:
        shrink.plan(layout, too_small * EXT)
    assert error.value.exit_code == 2


def test_executor_runs_fs_lv_and_partition_steps_with_checks_and_resumes(
    tmp_path: Path, lvm_env: dict[str, str], loop_device: Attach, stacks: list[Stack]
) -> None:
    """The steps that need no device-mapper, run for real: backups, e2fsck, resize2fs, lvreduce.
    A second plan from the state left behind skips them. The partition table is then shrunk
    alone (sfdisk, for real): a plan now refuses, as the mapping reaches beyond its container."""
    stack = build_stack(tmp_path, lvm_env, loop_device, luks_version=2)
    stacks.append(stack)
    backups = tmp_path / "backups"
    layout = shrink.read_layout(stack.where)
    plan = shrink.plan(layout, 32 * EXT, backup_dir=str(backups))
    runnable = ("cryptsetup luksHeaderBackup", "vgcfgbackup", "e2fsck", "resize2fs", "lvreduce")
    steps = tuple(s for s in plan.steps if " ".join(s.argv).startswith(runnable))
    assert [s.argv[0] for s in steps] == [
        "cryptsetup", "vgcfgbackup", "e2fsck", "resize2fs", "e2fsck", "lvreduce", "resize2fs",
        "e2fsck",
    ]  # fmt: skip
    lines: list[str] = []
    backups.mkdir()
    journal = str(backups / "steps.jsonl")
    shrink.execute(dataclasses.replace(plan, steps=steps[:6]), stack.where,
                   journal_path=journal, progress=lines.append)  # fmt: skip
    # The loop device standing for the LV does not shrink with it: attach it again at the LV's
    # new size, as the device-mapper would have it, then grow the filesystem to fill it.
    sh("losetup", "-d", stack.where.lv_path)
    mapping_offset = PART_START * 512 + stack.data_offset
    fs_device = loop_device(stack.image, mapping_offset + stack.pe_start, 32 * EXT)
    stack.where = dataclasses.replace(stack.where, lv_path=fs_device)
    fill = tuple(
        dataclasses.replace(
            s, argv=(*s.argv[:-1], fs_device), check=dataclasses.replace(s.check, subject=fs_device)
        )
        for s in steps[6:]
    )
    assert [s.argv[0] for s in fill] == ["resize2fs", "e2fsck"]
    shrink.execute(dataclasses.replace(plan, steps=fill), stack.where,
                   journal_path=journal, progress=lines.append)  # fmt: skip

    # every check held: the filesystem, LV and partition have exactly the planned sizes
    header = sh("dumpe2fs", "-h", stack.where.lv_path)
    assert f"Block count:              {32 * EXT // 4096}" in header
    assert lvm.report("lvs", ["lv_size"], ["--devices", stack.where.mapping, f"{stack.vg}/root"])[
        0
    ]["lv_size"] == str(32 * EXT)
    assert (
        backups / f"luks-header-{layout.luks.uuid}.img"
    ).stat().st_size == layout.luks.data_offset
    assert (backups / f"{stack.vg}.vg").read_text().count("root {") == 1
    log = [json.loads(line) for line in (backups / "steps.jsonl").read_text().splitlines()]
    assert [entry["outcome"] for entry in log] == ["done"] * len(steps)
    resize = next(
        e for e in log if e["command"].startswith("resize2fs") and e["before"] != e["after"]
    )
    assert (resize["before"], resize["after"]) == (48 * EXT // 4096, 32 * EXT // 4096)
    # the files are intact (debugfs reads them without mounting)
    for name, data in stack.files.items():
        out = tmp_path / f"out-{name}"
        sh("debugfs", "-R", f"dump /{name} {out}", stack.where.lv_path)
        assert out.read_bytes() == data

    # resume: planning again from the state left skips everything done
    again = shrink.plan(shrink.read_layout(stack.where), 32 * EXT, backup_dir=str(backups))
    assert again.targets.partition_end == plan.targets.partition_end
    left = [s.argv[0] for s in again.steps if s.check.kind not in shrink.BOOKKEEPING]
    assert left == [
        "pvmove", "pvresize", "cryptsetup", "sfdisk", "partx", "cryptsetup", "pvresize",
    ]  # fmt: skip

    sfdisk = next(s for s in again.steps if s.argv[0] == "sfdisk")
    shrink.execute(dataclasses.replace(again, steps=(sfdisk,)), stack.where)
    part = blockdev.read_partition(stack.where.container, stack.image.as_posix(), 1)
    assert (part.start, part.end) == (PART_START, plan.targets.partition_end)
    assert part.size_bytes == plan.targets.container_size
    with pytest.raises(shrink.PlanRefused, match="reaches beyond its container"):
        shrink.plan(shrink.read_layout(stack.where), 32 * EXT)


def test_header_backup_step_holds_for_luks1(
    tmp_path: Path, lvm_env: dict[str, str], loop_device: Attach, stacks: list[Stack]
) -> None:
    """Found in the VM: LUKS1's luksHeaderBackup ends at the last keyslot (4,040 sectors with a
    512-bit key), short of the payload offset; a check on the file's size stopped every LUKS1 run
    at step 1. The check reads the backup back as the container's header instead."""
    stack = build_stack(tmp_path, lvm_env, loop_device, luks_version=1)
    stacks.append(stack)
    backups = tmp_path / "backups"
    backups.mkdir()
    plan = shrink.plan(shrink.read_layout(stack.where), 32 * EXT, backup_dir=str(backups))
    header_step = plan.steps[0]
    assert header_step.argv[:2] == ("cryptsetup", "luksHeaderBackup")
    shrink.execute(dataclasses.replace(plan, steps=(header_step,)), stack.where)
    backup = Path(header_step.check.subject)
    assert 0 < backup.stat().st_size < cryptsetup.read_header(stack.where.container).data_offset
    # a file that is not this container's header does not pass
    backup.chmod(0o600)
    backup.write_bytes(b"\0" * 4096)
    assert shrink.measure(header_step.check, stack.where) == 0


def test_a_check_that_does_not_hold_stops_the_run(
    tmp_path: Path, lvm_env: dict[str, str], loop_device: Attach, stacks: list[Stack]
) -> None:
    stack = build_stack(tmp_path, lvm_env, loop_device, luks_version=1)
    stacks.append(stack)
    layout = shrink.read_layout(stack.where)
    plan = shrink.plan(layout, 40 * EXT)
    resize = next(s for s in plan.steps if s.argv[0] == "resize2fs")
    lying = dataclasses.replace(resize, check=dataclasses.replace(resize.check, expected=12345))
    later = next(s for s in plan.steps if s.argv[0] == "lvreduce")
    with pytest.raises(shrink.StepFailed, match=r"check failed: .*expected 12,345, found 40,960"):
        shrink.execute(dataclasses.replace(plan, steps=(lying, later)), stack.where)
    rows = lvm.report("lvs", ["lv_size"], ["--devices", stack.where.mapping, f"{stack.vg}/root"])
    assert rows[0]["lv_size"] == str(48 * EXT)  # the lvreduce after it never ran


def test_host_lv_container_is_read_from_the_host_vg(
    tmp_path: Path, lvm_env: dict[str, str], loop_device: Attach, stacks: list[Stack]
) -> None:
    """host VG → LV (inactive; a loop device stands for it) → LUKS → guest PV → guest VG."""
    image = tmp_path / "host.img"
    sh("truncate", "-s", "200M", str(image))
    host_pv = loop_device(image)
    host_vg = unique("shh")
    sh("pvcreate", "-q", host_pv, env=lvm_env)
    sh("vgcreate", "-q", "-s", "4m", host_vg, host_pv, env=lvm_env)
    stacks.append(Stack(shrink.Where(host_vg, "", "", "", "", ""), image, "", 0, 0, host_vg, {}))
    sh("lvcreate", "-q", "-an", "-Zn", "-l", "40", "-n", "guestdisk", host_vg, env=lvm_env)
    host_pe_start = lvm.physical_volumes([host_pv])[0].pe_start
    container = loop_device(image, host_pe_start, 40 * EXT)
    make_luks(Path(container), b"k", version=2)
    offset = cryptsetup.read_header(container).data_offset
    mapping = loop_device(image, host_pe_start + offset, 40 * EXT - offset)
    vg = unique("shg")
    sh("pvcreate", "-q", mapping, env=lvm_env)
    sh("vgcreate", "-q", "-s", "4m", vg, mapping, env=lvm_env)
    stacks.append(Stack(shrink.Where(vg, "", "", "", "", ""), image, "", 0, 0, vg, {}))
    sh("lvcreate", "-q", "-an", "-Zn", "-l", "30", "-n", "root", vg, env=lvm_env)
    pe_start = lvm.physical_volumes([mapping])[0].pe_start
    fs_device = loop_device(image, host_pe_start + offset + pe_start, 30 * EXT)
    sh("mkfs.ext4", "-q", fs_device)
    where = shrink.Where(vg, "root", container, mapping, "cr_g", fs_device, (host_vg, "guestdisk"))
    layout = shrink.read_layout(where)
    assert layout.container == shrink.HostLv(container, host_vg, "guestdisk", 40 * EXT, EXT)
    plan = shrink.plan(layout, 10 * EXT, backup_dir="/b")
    # 1 MiB pe_start + 10 extents + 16 MiB LUKS2 header = 57 MiB → 15 host extents (60 MiB)
    assert plan.targets.container_size == (pe_start + 10 * EXT + offset + EXT - 1) // EXT * EXT
    assert (
        "lvreduce",
        "--yes",
        "-L",
        f"{plan.targets.container_size}b",
        f"{host_vg}/guestdisk",
    ) in [s.argv for s in plan.steps]


# --- the key: through keys.obtain_key, asked for before the first step, only when needed ------


@pytest.fixture
def luks2_plan(
    tmp_path: Path, lvm_env: dict[str, str], loop_device: Attach, stacks: list[Stack]
) -> tuple[Stack, shrink.Plan]:
    stack = build_stack(tmp_path, lvm_env, loop_device, luks_version=2)
    stacks.append(stack)
    return stack, shrink.plan(shrink.read_layout(stack.where), shrink.parse_target("32e", EXT))


def _configure(root: Path, stack: Stack, key: str, mode: int | None = None) -> None:
    if mode is not None:
        path = root / key.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"k")
        path.chmod(mode)
    write_config(root, {"10.conf": f"cr_test {stack.where.container} {key} luks\n"})


def _first_key_step(plan: shrink.Plan) -> str:
    step = next(s for s in plan.steps if s.needs_key)
    return f"step {step.number} ({step.title})"


def test_shrink_refuses_a_keyfile_others_may_read_as_unlock_does(
    tmp_path: Path, luks2_plan: tuple[Stack, shrink.Plan]
) -> None:
    stack, plan = luks2_plan
    _configure(tmp_path / "root", stack, "/etc/luksvm/keys/k", 0o644)
    with pytest.raises(LuksvmError) as caught:
        shrink.key_for_plan(plan, stack.where, root=str(tmp_path / "root"))
    assert "has mode 0644: group or others may access it" in caught.value.message
    assert caught.value.fix.startswith("chmod 0400 ")


def test_shrink_names_a_missing_keyfile_cleanly(
    tmp_path: Path, luks2_plan: tuple[Stack, shrink.Plan]
) -> None:
    stack, plan = luks2_plan
    _configure(tmp_path / "root", stack, "/etc/luksvm/keys/gone")
    with pytest.raises(LuksvmError, match="keys/gone does not exist"):
        shrink.key_for_plan(plan, stack.where, root=str(tmp_path / "root"))


def test_shrink_uses_the_configured_keyfile_under_root(
    tmp_path: Path, luks2_plan: tuple[Stack, shrink.Plan]
) -> None:
    stack, plan = luks2_plan
    _configure(tmp_path / "root", stack, "/etc/luksvm/keys/k", 0o400)
    key = shrink.key_for_plan(plan, stack.where, root=str(tmp_path / "root"))
    assert key is not None and (key.source, key.secret) == ("keyfile", b"k")


def test_shrink_of_a_container_opened_by_hand_without_a_key_refuses_naming_the_step(
    tmp_path: Path, luks2_plan: tuple[Stack, shrink.Plan]
) -> None:
    stack, plan = luks2_plan
    with pytest.raises(LuksvmError) as caught:
        shrink.key_for_plan(plan, stack.where, root=str(tmp_path))  # no configuration at all
    step = _first_key_step(plan)
    assert step.endswith("(shrink the LUKS mapping cr_test to its PV)")
    assert caught.value.message.startswith(f"{step} needs the key of {stack.where.container}")
    given = tmp_path / "given.key"
    given.write_bytes(b"k")
    key = shrink.key_for_plan(plan, stack.where, root=str(tmp_path), key_file=str(given))
    assert key is not None and key.source == "key-file"
    assert key.command(plan.steps[0].argv) == plan.steps[0].argv
    resize = next(s for s in plan.steps if s.needs_key)
    token = keys.Key("token", "a token")
    assert "--token-only" in token.command(resize.argv)
    assert "--key-file=-" not in token.command(resize.argv)


def test_luks1_resize_needs_no_key(
    tmp_path: Path, lvm_env: dict[str, str], loop_device: Attach, stacks: list[Stack]
) -> None:
    stack = build_stack(tmp_path, lvm_env, loop_device, luks_version=1)
    stacks.append(stack)
    plan = shrink.plan(shrink.read_layout(stack.where), shrink.parse_target("32e", EXT))
    assert not any(s.needs_key for s in plan.steps)
    assert shrink.key_for_plan(plan, stack.where, root=str(tmp_path)) is None
