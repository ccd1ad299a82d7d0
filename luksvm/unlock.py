"""Unlock and lock volumes.

unlock: `systemd-cryptsetup attach` (what systemd's own crypttab units run), or `cryptsetup open`
on machines without it; `keyring:` keys go through `cryptsetup open --key-file=-` with the secret on
stdin. lock: deactivate every VG with a PV on the mapping, settle udev, close — and refuse, before
changing anything, while anything else holds the mapping. Never forced.

An admin's command (not --no-start / --from-unit) on a machine where systemd runs goes through the
volume's unit instead, so that the unit owns the mapping and locks it again at shutdown; after
unlocking, the guests whose volumes are all open are started through their units. unlock and lock
never touch libvirt.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shlex
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from luksvm import cryptsetup, devmapper, journal, keys
from luksvm.config import GENERATOR_OPTIONS, TOKEN_OPTION_PREFIXES, Config, Settings, Volume
from luksvm.devmapper import DmDevice
from luksvm.durations import USEC_PER_SEC
from luksvm.errors import LuksvmError
from luksvm.run import CommandError, run, run_interactive
from luksvm.systemctl import systemd_running, unit_states
from luksvm.units import guest_unit, unlock_unit

if TYPE_CHECKING:
    # lvm and blockdev serve only lock; the boot path (unlock --no-start) never imports them.
    from luksvm.lvm import VolumeGroup

log = logging.getLogger("luksvm.unlock")

SETTLE_TIMEOUT = 30
VGCHANGE_TIMEOUT = 120
UNIT_STOP_TIMEOUT = 120  # the unlock unit's TimeoutStopSec=90s, plus systemctl's own time
SYSTEMCTL_TIMEOUT = 30
# How long a lock waits for openers that go away by themselves: ones no process explains, and
# scans (devmapper.SCANNERS). Seen in the VM at shutdown, where the locks run together and each
# one's `pvs` reads every open mapping: the mapping held for some seconds after its guest's QEMU
# was SIGKILLed with its machine scope.
TRANSIENT_WAIT = 15.0
# libvirt states in which a guest has no QEMU (so its luksvm-guest@ unit is only a leftover)
STOPPED_DOMAIN_STATES = frozenset({"shutoff", "missing"})
UNEXPLAINED = "not found in /proc"

# Options only systemd's crypttab generator acts on (luksvm's units do that work):
# systemd-cryptsetup itself would warn about them.
NOT_FOR_ATTACH = GENERATOR_OPTIONS | {"_netdev", "x-initrd.attach"}


@dataclass(frozen=True)
class Step:
    argv: tuple[str, ...]
    timeout: float = 60
    interactive: bool = False  # on the caller's terminal with no timeout: a prompt may wait
    key_from_keyring: bool = False  # the volume's keyring secret goes to stdin
    unheld: bool = False  # check again right before running that nothing holds the mapping
    says: str = ""  # logged before it runs (what happened at shutdown is read from the journal)
    source: str = ""  # an unattended attempt: its LUKSVM_KEY_SOURCE (tpm2, tang, keyfile, …)
    key_from_tang: bool = False  # the key clevis recovers from the Tang server goes to stdin


@dataclass(frozen=True)
class Plan:
    volume: str
    action: str  # unlock | lock | start guests
    steps: tuple[Step, ...] = ()
    done: str = ""  # why there is nothing to do
    refusal: str = ""  # why it must not be done; nothing was changed
    notes: tuple[str, ...] = ()
    # refused only for openers no process explains (one exiting) or scans (LVM's, udev's): may
    # pass soon
    transient: bool = False
    # the steps are alternatives, tried in order until one unlocks (unattended sources)
    attempts: bool = False

    def commands(self) -> list[str]:
        return [shlex.join(step.argv) for step in self.steps]


# --- systemd: unit names and states ------------------------------------------------------------


# --- unlock ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UnlockProbe:
    active: bool  # the mapping exists already
    device_present: bool  # the backing device exists
    systemd_cryptsetup: str  # its path, "" when this machine has none
    terminal: bool  # stdin is a terminal: a person can answer a prompt
    in_unit: bool = False  # run by a systemd service, whose prompts systemd's agents show
    unit_active: bool | None = None  # None: go direct, not through the volume's unit
    unit_failed: bool = False  # its unit failed (an unattended volume: every source failed)
    attempt_timeout: float = 30.0  # seconds each unattended attempt may take


def attach_options(volume: Volume) -> tuple[str, ...]:
    """The options systemd-cryptsetup gets: the volume's own minus what only the generator reads,
    always `luks` (never plain mode by accident), and for keyfile/keyring keys `headless=true` and
    `tries=1` unless set: measured, without them a wrong keyfile falls back to a prompt that waits
    forever."""
    options = [o for o in volume.options if o.partition("=")[0] not in NOT_FOR_ATTACH]
    if volume.option("luks") is None:
        options.insert(0, "luks")
    if volume.key.kind in ("file", "keyring"):
        if volume.option("headless") is None:
            options.append("headless=true")
        if volume.option("tries") is None:
            options.append("tries=1")
    return tuple(options)


def unlock_plan(volume: Volume, probe: UnlockProbe, *, key_file: str = "") -> Plan:
    """What unlocking `volume` takes. key_file: its checked keyfile path (file keys only)."""
    name = volume.name
    if probe.unit_active is not None:
        if probe.active and probe.unit_active:
            return Plan(name, "unlock", done="already unlocked")
        refusal = _cannot_unlock(volume, probe)
        if refusal:
            return Plan(name, "unlock", refusal=refusal)
        if volume.unattended and probe.unit_failed and not probe.active:
            return fallback_plan(volume, probe, key_file=key_file)
        # Even an open mapping goes through its unit: the unit adopts it (no prompt) and locks it
        # at shutdown. Interactive, so that systemctl's password agent asks on this terminal.
        start = Step(("systemctl", "start", unlock_unit(name)), interactive=True)
        return Plan(name, "unlock", (start,))
    if probe.active:
        return Plan(name, "unlock", done="already unlocked")
    refusal = _cannot_unlock(volume, probe)
    if refusal:
        return Plan(name, "unlock", refusal=refusal)
    if volume.unattended:
        return attempts_plan(volume, probe, key_file=key_file)
    try:
        if volume.key.kind == "keyring":
            argv = cryptsetup.open_argv(
                volume.device, name, volume.options, key_file="-", keyring=True
            )
            step = Step(argv, timeout=cryptsetup.KEY_TIMEOUT, key_from_keyring=True)
        else:
            if probe.systemd_cryptsetup:
                argv = cryptsetup.attach_argv(
                    probe.systemd_cryptsetup, name, volume.device, key_file, attach_options(volume)
                )
            else:
                argv = cryptsetup.open_argv(volume.device, name, volume.options, key_file)
            step = Step(argv, timeout=cryptsetup.KEY_TIMEOUT, interactive=volume.interactive)
    except LuksvmError as error:
        return Plan(name, "unlock", refusal=f"cannot unlock {error}")
    return Plan(name, "unlock", (step,))


def _cannot_unlock(volume: Volume, probe: UnlockProbe) -> str:
    if probe.active:
        return ""
    if not probe.device_present:
        return (
            f"cannot unlock {volume.name}: its device {volume.device} ({volume.source}, "
            f"{volume.where}) does not exist; is the backing LV active and the disk attached?"
        )
    # Through a unit only a terminal helps (systemctl's agent asks there); a service of its own
    # (the unlock unit running --no-start) asks through systemd's agents.
    answerable = probe.terminal or (probe.in_unit and probe.unit_active is None)
    if volume.interactive and not answerable:
        return (
            f"cannot unlock {volume.name}: it asks for a passphrase and there is no terminal to "
            f"ask on; log in with one: ssh -t HOST luksvm unlock {volume.name}"
        )
    return ""


def probe_unlock(
    volume: Volume,
    active: set[str],
    unit_active: bool | None,
    *,
    unit_failed: bool = False,
    attempt_timeout: float = 30.0,
) -> UnlockProbe:
    return UnlockProbe(
        active=volume.name in active,
        device_present=os.path.exists(volume.device),
        systemd_cryptsetup=cryptsetup.find_systemd_cryptsetup(),
        terminal=keys.terminal(),
        in_unit=keys.in_unit(),
        unit_active=unit_active,
        unit_failed=unit_failed,
        attempt_timeout=attempt_timeout,
    )


# --- unattended volumes: one bounded, headless attempt per source ------------------------------


def attempt_timeout(volume: Volume, settings: Settings) -> float:
    """Seconds each unattended attempt of `volume` may take."""
    usec = volume.unattended_timeout or settings.unattended_timeout
    return usec / USEC_PER_SEC


def key_options(volume: Volume) -> list[str]:
    """The volume's attach options without the token ones: systemd-cryptsetup given tpm2-device=
    reads a key file as a sealed TPM2 blob, and prompts after a failed token."""
    return [
        o
        for o in volume.options
        if not o.partition("=")[0].startswith(TOKEN_OPTION_PREFIXES)
        and o.partition("=")[0] not in NOT_FOR_ATTACH
    ]


def _headless(options: Sequence[str]) -> list[str]:
    """`luks` first; headless=true and tries=1 forced: an attempt never prompts and tries once."""
    kept = [o for o in options if o.partition("=")[0] not in ("luks", "headless", "tries")]
    return ["luks", *kept, "headless=true", "tries=1"]


def attempts_plan(volume: Volume, probe: UnlockProbe, *, key_file: str = "") -> Plan:
    """The unit's unlock of an unattended volume: the token, then Tang, then the configured key,
    each headless with one try and at most probe.attempt_timeout seconds; the first that opens
    the volume wins. Never a prompt: when all fail, the unit fails (see execute)."""
    name, device = volume.name, volume.device
    binary = probe.systemd_cryptsetup
    steps = []
    timeout = probe.attempt_timeout
    try:
        for source in volume.unlock_sources():
            if source in ("tpm2", "fido2", "pkcs11"):
                options = [o for o in volume.options if o.partition("=")[0] not in NOT_FOR_ATTACH]
                if binary:
                    argv = cryptsetup.attach_argv(binary, name, device, "-", _headless(options))
                else:  # refused: cryptsetup cannot carry the token options out
                    argv = cryptsetup.open_argv(device, name, options)
                steps.append(Step(argv, timeout=timeout, source=source))
            elif source == "tang":
                argv = cryptsetup.open_argv(device, name, key_options(volume), key_file="-")
                steps.append(Step(argv, timeout=timeout, source=source, key_from_tang=True))
            elif source == "keyring":
                argv = cryptsetup.open_argv(device, name, key_options(volume), key_file="-")
                steps.append(Step(argv, timeout=timeout, source=source, key_from_keyring=True))
            elif binary:
                options = _headless(key_options(volume))
                argv = cryptsetup.attach_argv(binary, name, device, key_file, options)
                steps.append(Step(argv, timeout=timeout, source=source))
            else:
                argv = cryptsetup.open_argv(device, name, key_options(volume), key_file)
                steps.append(Step(argv, timeout=timeout, source=source))
    except LuksvmError as error:
        return Plan(name, "unlock", refusal=f"cannot unlock {error}")
    note = f"tries {', '.join(volume.unlock_sources())}, {timeout:g} s each, no prompt"
    return Plan(name, "unlock", tuple(steps), notes=(note,), attempts=True)


def fallback_plan(volume: Volume, probe: UnlockProbe, *, key_file: str = "") -> Plan:
    """An admin's unlock of an unattended volume whose unit failed (every source failed): ask for
    the passphrase or recovery key on this terminal, then start the unit, which adopts the open
    mapping and locks it at shutdown."""
    name, device = volume.name, volume.device
    if not probe.terminal:
        return Plan(
            name,
            "unlock",
            refusal=f"cannot unlock {name}: its unattended keys failed ({unlock_unit(name)} "
            "failed) and there is no terminal to ask for the passphrase or recovery key on; "
            f"log in with one: ssh -t HOST luksvm unlock {name}",
        )
    options = [o for o in key_options(volume) if o.partition("=")[0] not in ("headless", "luks")]
    try:
        if probe.systemd_cryptsetup:
            argv = cryptsetup.attach_argv(
                probe.systemd_cryptsetup, name, device, "-", ["luks", *options]
            )
        else:
            argv = cryptsetup.open_argv(device, name, options)
    except LuksvmError as error:
        return Plan(name, "unlock", refusal=f"cannot unlock {error}")
    ask = Step(
        argv,
        interactive=True,
        source="prompt",
        says="its unattended keys failed: asking for the passphrase or recovery key",
    )
    adopt = Step(("systemctl", "start", unlock_unit(name)), timeout=SYSTEMCTL_TIMEOUT)
    return Plan(name, "unlock", (ask, adopt))


def guests_to_start(config: Config, volumes: Iterable[str], unlocked: set[str]) -> list[str]:
    """Guests of `volumes` whose volumes are all in `unlocked`, in start order."""
    touched = set(volumes)
    return [
        guest.name
        for guest in config.guests
        if touched & set(guest.volumes) and set(guest.volumes) <= unlocked
    ]


def start_guests_plan(guests: Sequence[str]) -> Plan:
    """Start guests through their units. --no-block: each unit waits for libvirt on its own."""
    argv = ("systemctl", "start", "--no-block", *(guest_unit(g) for g in guests))
    note = "start the guests whose volumes are all unlocked: " + ", ".join(guests)
    return Plan("", "start guests", (Step(argv, timeout=SYSTEMCTL_TIMEOUT),), notes=(note,))


def unlock(
    config: Config, volumes: Sequence[Volume], *, no_start: bool, dry_run: bool
) -> list[Plan]:
    """Unlock `volumes` (each on its own: one failure does not stop the rest), then start the
    guests whose volumes are now all open. Returns the plans; with dry_run runs nothing."""
    via_units = not no_start and systemd_running(config.root)
    units = [unlock_unit(v.name) for v in volumes]
    states = unit_states(units) if via_units else {}
    active = devmapper.names()
    plans = []
    for volume, unit in zip(volumes, units):
        unit_active = states.get(unit) == "active" if via_units else None
        try:
            key_file = keys.keyfile_path(volume, config.root) if volume.key.kind == "file" else ""
        except LuksvmError as error:
            plans.append(Plan(volume.name, "unlock", refusal=f"cannot unlock {error}"))
            continue
        probe = probe_unlock(
            volume,
            active,
            unit_active,
            unit_failed=states.get(unit) == "failed",
            attempt_timeout=attempt_timeout(volume, config.settings),
        )
        plans.append(unlock_plan(volume, probe, key_file=key_file))
    failures = [] if dry_run else execute_each(plans, config)
    if via_units:
        # A dry run predicts; a real one looks at what is open now.
        unlocked = (
            active | {p.volume for p in plans if not p.refusal} if dry_run else devmapper.names()
        )
        guests = guests_to_start(config, (v.name for v in volumes), unlocked)
        if guests:
            plans.append(start_guests_plan(guests))
            if not dry_run:
                try:
                    execute(plans[-1], config)
                except LuksvmError as error:
                    failures.append(str(error))
    if failures:
        raise LuksvmError("\n".join(failures))
    return plans


# --- lock --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LockProbe:
    devices: tuple[DmDevice, ...]  # every device-mapper device
    vgs: tuple[VolumeGroup, ...]  # the VGs with a PV on the mapping, with all their PVs
    users: dict[str, tuple[devmapper.Opener, ...]] = field(default_factory=dict)  # dm-N → openers


def lock_plan(volume: Volume, probe: LockProbe) -> Plan:
    """What locking `volume` takes: deactivate its VGs, settle, close; or why not (held)."""
    from luksvm import lvm

    name = volume.name
    by_kernel = {d.kernel: d for d in probe.devices}
    mapping = next((d for d in probe.devices if d.name == name), None)
    if mapping is None:
        return Plan(name, "lock", done="already locked")
    active_lvs = [d for d in probe.devices if _in(d, probe.vgs)]
    ours = {d.kernel for d in active_lvs}
    held: list[Held] = []
    for device in (mapping, *active_lvs):
        held += _holders(device, ours, by_kernel, probe.users)
    if held:
        return Plan(
            name,
            "lock",
            refusal=f"cannot lock {name}: still held by {', '.join(h.text for h in held)}; "
            + _fix(volume, held),
            transient=all(h.transient for h in held),
        )
    steps = [
        Step(
            lvm.deactivate_argv(vg),
            timeout=VGCHANGE_TIMEOUT,
            says=f"deactivating guest VG {vg.name} (active on the mapping)",
        )
        for vg in probe.vgs
        if any(_in(d, (vg,)) for d in active_lvs)
    ]
    if steps:
        steps.append(
            Step(("udevadm", "settle", f"--timeout={SETTLE_TIMEOUT}"), timeout=SETTLE_TIMEOUT + 5)
        )
    steps.append(Step(cryptsetup.close_argv(name), timeout=cryptsetup.TIMEOUT, unheld=True))
    notes = tuple(
        f"VG {vg.name} has {vg.pv_count} PVs, {len(vg.pvs)} of them on open LUKS mappings "
        f"({', '.join(vg.pvs)}); LVM will call it partial"
        for vg in probe.vgs
        if vg.pv_count > len(vg.pvs)
    )
    return Plan(name, "lock", tuple(steps), notes=notes)


def _in(device: DmDevice, vgs: Iterable[VolumeGroup]) -> bool:
    return device.is_lv and any(device.uuid.startswith(vg.dm_uuid_prefix) for vg in vgs)


@dataclass(frozen=True)
class Held:
    """One thing that keeps a mapping from closing, and what would release it."""

    text: str  # for people: 'dm-7 (vgmail-root, active)', 'QEMU of guest "mail" (pid 812)'
    fix: str = ""  # "" when only the volume's guests can be suggested
    transient: bool = False  # no process or mount explains it, or a scan: may go by itself
    rank: int = 0  # the order fixes are given in: guests, then mounts, then VGs


def _holders(
    device: DmDevice,
    ours: set[str],
    by_kernel: dict[str, DmDevice],
    users: dict[str, tuple[devmapper.Opener, ...]],
) -> list[Held]:
    """What holds `device` and would still hold it after luksvm deactivated the VGs `ours`."""
    from luksvm import lvm

    held = []
    for kernel in device.holders:
        if kernel in ours:
            continue
        holder = by_kernel.get(kernel)
        if holder is None:
            held.append(Held(kernel))
        elif holder.is_lv:
            vg = lvm.split_dm_name(holder.name)[0]
            held.append(
                Held(
                    f"{kernel} ({holder.name}, active)",
                    f"deactivate VG {vg} (vgchange -an {vg})",
                    rank=2,
                )
            )
        else:
            held.append(Held(f"{kernel} ({holder.name}, active)"))
    others = device.open_count - len(device.holders)
    if others > 0:
        found = users.get(device.kernel, ())
        what = f"{device.kernel} ({device.name})"
        for user in found:
            if not device.is_lv:
                text = str(user)
            elif user.mount_point:
                text = f"{what} {user}"
            else:
                text = f"{what}: {user}"
            held.append(Held(text, *_release(user)))
        if len(found) < others:
            held.append(
                Held(f"{others - len(found)} more opener(s) of {what} {UNEXPLAINED}", "", True)
            )
    return held


def _release(user: devmapper.Opener) -> tuple[str, bool, int]:
    """(fix, transient, rank) for what an opener is."""
    if user.guest:
        return f'stop guest "{user.guest}" first (luksvm stop {user.guest})', False, 0
    if user.mount_point:
        return f"unmount {user.mount_point}", False, 1
    return "", user.scanner, 0


def _fix(volume: Volume, held: list[Held]) -> str:
    ranked = sorted({(h.rank, h.fix) for h in held if h.fix}, key=lambda r: (r[0], r[1]))
    fixes = [fix for _rank, fix in ranked]
    if not fixes:
        fixes = [f'stop guest "{g}" first (luksvm stop {g})' for g in volume.guests]
    return "; ".join(fixes) or "stop what uses it first"


def guest_vgs(device: str, candidates: Sequence[str]) -> list[VolumeGroup]:
    """The VGs with a PV on `device`, each with all its PVs among `candidates` (the open LUKS
    mappings: a guest VG may span several).

    LVM reads `device` alone first, and the other candidates only when a VG on it has more PVs:
    at shutdown the locks run together, and a scan of every mapping holds the others' mappings
    open while they check them (they then wait for it)."""
    from luksvm import lvm

    path = os.path.realpath(device)
    own = lvm.volume_groups_on([device])
    if all(vg.pv_count <= len(vg.pvs) for vg in own):
        return own
    return [
        vg
        for vg in lvm.volume_groups_on(candidates)
        if any(os.path.realpath(pv) == path for pv in vg.pvs)
    ]


def probe_lock(volume: Volume, *, with_lvm: bool = True) -> LockProbe:
    found = devmapper.devices()
    mapping = devmapper.by_name(found).get(volume.name)
    if mapping is None:
        return LockProbe(tuple(found), ())
    vgs: list[VolumeGroup] = []
    if with_lvm:
        vgs = guest_vgs(volume.mapper_path, [f"/dev/mapper/{d.name}" for d in found if d.is_crypt])
    relevant = [mapping, *(d for d in found if _in(d, vgs))]
    unexplained = [d.kernel for d in relevant if d.open_count > len(d.holders)]
    users = devmapper.users(unexplained) if unexplained else {}
    return LockProbe(tuple(found), tuple(vgs), users)


def settled_lock_plan(
    volume: Volume, *, with_lvm: bool = True, wait: float = TRANSIENT_WAIT
) -> Plan:
    """lock_plan on a fresh probe; while it is refused only for openers that may go by
    themselves (not found in /proc, or scans), settle udev and look again, for up to `wait`
    seconds. Never forces: what still holds the mapping after that is refused as before."""
    from luksvm import blockdev

    plan = lock_plan(volume, probe_lock(volume, with_lvm=with_lvm))
    if not (plan.transient and wait > 0):
        return plan
    log.info(
        "%s: held by an opener that may go by itself (a scan, or one not found in /proc); "
        "waiting up to %g s for it to go",
        volume.name,
        wait,
        extra=journal.fields(volume=volume.name),
    )
    end = time.monotonic() + wait
    while plan.transient and time.monotonic() < end:
        blockdev.settle()
        time.sleep(0.5)
        plan = lock_plan(volume, probe_lock(volume, with_lvm=with_lvm))
    return plan


def lock(
    config: Config,
    volumes: Sequence[Volume],
    *,
    from_unit: bool,
    dry_run: bool,
    domain_states: Callable[[Config, Sequence[str]], dict[str, str]] | None = None,
) -> list[Plan]:
    """Lock `volumes` (each on its own); an admin's lock goes through the volume's unit.
    domain_states(config, guests) tells what libvirt says of the guests (default: asks it)."""
    via_units = not from_unit and systemd_running(config.root)
    plans = []
    for volume in volumes:
        plan = settled_lock_plan(volume, wait=0 if dry_run else TRANSIENT_WAIT)
        if via_units and not plan.done and not plan.refusal:
            plan = _through_unit(
                volume, plan, lambda guests: (domain_states or libvirt_states)(config, guests)
            )
        plans.append(plan)
    failures = [] if dry_run else execute_each(plans, config)
    if failures:
        raise LuksvmError("\n".join(failures))
    return plans


def libvirt_states(config: Config, guests: Sequence[str]) -> dict[str, str]:
    """What libvirt says of each guest: a virt.STATES name, "missing" for no such domain; {}
    when libvirt does not answer (then nobody can tell whether a guest runs)."""
    from luksvm import virt

    try:
        with virt.connect(config.settings.uri, readonly=True) as conn:
            found = {guest: conn.find(guest) for guest in guests}
            return {g: d.state() if d is not None else "missing" for g, d in found.items()}
    except virt.VirtError as error:
        log.warning("cannot ask libvirt whether %s run: %s", ", ".join(guests), error)
        return {}


def execute_each(plans: Sequence[Plan], config: Config) -> list[str]:
    """Carry out every plan, each on its own: one volume's failure does not stop the others."""
    failures = []
    for plan in plans:
        try:
            execute(plan, config)
        except LuksvmError as error:
            failures.append(str(error))
    return failures


def _through_unit(
    volume: Volume, plan: Plan, domain_states: Callable[[Sequence[str]], dict[str, str]]
) -> Plan:
    """The admin's lock: refuse while a guest unit that requires the volume is active and its
    domain runs (stopping the unlock unit would stop it through Requires=), else stop the unit,
    whose ExecStop locks. A guest unit still active after its domain was shut off outside luksvm
    (virsh shutdown; the unit remains after exit) is stopped first, and said so."""
    unit = unlock_unit(volume.name)
    guests = {guest_unit(g): g for g in volume.guests}
    states = unit_states([unit, *guests])
    active = [
        g for u, g in guests.items() if states.get(u) in ("active", "activating", "reloading")
    ]
    in_libvirt = domain_states(active) if active else {}
    stale = [g for g in active if in_libvirt.get(g) in STOPPED_DOMAIN_STATES]
    running = [g for g in active if g not in stale]
    if running:
        unknown = [g for g in running if g not in in_libvirt]
        return Plan(
            volume.name,
            "lock",
            refusal=f"cannot lock {volume.name}: guest unit(s) "
            + ", ".join(guest_unit(g) for g in running)
            + " require it and are active"
            + (" (libvirt did not answer whether the guest runs)" if unknown else "")
            + "; stop them first: "
            + "; ".join(f"luksvm stop {g}" for g in running),
        )
    stops = tuple(
        Step(
            ("systemctl", "stop", guest_unit(g)),
            timeout=UNIT_STOP_TIMEOUT,
            says=f"guest {g} is {in_libvirt[g]} in libvirt; stopping its stale unit "
            f"{guest_unit(g)} (it remained active after the guest went down)",
        )
        for g in stale
    )
    notes = tuple(step.says for step in stops)
    if states.get(unit) != "active":
        # not the unit's: lock it directly
        return dataclasses.replace(plan, steps=stops + plan.steps, notes=notes + plan.notes)
    stop = Step(("systemctl", "stop", unit), timeout=UNIT_STOP_TIMEOUT)
    notes += (*plan.notes, f"{unit} ExecStop runs: " + "; ".join(plan.commands()))
    return Plan(volume.name, "lock", (*stops, stop), notes=notes)


# --- the executor ------------------------------------------------------------------------------


def execute(plan: Plan, config: Config) -> None:
    """Carry out `plan`; the only function here that changes anything."""
    fields = journal.fields(volume=plan.volume) if plan.volume else {}
    if plan.refusal:
        raise LuksvmError(plan.refusal)
    for note in plan.notes:
        log.info("%s", f"{plan.volume}: {note}" if plan.volume else note, extra=fields)
    if plan.done:
        log.info("%s: %s", plan.volume, plan.done, extra=fields)
        return
    volume = config.volume(plan.volume) if plan.volume else None
    if plan.attempts and volume is not None:
        _execute_attempts(plan, volume, config)
        return
    for step in plan.steps:
        if step.unheld and volume is not None:
            _refuse_if_held(volume)
        if step.says:
            log.info("%s: %s", plan.volume, step.says, extra=fields)
        try:
            if step.interactive:
                run_interactive(step.argv)
            else:
                secret = None
                if step.key_from_keyring and volume is not None:
                    secret = keys.keyring_secret(volume, config.settings)
                run(step.argv, timeout=step.timeout, stdin=secret, secret=secret is not None)
        except CommandError as error:
            if plan.action == "lock" and plan.volume not in devmapper.names():
                # Closed meanwhile by someone else: at shutdown lvm2's blk-availability.service
                # runs blkdeactivate alongside the lock units (seen in the VM).
                fields = journal.fields(volume=plan.volume, message_id="locked")
                log.info("%s: already locked (closed meanwhile)", plan.volume, extra=fields)
                return
            raise LuksvmError(_failed(plan, step, error)) from None
    if volume is not None:
        _verify(plan, volume)


def _execute_attempts(plan: Plan, volume: Volume, config: Config) -> None:
    """Try each unattended source once, in order, until the volume is open; log which one did
    (LUKSVM_KEY_SOURCE on the "unlocked" message). All failing fails at once, with a hint."""
    failed = []
    for step in plan.steps:
        try:
            secret = None
            started = time.monotonic()
            if step.key_from_keyring:
                secret = keys.keyring_secret(volume, config.settings)
            elif step.key_from_tang:
                secret = _tang_key(volume, step.timeout)
            # one bound for the whole attempt: what fetching the key took is not given twice
            left = max(step.timeout - (time.monotonic() - started), 1.0)
            run(step.argv, timeout=left, stdin=secret, secret=secret is not None)
        except LuksvmError as error:
            why = str(error).splitlines()[-1] if str(error) else "failed"
            failed.append(f"{step.source}: {why}")
            log.warning(
                "%s: the %s key did not unlock it: %s",
                volume.name,
                step.source,
                why,
                extra=journal.fields(
                    volume=volume.name, message_id="unlock-attempt-failed", key_source=step.source
                ),
            )
            continue
        if volume.name in devmapper.names():
            fields = journal.fields(
                volume=volume.name, message_id="unlocked", key_source=step.source
            )
            log.info("%s: unlocked (%s)", volume.name, step.source, extra=fields)
            return
        failed.append(f"{step.source}: still locked after {shlex.join(step.argv)}")
    raise journal.logged_error(
        f"cannot unlock {volume.name}: every unattended key failed ({'; '.join(failed)}); no "
        f"prompt at boot. Unlock it in a terminal with its passphrase or recovery key: ssh -t "
        f"HOST luksvm unlock {volume.name}; see luksvm keys {volume.name}",
        journal.fields(volume=volume.name),
    )


def _tang_key(volume: Volume, timeout: float) -> bytes:
    """The key a Tang server releases for one of the volume's clevis keyslots (clevis luks pass)."""
    from luksvm import tokens  # only Tang volumes need it (and its hashlib/urllib imports)

    inventory = tokens.read_inventory(volume.device)
    slots = [s for t in inventory.tokens if t.kind in ("tang", "sss") for s in t.keyslots]
    if not slots:
        raise LuksvmError(f"{volume.device} has no Tang (clevis) token")
    result = run(
        ["clevis", "luks", "pass", "-d", volume.device, "-s", str(slots[0])], timeout=timeout
    )
    return result.stdout.encode("utf-8")


def _refuse_if_held(volume: Volume) -> None:
    """After its VGs are off: anything still holding the mapping is not ours to remove."""
    again = settled_lock_plan(volume, with_lvm=False)
    if again.refusal:
        raise LuksvmError(again.refusal)


def _failed(plan: Plan, step: Step, error: CommandError) -> str:
    if step.argv[:2] == ("systemctl", "start") and plan.action == "unlock":
        unit = step.argv[-1]
        return f"cannot unlock {plan.volume}: {unit} failed; see: journalctl -u {shlex.quote(unit)}"
    return f"cannot {plan.action} {plan.volume}: {error}"


KEY_SOURCES = {"file": "keyfile", "keyring": "keyring", "ask": "prompt"}


def _verify(plan: Plan, volume: Volume) -> None:
    """Say what happened, and check it did (a unit's ExecStop failing still stops the unit)."""
    is_open = plan.volume in devmapper.names()
    fields = journal.fields(volume=plan.volume, message_id=f"{plan.action}ed")
    direct = plan.steps and plan.steps[0].argv[:2] != ("systemctl", "start")
    if plan.action == "unlock" and direct:  # through the unit: the unit's own message says it
        source = plan.steps[0].source or KEY_SOURCES.get(volume.key.kind, "prompt")
        fields = journal.fields(volume=plan.volume, message_id="unlocked", key_source=source)
    if plan.action == "unlock" and is_open:
        log.info("%s: unlocked", plan.volume, extra=fields)
    elif plan.action == "lock" and not is_open:
        log.info("%s: locked", plan.volume, extra=fields)
    else:
        hint = f"; see: journalctl -u {shlex.quote(unlock_unit(plan.volume))}"
        raise LuksvmError(
            f"{plan.volume}: still {'locked' if plan.action == 'unlock' else 'open'} after "
            + "; ".join(plan.commands())
            + hint
        )
