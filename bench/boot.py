#!/usr/bin/env python3
"""luksvm's boot path against the bare tools, side by side in one run of the e2e VM.

Run from the repository root (as root, after `make deps`; outside `make test`):

    LUKSVM_E2E_TIMEOUT_FACTOR=4 /work/wt/vm-slot .venv/bin/python bench/boot.py --boots 3

It builds the e2e seed host (tests/e2e), then makes it the reference host of issue #18: four
volumes (three keyfiles, one passphrase with noauto) and three guests on them (a fourth guest on the
noauto volume), every guest stop_timeout 3 s. One setup boot, then 2 × --boots boots that alternate
between two modes of the same VM:

  luksvm     luksvm.target enabled (luksvm apply's units), no /etc/crypttab, no libvirt autostart
  baseline   the same volumes in /etc/crypttab, the guests on libvirt's own autostart, luksvm
             not enabled

Every figure comes from systemd's own timestamps: the journal's monotonic stamps (µs since the
kernel started) and the units' Inactive/Active Enter/Exit timestamps (systemctl show):

  multi-user       kernel start → "Reached target multi-user.target"
  guests running   kernel start → the last of the three guests' machine scopes started
  shutdown         logind's "will power off now" → the boot's last journal entry (next boot's),
                   also from logind's "System is powering down" (after its wait for delay
                   inhibitor locks: libvirtd's, in both modes),
                   against the slowest guest unit stop + the lock stop jobs + 2 s
  unlock unit      luksvm-unlock@cr_spare start (InactiveExit → ActiveEnter) against a transient
                   unit running `systemd-cryptsetup attach` of the same volume and key
  guest start/stop luksvm-guest@spare start and stop against transient units running the same
                   libvirt-python calls as luksvm's, in a fresh process (start: state, XML,
                   create(), state; stop: state, ACPI shutdown, state every 0.2 s, destroy());
                   the start also against create() alone (shown, not the goal's measure)

Medians over the boots (and --rounds unit rounds a luksvm boot, each side first in turn); the
`systemd-analyze critical-chain` of the last boot of each mode is printed with the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.unlock import LIBVIRT_START, LIBVIRT_STOP  # noqa: E402
from tests.e2e import settings  # noqa: E402
from tests.e2e.image import ensure_image  # noqa: E402
from tests.e2e.journal import Journal  # noqa: E402
from tests.e2e.project import build_wheel  # noqa: E402
from tests.e2e.seed import SeedHost  # noqa: E402
from tests.e2e.vm import BootResult, Machine  # noqa: E402

GUESTS = ("mail", "web", "spare")  # started at boot; "pass" waits for its noauto volume
STOP_TIMEOUT = 3.0

SETUP = r"""
fast_kdf=(--type luks2 --pbkdf pbkdf2 --pbkdf-force-iterations 1000)
keys=/etc/luksvm/keys
step lvs sh -c 'lvcreate -q -y -n lvspare_hd0 -L 32m volgrp4 &&
    lvcreate -q -y -n lvpass_hd0 -L 32m volgrp4'
head -c 64 /dev/urandom > $keys/spare.key
chmod 0400 $keys/spare.key
step format-spare cryptsetup luksFormat -q "${fast_kdf[@]}" --key-file $keys/spare.key \
    /dev/volgrp4/lvspare_hd0
head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' > /root/pass.txt
step format-pass cryptsetup luksFormat -q "${fast_kdf[@]}" --key-file /root/pass.txt \
    /dev/volgrp4/lvpass_hd0
spare_uuid=$(cryptsetup luksUUID /dev/volgrp4/lvspare_hd0)
define_guest spare "$(block_disk cr_spare)"
define_guest pass "$(block_disk cr_pass)"

install -d -m 0755 /etc/luksvm/crypttab.d /etc/luksvm-bench
cat > /etc/luksvm/crypttab.d/10-ref.conf <<CONF
cr_imap_encr /dev/volgrp4/lvimap_hd0 $keys/imap.key luks,discard,x-luksvm.guest=mail
cr_web       /dev/volgrp4/lvweb_hd0  $keys/web.key  luks,discard,x-luksvm.guest=web
cr_spare     UUID=$spare_uuid        $keys/spare.key luks,x-luksvm.guest=spare
cr_pass      /dev/volgrp4/lvpass_hd0 -              luks,noauto,x-luksvm.guest=pass
CONF
# the baseline: the same volumes as systemd's generator would have them
cat > /etc/luksvm-bench/crypttab <<CONF
cr_imap_encr /dev/volgrp4/lvimap_hd0 $keys/imap.key luks,discard
cr_web       /dev/volgrp4/lvweb_hd0  $keys/web.key  luks,discard
cr_spare     UUID=$spare_uuid        $keys/spare.key luks
cr_pass      /dev/volgrp4/lvpass_hd0 none           luks,noauto
CONF
cat > /etc/luksvm/luksvm.conf <<CONF
[guests]
stop_timeout = 3s
CONF
step apply luksvm apply --take-over
step enable systemctl enable luksvm.target
step libvirt-guests-off systemctl disable libvirt-guests.service
readlink /etc/systemd/system/multi-user.target.wants/luksvm.target > /etc/luksvm-bench/target-link
"""

# Switch the mode for the next boot without a daemon-reload: this boot's shutdown stays as it is.
SWITCH = r"""
mode=$(cat "$E2E_IN/next-mode")
wants=/etc/systemd/system/multi-user.target.wants/luksvm.target
if [ "$mode" = luksvm ]; then
    rm -f /etc/crypttab
    ln -sfn "$(cat /etc/luksvm-bench/target-link)" $wants
    for g in mail web spare; do virsh -q -c qemu:///system autostart --disable $g; done
else
    cp /etc/luksvm-bench/crypttab /etc/crypttab
    rm -f $wants
    for g in mail web spare; do virsh -q -c qemu:///system autostart $g; done
fi
"""

MEASURE = r"""
mode=$(cat "$E2E_IN/mode")
uri=qemu:///system
running() { virsh -q -c $uri list --state-running --name | sed '/^$/d' | sort; }
wait_until 600 sh -c "[ \$(virsh -q -c $uri list --state-running --name | grep -c .) -ge 3 ]"
running | tr '\n' ' ' > running
systemd-analyze > analyze.txt 2>&1 || true
systemd-analyze critical-chain multi-user.target > chain-multi-user.txt 2>&1 || true
if [ "$mode" = luksvm ]; then
    systemd-analyze critical-chain luksvm.target > chain-guests.txt 2>&1 || true
else
    systemd-analyze critical-chain libvirtd.service > chain-guests.txt 2>&1 || true
fi
[ "$mode" = luksvm ] || exit 0

# --- unit activations, this boot: each side first in turn ------------------------------------
attach=$(for p in /usr/bin/systemd-cryptsetup /usr/lib/systemd/systemd-cryptsetup \
    /lib/systemd/systemd-cryptsetup; do [ -x $p ] && echo $p && break; done)
dev=/dev/disk/by-uuid/$(cryptsetup luksUUID /dev/volgrp4/lvspare_hd0)
key=/etc/luksvm/keys/spare.key
span() {  # UNIT FROM TO: microseconds between two of its timestamps
    local a b
    a=$(systemctl show -p "$2" --value "$1")
    b=$(systemctl show -p "$3" --value "$1")
    echo $((b - a))
}
started() { span "$1" InactiveExitTimestampMonotonic ActiveEnterTimestampMonotonic; }
stopped() { span "$1" ActiveExitTimestampMonotonic InactiveEnterTimestampMonotonic; }
cat > /root/start.py <<'PY'
@LIBVIRT_START@
PY
# create() alone: what a start needs at the least (the figure before the goal's own measure)
cat > /root/create.py <<'PY'
import libvirt, sys
libvirt.open("qemu:///system").lookupByName(sys.argv[1]).create()
PY
cat > /root/stop.py <<'PY'
@LIBVIRT_STOP@
PY
U=luksvm-unlock@cr_spare.service G=luksvm-guest@spare.service
step stop-spare systemctl stop $G $U
luksvm_unlock() {
    systemctl start $U
    echo "unlock luksvm $(started $U)"
    systemctl start $G
    echo "start luksvm $(started $G)"
    systemctl stop $G
    echo "stop luksvm $(stopped $G)"
    systemctl stop $U
}
bare_unlock() {
    local n=$1
    systemd-run -q --unit=bench-attach-$n -p Type=oneshot -p RemainAfterExit=yes \
        $attach attach cr_spare $dev $key luks,headless=true,tries=1
    echo "unlock bare $(started bench-attach-$n.service)"
    systemd-run -q --unit=bench-start-$n -p Type=oneshot -p RemainAfterExit=yes \
        /usr/bin/python3 /root/start.py spare
    echo "start bare $(started bench-start-$n.service)"
    systemd-run -q --unit=bench-stop-$n -p Type=oneshot -p RemainAfterExit=yes \
        /usr/bin/python3 /root/stop.py spare 3
    echo "stop bare $(started bench-stop-$n.service)"
    systemd-run -q --unit=bench-create-$n -p Type=oneshot -p RemainAfterExit=yes \
        /usr/bin/python3 /root/create.py spare
    echo "start create $(started bench-create-$n.service)"
    virsh -q destroy spare > /dev/null
    systemctl stop bench-attach-$n.service bench-start-$n.service bench-stop-$n.service \
        bench-create-$n.service
    cryptsetup close cr_spare
}
for n in $(seq 1 "$(cat "$E2E_IN/rounds")"); do
    if [ $((n % 2)) = 1 ]; then luksvm_unlock; bare_unlock $n
    else bare_unlock $n; luksvm_unlock; fi
done > units.txt
# the reference host again for the shutdown
step restore systemctl start $G
"""
# the bare side runs the libvirt calls bench/unlock.py times (one text for both benches)
MEASURE = MEASURE.replace("@LIBVIRT_START@", LIBVIRT_START.strip()).replace(
    "@LIBVIRT_STOP@", LIBVIRT_STOP.strip()
)


def median(values: list[float]) -> float:
    return round(statistics.median(values), 3) if values else float("nan")


def scope_started(journal: Journal, boot: str, guest: str) -> float | None:
    scope = re.compile(r"machine-qemu\\x2d\d+\\x2d" + re.escape(guest) + r"\.scope")
    for entry in journal.find(boot=boot):
        if scope.fullmatch(entry.about):
            return entry.monotonic / 1e6
    return None


def boot_figures(journal: Journal, result: BootResult) -> dict[str, Any]:
    boot = result.boot_id or ""
    reached = journal.job("multi-user.target", boot=boot).monotonic / 1e6
    scopes = [scope_started(journal, boot, g) for g in GUESTS]
    return {
        "multi_user_s": round(reached, 3),
        "guests_running_s": round(max(s for s in scopes if s is not None), 3)
        if all(s is not None for s in scopes)
        else None,
    }


def shutdown_figures(journal: Journal, boot: str, mode: str) -> dict[str, Any]:
    """The shutdown of `boot`, from a later journal."""
    # logind's word for the poweroff request (the runner first dumps the journal: not counted)
    end = journal.first(r"The system will power off now", boot=boot)
    after = [e for e in journal.find(boot=boot) if e.monotonic >= end.monotonic]
    # logind first waits for delay inhibitor locks: libvirtd holds one while any VM runs (both
    # modes; up to InhibitDelayMaxSec, 5 s) and no stop job starts before it ends
    down = journal.first(r"System is powering down", boot=boot)
    figures: dict[str, Any] = {
        "shutdown_s": round((after[-1].monotonic - end.monotonic) / 1e6, 3),
        "inhibit_delay_s": round((down.monotonic - end.monotonic) / 1e6, 3),
        "shutdown_after_delay_s": round((after[-1].monotonic - down.monotonic) / 1e6, 3),
    }
    if mode != "luksvm":
        return figures
    stops = []
    for guest in GUESTS:
        unit = f"luksvm-guest@{guest}.service"
        began = journal.job_began(unit, "stop", boot=boot).monotonic
        done = journal.job(unit, "stop", boot=boot).monotonic
        stops.append((began, done))
    locks = []
    for volume in ("cr_imap_encr", "cr_web", "cr_spare"):
        unit = f"luksvm-unlock@{volume}.service"
        locks.append(
            (
                journal.job_began(unit, "stop", boot=boot).monotonic,
                journal.job(unit, "stop", boot=boot).monotonic,
            )
        )
    slowest = max(b - a for a, b in stops) / 1e6
    # luksvm-shutdown-watch: when it heard logind's announcement, when the first stop job began
    heard = journal.first(r"logind announced a shutdown", boot=boot)
    figures.update(
        watch_heard_s=round((heard.monotonic - end.monotonic) / 1e6, 3),
        first_stop_job_s=round((min(a for a, _ in stops) - end.monotonic) / 1e6, 3),
    )
    lock_span = (max(b for _, b in locks) - min(a for a, _ in locks)) / 1e6
    figures.update(
        slowest_guest_stop_s=round(slowest, 3),
        locks_s=round(lock_span, 3),
        shutdown_goal_s=round(slowest + lock_span + 2, 3),
    )
    return figures


def unit_rounds(text: str) -> dict[str, dict[str, list[float]]]:
    out: dict[str, dict[str, list[float]]] = {}
    for line in text.splitlines():
        what, side, usec = line.split()
        out.setdefault(what, {}).setdefault(side, []).append(int(usec) / 1000)
    return out


def kept_boots(workdir: Path) -> tuple[list[tuple[str, BootResult]], Journal]:
    """The measured boots of a kept --workdir (boot 2 is the first luksvm boot, then they
    alternate), and the newest journal among them (a boot's shutdown is in the next one's)."""
    results = []
    host = workdir / "host"
    index = 2
    while (host / f"boot-{index}" / "rc").exists():
        bdir = host / f"boot-{index}"
        boot_id = (bdir / "boot_id").read_text().strip().replace("-", "")
        result = BootResult("bench", index, bdir, "", 0, boot_id, 0.0, None)
        results.append(("luksvm" if index % 2 == 0 else "baseline", result))
        index += 1
    if not results:
        raise SystemExit(f"{workdir}: no measured boot kept")
    # read back after the last boot (main's read_journal): it holds the last shutdown too
    offline = host / "journal-offline.json"
    return results, Journal.load(
        offline if offline.exists() else results[-1][1].dir / "journal.json"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boots", type=int, default=3, help="boots of each mode (default 3)")
    parser.add_argument("--rounds", type=int, default=2, help="unit rounds a luksvm boot")
    parser.add_argument("--workdir", type=Path, help="keep the VM and its logs here")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--report", type=Path, help="only report on the boots of a kept WORKDIR")
    args = parser.parse_args()
    if args.report:
        return report(*kept_boots(args.report), args.json)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="luksvm-bench-boot-"))
    image, _ = ensure_image(settings.cache_dir())
    wheel = build_wheel(workdir / "wheel")
    seed = SeedHost.build(image, wheel, workdir / "seed")
    machine: Machine = seed.clone(workdir / "host", name="bench")
    try:
        machine.boot(SETUP, timeout=900)
        modes = ["luksvm", "baseline"] * args.boots
        results: list[tuple[str, BootResult]] = []
        for index, mode in enumerate(modes):
            next_mode = modes[index + 1] if index + 1 < len(modes) else "luksvm"
            files = {"mode": mode, "next-mode": next_mode, "rounds": str(args.rounds)}
            # the switch first (files and flags only, read at the next boot): MEASURE may end early
            result = machine.boot(SWITCH + MEASURE, files=files, timeout=1200)
            results.append((mode, result))
        journal = machine.read_journal()  # every boot, the last one's shutdown included
        return report(results, journal, args.json)
    finally:
        if args.workdir is None:
            machine.discard()
        seed.machine.discard()


def report(results: list[tuple[str, BootResult]], journal: Journal, out: Path | None) -> int:
    per_mode: dict[str, list[dict[str, Any]]] = {"luksvm": [], "baseline": []}
    units: dict[str, dict[str, list[float]]] = {}
    for mode, result in results:
        figures = boot_figures(journal, result)
        # the newest boot's shutdown is not in a --report journal
        with contextlib.suppress(AssertionError):
            figures.update(shutdown_figures(journal, result.boot_id or "", mode))
        per_mode[mode].append(figures)
        if mode == "luksvm":
            for what, sides in unit_rounds(result.text("units.txt")).items():
                for side, values in sides.items():
                    units.setdefault(what, {}).setdefault(side, []).extend(values)

    def med(mode: str, key: str) -> float:
        return median([f[key] for f in per_mode[mode] if f.get(key) is not None])

    rows: list[tuple[str, float, float, float, float | None]] = []
    for what in (w for w in ("unlock", "start", "stop") if w in units):
        ours, bare = median(units[what]["luksvm"]), median(units[what]["bare"])
        rows.append((f"{what} (unit, ms)", ours, bare, round(ours / bare, 2), 1.15))
        if "create" in units[what]:  # for comparison: not the goal's measure
            alone = median(units[what]["create"])
            rows.append(
                ("  against create() alone (ms)", ours, alone, round(ours / alone, 2), None)
            )
    for key, label in (("multi_user_s", "multi-user.target (s)"),
                       ("guests_running_s", "every guest running (s)")):  # fmt: skip
        ours, bare = med("luksvm", key), med("baseline", key)
        rows.append((label, ours, bare, round(ours - bare, 3), 1.0))
    shutdown, goal = med("luksvm", "shutdown_s"), med("luksvm", "shutdown_goal_s")
    rows.append(
        ("shutdown vs slowest stop+locks+2 s (s)", shutdown, goal, round(shutdown - goal, 3), 0.0)
    )
    after_delay = med("luksvm", "shutdown_after_delay_s")
    rows.append(
        (
            "  the same after logind's delay (s)",
            after_delay,
            goal,
            round(after_delay - goal, 3),
            0.0,
        )
    )
    for mode in ("luksvm", "baseline"):
        print(
            f"logind's wait for libvirtd's delay lock, {mode} (s): {med(mode, 'inhibit_delay_s')}"
        )
    print(f"{'goal':40} {'luksvm':>9} {'bare':>9} {'ratio/diff':>10}  met")
    for label, ours, bare, diff, limit in rows:
        met = "-" if limit is None else "yes" if diff <= limit else "NO"
        print(f"{label:40} {ours:9.3f} {bare:9.3f} {diff:10.3f}  {met}")
    print("\nper boot:", json.dumps(per_mode, indent=1))
    print("unit samples (ms):", json.dumps(units))
    for mode in ("luksvm", "baseline"):
        kept = [r for m, r in results if m == mode]
        if not kept:
            continue
        last = kept[-1]
        for name in ("analyze.txt", "chain-multi-user.txt", "chain-guests.txt"):
            print(f"\n--- {mode}: {name} ---\n{last.text(name)}")
    if out:
        out.write_text(
            json.dumps({"per_boot": per_mode, "units_ms": units, "rows": rows}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
