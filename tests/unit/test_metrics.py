"""luksvm metrics: families from each source, the text format, a source down, the last shutdown."""

from __future__ import annotations

import json
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from luksvm import __version__, metrics
from luksvm.cli import main
from luksvm.config import Config
from luksvm.doctor import FAIL, OK, SKIP, WARN, Finding, Report
from luksvm.errors import LuksvmError
from luksvm.metrics import Entry, Sources
from tests.conftest import write_config

CRYPTTAB = (
    "cr_a /dev/x - luks,x-luksvm.guest=mail\n"
    "cr_b /dev/y - luks,noauto,x-luksvm.guest=web\n"
    "cr_c /dev/z - luks\n"
)


def status(cfg: Config) -> Mapping[str, Any]:
    return {
        "volumes": [
            {"name": "cr_a", "state": "unlocked", "device_present": True},
            {"name": "cr_b", "state": "locked", "device_present": False},
            {"name": "cr_c", "state": "locked", "device_present": True},
        ],
        "guests": [
            {"name": "mail", "state": "running", "may_start": True},
            {"name": "web", "state": "shut off", "may_start": False},
        ],
    }


def report(root: str) -> Report:
    findings = (
        Finding(OK, "cr_a", "x", check="keys"),
        Finding(WARN, "cr_a", "y", check="keys"),
        Finding(SKIP, 'we"ird\\', "z", check="keys"),
        Finding(FAIL, "host", "bad", check="units"),
    )
    return Report((), findings, 0.25, 1700000000.0)


BOOT_1, BOOT_2, BOOT_3 = "1" * 32, "2" * 32, "3" * 32


def entry(message: str, boot: str, at: float, priority: int = 6, **fields: str) -> Entry:
    return Entry(message, boot, at, priority, {f"LUKSVM_{k.upper()}": v for k, v in fields.items()})


JOURNAL = [
    # an older shutdown: must not show
    entry("guest-stopped", BOOT_1, 100.0, guest="mail", stop_action="destroyed", stop_seconds="9"),
    entry("guest-trimmed", BOOT_1, 150.0, guest="mail"),
    entry("header-backup-failed", BOOT_2, 160.0, 3, volume="cr_a"),  # an earlier boot's failure
    entry("guest-stopped", BOOT_2, 200.0, guest="mail", stop_action="shutdown", stop_seconds="4.5"),
    entry("guest-timeout", BOOT_2, 210.0, 4, guest="web"),  # the warning, no action yet
    entry("guest-stopped", BOOT_2, 220.0, guest="web", stop_action="destroyed", stop_seconds="70"),
    entry("guest-trimmed", BOOT_3, 300.0, guest="mail"),
    entry("header-backup-failed", BOOT_3, 310.0, 3, volume="cr_a"),
    entry("header-backup-failed", BOOT_3, 320.0, 3, volume="cr_a"),
]


def sources(**changes: Any) -> Sources:
    base = {
        "status": status,
        "libvirt_up": lambda uri: True,
        "doctor": report,
        "journal": lambda root: list(JOURNAL),
    }
    base.update(changes)
    return Sources(**base)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return write_config(tmp_path / "root", {"10.conf": CRYPTTAB})


def samples(text: str) -> dict[str, float]:
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def test_state_of_volumes_and_guests(root: Path) -> None:
    got = samples(metrics.render(metrics.collect(str(root), sources())))
    assert got['luksvm_volume_unlocked{volume="cr_a"}'] == 1
    assert got['luksvm_volume_unlocked{volume="cr_b"}'] == 0
    assert got['luksvm_volume_device_present{volume="cr_b"}'] == 0
    assert got['luksvm_volume_device_present{volume="cr_c"}'] == 1
    # mail starts at boot; web's volume is noauto, so boot does not start web
    assert got['luksvm_volume_needed{volume="cr_a"}'] == 1
    assert got['luksvm_volume_needed{volume="cr_b"}'] == 0
    assert got['luksvm_volume_needed{volume="cr_c"}'] == 0
    assert got['luksvm_guest_running{guest="mail"}'] == 1
    assert got['luksvm_guest_running{guest="web"}'] == 0
    assert got['luksvm_guest_may_start{guest="web"}'] == 0
    assert got['luksvm_guest_boot_start{guest="mail"}'] == 1
    assert got['luksvm_guest_boot_start{guest="web"}'] == 0
    assert got["luksvm_libvirt_up"] == 1
    assert got["luksvm_config_problems"] == 0


def test_doctor_status_is_the_worst_per_check_and_subject(root: Path) -> None:
    text = metrics.render(metrics.collect(str(root), sources()))
    got = samples(text)
    assert got['luksvm_doctor_status{check="keys",subject="cr_a"}'] == 1
    assert got['luksvm_doctor_status{check="keys",subject="we\\"ird\\\\"}'] == -1
    assert got['luksvm_doctor_status{check="units",subject="host"}'] == 2
    assert text.count("luksvm_doctor_status{") == 3
    assert got["luksvm_doctor_duration_seconds"] == 0.25


def test_journal_gives_trims_backup_failures_of_this_boot_and_the_last_shutdown(
    root: Path,
) -> None:
    got = samples(metrics.render(metrics.collect(str(root), sources())))
    assert got['luksvm_trim_last_success_timestamp_seconds{guest="mail"}'] == 300.0
    assert got['luksvm_header_backup_failures_total{volume="cr_a"}'] == 2
    assert got['luksvm_header_backup_failures_total{volume="cr_b"}'] == 0
    # boot 3 runs (the newest entry's boot under --root); boot 2's shutdown is the last one
    assert got["luksvm_last_shutdown_timestamp_seconds"] == 220.0
    assert got['luksvm_last_shutdown_guest_stop_seconds{guest="mail"}'] == 4.5
    assert got['luksvm_last_shutdown_guest_stop_seconds{guest="web"}'] == 70
    assert got['luksvm_last_shutdown_guest_action{action="destroyed",guest="web"}'] == 1
    assert got['luksvm_last_shutdown_guest_action{action="shutdown",guest="web"}'] == 0
    assert got['luksvm_last_shutdown_guest_action{action="shutdown",guest="mail"}'] == 1
    assert got['luksvm_last_shutdown_guest_action{action="destroyed",guest="mail"}'] == 0
    assert got['luksvm_source_up{source="journal"}'] == 1


def test_a_guest_left_running_at_shutdown_is_an_action() -> None:
    shutdown = metrics.last_shutdown(
        [
            entry("guest-timeout", BOOT_1, 10.0, 3, guest="db", stop_action="left-running"),
            entry(
                "guest-stopped", BOOT_1, 11.0, guest="mail", stop_action="saved", stop_seconds="3"
            ),
        ],
        BOOT_2,
    )
    assert shutdown is not None
    assert shutdown.actions == {"db": "left-running", "mail": "saved"}
    assert shutdown.seconds == {"mail": 3.0}
    assert metrics.last_shutdown(JOURNAL[:1], BOOT_1) is None  # only the running boot stopped


def test_every_source_down_still_gives_the_file(root: Path) -> None:
    def fail(_: object) -> Any:
        raise LuksvmError("down")

    text = metrics.render(
        metrics.collect(
            str(root),
            sources(status=fail, doctor=fail, libvirt_up=lambda uri: False, journal=lambda r: None),
        )
    )
    got = samples(text)
    assert got["luksvm_libvirt_up"] == 0
    assert got['luksvm_source_up{source="status"}'] == 0
    assert got['luksvm_source_up{source="doctor"}'] == 0
    assert got['luksvm_source_up{source="journal"}'] == 0
    assert got['luksvm_source_up{source="header-backups"}'] == 1
    assert "# TYPE luksvm_volume_unlocked gauge" in text
    assert not [k for k in got if k.startswith("luksvm_volume_unlocked")]


def test_text_format_has_one_help_and_type_per_family_and_no_timestamps(root: Path) -> None:
    text = metrics.render(metrics.collect(str(root), sources()))
    lines = text.splitlines()
    helps = [line.split()[2] for line in lines if line.startswith("# HELP ")]
    types = {line.split()[2]: line.split()[3] for line in lines if line.startswith("# TYPE ")}
    assert helps == list(types)
    assert len(helps) == len(set(helps))
    for line in lines:
        if not line.startswith("#"):
            assert line.split("{")[0].split(" ")[0] in types
            series, _, value = line.rpartition(" ")
            float(value)
            assert " " not in series.rsplit("}", 1)[-1], line  # a value, no timestamp
    for name, kind in types.items():
        assert name.endswith("_total") == (kind == "counter"), name
    build = f'luksvm_build_info{{python="{platform.python_version()}",version="{__version__}"}}'
    assert samples(text)[build] == 1


def test_header_backup_timestamp_is_the_newest_backup(root: Path) -> None:
    folder = root / "var/lib/luksvm/header-backups/cr_a"
    folder.mkdir(parents=True)
    uuid = "0a1b2c3d-1111-2222-3333-444455556666"
    (folder / f"20261101T000000.000Z_{uuid}.luksheader").write_bytes(b"x")
    (folder / f"20261102T000000.500Z_{uuid}.luksheader").write_bytes(b"x")
    got = samples(metrics.render(metrics.collect(str(root), sources())))
    assert got['luksvm_header_backup_last_success_timestamp_seconds{volume="cr_a"}'] == 1793577600.5
    assert not [k for k in got if 'last_success_timestamp_seconds{volume="cr_b"}' in k]
    assert got["luksvm_header_backup_max_age_seconds"] == 30 * 86400
    # a later header-backup run found the header unchanged: that run is the last success
    record = {"file_sha256": "", "metadata_bytes": 0, "metadata_sha256": ""}
    newest = folder / f"20261102T000000.500Z_{uuid}.luksheader.json"
    newest.write_text(json.dumps({**record, "header_confirmed": "2026-12-01T00:00:00.250Z"}))
    got = samples(metrics.render(metrics.collect(str(root), sources())))
    confirmed = got['luksvm_header_backup_last_success_timestamp_seconds{volume="cr_a"}']
    assert confirmed == 1796083200.25


def test_textfile_is_replaced_atomically(tmp_path: Path) -> None:
    target = tmp_path / "luksvm.prom"
    target.write_text("old\n")
    metrics.write_textfile(str(target), "new\n")
    assert target.read_text() == "new\n"
    assert oct(target.stat().st_mode & 0o777) == "0o644"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["luksvm.prom"]


def test_cli_textfile_in_a_missing_directory_exits_2_and_names_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "no" / "luksvm.prom"
    assert main(["--root", str(tmp_path), "metrics", "--textfile", str(target)]) == 2
    err = capsys.readouterr().err
    assert f"cannot write {target}: no such directory" in err
    assert "--collector.textfile.directory" in err
    assert "Traceback" not in err
