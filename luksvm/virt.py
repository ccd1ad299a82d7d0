"""libvirt through libvirt-python: connect, find guests and their disks, start/stop/wait, fsTrim.

Every call runs with a deadline: libvirt calls block in C, and a unit that waits forever on a
socket-activated daemon at shutdown is the deadlock DESIGN.md describes. The calls run on worker
threads kept for the next call (_Worker); a call past its deadline raises LuksvmError and leaves
its worker behind, busy, as a daemon thread (it cannot be cancelled).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from luksvm.errors import LuksvmError

DEFAULT_URI = "qemu:///system"
CALL_DEADLINE = 30.0  # seconds for one libvirt call (connect, lookup, destroy …)
SAVE_DEADLINE = 600.0  # managedsave writes all guest RAM
# Starting a guest is more than one ordinary call: libvirt launches QEMU and waits for it; a big
# guest (RAM preallocated, or pinned for VFIO) or a busy host takes longer than CALL_DEADLINE.
# Measured in the e2e VM: create took over 30 s with three guests starting at once under load.
START_DEADLINE = 120.0

# virDomainState, by number (libvirt.VIR_DOMAIN_*), so that reading needs no import of libvirt.
STATES = {
    0: "nostate",
    1: "running",
    2: "blocked",
    3: "paused",
    4: "shutdown",  # shutting down
    5: "shutoff",
    6: "crashed",
    7: "pmsuspended",
}
# A guest in any of these has a QEMU process (it is not down yet).
ACTIVE_STATES = frozenset({"running", "blocked", "paused", "shutdown", "pmsuspended"})

T = TypeVar("T")


VIR_ERR_NO_DOMAIN = 42  # libvirt.VIR_ERR_NO_DOMAIN


class VirtError(LuksvmError):
    """A libvirt call failed (code: libvirt's error code) or missed its deadline (code 0)."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Disk:
    """A disk of a domain's XML."""

    target: str  # vda, sdb …
    device: str  # disk | cdrom | floppy | lun
    source: str  # a device or file path; "" for an empty drive or a network disk
    type: str = "file"  # file | block | volume | network
    driver_type: str = "raw"  # the image format qemu reads: raw, qcow2 …
    discard: str = ""  # <driver discard=…>: unmap | ignore | "" (unset: libvirt ignores TRIM)
    encrypted: bool = False  # the image has its own <encryption> (qemu-level LUKS or qcow)


class _Worker:
    """A daemon thread that makes libvirt calls, one at a time, so that the caller can give up on
    a call at its deadline. It is kept for the next call: a new thread per call cost 5-15 ms a
    call in the e2e VM (7 calls for a guest start), against 2-3 ms for the call itself. Two locks
    hand a call over and its outcome back (importing the queue module costs more than a call)."""

    def __init__(self) -> None:
        import libvirt  # here, in the caller: a missing libvirt-python fails at once

        self._libvirt_error = libvirt.libvirtError
        self._wake = threading.Lock()  # released: a call is waiting in _job
        self._done = threading.Lock()  # released: its outcome is in _outcome
        self._wake.acquire()
        self._done.acquire()
        self._job: tuple[Callable[..., Any], tuple[Any, ...]] = (tuple, ())
        self._outcome: tuple[str, Any] = ("", None)
        threading.Thread(target=self._serve, name="libvirt calls", daemon=True).start()

    def run(
        self, fn: Callable[..., Any], args: tuple[Any, ...], deadline: float
    ) -> tuple[str, Any]:
        """("value", v), ("error", libvirtError) or ("crash", exception); ("late", None) when the
        call is still running after `deadline` seconds."""
        self._job = (fn, args)
        self._wake.release()
        return self._outcome if self._done.acquire(timeout=deadline) else ("late", None)

    def _serve(self) -> None:
        while True:
            self._wake.acquire()
            fn, args = self._job
            try:
                self._outcome = ("value", fn(*args))
            except self._libvirt_error as error:
                self._outcome = ("error", error)
            except BaseException as error:  # handed to the caller, not lost in the thread
                self._outcome = ("crash", error)
            self._done.release()


# Workers free for the next call, from any thread: as many as calls ever ran at once (a guest
# stop of several guests runs in parallel). list.pop and list.append are atomic.
_idle_workers: list[_Worker] = []


def call(what: str, fn: Callable[..., T], *args: Any, deadline: float = CALL_DEADLINE) -> T:
    """fn(*args) on a worker thread; VirtError when it fails or is still busy after `deadline`."""
    try:
        worker = _idle_workers.pop()
    except IndexError:
        worker = _Worker()
    kind, outcome = worker.run(fn, args, deadline)
    if kind == "late":  # the worker stays busy with it: never handed another call
        raise VirtError(f"libvirt did not answer {what} within {deadline:g} s")
    _idle_workers.append(worker)
    if kind == "crash":
        raise outcome
    if kind == "error":
        raise VirtError(
            f"{what}: {outcome.get_error_message() or outcome}", outcome.get_error_code()
        )
    value: T = outcome
    return value


def _quiet_libvirt() -> None:
    """libvirt prints every error to stderr by default; luksvm reports its own."""
    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


class Domain:
    """One libvirt domain; every method is a single libvirt call with a deadline."""

    def __init__(self, handle: Any, name: str) -> None:
        self._dom = handle
        self.name = name

    def state(self) -> str:
        state, _reason = call(f"state of {self.name}", self._dom.state)
        return STATES.get(state, "nostate")

    def is_running(self) -> bool:
        return self.state() in ACTIVE_STATES

    def xml(self) -> str:
        text: str = call(f"XML of {self.name}", self._dom.XMLDesc, 0)
        return text

    def disks(self) -> list[Disk]:
        return disks_from_xml(self.xml())

    def defined_xml(self) -> str:
        """The persistent definition with its secrets (VIR_DOMAIN_XML_INACTIVE|SECURE): what a
        redefine must start from, or it drops VNC/SPICE passwords."""
        import libvirt

        flags = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE
        text: str = call(f"XML of {self.name}", self._dom.XMLDesc, flags)
        return text

    def start(self, deadline: float = START_DEADLINE) -> None:
        call(f"start {self.name}", self._dom.create, deadline=deadline)

    def shutdown_acpi(self) -> None:
        """Ask the guest to power off (ACPI power button). Hypervisors without that method (the
        test driver) get their default shutdown request."""
        import libvirt

        try:
            call(
                f"ACPI shutdown of {self.name}",
                self._dom.shutdownFlags,
                libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN,
            )
        except VirtError as error:
            if "unsupported flags" not in str(error):
                raise
            call(f"shutdown of {self.name}", self._dom.shutdown)

    def destroy(self) -> None:
        call(f"destroy {self.name}", self._dom.destroy)

    def managed_save(self) -> None:
        call(f"managedsave {self.name}", self._dom.managedSave, 0, deadline=SAVE_DEADLINE)

    def has_managed_save(self) -> bool:
        return bool(call(f"managedsave image of {self.name}", self._dom.hasManagedSaveImage, 0))

    def autostart(self) -> bool:
        return bool(call(f"autostart flag of {self.name}", self._dom.autostart))

    def set_autostart(self, enabled: bool) -> None:
        call(f"set autostart of {self.name}", self._dom.setAutostart, int(enabled))

    def fs_trim(self, minimum: int = 0, deadline: float = 3600.0) -> None:
        """Ask the guest agent to trim every mounted filesystem (qemu-guest-agent must run)."""
        call(f"fsTrim in {self.name}", self._dom.fSTrim, None, minimum, 0, deadline=deadline)

    def wait_for(
        self,
        states: Iterable[str],
        timeout: float,
        *,
        poll: float = 0.5,
        on_poll: Callable[[float], None] | None = None,
    ) -> bool:
        """Poll until the domain is in one of `states`; False when `timeout` seconds pass first.
        on_poll(seconds_left) runs after each poll that answered (for sd_notify)."""
        wanted = frozenset(states)
        end = time.monotonic() + timeout
        while True:
            if self.state() in wanted:
                return True
            left = end - time.monotonic()
            if left <= 0:
                return False
            if on_poll is not None:
                on_poll(left)
            time.sleep(min(poll, left))


class Connection:
    def __init__(self, handle: Any, uri: str, readonly: bool) -> None:
        self._conn = handle
        self.uri = uri
        self.readonly = readonly

    def guest_names(self) -> list[str]:
        """Names of all domains, defined and transient, sorted."""
        domains = call("list domains", self._conn.listAllDomains, 0)
        return sorted(call("domain name", d.name) for d in domains)

    def find(self, name: str) -> Domain | None:
        try:
            handle = call(f"look up {name}", self._conn.lookupByName, name)
        except VirtError as error:
            if error.code == VIR_ERR_NO_DOMAIN:
                return None
            raise
        return Domain(handle, name)

    def domain(self, name: str) -> Domain:
        found = self.find(name)
        if found is None:
            raise VirtError(
                f"guest {name!r}: no libvirt domain of that name at {self.uri}; define it "
                f"(virsh define) or fix x-luksvm.guest={name} in the configuration"
            )
        return found

    def define(self, xml: str) -> None:
        """Define (or redefine) a persistent domain from `xml`."""
        call("define the domain", self._conn.defineXML, xml)

    # By guest name, for callers that keep names rather than Domain objects (migrate).

    def state(self, guest: str) -> str:
        return self.domain(guest).state()

    def has_managed_save(self, guest: str) -> bool:
        return self.domain(guest).has_managed_save()

    def defined_xml(self, guest: str) -> str:
        return self.domain(guest).defined_xml()

    def close(self) -> None:
        with contextlib.suppress(VirtError):
            call("close connection", self._conn.close, deadline=5.0)

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def library_version() -> tuple[int, int, int]:
    """The version of the libvirt library libvirt-python runs on (no connection, no daemon): on a
    host with the distribution's packages, the daemon's version too."""
    import libvirt

    number = int(libvirt.getVersion())
    return number // 1_000_000, number // 1000 % 1000, number % 1000


def connect(uri: str = DEFAULT_URI, *, readonly: bool = False) -> Connection:
    """Open `uri` (read-only where reading is enough); VirtError names the URI on failure."""
    import libvirt

    _quiet_libvirt()
    opener = libvirt.openReadOnly if readonly else libvirt.open
    try:
        handle = call(f"connect to {uri}", opener, uri)
    except VirtError as error:
        raise VirtError(f"{error}; is libvirtd (or virtqemud) installed and running?") from None
    return Connection(handle, uri, readonly)


def disks_from_xml(text: str) -> list[Disk]:
    """The disks of a domain XML: target, kinds, source path (dev=, file= or volume) and driver."""
    import xml.etree.ElementTree as ET  # lazily: a guest's stop parses no XML

    root = ET.fromstring(text)
    disks = []
    for disk in root.findall("./devices/disk"):
        target = disk.find("target")
        source = disk.find("source")
        driver = disk.find("driver")
        path = ""
        if source is not None:
            path = source.get("dev") or source.get("file") or source.get("volume") or ""
        disks.append(
            Disk(
                target=target.get("dev", "") if target is not None else "",
                device=disk.get("device", "disk"),
                source=path,
                type=disk.get("type", "file"),
                driver_type=driver.get("type", "raw") if driver is not None else "raw",
                discard=driver.get("discard", "") if driver is not None else "",
                encrypted=disk.find("encryption") is not None
                or disk.find("source/encryption") is not None,
            )
        )
    return disks


# --- block resize and the guest agent (luksvm grow) --------------------------------------------

BLOCK_RESIZE_DEADLINE = 60.0  # QEMU's block_resize of a raw block device is one ioctl and a stat
AGENT_DEADLINE = 30  # seconds libvirt waits for the guest agent's reply to one command


def block_resize(domain: Domain, target: str, size: int) -> None:
    """Tell the running QEMU that the disk `target` is now `size` bytes (with
    VIR_DOMAIN_BLOCK_RESIZE_BYTES the size is bytes, not KiB). QEMU refuses a size beyond what
    its block device holds."""
    import libvirt

    call(
        f"block resize of {domain.name} {target} to {size:,} B",
        domain._dom.blockResize,
        target,
        size,
        libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES,
        deadline=BLOCK_RESIZE_DEADLINE,
    )


def block_capacity(domain: Domain, target: str) -> int:
    """Bytes the running QEMU reports for the disk `target` (libvirt's block info capacity)."""
    capacity, _allocation, _physical = call(
        f"block info of {domain.name} {target}", domain._dom.blockInfo, target, 0
    )
    return int(capacity)


def agent_command(domain: Domain, command: str, arguments: dict[str, Any] | None = None) -> Any:
    """One QEMU guest agent command through libvirt (e.g. guest-get-disks); its "return" value.
    VirtError when no agent answers (not installed, not running, or the command is disabled)."""
    import json

    import libvirt_qemu

    request: dict[str, Any] = {"execute": command}
    if arguments:
        request["arguments"] = arguments
    reply = call(
        f"guest agent {command} in {domain.name}",
        libvirt_qemu.qemuAgentCommand,
        domain._dom,
        json.dumps(request),
        AGENT_DEADLINE,
        0,
        deadline=AGENT_DEADLINE + 5.0,
    )
    return json.loads(reply).get("return")


def disk_pci_address(xml: str, target: str) -> tuple[int, int, int, int] | None:
    """(domain, bus, slot, function) of the disk `target`'s PCI address in the domain XML: the
    guest agent reports the same address for the disk it sees, which ties its name to `target`."""
    import xml.etree.ElementTree as ET

    root = ET.fromstring(xml)
    for disk in root.findall("./devices/disk"):
        found = disk.find("target")
        if found is None or found.get("dev") != target:
            continue
        address = disk.find("address")
        if address is None or address.get("type") != "pci":
            return None
        return (
            int(address.get("domain", "0"), 0),
            int(address.get("bus", "0"), 0),
            int(address.get("slot", "0"), 0),
            int(address.get("function", "0"), 0),
        )
    return None
