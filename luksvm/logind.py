"""Stop the guests when logind announces a shutdown, not after its wait for delay locks.

On `systemctl poweroff|reboot`, the power button or `shutdown -h`, logind first broadcasts
PrepareForShutdown(true) on the system bus, then waits for the holders of delay inhibitor locks
before systemd starts stopping units. libvirtd holds such a lock while any VM runs and does
nothing with it when luksvm stops the guests (libvirt's own auto_shutdown is off, see doctor): so
every shutdown of a host with running guests idled InhibitDelayMaxSec (5 s) before the first guest
was asked to stop (bench/boot.py: inhibit_delay_s). luksvm-shutdown-watch.service listens for the
announcement and queues the guest units' stop jobs at once: the guests stop while logind waits,
and logind goes on as soon as the last VM is off (libvirtd then drops its lock). The jobs are the
units' own (ExecStop=luksvm guest stop), queued through systemd's D-Bus API on the watch's
connection; systemd merges the shutdown's stop jobs into them, so the order guests → libvirt →
volumes is kept.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from luksvm import journal
from luksvm.errors import LuksvmError
from luksvm.units import GUEST_TEMPLATE

if TYPE_CHECKING:
    from jeepney.io.blocking import DBusConnection
    from jeepney.wrappers import DBusErrorResponse

log = logging.getLogger("luksvm.logind")

LOGIND = "org.freedesktop.login1"
LOGIND_PATH = "/org/freedesktop/login1"
MANAGER = "org.freedesktop.login1.Manager"
SIGNAL = "PrepareForShutdown"
SYSTEMD = "org.freedesktop.systemd1"
SYSTEMD_PATH = "/org/freedesktop/systemd1"
SYSTEMD_MANAGER = "org.freedesktop.systemd1.Manager"
# every loaded guest unit (luksvm-guest@*.service), as `systemctl stop` globs it
GUEST_UNITS = GUEST_TEMPLATE.replace("@.", "@*.")
SYSTEMD_ANSWER = 10.0  # seconds for one reply of systemd's manager


def stop_guests(conn: DBusConnection) -> None:
    """Queue a stop job for each loaded guest unit, as `systemctl stop --no-block` does, through
    systemd's D-Bus API (spawning systemctl cost ~0.15 s of a shutdown in the e2e VM). `conn` is
    a connection of the watch's own with no match rules, so every reply on it is one of these.
    The StopUnit requests go out together: systemd reads the requests that are waiting before it
    runs its job queue (an idle-priority event source), so the jobs begin closer together; asked
    one at a time, each began 60-80 ms after the one before (e2e VM)."""
    from jeepney import DBusAddress, HeaderFields, new_method_call
    from jeepney.wrappers import DBusErrorResponse, unwrap_msg

    manager = DBusAddress(SYSTEMD_PATH, bus_name=SYSTEMD, interface=SYSTEMD_MANAGER)
    try:
        listed = conn.send_and_get_reply(
            new_method_call(manager, "ListUnitsByPatterns", "asas", ([], [GUEST_UNITS])),
            timeout=SYSTEMD_ANSWER,
        )
        units = sorted(str(unit[0]) for unit in unwrap_msg(listed)[0])
    except (DBusErrorResponse, TimeoutError) as error:  # the shutdown stops them anyway, later
        log.warning("could not queue the guests' stop jobs early: %s", _error_text(error))
        return
    asked: dict[int, str] = {}  # serial of each StopUnit request → its unit
    for unit in units:
        serial = next(conn.outgoing_serial)
        # "replace", systemctl's default mode; the reply comes once the job is queued
        conn.send(new_method_call(manager, "StopUnit", "ss", (unit, "replace")), serial=serial)
        asked[serial] = unit
    queued: list[str] = []
    failed: list[str] = []
    deadline = time.monotonic() + SYSTEMD_ANSWER
    while asked:
        try:
            reply = conn.receive(timeout=max(deadline - time.monotonic(), 0.0))
        except TimeoutError:
            failed += [f"{u} ({_error_text(TimeoutError())})" for u in asked.values()]
            break
        unit = asked.pop(reply.header.fields.get(HeaderFields.reply_serial, 0), "")
        if not unit:  # the bus's own greeting (NameAcquired), not a reply to these
            continue
        try:
            unwrap_msg(reply)
        except DBusErrorResponse as error:
            failed.append(f"{unit} ({_error_text(error)})")
            continue
        queued.append(unit)
    if failed:
        log.warning("could not queue the guests' stop jobs early: %s", "; ".join(failed))
    if queued or not units:
        log.info("queued the stop jobs of %s", ", ".join(sorted(queued)) or "no guest unit")


def _error_text(error: DBusErrorResponse | TimeoutError) -> str:
    """What systemd answered, as its error's name and message (jeepney's own text is a repr)."""
    if isinstance(error, TimeoutError):
        return f"no answer within {SYSTEMD_ANSWER:g} s"
    message = error.data[0] if error.data and isinstance(error.data[0], str) else ""
    return f"{error.name}: {message}" if message else str(error.name)


def watch(
    bus: str = "SYSTEM",
    *,
    on_shutdown: Callable[[DBusConnection], None] = stop_guests,
    ready: Callable[..., bool] = journal.notify,
    signals: int | None = None,
) -> None:
    """Listen on `bus` (SYSTEM, or a D-Bus address) for logind's PrepareForShutdown(true) and
    run `on_shutdown(connection)` at each, on a connection of its own. `signals`: return after
    that many PrepareForShutdown signals (tests); None: listen until killed."""
    from jeepney import HeaderFields, MatchRule
    from jeepney.bus_messages import message_bus
    from jeepney.io.blocking import open_dbus_connection
    from jeepney.wrappers import DBusErrorResponse, unwrap_msg

    try:
        conn = open_dbus_connection(bus=bus)
        # A second connection for the calls to systemd, without match rules (see stop_guests)
        calls = open_dbus_connection(bus=bus)
    except (OSError, ValueError, KeyError) as error:
        raise LuksvmError(
            f"cannot connect to the D-Bus system bus ({error}); is dbus.service running? "
            "Without it luksvm's guests stop only when systemd stops their units"
        ) from None

    def logind_owner() -> str | None:
        """logind's unique name on the bus; None while nobody owns its name."""
        try:
            return str(unwrap_msg(conn.send_and_get_reply(message_bus.GetNameOwner(LOGIND)))[0])
        except DBusErrorResponse:
            return None

    announced = MatchRule(type="signal", interface=MANAGER, member=SIGNAL, path=LOGIND_PATH)
    try:
        with conn, calls, conn.filter(announced, bufsize=8) as queue:
            # The bus routes only logind's own signal to us; jeepney's filter cannot match a
            # well-known name, so each signal's sender is checked against logind's unique name
            # too: any local process may send a signal of that name to us directly.
            only_logind = MatchRule(
                type="signal", sender=LOGIND, interface=MANAGER, member=SIGNAL, path=LOGIND_PATH
            )
            unwrap_msg(conn.send_and_get_reply(message_bus.AddMatch(only_logind)))
            ready("READY=1", "STATUS=waiting for logind to announce a shutdown")
            seen = 0
            while signals is None or seen < signals:
                message = conn.recv_until_filtered(queue)
                seen += 1
                sender = message.header.fields.get(HeaderFields.sender)
                owner = logind_owner()
                if sender != owner:
                    log.warning("ignored %s from %s: logind is %s", SIGNAL, sender, owner)
                elif message.body == (True,):  # (False,): a shutdown that was called off
                    log.info(
                        "logind announced a shutdown: stopping the guests now",
                        extra=journal.fields(message_id="shutdown-announced"),
                    )
                    on_shutdown(calls)
    except (OSError, DBusErrorResponse) as error:
        raise LuksvmError(
            f"lost the D-Bus system bus ({error}); systemd restarts luksvm-shutdown-watch"
        ) from None
