from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from luksvm import blockdev, config, trim, virt
from luksvm.cryptsetup import MappingStatus
from luksvm.errors import LuksvmError
from tests.conftest import write_config
from tests.unit.fake_sysfs import host_stack

DOMAIN = """<domain type='kvm'><name>mail</name><devices>
  <disk type='block' device='disk'>
    <driver name='qemu' type='raw' cache='none' io='native'{discard}/>
    <source dev='/dev/mapper/cr_imap_encr'/><target dev='vda' bus='virtio'/>
  </disk>
  <disk type='file' device='cdrom'><target dev='sda' bus='sata'/></disk>
</devices></domain>"""


class Refused(LuksvmError):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class FakeDomain:
    def __init__(self, name: str, xml: str, running: bool = True, error: Exception | None = None):
        self.name = name
        self._xml = xml
        self._running = running
        self._error = error
        self.trimmed = 0

    def is_running(self) -> bool:
        return self._running

    def xml(self) -> str:
        return self._xml

    def fs_trim(self) -> None:
        if self._error:
            raise self._error
        self.trimmed += 1


class FakeHypervisor:
    def __init__(self, *domains: FakeDomain) -> None:
        self.domains = {d.name: d for d in domains}

    def find(self, name: str) -> FakeDomain | None:
        return self.domains.get(name)


def connect_to(hypervisor: FakeHypervisor):  # type: ignore[no-untyped-def]
    @contextlib.contextmanager
    def connect() -> Iterator[FakeHypervisor]:
        yield hypervisor

    return connect


def probe(
    sys_dir: Path, *, open_with_discards: bool | None = None, flags: Sequence[str] = ()
) -> trim.Probe:
    def mapping(name: str) -> MappingStatus:
        active = open_with_discards is not None
        return MappingStatus(name, active, active, "", 0, 0, bool(open_with_discards))

    return trim.Probe(
        header_flags=lambda device: flags,
        mapping=mapping,
        stack=lambda device: blockdev.stack("253:2", str(sys_dir)),
    )


@pytest.fixture
def cfg(tmp_path: Path) -> config.Config:
    root = tmp_path / "root"
    write_config(
        root,
        {
            "10.conf": "cr_imap_encr /dev/volgrp4/lvimap_hd0 - luks,discard,x-luksvm.guest=mail\n"
            "cr_web /dev/volgrp4/lvweb_hd0 - luks,x-luksvm.guest=web\n"
        },
    )
    return config.load(str(root))


def test_domain_disks_read_the_discard_mode() -> None:
    disks = virt.disks_from_xml(DOMAIN.format(discard=" discard='unmap'"))
    assert [(d.target, d.source, d.discard) for d in disks] == [
        ("vda", "/dev/mapper/cr_imap_encr", "unmap"),
        ("sda", "", ""),
    ]


def test_whole_chain_passes_and_the_guest_is_trimmed(cfg: config.Config, tmp_path: Path) -> None:
    host_stack(tmp_path / "sys", lv_discard=4096)
    domain = FakeDomain("mail", DOMAIN.format(discard=" discard='unmap'"))
    (result,) = trim.trim_guests(
        cfg, ["mail"], connect_to(FakeHypervisor(domain)), probe(tmp_path / "sys")
    )
    assert (result.trim, domain.trimmed, result.ok) == ("trimmed", 1, True)
    (chain,) = result.disks
    assert chain.broken is None
    assert [link.name for link in chain.links] == ["domain disk", "dm-crypt", "backing device"]


def test_missing_unmap_is_the_first_broken_link(cfg: config.Config, tmp_path: Path) -> None:
    host_stack(tmp_path / "sys", lv_discard=4096)
    domain = FakeDomain("mail", DOMAIN.format(discard=""))
    (result,) = trim.trim_guests(
        cfg, [], connect_to(FakeHypervisor(domain)), probe(tmp_path / "sys")
    )[:1]
    broken = result.disks[0].broken
    assert broken is not None and broken.name == "domain disk"
    assert "discard='(unset)'" in broken.detail and "virsh edit mail" in broken.fix
    assert not result.ok


def test_mapping_opened_without_discards_breaks_the_chain(
    cfg: config.Config, tmp_path: Path
) -> None:
    host_stack(tmp_path / "sys", lv_discard=4096)
    volume = cfg.volume("cr_imap_encr")
    link = trim.crypt_link(volume, (), MappingStatus("cr_imap_encr", True, True, "", 0, 0, False))
    assert link.ok is False and "although crypttab option discard asks" in link.detail
    web = cfg.volume("cr_web")
    assert trim.crypt_link(web, (), None).ok is False
    assert trim.crypt_link(web, ("allow-discards",), None).ok is True


def test_a_disk_without_discard_is_named_below_the_lv(cfg: config.Config, tmp_path: Path) -> None:
    host_stack(tmp_path / "sys", disk_discard=0, lv_discard=0)
    link = trim.device_link(
        cfg.volume("cr_imap_encr"), blockdev.stack("253:2", str(tmp_path / "sys"))
    )
    assert link.ok is False
    assert link.detail.startswith("sda below /dev/volgrp4/lvimap_hd0 does not accept discards")


@pytest.mark.parametrize(
    ("code", "state"), [(74, "agent missing"), (86, "agent missing"), (84, "not possible")]
)
def test_agent_errors_are_reported_per_guest(
    cfg: config.Config, tmp_path: Path, code: int, state: str
) -> None:
    host_stack(tmp_path / "sys", lv_discard=4096)
    mail = FakeDomain("mail", DOMAIN.format(discard=" discard='unmap'"), error=Refused("no", code))
    web = FakeDomain("web", "<domain><devices/></domain>", running=False)
    results = trim.trim_guests(
        cfg,
        [],
        connect_to(FakeHypervisor(mail, web)),
        probe(tmp_path / "sys", open_with_discards=True),
    )
    assert [(r.guest, r.trim) for r in results] == [("mail", state), ("web", "not running")]
    assert ("qemu-guest-agent" in results[0].detail) == (state == "agent missing")
    assert results[1].disks[0].broken is not None  # web: no disk with its mapping, no discard
    report = trim.report(results)
    assert "fstrim.timer" in str(report["host"])


def test_unknown_domain_and_guest_names(cfg: config.Config, tmp_path: Path) -> None:
    (result,) = trim.trim_guests(cfg, ["web"], connect_to(FakeHypervisor()), probe(tmp_path))
    assert result.trim == "no domain"
    with pytest.raises(LuksvmError, match="no guest 'db'"):
        trim.trim_guests(cfg, ["db"], connect_to(FakeHypervisor()), probe(tmp_path))
