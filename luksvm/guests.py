"""Guest lifecycle: start gating (every luksvm disk unlocked), stop orchestration (ACPI, timeout,
policy), parallel stops, start order and delays, and the admin's `luksvm start|stop`.

Paths are read under the configuration's root (`--root`), so tests point them at a temp dir.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Callable, Literal

from luksvm import journal, units, virt
from luksvm.config import Config, GuestPolicy
from luksvm.durations import USEC_PER_SEC, format_timespan
from luksvm.errors import LuksvmError, UsageError

log = logging.getLogger("luksvm.guests")

MAPPER_DIR = "dev/mapper"
QEMU_RUN_DIR = "run/libvirt/qemu"  # libvirt's QEMU driver keeps NAME.pid here while QEMU lives
MACHINE_SLICE = "sys/fs/cgroup/machine.slice"
SAVE_DIR = "var/lib/libvirt/qemu/save"  # libvirt's managedsave images (compiled in, not set)
SYS_DIR = "sys"

START_DEADLINE = virt.START_DEADLINE  # seconds from `create` until the domain reports running
# Time each on_timeout policy may take after stop_timeout, and the margin: the unit's
# TimeoutStopSec= is stop_timeout plus both (units.py).
POLICY_SECONDS = {k: v // USEC_PER_SEC for k, v in units.POLICY_TIME_USEC.items()}
STOP_MARGIN_SECONDS = units.STOP_MARGIN_USEC // USEC_PER_SEC
# How often a waiting guest asks whether lower-order guests' units still start: each poll runs
# `systemctl show`, a process (~0.2 s at boot in the VM).
EARLIER_POLL_SECONDS = 1.0
# How often a stop asks libvirt whether the guest is off (one RPC), and how often it tells systemd
# it is alive. Polled every 1 s, a stop ended on average 0.5 s after its guest powered off, and
# host shutdown waits for the last one.
STOP_POLL_SECONDS = 0.2
ALIVE_SECONDS = 1.0
EARLIER_GUEST_WAIT = 600.0  # a guest waits at most this long for lower-order guests to start

HOST_SHUTDOWN_NOTE = (
    "at host shutdown systemd still kills it when it stops the guest's machine scope"
)


# --- the unit contract: units.py renders TimeoutStopSec=/TimeoutStartSec= from the same numbers --


def unit_name(guest: str) -> str:
    """luksvm-guest@GUEST.service, GUEST escaped as `systemd-escape` does."""
    return units.guest_unit(guest)


# --- what is on this host (all under the configuration root) ----------------------------------


def _under(config: Config, path: str) -> str:
    return os.path.join(config.root, path)


def unlocked(config: Config, volume: str) -> bool:
    """A volume is unlocked when its device-mapper mapping exists."""
    return os.path.exists(os.path.join(_under(config, MAPPER_DIR), volume))


def volumes_on_disks(config: Config, disks: Iterable[virt.Disk]) -> list[str]:
    """The configured volumes that are disk sources of a domain (/dev/mapper/NAME or
    /dev/disk/by-id/dm-name-NAME), in disk order."""
    configured = {v.name for v in config.volumes}
    found: list[str] = []
    for disk in disks:
        match = re.fullmatch(r"/dev/(?:mapper/|disk/by-id/dm-name-)([^/]+)", disk.source)
        if match and match.group(1) in configured and match.group(1) not in found:
            found.append(match.group(1))
    return found


def needed_volumes(config: Config, guest: str, disks: Iterable[virt.Disk]) -> list[str]:
    """The domain's luksvm disks, then the volumes configured for it (x-luksvm.guest=)."""
    names = volumes_on_disks(config, disks)
    for name in config.guest(guest).volumes:
        if name not in names:
            names.append(name)
    return names


def qemu_exists(config: Config, guest: str) -> bool:
    """True when libvirt's QEMU for `guest` still lives: its pid file names a live process, or its
    machine scope still exists. Read from the file system only: no libvirt connection."""
    pid_file = os.path.join(_under(config, QEMU_RUN_DIR), f"{guest}.pid")
    try:
        with open(pid_file, encoding="ascii") as f:
            pid = int(f.read().strip() or "0")
    except (OSError, ValueError):
        pid = 0
    if pid > 0 and os.path.exists(_under(config, f"proc/{pid}")):
        return True
    try:
        scopes = os.listdir(_under(config, MACHINE_SLICE))
    except OSError:
        return False
    return any(scope_is_for(scope, guest) for scope in scopes)


def scope_is_for(scope: str, guest: str) -> bool:
    """Whether the cgroup directory `scope` is libvirt's machine scope of QEMU domain `guest`:
    machine-qemu\\x2dID\\x2dNAME.scope, NAME cut to hostname characters and 64 bytes in all."""
    match = re.fullmatch(r"machine-qemu\\x2d(\d+)\\x2d(.*)\.scope", scope)
    if not match:
        return False
    machine = f"qemu-{match.group(1)}-"
    skip_dots = True
    for char in guest:
        if len(machine) >= 64:
            break
        if char == "." and skip_dots:
            continue
        skip_dots = False
        if char.isascii() and (char.isalnum() or char in "-."):
            machine += char
    machine = machine.rstrip("-.")
    return units.systemd_escape(machine) == f"qemu\\x2d{match.group(1)}\\x2d{match.group(2)}"


def local_qemu(uri: str) -> bool:
    """Whether `uri` is the local system QEMU driver, whose processes the file system shows."""
    return re.fullmatch(r"qemu(\+unix)?:///system(\?.*)?", uri) is not None


def save_dir_refusal(config: Config) -> str | None:
    """Why managedsave must not be used here (None when libvirt's save directory is on an
    encrypted device): it writes guest RAM there."""
    path = _under(config, SAVE_DIR)
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    st = os.stat(probe)
    major, minor = os.major(st.st_dev), os.minor(st.st_dev)
    if major == 0:
        where = "a filesystem without a block device (tmpfs or overlay)"
    elif device_encrypted(f"{major}:{minor}", _under(config, SYS_DIR)):
        return None
    else:
        where = f"device {major}:{minor}, which is not encrypted"
    return (
        f"on_timeout=managedsave refused: libvirt saves guest RAM to /{SAVE_DIR}, which is on "
        f"{where}; guest RAM (keys, mail, passwords) would land on unencrypted disk. "
        f"Put /{SAVE_DIR} on an encrypted volume, or use on_timeout=destroy"
    )


def device_encrypted(majmin: str, sys_dir: str) -> bool:
    """A block device is encrypted when it is a dm-crypt mapping, or a device-mapper device (LVM,
    RAID) all of whose underlying devices are encrypted. Read from sysfs."""
    try:
        name = os.path.basename(os.readlink(os.path.join(sys_dir, "dev/block", majmin)))
    except OSError:
        return False
    return _name_encrypted(name, sys_dir, depth=0)


def _name_encrypted(name: str, sys_dir: str, depth: int) -> bool:
    base = os.path.join(sys_dir, "class/block", name)
    try:
        with open(os.path.join(base, "dm/uuid"), encoding="utf-8") as f:
            uuid = f.read().strip()
    except OSError:
        return False  # a disk or partition: plain
    if uuid.startswith("CRYPT-"):
        return True
    try:
        below = os.listdir(os.path.join(base, "slaves"))
    except OSError:
        return False
    return bool(below) and depth < 16 and all(_name_encrypted(b, sys_dir, depth + 1) for b in below)


# --- start -----------------------------------------------------------------------------------


# Opens (or lends) a libvirt connection for a `with` block.
Connect = Callable[[], contextlib.AbstractContextManager[virt.Connection]]


def connector(config: Config, *, readonly: bool = False) -> Connect:
    return lambda: virt.connect(config.settings.uri, readonly=readonly)


def start_guest(config: Config, name: str, conn: virt.Connection, *, delay: bool = True) -> bool:
    """Start `name` once every volume it needs is unlocked; wait until it runs. True when it was
    started, False when it already ran. `delay`: then pause its start_delay."""
    guest = config.guest(name)
    fields = journal.fields(guest=name)
    domain = conn.domain(name)
    if domain.is_running():
        log.info("guest %s is already running", name, extra=fields)
        return False
    locked = [v for v in needed_volumes(config, name, domain.disks()) if not unlocked(config, v)]
    if locked:
        raise journal.logged_error(
            f"guest {name!r} not started: its volume{'s' if len(locked) > 1 else ''} "
            f"{', '.join(locked)} {'are' if len(locked) > 1 else 'is'} locked "
            f"(no {', '.join('/dev/mapper/' + v for v in locked)}); unlock first: "
            f"luksvm unlock {' '.join(locked)}",
            journal.fields(guest=name, volume=locked[0], message_id="guest-start-refused"),
            log,
        )
    log.info("starting guest %s", name, extra=fields)
    began = time.monotonic()
    # create itself may take long on a busy host (or restoring a managedsave image): it has the
    # whole start deadline, not that of one ordinary call, or the unit fails while libvirt goes
    # on to start the guest.
    domain.start(deadline=START_DEADLINE)
    left = max(START_DEADLINE - (time.monotonic() - began), 1.0)
    if not domain.wait_for({"running", "blocked"}, left, poll=0.2):
        raise LuksvmError(
            f"guest {name!r} did not reach running within {START_DEADLINE:g} s of starting; "
            f"its state is {domain.state()}"
        )
    log.info(
        "guest %s running after %.1f s",
        name,
        time.monotonic() - began,
        extra=journal.fields(guest=name, message_id="guest-started"),
    )
    if delay and guest.policy.start_delay:
        seconds = guest.policy.start_delay / USEC_PER_SEC
        journal.notify(f"STATUS=guest {name} started; start delay {seconds:g} s before the next")
        log.info("start delay of guest %s: %g s", name, seconds, extra=fields)
        time.sleep(seconds)
    return True


def earlier_guests(config: Config, name: str) -> list[str]:
    """Guests whose order is lower than `name`'s: they start first."""
    order = config.guest(name).policy.order
    return [g.name for g in config.guests if g.policy.order < order]


def wait_for_earlier_units(
    config: Config,
    name: str,
    active_states: Callable[[Sequence[str]], Mapping[str, str]],
    *,
    timeout: float,
) -> None:
    """From a unit: while a lower-order guest's unit is still starting (activating: starting its
    guest or sleeping its start delay), wait. Guest units are not ordered After= one another,
    because systemd would then also stop them one by one at shutdown. active_states is asked
    once a poll for all of them (one `systemctl show`: a process costs ~0.2 s at boot in the VM)."""
    earlier = earlier_guests(config, name)
    end = time.monotonic() + timeout
    while earlier:
        states = active_states([unit_name(g) for g in earlier])
        busy = [g for g in earlier if states.get(unit_name(g)) == "activating"]
        if not busy:
            return
        if time.monotonic() >= end:
            log.warning(
                "guest %s: starting although %s still starting after %g s",
                name,
                ", ".join(busy),
                timeout,
                extra=journal.fields(guest=name),
            )
            return
        journal.notify(f"STATUS=waiting for earlier guest{'s' * (len(busy) > 1)} {' '.join(busy)}")
        time.sleep(EARLIER_POLL_SECONDS)


# --- stop ------------------------------------------------------------------------------------


StopOutcome = Literal["not-running", "shutdown", "destroyed", "saved"]


@dataclass(frozen=True)
class Stopped:
    """How a guest stop ended, and after how many seconds."""

    guest: str
    how: StopOutcome
    seconds: float


@dataclass(frozen=True)
class Progress:
    """A step of the admin's `luksvm start|stop`, told before it runs (argv) or after it is done;
    cli.py prints it."""

    guest: str  # "" for one command about several guests
    action: Literal["already running", "started", "start", "restart", "stop"]
    argv: tuple[str, ...] = ()


def stop_guest(
    config: Config,
    name: str,
    connect: Connect,
    *,
    notify: Callable[..., bool] = journal.notify,
) -> Stopped:
    """ACPI shutdown; wait up to stop_timeout (telling systemd we are alive); then the policy.
    Raises LuksvmError when the guest is left running (on_timeout=fail, managedsave refused)."""
    policy = config.settings.policy_for(name)
    fields = journal.fields(guest=name)
    began = time.monotonic()
    if local_qemu(config.settings.uri) and not qemu_exists(config, name):
        # No QEMU: nothing to stop, and connecting could socket-activate libvirtd behind our own
        # stop job at shutdown — a deadlock.
        log.info("guest %s is not running (no QEMU process)", name, extra=fields)
        return Stopped(name, "not-running", 0.0)
    with connect() as conn:
        domain = conn.find(name)
        if domain is None or not domain.is_running():
            log.info("guest %s is not running", name, extra=fields)
            return Stopped(name, "not-running", time.monotonic() - began)
        timeout = policy.stop_timeout / USEC_PER_SEC
        after = POLICY_SECONDS[policy.on_timeout] + STOP_MARGIN_SECONDS
        log.info(
            "guest %s: ACPI shutdown requested; waiting up to %s, then on_timeout=%s",
            name,
            format_timespan(policy.stop_timeout),
            policy.on_timeout,
            extra=fields,
        )
        domain.shutdown_acpi()

        told = -ALIVE_SECONDS

        def alive(left: float) -> None:
            nonlocal told
            if time.monotonic() - told < ALIVE_SECONDS:
                return
            told = time.monotonic()
            notify(
                f"EXTEND_TIMEOUT_USEC={int((left + after) * USEC_PER_SEC)}",
                f"STATUS=waiting for guest {name} to shut down ({left:.0f} s left)",
            )

        if domain.wait_for({"shutoff", "crashed"}, timeout, poll=STOP_POLL_SECONDS, on_poll=alive):
            seconds = time.monotonic() - began
            log.info(
                "guest %s shut down after %.1f s",
                name,
                seconds,
                extra=stop_fields(name, "shutdown", seconds),
            )
            return Stopped(name, "shutdown", seconds)
        return _on_timeout(config, name, policy, domain, began=began, notify=notify)


def stop_fields(guest: str, action: str, seconds: float) -> dict[str, str]:
    """The journal fields of a guest-stopped entry: how it stopped (shutdown, destroyed, saved)
    and after how many seconds; luksvm metrics reads the last shutdown's from them."""
    return {
        **journal.fields(guest=guest, message_id="guest-stopped"),
        "LUKSVM_STOP_ACTION": action,
        "LUKSVM_STOP_SECONDS": f"{seconds:.3f}",
    }


def _on_timeout(
    config: Config,
    name: str,
    policy: GuestPolicy,
    domain: virt.Domain,
    *,
    began: float,
    notify: Callable[..., bool],
) -> Stopped:
    fields = journal.fields(guest=name, message_id="guest-timeout")
    # the entry that says the guest was left running carries the action (luksvm metrics reads it)
    left_running = {**fields, "LUKSVM_STOP_ACTION": "left-running"}
    waited = format_timespan(policy.stop_timeout)
    if policy.on_timeout == "fail":
        message = (
            f"guest {name!r} still running after {waited}; on_timeout=fail leaves it running, "
            f"so its volumes refuse to lock; {HOST_SHUTDOWN_NOTE}"
        )
        raise journal.logged_error(message, left_running, log)
    if policy.on_timeout == "managedsave":
        refusal = save_dir_refusal(config)
        if refusal is not None:
            raise journal.logged_error(
                f"guest {name!r} still running after {waited} and left running: {refusal}",
                left_running,
                log,
            )
        log.warning(
            "guest %s still running after %s; saving its state (managedsave)",
            name,
            waited,
            extra=fields,
        )
        notify(
            f"EXTEND_TIMEOUT_USEC={(POLICY_SECONDS['managedsave'] + 30) * USEC_PER_SEC}",
            f"STATUS=saving guest {name}",
        )
        domain.managed_save()
        how: StopOutcome = "saved"
    else:
        log.warning(
            "guest %s still running after %s; destroying it (on_timeout=destroy)",
            name,
            waited,
            extra=fields,
        )
        notify(f"STATUS=destroying guest {name}")
        domain.destroy()
        how = "destroyed"
    if not domain.wait_for({"shutoff"}, POLICY_SECONDS["destroy"], poll=0.2):
        raise LuksvmError(f"guest {name!r} still {domain.state()} after {how}")
    seconds = time.monotonic() - began
    log.info(
        "guest %s %s after %.1f s",
        name,
        how,
        seconds,
        extra=stop_fields(name, how, seconds),
    )
    return Stopped(name, how, seconds)


def stop_guests(config: Config, names: Sequence[str], connect: Connect) -> list[Stopped]:
    """Stop every guest at once, one thread each (a libvirt connection is thread-safe); raises
    one LuksvmError naming every guest that failed, after all have finished."""
    if not names:
        return []
    from concurrent.futures import ThreadPoolExecutor  # only when several guests stop

    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        futures = [(n, pool.submit(stop_guest, config, n, connect)) for n in names]
    done: list[Stopped] = []
    failed: list[str] = []
    for _name, future in futures:
        error = future.exception()
        if error is None:
            done.append(future.result())
        elif isinstance(error, LuksvmError):
            failed.append(str(error))
        else:
            raise error
    if failed:
        raise LuksvmError("\n".join(failed))
    return done


def shared(conn: virt.Connection) -> Connect:
    """A Connect that lends one open connection and leaves it open (threads share it)."""
    return lambda: contextlib.nullcontext(conn)


# --- the admin's `luksvm start|stop`: through the units when systemd runs ---------------------


def select(config: Config, names: Sequence[str], every: bool) -> list[str]:
    """The guests a command names (or all, with --all), in start order; unknown names refused."""
    if every and names:
        raise UsageError("name guests or give --all, not both")
    if every:
        return [g.name for g in config.guests]
    if not names:
        raise UsageError("name at least one guest, or give --all")
    for name in names:
        config.guest(name)  # raises, listing the configured guests
    return [g.name for g in config.guests if g.name in names]


def start_through_units(config: Config, names: Sequence[str]) -> Iterator[Progress]:
    """One `systemctl start` per guest, in order, on the admin's terminal (passphrase prompts
    for its volumes appear there); each told before it runs. An active unit whose guest was shut
    down is restarted: an active unit does not mean a running guest (RemainAfterExit). Nothing
    runs unless the caller iterates."""
    from luksvm.run import run_interactive
    from luksvm.systemctl import unit_state

    failed = []
    with virt.connect(config.settings.uri, readonly=True) as conn:
        for name in names:
            unit = unit_name(name)
            verb: Literal["start", "restart"] = "start"
            if unit_state(unit) == "active":
                domain = conn.find(name)
                if domain is not None and domain.is_running():
                    yield Progress(name, "already running")
                    continue
                verb = "restart"
            argv = ("systemctl", verb, unit)
            yield Progress(name, verb, argv)
            if run_interactive(list(argv), check=False) != 0:
                failed.append(name)
    if failed:
        raise LuksvmError(
            f"not started: {', '.join(failed)}; see systemctl status "
            + " ".join(shlex.quote(unit_name(n)) for n in failed)
        )


def stop_through_units(config: Config, names: Sequence[str]) -> Iterator[Progress | Stopped]:
    """Active units: one `systemctl stop` for all (systemd runs the stop jobs in parallel), told
    before it runs. Guests whose unit is not active but which run (started by hand): stopped
    directly, at the same time; each Stopped once all are done. Nothing runs unless the caller
    iterates."""
    from luksvm.run import run
    from luksvm.systemctl import unit_state

    active = [n for n in names if unit_state(unit_name(n)) == "active"]
    others = [n for n in names if n not in active]
    budget = max((units.stop_timeout_usec(config.guest(n)) for n in active), default=0)
    failures = []
    argv = ("systemctl", "stop", *(unit_name(n) for n in active))
    if active:
        yield Progress("", "stop", argv)
    from concurrent.futures import ThreadPoolExecutor  # only when several guests stop

    with ThreadPoolExecutor(max_workers=2) as pool:
        through_units = None
        if active:
            through_units = pool.submit(run, list(argv), timeout=budget / USEC_PER_SEC + 60)
        direct = pool.submit(stop_guests, config, others, connector(config))
        try:
            stopped = direct.result()
        except LuksvmError as error:
            stopped, failures = [], [str(error)]
        if through_units is not None:
            through_units.result()
    # systemctl stop succeeds even when ExecStop failed (the unit ends "failed"): ask the units.
    for name in active:
        unit = unit_name(name)
        if unit_state(unit) == "failed":
            on_timeout = config.settings.policy_for(name).on_timeout
            failures.append(
                f"guest {name!r} not stopped: {unit} failed (on_timeout={on_timeout}); "
                f"see: journalctl -u {shlex.quote(unit)}"
            )
    if failures:
        raise LuksvmError("\n".join(failures))
    yield from stopped


def start_directly(config: Config, names: Sequence[str]) -> Iterator[Progress]:
    """Without systemd: start in order, each after the previous one's start delay; each guest
    told once it runs. Nothing runs unless the caller iterates."""
    with virt.connect(config.settings.uri) as conn:
        for name in names:
            started = start_guest(config, name, conn, delay=name != names[-1])
            yield Progress(name, "started" if started else "already running")


# --- coexistence with libvirt's own autostart (`luksvm apply [--take-over]`) -------------------


# libvirt-guests reads its settings from one of these (Debian; Fedora/RHEL); its own defaults
# apply to whatever they leave unset.
LIBVIRT_GUESTS_FILES = ("etc/default/libvirt-guests", "etc/sysconfig/libvirt-guests")
LIBVIRT_GUESTS_DEFAULTS = {"ON_BOOT": "start", "ON_SHUTDOWN": "suspend"}


def libvirt_guests_settings(config: Config) -> tuple[str, dict[str, str]]:
    """(the file, its settings over libvirt-guests' defaults); the file is "" when none exists.
    Shell assignments only (KEY=value, quotes stripped), as libvirt-guests.sh sources them."""
    settings = dict(LIBVIRT_GUESTS_DEFAULTS)
    for path in LIBVIRT_GUESTS_FILES:
        full = _under(config, path)
        try:
            with open(full, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        for line in lines:
            match = re.fullmatch(r"\s*([A-Z_]+)=(.*?)\s*", line)
            if match:
                words = shlex.split(match.group(2), comments=True) or [""]
                settings[match.group(1)] = words[0]
        return "/" + path, settings
    return "", settings


def autostarting(config: Config, conn: virt.Connection) -> list[str]:
    """Configured guests whose libvirt autostart flag is set: libvirt would start them when the
    daemon starts, racing the unlock of their volumes."""
    found = []
    for guest in config.guests:
        domain = conn.find(guest.name)
        if domain is not None and domain.autostart():
            found.append(guest.name)
    return found


def autostart_warning(names: Sequence[str]) -> str:
    return (
        f"libvirt autostart is on for {', '.join(names)}: libvirt starts "
        f"{'them' if len(names) > 1 else 'it'} when the daemon starts, whether or not the volumes "
        "are unlocked, and luksvm's unit then finds the guest running. Let luksvm start "
        f"{'them' if len(names) > 1 else 'it'}: luksvm apply --take-over (clears the flag), or "
        f"virsh autostart --disable {names[0]}"
    )


def clear_autostart(config: Config, conn: virt.Connection) -> list[str]:
    """Clear libvirt's autostart flag on every configured guest that has it; the names cleared."""
    cleared = autostarting(config, conn)
    for name in cleared:
        conn.domain(name).set_autostart(False)
        log.info(
            "guest %s: libvirt autostart cleared; luksvm-guest@ starts it after its volumes",
            name,
            extra=journal.fields(guest=name),
        )
    return cleared


def apply_autostart_policy(config: Config, *, take_over: bool, dry_run: bool) -> list[str]:
    """What `luksvm apply [--take-over]` says about libvirt autostart: with take_over, clear the
    flags (dry_run: say which it would clear); without, the warning. Only on the running system
    (root /); an unreachable libvirt is a warning, not a failure."""
    if config.root != "/" or not config.guests:
        return []
    changing = take_over and not dry_run
    try:
        with virt.connect(config.settings.uri, readonly=not changing) as conn:
            if changing:
                cleared = clear_autostart(config, conn)
                return [f"libvirt autostart cleared for {', '.join(cleared)}"] if cleared else []
            names = autostarting(config, conn)
    except virt.VirtError as error:
        return [f"could not check libvirt's autostart flags: {error}"]
    if names and take_over:
        return [f"would clear libvirt autostart for {', '.join(names)}"]
    return [autostart_warning(names)] if names else []


# --- plans for --dry-run ---------------------------------------------------------------------


def describe_stop(config: Config, name: str) -> str:
    policy = config.settings.policy_for(name)
    return (
        f"{name}: ACPI shutdown, wait up to {format_timespan(policy.stop_timeout)}, "
        f"then on_timeout={policy.on_timeout}"
    )


def plan(config: Config, verb: str, names: Sequence[str], *, through_units: bool) -> list[str]:
    """What `luksvm start|stop` would do, one line each, changing nothing."""
    if through_units:
        if verb == "stop":
            return [
                shlex.join(["systemctl", "stop", *(unit_name(n) for n in names)]),
                *(describe_stop(config, n) for n in names),
            ]
        return [shlex.join(["systemctl", "start", unit_name(n)]) for n in names]
    if verb == "stop":
        return [describe_stop(config, n) + " (all at once)" for n in names]
    lines = []
    for name in names:
        delay = config.guest(name).policy.start_delay
        lines.append(
            f"{name}: start once {', '.join(config.guest(name).volumes)} unlocked"
            + (f", then wait {format_timespan(delay)}" if delay and name != names[-1] else "")
        )
    return lines
