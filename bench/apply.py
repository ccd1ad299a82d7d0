"""Benchmark: `luksvm apply` for 200 volumes and 100 guests into a temporary root, side by side
with systemd-cryptsetup-generator (what a plain /etc/crypttab uses) on the same 200 volumes.

    .venv/bin/python bench/apply.py

Target: under 1 s for the whole `luksvm apply` command.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VOLUMES = 200
GUESTS = 100
RUNS = 5
GENERATOR = "/lib/systemd/system-generators/systemd-cryptsetup-generator"
LUKSVM = os.path.join(os.path.dirname(sys.executable), "luksvm")


def crypttab_lines(luksvm: bool) -> list[str]:
    """Two volumes per guest; every fifth a passphrase volume, every tenth noauto."""
    lines = []
    for i in range(VOLUMES):
        key = "-" if i % 5 == 0 else f"/etc/luksvm/keys/vol-{i}.key"
        options = ["luks", "discard"] + (["noauto"] if i % 10 == 0 else [])
        if luksvm:
            options.append(f"x-luksvm.guest=guest-{i // 2}")
        lines.append(f"cr-vol-{i} /dev/vg{i % 4}/lv-{i} {key} {','.join(options)}")
    return lines


def timed(argv: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, env=env)
    return time.perf_counter() - start


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="luksvm-bench-") as tmp:
        fresh, again, generator = [], [], []
        for run in range(RUNS):
            root = Path(tmp, f"root-{run}")
            conf = root / "etc/luksvm/crypttab.d"
            conf.mkdir(parents=True)
            (conf / "10-bench.conf").write_text("\n".join(crypttab_lines(True)) + "\n")
            fresh.append(timed([LUKSVM, "--root", str(root), "apply"]))
            again.append(timed([LUKSVM, "--root", str(root), "apply"]))

            crypttab = Path(tmp, f"crypttab-{run}")
            crypttab.write_text("\n".join(crypttab_lines(False)) + "\n")
            out = [Path(tmp, f"gen-{run}-{d}") for d in ("normal", "early", "late")]
            for directory in out:
                directory.mkdir()
            env = {**os.environ, "SYSTEMD_CRYPTTAB": str(crypttab)}
            generator.append(timed([GENERATOR, *map(str, out)], env))
        written = sum(len(files) for _, _, files in os.walk(Path(tmp, "root-0/etc/systemd")))

    def ms(values: list[float]) -> str:
        return f"{statistics.median(values) * 1000:6.0f} ms (min {min(values) * 1000:.0f})"

    print(f"{VOLUMES} volumes, {GUESTS} guests; median of {RUNS} runs of the whole command")
    print(f"luksvm apply, fresh root ({written} files and links)  {ms(fresh)}")
    print(f"luksvm apply, again (nothing to change)          {ms(again)}")
    print(f"systemd-cryptsetup-generator, same 200 volumes   {ms(generator)}")
    verdict = "ok" if statistics.median(fresh) < 1.0 else "OVER the 1 s target"
    print(f"target < 1 s: {verdict}")


if __name__ == "__main__":
    main()
