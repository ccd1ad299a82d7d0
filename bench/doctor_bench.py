"""Benchmark: `luksvm doctor` over 10, 50 and 200 LUKS2 volumes (used by libvirt test-driver
guests, each with a header backup), side by side in one run with the bare commands that give the
same facts, run one after another (what a shell script checking the same things would do).

    .venv/bin/python bench/doctor_bench.py [--volumes 10,50,200] [--runs 5] [--before DIR]

--before DIR also times the luksvm package in DIR (e.g. `git archive REV luksvm | tar -x -C DIR`)
on the same volumes, alternating with the others.

Image files are sparse LUKS2 containers (default 16 MiB header area) with a fast KDF; nothing is
opened or activated. Each size is set up, measured (doctor and the bare commands alternating) and
removed before the next. Medians; the load average before and after each size is printed.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FAST_KDF = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]
LUKSVM = str(Path(sys.executable).with_name("luksvm"))


def make_root(base: Path, volumes: int, guests: int) -> Path:
    root = base / "root"
    (root / "etc/luksvm/crypttab.d").mkdir(parents=True)
    keys = root / "etc/luksvm/keys"
    keys.mkdir()
    lines = []
    for n in range(volumes):
        image = base / f"v{n:03d}.img"
        subprocess.run(["truncate", "-s", "20M", str(image)], check=True)
        subprocess.run(
            ["cryptsetup", "luksFormat", "-q", "--type", "luks2", *FAST_KDF, "--key-file=-",
             str(image)],
            input=b"pw", check=True,
        )  # fmt: skip
        key = keys / f"v{n:03d}.key"
        key.write_bytes(b"pw")
        key.chmod(0o400)
        lines.append(
            f"cr_v{n:03d} {image} /etc/luksvm/keys/v{n:03d}.key "
            f"luks,x-luksvm.guest=g{n % guests:03d}"
        )
    (root / "etc/luksvm/crypttab.d/10-bench.conf").write_text("\n".join(lines) + "\n")
    domains = []
    for g in range(guests):
        disks = "".join(
            f"<disk type='block' device='disk'><driver name='qemu' type='raw' discard='unmap'/>"
            f"<source dev='/dev/mapper/cr_v{n:03d}'/><target dev='vd{chr(97 + i)}'/></disk>"
            for i, n in enumerate(n for n in range(volumes) if n % guests == g)
        )
        domains.append(
            f"<domain type='test'><name>g{g:03d}</name><memory>65536</memory>"
            f"<os><type>hvm</type></os><devices>{disks}</devices></domain>"
        )
    node = base / "node.xml"
    node.write_text("<node>" + "".join(domains) + "</node>")
    # header-backup writes [backup] dir as given, doctor reads it under --root: one folder for both
    backups = base / "backups"
    (root / str(backups).lstrip("/")).parent.mkdir(parents=True)
    (root / str(backups).lstrip("/")).symlink_to(backups)
    (root / "etc/luksvm/luksvm.conf").write_text(
        f"[libvirt]\nuri = test://{node}\n[backup]\ndir = {backups}\n"
    )
    quietly([LUKSVM, "--root", str(root), "header-backup"])
    return root


def quietly(argv: list[str]) -> None:
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


def timed(argvs: list[list[str]]) -> float:
    start = time.monotonic()
    for argv in argvs:
        quietly(argv)
    return time.monotonic() - start


def bare_commands(base: Path, volumes: int) -> list[list[str]]:
    """The same facts from the bare tools: one luksDump per volume, LVM's settings, version and
    PVs, the unit-file states."""
    argvs = [["cryptsetup", "luksDump", str(base / f"v{n:03d}.img")] for n in range(volumes)]
    return [
        *argvs,
        ["lvmconfig", "--typeconfig", "full"],
        ["lvmconfig", "--typeconfig", "current"],
        ["lvm", "version"],
        ["pvs", "--reportformat", "json"],
        ["systemctl", "--root=/", "list-unit-files", "--output=json", "luksvm*", "fstrim.timer"],
    ]


def hash_backups(base: Path) -> list[list[str]]:
    """What verifying every backup by its hash costs (what doctor did on every run before)."""
    return [["sha256sum", str(p)] for p in sorted((base / "backups").glob("*/*.luksheader"))]


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--volumes", default="10,50,200")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--before", metavar="DIR", help="a tree with an earlier luksvm package")
    args = parser.parse_args()
    earlier = [
        sys.executable,
        "-c",
        "import sys; sys.path.insert(0, sys.argv.pop(1)); from luksvm.cli import main; "
        "sys.exit(main(sys.argv[1:]))",
        str(args.before),
    ]
    os.environ.setdefault("LVM_SUPPRESS_FD_WARNINGS", "1")
    print(f"{os.cpu_count()} CPUs; medians of {args.runs} runs, doctor and bare alternating")
    print(
        f"{'volumes':>7} {'guests':>6}  {'doctor':>8} {'before':>8} {'bare':>8} "
        f"{'bare+sha256sum':>14}"
        f"  {'load 1/5/15 before → after'}"
    )
    for volumes in (int(v) for v in args.volumes.split(",")):
        guests = max(1, volumes * 2 // 5)
        with tempfile.TemporaryDirectory(prefix="luksvm-bench.") as tmp:
            base = Path(tmp)
            root = make_root(base, volumes, guests)
            doctor_argv = [LUKSVM, "--root", str(root), "doctor", "--json"]
            before = load()
            doctor, before_runs, bare, hashing = [], [], [], []
            for _ in range(args.runs):
                doctor.append(timed([doctor_argv]))
                if args.before:
                    before_runs.append(timed([[*earlier, *doctor_argv[1:]]]))
                bare.append(timed(bare_commands(base, volumes)))
                hashing.append(timed(hash_backups(base)))
            after = load()
            found = subprocess.run(doctor_argv, capture_output=True, text=True, check=False)
            statuses = collections.Counter(f["status"] for f in json.loads(found.stdout))
        print(
            f"{volumes:>7} {guests:>6}  {statistics.median(doctor):>7.2f}s "
            + (f"{statistics.median(before_runs):>7.2f}s " if before_runs else f"{'-':>8} ")
            + f"{statistics.median(bare):>7.2f}s "
            f"{statistics.median(bare) + statistics.median(hashing):>13.2f}s  {before} → {after}"
            f"  (findings: {dict(sorted(statuses.items()))})",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
