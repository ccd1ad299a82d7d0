"""Benchmark: stopping N guests that each need T seconds takes about T with luksvm, not N x T.

Boots the e2e harness's seed host once (tests/e2e: cached image, seed boot) and runs
bench/guest-stop.sh in it, which measures luksvm and libvirt-guests side by side in the same VM.

    .venv/bin/python bench/guest-stop.py [N] [T]       # defaults: 4 guests, 10 s

Prints a table of wall times; no pass/fail (this is a benchmark, not a test).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tests.e2e import settings  # noqa: E402
from tests.e2e.image import ensure_image  # noqa: E402
from tests.e2e.project import build_wheel  # noqa: E402
from tests.e2e.seed import SeedHost  # noqa: E402


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    t = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    with tempfile.TemporaryDirectory(prefix="luksvm-bench-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        image, _ = ensure_image(settings.cache_dir())
        seed = SeedHost.build(image, build_wheel(work / "wheel"), work / "seed")
        host = seed.clone(work / "bench", name="bench")
        script = f"BENCH_N={n}\nBENCH_T={t}\n" + (HERE / "guest-stop.sh").read_text()
        result = host.boot(script, timeout=300 + 12 * n * t)
        rows = [line.split("\t") for line in result.text("bench.tsv").splitlines() if line]
        print(f"stopping {n} guests that ignore ACPI, stop timeout {t} s (one VM, one run)")
        print(f"{'method':26} {'wall time':>10} {'still running':>14}")
        for method, seconds, still in rows:
            print(f"{method:26} {seconds + ' s':>10} {still:>14}")
        host.discard()
        seed.machine.discard()
    return 0


if __name__ == "__main__":
    sys.exit(main())
