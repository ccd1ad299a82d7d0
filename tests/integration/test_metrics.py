"""luksvm metrics against the real engines: a journal file written by systemd-journal-remote and
read back through systemd-python, libvirt's test driver, LUKS image files, and promtool checking
the textfile as Prometheus would."""

from __future__ import annotations

import subprocess
from pathlib import Path

from luksvm.cli import main
from luksvm.journal import MESSAGE_IDS
from tests.conftest import write_config
from tests.integration.conftest import make_luks, write_journal

OLD_BOOT, LAST_BOOT, THIS_BOOT = "a" * 32, "b" * 32, "c" * 32


def journal_entry(message: str, boot: str, at: int, **fields: str) -> dict[str, str]:
    return {
        "__REALTIME_TIMESTAMP": str(at * 1_000_000),
        "__MONOTONIC_TIMESTAMP": str(at * 1000),
        "_BOOT_ID": boot,
        "MESSAGE": message,
        "PRIORITY": "6",
        "SYSLOG_IDENTIFIER": "luksvm",
        **fields,
    }


def stopped(boot: str, at: int, guest: str, action: str, seconds: str) -> dict[str, str]:
    return journal_entry(
        f"guest {guest} {action} after {seconds} s",
        boot,
        at,
        MESSAGE_ID=MESSAGE_IDS["guest-stopped"],
        LUKSVM_GUEST=guest,
        LUKSVM_STOP_ACTION=action,
        LUKSVM_STOP_SECONDS=seconds,
    )


def check_metrics(promtool: str, path: Path) -> None:
    result = subprocess.run(
        [promtool, "check", "metrics"], stdin=path.open("rb"), capture_output=True, check=False
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b""), path.read_text()


def test_textfile_from_journal_libvirt_and_images_passes_promtool(
    tmp_path: Path, promtool: str
) -> None:
    image = make_luks(tmp_path / "a.img", b"pw")
    root = write_config(
        tmp_path / "root",
        {"10.conf": f"cr_a {image} - luks,x-luksvm.guest=test\ncr_gone {tmp_path}/gone - luks\n"},
        "[libvirt]\nuri = test:///default\n",
    )
    write_journal(
        root / "var/log/journal",
        [
            stopped(OLD_BOOT, 1_700_000_000, "test", "shutdown", "3.000"),
            stopped(LAST_BOOT, 1_700_100_000, "test", "destroyed", "62.500"),
            journal_entry(
                "guest test trimmed",
                THIS_BOOT,
                1_700_200_000,
                MESSAGE_ID=MESSAGE_IDS["guest-trimmed"],
                LUKSVM_GUEST="test",
            ),
            journal_entry(
                "cr_gone: no such device",
                THIS_BOOT,
                1_700_200_100,
                PRIORITY="3",
                MESSAGE_ID=MESSAGE_IDS["header-backup-failed"],
                LUKSVM_VOLUME="cr_gone",
            ),
        ],
    )
    prom = tmp_path / "textfile" / "luksvm.prom"
    prom.parent.mkdir()
    assert main(["--root", str(root), "metrics", "--textfile", str(prom)]) == 0
    check_metrics(promtool, prom)
    text = prom.read_text()
    for line in (
        "luksvm_libvirt_up 1",
        'luksvm_guest_running{guest="test"} 1',
        'luksvm_volume_device_present{volume="cr_a"} 1',
        'luksvm_volume_device_present{volume="cr_gone"} 0',
        'luksvm_volume_unlocked{volume="cr_a"} 0',
        'luksvm_volume_needed{volume="cr_a"} 1',
        'luksvm_trim_last_success_timestamp_seconds{guest="test"} 1700200000',
        'luksvm_header_backup_failures_total{volume="cr_gone"} 1',
        'luksvm_header_backup_failures_total{volume="cr_a"} 0',
        "luksvm_last_shutdown_timestamp_seconds 1700100000",
        'luksvm_last_shutdown_guest_stop_seconds{guest="test"} 62.5',
        'luksvm_last_shutdown_guest_action{action="destroyed",guest="test"} 1',
        'luksvm_last_shutdown_guest_action{action="shutdown",guest="test"} 0',
        'luksvm_doctor_status{check="luks",subject="cr_gone"} 2',
        'luksvm_source_up{source="journal"} 1',
    ):
        assert line + "\n" in text, line


def test_libvirt_down_and_no_journal_still_write_a_valid_file(
    tmp_path: Path, promtool: str
) -> None:
    root = write_config(
        tmp_path / "root",
        {"10.conf": "cr_a /dev/luksvm-no-such-disk - luks,x-luksvm.guest=mail\n"},
        f"[libvirt]\nuri = qemu+unix:///system?socket={tmp_path}/no-libvirt.sock\n",
    )
    prom = tmp_path / "luksvm.prom"
    assert main(["--root", str(root), "metrics", "--textfile", str(prom)]) == 0
    check_metrics(promtool, prom)
    text = prom.read_text()
    assert "luksvm_libvirt_up 0\n" in text
    assert 'luksvm_volume_device_present{volume="cr_a"} 0\n' in text
    assert 'luksvm_source_up{source="journal"} 0\n' in text


def test_promtool_rejects_what_luksvm_must_not_write(tmp_path: Path, promtool: str) -> None:
    """The check above can fail: a family written twice (two writers of one file) is refused."""
    bad = tmp_path / "bad.prom"
    bad.write_text(
        "# HELP luksvm_libvirt_up x\n# TYPE luksvm_libvirt_up gauge\nluksvm_libvirt_up 1\n"
        "# HELP luksvm_libvirt_up x\n# TYPE luksvm_libvirt_up gauge\nluksvm_libvirt_up 1\n"
    )
    result = subprocess.run([promtool, "check", "metrics"], stdin=bad.open("rb"), check=False)
    assert result.returncode != 0
