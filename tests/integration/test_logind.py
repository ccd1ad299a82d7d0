"""luksvm shutdown-watch against a real message bus (dbus-daemon), with a stand-in for logind
that owns its name. What it runs then (systemctl stop) needs systemd: the e2e boot test shows
that in the VM."""

from __future__ import annotations

import logging
import subprocess
import threading
from collections.abc import Iterator

import pytest
from jeepney import DBusAddress, HeaderFields, new_signal
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import DBusConnection, open_dbus_connection

from luksvm import logind
from luksvm.errors import LuksvmError

LOGIND_ADDRESS = DBusAddress(logind.LOGIND_PATH, interface=logind.MANAGER)


@pytest.fixture
def bus() -> Iterator[str]:
    """A private message bus; its address."""
    proc = subprocess.Popen(
        ["dbus-daemon", "--session", "--nofork", "--print-address=1"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    address = proc.stdout.readline().strip()
    try:
        assert address.startswith("unix:"), address
        yield address
    finally:
        proc.terminate()
        proc.wait(timeout=10)


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
        ready = threading.Event()
        stopped: list[str] = []
        failed: list[BaseException] = []

        def run() -> None:
            try:
                logind.watch(
                    bus,
                    on_shutdown=lambda: stopped.append("guests"),
                    ready=lambda *lines: ready.set() or True,
                    signals=3,
                )
            except BaseException as error:  # handed to the test
                failed.append(error)

        watcher = threading.Thread(target=run, daemon=True)
        watcher.start()
        assert ready.wait(10), failed
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
