from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from luksvm import blockdev, doctor
from luksvm.cli import main
from luksvm.doctor import FAIL, OK, SKIP, WARN, Check, Finding, Host
from luksvm.errors import UsageError
from tests.conftest import write_config
from tests.unit.doctor_fakes import (
    Commands,
    FakeHost,
    commands_fixture,  # noqa: F401  (provides the commands fixture)
    fixture,
    pv_row,
)

LUKS2_UUID_HEX = "a3072e364c664254a187e4fed8f4f1bb"  # fixture luksDump-luks2-one-slot


def by(findings: list[Finding], subject: str) -> Finding:
    (found,) = [f for f in findings if f.subject == subject]
    return found


def run_check(host: Host, name: str) -> list[Finding]:
    return doctor.run_checks(host, doctor.select([name]))


def seed(tmp_path: Path, lines: str, settings: str | None = None) -> Path:
    """A root with crypttab lines; each source path named in them exists as an empty file."""
    root = tmp_path / "root"
    write_config(root, {"10-test.conf": lines}, settings)
    return root


def device(tmp_path: Path, name: str) -> str:
    path = tmp_path / name
    path.write_bytes(b"")
    return str(path)


# --- the registry and the runner -----------------------------------------------------------------


def test_unknown_check_is_a_usage_error_listing_the_known_ones() -> None:
    with pytest.raises(UsageError, match=r"unknown check nope; known checks: config, luks, "):
        doctor.select(["nope"])


def test_selected_checks_keep_registry_order() -> None:
    assert [c.name for c in doctor.select(["swap", "config"])] == ["config", "swap"]


def test_checks_run_concurrently_and_report_in_registry_order(tmp_path: Path) -> None:
    def slow(host: Host) -> list[Finding]:
        time.sleep(0.5)
        return [Finding.ok("a", "slow")]

    def fast(host: Host) -> list[Finding]:
        time.sleep(0.5)
        return [Finding.warn("b", "fast")]

    host = Host(str(tmp_path))
    start = time.monotonic()
    findings = doctor.run_checks(host, [Check("slow", "", slow), Check("fast", "", fast)])
    assert time.monotonic() - start < 0.9  # one after another: 1.0 s
    assert [(f.check, f.status) for f in findings] == [("slow", OK), ("fast", WARN)]


def test_a_probe_shared_by_checks_runs_once(tmp_path: Path) -> None:
    calls = []

    def probe() -> int:
        calls.append(1)
        time.sleep(0.1)
        return 42

    host = Host(str(tmp_path))

    def uses(host: Host) -> list[Finding]:
        return [Finding.ok(HOST, str(host._once.get("probe", probe)))]

    HOST = doctor.HOST
    findings = doctor.run_checks(host, [Check(f"c{i}", "", uses) for i in range(4)])
    assert [f.message for f in findings] == ["42"] * 4
    assert len(calls) == 1


def test_a_failing_probe_becomes_a_warning_not_a_traceback(tmp_path: Path) -> None:
    def broken(host: Host) -> list[Finding]:
        raise doctor.LuksvmError("lvmconfig not found; install it")

    (finding,) = doctor.run_checks(Host(str(tmp_path)), [Check("x", "", broken)])
    assert (finding.status, finding.message) == (
        WARN,
        "could not run this check: lvmconfig not found; install it",
    )


def test_exit_code_is_the_worst_status() -> None:
    assert doctor.exit_code([Finding.ok("a", ""), Finding.skip("b", "")]) == 0
    assert doctor.exit_code([Finding.ok("a", ""), Finding.warn("b", "")]) == 1
    assert doctor.exit_code([Finding.fail("a", ""), Finding.warn("b", "")]) == 2


# --- output ---------------------------------------------------------------------------------------


def test_report_has_one_line_per_healthy_check_and_prints_a_shared_fix_once() -> None:
    checks = [
        Check("luks", "LUKS2 everywhere", lambda h: []),
        Check("leak", "no leak", lambda h: []),
    ]
    findings = [
        Finding(OK, "cr_a", "LUKS2", check="luks"),
        Finding(OK, "cr_b", "LUKS2", check="luks"),
        Finding(FAIL, "cr_a", "leaks", "set global_filter\n  line two", check="leak"),
        Finding(FAIL, "cr_b", "leaks", "set global_filter\n  line two", check="leak"),
    ]
    text = doctor.format_report(checks, findings)
    lines = text.splitlines()
    assert lines[0] == "OK    luks  LUKS2 everywhere; ok: cr_a, cr_b"
    assert lines[1] == "FAIL  leak  no leak"
    assert text.count("set global_filter") == 1
    assert "fix: as for cr_a" in text
    assert lines[-1] == "2 failed, 0 warnings, 2 ok, 0 skipped"


def test_prometheus_text_has_one_sample_per_check_and_subject_with_the_worst_status() -> None:
    findings = [
        Finding(OK, "cr_a", "x", check="keys"),
        Finding(WARN, "cr_a", "y", check="keys"),
        Finding(SKIP, 'we"ird\\', "z", check="keys"),
    ]
    text = doctor.prometheus_text(findings, duration=0.5, now=1700000000.0)
    assert 'luksvm_doctor_status{check="keys",subject="cr_a"} 1\n' in text
    assert 'luksvm_doctor_status{check="keys",subject="we\\"ird\\\\"} -1\n' in text
    assert text.count("luksvm_doctor_status{") == 2
    assert "# TYPE luksvm_doctor_status gauge" in text
    assert "luksvm_doctor_last_run_timestamp_seconds 1700000000.000" in text


def test_prometheus_file_is_replaced_atomically(tmp_path: Path) -> None:
    target = tmp_path / "luksvm.prom"
    target.write_text("old\n")
    doctor.write_textfile(str(target), "new\n")
    assert target.read_text() == "new\n"
    assert oct(target.stat().st_mode & 0o777) == "0o644"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["luksvm.prom"]


def test_cli_json_lists_findings_and_exit_code_follows_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = seed(tmp_path, "cr_a /dev/x /etc/luksvm/keys/a.key luks,bogus\n")
    assert main(["--root", str(root), "doctor", "--json", "config"]) == 2
    (finding,) = json.loads(capsys.readouterr().out)
    assert finding["check"] == "config"
    assert finding["status"] == "FAIL"
    assert finding["subject"] == "cr_a"
    assert "unknown crypttab option 'bogus'" in finding["message"]
    assert finding["fix"].startswith(f"edit {root}/etc/luksvm/crypttab.d/10-test.conf line 1")


def test_cli_unknown_check_exits_64(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--root", str(tmp_path), "doctor", "no-such-check"]) == 64
    assert "known checks: config" in capsys.readouterr().err


def test_cli_writes_the_prometheus_file(tmp_path: Path) -> None:
    root = seed(tmp_path, "cr_a /dev/x - luks\n")
    prom = tmp_path / "doctor.prom"
    assert main(["--root", str(root), "doctor", "--prometheus", str(prom), "config"]) == 0
    assert 'luksvm_doctor_status{check="config",subject="host"} 0' in prom.read_text()


# --- config -------------------------------------------------------------------------------------


def test_config_without_volumes_warns_with_an_example_line(tmp_path: Path) -> None:
    (finding,) = run_check(Host(str(tmp_path)), "config")
    assert finding.status == WARN
    assert "x-luksvm.guest=NAME" in finding.fix


# --- luks and recovery-key ------------------------------------------------------------------------


def test_luks_versions_and_kdfs(tmp_path: Path, commands: Commands) -> None:
    l1, l2, token, plain = (device(tmp_path, n) for n in ("l1", "l2", "token", "plain"))
    commands.luks(l1, "luksDump-luks1.txt")
    commands.luks(l2, "luksDump-luks2-one-slot.txt", "luksDump-luks2-one-slot.json")
    commands.luks(
        token, "luksDump-luks2-pbkdf2-token-slot.txt", "luksDump-luks2-pbkdf2-token-slot.json"
    )
    commands.luks(plain, None)
    root = seed(
        tmp_path,
        f"cr_l1 {l1} - luks\ncr_l2 {l2} - luks\ncr_tok {token} - luks\ncr_plain {plain} - luks\n"
        f"cr_gone {tmp_path}/gone - luks\ncr_maybe {tmp_path}/maybe - luks,nofail\n",
    )
    findings = run_check(Host(str(root)), "luks")
    luks1 = by(findings, "cr_l1")
    assert luks1.status == WARN and "LUKS1" in luks1.message
    assert f"cryptsetup convert --type luks2 {l1}" in luks1.fix
    assert f"cryptsetup luksConvertKey --key-slot 0 --pbkdf argon2id {l1}" in luks1.fix
    assert by(findings, "cr_l2").status == OK
    # keyslot 1 is PBKDF2, but a token unlocks it (as systemd-cryptenroll does): no warning
    assert by(findings, "cr_tok") == Finding(
        OK, "cr_tok", f"LUKS2 on {token}, argon2id, pbkdf2", check="luks"
    )
    assert by(findings, "cr_plain").status == FAIL
    assert "is not a LUKS device" in by(findings, "cr_plain").message
    assert by(findings, "cr_gone").status == FAIL
    assert "does not exist" in by(findings, "cr_gone").message
    assert by(findings, "cr_maybe").status == WARN


def test_a_pbkdf2_keyslot_without_token_warns_with_luksconvertkey(
    tmp_path: Path, commands: Commands
) -> None:
    dev = device(tmp_path, "weak")
    commands.luks(dev, "luksDump-luks2-one-slot.txt")
    metadata = fixture("luksDump-luks2-one-slot.json")
    commands.set(
        ["cryptsetup", "luksDump", "--dump-json-metadata", dev],
        metadata.replace('"type":"argon2id"', '"type":"pbkdf2"'),
    )
    root = seed(tmp_path, f"cr_weak {dev} - luks\n")
    (finding,) = run_check(Host(str(root)), "luks")
    assert finding.status == WARN
    assert "keyslot 0 " in finding.message and "PBKDF2" in finding.message
    assert finding.fix == f"cryptsetup luksConvertKey --key-slot 0 --pbkdf argon2id {dev}"


def test_one_keyslot_warns_and_the_fix_authenticates_with_the_keyfile(
    tmp_path: Path, commands: Commands
) -> None:
    one, two = device(tmp_path, "one"), device(tmp_path, "two")
    commands.luks(one, "luksDump-luks2-one-slot.txt", "luksDump-luks2-one-slot.json")
    commands.luks(
        two, "luksDump-luks2-pbkdf2-token-slot.txt", "luksDump-luks2-pbkdf2-token-slot.json"
    )
    root = seed(tmp_path, f"cr_one {one} /etc/luksvm/keys/one.key luks\ncr_two {two} - luks\n")
    findings = run_check(Host(str(root)), "recovery-key")
    assert by(findings, "cr_one").status == WARN
    assert "only keyslot 0" in by(findings, "cr_one").message
    assert by(findings, "cr_one").fix.startswith(
        f"cryptsetup luksAddKey --key-file /etc/luksvm/keys/one.key {one}"
    )
    assert by(findings, "cr_two") == Finding(
        OK, "cr_two", "keyslots 0, 1 in use", check="recovery-key"
    )


def test_headers_are_read_once_for_both_checks(tmp_path: Path, commands: Commands) -> None:
    dev = device(tmp_path, "one")
    commands.luks(dev, "luksDump-luks2-one-slot.txt", "luksDump-luks2-one-slot.json")
    root = seed(tmp_path, f"cr_one {dev} - luks\n")
    doctor.run_checks(Host(str(root)), doctor.select(["luks", "recovery-key"]))
    assert commands.calls.count(("cryptsetup", "luksDump", dev)) == 1


# --- guest-vg-leak --------------------------------------------------------------------------------

OPEN_NAMES = [
    "/dev/block/253:3",
    "/dev/disk/by-id/dm-name-cr_imap_encr",
    f"/dev/disk/by-id/dm-uuid-CRYPT-LUKS2-{LUKS2_UUID_HEX}-cr_imap_encr",
    "/dev/disk/by-id/lvm-pv-uuid-Gq3d2P-2yXh-4Kze-9t0b-gk5Y-Wvmw-8mQz1c",
    "/dev/dm-3",
    "/dev/mapper/cr_imap_encr",
]


def leak_root(tmp_path: Path, commands: Commands) -> Path:
    dev = device(tmp_path, "lvimap_hd0")
    commands.luks(dev, "luksDump-luks2-one-slot.txt", "luksDump-luks2-one-slot.json")
    commands.pvs([pv_row("/dev/sda2", "volgrp4"), pv_row("/dev/mapper/cr_imap_encr", "vgmail")])
    return seed(tmp_path, f"cr_imap_encr {dev} - luks,x-luksvm.guest=mail\n")


def test_reject_before_catch_all_still_leaks_through_dm_n_and_fix_has_no_catch_all(
    tmp_path: Path, commands: Commands
) -> None:
    root = leak_root(tmp_path, commands)
    commands.lvm(full="lvmconfig-full-reject-then-catch-all.txt")
    commands.pvs([pv_row("/dev/mapper/cr_imap_encr", "vgmail")], ["/dev/mapper/cr_imap_encr"])
    commands.vg_layout("vgmail", "/dev/mapper/cr_imap_encr", {"root": True, "swap": False})
    host = FakeHost(str(root), open_names={"cr_imap_encr": OPEN_NAMES})
    (finding,) = run_check(host, "guest-vg-leak")
    assert finding.status == FAIL
    assert "guest VG vgmail" in finding.message
    assert "/dev/dm-3" in finding.message  # the name the reject pattern missed
    assert "active on the host now: vgmail/root;" in finding.message
    assert "cannot be closed" in finding.message and "corrupt" in finding.message
    assert 'global_filter = [ "a|^/dev/sda2$|", "r|.*|" ]' in finding.fix
    assert 'a|.*|" ]' not in finding.fix
    assert "pvs -a" in finding.fix and "initramfs" in finding.fix


def test_a_closed_mapping_the_filter_accepts_warns(tmp_path: Path, commands: Commands) -> None:
    root = leak_root(tmp_path, commands)
    commands.lvm()
    (finding,) = run_check(FakeHost(str(root)), "guest-vg-leak")
    assert finding.status == WARN
    assert finding.message.startswith("when unlocked, the host's LVM will scan")
    assert "/dev/dm-0" in finding.message  # the next free dm number in an empty /sys
    assert 'global_filter = [ "a|^/dev/sda2$|", "r|.*|" ]' in finding.fix


def test_the_filter_fix_is_built_once_for_every_volume_it_applies_to(
    tmp_path: Path, commands: Commands, monkeypatch: pytest.MonkeyPatch
) -> None:
    lines = ""
    for n in range(6):
        dev = device(tmp_path, f"lv{n}")
        commands.luks(dev, "luksDump-luks2-one-slot.txt", "luksDump-luks2-one-slot.json")
        lines += f"cr_{n} {dev} - luks,x-luksvm.guest=g{n}\n"
    commands.pvs([pv_row("/dev/sda2", "volgrp4")])
    commands.lvm()
    root = seed(tmp_path, lines)
    built = []
    monkeypatch.setattr(
        doctor, "proposed_global_filter", lambda host: built.append(host) or "global_filter = []"
    )
    findings = run_check(FakeHost(str(root)), "guest-vg-leak")
    assert [f.status for f in findings] == [WARN] * 6
    assert {f.fix.splitlines()[1].strip() for f in findings} == {"global_filter = []"}
    assert len(built) == 1  # was once per volume: O(volumes²) at 200 volumes


def test_the_proposed_filter_hides_the_open_mapping(tmp_path: Path, commands: Commands) -> None:
    root = leak_root(tmp_path, commands)
    lvm_dir = root / "etc/lvm"
    lvm_dir.mkdir(parents=True)
    commands.lvm(full="lvmconfig-full-devicesfile.txt")  # global_filter a|^/dev/sda2$|, r|.*|
    commands.set(
        ["lvmconfig", "--typeconfig", "full"],
        fixture("lvmconfig-full-devicesfile.txt").replace("use_devicesfile=1", "use_devicesfile=0"),
    )
    host = FakeHost(str(root), open_names={"cr_imap_encr": OPEN_NAMES})
    (finding,) = run_check(host, "guest-vg-leak")
    assert finding == Finding(
        OK,
        "cr_imap_encr",
        "hidden from the host's LVM: devices/global_filter rejects it",
        check="guest-vg-leak",
    )


def test_with_a_devices_file_only_a_listed_mapping_leaks(
    tmp_path: Path, commands: Commands
) -> None:
    root = leak_root(tmp_path, commands)
    commands.lvm(full="lvmconfig-full-devicesfile.txt")
    devices = root / "etc/lvm/devices"
    devices.mkdir(parents=True)
    (devices / "system.devices").write_text(
        "# LVM uses devices listed in this file.\nVERSION=1.1.2\n"
        "IDTYPE=sys_wwid IDNAME=naa.600508b1001c2d3e DEVNAME=/dev/sda2 PVID=abc PART=2\n"
    )
    host = FakeHost(str(root), open_names={"cr_imap_encr": OPEN_NAMES})
    (finding,) = run_check(host, "guest-vg-leak")
    assert finding.status == OK
    assert "does not list it" in finding.message

    with (devices / "system.devices").open("a") as f:
        f.write(
            f"IDTYPE=crypt_uuid IDNAME=CRYPT-LUKS2-{LUKS2_UUID_HEX}-cr_imap_encr "
            "DEVNAME=/dev/dm-3 PVID=def\n"
        )
    commands.pvs([pv_row("/dev/mapper/cr_imap_encr", "vgmail")], ["/dev/mapper/cr_imap_encr"])
    commands.vg_layout("vgmail", "/dev/mapper/cr_imap_encr", {})
    host = FakeHost(str(root), open_names={"cr_imap_encr": OPEN_NAMES})
    (finding,) = run_check(host, "guest-vg-leak")
    assert finding.status == FAIL
    assert finding.fix.startswith("lvmdevices --deldev /dev/mapper/cr_imap_encr")


def test_a_guest_with_a_partition_table_does_not_leak(tmp_path: Path, commands: Commands) -> None:
    root = leak_root(tmp_path, commands)
    commands.lvm()
    commands.pvs([], ["/dev/mapper/cr_imap_encr"])
    host = FakeHost(str(root), open_names={"cr_imap_encr": OPEN_NAMES})
    (finding,) = run_check(host, "guest-vg-leak")
    assert finding.status == OK
    assert "no PV lies directly on it" in finding.message


def test_lvmetad_with_only_devices_filter_still_autoactivates(
    tmp_path: Path, commands: Commands
) -> None:
    root = leak_root(tmp_path, commands)
    commands.lvm(
        full="lvmconfig-full-filter-only-use_lvmetad.txt",
        current="lvmconfig-current-use_lvmetad.txt",
        version="  LVM version:     2.02.187(2)-RHEL7 (2020-03-24)\n",
    )
    commands.unit_files(
        str(root),
        '[{"unit_file":"lvm2-lvmetad.socket","state":"enabled","preset":"enabled"},'
        '{"unit_file":"lvm2-lvmetad.service","state":"static","preset":"enabled"}]',
    )
    commands.pvs([pv_row("/dev/mapper/cr_imap_encr", "vgmail")], ["/dev/mapper/cr_imap_encr"])
    commands.vg_layout("vgmail", "/dev/mapper/cr_imap_encr", {})
    host = FakeHost(str(root), open_names={"cr_imap_encr": OPEN_NAMES})
    findings = doctor.run_checks(host, doctor.select(["guest-vg-leak", "lvmetad"]))
    leak = next(f for f in findings if f.check == "guest-vg-leak")
    assert leak.status == FAIL
    assert "apply only devices/global_filter" in leak.message
    fight = by(findings, "autoactivation")
    assert fight.status == FAIL
    assert fight.fix == "move the reject patterns from filter to global_filter in /etc/lvm/lvm.conf"


# --- lvmetad ------------------------------------------------------------------------------------


def test_lvm_2_03_needs_no_lvmetad(tmp_path: Path, commands: Commands) -> None:
    commands.lvm()
    findings = run_check(Host(str(tmp_path)), "lvmetad")
    assert by(findings, "host") == Finding(
        OK,
        "host",
        "LVM 2.03.16 has no lvmetad (removed in 2.03): nothing needs to run",
        check="lvmetad",
    )


def test_lvm_2_03_warns_about_a_leftover_use_lvmetad(tmp_path: Path, commands: Commands) -> None:
    commands.lvm(current="lvmconfig-current-use_lvmetad.txt")
    finding = by(run_check(Host(str(tmp_path)), "lvmetad"), "host")
    assert finding.status == WARN
    assert "use_lvmetad" in finding.fix


def test_lvm_2_02_with_lvmetad_units_missing_fails_with_the_enable_command(
    tmp_path: Path, commands: Commands
) -> None:
    commands.lvm(
        full="lvmconfig-full-filter-only-use_lvmetad.txt",
        current="lvmconfig-current-use_lvmetad.txt",
        version="  LVM version:     2.02.187(2)-RHEL7 (2020-03-24)\n",
    )
    commands.unit_files(str(tmp_path), fixture("list-unit-files-debian12.json"))
    finding = by(run_check(Host(str(tmp_path)), "lvmetad"), "host")
    assert finding.status == FAIL
    assert "lvm2-lvmetad.socket is not installed" in finding.message
    assert "Failed to connect to lvmetad. Falling back to internal scanning" in finding.message
    assert finding.fix == "systemctl enable --now lvm2-lvmetad.socket lvm2-lvmetad.service"


def test_lvm_2_02_with_lvmetad_inactive_on_a_running_host_fails(
    tmp_path: Path, commands: Commands, monkeypatch: pytest.MonkeyPatch
) -> None:
    commands.lvm(
        full="lvmconfig-full-filter-only-use_lvmetad.txt",
        version="  LVM version:     2.02.187(2)-RHEL7 (2020-03-24)\n",
    )
    commands.unit_files(
        str(tmp_path),
        '[{"unit_file":"lvm2-lvmetad.socket","state":"enabled","preset":"enabled"},'
        '{"unit_file":"lvm2-lvmetad.service","state":"enabled","preset":"enabled"}]',
    )
    commands.set(
        [
            "systemctl",
            "show",
            "--no-pager",
            "--property=Id,ActiveState",
            "lvm2-lvmetad.socket",
            "lvm2-lvmetad.service",
        ],
        "Id=lvm2-lvmetad.socket\nActiveState=active\n\n"
        "Id=lvm2-lvmetad.service\nActiveState=inactive\n",
    )
    monkeypatch.setattr(doctor.systemctl, "systemd_running", lambda root: True)
    host = Host(str(tmp_path), live=True)
    finding = by(run_check(host, "lvmetad"), "host")
    assert finding.status == FAIL
    assert "lvm2-lvmetad.service is not active" in finding.message


# --- keys and swap --------------------------------------------------------------------------------


def test_keyfile_on_an_unencrypted_filesystem_warns_and_a_missing_one_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = seed(
        tmp_path,
        "cr_a /dev/a /etc/luksvm/keys/a.key luks\ncr_b /dev/b /etc/luksvm/keys/b.key luks\n"
        "cr_c /dev/c /etc/luksvm/keys/c.key luks\ncr_d /dev/d - luks\n"
        "cr_e /dev/e /etc/luksvm/keys/e.key luks\n",
    )
    keys = root / "etc/luksvm/keys"
    keys.mkdir()
    for name in ("a", "c", "e"):
        (keys / f"{name}.key").write_bytes(b"k")
        (keys / f"{name}.key").chmod(0o400)
    (keys / "e.key").chmod(0o644)
    backings = {
        str(keys / "a.key"): blockdev.Backing(False, False, "sda2"),
        str(keys / "c.key"): blockdev.Backing(True, False, "dm-0 (dm-crypt root)"),
    }
    monkeypatch.setattr(blockdev, "backing_of_file", lambda path, sys, proc: backings[path])
    findings = run_check(Host(str(root)), "keys")
    assert by(findings, "cr_a").status == WARN
    assert "sda2, which is not encrypted" in by(findings, "cr_a").message
    assert "tpm2-device=auto" in by(findings, "cr_a").fix
    assert by(findings, "cr_b").status == FAIL
    assert by(findings, "cr_c").status == OK
    assert by(findings, "cr_d").status == OK
    assert by(findings, "cr_e").status == FAIL
    assert "has mode 0644: group or others may access it" in by(findings, "cr_e").message
    assert by(findings, "cr_e").fix == f"chmod 0400 {keys / 'e.key'}"


def test_unencrypted_swap_warns_and_encrypted_or_zram_swap_is_fine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = seed(tmp_path, "cr_a /dev/a - luks\n")
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "swaps").write_text(
        "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"
        "/dev/sda3                               partition\t1048572\t\t0\t\t-2\n"
        "/dev/dm-1                               partition\t1048572\t\t0\t\t-3\n"
        "/dev/zram0                              partition\t524284\t\t0\t\t100\n"
    )
    backings = {
        "/dev/sda3": blockdev.Backing(False, False, "sda3"),
        "/dev/dm-1": blockdev.Backing(True, False, "dm-1 (dm-crypt cryptswap)"),
        "/dev/zram0": blockdev.Backing(False, True, "zram0 (memory)"),
    }
    monkeypatch.setattr(blockdev, "backing_of_device", lambda path, sys, proc: backings[path])
    host = Host(str(root), proc=str(proc), live=True)
    findings = run_check(host, "swap")
    assert by(findings, "/dev/sda3").status == WARN
    assert "/dev/urandom swap" in by(findings, "/dev/sda3").fix
    assert by(findings, "/dev/dm-1").status == OK
    assert by(findings, "/dev/zram0").status == OK


def test_swap_is_not_judged_for_another_root(tmp_path: Path) -> None:
    (finding,) = run_check(Host(str(tmp_path)), "swap")
    assert finding.status == SKIP


def test_doctor_over_a_root_without_processes_for_config_only(tmp_path: Path) -> None:
    report = doctor.doctor(str(seed(tmp_path, "cr_a /dev/a - luks\n")), ["config"])
    assert report.exit_code == 0
    assert [f.status for f in report.findings] == [OK]
    assert os.path.isabs(report.findings[0].check) is False


# --- units and ordering ---------------------------------------------------------------------------

TARGET_ENABLED = '[{"unit_file":"luksvm.target","state":"enabled","preset":"disabled"}]'


def test_units_never_applied_then_in_sync_then_out_of_sync(
    tmp_path: Path, commands: Commands
) -> None:
    from luksvm import apply, config

    root = seed(tmp_path, "cr_a /dev/a - luks,x-luksvm.guest=mail\n")
    commands.unit_files(str(root), "[]")
    (*_, target) = findings = run_check(Host(str(root)), "units")
    assert findings[0].status == FAIL
    assert findings[0].fix == "luksvm apply && systemctl enable luksvm.target"
    assert (target.subject, target.status) == ("luksvm.target", FAIL)
    assert target.message.startswith("luksvm.target is not installed")

    apply.execute(apply.plan(config.load(str(root)), luksvm_path=apply.luksvm_path()))
    commands.unit_files(str(root), TARGET_ENABLED)
    findings = run_check(Host(str(root)), "units")
    assert {f.subject: f.status for f in findings} == {"cr_a": OK, "mail": OK, "luksvm.target": OK}

    write_config(root, {"20-more.conf": "cr_b /dev/b - luks,x-luksvm.guest=web\n"})
    findings = run_check(Host(str(root)), "units")
    assert by(findings, "cr_b").status == WARN
    assert "apply would write etc/systemd/system/luksvm-unlock@cr_b.service.d" in (
        by(findings, "cr_b").message
    )
    assert by(findings, "web").status == WARN
    assert by(findings, "cr_a").status == OK


@pytest.mark.parametrize(
    ("state", "status"),
    [
        ("enabled-runtime", OK),
        ("alias", OK),
        ("linked", FAIL),
        ("masked", FAIL),
        ("transient", FAIL),
    ],
)
def test_target_counts_as_enabled_exactly_when_systemctl_is_enabled_says_so(
    tmp_path: Path, commands: Commands, state: str, status: str
) -> None:
    root = seed(tmp_path, "cr_a /dev/a - luks,x-luksvm.guest=mail\n")
    commands.unit_files(
        str(root), TARGET_ENABLED.replace('"state":"enabled"', f'"state":"{state}"')
    )
    target = by(run_check(Host(str(root)), "units"), "luksvm.target")
    assert (target.status, target.message.startswith(f"luksvm.target is {state}")) == (
        status,
        status == FAIL,
    )


def show_block(unit: str, **properties: str) -> str:
    return "\n".join([f"Id={unit}", *(f"{k}={v}" for k, v in properties.items())]) + "\n\n"


def test_ordering_is_read_from_systemd_for_the_daemon_in_use(
    tmp_path: Path, commands: Commands, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(doctor.systemctl, "systemd_running", lambda root: True)
    root = seed(
        tmp_path,
        "cr_a /dev/a /etc/luksvm/keys/a.key luks,x-luksvm.guest=mail\n"
        "cr_b /dev/b /etc/luksvm/keys/b.key luks,x-luksvm.guest=mail\n"
        "cr_c /dev/c - luks,noauto,x-luksvm.guest=web\n",
    )
    daemons = ["libvirtd.service", "virtqemud.service", "libvirtd.socket", "virtqemud.socket"]
    commands.set(
        [
            "systemctl",
            "show",
            "--no-pager",
            "--property=Id,LoadState,ActiveState,UnitFileState",
            *daemons,
        ],
        show_block(
            "libvirtd.service", LoadState="not-found", ActiveState="inactive", UnitFileState=""
        )
        + show_block(
            "virtqemud.service",
            LoadState="loaded",
            ActiveState="inactive",
            UnitFileState="disabled",
        )
        + show_block(
            "libvirtd.socket", LoadState="not-found", ActiveState="inactive", UnitFileState=""
        )
        + show_block(
            "virtqemud.socket", LoadState="loaded", ActiveState="active", UnitFileState="enabled"
        ),
    )
    units = [
        "luksvm-unlock@cr_a.service",
        "luksvm-unlock@cr_b.service",
        "luksvm-unlock@cr_c.service",
        "luksvm-guest@mail.service",
        "luksvm-guest@web.service",
    ]
    commands.set(
        ["systemctl", "show", "--no-pager", "--property=Id,LoadState,Before,After", *units],
        show_block(
            units[0],
            LoadState="loaded",
            Before="libvirtd.service virtqemud.service",
            After="dev-a.device",
        )
        + show_block(
            units[1],
            LoadState="loaded",
            Before="blockdev@dev-mapper-cr_b.target",
            After="dev-b.device",
        )
        + show_block(units[2], LoadState="loaded", Before="", After="dev-c.device")
        + show_block(
            units[3],
            LoadState="loaded",
            Before="",
            After="virtqemud.service luksvm-unlock@cr_a.service",
        )
        + show_block(units[4], LoadState="loaded", Before="", After="libvirtd.service"),
    )
    findings = run_check(Host(str(root), live=True), "ordering")
    assert by(findings, "cr_a").status == OK
    assert by(findings, "cr_b").status == FAIL
    assert "not ordered before virtqemud.service" in by(findings, "cr_b").message
    assert by(findings, "cr_c").status == OK  # asks for a passphrase: not before libvirt
    assert by(findings, "mail").status == OK
    assert by(findings, "web").status == FAIL


def test_ordering_needs_a_running_systemd(tmp_path: Path) -> None:
    (finding,) = run_check(Host(str(seed(tmp_path, "cr_a /dev/a - luks\n"))), "ordering")
    assert finding.status == SKIP


def test_fstrim_timer_disabled_warns(tmp_path: Path, commands: Commands) -> None:
    commands.unit_files(
        str(tmp_path), '[{"unit_file":"fstrim.timer","state":"disabled","preset":"enabled"}]'
    )
    (finding,) = run_check(Host(str(tmp_path)), "discard")
    assert (finding.subject, finding.status) == ("fstrim.timer", WARN)
    assert finding.fix == "systemctl enable --now fstrim.timer"
    commands.unit_files(str(tmp_path), fixture("list-unit-files-debian12.json"))
    (finding,) = run_check(Host(str(tmp_path)), "discard")
    assert finding.status == OK


# --- guests and discard chains ------------------------------------------------------------------


def domain(name: str, disks: dict[str, str]) -> str:
    """Domain XML as libvirt returns it (XMLDesc), reduced to what the checks read."""
    devices = "".join(
        f"<disk type='block' device='disk'><driver name='qemu' type='raw'{extra}/>"
        f"<source dev='{source}'/><target dev='{target}' bus='virtio'/></disk>"
        for target, (source, extra) in (
            (t, (s.split("|")[0], s.split("|")[1] if "|" in s else "")) for t, s in disks.items()
        )
    )
    return f"<domain type='kvm'><name>{name}</name><devices>{devices}</devices></domain>"


class LibvirtHost(FakeHost):
    def __init__(self, root: str, facts: dict[str, doctor.DomainFacts], **kw: object) -> None:
        super().__init__(root, **kw)  # type: ignore[arg-type]
        self.facts = facts

    @property
    def libvirt_reachable(self) -> bool:
        return True

    def domains(self) -> dict[str, doctor.DomainFacts]:
        return self.facts


def test_autostart_and_libvirt_guests_suspending_to_plain_disk(
    tmp_path: Path, commands: Commands
) -> None:
    root = seed(tmp_path, "cr_a /dev/a - luks,x-luksvm.guest=mail\n")
    (root / "etc/default").mkdir(parents=True)
    (root / "etc/default/libvirt-guests").write_text(
        "#ON_SHUTDOWN=shutdown\nSHUTDOWN_TIMEOUT=300\n"
    )
    commands.unit_files(
        str(root), '[{"unit_file":"libvirt-guests.service","state":"enabled","preset":"enabled"}]'
    )
    facts = {
        "mail": doctor.DomainFacts("mail", True, domain("mail", {"vda": "/dev/mapper/cr_a"}), True)
    }
    findings = run_check(LibvirtHost(str(root), facts), "guests")
    autostart = next(f for f in findings if "autostart" in f.message)
    assert (autostart.subject, autostart.status) == ("mail", WARN)
    assert autostart.fix.startswith("luksvm apply --take-over")
    suspend = by(findings, "libvirt-guests")
    assert suspend.status == FAIL
    assert "ON_SHUTDOWN=suspend, its default" not in suspend.message  # the file exists
    assert suspend.fix == (
        "set ON_SHUTDOWN=shutdown in /etc/default/libvirt-guests (luksvm stops its guests before "
        "libvirt-guests runs)"
    )

    (root / "etc/default/libvirt-guests").write_text("ON_SHUTDOWN=shutdown\n")
    assert by(run_check(LibvirtHost(str(root), facts), "guests"), "libvirt-guests").status == OK


def test_a_guest_disk_without_discard_unmap_breaks_the_chain(
    tmp_path: Path, commands: Commands
) -> None:
    a, b = device(tmp_path, "a"), device(tmp_path, "b")
    commands.luks(a, "luksDump-luks2-one-slot.txt", "luksDump-luks2-one-slot.json")
    commands.luks(b, "luksDump-luks2-one-slot.txt", "luksDump-luks2-one-slot.json")
    commands.unit_files(str(tmp_path / "root"), fixture("list-unit-files-debian12.json"))
    root = seed(
        tmp_path,
        f"cr_a {a} - luks,discard,x-luksvm.guest=mail\ncr_b {b} - luks,x-luksvm.guest=mail\n",
    )
    xml = domain("mail", {"vda": "/dev/mapper/cr_a| discard='unmap'", "vdb": "/dev/mapper/cr_b"})
    facts = {"mail": doctor.DomainFacts("mail", True, xml, False)}
    findings = run_check(LibvirtHost(str(root), facts), "discard")
    # cr_a: domain and dm-crypt pass; the backing device cannot be judged off the live host
    assert by(findings, "cr_a").status == SKIP
    assert by(findings, "cr_b").status == WARN
    assert by(findings, "cr_b").message.startswith("guest mail's discards stop at domain disk: vdb")
    assert "discard='unmap'" in by(findings, "cr_b").fix
    assert by(findings, "fstrim.timer").status == OK
