from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from luksvm import blockdev, config, cryptsetup, lvm, systemctl, unlock
from luksvm.config import Volume, parse_crypttab
from luksvm.devmapper import DmDevice, Opener, parse_info, qemu_guest_name
from luksvm.errors import LuksvmError
from luksvm.lvm import VolumeGroup
from luksvm.unlock import LockProbe, UnlockProbe, lock_plan, unlock_plan
from tests.conftest import write_config

SCS = "/lib/systemd/systemd-cryptsetup"
VG_UUID = "Ab12Cd-0000-1111-2222-3333-4444-555566"
LV_UUID = "Zz" * 16
OTHER_VG_UUID = "Qq99Rr-0000-1111-2222-3333-4444-555566"


def volume(line: str) -> Volume:
    (found,), problems = parse_crypttab(line, "t.conf")
    assert not problems
    return found


def probe(**kw: Any) -> UnlockProbe:
    values: dict[str, Any] = {
        "active": False,
        "device_present": True,
        "systemd_cryptsetup": SCS,
        "terminal": True,
    }
    values.update(kw)
    return UnlockProbe(**values)


# --- unlock ----------------------------------------------------------------------------------


def test_keyfile_volume_attaches_headless_with_one_try_and_no_generator_options() -> None:
    vol = volume(
        "cr_imap_encr /dev/vg/imap /etc/luksvm/keys/imap.key "
        "discard,noauto,nofail,x-systemd.device-timeout=10s,keyfile-timeout=5s,_netdev,"
        "x-luksvm.guest=mail"
    )
    plan = unlock_plan(vol, probe(), key_file="/etc/luksvm/keys/imap.key")
    (step,) = plan.steps
    assert step.argv == (
        SCS,
        "attach",
        "cr_imap_encr",
        "/dev/vg/imap",
        "/etc/luksvm/keys/imap.key",
        "luks,discard,headless=true,tries=1",
    )
    assert not step.interactive


def test_an_admins_headless_and_tries_are_kept() -> None:
    vol = volume("cr_a /dev/vg/a /etc/luksvm/keys/a.key luks,tries=3,headless=false")
    assert unlock.attach_options(vol) == ("luks", "tries=3", "headless=false")


def test_passphrase_volume_gets_no_headless_and_asks_on_the_terminal() -> None:
    vol = volume("cr_web /dev/vg/web - luks,discard")
    (step,) = unlock_plan(vol, probe()).steps
    assert step.argv == (SCS, "attach", "cr_web", "/dev/vg/web", "-", "luks,discard")
    assert step.interactive


def test_keyring_volume_opens_with_the_key_on_stdin() -> None:
    vol = volume("cr_web UUID=ABC keyring:luksvm/cr_web luks,discard,x-luksvm.guest=web")
    (step,) = unlock_plan(vol, probe()).steps
    assert step.argv == (
        "cryptsetup",
        "open",
        "--type",
        "luks",
        "--allow-discards",
        "--key-file=-",
        "/dev/disk/by-uuid/ABC",
        "cr_web",
    )
    assert step.key_from_keyring and not step.interactive


@pytest.mark.parametrize(
    ("options", "flags"),
    [
        ("luks,discard", "--allow-discards"),
        ("read-only,same-cpu-crypt", "--readonly --perf-same_cpu_crypt"),
        ("no-read-workqueue", "--perf-no_read_workqueue"),
        ("no-write-workqueue,discard,discard", "--perf-no_write_workqueue --allow-discards"),
        ("key-slot=2,keyfile-offset=16", "--key-slot 2 --keyfile-offset 16"),
        ("keyfile-size=64", "--keyfile-size 64"),
        ("timeout=1min,tries=2", "--timeout 60 --tries 2"),
        ("timeout=500ms", "--timeout 1"),
        ("luks,noauto,nofail,headless=true,x-systemd.device-timeout=0", ""),
    ],
)
def test_without_systemd_cryptsetup_options_become_cryptsetup_flags(
    options: str, flags: str
) -> None:
    vol = volume(f"cr_a /dev/vg/a /etc/luksvm/keys/a.key {options}")
    (step,) = unlock_plan(vol, probe(systemd_cryptsetup=""), key_file="/k").steps
    assert step.argv == (
        "cryptsetup",
        "open",
        "--type",
        "luks",
        *flags.split(),
        "--key-file",
        "/k",
        "/dev/vg/a",
        "cr_a",
    )


def test_without_systemd_cryptsetup_a_token_option_is_refused_not_dropped() -> None:
    vol = volume("cr_a /dev/vg/a - luks,tpm2-device=auto")
    plan = unlock_plan(vol, probe(systemd_cryptsetup=""))
    assert not plan.steps
    assert "option 'tpm2-device=auto' needs systemd-cryptsetup" in plan.refusal


def test_systemd_cryptsetup_is_looked_for_newest_layout_first() -> None:
    assert cryptsetup.find_systemd_cryptsetup(lambda p: True) == "/usr/bin/systemd-cryptsetup"
    debian = {"/lib/systemd/systemd-cryptsetup"}
    assert cryptsetup.find_systemd_cryptsetup(debian.__contains__) == SCS
    assert cryptsetup.find_systemd_cryptsetup(lambda p: False) == ""


def test_already_unlocked_is_success_without_a_prompt() -> None:
    vol = volume("cr_web /dev/vg/web - luks")
    plan = unlock_plan(vol, probe(active=True, terminal=False))
    assert (plan.steps, plan.done, plan.refusal) == ((), "already unlocked", "")


def test_no_terminal_refuses_a_passphrase_volume_at_once_and_suggests_ssh_t() -> None:
    vol = volume("cr_web /dev/vg/web - luks,noauto")
    for unit_active in (None, False):
        plan = unlock_plan(vol, probe(terminal=False, unit_active=unit_active))
        assert not plan.steps
        assert "ssh -t HOST luksvm unlock cr_web" in plan.refusal
    keyfile = volume("cr_a /dev/vg/a /etc/luksvm/keys/a.key luks")
    assert unlock_plan(keyfile, probe(terminal=False), key_file="/k").steps


def test_in_a_unit_a_passphrase_is_asked_through_systemd_but_not_for_an_admin() -> None:
    vol = volume("cr_web /dev/vg/web - luks,noauto")
    (step,) = unlock_plan(vol, probe(terminal=False, in_unit=True)).steps
    assert step.interactive
    # a script run by some service, asking to unlock through the unit: nobody would see the prompt
    plan = unlock_plan(vol, probe(terminal=False, in_unit=True, unit_active=False))
    assert "ssh -t HOST luksvm unlock cr_web" in plan.refusal


def test_missing_backing_device_is_refused_naming_it() -> None:
    vol = volume("cr_a /dev/vg/a /etc/luksvm/keys/a.key luks")
    plan = unlock_plan(vol, probe(device_present=False), key_file="/k")
    assert plan.refusal.startswith(
        "cannot unlock cr_a: its device /dev/vg/a (/dev/vg/a, t.conf:1:1)"
    )


def test_admin_unlock_starts_the_unit_interactively_even_when_already_open() -> None:
    vol = volume("cr-client-a /dev/vg/a - luks")
    for active in (False, True):
        (step,) = unlock_plan(vol, probe(active=active, unit_active=False)).steps
        assert step.argv == ("systemctl", "start", "luksvm-unlock@cr\\x2dclient\\x2da.service")
        assert step.interactive
    assert unlock_plan(vol, probe(active=True, unit_active=True)).done == "already unlocked"


def test_guests_start_only_when_all_their_volumes_are_unlocked(tmp_path: Path) -> None:
    write_config(
        tmp_path,
        {
            "10.conf": "cr_a /dev/vg/a - luks,x-luksvm.guest=mail\n"
            "cr_b /dev/vg/b - luks,x-luksvm.guest=mail,x-luksvm.guest=web\n"
            "cr_c /dev/vg/c - luks,x-luksvm.guest=db\n"
        },
    )
    cfg = config.load(str(tmp_path))
    assert unlock.guests_to_start(cfg, ["cr_b"], {"cr_b"}) == ["web"]
    assert unlock.guests_to_start(cfg, ["cr_b"], {"cr_a", "cr_b", "cr_c"}) == ["mail", "web"]
    plan = unlock.start_guests_plan(["mail", "web"])
    assert plan.commands() == [
        "systemctl start --no-block luksvm-guest@mail.service luksvm-guest@web.service"
    ]


def test_unit_states_come_in_the_order_asked() -> None:
    text = "ActiveState=active\n\nActiveState=inactive\n\nActiveState=failed\n"
    assert systemctl.parse_unit_states(["a.service", "b.service", "c.service"], text) == {
        "a.service": "active",
        "b.service": "inactive",
        "c.service": "failed",
    }


# --- lock ------------------------------------------------------------------------------------


def crypt(name: str, kernel: str, open_count: int = 0, holders: tuple[str, ...] = ()) -> DmDevice:
    return DmDevice(name, kernel, f"CRYPT-LUKS2-0123-{name}", open_count, holders)


def lv(name: str, kernel: str, vg_uuid: str = VG_UUID, open_count: int = 0) -> DmDevice:
    return DmDevice(name, kernel, "LVM-" + vg_uuid.replace("-", "") + LV_UUID, open_count, ())


def vgmail(*pvs: str) -> VolumeGroup:
    return VolumeGroup("vgmail", VG_UUID, len(pvs), pvs)


IMAP = "cr_imap_encr /dev/volgrp4/lvimap_hd0 /etc/luksvm/keys/imap.key luks,x-luksvm.guest=mail"


def test_lock_deactivates_the_guest_vg_settles_then_closes() -> None:
    devices = (crypt("cr_imap_encr", "dm-3", 1, ("dm-7",)), lv("vgmail-root", "dm-7"))
    plan = lock_plan(volume(IMAP), LockProbe(devices, (vgmail("/dev/mapper/cr_imap_encr"),)))
    assert plan.commands() == [
        "vgchange -an --devices /dev/mapper/cr_imap_encr vgmail",
        "udevadm settle --timeout=30",
        "cryptsetup close cr_imap_encr",
    ]
    assert plan.steps[-1].unheld and not plan.refusal


def test_lock_of_a_vg_spanning_two_mappings_lets_lvm_see_both() -> None:
    devices = (
        crypt("cr_imap_encr", "dm-3", 1, ("dm-7",)),
        crypt("cr_imap_hd1", "dm-4", 1, ("dm-7",)),
        lv("vgmail-root", "dm-7"),
    )
    vg = vgmail("/dev/mapper/cr_imap_encr", "/dev/mapper/cr_imap_hd1")
    plan = lock_plan(volume(IMAP), LockProbe(devices, (vg,)))
    assert plan.commands()[0] == (
        "vgchange -an --devices /dev/mapper/cr_imap_encr --devices /dev/mapper/cr_imap_hd1 vgmail"
    )
    assert not plan.notes


def test_lock_notes_a_vg_with_pvs_outside_open_mappings() -> None:
    devices = (crypt("cr_imap_encr", "dm-3", 1, ("dm-7",)), lv("vgmail-root", "dm-7"))
    vg = VolumeGroup("vgmail", VG_UUID, 2, ("/dev/mapper/cr_imap_encr",))
    (note,) = lock_plan(volume(IMAP), LockProbe(devices, (vg,))).notes
    assert "VG vgmail has 2 PVs, 1 of them on open LUKS mappings" in note


def test_inactive_guest_vg_needs_no_vgchange() -> None:
    devices = (crypt("cr_imap_encr", "dm-3"),)
    plan = lock_plan(volume(IMAP), LockProbe(devices, (vgmail("/dev/mapper/cr_imap_encr"),)))
    assert plan.commands() == ["cryptsetup close cr_imap_encr"]


def test_already_closed_is_success() -> None:
    plan = lock_plan(volume(IMAP), LockProbe((crypt("cr_web", "dm-2"),), ()))
    assert (plan.steps, plan.done, plan.refusal) == ((), "already locked", "")


def test_lock_refuses_while_a_guests_qemu_holds_the_mapping() -> None:
    devices = (crypt("cr_imap_encr", "dm-3", 1),)
    users = {"dm-3": (Opener('QEMU of guest "mail" (pid 812)', guest="mail"),)}
    plan = lock_plan(volume(IMAP), LockProbe(devices, (), users))
    assert not plan.steps
    assert plan.refusal == (
        'cannot lock cr_imap_encr: still held by QEMU of guest "mail" (pid 812); '
        'stop guest "mail" first (luksvm stop mail)'
    )


def test_lock_refuses_while_a_guest_lv_is_mounted_and_changes_nothing() -> None:
    devices = (
        crypt("cr_imap_encr", "dm-3", 1, ("dm-7",)),
        lv("vgmail-root", "dm-7", open_count=1),
    )
    probe = LockProbe(
        devices,
        (vgmail("/dev/mapper/cr_imap_encr"),),
        {"dm-7": (Opener("mounted at /mnt", mount_point="/mnt"),)},
    )
    plan = lock_plan(volume(IMAP), probe)
    assert not plan.steps
    assert plan.refusal == (
        "cannot lock cr_imap_encr: still held by dm-7 (vgmail-root) mounted at /mnt; unmount /mnt"
    )


def test_lock_names_an_lv_of_a_vg_lvm_did_not_find_on_the_mapping() -> None:
    devices = (
        crypt("cr_imap_encr", "dm-3", 1, ("dm-7",)),
        lv("vgmail-root", "dm-7", vg_uuid=OTHER_VG_UUID),
    )
    plan = lock_plan(volume(IMAP), LockProbe(devices, ()))
    assert plan.refusal == (
        "cannot lock cr_imap_encr: still held by dm-7 (vgmail-root, active); "
        "deactivate VG vgmail (vgchange -an vgmail)"
    )


def test_an_opener_not_found_is_counted_and_the_guests_suggested() -> None:
    devices = (crypt("cr_imap_encr", "dm-3", 2),)
    plan = lock_plan(volume(IMAP), LockProbe(devices, ()))
    assert plan.refusal == (
        "cannot lock cr_imap_encr: still held by 2 more opener(s) of dm-3 (cr_imap_encr) not "
        'found in /proc; stop guest "mail" first (luksvm stop mail)'
    )


def test_only_unexplained_openers_make_a_refusal_transient() -> None:
    unexplained = lock_plan(volume(IMAP), LockProbe((crypt("cr_imap_encr", "dm-3", 1),), ()))
    assert unexplained.refusal and unexplained.transient
    users = {"dm-3": (Opener('QEMU of guest "mail" (pid 812)', guest="mail"),)}
    qemu = lock_plan(volume(IMAP), LockProbe((crypt("cr_imap_encr", "dm-3", 1),), (), users))
    assert qemu.refusal and not qemu.transient


def test_lock_waits_for_an_opener_no_process_explains(monkeypatch: pytest.MonkeyPatch) -> None:
    # Seen in the VM at shutdown: spare's QEMU, SIGKILLed with its machine scope, still held
    # cr_spare when the lock looked; a few seconds later the mapping was free.
    probes = [
        LockProbe((crypt("cr_imap_encr", "dm-3", 1),), ()),
        LockProbe((crypt("cr_imap_encr", "dm-3", 1),), ()),
        LockProbe((crypt("cr_imap_encr", "dm-3", 0),), ()),
    ]
    ran: list[str] = []
    monkeypatch.setattr(unlock, "probe_lock", lambda volume, with_lvm=True: probes.pop(0))
    monkeypatch.setattr(blockdev, "run", lambda argv, **kw: ran.append(argv[0]))
    monkeypatch.setattr(unlock.time, "sleep", lambda seconds: None)
    plan = unlock.settled_lock_plan(volume(IMAP))
    assert plan.commands() == ["cryptsetup close cr_imap_encr"] and not plan.refusal
    assert ran == ["udevadm", "udevadm"] and not probes


def test_lock_waits_for_another_locks_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    # Seen in the VM at shutdown, where the locks run together: one lock's `pvs` held another
    # lock's mapping; refused at once as "held by pvs", that volume stayed open.
    pvs = {"dm-3": (Opener("pvs (pid 912)", scanner=True),)}
    probes = [
        LockProbe((crypt("cr_imap_encr", "dm-3", 1),), (), pvs),
        LockProbe((crypt("cr_imap_encr", "dm-3", 0),), ()),
    ]
    monkeypatch.setattr(unlock, "probe_lock", lambda volume, with_lvm=True: probes.pop(0))
    monkeypatch.setattr(blockdev, "run", lambda argv, **kw: None)
    monkeypatch.setattr(unlock.time, "sleep", lambda seconds: None)
    plan = unlock.settled_lock_plan(volume(IMAP))
    assert plan.commands() == ["cryptsetup close cr_imap_encr"] and not plan.refusal
    assert not probes


def test_lock_never_waits_for_a_process_and_never_forces(monkeypatch: pytest.MonkeyPatch) -> None:
    users = {"dm-3": (Opener('QEMU of guest "mail" (pid 812)', guest="mail"),)}
    held = LockProbe((crypt("cr_imap_encr", "dm-3", 1),), (), users)
    ran: list[str] = []
    monkeypatch.setattr(unlock, "probe_lock", lambda volume, with_lvm=True: held)
    monkeypatch.setattr(blockdev, "run", lambda argv, **kw: ran.append(argv[0]))
    assert unlock.settled_lock_plan(volume(IMAP)).refusal and ran == []
    gone_never = LockProbe((crypt("cr_imap_encr", "dm-3", 1),), ())
    monkeypatch.setattr(unlock, "probe_lock", lambda volume, with_lvm=True: gone_never)
    monkeypatch.setattr(unlock.time, "sleep", lambda seconds: None)
    plan = unlock.settled_lock_plan(volume(IMAP), wait=0.05)
    assert "1 more opener(s) of dm-3 (cr_imap_encr) not found in /proc" in plan.refusal
    assert not plan.steps and ran


# --- the executor: secrets only ever on stdin ------------------------------------------------


def test_keyring_secret_goes_to_stdin_never_argv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = b"s3cret-passphrase-\xc3\xbc"
    write_config(tmp_path, {"10.conf": "cr_web /dev/vg/web keyring:luksvm/cr_web luks\n"})
    cfg = config.load(str(tmp_path))
    calls: list[tuple[tuple[str, ...], bytes | None, bool]] = []

    def fake_run(argv: tuple[str, ...], **kw: Any) -> None:
        calls.append((tuple(argv), kw.get("stdin"), kw.get("secret", False)))

    monkeypatch.setattr(unlock, "run", fake_run)
    monkeypatch.setattr(unlock.keys, "keyring_secret", lambda volume, settings: secret)
    monkeypatch.setattr(unlock.devmapper, "names", lambda: {"cr_web"})
    plan = unlock_plan(cfg.volume("cr_web"), probe())
    unlock.execute(plan, cfg)
    ((argv, stdin, flagged),) = calls
    assert stdin == secret and flagged
    assert not any(secret.decode() in arg or "s3cret" in arg for arg in argv)


def test_a_failed_unlock_names_the_volume_and_is_not_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_config(tmp_path, {"10.conf": "cr_a /dev/vg/a /etc/luksvm/keys/a.key luks\n"})
    cfg = config.load(str(tmp_path))

    def failing_run(argv: tuple[str, ...], **kw: Any) -> None:
        raise unlock.CommandError(argv, 1, "No key available with this passphrase.", "exit 1")

    monkeypatch.setattr(unlock, "run", failing_run)
    plan = unlock_plan(cfg.volume("cr_a"), probe(), key_file="/etc/luksvm/keys/a.key")
    with pytest.raises(LuksvmError, match=r"^cannot unlock cr_a: .*No key available"):
        unlock.execute(plan, cfg)


def test_lock_says_in_the_journal_that_it_deactivates_the_guest_vg(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # At shutdown the journal is all an admin has: it must show the leaked VG being taken down.
    write_config(tmp_path, {"10.conf": IMAP + "\n"})
    cfg = config.load(str(tmp_path))
    devices = (crypt("cr_imap_encr", "dm-3", 1, ("dm-7",)), lv("vgmail-root", "dm-7"))
    plan = lock_plan(volume(IMAP), LockProbe(devices, (vgmail("/dev/mapper/cr_imap_encr"),)))
    ran: list[str] = []
    monkeypatch.setattr(unlock, "run", lambda argv, **kw: ran.append(argv[0]))
    monkeypatch.setattr(unlock, "_refuse_if_held", lambda volume: None)
    monkeypatch.setattr(unlock.devmapper, "names", set)
    with caplog.at_level("INFO", logger="luksvm"):
        unlock.execute(plan, cfg)
    assert ran == ["vgchange", "udevadm", "cryptsetup"]
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "cr_imap_encr: deactivating guest VG vgmail (active on the mapping)",
        "cr_imap_encr: locked",
    ]


# --- parsing what the tools print ------------------------------------------------------------


def test_dmsetup_info_rows_parse_with_any_name() -> None:
    text = (
        "dm-3|1|CRYPT-LUKS2-abc-cr_imap_encr|cr_imap_encr\n"
        "dm-7|0|LVM-xyz|vgmail-root\n"
        "dm-9|0||odd|name\n"
        "No devices found\n"
    )
    assert [(d.kernel, d.open_count, d.name, d.is_crypt, d.is_lv) for d in parse_info(text)] == [
        ("dm-3", 1, "cr_imap_encr", True, False),
        ("dm-7", 0, "vgmail-root", False, True),
        ("dm-9", 0, "odd|name", False, False),
    ]


@pytest.mark.parametrize(
    ("name", "split"),
    [("vgmail-root", ("vgmail", "root")), ("my--vg-my--lv", ("my-vg", "my-lv")), ("x", ("x", ""))],
)
def test_lv_device_names_split_into_vg_and_lv(name: str, split: tuple[str, str]) -> None:
    assert lvm.split_dm_name(name) == split


def test_qemu_guest_name_from_libvirts_command_line() -> None:
    argv = ["/usr/bin/qemu-system-x86_64", "-name", "guest=mail,,x,debug-threads=on", "-S"]
    assert qemu_guest_name(argv) == "mail,x"
    assert qemu_guest_name(["/usr/bin/qemu-system-x86_64", "-name", "web"]) == "web"
    assert qemu_guest_name(["/bin/dd", "-name", "x"]) == ""


def test_dry_run_commands_are_shell_quoted() -> None:
    vol = volume("cr_a /dev/disk/by-label/my\\x20disk /etc/luksvm/keys/a.key luks")
    plan = unlock_plan(vol, probe(), key_file="/etc/luksvm/keys/a.key")
    assert shlex.split(plan.commands()[0])[3] == "/dev/disk/by-label/my\\x20disk"


@pytest.mark.parametrize(
    "args", [["unlock"], ["lock", "--all", "cr_web"], ["unlock", "--all", "x"]]
)
def test_names_or_all_but_not_both(
    args: list[str], seed_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from luksvm.cli import main

    assert main(["--root", str(seed_root), *args]) == 64
    assert capsys.readouterr().err == "luksvm: name one or more volumes, or give --all\n"


def test_a_mapping_closed_by_someone_else_during_the_lock_is_success(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seen in the VM at shutdown: blk-availability's blkdeactivate closed cr_q2 between the lock
    unit's probe and its `cryptsetup close`, which then failed with "Device cr_q2 is not active"."""
    write_config(tmp_path, {"10.conf": IMAP + "\n"})
    cfg = config.load(str(tmp_path))
    open_names = {"cr_imap_encr"}

    def closed_meanwhile(argv: tuple[str, ...], **kw: Any) -> None:
        open_names.clear()
        raise unlock.CommandError(argv, 4, "", "Device cr_imap_encr is not active.")

    monkeypatch.setattr(unlock, "run", closed_meanwhile)
    monkeypatch.setattr(unlock.devmapper, "names", lambda: set(open_names))
    plan = lock_plan(cfg.volume("cr_imap_encr"), LockProbe((crypt("cr_imap_encr", "dm-3"),), ()))
    monkeypatch.setattr(unlock, "_refuse_if_held", lambda volume: None)
    unlock.execute(plan, cfg)  # no error

    # still open after a failed close: a real failure
    open_names.add("cr_imap_encr")
    monkeypatch.setattr(unlock.devmapper, "names", lambda: {"cr_imap_encr"})
    with pytest.raises(LuksvmError, match=r"^cannot lock cr_imap_encr: .*not active"):
        unlock.execute(plan, cfg)


# --- the admin's lock through the unit, with the guest's unit left active after a shutdown -----


def _active_units(monkeypatch: pytest.MonkeyPatch, *active: str) -> None:
    monkeypatch.setattr(
        unlock,
        "unit_states",
        lambda units: {u: "active" if u in active else "inactive" for u in units},
    )


CLOSE = unlock.Plan("cr_imap_encr", "lock", (unlock.Step(("cryptsetup", "close", "cr_imap_encr")),))


@pytest.mark.parametrize("state", ["shutoff", "missing"])
def test_lock_stops_the_stale_guest_unit_of_a_shut_off_domain_and_says_so(
    monkeypatch: pytest.MonkeyPatch, state: str
) -> None:
    _active_units(monkeypatch, "luksvm-unlock@cr_imap_encr.service", "luksvm-guest@mail.service")
    asked: list[tuple[str, ...]] = []

    def states(guests: Sequence[str]) -> dict[str, str]:
        asked.append(tuple(guests))
        return {"mail": state}

    plan = unlock._through_unit(volume(IMAP), CLOSE, states)
    assert asked == [("mail",)]
    assert not plan.refusal
    assert plan.commands() == [
        "systemctl stop luksvm-guest@mail.service",
        "systemctl stop luksvm-unlock@cr_imap_encr.service",
    ]
    assert plan.steps[0].says == (
        f"guest mail is {state} in libvirt; stopping its stale unit luksvm-guest@mail.service "
        "(it remained active after the guest went down)"
    )
    assert plan.notes[0] == plan.steps[0].says


@pytest.mark.parametrize(
    ("answer", "extra"),
    [({"mail": "running"}, ""), ({"mail": "paused"}, ""), ({}, " (libvirt did not answer")],
)
def test_lock_still_refuses_while_the_domain_runs_or_libvirt_cannot_tell(
    monkeypatch: pytest.MonkeyPatch, answer: dict[str, str], extra: str
) -> None:
    _active_units(monkeypatch, "luksvm-unlock@cr_imap_encr.service", "luksvm-guest@mail.service")
    plan = unlock._through_unit(volume(IMAP), CLOSE, lambda guests: answer)
    assert not plan.steps
    assert plan.refusal.startswith(
        "cannot lock cr_imap_encr: guest unit(s) luksvm-guest@mail.service require it and are "
        "active" + extra
    )
    assert plan.refusal.endswith("; stop them first: luksvm stop mail")


def test_lock_asks_libvirt_nothing_when_no_guest_unit_is_active(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _active_units(monkeypatch, "luksvm-unlock@cr_imap_encr.service")

    def states(guests: Sequence[str]) -> dict[str, str]:
        raise AssertionError("libvirt asked")

    plan = unlock._through_unit(volume(IMAP), CLOSE, states)
    assert plan.commands() == ["systemctl stop luksvm-unlock@cr_imap_encr.service"]


# --- unattended volumes ------------------------------------------------------------------------


def test_unattended_volume_tries_token_then_tang_then_keyfile_each_bounded_and_headless() -> None:
    vol = volume(
        "cr_k /dev/vg/k /etc/luksvm/keys/k "
        "luks,discard,tpm2-device=auto,tpm2-pcrs=7,x-luksvm.tang,x-luksvm.guest=mail"
    )
    plan = unlock_plan(vol, probe(attempt_timeout=12.0), key_file="/etc/luksvm/keys/k")
    assert plan.attempts and not plan.refusal
    assert [s.source for s in plan.steps] == ["tpm2", "tang", "keyfile"]
    assert all(s.timeout == 12.0 and not s.interactive for s in plan.steps)
    tpm2, tang, keyfile = plan.steps
    # the token alone (no key file: with tpm2-device= it would be read as a sealed blob)
    assert tpm2.argv == (
        SCS, "attach", "cr_k", "/dev/vg/k", "-",
        "luks,discard,tpm2-device=auto,tpm2-pcrs=7,headless=true,tries=1",
    )  # fmt: skip
    assert tang.key_from_tang and tang.argv == (
        "cryptsetup", "open", "--type", "luks", "--allow-discards", "--key-file=-",
        "/dev/vg/k", "cr_k",
    )  # fmt: skip
    # the keyfile without any token option: it is never given both
    assert keyfile.argv == (
        SCS, "attach", "cr_k", "/dev/vg/k", "/etc/luksvm/keys/k",
        "luks,discard,headless=true,tries=1",
    )  # fmt: skip


def test_unattended_headless_and_tries_are_forced_even_when_written_otherwise() -> None:
    vol = volume("cr_t /dev/vg/t - luks,tpm2-device=auto,headless=false,tries=3")
    (step,) = unlock_plan(vol, probe()).steps
    assert step.argv[-1] == "luks,tpm2-device=auto,headless=true,tries=1"


def test_admin_unlock_after_the_unit_failed_asks_on_the_terminal_then_the_unit_adopts() -> None:
    vol = volume("cr_t /dev/vg/t - luks,discard,tpm2-device=auto,x-luksvm.tang")
    plan = unlock_plan(vol, probe(unit_active=False, unit_failed=True))
    ask, adopt = plan.steps
    assert ask.interactive and ask.source == "prompt"
    assert ask.argv == (SCS, "attach", "cr_t", "/dev/vg/t", "-", "luks,discard")
    assert adopt.argv == ("systemctl", "start", "luksvm-unlock@cr_t.service")
    # the unit has not failed yet: it tries the unattended keys itself
    plan = unlock_plan(vol, probe(unit_active=False))
    assert [s.argv for s in plan.steps] == [("systemctl", "start", "luksvm-unlock@cr_t.service")]
    refused = unlock_plan(vol, probe(unit_active=False, unit_failed=True, terminal=False))
    assert "ssh -t HOST luksvm unlock cr_t" in refused.refusal and not refused.steps


def test_attempt_timeout_per_volume_overrides_the_setting() -> None:
    settings = config.Settings(unattended_timeout=20_000_000)
    assert unlock.attempt_timeout(volume("a /dev/a - luks,x-luksvm.tang"), settings) == 20.0
    vol = volume("a /dev/a - luks,x-luksvm.tang,x-luksvm.unattended-timeout=1min")
    assert unlock.attempt_timeout(vol, settings) == 60.0


def test_fido2_and_pkcs11_options_pass_through_unchanged_to_the_token_attempt() -> None:
    # no real FIDO2 key or PKCS#11 token in the VM: what luksvm can prove is that their options
    # reach systemd-cryptsetup as written, and that the keyfile attempt never carries them
    vol = volume(
        "cr_f /dev/vg/f /etc/luksvm/keys/f "
        "luks,fido2-device=auto,fido2-rp=io.systemd.cryptsetup,token-timeout=10s"
    )
    token, keyfile = unlock_plan(vol, probe(), key_file="/etc/luksvm/keys/f").steps
    assert token.source == "fido2" and token.argv[-1] == (
        "luks,fido2-device=auto,fido2-rp=io.systemd.cryptsetup,token-timeout=10s,"
        "headless=true,tries=1"
    )
    assert keyfile.argv[-1] == "luks,headless=true,tries=1"
    vol = volume("cr_p /dev/vg/p - luks,pkcs11-uri=auto")
    (step,) = unlock_plan(vol, probe()).steps
    assert step.source == "pkcs11" and step.argv[-1] == "luks,pkcs11-uri=auto,headless=true,tries=1"


def test_keyring_volume_with_a_token_option_tries_the_token_then_the_keyring_key() -> None:
    # DESIGN, second turn: the token is the unattended source, the key field its fallback; each
    # attempt gets only its own options (cryptsetup open with a keyring key never sees tpm2-*)
    vol = volume("cr_web UUID=ABC keyring:luksvm/cr_web luks,tpm2-device=auto")
    plan = unlock_plan(vol, probe(systemd_cryptsetup="/lib/systemd/systemd-cryptsetup"))
    assert not plan.refusal
    token, keyring = plan.steps
    assert (
        token.source == "tpm2" and token.argv[-1] == "luks,tpm2-device=auto,headless=true,tries=1"
    )
    assert keyring.key_from_keyring and not any("tpm2" in a for a in keyring.argv)
