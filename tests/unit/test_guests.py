from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import pytest

from luksvm import config, guests, systemctl, units, virt
from luksvm.errors import LuksvmError, UsageError
from tests.conftest import write_config

DOMAIN_XML = """<domain type='kvm'><name>mail</name><devices>
  <disk type='block' device='disk'><driver name='qemu' type='raw' discard='unmap'/>
    <source dev='/dev/mapper/cr_imap_encr'/><target dev='vda' bus='virtio'/></disk>
  <disk type='file' device='disk'><source file='/var/lib/libvirt/images/swap.img'/>
    <target dev='vdb' bus='virtio'/></disk>
  <disk type='file' device='cdrom'><target dev='sda' bus='sata'/></disk>
  <disk type='block' device='disk'><source dev='/dev/disk/by-id/dm-name-cr_imap_hd1'/>
    <target dev='vdc' bus='virtio'/></disk>
  <disk type='block' device='disk'><source dev='/dev/mapper/not_ours'/>
    <target dev='vdd' bus='virtio'/></disk>
</devices></domain>"""


@pytest.fixture
def cfg(tmp_path: Path) -> config.Config:
    write_config(
        tmp_path,
        {
            "10-mail.conf": "cr_imap_encr /dev/vg/a - luks,x-luksvm.guest=mail\n"
            "cr_imap_hd1 /dev/vg/b - luks\n"
            "cr_extra /dev/vg/c - luks,x-luksvm.guest=mail\n"
            "cr_web /dev/vg/d - luks,x-luksvm.guest=web\n"
            "cr_db /dev/vg/e - luks,x-luksvm.guest=db\n"
        },
        "[guests]\nstop_timeout = 10s\n[guest:web]\norder = 2\non_timeout = managedsave\n"
        "[guest:db]\norder = 1\nstart_delay = 5s\n",
    )
    return config.load(str(tmp_path))


def test_disks_come_from_the_domain_xml() -> None:
    assert virt.disks_from_xml(DOMAIN_XML)[:3] == [
        virt.Disk("vda", "disk", "/dev/mapper/cr_imap_encr", "block", "raw", "unmap"),
        virt.Disk("vdb", "disk", "/var/lib/libvirt/images/swap.img"),
        virt.Disk("sda", "cdrom", ""),
    ]


def test_needed_volumes_are_the_luksvm_disks_then_the_configured_ones(cfg: config.Config) -> None:
    disks = virt.disks_from_xml(DOMAIN_XML)
    assert guests.volumes_on_disks(cfg, disks) == ["cr_imap_encr", "cr_imap_hd1"]
    assert guests.needed_volumes(cfg, "mail", disks) == ["cr_imap_encr", "cr_imap_hd1", "cr_extra"]


def test_unlocked_means_the_mapping_exists(cfg: config.Config, tmp_path: Path) -> None:
    assert not guests.unlocked(cfg, "cr_web")
    (tmp_path / "dev/mapper").mkdir(parents=True)
    (tmp_path / "dev/mapper/cr_web").touch()
    assert guests.unlocked(cfg, "cr_web")


def test_guest_unit_names_are_escaped() -> None:
    assert guests.unit_name("cr-client-a") == "luksvm-guest@cr\\x2dclient\\x2da.service"


@pytest.mark.parametrize(
    ("scope", "guest", "match"),
    [
        ("machine-qemu\\x2d3\\x2dmail.scope", "mail", True),
        ("machine-qemu\\x2d3\\x2dmail.scope", "mail2", False),
        ("machine-qemu\\x2d12\\x2dweb\\x2dfront.scope", "web-front", True),
        ("machine-qemu\\x2d1\\x2dwebfront.scope", "web_front", True),  # "_" is dropped
        ("machine-qemu\\x2d1\\x2dhidden.scope", "..hidden.", True),  # leading/trailing dots go
        ("machine-qemu\\x2d1\\x2d" + "a" * 57 + ".scope", "a" * 80, True),  # cut at 64
        ("machine-lxc\\x2d1\\x2dmail.scope", "mail", False),
    ],
)
def test_machine_scope_names_follow_libvirt(scope: str, guest: str, match: bool) -> None:
    assert guests.scope_is_for(scope, guest) is match


def test_qemu_exists_reads_pid_file_and_machine_scopes(cfg: config.Config, tmp_path: Path) -> None:
    assert not guests.qemu_exists(cfg, "mail")
    run_dir = tmp_path / guests.QEMU_RUN_DIR
    run_dir.mkdir(parents=True)
    (run_dir / "mail.pid").write_text("4242\n")
    assert not guests.qemu_exists(cfg, "mail")  # stale: no such process
    (tmp_path / "proc/4242").mkdir(parents=True)
    assert guests.qemu_exists(cfg, "mail")
    assert not guests.qemu_exists(cfg, "web")
    (tmp_path / guests.MACHINE_SLICE / "machine-qemu\\x2d7\\x2dweb.scope").mkdir(parents=True)
    assert guests.qemu_exists(cfg, "web")


def test_only_the_local_system_uri_is_checked_on_the_file_system() -> None:
    assert guests.local_qemu("qemu:///system")
    assert guests.local_qemu("qemu+unix:///system?socket=/run/x")
    assert not guests.local_qemu("qemu+ssh://other/system")
    assert not guests.local_qemu("test:///tmp/x.xml")


def fake_sysfs(
    root: Path, devices: dict[str, tuple[str, list[str]]], majmin: dict[str, str]
) -> str:
    """devices: name -> (dm uuid or "" for a plain disk, slaves)."""
    sys_dir = root / "sys"
    for name, (uuid, slaves) in devices.items():
        base = sys_dir / "class/block" / name
        base.mkdir(parents=True)
        if uuid:
            (base / "dm").mkdir()
            (base / "dm/uuid").write_text(uuid + "\n")
            (base / "slaves").mkdir()
            for slave in slaves:
                (base / "slaves" / slave).mkdir()
    (sys_dir / "dev/block").mkdir(parents=True)
    for number, name in majmin.items():
        os.symlink(f"../../class/block/{name}", sys_dir / "dev/block" / number)
    return str(sys_dir)


def test_encrypted_devices_are_found_through_lvm_and_crypt(tmp_path: Path) -> None:
    sys_dir = fake_sysfs(
        tmp_path,
        {
            "sda": ("", []),
            "dm-0": ("CRYPT-LUKS2-abc-cr_var", ["sda"]),
            "dm-1": ("LVM-xyz", ["dm-0"]),  # LV on an encrypted PV
            "dm-2": ("LVM-uvw", ["dm-0", "sda"]),  # one PV plain
            "dm-3": ("LVM-empty", []),
        },
        {"8:0": "sda", "254:0": "dm-0", "254:1": "dm-1", "254:2": "dm-2", "254:3": "dm-3"},
    )
    assert guests.device_encrypted("254:0", sys_dir)
    assert guests.device_encrypted("254:1", sys_dir)
    assert not guests.device_encrypted("254:2", sys_dir)
    assert not guests.device_encrypted("254:3", sys_dir)
    assert not guests.device_encrypted("8:0", sys_dir)
    assert not guests.device_encrypted("9:9", sys_dir)


def test_managedsave_refusal_explains_where_ram_would_go(cfg: config.Config) -> None:
    refusal = guests.save_dir_refusal(cfg)
    assert refusal is not None
    assert "/var/lib/libvirt/qemu/save" in refusal
    assert "unencrypted" in refusal and "on_timeout=destroy" in refusal


def test_unit_timeouts_cover_what_guest_start_and_stop_may_wait() -> None:
    usec = 1_000_000
    assert (guests.EARLIER_GUEST_WAIT + guests.START_DEADLINE) * usec <= units.START_BUDGET_USEC
    assert guests.POLICY_SECONDS["managedsave"] >= virt.SAVE_DEADLINE
    assert guests.POLICY_SECONDS["destroy"] >= 30  # destroy, then the wait for shut off


def test_select_keeps_start_order_and_refuses_unknown(cfg: config.Config) -> None:
    assert guests.select(cfg, [], True) == ["mail", "db", "web"]
    assert guests.select(cfg, ["web", "mail"], False) == ["mail", "web"]
    with pytest.raises(UsageError, match="no guest 'nosuch'"):
        guests.select(cfg, ["nosuch"], False)
    with pytest.raises(UsageError, match="--all"):
        guests.select(cfg, [], False)
    with pytest.raises(UsageError, match="not both"):
        guests.select(cfg, ["mail"], True)


def test_a_guest_waits_only_for_lower_order_units_that_are_starting(
    cfg: config.Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(guests, "EARLIER_POLL_SECONDS", 0.01)
    asked: list[list[str]] = []
    states = iter(["activating", "activating", "active"])

    def active_states(units: Sequence[str]) -> dict[str, str]:
        asked.append(list(units))
        return {u: next(states) if "db" in u else "inactive" for u in units}

    assert guests.earlier_guests(cfg, "web") == ["mail", "db"]
    guests.wait_for_earlier_units(cfg, "web", active_states, timeout=5)
    # one question a poll, for every earlier unit at once
    assert asked == [["luksvm-guest@mail.service", "luksvm-guest@db.service"]] * 3
    asked.clear()
    guests.wait_for_earlier_units(cfg, "mail", active_states, timeout=5)
    assert asked == []  # order 0: nobody before it


def test_dry_run_plans(cfg: config.Config) -> None:
    names = ["mail", "db", "web"]
    assert guests.plan(cfg, "stop", names, through_units=True)[0] == (
        "systemctl stop luksvm-guest@mail.service luksvm-guest@db.service luksvm-guest@web.service"
    )
    assert guests.plan(cfg, "stop", ["web"], through_units=False) == [
        "web: ACPI shutdown, wait up to 10s, then on_timeout=managedsave (all at once)"
    ]
    assert guests.plan(cfg, "start", ["db", "web"], through_units=False) == [
        "db: start once cr_db unlocked, then wait 5s",
        "web: start once cr_web unlocked",
    ]


def test_cli_dry_run_changes_nothing(
    cfg: config.Config, capsys: pytest.CaptureFixture[str]
) -> None:
    from luksvm.cli import main

    assert main(["--root", cfg.root, "stop", "--all", "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "mail: ACPI shutdown, wait up to 10s, then on_timeout=destroy (all at once)"


def test_stop_through_units_one_systemctl_for_active_units_direct_for_the_rest(
    cfg: config.Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    from luksvm import run

    ran: list[tuple[list[str], float]] = []
    direct: list[list[str]] = []
    monkeypatch.setattr(systemctl, "unit_state", lambda u: "inactive" if "web" in u else "active")
    monkeypatch.setattr(run, "run", lambda argv, timeout: ran.append((argv, timeout)))
    monkeypatch.setattr(
        guests, "stop_guests", lambda _c, names, _connect: direct.append(list(names)) or []
    )
    steps = guests.stop_through_units(cfg, ["mail", "db", "web"])
    argv = ("systemctl", "stop", "luksvm-guest@mail.service", "luksvm-guest@db.service")
    assert next(steps) == guests.Progress("", "stop", argv)
    assert ran == []  # told before it runs
    assert list(steps) == []
    assert ran == [
        (
            ["systemctl", "stop", "luksvm-guest@mail.service", "luksvm-guest@db.service"],
            70 + 60,  # the longest stop budget of those units, plus a minute
        )
    ]
    assert direct == [["web"]]


def test_starting_a_guest_may_take_longer_than_an_ordinary_libvirt_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Measured in the e2e VM: libvirt's create took over 30 s with three guests starting at once;
    # the guests came up, their units failed at the ordinary call deadline.
    deadlines: dict[str, float] = {}

    def fake_call(what: str, fn: object, *args: object, deadline: float = 0.0) -> None:
        deadlines[what] = deadline

    monkeypatch.setattr(virt, "call", fake_call)
    virt.Domain(SimpleNamespace(create=lambda: 0), "mail").start()
    assert deadlines == {"start mail": virt.START_DEADLINE}
    assert virt.START_DEADLINE >= 4 * virt.CALL_DEADLINE
    assert guests.START_DEADLINE == virt.START_DEADLINE


def test_a_unit_whose_stop_failed_fails_the_admins_stop(
    cfg: config.Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Seen in the e2e VM: `systemctl stop` exits 0 when ExecStop fails (on_timeout=fail), so
    # `luksvm stop` said nothing while the guest went on running.
    from luksvm import run

    states = {"luksvm-guest@mail.service": "active", "luksvm-guest@web.service": "active"}
    monkeypatch.setattr(systemctl, "unit_state", lambda u: states.get(u, "inactive"))

    def fake_systemctl(argv: list[str], timeout: float) -> None:
        states["luksvm-guest@mail.service"] = "inactive"
        states["luksvm-guest@web.service"] = "failed"

    monkeypatch.setattr(run, "run", fake_systemctl)
    monkeypatch.setattr(guests, "stop_guests", lambda _c, names, _connect: [])
    with pytest.raises(LuksvmError) as error:
        list(guests.stop_through_units(cfg, ["mail", "web"]))
    assert str(error.value) == (
        "guest 'web' not stopped: luksvm-guest@web.service failed (on_timeout=managedsave); "
        "see: journalctl -u luksvm-guest@web.service"
    )


def test_start_through_units_tells_each_command_before_it_runs_and_prints_nothing(
    cfg: config.Config, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import contextlib

    from luksvm import run

    ran: list[list[str]] = []
    states = {"luksvm-guest@mail.service": "active"}
    running = SimpleNamespace(is_running=lambda: True)
    conn = SimpleNamespace(find=lambda name: running if name == "mail" else None)
    monkeypatch.setattr(systemctl, "unit_state", lambda u: states.get(u, "inactive"))
    monkeypatch.setattr(guests.virt, "connect", lambda uri, readonly: contextlib.nullcontext(conn))
    monkeypatch.setattr(run, "run_interactive", lambda argv, check: ran.append(argv) or 0)
    steps = guests.start_through_units(cfg, ["mail", "web"])
    assert next(steps) == guests.Progress("mail", "already running")
    told = next(steps)
    assert told == guests.Progress(
        "web", "start", ("systemctl", "start", "luksvm-guest@web.service")
    )
    assert ran == []  # told first: the admin sees which unit asks before its prompt appears
    assert list(steps) == []
    assert ran == [["systemctl", "start", "luksvm-guest@web.service"]]
    assert capsys.readouterr().out == ""


def test_a_stop_ends_within_a_state_poll_of_the_guest_powering_off(
    cfg: config.Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On a clock of its own: the guest powers off 2.3 s after the ACPI request. The stop must see
    # it within STOP_POLL_SECONDS (polled every 1 s it ended at 3.0 s: host shutdown waited), and
    # tell systemd it is alive once a second, not once a poll.
    now = [100.0]
    monkeypatch.setattr(guests.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(guests.time, "sleep", lambda s: now.__setitem__(0, now[0] + s))
    (tmp_path / "run/libvirt/qemu").mkdir(parents=True)
    (tmp_path / "run/libvirt/qemu/mail.pid").write_text("1\n")
    (tmp_path / "proc/1").mkdir(parents=True)
    acpi_at: list[float] = []
    handle = SimpleNamespace(
        state=lambda: (5 if acpi_at and now[0] >= acpi_at[0] + 2.3 else 1, 0),
        shutdownFlags=lambda flags: acpi_at.append(now[0]) or 0,
    )
    conn = SimpleNamespace(find=lambda name: virt.Domain(handle, name))
    told: list[tuple[str, ...]] = []

    stopped = guests.stop_guest(
        cfg, "mail", lambda: contextlib.nullcontext(conn), notify=lambda *m: told.append(m) or True
    )
    assert stopped.how == "shutdown"
    assert 2.3 <= stopped.seconds <= 2.3 + guests.STOP_POLL_SECONDS + 1e-9
    assert [m[1] for m in told] == [
        "STATUS=waiting for guest mail to shut down (10 s left)",
        "STATUS=waiting for guest mail to shut down (9 s left)",
        "STATUS=waiting for guest mail to shut down (8 s left)",
    ]
