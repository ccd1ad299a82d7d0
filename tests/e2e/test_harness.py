"""The harness itself: failures are loud and readable, hangs are bounded, state survives reboots."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from . import seed, settings, vm
from .image import Image
from .project import REPO
from .seed import SeedHost
from .selftest.broken_scenario import MARKER
from .vm import BootFailed, Machine

pytestmark = pytest.mark.e2e

FAKE_QEMU = """#!/bin/bash
# Stands in for QEMU: writes console lines, then never exits by itself ($FAKE_MODE: hang, panic,
# lockup: a vCPU reported stuck for longer and longer, short-lockup: stuck once for 45 s, frozen:
# two heartbeats, then none, final-hang: the heartbeat's last line as systemd-shutdown ends it,
# then a hang). The first -serial is the console, the second the heartbeat.
serials=()
while [ $# -gt 0 ]; do
    case $1 in -serial) serials+=("${2#file:}"); shift ;; esac
    shift
done
console=${serials[0]} heartbeat=${serials[1]}
if [ "$FAKE_MODE" = frozen ]; then
    printf 'E2E-ALIVE uptime=1.00\nE2E-ALIVE uptime=6.00\n' >> "$heartbeat"
elif [ "$FAKE_MODE" = final-hang ]; then
    printf 'E2E-ALIVE uptime=1.00\nE2E-ALIVE-END uptime=1.00\n' >> "$heartbeat"
else
    # a heartbeat until this process (exec'd into sleep below) is stopped
    me=$$
    while kill -0 "$me" 2> /dev/null; do
        echo "E2E-ALIVE uptime=$SECONDS" >> "$heartbeat"
        sleep 0.2
    done &
fi
for i in $(seq 1 50); do echo "fake boot line $i" >> "$console"; done
if [ "$FAKE_MODE" = panic ]; then
    echo "Kernel panic - not syncing: VFS: Unable to mount root fs" >> "$console"
fi
case $FAKE_MODE in lockup | short-lockup)
    echo "watchdog: BUG: soft lockup - CPU#0 stuck for 45s! [qemu-system-x86:515]" >> "$console" ;;
esac
if [ "$FAKE_MODE" = lockup ]; then
    sleep 0.5
    echo "watchdog: BUG: soft lockup - CPU#0 stuck for 131s! [qemu-system-x86:515]" >> "$console"
fi
exec sleep 600
"""


@pytest.fixture
def fake_machine(tmp_path: Path) -> Machine:
    image_dir = tmp_path / "image"
    image_dir.mkdir()
    with open(image_dir / "root.img", "wb") as root:
        root.truncate(1024 * 1024)
    (image_dir / "vmlinuz").write_text("")
    (image_dir / "initrd.img").write_text("")
    qemu = tmp_path / "fake-qemu"
    qemu.write_text(FAKE_QEMU)
    qemu.chmod(0o755)
    machine = Machine.fresh(Image(image_dir, "fake"), tmp_path / "vm", name="fake")
    machine.qemu = str(qemu)
    return machine


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("hang", "no scenario result within"),
        ("panic", "the console shows 'Kernel panic - not syncing'"),
        ("lockup", "the console shows 'watchdog: BUG: soft lockup - CPU#0 stuck for 131s'"),
        ("short-lockup", "no scenario result within"),  # a busy host: not yet a hang
        ("frozen", "the VM froze: no heartbeat on ttyS1 for"),
        ("final-hang", "no scenario result within"),  # a shutdown that hangs is no freeze
    ],
)
def test_hung_panicked_or_frozen_vm_is_stopped_with_console_tail(
    fake_machine: Machine, monkeypatch: pytest.MonkeyPatch, mode: str, reason: str
) -> None:
    monkeypatch.setenv("FAKE_MODE", mode)
    # 1.5 s without a heartbeat is a freeze here: shorter than the timeout of the modes whose
    # heartbeat goes on or has ended (they must not count as frozen), much shorter than the frozen
    # mode's
    monkeypatch.setattr(vm, "FROZEN_SECONDS", 1.5)
    timeout = 20 if mode == "frozen" else 3
    started = time.monotonic()
    with pytest.raises(BootFailed) as failure:
        fake_machine.boot("true\n", timeout=timeout)
    assert time.monotonic() - started < settings.scaled(timeout) + 10
    if mode == "frozen":  # each of the two boots was stopped long before its timeout
        assert failure.value.result.seconds < settings.scaled(timeout) / 2
        assert "(the last at uptime 6.00 s)" in str(failure.value)
    message = str(failure.value)
    assert reason in message
    assert "fake boot line 50" in message
    assert "fake boot line 10\n" not in message  # only the last 40 lines
    assert failure.value.result.rc is None
    assert failure.value.result.hung == (mode == "lockup")
    assert failure.value.result.panicked == (mode == "panic")
    assert failure.value.result.frozen == (mode == "frozen")
    # a hung, panicked or frozen boot, and only that, ran once more from the disks as they were
    # before it
    broken = {p.name for p in fake_machine.workdir.glob("boot-1-*") if (p / "console.log").exists()}
    expected = {"lockup": "boot-1-hung", "panic": "boot-1-panicked", "frozen": "boot-1-frozen"}
    assert broken == ({expected[mode]} if mode in expected else set())
    assert len(fake_machine.boots) == 1
    snapshots = subprocess.run(
        ["qemu-img", "snapshot", "-l", str(fake_machine.root.path)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "before-boot" not in snapshots.stdout, snapshots.stdout


def test_a_hung_seed_boot_is_built_once_more_then_fails(
    fake_machine: Machine, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FAKE_MODE", "lockup")
    monkeypatch.setattr(
        seed, "SEED_TIMEOUT", 20
    )  # were the lockup missed: fail soon, not in 40 min
    fresh = Machine.fresh.__func__  # type: ignore[attr-defined]

    def fresh_fake(cls: type[Machine], *args: Any, **kwargs: Any) -> Machine:
        machine: Machine = fresh(cls, *args, **kwargs)
        machine.qemu = fake_machine.qemu
        return machine

    monkeypatch.setattr(Machine, "fresh", classmethod(fresh_fake))
    wheel = tmp_path / "luksvm-0-py3-none-any.whl"
    wheel.write_bytes(b"")
    with pytest.raises(BootFailed) as failure:
        SeedHost.build(fake_machine.image, wheel, tmp_path / "seed")
    assert failure.value.result.hung
    consoles = {str(p.relative_to(tmp_path)) for p in tmp_path.glob("seed*/boot-*/console.log")}
    assert consoles == {"seed/boot-1/console.log", "seed-again/boot-1/console.log"}
    assert not (tmp_path / "seed" / "root.qcow2").exists(), "the hung seed's disks were kept"


def test_failed_boot_reports_console(machine: Machine) -> None:
    # The initramfs cannot mount the root disk, gives up, and the VM stops.
    with pytest.raises(BootFailed) as failure:
        machine.boot("true\n", kernel_args="rootfstype=nosuchfs")
    message = str(failure.value)
    assert "without a scenario result" in message
    assert "Failed to mount /dev/disk/by-id/virtio-root as root file system" in message


def test_failing_scenario_turns_the_run_red(e2e_image: Image, tmp_path: Path) -> None:
    """A separate pytest run of selftest/broken_scenario.py must fail, and say why."""
    broken = Path(__file__).parent / "selftest" / "broken_scenario.py"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--basetemp={tmp_path / 'inner'}",
            str(broken),
        ],
        cwd=REPO,
        check=False,
        env={**os.environ, "LUKSVM_E2E_SELFTEST": "1"},
        capture_output=True,
        text=True,
        timeout=settings.scaled(900),
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output
    assert "1 failed" in output, output
    assert "the scenario exited with rc=1" in output, output
    assert "serial console, last 40 lines" in output, output
    assert MARKER in output, output
    assert "E2E-RC: 1" in output, output
