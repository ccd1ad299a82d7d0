"""A small fake /sys for block-device tests: devices, slaves, dm names and UUIDs, discard limits."""

from __future__ import annotations

import os
from pathlib import Path


def add_device(
    sys_dir: Path,
    name: str,
    number: str,
    *,
    dm_name: str = "",
    dm_uuid: str = "",
    discard_max_bytes: int | None = 2147450880,
    slaves: tuple[str, ...] = (),
    parent: str = "",
) -> None:
    """One block device as sysfs shows it; `parent` makes it a partition of that disk (no queue
    of its own)."""
    real = sys_dir / "devices/virtual/block" / (f"{parent}/{name}" if parent else name)
    real.mkdir(parents=True, exist_ok=True)
    (real / "dev").write_text(number + "\n")
    if parent:
        (real / "partition").write_text("1\n")
    elif discard_max_bytes is not None:
        (real / "queue").mkdir(exist_ok=True)
        (real / "queue/discard_max_bytes").write_text(f"{discard_max_bytes}\n")
    if dm_name:
        (real / "dm").mkdir(exist_ok=True)
        (real / "dm/name").write_text(dm_name + "\n")
        (real / "dm/uuid").write_text(dm_uuid + "\n")
    (real / "slaves").mkdir(exist_ok=True)
    (real / "holders").mkdir(exist_ok=True)
    for slave in slaves:
        (real / "slaves" / slave).touch()
    for directory in ("class/block", "dev/block"):
        (sys_dir / directory).mkdir(parents=True, exist_ok=True)
    os.symlink(real, sys_dir / "class/block" / name)
    os.symlink(real, sys_dir / "dev/block" / number)


def host_stack(sys_dir: Path, *, disk_discard: int = 2147450880, lv_discard: int = 0) -> None:
    """guest LV dm-4 on mapping dm-3 (cr_imap_encr) on host LV dm-2 on sda2 on disk sda."""
    add_device(sys_dir, "sda", "8:0", discard_max_bytes=disk_discard)
    add_device(sys_dir, "sda2", "8:2", parent="sda")
    add_device(
        sys_dir, "dm-2", "253:2", dm_name="volgrp4-lvimap_hd0", dm_uuid="LVM-abc",
        slaves=("sda2",), discard_max_bytes=lv_discard,
    )  # fmt: skip
    add_device(
        sys_dir, "dm-3", "253:3", dm_name="cr_imap_encr",
        dm_uuid="CRYPT-LUKS2-0123456789abcdef0123456789abcdef-cr_imap_encr", slaves=("dm-2",),
    )  # fmt: skip
    add_device(sys_dir, "dm-4", "253:4", dm_name="vgmail-root", dm_uuid="LVM-x", slaves=("dm-3",))
