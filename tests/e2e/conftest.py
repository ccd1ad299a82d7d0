"""Fixtures of the e2e tier (see README.md in this directory).

- release (session, parametrized): the Debian release the test boots (see below)
- e2e_image (session): the cached Debian VM image of that release, built on first use (2-4 min)
- luksvm_wheel (session): the project's wheel, built from the working tree
- seed_host (session): the seed host (one boot), frozen; seed_host.clone() gives a Machine
- host: a fresh clone of the seed host; its disks are deleted after the test
- machine: a bare VM from the image (no seed, no luksvm); its disks are deleted after the test

Releases: every test that boots a VM runs on settings.FULL_RELEASE; a test marked `stack` (its
behaviour depends on systemd, libvirt, LVM or cryptsetup) runs on every release, and one marked
`release("trixie", ...)` on exactly those. LUKSVM_E2E_RELEASES narrows the set. The test id names
the release: test_x[trixie].
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from . import settings, vm
from .image import RELEASES, Image, ensure_image
from .project import build_wheel
from .seed import SeedHost
from .vm import Machine

REQUIRED_TOOLS = (
    "qemu-system-x86_64",
    "qemu-img",
    "mmdebstrap",
    "mke2fs",
    "debugfs",
    "e2fsck",
    "journalctl",
)

# Shown in the summary, so that a failure can be told from a package change (see packages.txt).
KEY_PACKAGES = (
    "linux-image-amd64",
    "systemd",
    "lvm2",
    "cryptsetup-bin",
    "libvirt-daemon",
    "systemd-cryptsetup",
    "python3",
)

_TIMINGS: dict[str, Any] = {}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "stack: an e2e scenario whose behaviour depends on the stack: every release"
    )
    config.addinivalue_line(
        "markers", "release(*names): an e2e scenario that runs on exactly these Debian releases"
    )


def releases_for(item: pytest.Item) -> list[str]:
    """The Debian releases an e2e test boots, from its markers and LUKSVM_E2E_RELEASES."""
    named = [name for mark in item.iter_markers("release") for name in mark.args]
    if named:
        unknown = sorted(set(named) - set(RELEASES))
        if unknown:
            raise pytest.UsageError(f"{item.nodeid}: unknown release {unknown}; known {RELEASES}")
        wanted = named
    elif item.get_closest_marker("stack") is not None:
        wanted = list(RELEASES)
    else:
        wanted = [settings.FULL_RELEASE]
    enabled = settings.releases()
    return [name for name in wanted if name in enabled]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "release" in metafunc.fixturenames:
        metafunc.parametrize(
            "release", releases_for(metafunc.definition), indirect=True, scope="session"
        )


@pytest.fixture(scope="session")
def release(request: pytest.FixtureRequest) -> str:
    """The Debian release of this test's VM (a parameter: see the module docstring)."""
    return str(request.param)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.path).parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def e2e_image(release: str) -> Image:
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"e2e tier needs {', '.join(missing)}: run tools/install-deps (as root)")
    started = time.monotonic()
    image, built = ensure_image(settings.cache_dir(), release=release)
    _TIMINGS[f"image {release}"] = (
        f"built in {time.monotonic() - started:.0f} s" if built else "cached"
    ) + f" ({image.dir})"
    versions = image.package_versions()
    _TIMINGS[f"image {release} packages"] = (
        ", ".join(f"{name} {versions[name]}" for name in KEY_PACKAGES if name in versions)
        + f" (all in {image.packages})"
    )
    return image


@pytest.fixture(scope="session")
def luksvm_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="session")
def seed_host(
    e2e_image: Image, luksvm_wheel: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SeedHost]:
    seed = SeedHost.build(e2e_image, luksvm_wheel, tmp_path_factory.mktemp("seed") / "seed")
    _TIMINGS[f"seed {e2e_image.release}"] = f"{seed.seconds:.0f} s"
    yield seed
    seed.machine.discard()


@pytest.fixture
def host(seed_host: SeedHost, tmp_path: Path) -> Iterator[Machine]:
    """A fresh copy of the seed host for this test."""
    machine = seed_host.clone(tmp_path / "host", name="host")
    yield machine
    machine.discard()


@pytest.fixture
def machine(e2e_image: Image, tmp_path: Path) -> Iterator[Machine]:
    """A bare VM from the image: no seed, no luksvm installed."""
    bare = Machine.fresh(e2e_image, tmp_path / "vm", name="bare")
    yield bare
    bare.discard()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not vm.BOOT_LOG and not _TIMINGS and not vm.NOTES:
        return
    write = terminalreporter.write_line
    terminalreporter.section("e2e timings")
    for name, value in {**_TIMINGS, **vm.NOTES}.items():
        write(f"{name}: {value}")
    for boot in vm.BOOT_LOG:
        marks = " ".join(f"{mark}={seconds:.0f}s" for mark, seconds in boot.timings.items())
        status = boot.problem or f"rc={boot.rc}"
        write(f"{boot.machine} boot {boot.index}: {boot.seconds:.0f} s [{marks}] {status}")
