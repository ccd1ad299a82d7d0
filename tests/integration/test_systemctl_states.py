"""systemctl.ENABLED_STATES against the installed systemctl: a unit file in every state
`list-unit-files` can report, made under a --root with systemctl's own enable/link/mask, and
`systemctl --root is-enabled` asked which of them count as enabled (exit 0)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from luksvm import systemctl

from .conftest import sh

SERVICE = "[Service]\nExecStart=/bin/true\n"
INSTALL = "[Install]\nWantedBy=multi-user.target\n"


def _tree(root: Path) -> None:
    vendor = root / "usr/lib/systemd/system"
    for folder in (vendor, root / "etc/systemd/system", root / "opt"):
        folder.mkdir(parents=True)
    for name in ("enabled", "runtime", "disabled", "masked", "masked-rt"):
        (vendor / f"s-{name}.service").write_text(SERVICE + INSTALL)
    (vendor / "s-static.service").write_text(SERVICE)
    (vendor / "s-indirect.service").write_text(SERVICE + "[Install]\nAlso=s-enabled.service\n")
    (vendor / "s-aliased.service").write_text(SERVICE + INSTALL + "Alias=s-alias.service\n")
    for name in ("linked", "linked-rt"):
        (root / "opt" / f"s-{name}.service").write_text(SERVICE + INSTALL)
    for kind in ("generator", "transient"):
        folder = root / "run/systemd" / kind
        folder.mkdir(parents=True)
        (folder / f"s-{kind}.service").write_text(SERVICE)
    at = f"--root={root}"
    sh("systemctl", at, "enable", "s-enabled.service", "s-aliased.service")
    sh("systemctl", at, "enable", "--runtime", "s-runtime.service")
    sh("systemctl", at, "mask", "s-masked.service")
    sh("systemctl", at, "mask", "--runtime", "s-masked-rt.service")
    sh("systemctl", at, "link", "/opt/s-linked.service")
    sh("systemctl", at, "link", "--runtime", "/opt/s-linked-rt.service")


def test_enabled_states_are_exactly_those_systemctl_is_enabled_accepts(tmp_path: Path) -> None:
    _tree(tmp_path)
    states = systemctl.unit_file_states(["s-*"], str(tmp_path))
    # every state a unit file can be in on disk (bad: unreadable, not made here)
    assert set(states.values()) == {
        "enabled",
        "enabled-runtime",
        "linked",
        "linked-runtime",
        "alias",
        "masked",
        "masked-runtime",
        "static",
        "indirect",
        "disabled",
        "generated",
        "transient",
    }
    for unit, state in states.items():
        rc = subprocess.run(
            ["systemctl", f"--root={tmp_path}", "is-enabled", "--quiet", unit], check=False
        ).returncode
        assert (state in systemctl.ENABLED_STATES) == (rc == 0), (unit, state, rc)
