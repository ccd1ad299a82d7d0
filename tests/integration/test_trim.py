"""The discard-chain check against this machine's real sysfs and cryptsetup (no VM)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from luksvm import config, trim
from tests.conftest import write_config
from tests.integration.conftest import make_luks

KEY = b"correct horse"
Attach = Callable[..., str]


def test_discard_chain_reads_a_real_loop_device_and_luks2_flags(
    tmp_path: Path, loop_device: Attach
) -> None:
    image = make_luks(tmp_path / "disk.img", KEY)
    device = loop_device(image)
    write_config(tmp_path, {"10.conf": f"cr_test {device} - luks,x-luksvm.guest=g\n"})
    volume = config.load(str(tmp_path)).volume("cr_test")
    devices = trim.HOST.stack(device)
    assert [d.kernel_name for d in devices] == [os.path.basename(device)]
    expected = int(
        Path(f"/sys/block/{os.path.basename(device)}/queue/discard_max_bytes").read_text()
    )
    assert trim.device_link(volume, devices).ok is (expected > 0)
    assert trim.HOST.header_flags(device) == ()  # formatted without --allow-discards
    assert trim.crypt_link(volume, trim.HOST.header_flags(device), None).ok is False
