#!/usr/bin/env python3
"""luksvm unlock/lock against the bare tools they wrap, side by side, in one run.

Run as root on a machine with device-mapper where VOLUME is configured in
/etc/luksvm/crypttab.d with a keyfile and is closed (the e2e tier runs it in its VM: see
tests/e2e/test_unlock.py). Each round, each side first in turn:

  luksvm unlock --no-start -- VOLUME  vs  systemd-cryptsetup attach … luks,headless=true,tries=1
                                      and cryptsetup open --key-file KEY DEV VOLUME
  luksvm lock --from-unit -- VOLUME   vs  cryptsetup close VOLUME

With --guest GUEST (a guest of VOLUME that ignores ACPI, with [guests] stop_timeout = --wait):

  luksvm guest start -- GUEST         vs  libvirt-python: the same calls (state, XML, create())
  luksvm guest stop -- GUEST          vs  libvirt-python: the same calls (ACPI shutdown, state
                                          every 0.2 s until --wait, destroy())

luksvm's commands are written as its units run them (with "--"), so they take the same path.

Prints the median wall time of each, and luksvm's overhead over the tool it delegates to.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

SYSTEMD_CRYPTSETUP = (
    "/usr/bin/systemd-cryptsetup",
    "/usr/lib/systemd/systemd-cryptsetup",
    "/lib/systemd/systemd-cryptsetup",
)


def timed(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, capture_output=True)
    return (time.perf_counter() - started) * 1000


# The libvirt calls luksvm guest start and stop make, in their order, written directly against
# libvirt-python: the bare side (bench/boot.py runs the same). Start: is it running, its disks (the
# XML), create, running now. Stop (on_timeout=destroy): is it running, the ACPI power button, its
# state every 0.2 s until the timeout, destroy, its state until shut off.
LIBVIRT_START = """
import libvirt, sys
conn = libvirt.open("qemu:///system")
domain = conn.lookupByName(sys.argv[1])
domain.state()
domain.XMLDesc(0)
domain.create()
domain.state()
conn.close()
"""
LIBVIRT_STOP = """
import libvirt, sys, time
conn = libvirt.open("qemu:///system")
domain = conn.lookupByName(sys.argv[1])
down = (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_CRASHED)
domain.state()
domain.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
end = time.monotonic() + float(sys.argv[2])
while domain.state()[0] not in down:
    left = end - time.monotonic()
    if left <= 0:
        domain.destroy()
        while domain.state()[0] != libvirt.VIR_DOMAIN_SHUTOFF:
            time.sleep(0.2)
        break
    time.sleep(min(0.2, left))
conn.close()
"""


def guest_running(guest: str) -> bool:
    out = subprocess.run(
        ["virsh", "-q", "-c", "qemu:///system", "domstate", guest],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return out.strip() == "running"


def guest_round(
    label: str, argv: list[str], opener: list[str], closer: list[str], guest: str
) -> float:
    """Time one guest start or stop with its volume open; leave the guest off and the volume
    closed, as every other round finds them."""
    starting = label.startswith("guest start")
    subprocess.run(opener, check=True, capture_output=True)
    if not starting:
        subprocess.run([sys.executable, "-c", LIBVIRT_START, guest], check=True)
    ms = timed(argv)
    if guest_running(guest) != starting:
        raise SystemExit(f"{label}: {argv[0]} left {guest} in the wrong state")
    if starting:
        subprocess.run(["virsh", "-q", "-c", "qemu:///system", "destroy", guest], check=True,
                       capture_output=True)  # fmt: skip
    subprocess.run(closer, check=True, capture_output=True)
    return ms


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volume", required=True)
    parser.add_argument("--device", required=True, help="the volume's LUKS device")
    parser.add_argument("--key", required=True, help="the volume's keyfile")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--guest", help="also time guest start/stop of this guest of VOLUME")
    parser.add_argument("--wait", type=float, default=1.0, help="its stop_timeout, in seconds")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    installed = shutil.which("luksvm")
    luksvm = [installed] if installed else [sys.executable, "-m", "luksvm"]
    attach = next(p for p in SYSTEMD_CRYPTSETUP if os.path.exists(p))
    name, device, key = args.volume, args.device, args.key
    pairs = {
        "unlock: luksvm vs systemd-cryptsetup attach": (
            [*luksvm, "unlock", "--no-start", "--", name],
            [attach, "attach", name, device, key, "luks,headless=true,tries=1"],
        ),
        "unlock: luksvm vs cryptsetup open": (
            [*luksvm, "unlock", "--no-start", "--", name],
            ["cryptsetup", "open", "--type", "luks", "--key-file", key, device, name],
        ),
        "lock: luksvm vs cryptsetup close": (
            [*luksvm, "lock", "--from-unit", "--", name],
            ["cryptsetup", "close", name],
        ),
        **(
            {
                "guest start: luksvm vs libvirt-python": (
                    [*luksvm, "guest", "start", "--", args.guest],
                    [sys.executable, "-c", LIBVIRT_START, args.guest],
                ),
                "guest stop: luksvm vs libvirt-python": (
                    [*luksvm, "guest", "stop", "--", args.guest],
                    [sys.executable, "-c", LIBVIRT_STOP, args.guest, str(args.wait)],
                ),
            }
            if args.guest
            else {}
        ),
        # for scale: what starting the interpreter alone costs on this machine
        "python3 -c pass vs true": ([sys.executable, "-c", "pass"], ["true"]),
    }
    samples: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in pairs}
    guest = args.guest or ""
    opener = [attach, "attach", name, device, key, "luks,headless=true,tries=1"]
    closer = ["cryptsetup", "close", name]
    for round_ in range(args.rounds):
        for label, (ours, bare) in pairs.items():
            # alternate which side goes first, so caches favour neither
            for side in (0, 1) if round_ % 2 == 0 else (1, 0):
                argv = (ours, bare)[side]
                if label.startswith("lock"):
                    subprocess.run(opener, check=True, capture_output=True)
                    samples[label][side].append(timed(argv))
                elif label.startswith("unlock"):
                    samples[label][side].append(timed(argv))
                    subprocess.run(closer, check=True, capture_output=True)
                elif label.startswith("guest"):
                    samples[label][side].append(guest_round(label, argv, opener, closer, guest))
                else:
                    samples[label][side].append(timed(argv))
    report = {
        label: {
            "luksvm_ms": round(statistics.median(ours), 1),
            "bare_ms": round(statistics.median(bare), 1),
            "overhead_ms": round(statistics.median(ours) - statistics.median(bare), 1),
            "rounds": len(ours),
        }
        for label, (ours, bare) in samples.items()
    }
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
        return 0
    print(f"{'comparison':46}  {'luksvm':>8}  {'bare':>8}  {'overhead':>9}  (median ms)")
    for label, row in report.items():
        print(
            f"{label:46}  {row['luksvm_ms']:8.1f}  {row['bare_ms']:8.1f}  {row['overhead_ms']:9.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
