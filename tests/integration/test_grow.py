"""grow against real tools: its guards through the CLI on libvirt's test driver, and grow --lv on
real LUKS headers, LVM metadata and a partition table on loop devices (the host kernel has no
device-mapper: loop devices stand for the mapping and the LV; cryptsetup resize, partx and QEMU's
block resize run in the VM tier)."""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from luksvm import blockdev, config, cryptsetup, grow, keys, lvm, shrink
from luksvm.cli import main
from luksvm.errors import LuksvmError
from luksvm.stack import Check, HostLv, Step
from tests.conftest import write_config
from tests.integration.conftest import sh
from tests.integration.test_guests import TEST_NS
from tests.integration.test_shrink import EXT, PART_START, Attach, Stack, build_stack

MiB = 1024**2


def domain(name: str, source: str, *, running: bool = False) -> str:
    return (
        f"<domain type='test' xmlns:test='{TEST_NS}'><name>{name}</name>"
        "<memory>65536</memory><os><type>hvm</type></os>"
        f"<test:runstate>{1 if running else 5}</test:runstate>"
        f"<devices><disk type='block' device='disk'><source dev='{source}'/>"
        "<target dev='vda' bus='virtio'/></disk></devices></domain>"
    )


def test_guards_refuse_with_exit_2_naming_the_reason_and_change_nothing(
    tmp_path: Path, loop_device: Attach, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "disk.img"
    sh("truncate", "-s", "8M", str(image))
    loop = loop_device(image)  # a real block device with no LUKS mapping open on it
    other = loop_device(image)
    node = tmp_path / "node.xml"
    node.write_text(
        "<node>"
        + domain("mail", "/dev/mapper/cr_mail")
        + domain("a", "/dev/mapper/cr_shared")
        + domain("b", "/dev/mapper/cr_shared")
        + domain("plain", "/dev/sdz")
        + domain("run", "/dev/mapper/cr_run", running=True)
        + domain("notlv", "/dev/mapper/cr_notlv")
        + "</node>"
    )
    write_config(
        tmp_path,
        {
            "10-test.conf": "cr_mail /dev/vg/mail /etc/luksvm/keys/k luks,x-luksvm.guest=mail\n"
            "cr_shared /dev/vg/shared - luks,x-luksvm.guest=a,x-luksvm.guest=b\n"
            f"cr_run {loop} - luks,x-luksvm.guest=run\n"
            f"cr_notlv {other} - luks,x-luksvm.guest=notlv\n"
        },
        f"[libvirt]\nuri = test://{node}\n",
    )
    before = node.read_text()
    root = str(tmp_path)
    for argv, message in (
        (["plain", "--by", "1GiB"], "no disk of guest plain is a luksvm volume"),
        (["plain", "--disk", "vda", "--by", "1GiB"], "disk vda of guest plain (/dev/sdz) is not a"),
        (["a", "--by", "1GiB"], "volume cr_shared is the disk of guests a, b"),
        (["run", "--by", "1GiB"], "guest run is running but cr_run is closed"),
        (["notlv", "--by", "1GiB"], f"cr_notlv lies on {other}, not on an LV of the host"),
    ):
        assert main(["--root", root, "grow", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert message in err, (argv, err)
        assert "Traceback" not in err
    assert main(["--root", root, "grow", "mail", "--disk", "vdz", "--by", "1GiB"]) == 64
    assert "guest mail has no disk vdz (its disks: vda)" in capsys.readouterr().err
    assert node.read_text() == before


def extend_disk(stack: Stack, size: str) -> None:
    """A bigger disk image with its GPT backup header moved to the new end."""
    sh("truncate", "-s", size, str(stack.image))
    sh("sfdisk", "-q", "--relocate", "gpt-bak-std", str(stack.image))


@pytest.fixture
def stacks(lvm_env: dict[str, str]) -> Iterator[list[Stack]]:
    made: list[Stack] = []
    yield made
    for stack in made:
        sh("vgremove", "-q", "-f", stack.vg, env=lvm_env)


def test_grow_lv_grows_table_pv_and_lv_exactly_and_a_rerun_resumes(
    tmp_path: Path, lvm_env: dict[str, str], loop_device: Attach, stacks: list[Stack]
) -> None:
    """Partition 1 (300 MiB) → LUKS2 (16 MiB offset) → PV of 70 extents: root 48 at PE 0, swap 8
    at PE 60, 14 free. root + 30 extents needs 16 more in the PV: PV = 1 MiB + 86 × 4 MiB =
    345 MiB; + 16 MiB = 361 MiB from sector 2,048: the partition ends at 741,375 (aligned)."""
    stack = build_stack(tmp_path, lvm_env, loop_device, luks_version=2)
    stacks.append(stack)
    where = stack.where
    amount = grow.parse_amount("30e", None)
    with pytest.raises(grow.GrowRefused, match=r"no room after partition 1 .* the disk ends"):
        grow.plan_lv(grow.read_lv_layout(where), amount, backup_dir="/b")
    extend_disk(stack, "400M")
    found = grow.read_lv_layout(where)
    assert found.room.last_lba == 400 * MiB // 512 - 34  # GPT: 33 sectors of backup table
    backups = tmp_path / "backups"
    plan = grow.plan_lv(found, amount, backup_dir=str(backups))
    assert [s.argv[0] for s in plan.steps] == [
        "vgcfgbackup", "sfdisk", "partx", "cryptsetup", "pvresize", "lvextend", "e2fsck",
        "resize2fs",
    ]  # fmt: skip
    end = 741_375
    new_sectors = end - PART_START + 1
    assert plan.steps[1].stdin == f"{PART_START},{new_sectors}\n"
    crypt = new_sectors - stack.data_offset // 512
    assert plan.steps[3].argv[-3:] == ("--size", str(crypt), "cr_test")
    assert plan.steps[4].check.expected == (crypt * 512 - stack.pe_start) // EXT  # 86
    assert plan.steps[5].argv[-2:] == ("78", f"{stack.vg}/root")

    # backup and partition table, for real (partx needs a kernel partition: VM tier)
    backups.mkdir()
    lines: list[str] = []
    measure = lambda check: grow.measure(check, where, None)  # noqa: E731
    shrink.run_steps(plan.steps[:2], measure, progress=lines.append, command="c", replan="r")
    part = blockdev.read_partition(where.container, str(stack.image), 1)
    assert (part.start, part.end) == (PART_START, end)
    assert (backups / f"{stack.vg}.vg").read_text().count("root {") == 1

    # as dm-crypt would after cryptsetup resize: the mapping's device at its new size
    sh("losetup", "-d", where.mapping)
    mapping = loop_device(stack.image, PART_START * 512 + stack.data_offset, crypt * 512)
    where = dataclasses.replace(where, mapping=mapping)
    again = grow.plan_lv(grow.read_lv_layout(where), amount, backup_dir=str(backups))
    assert again.target == plan.target
    # the table and the mapping are done: planned again, only the PV and the LV are left
    assert [s.argv[0] for s in again.steps if s.check.kind not in {"file", "fsck"}] == [
        "pvresize", "lvextend", "resize2fs",
    ]  # fmt: skip
    steps = tuple(
        dataclasses.replace(
            s, argv=tuple(mapping if a == stack.where.mapping else a for a in s.argv)
        )
        for s in again.steps
        if s.argv[0] in {"pvresize", "lvextend"}
    )
    shrink.run_steps(
        steps,
        lambda check: grow.measure(dataclasses.replace(check, subject=mapping)
                                   if check.kind == "pv_extents" else check, where, None),
        progress=lines.append,
        command="c",
        replan="r",
    )  # fmt: skip
    assert lvm.report("pvs", ["pv_pe_count"], ["--devices", mapping, mapping])[0] == {
        "pv_pe_count": str(86)
    }
    size = lvm.report("lvs", ["lv_size"], ["--devices", mapping, f"{stack.vg}/root"])[0]
    assert size == {"lv_size": str(78 * EXT)}
    assert any("ok: lvs:" in line for line in lines)
    assert json.loads(json.dumps(grow.describe(again)))["target"] == 78 * EXT


def test_no_key_refuses_before_the_first_change_naming_the_step(
    tmp_path: Path, luks2_image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LUKS2 resize needs a key: with no token, no configured key, no --key-file and no terminal
    luksvm refuses before anything ran and names the step; --key-file - reads it from stdin."""
    disk = grow.GuestDisk(
        guest="mail",
        target="vda",
        volume="cr_mail",
        host=HostLv(str(luks2_image), "vg", "lv", 32 * MiB, 4 * MiB),
        luks=cryptsetup.read_header(str(luks2_image)),
        mapping_size=16 * MiB,
        running=False,
        capacity=None,
        host_free_extents=10,
    )
    plan = grow.plan_guest(disk, grow.parse_amount("4MiB", None), backup_dir=str(tmp_path))
    where = shrink.Where("vg", "lv", str(luks2_image), "/dev/mapper/cr_mail", "cr_mail", "")
    # the host kernel has no device-mapper: the mapping reads as not yet resized
    monkeypatch.setattr(grow, "measure", lambda check, where, domain: -1)
    monkeypatch.setattr(keys, "terminal", lambda: False)
    with pytest.raises(LuksvmError) as error:
        grow._key_if_needed(plan, where, domain=None, volume=None, key_file=None, root="/",
                            settings=config.Settings())  # fmt: skip
    assert "step 3 (grow the LUKS mapping cr_mail" in str(error.value)
    assert "nothing was changed" in str(error.value)
    assert not (tmp_path / "vg.vg").exists()

    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"correct horse")))
    key = grow._key_if_needed(plan, where, domain=None, volume=None, key_file="-", root="/",
                              settings=config.Settings())  # fmt: skip
    assert key is not None and key.stdin == b"correct horse"
    assert grow.with_key(plan.steps, key) == plan.steps  # a passphrase goes on stdin


def test_a_token_key_resizes_with_token_only() -> None:
    disk_steps = (
        Step(3, "grow", ("cryptsetup", "resize", "--key-file=-", "--size", "8", "m"),
             Check("mapping_size", "m", 8, "t"), needs_key=True),
    )  # fmt: skip
    token = keys.Key("token", "a LUKS2 token of /dev/x")
    (step,) = grow.with_key(disk_steps, token)
    assert step.argv == ("cryptsetup", "resize", "--token-only", "--size", "8", "m")
    assert not step.needs_key


def test_grow_lv_refuses_a_filesystem_other_than_ext(tmp_path: Path) -> None:
    swap = tmp_path / "swap.img"
    sh("truncate", "-s", "16M", str(swap))
    sh("mkswap", "-q", str(swap))
    where = shrink.Where("vg", "swap", "/dev/x", "/dev/mapper/x", "x", str(swap))
    with pytest.raises(grow.GrowRefused, match=r"holds a swap filesystem; luksvm grow --lv grows"):
        grow.read_lv_layout(where)
