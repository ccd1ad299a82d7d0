from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest

from luksvm import migrate
from luksvm.errors import UsageError
from luksvm.migrate import Request, SourceDisk

MiB = 1024 * 1024
GiB = 1024 * MiB

DOMAIN = """<domain type='kvm'>
  <name>mail</name>
  <uuid>4dea22b3-1d52-d8f3-2516-782e98ab3fa0</uuid>
  <memory unit='KiB'>2097152</memory>
  <!-- keep me -->
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file='/var/lib/libvirt/images/mail.qcow2'/>
      <backingStore type='file'>
        <format type='qcow2'/>
        <source file='/var/lib/libvirt/images/base.qcow2'/>
      </backingStore>
      <target dev='vda' bus='virtio'/>
      <address type='pci' domain='0x0000' bus='0x04' slot='0x00' function='0x0'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/srv/iso/debian.iso'/>
      <target dev='sda' bus='sata'/>
    </disk>
    <interface type='network'>
      <mac address='52:54:00:12:34:56'/>
      <source network='default'/>
    </interface>
  </devices>
</domain>"""


def info(fmt: str, size: int, **extra: object) -> str:
    return json.dumps({"format": fmt, "virtual-size": size, "actual-size": 4096, **extra})


def test_size_is_disk_plus_header_in_whole_extents() -> None:
    source = SourceDisk.from_qemu_img_info("/x.qcow2", info("qcow2", 20 * GiB), block=False)
    assert migrate.target_size(source, 4 * MiB) == 20 * GiB + 16 * MiB
    odd = SourceDisk("/x.img", "raw", False, 20 * GiB + 512)
    assert migrate.target_size(odd, 4 * MiB) == 20 * GiB + 20 * MiB


def test_unsupported_format_is_refused() -> None:
    with pytest.raises(UsageError, match="'vmdk' is not supported"):
        SourceDisk.from_qemu_img_info("/x.vmdk", info("vmdk", GiB), block=False)


def test_rewrite_replaces_only_that_disks_source() -> None:
    new = migrate.rewrite_domain_xml(DOMAIN, "vda", "/dev/mapper/cr_mail")
    disk = migrate.domain_disk(new, "vda")
    assert (disk.type, disk.source, disk.driver_type) == ("block", "/dev/mapper/cr_mail", "raw")
    parsed = ET.fromstring(new)
    vda = parsed.find("./devices/disk/target[@dev='vda']/..")
    assert vda is not None
    assert vda.find("backingStore") is None
    driver = vda.find("driver")
    assert driver is not None
    assert driver.attrib == {"name": "qemu", "type": "raw", "cache": "none", "discard": "unmap"}
    assert [c.tag for c in vda] == ["driver", "source", "target", "address"]


def test_rewrite_keeps_everything_else_identical_in_meaning() -> None:
    new = migrate.rewrite_domain_xml(DOMAIN, "vda", "/dev/mapper/cr_mail")
    before, after = migrate.canonical(DOMAIN), migrate.canonical(new)
    for domain in (before, after):
        devices = domain.find("devices")
        assert devices is not None
        devices.remove(devices.findall("disk")[0])
    assert ET.tostring(before) == ET.tostring(after)
    assert "<!-- keep me -->" in new


def test_rewrite_of_unknown_disk_names_the_disks() -> None:
    with pytest.raises(UsageError, match=r"no disk with target dev 'vdz' \(its disks: vda, sda\)"):
        migrate.rewrite_domain_xml(DOMAIN, "vdz", "/dev/mapper/x")
    with pytest.raises(UsageError, match="is a cdrom, not a disk"):
        migrate.rewrite_domain_xml(DOMAIN, "sda", "/dev/mapper/x")


def test_plan_commands_are_exact() -> None:
    request = Request("mail", "vda", "volgrp4", "lvimap_hd0", "cr_imap_encr")
    source = SourceDisk("/var/lib/libvirt/images/mail.qcow2", "qcow2", False, 20 * GiB)
    steps = {s.name: s for s in migrate.plan(request, source, 4 * MiB)}
    assert steps["create-lv"].argv == (
        "lvcreate",
        "--yes",
        "--size",
        f"{20 * GiB + 16 * MiB}b",
        "--name",
        "lvimap_hd0",
        "volgrp4",
    )
    assert steps["format"].argv == (
        "cryptsetup",
        "luksFormat",
        "--batch-mode",
        "--type",
        "luks2",
        "--offset",
        "32768",
        "--key-file=-",
        "--sector-size",
        "512",
        "/dev/volgrp4/lvimap_hd0",
    )
    assert steps["format"].secret_stdin and steps["open"].secret_stdin
    assert steps["copy"].argv[-2:] == (source.path, "/dev/mapper/cr_imap_encr")
    assert steps["copy"].argv[4:6] == ("-S", "0")
    verify = steps["verify"].argv
    assert verify[:5] == ("qemu-img", "compare", "-f", "qcow2", source.path)
    assert json.loads(verify[5][len("json:") :])["size"] == 20 * GiB
    assert list(steps) == [
        "create-lv",
        "format",
        "open",
        "copy",
        "verify",
        "redefine",
        "configure",
        "header-backup",
    ]


def test_no_key_material_in_any_argv() -> None:
    request = Request("mail", "vda", "vg", "lv", "cr", luks_type="luks1", cipher="aes-xts-plain64")
    for step in migrate.plan(request, SourceDisk("/a.img", "raw", False, GiB), 4 * MiB):
        assert not any("pass" in arg or "key=" in arg for arg in step.argv)
    assert (
        "--sector-size"
        not in next(
            s
            for s in migrate.plan(request, SourceDisk("/a.img", "raw", False, GiB), 4 * MiB)
            if s.name == "format"
        ).argv
    )


def test_bad_request_options_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="--luks-type 'luks3'"):
        Request("g", "vda", "vg", "lv", "m", luks_type="luks3")
