from __future__ import annotations

from pathlib import Path

from luksvm import config, status
from tests.conftest import write_config


def test_key_source_of_a_keyfile_volume_whose_unit_ran_systemd_cryptsetup(tmp_path: Path) -> None:
    write_config(
        tmp_path,
        {
            "10-a.conf": (
                "cr_file /dev/vg/a /etc/luksvm/keys/a luks\n"
                "cr_tpm /dev/vg/b - luks,tpm2-device=auto\n"
                "cr_pass /dev/vg/c - luks,noauto\n"
            )
        },
    )
    volumes = {v.name: v for v in config.load(str(tmp_path)).volumes}
    active = {f"luksvm-unlock@{name}.service": "active" for name in volumes}

    def source(name: str, sources: dict[str, str], states: dict[str, str]) -> str | None:
        return status._key_source(volumes[name], sources, states)

    # luksvm's own "unlocked" entry names the source, whatever the unit
    assert source("cr_file", {"cr_file": "prompt"}, active) == "prompt"
    assert source("cr_tpm", {"cr_tpm": "tpm2"}, active) == "tpm2"
    # systemd-cryptsetup logs nothing on success: the active unit of a keyfile volume used it
    assert source("cr_file", {}, active) == "keyfile"
    # opened some other way (unit not active), or no keyfile configured: unknown
    assert source("cr_file", {}, {}) is None
    assert source("cr_file", {}, {"luksvm-unlock@cr_file.service": "failed"}) is None
    assert source("cr_tpm", {}, active) is None
    assert source("cr_pass", {}, active) is None
