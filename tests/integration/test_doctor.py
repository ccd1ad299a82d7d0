"""doctor against real tools: LUKS images, lvmconfig on real lvm.conf files, a guest VG on a loop
device (activation off), systemctl --root for unit-file states."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from luksvm import doctor
from luksvm.config import Volume
from luksvm.doctor import FAIL, OK, WARN, Finding, Host
from tests.conftest import write_config
from tests.integration.conftest import FAST_KDF, flip_byte, make_luks, sh, unique


def by(findings: list[Finding], subject: str) -> Finding:
    (found,) = [f for f in findings if f.subject == subject]
    return found


def test_luks_images_one_and_two_keyslots_and_luks1(tmp_path: Path) -> None:
    one = make_luks(tmp_path / "one.img", b"pw")
    two = make_luks(tmp_path / "two.img", b"pw")
    (tmp_path / "pw").write_bytes(b"pw")
    (tmp_path / "recovery").write_bytes(b"recovery")
    sh("cryptsetup", "luksAddKey", "-q", *FAST_KDF, "--key-file", str(tmp_path / "pw"),
       str(two), str(tmp_path / "recovery"))  # fmt: skip
    old = make_luks(tmp_path / "old.img", b"pw", version=1)
    root = write_config(
        tmp_path / "root",
        {"10.conf": f"cr_one {one} - luks\ncr_two {two} - luks\ncr_old {old} - luks\n"},
    )
    findings = doctor.run_checks(Host(str(root)), doctor.select(["luks", "recovery-key"]))
    luks = [f for f in findings if f.check == "luks"]
    recovery = [f for f in findings if f.check == "recovery-key"]
    # the fast test KDF is PBKDF2: every LUKS2 keyslot here is one doctor must flag
    assert by(luks, "cr_one").status == WARN
    assert "keyslot 0 " in by(luks, "cr_one").message
    assert by(luks, "cr_two").fix == (
        f"cryptsetup luksConvertKey --key-slot 0 --pbkdf argon2id {two}; "
        f"cryptsetup luksConvertKey --key-slot 1 --pbkdf argon2id {two}"
    )
    assert by(luks, "cr_old").status == WARN
    assert "LUKS1" in by(luks, "cr_old").message
    assert by(recovery, "cr_one").status == WARN
    assert by(recovery, "cr_two").status == OK
    assert by(recovery, "cr_old").status == WARN


def test_an_argon2id_luks2_image_is_ok(tmp_path: Path) -> None:
    image = make_luks(tmp_path / "a.img", b"pw")
    sh("cryptsetup", "luksConvertKey", "-q", "--key-file=-", "--pbkdf", "argon2id",
       "--pbkdf-memory", "32", "--pbkdf-force-iterations", "4", "--pbkdf-parallel", "1",
       str(image), stdin=b"pw")  # fmt: skip
    root = write_config(tmp_path / "root", {"10.conf": f"cr_a {image} - luks\n"})
    (finding,) = doctor.run_checks(Host(str(root)), doctor.select(["luks"]))
    assert finding.status == OK
    assert finding.message == f"LUKS2 on {image}, argon2id"


class LoopMappingHost(Host):
    """The volume's "mapping" is a loop device: the host kernel here has no device-mapper."""

    def __init__(self, root: str, mapping: str) -> None:
        super().__init__(root, live=True)
        self.mapping = mapping

    def mapping_path(self, volume: Volume) -> str:
        return self.mapping


def test_guest_vg_on_the_mapping_is_found_and_the_right_filter_hides_it(
    tmp_path: Path, lvm_env: dict[str, str], loop_device: Callable[[Path], str]
) -> None:
    image = tmp_path / "guest-disk.img"
    sh("truncate", "-s", "32M", str(image))
    mapping = loop_device(image)
    vg = unique("vgmail")
    sh("pvcreate", "-q", mapping, env=lvm_env)
    sh("vgcreate", "-q", vg, mapping, env=lvm_env)
    conf = Path(lvm_env["LVM_SYSTEM_DIR"]) / "lvm.conf"
    original = conf.read_text()
    try:
        root = write_config(tmp_path / "root", {"10.conf": "cr_mail /dev/x - luks\n"})
        # lvm_env's lvm.conf accepts loop devices with a filter: the guest VG is visible
        (finding,) = doctor.run_checks(
            LoopMappingHost(str(root), mapping), doctor.select(["guest-vg-leak"])
        )
        assert finding.status == FAIL
        assert f"guest VG {vg} in /dev/mapper/cr_mail" in finding.message
        assert "active on the host now" not in finding.message  # activation is off here
        assert mapping not in finding.fix  # the guest's PV is not proposed as a host PV

        conf.write_text(
            original.replace(
                "devices {", 'devices {\n  global_filter = [ "a|^/dev/sda2$|", "r|.*|" ]'
            )
        )
        (finding,) = doctor.run_checks(
            LoopMappingHost(str(root), mapping), doctor.select(["guest-vg-leak"])
        )
        assert finding.status == OK
        assert finding.message == "hidden from the host's LVM: devices/global_filter rejects it"
    finally:
        conf.write_text(original)
        sh("vgremove", "-q", "-f", vg, env=lvm_env)
        sh("pvremove", "-q", mapping, env=lvm_env)


def fake_lvm_2_02(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`lvm version` says 2.02.187; every other lvm command is the real one."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "lvm"
    real = next(
        os.path.join(d, "lvm")
        for d in [*os.environ["PATH"].split(os.pathsep), "/sbin", "/usr/sbin"]
        if os.path.exists(os.path.join(d, "lvm"))
    )
    script.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = version ]; then\n'
        '  echo "  LVM version:     2.02.187(2)-RHEL7 (2020-03-24)"\n'
        '  echo "  Library version: 1.02.170-RHEL7 (2020-03-24)"\n'
        "  exit 0\nfi\n"
        f'exec {real} "$@"\n'
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def lvmetad_root(tmp_path: Path, *, enabled: bool) -> Path:
    root = write_config(tmp_path / "root", {"10.conf": "cr_a /dev/x - luks\n"})
    (root / "etc/lvm").mkdir(parents=True)
    (root / "etc/lvm/lvm.conf").write_text("global {\n    use_lvmetad = 1\n}\n")
    units = root / "usr/lib/systemd/system"
    units.mkdir(parents=True)
    (units / "lvm2-lvmetad.socket").write_text(
        "[Socket]\nListenStream=/run/lvm/lvmetad.socket\n[Install]\nWantedBy=sysinit.target\n"
    )
    (units / "lvm2-lvmetad.service").write_text(
        "[Service]\nExecStart=/usr/sbin/lvmetad -f\n[Install]\nWantedBy=sysinit.target\n"
    )
    if enabled:
        sh("systemctl", f"--root={root}", "enable", "lvm2-lvmetad.socket", "lvm2-lvmetad.service")
    return root


def test_lvm_2_02_with_use_lvmetad_needs_its_units(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_lvm_2_02(tmp_path, monkeypatch)
    root = lvmetad_root(tmp_path, enabled=False)
    finding = by(doctor.run_checks(Host(str(root)), doctor.select(["lvmetad"])), "host")
    assert finding.status == FAIL
    assert "LVM 2.02.187 with use_lvmetad = 1, but lvm2-lvmetad.socket is disabled" in (
        finding.message
    )
    assert finding.fix == "systemctl enable --now lvm2-lvmetad.socket lvm2-lvmetad.service"


def test_lvm_2_02_with_lvmetad_enabled_is_ok_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_lvm_2_02(tmp_path, monkeypatch)
    root = lvmetad_root(tmp_path / "b", enabled=True)
    finding = by(doctor.run_checks(Host(str(root)), doctor.select(["lvmetad"])), "host")
    assert finding.status == OK
    assert "active state not checked" in finding.message


def test_lvm_2_03_with_a_leftover_use_lvmetad_warns(tmp_path: Path) -> None:
    root = lvmetad_root(tmp_path, enabled=False)
    finding = by(doctor.run_checks(Host(str(root)), doctor.select(["lvmetad"])), "host")
    assert finding.status == WARN
    assert "has no lvmetad (removed in 2.03), but lvm.conf still sets" in finding.message


def test_cli_over_a_root_with_images_exits_with_the_worst_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from luksvm.cli import main

    image = make_luks(tmp_path / "a.img", b"pw")
    root = write_config(
        tmp_path / "root", {"10.conf": f"cr_a {image} - luks\ncr_b {tmp_path}/none - luks\n"}
    )
    code = main(["--root", str(root), "doctor", "luks", "recovery-key"])
    out = capsys.readouterr().out
    assert code == 2
    assert out.splitlines()[0].startswith("FAIL  luks")
    assert f"FAIL cr_b: source {tmp_path}/none does not exist" in out


def test_header_backup_missing_current_stale_corrupt_and_old(tmp_path: Path) -> None:
    from datetime import datetime, timezone

    from luksvm import backup, config

    image = make_luks(tmp_path / "a.img", b"pw")
    root = write_config(
        tmp_path / "root",
        {"10.conf": f"cr_a {image} - luks\n"},
        "[backup]\ndir = /var/lib/luksvm/header-backups\nmax_age = 30d\n",
    )
    folder = root / "var/lib/luksvm/header-backups/cr_a"

    def finding() -> Finding:
        (found,) = doctor.run_checks(Host(str(root)), doctor.select(["header-backup"]))
        return found

    assert finding().status == FAIL
    assert "no header backup" in finding().message

    folder.mkdir(parents=True)
    (volume,) = config.load(str(root)).volumes
    outcome = backup.backup_volume(volume, str(folder), keep=5)
    assert finding() == Finding(
        OK, "cr_a", f"backup {os.path.basename(outcome.file)} verifies and is current",
        check="header-backup",
    )  # fmt: skip

    (tmp_path / "pw").write_bytes(b"pw")
    (tmp_path / "new").write_bytes(b"new")
    sh("cryptsetup", "luksAddKey", "-q", *FAST_KDF, "--key-file", str(tmp_path / "pw"),
       str(image), str(tmp_path / "new"))  # fmt: skip
    assert finding().status == WARN
    assert "predates the last header change" in finding().message
    assert finding().fix.startswith("luksvm header-backup cr_a")

    outcome = backup.backup_volume(volume, str(folder), keep=5)
    assert finding().status == OK
    flip_byte(outcome.file, 20000)
    assert finding().status == FAIL
    assert "no longer hashes as recorded" in finding().message

    for path in folder.iterdir():
        path.unlink()
    backup.backup_volume(volume, str(folder), keep=5)
    (written,) = [p for p in folder.iterdir() if not p.name.endswith(".json")]
    stamp = backup.stamp(datetime(2020, 1, 2, 3, 4, 5, tzinfo=timezone.utc))
    renamed = folder / (stamp + written.name[len(stamp) :])
    written.rename(renamed)
    Path(str(written) + ".json").rename(str(renamed) + ".json")
    assert finding().status == WARN
    assert "longer than [backup] max_age = 30d" in finding().message
    # the header never changed: a header-backup run takes no new backup, and confirms the old one
    outcome = backup.backup_volume(volume, str(folder), keep=5)
    assert not outcome.changed and outcome.file == str(renamed)
    assert sorted(p.name for p in folder.iterdir()) == [renamed.name, renamed.name + ".json"]
    assert finding().status == OK


def test_sysfs_of_this_machine_loop_device_names_and_backing(
    tmp_path: Path, loop_device: Callable[[Path], str]
) -> None:
    from luksvm import blockdev

    image = tmp_path / "disk.img"
    sh("truncate", "-s", "8M", str(image))
    loop = loop_device(image)
    dev = tmp_path / "dev"
    (dev / "mapper").mkdir(parents=True)
    (dev / "disk/by-id").mkdir(parents=True)
    os.symlink(loop, dev / "mapper/cr_x")
    os.symlink(loop, dev / "disk/by-id/dm-name-cr_x")
    os.symlink(str(image), dev / "disk/by-id/not-a-block-device")
    assert blockdev.aliases(str(dev / "mapper/cr_x"), str(dev)) == [
        str(dev / "disk/by-id/dm-name-cr_x"),
        str(dev / "mapper/cr_x"),
    ]
    backing = blockdev.backing_of_device(loop)
    under = blockdev.backing_of_file(str(image))
    # a loop device lies where its image file lies
    assert backing.encrypted == under.encrypted
    assert backing.description.startswith(f"{os.path.basename(loop)} ({image}) on ")


def test_guests_against_the_libvirt_test_driver(tmp_path: Path) -> None:
    from tests.integration.test_guests import domain_xml

    root = tmp_path / "root"
    root.mkdir()
    node = root / "node.xml"
    node.write_text(
        "<node>"
        + domain_xml("mail", ["/dev/mapper/cr_imap_encr", "/dev/mapper/cr_unmanaged"])
        + domain_xml("db", ["/dev/disk/by-id/dm-name-cr_db"])
        + "</node>"
    )
    write_config(
        root,
        {
            "10.conf": "cr_imap_encr /dev/vg/imap - luks,x-luksvm.guest=mail\n"
            "cr_spare /dev/vg/spare - luks,x-luksvm.guest=mail\n"
            "cr_db /dev/vg/db - luks,x-luksvm.guest=db\n"
            "cr_web /dev/vg/web - luks,x-luksvm.guest=web\n"
        },
        f"[libvirt]\nuri = test://{node}\n",
    )
    findings = doctor.run_checks(Host(str(root)), doctor.select(["guests"]))
    mail = [f for f in findings if f.subject == "mail"]
    assert sorted(f.status for f in mail) == [FAIL, FAIL]
    unmanaged = next(f for f in mail if "cr_unmanaged" in f.message)
    assert unmanaged.message.startswith("disk vdb is /dev/mapper/cr_unmanaged, which luksvm does")
    assert "x-luksvm.guest=mail" in unmanaged.fix
    spare = next(f for f in mail if "cr_spare" in f.message)
    assert "has no disk /dev/mapper/cr_spare" in spare.message
    assert by(findings, "db") == Finding(
        OK, "db", "defined; luksvm disks vda=cr_db", check="guests"
    )  # a by-id dm-name source counts as the mapping
    assert by(findings, "web").status == FAIL
    assert "no libvirt domain web" in by(findings, "web").message


def test_keyring_keys_resolve_only_through_the_configured_backend(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import keyring.core

    plaintext = "keyrings.alt.file.PlaintextKeyring"
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    # a shell's backend must not make doctor say yes for the units, which do not have it
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", plaintext)
    keyring.core.load_keyring(plaintext).set_password("luksvm", "cr_a", "s3cret-key")
    lines = "cr_a /dev/a keyring:luksvm/cr_a luks\ncr_b /dev/b keyring:luksvm/cr_b luks\n"

    root = write_config(tmp_path / "plain", {"10.conf": lines})
    findings = doctor.run_checks(Host(str(root)), doctor.select(["keys"]))
    assert by(findings, "cr_a").status == FAIL
    assert "[keys] keyring_backend is not set" in by(findings, "cr_a").message

    root = write_config(
        tmp_path / "set", {"10.conf": lines}, f"[keys]\nkeyring_backend = {plaintext}\n"
    )
    findings = doctor.run_checks(Host(str(root)), doctor.select(["keys"]))
    assert by(findings, "cr_a") == Finding(
        OK, "cr_a", f"keyring:luksvm/cr_a resolves through {plaintext}", check="keys"
    )
    assert by(findings, "cr_b").status == FAIL
    assert "holds no secret for service 'luksvm' user 'cr_b'" in by(findings, "cr_b").message
    assert by(findings, "cr_b").fix.startswith("store it with: ")
    assert all("s3cret-key" not in f.message + f.fix for f in findings)


def test_every_check_together_reads_each_header_with_one_cryptsetup_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from luksvm import backup, config, cryptsetup

    images = [make_luks(tmp_path / f"v{n}.img", b"pw") for n in range(3)]
    root = write_config(
        tmp_path / "root",
        {"10.conf": "".join(f"cr_v{n} {image} - luks\n" for n, image in enumerate(images))},
        "[backup]\ndir = /var/lib/luksvm/header-backups\n",
    )
    for volume in config.load(str(root)).volumes:
        folder = root / "var/lib/luksvm/header-backups" / volume.name
        folder.mkdir(parents=True)
        backup.backup_volume(volume, str(folder), keep=5)
    ran: list[tuple[str, ...]] = []
    real_run = cryptsetup.run

    def recording_run(argv: list[str], **kwargs: object) -> object:
        ran.append(tuple(argv))
        return real_run(argv, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(cryptsetup, "run", recording_run)
    findings = doctor.run_checks(Host(str(root)), doctor.select([]))
    assert {f.subject: f.status for f in findings if f.check == "header-backup"} == {
        f"cr_v{n}": OK for n in range(3)
    }
    assert sorted(ran) == [
        ("cryptsetup", "luksDump", "--dump-json-metadata", str(image)) for image in images
    ]


# --- libvirt-shutdown: the qemu.conf files Debian ships (libvirt 11.3 and 9.0), as admins edit them

FIXTURES = Path(__file__).parent / "fixtures"
QEMU_CONF_11 = (FIXTURES / "qemu.conf-debian13-libvirt-11.3").read_text()
QEMU_CONF_9 = (FIXTURES / "qemu.conf-debian12-libvirt-9.0").read_text()
LIBVIRT_GUESTS_UNIT = "[Service]\nExecStart=/bin/true\n[Install]\nWantedBy=multi-user.target\n"


def qemu_conf_root(tmp_path: Path, text: str, *, libvirt_guests: bool = False) -> Path:
    root = write_config(tmp_path / "root", {"10.conf": "cr_a /dev/x - luks,x-luksvm.guest=mail\n"})
    (root / "etc/libvirt").mkdir(parents=True)
    (root / "etc/libvirt/qemu.conf").write_text(text)
    if libvirt_guests:
        units = root / "usr/lib/systemd/system"
        units.mkdir(parents=True)
        (units / "libvirt-guests.service").write_text(LIBVIRT_GUESTS_UNIT)
        sh("systemctl", f"--root={root}", "enable", "libvirt-guests.service")
    return root


def uncomment(text: str, setting: str, value: str) -> str:
    """The admin's edit: the commented default line of `setting` made active with `value`."""
    lines = text.splitlines(keepends=True)
    (index,) = [i for i, line in enumerate(lines) if line.startswith(f"#{setting} = ")]
    lines[index] = f"{setting} = {value}\n"
    return "".join(lines)


def line_of(text: str, setting: str) -> int:
    (number,) = [n for n, line in enumerate(text.splitlines(), 1) if line.startswith(setting)]
    return number


def shutdown_findings(root: Path, *, live: bool | None = None) -> list[Finding]:
    return doctor.run_checks(Host(str(root), live=live), doctor.select(["libvirt-shutdown"]))


def test_debian_13_qemu_conf_as_shipped_leaves_guests_to_luksvm(tmp_path: Path) -> None:
    (finding,) = shutdown_findings(qemu_conf_root(tmp_path, QEMU_CONF_11))
    assert finding == Finding(
        OK,
        "host",
        "libvirt leaves luksvm's guests to luksvm at host shutdown "
        "(try_save=none, try_shutdown=none, poweroff=none)",
        check="libvirt-shutdown",
    )


def test_poweroff_all_fails_with_the_line_and_restore_too(tmp_path: Path) -> None:
    text = uncomment(QEMU_CONF_11, "auto_shutdown_poweroff", '"all"')
    line = line_of(text, "auto_shutdown_poweroff = ")
    findings = shutdown_findings(qemu_conf_root(tmp_path, text, libvirt_guests=True))
    assert [(f.subject, f.status) for f in findings] == [
        ("auto_shutdown_poweroff", FAIL),
        ("auto_shutdown_restore", FAIL),
    ]
    poweroff, restore = findings
    assert poweroff.message.startswith(
        f'/etc/libvirt/qemu.conf:{line}: auto_shutdown_poweroff = "all": libvirt powers them off '
        "for every guest, luksvm's included, as soon as logind announces the shutdown, before "
        "systemd stops any unit"
    )
    assert "libvirt-guests.service is enabled too (libvirt warns of dueling actions)" in (
        poweroff.message
    )
    assert poweroff.fix == (
        'set auto_shutdown_poweroff = "none" (or "transient": luksvm\'s guests are persistent) '
        "in /etc/libvirt/qemu.conf, then restart the daemon (systemctl restart libvirtd, or "
        "virtqemud: guests keep running)"
    )
    # the commented default line "#auto_shutdown_restore = 1" is not a setting: the default 1 is
    assert restore.message.startswith(
        "/etc/libvirt/qemu.conf (default 1): auto_shutdown_restore = 1: at the next start libvirt "
        "restores the guests it stopped"
    )
    assert restore.fix.startswith("set auto_shutdown_restore = 0 in /etc/libvirt/qemu.conf, ")

    # restore off: only the action is wrong
    text = uncomment(text, "auto_shutdown_restore", "0")
    (only,) = shutdown_findings(qemu_conf_root(tmp_path / "b", text))
    assert (only.subject, only.status) == ("auto_shutdown_poweroff", FAIL)
    assert "dueling" not in only.message  # no libvirt-guests in this root


def test_transient_is_acceptable_except_for_managed_save(tmp_path: Path) -> None:
    text = uncomment(QEMU_CONF_11, "auto_shutdown_poweroff", '"transient"')
    text = uncomment(text, "auto_shutdown_try_shutdown", "'transient'")
    (finding,) = shutdown_findings(qemu_conf_root(tmp_path, text))
    assert finding.status == OK
    assert "(try_save=none, try_shutdown=transient, poweroff=transient)" in finding.message

    text = uncomment(QEMU_CONF_11, "auto_shutdown_try_save", '"persistent"  # for the laptop')
    findings = shutdown_findings(qemu_conf_root(tmp_path / "b", text))
    save = by(findings, "auto_shutdown_try_save")
    assert save.status == FAIL
    assert f"qemu.conf:{line_of(text, 'auto_shutdown_try_save')}: " in save.message
    assert "saves their memory (managed save) for every persistent guest" in save.message
    # tmp_path is no dm-crypt device: the saved RAM would land on a plain disk
    assert "lands in /var/lib/libvirt/qemu/save, which is not encrypted" in save.message
    assert save.fix.startswith('set auto_shutdown_try_save = "none" in /etc/libvirt/qemu.conf')
    assert by(findings, "auto_shutdown_restore").status == FAIL


def test_libvirt_before_11_2_has_no_auto_shutdown(tmp_path: Path) -> None:
    # Debian 12's file has none of the settings; offline, the file is judged
    root = qemu_conf_root(tmp_path, QEMU_CONF_9)
    (finding,) = shutdown_findings(root)
    assert finding.status == OK and "(try_save=none, try_shutdown=none, poweroff=none)" in (
        finding.message
    )
    # on the running system the library's version decides: this machine's libvirt is 9.0, which
    # ignores even an admin's auto_shutdown_poweroff line
    from luksvm import virt

    version = ".".join(map(str, virt.library_version()))
    assert virt.library_version() < (11, 2, 0), "this test expects Debian 12's libvirt here"
    root = qemu_conf_root(tmp_path / "b", QEMU_CONF_9 + 'auto_shutdown_poweroff = "all"\n')
    (finding,) = shutdown_findings(root, live=True)
    assert finding == Finding(
        OK,
        "host",
        f"libvirt {version} does not stop guests itself at host shutdown (11.2 does)",
        check="libvirt-shutdown",
    )


def test_cli_exits_2_and_prints_the_qemu_conf_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from luksvm.cli import main

    text = uncomment(QEMU_CONF_11, "auto_shutdown_try_shutdown", '"all"')
    root = qemu_conf_root(tmp_path, text)
    assert main(["--root", str(root), "doctor", "libvirt-shutdown"]) == 2
    out = capsys.readouterr().out
    assert 'set auto_shutdown_try_shutdown = "none"' in out
    assert main(["--root", str(root), "doctor", "--json", "libvirt-shutdown"]) == 2
    rows = json.loads(capsys.readouterr().out)
    assert {(r["subject"], r["status"]) for r in rows} == {
        ("auto_shutdown_try_shutdown", "FAIL"),
        ("auto_shutdown_restore", "FAIL"),
    }


def test_no_guests_no_judgement(tmp_path: Path) -> None:
    root = write_config(tmp_path / "root", {"10.conf": "cr_a /dev/x - luks\n"})
    (finding,) = shutdown_findings(root)
    assert finding.status == "SKIP"


def test_libvirt_guests_starting_guests_at_boot_is_a_warning(tmp_path: Path) -> None:
    from tests.integration.test_guests import domain_xml

    root = qemu_conf_root(tmp_path, QEMU_CONF_11, libvirt_guests=True)
    node = root / "node.xml"
    node.write_text("<node>" + domain_xml("mail", ["/dev/mapper/cr_a"]) + "</node>")
    write_config(
        root,
        {"10.conf": "cr_a /dev/x - luks,x-luksvm.guest=mail\n"},
        f"[libvirt]\nuri = test://{node}\n",
    )
    (root / "etc/default").mkdir(parents=True)
    (root / "etc/default/libvirt-guests").write_text("ON_BOOT=start\nON_SHUTDOWN=shutdown\n")
    findings = doctor.run_checks(Host(str(root)), doctor.select(["guests"]))
    assert by(findings, "mail").status == OK
    on_boot = by(findings, "libvirt-guests ON_BOOT")
    assert on_boot.status == WARN
    assert "(ON_BOOT=start): a luksvm guest still running then (on_timeout=fail)" in (
        on_boot.message
    )
    assert on_boot.fix == (
        "set ON_BOOT=ignore in /etc/default/libvirt-guests (luksvm starts its guests after their "
        "volumes)"
    )
    (root / "etc/default/libvirt-guests").write_text("ON_BOOT=ignore\nON_SHUTDOWN=shutdown\n")
    findings = doctor.run_checks(Host(str(root)), doctor.select(["guests"]))
    assert not [f for f in findings if f.subject == "libvirt-guests ON_BOOT"]
