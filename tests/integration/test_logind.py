"""luksvm shutdown-watch against a real message bus (dbus-daemon), with stand-ins for logind and
for systemd's manager that own their names. What systemd then does with the stop jobs: the e2e
boot test shows that in the VM."""

from __future__ import annotations

import logging
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from fnmatch import fnmatchcase

import pytest
from jeepney import (
    DBusAddress,
    HeaderFields,
    Message,
    MessageType,
    new_error,
    new_method_return,
    new_signal,
)
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import DBusConnection, open_dbus_connection

from luksvm import logind
from luksvm.errors import LuksvmError

LOGIND_ADDRESS = DBusAddress(logind.LOGIND_PATH, interface=logind.MANAGER)


@pytest.fixture
def daemon() -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """A private message bus: its address and its dbus-daemon."""
    proc = subprocess.Popen(
        ["dbus-daemon", "--session", "--nofork", "--print-address=1"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    address = proc.stdout.readline().strip()
    try:
        assert address.startswith("unix:"), address
        yield address, proc
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def bus(daemon: tuple[str, subprocess.Popen[str]]) -> str:
    return daemon[0]


# What the stand-in for systemd has loaded: three guest units among others; it refuses to stop
# the one whose unit file went away.
LOADED = (
    "luksvm-guest@mail.service",
    "luksvm-unlock@cr_mail.service",
    "luksvm-guest@client\\x2da.service",
    "luksvm-guest@gone.service",
    "ssh.service",
)
GUEST_UNITS = [u for u in LOADED if u.startswith("luksvm-guest@")]
NO_SUCH_UNIT = "org.freedesktop.systemd1.NoSuchUnit"


@pytest.fixture
def systemd(bus: str) -> Iterator[list[tuple[str, tuple[object, ...]]]]:
    """A stand-in for systemd's manager on the bus: it owns org.freedesktop.systemd1, answers
    ListUnitsByPatterns from LOADED (globs as systemd's fnmatch) and StopUnit with a job path
    (NoSuchUnit for the "gone" unit) — but only once it holds a StopUnit request for every guest
    unit, so a watch that waits for each answer before the next request gets none.
    Yields the method calls it got: (member, body)."""
    calls: list[tuple[str, tuple[object, ...]]] = []
    done = threading.Event()
    conn = open_dbus_connection(bus)
    assert conn.send_and_get_reply(message_bus.RequestName(logind.SYSTEMD)).body == (1,)

    held: list[Message] = []  # StopUnit requests not answered yet

    def serve() -> None:
        while not done.is_set():
            try:
                call = conn.receive(timeout=0.05)
            except TimeoutError:
                continue
            fields = call.header.fields
            if call.header.message_type != MessageType.method_call:
                continue
            if (fields.get(HeaderFields.path), fields.get(HeaderFields.interface)) != (
                logind.SYSTEMD_PATH,
                logind.SYSTEMD_MANAGER,
            ):
                conn.send(new_error(call, "org.freedesktop.DBus.Error.UnknownObject"))
                continue
            member = fields[HeaderFields.member]
            calls.append((member, call.body))
            if member == "ListUnitsByPatterns":
                _states, patterns = call.body  # no states: every loaded unit
                rows = [
                    (u, "", "loaded", "active", "exited", "", "/unit", 0, "", "/")
                    for u in LOADED
                    if any(fnmatchcase(u, p) for p in patterns)
                ]
                conn.send(new_method_return(call, "a(ssssssouso)", (rows,)))
            elif member == "StopUnit":
                held.append(call)
                if len(held) < len(GUEST_UNITS):
                    continue
                for request in held:
                    if "gone" in request.body[0]:
                        refusal = f"Unit {request.body[0]} not loaded."  # systemd's words
                        conn.send(new_error(request, NO_SUCH_UNIT, "s", (refusal,)))
                    else:
                        job = f"/org/freedesktop/systemd1/job/{len(calls)}"
                        conn.send(new_method_return(request, "o", (job,)))
            else:
                conn.send(new_error(call, "org.freedesktop.DBus.Error.UnknownMethod"))

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        yield calls
    finally:
        done.set()
        server.join(10)
        conn.close()


def watching(bus: str, **kwargs: object) -> tuple[threading.Thread, list[BaseException]]:
    """logind.watch(bus, **kwargs) running in a thread; what it raises goes to the list."""
    ready = threading.Event()
    failed: list[BaseException] = []

    def run() -> None:
        try:
            logind.watch(bus, ready=lambda *lines: ready.set() or True, **kwargs)
        except BaseException as error:  # handed to the test
            failed.append(error)

    watcher = threading.Thread(target=run, daemon=True)
    watcher.start()
    assert ready.wait(10), failed
    return watcher, failed


def names(conn: DBusConnection) -> set[str]:
    return set(conn.send_and_get_reply(message_bus.ListNames()).body[0])


def announce(conn: DBusConnection, starting: bool, destination: str | None = None) -> None:
    signal = new_signal(LOGIND_ADDRESS, logind.SIGNAL, "b", (starting,))
    if destination:
        signal.header.fields[HeaderFields.destination] = destination  # a unicast signal
    conn.send(signal)


def test_only_loginds_announcement_of_a_shutdown_stops_the_guests(
    bus: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="luksvm.logind")
    with open_dbus_connection(bus) as real, open_dbus_connection(bus) as impostor:
        assert real.send_and_get_reply(message_bus.RequestName(logind.LOGIND)).body == (1,)
        before = names(real)
        stopped: list[str] = []
        watcher, failed = watching(
            bus, on_shutdown=lambda _conn: stopped.append("guests"), signals=3
        )
        watch_names = names(real) - before  # its connections: for signals, for calls
        assert len(watch_names) == 2, watch_names

        announce(impostor, True)  # a broadcast: the bus does not route it to the watch
        for name in sorted(watch_names):  # sent to it: checked, ignored
            announce(impostor, True, destination=name)
        announce(real, False)  # a shutdown called off
        announce(real, True)
        watcher.join(10)
        assert not watcher.is_alive() and not failed, failed

    assert stopped == ["guests"]
    said = [r.getMessage() for r in caplog.records]
    assert [m for m in said if m.startswith("ignored PrepareForShutdown from")] == [
        f"ignored PrepareForShutdown from {impostor.unique_name}: logind is {real.unique_name}"
    ]
    assert said.count("logind announced a shutdown: stopping the guests now") == 1


def test_the_guest_units_stop_jobs_are_queued_through_systemds_api(
    bus: str, systemd: list[tuple[str, tuple[object, ...]]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="luksvm.logind")
    with open_dbus_connection(bus) as real:
        assert real.send_and_get_reply(message_bus.RequestName(logind.LOGIND)).body == (1,)
        watcher, failed = watching(bus, signals=1)
        announce(real, True)
        watcher.join(10)
        assert not watcher.is_alive() and not failed, failed
    # what `systemctl stop --no-block 'luksvm-guest@*.service'` asks systemd: every loaded unit
    # of the glob (whatever its state), each stopped in mode "replace"
    assert systemd == [
        ("ListUnitsByPatterns", ([], ["luksvm-guest@*.service"])),
        ("StopUnit", ("luksvm-guest@client\\x2da.service", "replace")),
        ("StopUnit", ("luksvm-guest@gone.service", "replace")),
        ("StopUnit", ("luksvm-guest@mail.service", "replace")),
    ]
    said = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert said[-2:] == [
        (
            logging.WARNING,
            "could not queue the guests' stop jobs early: luksvm-guest@gone.service "
            f"({NO_SUCH_UNIT}: Unit luksvm-guest@gone.service not loaded.)",
        ),
        (
            logging.INFO,
            "queued the stop jobs of luksvm-guest@client\\x2da.service, luksvm-guest@mail.service",
        ),
    ]


def test_without_systemd_on_the_bus_the_watch_warns_and_goes_on(
    bus: str, caplog: pytest.LogCaptureFixture
) -> None:
    with open_dbus_connection(bus) as real:
        assert real.send_and_get_reply(message_bus.RequestName(logind.LOGIND)).body == (1,)
        watcher, failed = watching(bus, signals=2)
        announce(real, True)
        announce(real, True)
        watcher.join(10)
        assert not watcher.is_alive() and not failed, failed
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert all(
        w.startswith("could not queue the guests' stop jobs early: ") and logind.SYSTEMD in w
        for w in warnings
    ), warnings


def test_no_bus_is_a_clear_error() -> None:
    with pytest.raises(LuksvmError, match=r"cannot connect to the D-Bus system bus .*dbus.service"):
        logind.watch("unix:path=/nonexistent/bus", signals=0)


def test_a_lost_bus_ends_the_watch_with_a_clear_error(
    daemon: tuple[str, subprocess.Popen[str]], caplog: pytest.LogCaptureFixture
) -> None:
    address, proc = daemon
    stopped: list[str] = []
    with open_dbus_connection(address) as impostor:
        before = names(impostor)
        watcher, failed = watching(address, on_shutdown=lambda _conn: stopped.append("guests"))
        for name in sorted(names(impostor) - before):
            announce(impostor, True, destination=name)  # nobody owns logind's name
        ignored = f"ignored PrepareForShutdown from {impostor.unique_name}: logind is None"
        deadline = time.monotonic() + 10
        while ignored not in [r.getMessage() for r in caplog.records]:
            assert time.monotonic() < deadline and not failed, failed
            time.sleep(0.05)
        proc.terminate()
        watcher.join(10)
    assert not watcher.is_alive() and stopped == []
    (error,) = failed
    assert isinstance(error, LuksvmError)
    assert re.fullmatch(
        r"lost the D-Bus system bus \(.+\); systemd restarts luksvm-shutdown-watch", str(error)
    )
