"""Fixtures for real tools on this machine: LUKS image files, loop devices, LVM with activation off.

The host kernel has no device-mapper: nothing here opens a mapping or activates an LV.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

FAST_KDF = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]


def sh(*argv: str, stdin: bytes | None = None, env: dict[str, str] | None = None) -> str:
    """Run a set-up command of a test; fail the test with its stderr when it fails."""
    proc = subprocess.run(argv, input=stdin, capture_output=True, env=env, check=False)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.decode()}")
    return proc.stdout.decode()


def make_luks(
    path: Path,
    key: bytes,
    *,
    version: int = 2,
    size: str = "32M",
    key_size: int | None = None,
    extra: tuple[str, ...] = (),
) -> Path:
    """A LUKS image file formatted with a fast KDF, key given on stdin."""
    if not path.exists():
        sh("truncate", "-s", size, str(path))
    argv = ["cryptsetup", "luksFormat", "-q", "--type", f"luks{version}", "--key-file=-"]
    argv += FAST_KDF if version == 2 else ["--pbkdf-force-iterations", "1000"]
    if key_size:
        argv += ["--key-size", str(key_size)]
    sh(*argv, *extra, str(path), stdin=key)
    return path


def flip_byte(path: Path, offset: int) -> None:
    """Change the byte at `offset` of `path` in place. Inverted, not overwritten with a constant:
    a LUKS2 keyslot area is random, so a fixed value is already there once in 256 runs."""
    with open(path, "r+b") as f:
        f.seek(offset)
        (byte,) = f.read(1)
        f.seek(offset)
        f.write(bytes([byte ^ 0xFF]))


@pytest.fixture
def luks2_image(tmp_path: Path) -> Path:
    return make_luks(tmp_path / "luks2.img", b"correct horse")


@pytest.fixture
def loop_device() -> Iterator[object]:
    """A function attaching an image file as a loop device; every loop is detached afterwards."""
    attached: list[str] = []

    def attach(
        image: Path, offset: int = 0, size: int | None = None, partscan: bool = False
    ) -> str:
        argv = ["losetup", "--find", "--show", "--offset", str(offset)]
        if size is not None:
            argv += ["--sizelimit", str(size)]
        if partscan:  # the kernel reads the partition table: /dev/loopNp1, …
            argv.append("--partscan")
        device = sh(*argv, str(image)).strip()
        attached.append(device)
        return device

    yield attach
    for device in reversed(attached):
        subprocess.run(["losetup", "-d", device], check=False)


@pytest.fixture
def lvm_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """LVM_SYSTEM_DIR pointing at an lvm.conf with activation off and this test's own archive, so
    nothing lands in /etc/lvm and no LV is ever activated on the host. Yields the environment."""
    system_dir = tmp_path / "lvm"
    system_dir.mkdir()
    (system_dir / "lvm.conf").write_text(
        "global {\n  activation = 0\n  use_lvmetad = 0\n}\n"
        "devices {\n  obtain_device_list_from_udev = 0\n  use_devicesfile = 0\n"
        '  filter = [ "a|^/dev/loop[0-9]+$|", "r|.*|" ]\n}\n'
        "activation {\n  udev_sync = 0\n  udev_rules = 0\n  monitoring = 0\n}\n"
        f'backup {{\n  backup_dir = "{system_dir}/backup"\n'
        f'  archive_dir = "{system_dir}/archive"\n}}\n'
    )
    monkeypatch.setenv("LVM_SYSTEM_DIR", str(system_dir))
    monkeypatch.setenv("LVM_SUPPRESS_FD_WARNINGS", "1")
    yield dict(os.environ)


def unique(prefix: str) -> str:
    """A VG/LV name no other test or process on this machine uses."""
    return f"{prefix}{uuid.uuid4().hex[:10]}"


TOOLS_CACHE = Path(os.environ.get("LUKSVM_TOOLS_CACHE", "/var/cache/luksvm-tools"))


@pytest.fixture(scope="session")
def promtool() -> str:
    """promtool from Debian's prometheus package, unpacked by tools/install-deps (installing the
    package would start a Prometheus server)."""
    path = TOOLS_CACHE / "prometheus/usr/bin/promtool"
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} missing: run tools/install-deps (make deps)")
    return str(path)


def write_journal(directory: Path, entries: list[dict[str, str]]) -> Path:
    """A real journal file made by systemd-journal-remote from entries in journal export format
    (each needs __REALTIME_TIMESTAMP, __MONOTONIC_TIMESTAMP and _BOOT_ID)."""
    directory.mkdir(parents=True, exist_ok=True)
    blocks = []
    for number, entry in enumerate(entries, 1):
        fields = {"__CURSOR": f"s=0;i={number}", "_TRANSPORT": "journal", **entry}
        blocks.append("".join(f"{k}={v}\n" for k, v in fields.items()))
    target = directory / "remote.journal"
    sh(
        "/lib/systemd/systemd-journal-remote",
        f"--output={target}",
        "--split-mode=none",
        "-",
        stdin=("\n".join(blocks) + "\n").encode(),
    )
    return target
