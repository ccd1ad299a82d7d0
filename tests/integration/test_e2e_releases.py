"""The e2e tier's release parameter, without booting anything: which tests pytest collects on
which Debian release, and where a release's packages come from."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e import image

REPO = Path(__file__).resolve().parents[2]


def collected(releases: str) -> list[str]:
    env = {**os.environ, "LUKSVM_E2E_RELEASES": releases}
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         "tests/e2e"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    return [line for line in out.stdout.splitlines() if "::" in line]


def test_stack_tests_run_on_every_release_the_rest_on_bookworm_only() -> None:
    both = collected("bookworm,trixie")
    trixie = [t for t in both if t.endswith("[trixie]")]
    bookworm = [t for t in both if t.endswith("[bookworm]")]
    stack = {"test_boot", "test_guests", "test_guest_vg_leak", "test_doctor"}
    assert {
        t.split("::")[0].removeprefix("tests/e2e/").removesuffix(".py") for t in trixie
    } == stack
    bookworm_files = {t.split("::")[0] for t in bookworm}
    assert "tests/e2e/test_shrink.py" in bookworm_files
    only_trixie = collected("trixie")
    assert {t for t in only_trixie if t.endswith("[trixie]")} == set(trixie)
    assert not [t for t in only_trixie if t.endswith("[bookworm]")]


def test_unknown_release_is_named() -> None:
    with pytest.raises(image.ImageBuildError, match=r"unknown Debian release 'sid'.*bookworm"):
        image.image_key("sid")


def test_one_image_per_release_with_its_own_packages() -> None:
    assert image.image_key("bookworm") != image.image_key("trixie")
    assert "systemd-cryptsetup" in image.packages("trixie")
    assert "systemd-cryptsetup" not in image.packages("bookworm")


@pytest.mark.skipif(
    not Path("/etc/apt").is_dir() or image.settings.mirror_override() is not None,
    reason="needs this machine's apt sources",
)
def test_a_release_this_machine_does_not_list_comes_from_the_same_mirrors() -> None:
    own = image.apt_sources("bookworm")  # this project's machines run Debian 12
    other = image.apt_sources("trixie")
    assert [line.replace("bookworm", "trixie") for line in own] == other
    assert any(line.endswith(" trixie main") for line in other)
