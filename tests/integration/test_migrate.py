"""migrate's commands against the real tools: qemu-img copying and comparing real images, a real
luksFormat with the planned options, lvcreate with the planned size on real LVM metadata, and the
domain redefinition and rollback on libvirt's test driver. (Opening the mapping needs
device-mapper: that, and the whole command, run in the VM tier.) Files stand in for the mapping."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from luksvm import cryptsetup, migrate, qemuimg, virt
from luksvm.errors import LuksvmError
from luksvm.run import run, stream
from tests.integration.conftest import sh, unique

MiB = 1024**2
SIZE = 24 * MiB


def fill(path: Path, size: int, *, seed: int) -> None:
    """Pseudo-random bytes (fast, reproducible): stands for data, or for decrypted noise."""
    block = bytes((i * 131 + seed * 7) % 251 for i in range(MiB))
    with path.open("wb") as f:
        for n in range(size // MiB):
            f.write(block[n % 7 :] + block[: n % 7])


def raw_disk_with_holes(path: Path) -> None:
    """A sparse raw disk: data at 1 MiB and near the end, holes between (they read as zeros)."""
    sh("truncate", "-s", str(SIZE), str(path))
    sh("qemu-io", "-f", "raw", "-c", "write -P 0xab 1M 2M", "-c", "write -P 0xcd 20M 1M", str(path))


REQUEST = migrate.Request("g", "vda", "vg", "lv", "cr_t")


def copy_and_verify(
    source: Path, fmt: str, mapping: Path, monkeypatch: pytest.MonkeyPatch, verify: str = "full"
) -> list[str]:
    """The plan's copy and verify steps, run by migrate's executor functions, with a file in
    place of /dev/mapper/cr_t."""
    request = dataclasses.replace(REQUEST, verify=verify)
    monkeypatch.setattr(migrate.Request, "mapping_path", property(lambda self: str(mapping)))
    src = migrate.SourceDisk(str(source), fmt, False, qemuimg.info(str(source), fmt).virtual_size)
    steps = {s.name: s for s in migrate.plan(request, src, 4 * MiB)}
    run(steps["copy"].argv, timeout=60)
    state = migrate.State(str(mapping) + ".json", request, src, 0, 4 * MiB)
    lines: list[str] = []
    ctx = migrate.Context("/", None, None, None, lines.append)  # type: ignore[arg-type]
    migrate._verify(steps["verify"], state, ctx)
    return lines


@pytest.mark.parametrize("verify", ["full", "sample"])
def test_copy_writes_the_holes_as_zeros_over_noise_and_compares_only_the_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, verify: str
) -> None:
    source, mapping = tmp_path / "disk.raw", tmp_path / "mapping"
    raw_disk_with_holes(source)
    fill(mapping, SIZE + 8 * MiB, seed=1)  # the LV is larger (extents) and full of noise
    before = source.read_bytes()
    lines = copy_and_verify(source, "raw", mapping, monkeypatch, verify)
    assert lines[-1].startswith("verified: ")
    data = mapping.read_bytes()
    assert data[:SIZE] == before  # zeros too: every hole was written
    assert data[SIZE:] != bytes(8 * MiB)  # the tail is not ours; it is not compared either
    assert source.read_bytes() == before  # the source is never written


def test_copy_allocates_every_byte_where_a_sparse_copy_would_skip(tmp_path: Path) -> None:
    """-S 0 writes the holes as data: an empty (sparse) target ends fully allocated. The default
    would leave them to write-zeroes/unmap, which on dm-crypt need not read back as zeros."""
    source, planned, default = tmp_path / "disk.raw", tmp_path / "planned", tmp_path / "default"
    raw_disk_with_holes(source)
    for target in (planned, default):
        sh("truncate", "-s", str(SIZE), str(target))
    run(qemuimg.convert_argv(str(source), "raw", str(planned)), timeout=60)
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(source), str(default)],
        timeout=60)  # fmt: skip
    assert planned.stat().st_blocks * 512 >= SIZE
    assert default.stat().st_blocks * 512 < SIZE // 2


def test_a_difference_names_its_byte(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source, mapping = tmp_path / "disk.raw", tmp_path / "mapping"
    raw_disk_with_holes(source)
    fill(mapping, SIZE, seed=2)
    request = dataclasses.replace(REQUEST, verify="full")
    monkeypatch.setattr(migrate.Request, "mapping_path", property(lambda self: str(mapping)))
    src = migrate.SourceDisk(str(source), "raw", False, SIZE)
    state = migrate.State(str(mapping) + ".json", request, src, 0, 4 * MiB)
    step = {s.name: s for s in migrate.plan(request, src, 4 * MiB)}["verify"]
    ctx = migrate.Context("/", None, None, None, [].append)  # type: ignore[arg-type]
    with pytest.raises(LuksvmError, match=r"differs from .*disk\.raw at byte 0; the domain still"):
        migrate._verify(step, state, ctx)
    for mode, at in (("full", "20,971,520"), ("sample", "20,971,520")):
        run(qemuimg.convert_argv(str(source), "raw", str(mapping)), timeout=60)
        with mapping.open("r+b") as f:
            f.seek(20 * MiB)
            f.write(b"\x00")
        state = dataclasses.replace(state, request=dataclasses.replace(request, verify=mode))
        step = {s.name: s for s in migrate.plan(state.request, src, 4 * MiB)}["verify"]
        with pytest.raises(LuksvmError, match=f"at byte {at};"):
            migrate._verify(step, state, ctx)


@pytest.mark.parametrize("verify", ["full", "sample"])
def test_qcow2_overlay_is_copied_through_its_backing_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, verify: str
) -> None:
    base, overlay, mapping = tmp_path / "base.raw", tmp_path / "mail.qcow2", tmp_path / "m"
    raw_disk_with_holes(base)
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(overlay))
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 4M 1M", str(overlay))
    fill(mapping, SIZE + 4 * MiB, seed=3)
    info = qemuimg.info(str(overlay), "qcow2")
    assert (info.virtual_size, info.backing) == (SIZE, str(base))
    copy_and_verify(overlay, "qcow2", mapping, monkeypatch, verify)
    data = mapping.read_bytes()
    assert data[4 * MiB : 5 * MiB] == b"\x11" * MiB and data[MiB : 2 * MiB] == b"\xab" * MiB


def test_progress_of_a_real_copy_reaches_all_bytes(tmp_path: Path) -> None:
    source, mapping = tmp_path / "disk.raw", tmp_path / "mapping"
    raw_disk_with_holes(source)
    fill(mapping, SIZE, seed=4)
    lines: list[str] = []
    progress = migrate.Progress("copied", SIZE, lines.append, tty=False, clock=lambda: 1.0)
    stream(qemuimg.convert_argv(str(source), "raw", str(mapping)), timeout=60,
           on_output=progress)  # fmt: skip
    assert lines[-1].startswith("  copied: 24.0 MiB of 24.0 MiB (100.0 %)")
    assert len(lines) == len(set(lines)), lines


@pytest.mark.parametrize("luks_type", ["luks1", "luks2"])
def test_luks_format_puts_the_payload_where_the_size_was_computed_for(
    tmp_path: Path, luks_type: str
) -> None:
    image = tmp_path / "lv.img"
    sh("truncate", "-s", "40M", str(image))
    request = dataclasses.replace(REQUEST, luks_type=luks_type, pbkdf="pbkdf2",
                                  pbkdf_iterations=1000)  # fmt: skip
    argv = (*migrate.format_argv(request)[:-1], str(image))
    run(argv, timeout=60, stdin=b"k", secret=True)
    header = cryptsetup.read_header(str(image))
    migrate.check_header(header, request)
    assert header.data_offset == migrate.payload_offset(luks_type)
    assert cryptsetup.test_passphrase(str(image), b"k")


def test_header_check_catches_luks2s_own_choice_of_4k_sectors(tmp_path: Path) -> None:
    image = tmp_path / "lv.img"
    sh("truncate", "-s", "40M", str(image))
    argv = [a for a in migrate.format_argv(REQUEST) if a not in ("--sector-size", "512")]
    argv = [*argv[:-1], "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", str(image)]
    run(argv, timeout=60, stdin=b"k", secret=True)
    with pytest.raises(LuksvmError, match="4096-byte sectors"):
        migrate.check_header(cryptsetup.read_header(str(image)), REQUEST)


def test_lv_is_created_at_the_planned_size_and_vg_room_is_read(
    tmp_path: Path, lvm_env: dict[str, str], loop_device: Callable[..., str]
) -> None:
    image = tmp_path / "pv.img"
    sh("truncate", "-s", "200M", str(image))
    device = loop_device(image)
    vg = unique("migr")
    sh("pvcreate", "-q", device)
    sh("vgcreate", "-q", "-s", "4m", vg, device)
    try:
        request = dataclasses.replace(REQUEST, vg=vg, lv="lv_mail")
        source = migrate.SourceDisk("/x.raw", "raw", False, 100 * MiB + 512)
        steps = {s.name: s for s in migrate.plan(request, source, 4 * MiB)}
        assert migrate._vg_exists(vg) and not migrate._vg_exists(vg + "x")
        assert migrate._lv_size(request) is None
        # activation is off here: create without zeroing (lvcreate cannot zero an inactive LV)
        run([*steps["create-lv"].argv[:2], "-Zn", "-an", *steps["create-lv"].argv[2:]],
            timeout=60)  # fmt: skip
        assert migrate._lv_size(request) == 100 * MiB + 512 + 16 * MiB + 4 * MiB - 512
        assert migrate._lv_size(request) == migrate.target_size(source, 4 * MiB)
    finally:
        sh("vgremove", "-q", "-f", vg)
        sh("pvremove", "-q", device)


def test_domain_is_redefined_and_rolled_back_on_libvirt(tmp_path: Path) -> None:
    pytest.importorskip("libvirt")
    disk = tmp_path / "mail.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M")
    node = tmp_path / "node.xml"
    node.write_text(
        "<node><domain type='test'><name>mail</name>"
        "<uuid>4dea22b3-1d52-d8f3-2516-782e98ab3fa0</uuid><memory>65536</memory>"
        "<os><type>hvm</type></os><devices>"
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file='{disk}'/><target dev='vda' bus='virtio'/></disk>"
        "<interface type='network'><mac address='52:54:00:12:34:56'/>"
        "<source network='default'/></interface></devices></domain></node>"
    )
    with virt.connect(f"test://{node}") as domains:
        domains.domain("mail").destroy()  # the test driver starts its domains
        assert domains.state("mail") == "shutoff" and not domains.has_managed_save("mail")
        previous = domains.defined_xml("mail")
        domains.define(migrate.rewrite_domain_xml(previous, "vda", "/dev/mapper/cr_mail"))
        now = domains.defined_xml("mail")
        assert migrate.domain_disk(now, "vda").source == "/dev/mapper/cr_mail"
        assert "52:54:00:12:34:56" in now and "4dea22b3-1d52-d8f3-2516-782e98ab3fa0" in now
        assert "discard='unmap'" in now or 'discard="unmap"' in now
        domains.define(previous)
        assert domains.defined_xml("mail") == previous
        with pytest.raises(LuksvmError, match="guest 'web': no libvirt domain of that name"):
            domains.state("web")
    assert os.path.exists(disk)


def test_cli_dry_run_plans_from_libvirt_lvm_and_qemu_img(
    tmp_path: Path,
    lvm_env: dict[str, str],
    loop_device: Callable[..., str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    pytest.importorskip("libvirt")
    from luksvm import cli

    disk = tmp_path / "mail.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(disk), "100M")
    node = tmp_path / "node.xml"
    node.write_text(
        "<node><domain type='test'><name>mail</name><memory>65536</memory>"
        "<os><type>hvm</type></os><devices><disk type='file' device='disk'>"
        f"<driver name='qemu' type='qcow2'/><source file='{disk}'/>"
        "<target dev='vda' bus='virtio'/></disk></devices></domain></node>"
    )
    root = tmp_path / "root"
    (root / "etc/luksvm").mkdir(parents=True)
    (root / "etc/luksvm/luksvm.conf").write_text(f"[libvirt]\nuri = test://{node}\n")
    image = tmp_path / "pv.img"
    sh("truncate", "-s", "200M", str(image))
    device = loop_device(image)
    vg = unique("migr")
    sh("pvcreate", "-q", device)
    sh("vgcreate", "-q", "-s", "4m", vg, device)
    try:
        argv = ["--root", str(root), "migrate", "mail", "--disk", "vda", "--to", f"{vg}/lv_mail",
                "--name", "cr_mail", "--dry-run"]  # fmt: skip
        assert cli.main(argv) == 2  # the test driver's domain runs
        assert "guest mail is running; shut it off first, or pass --shutdown" in (
            capsys.readouterr().err
        )
        assert cli.main([*argv, "--shutdown"]) == 0
        out = capsys.readouterr().out
        assert f"lvcreate --yes --size 121634816b --name lv_mail {vg}" in out
        assert " 0. stop guest mail (it is running)" in out
        assert not (root / "var/lib/luksvm/migrate").exists()
        assert cli.main([*argv[:-1], "--to", f"{vg}/lv_mail", "--dry-run", "--shutdown",
                         "--key", "keys/k"]) == 64  # fmt: skip
    finally:
        sh("vgremove", "-q", "-f", vg)
        sh("pvremove", "-q", device)
