"""Benchmark: `luksvm header-backup` of N LUKS2 volumes on image files, beside the bare cryptsetup
calls it wraps, in one run.

    .venv/bin/python bench/header_backup.py [N]      # N defaults to 50

First run: luksvm (verify, fsync, record) against a bare `cryptsetup luksHeaderBackup` per volume.
Reruns with no header changed: luksvm must write nothing; it runs no cryptsetup at all (the
metadata digest and the backup's recorded stamp answer), shown beside the bare `cryptsetup isLuks`
per volume it used to run and beside Python's start-up. Medians of 5 alternating runs; the load
average is printed.
"""

from __future__ import annotations

import os
import shutil
import statistics
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
        # The machine is shared: alternate the short runs and take medians.
        bare_isluks, second, startup = [], [], []
        load_before = os.getloadavg()
        for _ in range(5):
            bare_isluks.append(timed([["cryptsetup", "isLuks", str(image)] for image in images]))
            second.append(timed([luksvm]))
            after = sorted((work / "backups").glob("*/*.luksheader"))
            assert after == written, "the rerun wrote or removed backups"
            startup.append(timed([[*LUKSVM, "--version"]]))
        load_after = os.getloadavg()

        print(f"{count} LUKS2 volumes (16 MiB headers) on image files, {os.cpu_count()} cores")
        print(
            "load average 1/5/15 before → after the reruns: "
            + "/".join(f"{x:.1f}" for x in load_before)
            + " → "
            + "/".join(f"{x:.1f}" for x in load_after)
        )
        print(f"{'run':<62}{'seconds':>9}")
        rows = [
            ("first:  bare cryptsetup luksHeaderBackup per volume", bare_backup),
            ("first:  luksvm header-backup (verify, fsync, record)", first),
            (
                "rerun:  bare cryptsetup isLuks per volume (median of 5)",
                statistics.median(bare_isluks),
            ),
            (
                "rerun:  luksvm header-backup, nothing changed (median of 5)",
                statistics.median(second),
            ),
            ("        python + luksvm start-up alone (median of 5)", statistics.median(startup)),
        ]
        for label, seconds in rows:
            print(f"{label:<62}{seconds:>9.2f}")
        print("files written by the reruns: 0")
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
