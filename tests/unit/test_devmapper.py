"""devmapper.devices(): a failing `dmsetup info` never makes an open mapping look closed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from luksvm import devmapper
from luksvm.errors import LuksvmError
from luksvm.run import Result

ROW = "dm-4|0|CRYPT-LUKS2-0123-cr_web|cr_web\n"


@pytest.fixture
def sysfs_with_cr_web(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "dm-4/dm").mkdir(parents=True)
    (tmp_path / "dm-4/dm/name").write_text("cr_web\n")
    monkeypatch.setattr(devmapper, "SYS_BLOCK", str(tmp_path))
    monkeypatch.setattr(devmapper.time, "sleep", lambda seconds: None)
    return tmp_path


def dmsetup(outcomes: list[tuple[int, str]]) -> Any:
    def fake(argv: tuple[str, ...], **kwargs: Any) -> Result:
        rc, out = outcomes.pop(0)
        return Result(tuple(argv), rc, out, "" if rc == 0 else "Device does not exist.")

    return fake


def test_a_failed_listing_while_a_mapping_exists_is_asked_again(
    sysfs_with_cr_web: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # another volume's lock closed its mapping between dmsetup's listing and its question
    monkeypatch.setattr(devmapper, "run", dmsetup([(1, ""), (0, ROW)]))
    assert [d.name for d in devmapper.devices()] == ["cr_web"]


def test_a_listing_that_keeps_failing_is_an_error_not_an_empty_list(
    sysfs_with_cr_web: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(devmapper, "run", dmsetup([(1, "")] * devmapper.INFO_ATTEMPTS))
    with pytest.raises(LuksvmError, match="cannot list the device-mapper devices") as caught:
        devmapper.devices()
    assert "Device does not exist." in caught.value.message


@pytest.mark.skipif(
    any(e.startswith("dm-") for e in os.listdir("/sys/block")), reason="this kernel has dm devices"
)
def test_no_device_mapper_in_the_kernel_means_no_devices() -> None:
    # the real dmsetup on this machine, whose kernel has no device-mapper, fails: nothing there
    assert devmapper.devices() == []
