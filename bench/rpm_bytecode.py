"""Benchmark: what the RPM's %post bytecode saves each luksvm run, in one run.

    .venv/bin/python bench/rpm_bytecode.py [ROUNDS]      # ROUNDS defaults to 20

Builds the RPM (`make rpm`), installs it into a scratch root without scriptlets, and runs its
launcher the way a guest unit does (`luksvm guest start -- NAME`: the units' own command line,
which imports what a guest start imports; NAME is configured nowhere, so it ends there, with exit
status 64), alternately with the private directory as the package ships it (sources only: every
run compiles) and after %post's `compileall`. Beside them `python3 -I -c pass`, the interpreter's
own start. Medians of ROUNDS runs each; the load average is printed.
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

REPO = Path(__file__).resolve().parents[1]


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, check=False)
    elapsed = time.perf_counter() - start
    if proc.returncode not in (0, 64):
        raise SystemExit(f"{' '.join(argv)}: exit status {proc.returncode}: {proc.stderr!r}")
    return elapsed


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    work = Path(tempfile.mkdtemp(prefix="luksvm-bench-"))
    try:
        subprocess.run(
            ["make", "--no-print-directory", "rpm", f"DISTDIR={work / 'dist'}"],
            cwd=REPO, check=True, capture_output=True,
        )  # fmt: skip
        (package,) = (work / "dist").glob("luksvm-*.noarch.rpm")
        root = work / "root"
        subprocess.run(
            ["rpm", "-i", "--root", str(root), "--dbpath", "/rpmdb", "--nodeps", "--noscripts",
             str(package)],
            check=True, capture_output=True,
        )  # fmt: skip
        private = root / "usr/lib/luksvm/luksvm"
        # what %post runs, on the scratch root's copy
        subprocess.run(
            ["/usr/bin/python3", "-I", "-m", "compileall", "-q", "-f", str(private)], check=True
        )
        cache, away = private / "__pycache__", work / "pycache-away"
        unit = ["/usr/bin/python3", "-I", str(root / "usr/bin/luksvm")]
        unit += ["guest", "start", "--", "bench-none"]
        figures: dict[str, list[float]] = {"sources": [], "bytecode": [], "python": []}
        for _ in range(rounds):
            cache.rename(away)
            figures["sources"].append(timed(unit))
            away.rename(cache)
            figures["bytecode"].append(timed(unit))
            figures["python"].append(timed(["/usr/bin/python3", "-I", "-c", "pass"]))
        assert not away.exists() and cache.is_dir()
        median = {name: statistics.median(values) * 1000 for name, values in figures.items()}
        print(f"load average {os.getloadavg()[0]:.2f}; medians of {rounds} runs each")
        rows = [
            ("luksvm guest start, sources only (the RPM as shipped)", median["sources"]),
            ("luksvm guest start, after %post's compileall", median["bytecode"]),
            ("python3 -I -c pass", median["python"]),
        ]
        for what, ms in rows:
            print(f"{what:<55}{ms:7.1f} ms")
        print(f"saved a run: {median['sources'] - median['bytecode']:.1f} ms")
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
