"""luksvm shutdown-watch against a real message bus (dbus-daemon), with a stand-in for logind
that owns its name. What it runs then (systemctl stop) needs systemd: the e2e boot test shows
that in the VM."""

from __future__ import annotations

import logging
import re
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest
from jeepney import DBusAddress, HeaderFields, new_signal
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
        watcher, failed = watching(bus, on_shutdown=lambda: stopped.append("guests"), signals=3)
        (watch_name,) = names(real) - before

        announce(impostor, True)  # a broadcast: the bus does not route it to the watch
        announce(impostor, True, destination=watch_name)  # sent to it: checked, ignored
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
        watcher, failed = watching(address, on_shutdown=lambda: stopped.append("guests"))
        (watch_name,) = names(impostor) - before
        announce(impostor, True, destination=watch_name)  # nobody owns logind's name
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
