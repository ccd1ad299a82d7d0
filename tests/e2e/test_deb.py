"""luksvm installed from its Debian package in the VM (instead of pip): install, remove, and
install a newer revision while luksvm's units hold a volume open and a guest running. One boot of a
seed clone. The packages are `make deb` builds of the working tree (two Debian revisions)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from luksvm import __version__

from . import settings
from .project import REPO
from .vm import BootResult, Machine, scenario

pytestmark = pytest.mark.e2e

TIMERS = ("luksvm-header-backup.timer", "luksvm-metrics.timer", "luksvm-trim.timer")
INSTANCES = ("luksvm-unlock@cr_web.service", "luksvm-guest@web.service")


@pytest.fixture(scope="module")
def debs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """luksvm_VERSION-1_all.deb and a newer luksvm_VERSION-2_all.deb."""
    dist = tmp_path_factory.mktemp("debs")
    built = {}
    for release in ("1", "2"):
        proc = subprocess.run(
            [str(REPO / "packaging/build-deb"), str(dist), release],
            capture_output=True,
            text=True,
            check=False,
            timeout=settings.scaled(600),
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        name = f"luksvm_{__version__}-{release}_all.deb"
        built[name] = dist / name
    return built


def states(result: BootResult, label: str) -> dict[str, tuple[str, ...]]:
    """state-LABEL: a unit → (enablement, active state, invocation ID); "volume", "guest",
    "package", "command", "conf" → (their value,)."""
    rows = [line.split("\t") for line in result.text(f"state-{label}").splitlines()]
    return {row[0]: tuple(row[1:]) for row in rows}


def test_package_installs_upgrades_and_removes_without_touching_units(
    host: Machine, debs: dict[str, Path]
) -> None:
    result = host.boot(scenario("deb.sh"), files=dict(debs))
    old, new = f"{__version__}-1", f"{__version__}-2"
    before = states(result, "before")
    assert before["package"] == ("absent",) and before["command"] == ("absent",)

    # First installation: the timers and the target enabled (by preset), nothing started.
    installed = states(result, "installed")
    assert installed["package"] == (f"ii {old}",)
    assert installed["command"] == ("/usr/bin/luksvm",)
    for unit in ("luksvm.target", *TIMERS, *INSTANCES):
        assert installed[unit][1] == "inactive", unit
    for unit in ("luksvm.target", *TIMERS):
        assert installed[unit][0] == "enabled", unit
    assert (installed["volume"], installed["guest"]) == (("closed",), ("shut off",))
    assert result.text("version.txt").strip() == f"luksvm {__version__}"
    assert result.text("module.txt").strip() == "/usr/lib/python3/dist-packages/luksvm/__init__.py"

    running = states(result, "running")
    assert (running["volume"], running["guest"]) == (("open",), ("running",))
    invocations = {unit: running[unit][2] for unit in ("luksvm.target", *INSTANCES)}
    for unit, invocation in invocations.items():
        assert running[unit][1] == "active" and invocation, unit

    # Removal, then the newer revision: the same invocations (nothing stopped, started or
    # restarted), the volume open, the guest running, the edited luksvm.conf kept, the timers
    # not started.
    expected = {"removed": f"rc {old}", "upgraded": f"ii {new}"}
    after = {label: states(result, label) for label in expected}
    for label, now in after.items():
        assert now["package"] == (expected[label],), label
        for unit, invocation in invocations.items():
            assert now[unit][1:] == ("active", invocation), (label, unit, now[unit])
        assert (now["volume"], now["guest"]) == (("open",), ("running",)), label
        assert now["conf"] == running["conf"] != ("",), label
        for timer in TIMERS:
            assert now[timer][1] == "inactive", (label, timer)
    assert after["removed"]["command"] == ("absent",)
    for unit in ("luksvm.target", *TIMERS):
        # removal disables the target and the timers (the target keeps running); installing
        # again enables them as a first installation does
        assert after["removed"][unit][0] != "enabled", unit
        assert after["upgraded"][unit][0] == "enabled", unit

    # The units work from the newer package: stopping them stops the guest and locks.
    stopped = states(result, "stopped")
    assert (stopped["volume"], stopped["guest"]) == (("closed",), ("shut off",))
