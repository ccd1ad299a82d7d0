from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from luksvm import lvm
from tests.integration.conftest import sh, unique


def test_reports_find_the_vg_on_a_device(
    tmp_path: Path, lvm_env: dict[str, str], loop_device: Callable[[Path], str]
) -> None:
    image = tmp_path / "pv.img"
    sh("truncate", "-s", "64M", str(image))
    device = loop_device(image)
    vg = unique("lvtest")
    sh("pvcreate", "-q", device, env=lvm_env)
    try:
        sh("vgcreate", "-q", "-s", "4m", vg, device, env=lvm_env)
        (pv,) = lvm.physical_volumes([device])
        assert (pv.name, pv.vg_name) == (device, vg)
        assert pv.device_size == 64 * 1024 * 1024
        assert pv.pe_start == 1024 * 1024
        assert pv.size == 60 * 1024 * 1024  # whole 4 MiB extents after the 1 MiB metadata area
        assert lvm.vgs_on(device) == [vg]
        assert lvm.pvs_of(vg, [device]) == [device]
    finally:
        sh("vgremove", "-q", "-f", vg, env=lvm_env)
        sh("pvremove", "-q", device, env=lvm_env)


def test_version_parses_this_machines_lvm() -> None:
    major, minor, _ = lvm.version()
    assert (major, minor) >= (2, 2)
    assert lvm.parse_version("  LVM version:     2.02.187(2)-RHEL7 (2020-03-24)\n") == (2, 2, 187)
