from __future__ import annotations

from pathlib import Path

from luksvm import blockdev
from tests.unit.fake_sysfs import add_device, host_stack


def test_stack_walks_slaves_and_partitions_top_down(tmp_path: Path) -> None:
    host_stack(tmp_path, lv_discard=4096)
    devices = blockdev.stack("253:4", str(tmp_path))
    assert [(d.kernel_name, d.depth) for d in devices] == [
        ("dm-4", 0),
        ("dm-3", 1),
        ("dm-2", 2),
        ("sda2", 3),
        ("sda", 4),
    ]
    crypt = devices[1]
    assert crypt.is_crypt and crypt.label == "cr_imap_encr (dm-3)"
    assert devices[2].discard_max_bytes == 4096
    assert devices[3].discard_max_bytes == devices[4].discard_max_bytes  # a partition: its disk's


def test_stack_of_an_unknown_number_is_empty_and_a_loop_in_sysfs_ends(tmp_path: Path) -> None:
    assert blockdev.stack("1:1", str(tmp_path)) == []
    add_device(tmp_path, "dm-0", "253:0", dm_name="a", slaves=("dm-1",))
    add_device(tmp_path, "dm-1", "253:1", dm_name="b", slaves=("dm-0",))
    assert [d.kernel_name for d in blockdev.stack("253:0", str(tmp_path))] == ["dm-0", "dm-1"]


def test_filesystem_device_of_a_missing_path_is_its_nearest_parents(tmp_path: Path) -> None:
    assert blockdev.filesystem_device(str(tmp_path / "not/yet")) == blockdev.filesystem_device(
        str(tmp_path)
    )
