"""Guest lifecycle against libvirt's test driver (test:///ABS/PATH.xml).

A test:///FILE connection is private to the connection that opened it, so each test opens one and
every thread (and the CLI, through a patched virt.connect) shares it. The test driver's guests
obey shutdown at once; a guest that ignores ACPI (SeaBIOS, no OS) is modelled by making its
shutdown request do nothing.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from luksvm import config, guests, virt
from luksvm.cli import main
from luksvm.errors import LuksvmError
from tests.conftest import write_config

TEST_NS = "http://libvirt.org/schemas/domain/test/1.0"


def domain_xml(name: str, disks: list[str]) -> str:
    devices = "".join(
        f"<disk type='block' device='disk'><source dev='{src}'/>"
        f"<target dev='vd{chr(97 + i)}' bus='virtio'/></disk>"
        for i, src in enumerate(disks)
    )
    return (
        f"<domain type='test' xmlns:test='{TEST_NS}'><name>{name}</name>"
        "<memory>65536</memory><os><type>hvm</type></os>"
        "<test:runstate>5</test:runstate>"  # defined, shut off
        f"<devices>{devices}<disk type='file' device='cdrom'><target dev='hdc' bus='ide'/>"
        "</disk></devices></domain>"
    )


class Host:
    """A config root, a libvirt test node and one open connection to it."""

    def __init__(
        self,
        root: Path,
        guest_disks: dict[str, list[str]],
        settings: str = "",
        sources: dict[str, list[str]] | None = None,
    ) -> None:
        self.root = root
        lines = []
        for guest, volumes in guest_disks.items():
            for volume in volumes:
                lines.append(
                    f"{volume} /dev/vg/{volume} /etc/luksvm/keys/k luks,x-luksvm.guest={guest}"
                )
        node = root / "node.xml"
        node.write_text(
            "<node>"
            + "".join(
                domain_xml(g, (sources or {}).get(g, [f"/dev/mapper/{v}" for v in vols]))
                for g, vols in guest_disks.items()
            )
            + "</node>"
        )
        self.uri = f"test://{node}"
        write_config(
            root,
            {"10-test.conf": "\n".join(lines) + "\n"},
            f"[libvirt]\nuri = {self.uri}\n{settings}",
        )
        (root / "dev/mapper").mkdir(parents=True)
        self.config = config.load(str(root))
        self.conn = virt.connect(self.uri)

    def unlock(self, *volumes: str) -> None:
        for volume in volumes:
            (self.root / "dev/mapper" / volume).touch()

    def state(self, guest: str) -> str:
        return self.conn.domain(guest).state()


@pytest.fixture
def make_host(tmp_path: Path) -> Iterator[object]:
    made: list[Host] = []

    def make(
        guest_disks: dict[str, list[str]],
        settings: str = "",
        sources: dict[str, list[str]] | None = None,
    ) -> Host:
        host = Host(tmp_path, guest_disks, settings, sources)
        made.append(host)
        return host

    yield make
    for host in made:
        host.conn.close()


@pytest.fixture
def ignores_acpi(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """Guests named in the returned set ignore ACPI shutdown requests (like SeaBIOS, no OS)."""
    stubborn: set[str] = set()
    real = virt.Domain.shutdown_acpi

    def shutdown_acpi(self: virt.Domain) -> None:
        if self.name not in stubborn:
            real(self)

    monkeypatch.setattr(virt.Domain, "shutdown_acpi", shutdown_acpi)
    return stubborn


def test_guest_with_a_locked_disk_is_refused_naming_the_volume(make_host) -> None:  # type: ignore[no-untyped-def]
    host = make_host({"mail": ["cr_imap_encr", "cr_imap_hd1"]})
    host.unlock("cr_imap_encr")
    with pytest.raises(LuksvmError, match=r"cr_imap_hd1 is locked .*luksvm unlock cr_imap_hd1"):
        guests.start_guest(host.config, "mail", host.conn)
    assert host.state("mail") == "shutoff"


def test_start_waits_until_running_and_is_idempotent(make_host) -> None:  # type: ignore[no-untyped-def]
    host = make_host({"mail": ["cr_imap_encr"]})
    host.unlock("cr_imap_encr")
    assert guests.start_guest(host.config, "mail", host.conn) is True
    assert host.state("mail") == "running"
    assert guests.start_guest(host.config, "mail", host.conn) is False
    assert host.state("mail") == "running"


def test_a_slow_create_counts_against_the_start_deadline_not_one_call_deadline(  # type: ignore[no-untyped-def]
    make_host, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Seen in the VM on a busy host: libvirt took over 30 s (the deadline of one ordinary call)
    # to create a guest; luksvm failed the guest unit while libvirt went on and started it.
    # Scaled down here: ordinary calls get 0.2 s, the create takes 0.5 s.
    import libvirt

    monkeypatch.setattr(virt.call, "__kwdefaults__", {"deadline": 0.2})
    real_create = libvirt.virDomain.create

    def slow_create(self: object) -> int:
        time.sleep(0.5)
        return real_create(self)  # type: ignore[no-any-return]

    monkeypatch.setattr(libvirt.virDomain, "create", slow_create)
    host = make_host({"mail": ["cr_imap_encr"]})
    host.unlock("cr_imap_encr")
    assert guests.start_guest(host.config, "mail", host.conn) is True
    assert host.state("mail") == "running"


def test_a_disk_volume_not_named_for_the_guest_still_gates_it(make_host) -> None:  # type: ignore[no-untyped-def]
    # mail's domain also uses web's volume: the XML, not only x-luksvm.guest, decides.
    host = make_host(
        {"mail": ["cr_imap_encr"], "web": ["cr_web"]},
        sources={"mail": ["/dev/mapper/cr_imap_encr", "/dev/disk/by-id/dm-name-cr_web"]},
    )
    host.unlock("cr_imap_encr")
    with pytest.raises(LuksvmError, match="cr_web is locked"):
        guests.start_guest(host.config, "mail", host.conn)


def test_start_delay_pauses_after_starting(make_host) -> None:  # type: ignore[no-untyped-def]
    host = make_host({"mail": ["cr_a"]}, "[guests]\nstart_delay = 1s\n")
    host.unlock("cr_a")
    began = time.monotonic()
    guests.start_guest(host.config, "mail", host.conn)
    assert time.monotonic() - began >= 1.0
    began = time.monotonic()
    guests.start_guest(host.config, "mail", host.conn)  # already running: no delay
    assert time.monotonic() - began < 0.5


def test_stop_of_a_cooperative_guest_shuts_it_down_and_is_idempotent(make_host) -> None:  # type: ignore[no-untyped-def]
    host = make_host({"mail": ["cr_a"]})
    host.unlock("cr_a")
    guests.start_guest(host.config, "mail", host.conn)
    connect = guests.shared(host.conn)
    assert guests.stop_guest(host.config, "mail", connect).how == "shutdown"
    assert host.state("mail") == "shutoff"
    assert guests.stop_guest(host.config, "mail", connect).how == "not-running"


def test_destroy_policy_after_the_timeout(make_host, ignores_acpi) -> None:  # type: ignore[no-untyped-def]
    host = make_host({"mail": ["cr_a"]}, "[guests]\nstop_timeout = 1s\n")
    host.unlock("cr_a")
    ignores_acpi.add("mail")
    guests.start_guest(host.config, "mail", host.conn)
    stopped = guests.stop_guest(host.config, "mail", guests.shared(host.conn))
    assert stopped.how == "destroyed"
    assert 1.0 <= stopped.seconds < 3.0
    assert host.state("mail") == "shutoff"


def test_fail_policy_leaves_the_guest_running_and_says_why(make_host, ignores_acpi) -> None:  # type: ignore[no-untyped-def]
    host = make_host(
        {"mail": ["cr_a"]}, "[guests]\nstop_timeout = 1s\n[guest:mail]\non_timeout = fail\n"
    )
    host.unlock("cr_a")
    ignores_acpi.add("mail")
    guests.start_guest(host.config, "mail", host.conn)
    with pytest.raises(LuksvmError, match="volumes refuse to lock; at host shutdown systemd"):
        guests.stop_guest(host.config, "mail", guests.shared(host.conn))
    assert host.state("mail") == "running"


def test_managedsave_refused_on_an_unencrypted_save_dir(make_host, ignores_acpi) -> None:  # type: ignore[no-untyped-def]
    host = make_host({"mail": ["cr_a"]}, "[guests]\nstop_timeout = 1s\non_timeout = managedsave\n")
    host.unlock("cr_a")
    ignores_acpi.add("mail")
    guests.start_guest(host.config, "mail", host.conn)
    # This machine has no device-mapper at all: the save dir cannot be on an encrypted device.
    with pytest.raises(LuksvmError, match=r"guest RAM .* would land on unencrypted disk"):
        guests.stop_guest(host.config, "mail", guests.shared(host.conn))
    assert host.state("mail") == "running"
    assert not host.conn.domain("mail").has_managed_save()


def test_managedsave_saves_when_the_save_dir_is_encrypted(  # type: ignore[no-untyped-def]
    make_host, ignores_acpi, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = make_host({"mail": ["cr_a"]}, "[guests]\nstop_timeout = 1s\non_timeout = managedsave\n")
    host.unlock("cr_a")
    ignores_acpi.add("mail")
    monkeypatch.setattr(guests, "save_dir_refusal", lambda _config: None)
    guests.start_guest(host.config, "mail", host.conn)
    assert guests.stop_guest(host.config, "mail", guests.shared(host.conn)).how == "saved"
    assert host.state("mail") == "shutoff"
    assert host.conn.domain("mail").has_managed_save()


def test_four_stubborn_guests_stop_in_parallel(make_host, ignores_acpi) -> None:  # type: ignore[no-untyped-def]
    names = ["g1", "g2", "g3", "g4"]
    host = make_host({n: [f"cr_{n}"] for n in names}, "[guests]\nstop_timeout = 1s\n")
    host.unlock(*(f"cr_{n}" for n in names))
    ignores_acpi.update(names)
    for name in names:
        guests.start_guest(host.config, name, host.conn)
    began = time.monotonic()
    stopped = guests.stop_guests(host.config, names, guests.shared(host.conn))
    took = time.monotonic() - began
    assert sorted(s.guest for s in stopped) == names
    assert {s.how for s in stopped} == {"destroyed"}
    assert took < 2.0, f"4 guests with a 1 s timeout took {took:.1f} s: not parallel"
    assert [host.state(n) for n in names] == ["shutoff"] * 4


def test_parallel_stop_reports_every_failure_after_stopping_the_rest(  # type: ignore[no-untyped-def]
    make_host, ignores_acpi
) -> None:
    host = make_host(
        {"a": ["cr_a"], "b": ["cr_b"], "c": ["cr_c"]},
        "[guests]\nstop_timeout = 1s\n[guest:a]\non_timeout = fail\n[guest:c]\non_timeout = fail\n",
    )
    host.unlock("cr_a", "cr_b", "cr_c")
    ignores_acpi.update({"a", "b", "c"})
    for name in "abc":
        guests.start_guest(host.config, name, host.conn)
    with pytest.raises(LuksvmError) as caught:
        guests.stop_guests(host.config, ["a", "b", "c"], guests.shared(host.conn))
    assert "guest 'a'" in str(caught.value) and "guest 'c'" in str(caught.value)
    assert [host.state(n) for n in "abc"] == ["running", "shutoff", "running"]


def test_stop_tells_systemd_it_is_alive_through_the_notify_socket(  # type: ignore[no-untyped-def]
    make_host, ignores_acpi, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    host = make_host({"mail": ["cr_a"]}, "[guests]\nstop_timeout = 2s\n")
    host.unlock("cr_a")
    ignores_acpi.add("mail")
    guests.start_guest(host.config, "mail", host.conn)
    address = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        sock.settimeout(0)
        monkeypatch.setenv("NOTIFY_SOCKET", address)
        guests.stop_guest(host.config, "mail", guests.shared(host.conn))
        messages = []
        with contextlib.suppress(BlockingIOError):
            while True:
                messages.append(sock.recv(4096).decode())
    extends = [m for m in messages if m.startswith("EXTEND_TIMEOUT_USEC=")]
    assert extends, messages
    first = int(extends[0].splitlines()[0].split("=")[1])
    # what is left of the wait plus the destroy budget plus the margin
    assert 60_000_000 < first <= (2 + 30 + 30) * 1_000_000
    assert "STATUS=waiting for guest mail to shut down" in extends[0]
    assert any(m == "STATUS=destroying guest mail" for m in messages)


@pytest.fixture
def cli_conn(make_host, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """The CLI's connections all lend the host's one connection."""

    def use(host: Host) -> Host:
        class Lent(virt.Connection):
            def close(self) -> None:
                pass

        monkeypatch.setattr(
            virt, "connect", lambda uri, readonly=False: Lent(host.conn._conn, uri, False)
        )
        return host

    return use


def test_cli_guest_start_and_stop(cli_conn, make_host, capsys) -> None:  # type: ignore[no-untyped-def]
    host = cli_conn(make_host({"mail": ["cr_a"], "web": ["cr_w"]}))
    root = str(host.root)
    assert main(["--root", root, "guest", "start", "mail"]) == 2
    # logged once with its journal fields; main prints no second copy (a unit's journal had two)
    assert capsys.readouterr().err.count("volume cr_a is locked") == 1
    host.unlock("cr_a", "cr_w")
    assert main(["--root", root, "guest", "start", "mail"]) == 0
    assert main(["--root", root, "guest", "start", "mail"]) == 0
    assert host.state("mail") == "running"
    assert main(["--root", root, "start", "--all"]) == 0
    assert "mail: already running\nweb: started" in capsys.readouterr().out
    assert main(["--root", root, "stop", "--all"]) == 0
    out = capsys.readouterr().out
    assert "mail: shutdown after" in out and "web: shutdown after" in out
    assert main(["--root", root, "guest", "stop", "mail"]) == 0
    assert main(["--root", root, "guest", "start", "nosuch"]) == 64
    assert "no guest 'nosuch'" in capsys.readouterr().err


# What the units' guest start and stop must not load: each costs tens of ms in the e2e VM, paid by
# every guest unit at boot and shutdown (bench/boot.py).
NOT_ON_THE_GUEST_PATH = (
    "argparse", "subprocess", "json", "luksvm.run", "luksvm.systemctl", "socket"
)  # fmt: skip
UNIT_PROCESS = """
import sys
from luksvm import cli, journal
journal.setup()
for argv in (["guest", "start", "--", "mail"], ["guest", "stop", "--", "mail"]):
    args = cli.unit_command(argv)
    args.root = sys.argv[1]  # the units' own root is /
    assert args.func(args) == 0
print("\\n".join(sys.modules))
"""


def test_the_units_guest_start_and_stop_load_only_what_they_use(make_host) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    host = make_host({"mail": ["cr_a"], "web": ["cr_w"]}, "[guest:web]\norder = 1\n")
    host.unlock("cr_a")
    env = {**os.environ, "INVOCATION_ID": "0" * 32}  # as in a unit
    env.pop("NOTIFY_SOCKET", None)
    proc = subprocess.run(
        [sys.executable, "-c", UNIT_PROCESS, str(host.root)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "starting guest mail" in proc.stderr and "guest mail running after" in proc.stderr
    loaded = set(proc.stdout.split())
    assert {"luksvm.guests", "luksvm.virt", "libvirt"} <= loaded
    assert loaded.isdisjoint(NOT_ON_THE_GUEST_PATH), loaded & set(NOT_ON_THE_GUEST_PATH)


def test_stop_without_a_qemu_process_succeeds_without_connecting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_config(
        tmp_path,
        {"10-a.conf": "cr_a /dev/vg/a - luks,x-luksvm.guest=mail\n"},
        "[libvirt]\nuri = qemu:///system\n",
    )
    cfg = config.load(str(tmp_path))

    def no_connect() -> virt.Connection:
        raise AssertionError("connected although no QEMU runs")

    assert guests.stop_guest(cfg, "mail", no_connect).how == "not-running"  # type: ignore[arg-type]
    # A live pid file means QEMU is there: then it must connect.
    pid_dir = tmp_path / guests.QEMU_RUN_DIR
    pid_dir.mkdir(parents=True)
    (pid_dir / "mail.pid").write_text(str(os.getpid()))
    (tmp_path / "proc" / str(os.getpid())).mkdir(parents=True)
    with pytest.raises(AssertionError, match="connected"):
        guests.stop_guest(cfg, "mail", no_connect)  # type: ignore[arg-type]


def test_take_over_clears_autostart_only_on_managed_guests(make_host) -> None:  # type: ignore[no-untyped-def]
    host = make_host({"mail": ["cr_a"], "web": ["cr_w"]})
    host.conn._conn.defineXML(domain_xml("other", []))
    for name in ("mail", "other"):
        host.conn.domain(name).set_autostart(True)
    assert guests.autostarting(host.config, host.conn) == ["mail"]
    assert "virsh autostart --disable mail" in guests.autostart_warning(["mail"])
    assert guests.clear_autostart(host.config, host.conn) == ["mail"]
    assert not host.conn.domain("mail").autostart()
    assert host.conn.domain("other").autostart()  # not luksvm's guest: left alone
    assert guests.clear_autostart(host.config, host.conn) == []


def test_apply_warns_about_autostart_and_take_over_clears_it(cli_conn, make_host) -> None:  # type: ignore[no-untyped-def]
    import dataclasses

    host = cli_conn(make_host({"mail": ["cr_a"]}))
    live = dataclasses.replace(host.config, root="/")  # the checks run only on the live system
    host.conn.domain("mail").set_autostart(True)
    (warning,) = guests.apply_autostart_policy(live, take_over=False, dry_run=False)
    assert warning.startswith("libvirt autostart is on for mail")
    assert guests.apply_autostart_policy(live, take_over=True, dry_run=True) == [
        "would clear libvirt autostart for mail"
    ]
    assert host.conn.domain("mail").autostart()
    assert guests.apply_autostart_policy(live, take_over=True, dry_run=False) == [
        "libvirt autostart cleared for mail"
    ]
    assert not host.conn.domain("mail").autostart()
    assert guests.apply_autostart_policy(live, take_over=False, dry_run=False) == []
    # Under --root DIR (not the live system) libvirt is not asked at all.
    assert guests.apply_autostart_policy(host.config, take_over=True, dry_run=False) == []
