"""A reader that goes away early (`luksvm … --json | head`) ends luksvm quietly, without a
traceback: the way tools killed by SIGPIPE end."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path


def test_a_closed_pipe_ends_quietly_without_a_traceback(tmp_path: Path) -> None:
    fragments = tmp_path / "etc/luksvm/crypttab.d"
    fragments.mkdir(parents=True)
    # far more JSON than a pipe buffers (64 KiB), so the write after `head` left must fail
    lines = "".join(
        f"cr_v{i} /dev/vg/lv{i} - luks,discard,x-luksvm.guest=g{i}\n" for i in range(800)
    )
    (fragments / "10-many.conf").write_text(lines)
    luksvm = f"{sys.executable} -m luksvm --root {tmp_path}"
    proc = subprocess.run(
        ["bash", "-c", f"set -o pipefail; {luksvm} config check --json | head -c 1"],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert proc.stdout == "{"
    assert "Traceback" not in proc.stderr and "Error" not in proc.stderr, proc.stderr
    assert proc.returncode == 128 + signal.SIGPIPE
