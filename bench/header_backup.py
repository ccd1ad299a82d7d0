"""Benchmark: `luksvm header-backup` of N LUKS2 volumes on image files, beside the bare cryptsetup
calls it wraps, in one run.

    .venv/bin/python bench/header_backup.py [N]      # N defaults to 50

First run: luksvm (verify, fsync, record) against a bare `cryptsetup luksHeaderBackup` per volume.
Second run with no header changed: luksvm must write nothing and cost well under a second more than
the bare `cryptsetup isLuks` per volume that it needs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KDF = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]
LUKSVM = [sys.executable, "-m", "luksvm"]


def timed(argvs: list[list[str]]) -> float:
    start = time.perf_counter()
    for argv in argvs:
        subprocess.run(argv, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    work = Path(tempfile.mkdtemp(prefix="luksvm-bench-"))
    try:
        images = []
        for n in range(count):
            image = work / f"disk{n:02d}.img"
            subprocess.run(["truncate", "-s", "20M", str(image)], check=True)
            subprocess.run(
                [
                    "cryptsetup",
                    "luksFormat",
                    "-q",
                    "--type",
                    "luks2",
                    *KDF,
                    "--key-file=-",
                    str(image),
                ],
                input=b"bench",
                check=True,
            )
            images.append(image)
        crypttab = work / "root/etc/luksvm/crypttab.d"
        crypttab.mkdir(parents=True)
        (crypttab / "10-bench.conf").write_text(
            "".join(f"cr_bench{n:02d} {image} - luks\n" for n, image in enumerate(images))
        )
        (work / "root/etc/luksvm/luksvm.conf").write_text(f"[backup]\ndir = {work}/backups\n")
        bare_dir = work / "bare"
        bare_dir.mkdir()
        luksvm = [*LUKSVM, "--root", str(work / "root"), "header-backup"]

        bare_backup = timed(
            [
                ["cryptsetup", "luksHeaderBackup", str(image), "--header-backup-file", str(target)]
                for image, target in ((i, bare_dir / i.name) for i in images)
            ]
        )
        first = timed([luksvm])
        written = sorted((work / "backups").glob("*/*.luksheader"))
        assert len(written) == count, f"first run wrote {len(written)} backups, not {count}"
        # The machine is shared: take the best of three, alternating, for the short runs.
        bare_isluks = second = startup = float("inf")
        for _ in range(3):
            isluks = [["cryptsetup", "isLuks", str(image)] for image in images]
            bare_isluks = min(bare_isluks, timed(isluks))
            second = min(second, timed([luksvm]))
            after = sorted((work / "backups").glob("*/*.luksheader"))
            assert after == written, "the second run wrote or removed backups"
            startup = min(startup, timed([[*LUKSVM, "--version"]]))

        print(f"{count} LUKS2 volumes (16 MiB headers) on image files, {os.cpu_count()} cores")
        print(f"{'run':<60}{'seconds':>9}")
        rows = [
            ("first:  bare cryptsetup luksHeaderBackup per volume", bare_backup),
            ("first:  luksvm header-backup (verify, fsync, record)", first),
            ("second: bare cryptsetup isLuks per volume (best of 3)", bare_isluks),
            ("second: luksvm header-backup, nothing changed (best of 3)", second),
            ("        of which: python + luksvm start-up", startup),
        ]
        for label, seconds in rows:
            print(f"{label:<60}{seconds:>9.2f}")
        print(f"second run over bare isLuks: {second - bare_isluks:+.2f} s; files written: 0")
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
