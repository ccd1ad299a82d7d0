from __future__ import annotations

import os
from pathlib import Path

from luksvm import blockdev, systemctl


def fake_sys(tmp_path: Path) -> Path:
    """A sysfs with sda (sda2, sda3), dm-0 = crypt on sda3, dm-1 = LVM LV on dm-0,
    dm-2 = LVM LV on sda2, md0 on sdb1 + dm-0."""
    sys = tmp_path / "sys"
    devices = sys / "devices"
    sda = devices / "pci0000:00/block/sda"
    for part in ("sda2", "sda3"):
        (sda / part).mkdir(parents=True)
        (sda / part / "partition").write_text("2\n")
    sdb1 = devices / "pci0000:00/block/sdb/sdb1"
    sdb1.mkdir(parents=True)
    (sdb1 / "partition").write_text("1\n")
    virtual = devices / "virtual/block"

    def dm(name: str, uuid: str, dm_name: str, slaves: list[Path]) -> Path:
        node = virtual / name
        (node / "dm").mkdir(parents=True)
        (node / "dm/uuid").write_text(uuid + "\n")
        (node / "dm/name").write_text(dm_name + "\n")
        (node / "slaves").mkdir()
        for slave in slaves:
            os.symlink(slave, node / "slaves" / slave.name)
        return node

    dm0 = dm("dm-0", "CRYPT-LUKS2-abc-cr_root", "cr_root", [sda / "sda3"])
    dm1 = dm("dm-1", "LVM-xyz", "vg0-swap", [dm0])
    dm2 = dm("dm-2", "LVM-uvw", "vg1-swap", [sda / "sda2"])
    md0 = virtual / "md0"
    (md0 / "slaves").mkdir(parents=True)
    os.symlink(sdb1, md0 / "slaves/sdb1")
    os.symlink(dm0, md0 / "slaves/dm-0")
    zram = virtual / "zram0"
    zram.mkdir()
    classes = sys / "class/block"
    classes.mkdir(parents=True)
    for node in (sda, sda / "sda2", sda / "sda3", sdb1.parent, sdb1, dm0, dm1, dm2, md0, zram):
        os.symlink(node, classes / node.name)
    links = sys / "dev/block"
    links.mkdir(parents=True)
    for number, node in {
        "8:2": sda / "sda2",
        "253:0": dm0,
        "253:1": dm1,
        "253:2": dm2,
        "9:0": md0,
        "252:0": zram,
    }.items():
        os.symlink(node, links / number)
    (sys / "block").mkdir()
    for name in ("dm-0", "dm-1", "dm-2", "dm-4"):
        (sys / "block" / name).mkdir()
    return sys


def test_lvm_on_dm_crypt_is_encrypted(tmp_path: Path) -> None:
    backing = blockdev.backing_of_devnum(253, 1, str(fake_sys(tmp_path)))
    assert backing == blockdev.Backing(True, False, "dm-1 (vg0-swap) on dm-0 (dm-crypt cr_root)")


def test_lvm_on_a_plain_partition_is_not(tmp_path: Path) -> None:
    backing = blockdev.backing_of_devnum(253, 2, str(fake_sys(tmp_path)))
    assert backing == blockdev.Backing(False, False, "dm-2 (vg1-swap) on sda2 on sda")


def test_raid_with_one_plain_member_is_not_encrypted(tmp_path: Path) -> None:
    backing = blockdev.backing_of_devnum(9, 0, str(fake_sys(tmp_path)))
    assert backing.encrypted is False
    assert "sdb1 on sdb" in backing.description


def test_zram_is_memory(tmp_path: Path) -> None:
    assert blockdev.backing_of_devnum(252, 0, str(fake_sys(tmp_path))).memory


def test_tmpfs_is_memory_and_unknown_numbers_cannot_be_told(tmp_path: Path) -> None:
    proc = tmp_path / "proc/self"
    proc.mkdir(parents=True)
    (proc / "mountinfo").write_text(
        "25 1 0:23 / /run rw,nosuid - tmpfs tmpfs rw,size=1631264k,mode=755\n"
    )
    sys = str(fake_sys(tmp_path))
    assert blockdev.backing_of_devnum(0, 23, sys, str(tmp_path / "proc")).memory
    assert blockdev.backing_of_devnum(0, 99, sys, str(tmp_path / "proc")).encrypted is None
    assert blockdev.backing_of_devnum(7, 7, sys).encrypted is None


def test_the_next_dm_name_is_the_lowest_free_minor(tmp_path: Path) -> None:
    assert blockdev.next_dm_name(str(fake_sys(tmp_path))) == "dm-3"


def test_swaps_decode_octal_escapes() -> None:
    text = (
        "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"
        "/swap\\040file                          file\t\t1048572\t\t0\t\t-2\n"
    )
    assert blockdev.parse_swaps(text) == [blockdev.Swap("/swap file", "file", 1048572)]


def test_stable_alias_prefers_hardware_ids() -> None:
    names = [
        "/dev/sda2",
        "/dev/disk/by-id/lvm-pv-uuid-abc",
        "/dev/disk/by-id/ata-Samsung_SSD_860-part2",
        "/dev/disk/by-id/wwn-0x5002538e40a1b2c3-part2",
    ]
    assert blockdev.stable_alias(names) == "/dev/disk/by-id/wwn-0x5002538e40a1b2c3-part2"
    assert blockdev.stable_alias(["/dev/sda2"]) is None


def test_systemctl_show_blocks_by_unit() -> None:
    text = "Id=a.socket\nActiveState=active\n\nId=a.service\nActiveState=failed\n"
    assert systemctl.parse_show(text) == [
        {"Id": "a.socket", "ActiveState": "active"},
        {"Id": "a.service", "ActiveState": "failed"},
    ]
