from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from luksvm import migrate, qemuimg, virt
from luksvm.config import Location, Volume
from luksvm.errors import LuksvmError, UsageError
from luksvm.migrate import Request, Situation, SourceDisk

MiB = 1024 * 1024
GiB = 1024 * MiB

DOMAIN = """<domain type='kvm'>
  <name>mail</name>
  <uuid>4dea22b3-1d52-d8f3-2516-782e98ab3fa0</uuid>
  <metadata>
    <libosinfo:libosinfo xmlns:libosinfo="http://libosinfo.org/xmlns/libvirt/domain/1.0">
      <libosinfo:os id="http://debian.org/debian/12"/>
    </libosinfo:libosinfo>
  </metadata>
  <memory unit='KiB'>2097152</memory>
  <!-- keep me -->
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file='/var/lib/libvirt/images/mail.qcow2'>
        <seclabel model='dac' relabel='no'/>
      </source>
      <backingStore type='file'>
        <format type='qcow2'/>
        <source file='/var/lib/libvirt/images/base.qcow2'/>
      </backingStore>
      <target dev='vda' bus='virtio'/>
      <boot order='1'/>
      <address type='pci' domain='0x0000' bus='0x04' slot='0x00' function='0x0'/>
    </disk>
    <disk type='block' device='disk'>
      <source dev='/dev/volgrp4/mail_spool'/>
      <target dev='vdb' bus='virtio'/>
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

# `qemu-img info --output=json -f qcow2` of an overlay on a raw backing file (qemu-img 7.2)
QCOW2_OVERLAY_INFO = """{
    "backing-filename-format": "raw", "virtual-size": 8388608, "filename": "ov.qcow2",
    "cluster-size": 65536, "format": "qcow2", "actual-size": 200704,
    "full-backing-filename": "base.raw", "backing-filename": "base.raw", "dirty-flag": false
}"""


def info(fmt: str, size: int, **extra: object) -> str:
    return json.dumps({"format": fmt, "virtual-size": size, "actual-size": 4096, **extra})


def request(**changes: object) -> Request:
    fields: dict[str, object] = {
        "guest": "mail",
        "disk": "vda",
        "vg": "volgrp4",
        "lv": "lvimap_hd0",
        "mapping": "cr_imap_encr",
    }
    fields.update(changes)
    return Request(**fields)  # type: ignore[arg-type]


# --- sizes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "block", "luks_type", "header", "in_4mib_extents"),
    [
        ("raw", False, "luks2", 16 * MiB, 16 * MiB),
        ("qcow2", False, "luks2", 16 * MiB, 16 * MiB),
        ("raw", True, "luks2", 16 * MiB, 16 * MiB),
        ("raw", False, "luks1", 2 * MiB, 4 * MiB),
        ("qcow2", False, "luks1", 2 * MiB, 4 * MiB),
        ("raw", True, "luks1", 2 * MiB, 4 * MiB),
    ],
)
def test_size_is_disk_plus_that_formats_header_in_whole_extents(
    fmt: str, block: bool, luks_type: str, header: int, in_4mib_extents: int
) -> None:
    source = SourceDisk.from_qemu_img_info("/x", info(fmt, 20 * GiB), block=block)
    assert (source.format, source.block) == (fmt, block)
    assert migrate.target_size(source, MiB, luks_type) == 20 * GiB + header
    assert migrate.target_size(source, 4 * MiB, luks_type) == 20 * GiB + in_4mib_extents
    # one sector more than a whole extent's worth costs a whole extent more
    odd = SourceDisk("/x", fmt, block, 20 * GiB + 512)
    assert migrate.target_size(odd, MiB, luks_type) == 20 * GiB + header + MiB
    # 32 MiB extents swallow either header's rounding
    assert migrate.target_size(source, 32 * MiB, luks_type) == 20 * GiB + 32 * MiB


def test_qcow2_overlay_reads_its_virtual_size_not_its_file_size() -> None:
    source = SourceDisk.from_qemu_img_info("/ov.qcow2", QCOW2_OVERLAY_INFO, block=False)
    assert source == SourceDisk("/ov.qcow2", "qcow2", False, 8 * MiB)
    assert qemuimg.parse_info("/ov.qcow2", QCOW2_OVERLAY_INFO).backing == "base.raw"


def test_unsupported_format_is_refused() -> None:
    with pytest.raises(UsageError, match="'vmdk' is not supported"):
        SourceDisk.from_qemu_img_info("/x.vmdk", info("vmdk", GiB), block=False)


# --- domain XML ----------------------------------------------------------------------------


def test_rewrite_replaces_only_that_disks_source() -> None:
    new = migrate.rewrite_domain_xml(DOMAIN, "vda", "/dev/mapper/cr_mail")
    disk = migrate.domain_disk(new, "vda")
    assert (disk.type, disk.source, disk.driver_type) == ("block", "/dev/mapper/cr_mail", "raw")
    vda = ET.fromstring(new).find("./devices/disk/target[@dev='vda']/..")
    assert vda is not None
    assert vda.find("backingStore") is None
    driver = vda.find("driver")
    assert driver is not None
    assert driver.attrib == {"name": "qemu", "type": "raw", "cache": "none", "discard": "unmap"}
    assert [c.tag for c in vda] == ["driver", "source", "target", "boot", "address"]
    source = vda.find("source")
    assert source is not None and source.attrib == {"dev": "/dev/mapper/cr_mail"}
    assert list(source) == []  # the old image's seclabel went with it


def test_rewrite_keeps_everything_else_identical_in_meaning() -> None:
    new = migrate.rewrite_domain_xml(DOMAIN, "vda", "/dev/mapper/cr_mail")
    before, after = migrate.canonical(DOMAIN), migrate.canonical(new)
    for domain in (before, after):
        devices = domain.find("devices")
        assert devices is not None
        devices.remove(devices.findall("disk")[0])
    assert ET.tostring(before) == ET.tostring(after)
    assert "<!-- keep me -->" in new
    # metadata of other tools keeps its namespace and prefix
    assert "<libosinfo:os id=" in new
    assert migrate.same_domain(DOMAIN, DOMAIN) and not migrate.same_domain(DOMAIN, new)


def test_rewrite_of_a_block_disk_without_driver_adds_one() -> None:
    new = migrate.rewrite_domain_xml(DOMAIN, "vdb", "/dev/mapper/cr_spool")
    vdb = ET.fromstring(new).find("./devices/disk/target[@dev='vdb']/..")
    assert vdb is not None
    assert [c.tag for c in vdb] == ["driver", "source", "target"]
    driver = vdb.find("driver")
    assert driver is not None
    assert driver.attrib == {"name": "qemu", "type": "raw", "discard": "unmap"}


def test_rewrite_of_unknown_disk_names_the_disks() -> None:
    with pytest.raises(
        UsageError, match=r"no disk with target dev 'vdz' \(its disks: vda, vdb, sda\)"
    ):
        migrate.rewrite_domain_xml(DOMAIN, "vdz", "/dev/mapper/x")
    with pytest.raises(UsageError, match="is a cdrom, not a disk"):
        migrate.rewrite_domain_xml(DOMAIN, "sda", "/dev/mapper/x")


def test_domain_disk_reads_type_format_and_encryption() -> None:
    assert migrate.domain_disk(DOMAIN, "vda") == virt.Disk(
        "vda", "disk", "/var/lib/libvirt/images/mail.qcow2", "file", "qcow2"
    )
    encrypted = DOMAIN.replace(
        "<target dev='vda'", "<encryption format='luks'><secret type='passphrase' uuid='x'/>"
        "</encryption><target dev='vda'"
    )  # fmt: skip
    assert migrate.domain_disk(encrypted, "vda").encrypted


# --- the plan ------------------------------------------------------------------------------


def test_plan_commands_are_exact() -> None:
    source = SourceDisk("/var/lib/libvirt/images/mail.qcow2", "qcow2", False, 20 * GiB)
    steps = {s.name: s for s in migrate.plan(request(), source, 4 * MiB)}
    assert list(steps) == list(migrate.STEP_NAMES)
    assert steps["create-lv"].argv == (
        "lvcreate", "--yes", "--size", f"{20 * GiB + 16 * MiB}b", "--name", "lvimap_hd0", "volgrp4",
    )  # fmt: skip
    assert steps["format"].argv == (
        "cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2", "--offset", "32768",
        "--key-file=-", "--sector-size", "512", "/dev/volgrp4/lvimap_hd0",
    )  # fmt: skip
    assert steps["open"].argv == (
        "cryptsetup", "open", "--type", "luks", "--allow-discards", "--key-file=-",
        "/dev/volgrp4/lvimap_hd0", "cr_imap_encr",
    )  # fmt: skip
    assert steps["format"].secret_stdin and steps["open"].secret_stdin
    assert steps["copy"].argv == (
        "qemu-img", "convert", "-p", "-n", "-S", "0", "-t", "none", "-f", "qcow2", "-O", "raw",
        source.path, "/dev/mapper/cr_imap_encr",
    )  # fmt: skip
    (verify,) = steps["verify"].commands
    assert verify[:6] == ("qemu-img", "compare", "-p", "-f", "qcow2", source.path)
    assert json.loads(verify[6][len("json:") :]) == {
        "driver": "raw",
        "file": {"driver": "host_device", "filename": "/dev/mapper/cr_imap_encr"},
        "size": 20 * GiB,
    }
    for name in ("check-header", "redefine", "configure", "adopt", "header-backup"):
        assert steps[name].commands == ()


def test_luks1_plan_pins_its_own_offset_and_passes_the_chosen_crypto() -> None:
    r = request(luks_type="luks1", cipher="aes-xts-plain64", hash="sha512", key_size=512,
                pbkdf_iterations=1000)  # fmt: skip
    steps = {s.name: s for s in migrate.plan(r, SourceDisk("/a.img", "raw", False, GiB), 4 * MiB)}
    assert steps["create-lv"].argv[3] == f"{GiB + 4 * MiB}b"  # 1 GiB + 2 MiB → whole extents
    assert steps["format"].argv == (
        "cryptsetup", "luksFormat", "--batch-mode", "--type", "luks1", "--offset", "4096",
        "--key-file=-", "--cipher", "aes-xts-plain64", "--hash", "sha512", "--key-size", "512",
        "--pbkdf-force-iterations", "1000", "/dev/volgrp4/lvimap_hd0",
    )  # fmt: skip


def test_no_key_material_in_any_argv() -> None:
    r = request(key="/etc/luksvm/keys/imap.key")
    for step in migrate.plan(r, SourceDisk("/a.img", "raw", False, GiB), 4 * MiB):
        for argv in step.commands:
            assert not any("imap.key" in arg or "passphrase" in arg for arg in argv)
            assert "--key-file=-" in argv or not step.secret_stdin


def test_sampled_verify_compares_spread_windows_of_the_first_source_size_bytes() -> None:
    size = 10 * GiB + 512
    offsets = migrate.sample_offsets(size)
    assert len(offsets) == migrate.SAMPLE_WINDOWS
    assert offsets[0] == 0 and offsets[-1] == (size - MiB) // 512 * 512
    assert all(o % 512 == 0 for o in offsets)
    r = request(verify="sample")
    commands = migrate.verify_commands(r, SourceDisk("/a.qcow2", "qcow2", False, size), "/s")
    assert len(commands) == migrate.SAMPLE_WINDOWS
    assert commands[0] == (
        "qemu-img", "dd", "-f", "qcow2", "-O", "raw", "bs=512", "skip=0", "count=2048",
        "if=/a.qcow2", "of=/s",
    )  # fmt: skip
    # qemu-img dd's count includes the skipped blocks: it is where the window ends
    assert commands[-1][7:9] == (f"skip={offsets[-1] // 512}", f"count={offsets[-1] // 512 + 2048}")
    assert offsets[-1] + MiB <= size
    # small disks: every window, so the whole disk is compared
    assert migrate.sample_offsets(3 * MiB + 512) == [0, MiB, 2 * MiB, 3 * MiB]


def test_dry_run_listing_shows_every_step_and_its_commands() -> None:
    source = SourceDisk("/img/mail.raw", "raw", False, 20 * GiB)
    lines = migrate.format_plan(migrate.plan(request(), source, 4 * MiB))
    text = "\n".join(lines)
    assert lines[0].startswith(" 1. create /dev/volgrp4/lvimap_hd0: 21,491,613,696 B (20.02 GiB)")
    assert "lvcreate --yes --size 21491613696b --name lvimap_hd0 volgrp4" in text
    assert "< key on stdin" in text
    assert "qemu-img convert -p -n -S 0 -t none -f raw -O raw /img/mail.raw /dev/mapper/" in text
    assert "10. back up the LUKS header of cr_imap_encr" in text


# --- preconditions -------------------------------------------------------------------------


def situation(**changes: object) -> Situation:
    fields: dict[str, object] = {
        "guest_state": "shutoff",
        "managed_save": False,
        "disk": virt.Disk("vda", "disk", "/img/mail.qcow2", "file", "qcow2"),
        "source_kind": "file",
        "source_is_crypt": False,
        "vg_found": True,
        "extent_size": 4 * MiB,
        "vg_free": 100 * GiB,
        "lv_exists": False,
        "mapping_exists": False,
        "config_volumes": (),
        "lv_device": "",
        "source_real": "/img/mail.qcow2",
    }
    fields.update(changes)
    return Situation(**fields)  # type: ignore[arg-type]


def test_a_clean_situation_has_no_refusals() -> None:
    assert migrate.refusals(request(), situation(), 20 * GiB, shutdown=False) == []


@pytest.mark.parametrize(
    ("changes", "size", "shutdown", "expected"),
    [
        ({"guest_state": "running"}, GiB, False, "guest mail is running; shut it off first"),
        ({"managed_save": True}, GiB, False, "virsh managedsave-remove mail"),
        ({"vg_free": GiB}, 2 * GiB, False, "VG volgrp4 has 1,073,741,824 B (1 GiB) free"),
        ({"vg_found": False}, None, False, "VG volgrp4 not found"),
        ({"lv_exists": True}, GiB, False, "LV volgrp4/lvimap_hd0 exists already"),
        ({"mapping_exists": True}, GiB, False, "/dev/mapper/cr_imap_encr exists already"),
        ({"source_kind": "missing"}, None, False, "source /img/mail.qcow2 does not exist"),
        ({"source_kind": "block"}, GiB, False, "is not a regular file, as the domain's type"),
        ({"source_is_crypt": True}, GiB, False, "is a dm-crypt mapping"),
        (
            {"disk": virt.Disk("vda", "disk", "", "network", "raw")},
            None,
            False,
            "of type 'network'",
        ),
        (
            {"disk": virt.Disk("vda", "disk", "/a.vmdk", "file", "vmdk")},
            None,
            False,
            "is vmdk; luksvm migrates raw and qcow2 only",
        ),
        (
            {"disk": virt.Disk("vda", "disk", "/a.qcow2", "file", "qcow2", encrypted=True)},
            GiB,
            False,
            "encrypted by qemu already",
        ),
    ],
)
def test_refusals_say_what_and_how(
    changes: dict[str, object], size: int | None, shutdown: bool, expected: str
) -> None:
    found = migrate.refusals(request(), situation(**changes), size, shutdown=shutdown)
    assert any(expected in line for line in found), found


def test_running_guest_is_fine_with_shutdown() -> None:
    assert migrate.refusals(request(), situation(guest_state="running"), GiB, shutdown=True) == []


def test_mapping_name_or_lv_configured_already_is_refused() -> None:
    where = Location("/etc/luksvm/crypttab.d/10-a.conf", 3)
    volumes = (
        Volume(
            "cr_imap_encr",
            "/dev/x/y",
            "/dev/x/y",
            migrate.fragment_volume(request()).key,
            (),
            (),
            where,
        ),
        Volume(
            "cr_other",
            "/dev/volgrp4/lvimap_hd0",
            "/dev/volgrp4/lvimap_hd0",
            migrate.fragment_volume(request()).key,
            (),
            (),
            where,
        ),
    )
    found = migrate.refusals(
        request(), situation(config_volumes=volumes, lv_device="/dev/dm-9"), GiB, shutdown=False
    )
    assert any("mapping name cr_imap_encr is configured already (/etc/luksvm" in f for f in found)
    assert any("source of configured volume cr_other" in f for f in found)


# --- request, fragment, state ----------------------------------------------------------------


def test_fragment_is_one_volume_with_its_guest_and_key() -> None:
    r = request(key="/etc/luksvm/keys/imap.key")
    text = migrate.fragment_text(r)
    assert text.splitlines()[1] == (
        "cr_imap_encr /dev/volgrp4/lvimap_hd0 /etc/luksvm/keys/imap.key "
        "luks,discard,x-luksvm.guest=mail"
    )
    volume = migrate.fragment_volume(r)
    assert (volume.key.kind, volume.guests, volume.has_flag("discard")) == ("file", ("mail",), True)
    assert migrate.fragment_volume(request()).key.kind == "ask"
    keyring = migrate.fragment_volume(request(key="keyring:luksvm/cr_imap"))
    assert (keyring.key.service, keyring.key.user) == ("luksvm", "cr_imap")


def test_bad_key_spec_and_names_are_usage_errors() -> None:
    with pytest.raises(UsageError, match=r'--key "keys/imap\.key" is a relative path'):
        migrate.fragment_volume(request(key="keys/imap.key"))
    with pytest.raises(UsageError, match="--luks-type 'luks3'"):
        request(luks_type="luks3")
    with pytest.raises(UsageError, match="--name 'cr imap'"):
        request(mapping="cr imap")
    with pytest.raises(UsageError, match="VG name '-vg'"):
        request(vg="-vg")
    with pytest.raises(UsageError, match="LUKS1 knows only pbkdf2"):
        request(luks_type="luks1", pbkdf="argon2id")
    with pytest.raises(UsageError, match="expected VG/LV"):
        migrate.split_vg_lv("volgrp4")


def test_state_round_trips_and_is_private(tmp_path: Path) -> None:
    path = migrate.state_path(str(tmp_path), "mail", "vda")
    state = migrate.State(path, request(), SourceDisk("/a", "raw", False, GiB), 2 * GiB, 4 * MiB)
    state.mark("create-lv")
    loaded = migrate.State.load(path)
    assert loaded == state
    assert (Path(path).stat().st_mode & 0o777, Path(path).parent.stat().st_mode & 0o777) == (
        0o600,
        0o700,
    )
    assert [s.path for s in migrate.states_of(str(tmp_path), "mail")] == [path]
    assert migrate.states_of(str(tmp_path), "mai") == []
    Path(path).write_text("{")
    with pytest.raises(LuksvmError, match="unreadable migration record"):
        migrate.State.load(path)


def test_progress_reports_bytes_rate_and_time_left() -> None:
    assert migrate.progress_text(0.25, 20 * GiB, 30.0) == (
        "5.00 GiB of 20.00 GiB (25.0 %), 170.7 MiB/s, 1 min 30 s left"
    )
    assert migrate.progress_text(1.0, 20 * GiB, 120.0).endswith("170.7 MiB/s")
    assert migrate.progress_text(0.0, GiB, 0.0) == "0.0 MiB of 1.00 GiB (0.0 %)"
    assert qemuimg.progress_fraction("    (0.00/100%)\r    (12.50/100%)") == 0.125


def test_progress_prints_every_tenth_when_not_on_a_terminal() -> None:
    lines: list[str] = []
    now = [0.0]
    progress = migrate.Progress("copied", 100 * MiB, lines.append, tty=False, clock=lambda: now[0])
    for percent in range(0, 101):
        now[0] = percent / 10
        progress(f"    ({percent:.2f}/100%)")
    assert len(lines) == 11
    assert lines[-1] == "  copied: 100.0 MiB of 100.0 MiB (100.0 %), 10.0 MiB/s"
    progress("    (100.00/100%)")
    assert len(lines) == 11, "the repeated final share printed again"


def test_delete_hint_names_the_right_command() -> None:
    assert migrate.delete_hint(SourceDisk("/img/a b.raw", "raw", False, GiB)) == (
        "Delete it when satisfied: rm -- '/img/a b.raw'"
    )
    assert migrate.delete_hint(SourceDisk("/dev/vg0/mail", "raw", True, GiB)).endswith(
        "lvremove vg0/mail"
    )
    assert "wipefs" in migrate.delete_hint(SourceDisk("/dev/sdb", "raw", True, GiB))
