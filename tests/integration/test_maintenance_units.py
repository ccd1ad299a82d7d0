"""The header-backup and trim units: valid for systemd (`systemd-analyze verify` prints nothing)
and enabled through their timers."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "units"
OURS = [
    "luksvm-header-backup.service",
    "luksvm-header-backup.timer",
    "luksvm-metrics.service",
    "luksvm-metrics.timer",
    "luksvm-trim.service",
    "luksvm-trim.timer",
]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A root where systemd's own units and /usr/bin/luksvm exist, as on an installed host."""
    shutil.copytree("/lib/systemd/system", tmp_path / "usr/lib/systemd/system", symlinks=True)
    (tmp_path / "usr/bin").mkdir(parents=True)
    stub = tmp_path / "usr/bin/luksvm"
    stub.write_text("#!/bin/sh\n")
    stub.chmod(0o755)
    (tmp_path / "etc/systemd/system").mkdir(parents=True)
    return tmp_path


def install(root: Path, name: str, text: str | None = None) -> str:
    target = root / "usr/lib/systemd/system" / name
    target.write_text(text if text is not None else (UNITS / name).read_text())
    return f"/usr/lib/systemd/system/{name}"


def verify(root: Path, *units: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        # --man=no: the man page is checked with the package, not against this host's man db
        ["systemd-analyze", "verify", "--man=no", f"--root={root}", *units],
        capture_output=True,
        text=True,
        check=False,
    )


def test_units_verify_without_a_word(root: Path) -> None:
    paths = [install(root, unit) for unit in OURS]
    result = verify(root, *paths)
    assert (result.returncode, result.stderr, result.stdout) == (0, "", "")


def test_verify_would_catch_a_mistake(root: Path) -> None:
    """The check above can fail: a misspelt directive and a missing binary are both reported."""
    text = (UNITS / "luksvm-header-backup.service").read_text()
    bad = install(root, "bad.service", text.replace("Nice=", "Nicety="))
    assert "Unknown key 'Nicety'" in verify(root, bad).stderr
    (root / "usr/bin/luksvm").unlink()
    good = install(root, "luksvm-header-backup.service")
    assert verify(root, good).returncode != 0


def test_timers_are_weekly_persistent_and_enable_into_timers_target(root: Path) -> None:
    for unit in OURS:
        install(root, unit)
    for timer in ("luksvm-header-backup.timer", "luksvm-trim.timer"):
        text = (UNITS / timer).read_text()
        assert "OnCalendar=weekly\n" in text and "Persistent=true\n" in text
        subprocess.run(["systemctl", f"--root={root}", "enable", timer], check=True)
        link = root / "etc/systemd/system/timers.target.wants" / timer
        assert link.is_symlink()
    for service in ("luksvm-header-backup.service", "luksvm-trim.service"):
        assert "Type=oneshot" in (UNITS / service).read_text()


def test_metrics_timer_enables_and_its_service_writes_the_textfile_collector_file(
    root: Path,
) -> None:
    for unit in OURS:
        install(root, unit)
    subprocess.run(["systemctl", f"--root={root}", "enable", "luksvm-metrics.timer"], check=True)
    assert (root / "etc/systemd/system/timers.target.wants/luksvm-metrics.timer").is_symlink()
    service = (UNITS / "luksvm-metrics.service").read_text()
    assert (
        "ExecStart=/usr/bin/luksvm metrics --textfile "
        "/var/lib/prometheus/node-exporter/luksvm.prom\n" in service
    )
    assert "ConditionPathIsDirectory=/var/lib/prometheus/node-exporter\n" in service
