from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from luksvm.cli import main
from tests.conftest import write_config


def test_config_check_shows_volumes_and_guests(
    seed_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--root", str(seed_root), "config", "check"]) == 0
    out = capsys.readouterr().out
    assert (
        "cr_imap_encr  /dev/volgrp4/lvimap_hd0  file /etc/luksvm/keys/imap.key  luks,discard  mail"
        in out
    )
    assert "configuration valid: 2 volumes, 2 guests" in out


def test_config_check_json_has_the_same_data(
    seed_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--root", str(seed_root), "config", "check", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [v["name"] for v in data["volumes"]] == ["cr_imap_encr", "cr_web"]
    assert data["guests"][0] == {
        "name": "mail",
        "volumes": ["cr_imap_encr"],
        "order": 0,
        "start_delay": "0",
        "stop_timeout": "2min",
        "on_timeout": "destroy",
    }


def test_three_mistakes_in_two_files_exit_64_naming_all(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_config(
        tmp_path,
        {
            "10-a.conf": "cr_a /dev/vg/a keys/a.key luks\ncr_b /dev/vg/b - luks,nodiscard\n",
            "20-b.conf": "cr_a /dev/vg/c - luks\n",
        },
    )
    assert main(["--root", str(tmp_path), "config", "check"]) == 64
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3
    assert err[0].startswith(f"luksvm: {tmp_path}/etc/luksvm/crypttab.d/10-a.conf:1:16: key")
    assert err[1].startswith(f"luksvm: {tmp_path}/etc/luksvm/crypttab.d/10-a.conf:2:23: unknown")
    assert err[2].startswith(
        f"luksvm: {tmp_path}/etc/luksvm/crypttab.d/20-b.conf:1:1: mapping name"
    )


def test_usage_errors_exit_64(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["config", "chek"])
    assert caught.value.code == 64
    assert "invalid choice" in capsys.readouterr().err


def test_help_does_not_import_libvirt_or_systemd() -> None:
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "luksvm", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "usage: luksvm" in proc.stdout
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()]
    assert "luksvm.cli" in imported  # the probe sees our own imports …
    assert not [
        m for m in imported if m.split(".")[0] in {"libvirt", "systemd", "keyring", "pexpect"}
    ]
