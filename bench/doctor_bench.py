"""Benchmark: `luksvm doctor` over 50 LUKS volumes used by 20 guests, against the plain commands it
wraps run one after another (what a shell script checking the same things would do).

    .venv/bin/python bench/doctor_bench.py [--volumes 50] [--guests 20] [--runs 5]

Image files are sparse LUKS2 containers with a fast KDF; nothing is opened or activated. The
guests are libvirt test-driver domains (test:///node.xml) with the volumes as their disks.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FAST_KDF = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]


def make_root(base: Path, volumes: int, guests: int) -> Path:
    root = base / "root"
    (root / "etc/luksvm/crypttab.d").mkdir(parents=True)
    keys = root / "etc/luksvm/keys"
    keys.mkdir()
    lines = []
    for n in range(volumes):
        image = base / f"v{n:02d}.img"
        subprocess.run(["truncate", "-s", "20M", str(image)], check=True)
        subprocess.run(
            ["cryptsetup", "luksFormat", "-q", "--type", "luks2", *FAST_KDF, "--key-file=-",
             str(image)],
            input=b"pw", check=True,
        )  # fmt: skip
        key = keys / f"v{n:02d}.key"
        key.write_bytes(b"pw")
        key.chmod(0o400)
        guest = f"g{n % guests:02d}"
        lines.append(
            f"cr_v{n:02d} {image} /etc/luksvm/keys/v{n:02d}.key luks,x-luksvm.guest={guest}"
        )
    (root / "etc/luksvm/crypttab.d/10-bench.conf").write_text("\n".join(lines) + "\n")
    # the guests as libvirt's test driver serves them: each with its volumes as disks
    domains = []
    for g in range(guests):
        disks = "".join(
            f"<disk type='block' device='disk'><driver name='qemu' type='raw' discard='unmap'/>"
            f"<source dev='/dev/mapper/cr_v{n:02d}'/><target dev='vd{chr(97 + i)}'/></disk>"
            for i, n in enumerate(n for n in range(volumes) if n % guests == g)
        )
        domains.append(
            f"<domain type='test'><name>g{g:02d}</name><memory>65536</memory>"
            f"<os><type>hvm</type></os><devices>{disks}</devices></domain>"
        )
    node = base / "node.xml"
    node.write_text("<node>" + "".join(domains) + "</node>")
    (root / "etc/luksvm/luksvm.conf").write_text(f"[libvirt]\nuri = test://{node}\n")
    return root


def timed(argv: list[str]) -> float:
    start = time.monotonic()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.monotonic() - start


def plain_commands(base: Path, volumes: int) -> float:
    """The commands doctor's checks need, one after another."""
    start = time.monotonic()
    for n in range(volumes):
        image = str(base / f"v{n:02d}.img")
        for argv in (
            ["cryptsetup", "luksDump", image],
            ["cryptsetup", "luksDump", "--dump-json-metadata", image],
        ):
            subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    host_wide = [
        ["lvmconfig", "--typeconfig", "full"],
        ["lvmconfig", "--typeconfig", "current"],
        ["lvm", "version"],
        ["pvs", "--reportformat", "json"],
        ["systemctl", "--root=/", "list-unit-files", "--output=json", "luksvm*"],
    ]
    for argv in host_wide:
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.monotonic() - start


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--volumes", type=int, default=50)
    parser.add_argument("--guests", type=int, default=20)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("LVM_SUPPRESS_FD_WARNINGS", "1")
    luksvm = str(Path(sys.executable).with_name("luksvm"))
    with tempfile.TemporaryDirectory(prefix="luksvm-bench.") as tmp:
        base = Path(tmp)
        root = make_root(base, args.volumes, args.guests)
        doctor = [
            timed([luksvm, "--root", str(root), "doctor", "--json"]) for _ in range(args.runs)
        ]
        plain = [plain_commands(base, args.volumes) for _ in range(args.runs)]
    print(f"{args.volumes} volumes, {args.guests} guests, {os.cpu_count()} CPUs, {args.runs} runs")
    print(f"luksvm doctor (all checks)      median {statistics.median(doctor):.2f} s  "
          f"best {min(doctor):.2f} s")  # fmt: skip
    print(f"same commands, one after another median {statistics.median(plain):.2f} s  "
          f"best {min(plain):.2f} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
