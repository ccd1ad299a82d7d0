"""The project as a user gets it: a wheel built from the working tree, installed by pip."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from . import settings

REPO = Path(__file__).resolve().parents[2]

# Not part of what a user gets: local environments, caches, earlier build output.
_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis"
)


def build_wheel(dest: Path, source: Path = REPO) -> Path:
    """Build luksvm's wheel from a clean copy of the working tree (so no stale build/ leaks in)."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="luksvm-wheel-") as tmp:
        tree = Path(tmp) / "src"
        shutil.copytree(source, tree, ignore=_IGNORE, symlinks=True)
        out = Path(tmp) / "out"
        base = [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
        ]
        attempts = [
            # an isolated build, as a user's pip does it (fetches setuptools)
            [*base, "-w", str(out), str(tree)],
            # offline: the venv's own setuptools
            [*base, "--no-build-isolation", "-w", str(out), str(tree)],
        ]
        errors = []
        for argv in attempts:
            proc = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=settings.scaled(300),
                cwd=tmp,
                check=False,
            )
            wheels = sorted(out.glob("luksvm-*.whl")) if out.is_dir() else []
            if proc.returncode == 0 and wheels:
                target = dest / wheels[0].name
                shutil.copyfile(wheels[0], target)
                return target
            errors.append(f"$ {' '.join(argv)}\n{proc.stdout[-1500:]}{proc.stderr[-1500:]}")
        raise RuntimeError("cannot build the luksvm wheel:\n" + "\n".join(errors))


def wheel_digest(wheel: Path) -> str:
    """A hash of the wheel's contents (not of the zip, whose timestamps change every build)."""
    digest = hashlib.sha256()
    with zipfile.ZipFile(wheel) as archive:
        for name in sorted(archive.namelist()):
            if name.endswith(".dist-info/RECORD"):
                continue
            digest.update(name.encode() + b"\0" + archive.read(name) + b"\0")
    return digest.hexdigest()
