"""Statuses and kinds are Literal types: mypy --strict refuses a misspelt one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

WRONG = """\
from luksvm import doctor, guests, status

doctor.Finding("FAILED", "host", "a status doctor does not have")
guests.Stopped("mail", "killed", 1.0)
row: status.VolumeStatus = {
    "name": "cr_a", "state": "open", "device": "/dev/a", "device_present": True,
    "open_count": None, "holders": [], "guest_vgs": [], "key": "file", "noauto": False,
    "guests": [], "unit": None,
}
"""


def test_mypy_refuses_statuses_and_outcomes_that_do_not_exist(tmp_path: Path) -> None:
    snippet = tmp_path / "wrong.py"
    snippet.write_text(WRONG)
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-error-summary", str(snippet)],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    errors = [line for line in result.stdout.splitlines() if ": error:" in line]
    assert [line.split(":")[1] for line in errors] == ["3", "4", "6"], result.stdout
    assert "'FAILED'" in errors[0] and "'killed'" in errors[1] and "'open'" in errors[2]
