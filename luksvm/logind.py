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
from collections.abc import Callable
from typing import TYPE_CHECKING

from luksvm import journal
from luksvm.errors import LuksvmError
from luksvm.units import GUEST_TEMPLATE

if TYPE_CHECKING:
    from jeepney.io.blocking import DBusConnection

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
    """Queue a stop job for each loaded guest unit, as `systemctl stop --no-block` does, on the
    watch's own connection: spawning systemctl cost ~0.15 s of a shutdown (e2e VM)."""
    from jeepney import DBusAddress, new_method_call
    from jeepney.wrappers import DBusErrorResponse, unwrap_msg

    manager = DBusAddress(SYSTEMD_PATH, bus_name=SYSTEMD, interface=SYSTEMD_MANAGER)
    try:
        listed = conn.send_and_get_reply(
            new_method_call(manager, "ListUnitsByPatterns", "asas", ([], [GUEST_UNITS])),
            timeout=SYSTEMD_ANSWER,
        )
        units = sorted(str(unit[0]) for unit in unwrap_msg(listed)[0])
        for unit in units:
            # "replace", systemctl's default mode; the reply comes once the job is queued.
            stop = new_method_call(manager, "StopUnit", "ss", (unit, "replace"))
            unwrap_msg(conn.send_and_get_reply(stop, timeout=SYSTEMD_ANSWER))
    except (DBusErrorResponse, TimeoutError) as error:  # the shutdown stops them anyway, later
        log.warning("could not queue the guests' stop jobs early: %s", error)
        return
    log.info("queued the stop jobs of %s", ", ".join(units) or "no guest unit")


def watch(
    bus: str = "SYSTEM",
    *,
    on_shutdown: Callable[[DBusConnection], None] = stop_guests,
    ready: Callable[..., bool] = journal.notify,
    signals: int | None = None,
) -> None:
    """Listen on `bus` (SYSTEM, or a D-Bus address) for logind's PrepareForShutdown(true) and
    run `on_shutdown(connection)` at each. `signals`: return after that many PrepareForShutdown
    signals (tests); None: listen until killed."""
    from jeepney import HeaderFields, MatchRule
    from jeepney.bus_messages import message_bus
    from jeepney.io.blocking import open_dbus_connection
    from jeepney.wrappers import DBusErrorResponse, unwrap_msg

    try:
        conn = open_dbus_connection(bus=bus)
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
        with conn, conn.filter(announced, bufsize=8) as queue:
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
                    on_shutdown(conn)
    except (OSError, DBusErrorResponse) as error:
        raise LuksvmError(
            f"lost the D-Bus system bus ({error}); systemd restarts luksvm-shutdown-watch"
        ) from None
