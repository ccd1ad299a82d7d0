"""The option table (crypttab_options.py) against the installed systemd-cryptsetup itself.

`systemd-cryptsetup attach NAME /nonexistent - OPTION` parses OPTION before it looks at the
device: when the first thing it says is that the device does not exist, it took the option;
anything else ("Encountered unknown …", "Failed to parse …, ignoring", "… refusing") means it
would ignore or refuse it. luksvm must agree, except where luksvm-crypttab(5) lists it as
stricter on purpose."""

from __future__ import annotations

import subprocess

import pytest

from luksvm import crypttab_options
from luksvm.cryptsetup import find_systemd_cryptsetup

BINARY = find_systemd_cryptsetup()
VERSION = crypttab_options.installed_systemd_version()
pytestmark = pytest.mark.skipif(
    not BINARY or VERSION is None, reason="systemd-cryptsetup or its version not found"
)

GOOD = {
    "cipher": "aes-xts-plain64",
    "hash": "sha256",
    "size": "256",
    "sector-size": "4096",
    "key-slot": "1",
    "keyslot": "1",
    "keyfile-size": "64",
    "keyfile-offset": "4096",
    "keyfile-erase": "yes",
    "tries": "0",
    "timeout": "infinity",
    "offset": "0",
    "skip": "0",
    "password-echo": "masked",
    "password-cache": "read-only",
    "headless": "true",
    "try-empty-password": "no",
    "pkcs11-uri": "auto",
    "fido2-device": "auto",
    "fido2-cid": "YWJj",
    "fido2-rp": "io.systemd.cryptsetup",
    "fido2-pin": "yes",
    "fido2-up": "yes",
    "fido2-uv": "no",
    "tpm2-device": "auto",
    "tpm2-pcrs": "7+11",
    "tpm2-pin": "no",
    "token-timeout": "30s",
    "tpm2-signature": "/etc/systemd/tpm2-pcr-signature.json",
    "tpm2-measure-pcr": "yes",
    "tpm2-measure-bank": "sha256",
    "tpm2-pcrlock": "/var/lib/systemd/pcrlock.json",
    "link-volume-key": "@u::luksvm",
    "tpm2-measure-keyslot-nvpcr": "yes",
    "fixate-volume-key": "ab",
}
BAD = [
    "tries=abc",
    "tries=-1",
    "discard=yes",
    "luks=1",
    "size=250",
    "keyfile-erase=maybe",
    "key-slot=x",
    "keyfile-size=99999999999",
    "offset=-1",
    "timeout=5parsecs",
    "timeout=99999999999999999999d",
    "tpm2-pcrs=7+99",
    "tpm2-signature=relative.json",
    "fido2-cid=!!",
    "pkcs11-uri=x",
    "headless=maybe",
    "password-echo=loud",
]
# luksvm-crypttab(5), difference 4: systemd takes these, luksvm asks for the plain spelling.
STRICTER = ["tries=+3", "tries=0x3", "sector-size=1000"]


def systemd_takes(option: str) -> bool:
    proc = subprocess.run(
        [BINARY, "attach", "luksvm-probe", "/nonexistent", "-", option],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    first = (proc.stderr.strip().splitlines() or [""])[0]
    return first.startswith("Device /nonexistent does not exist")


def spelled(spec: crypttab_options.OptionSpec) -> str:
    return spec.name if spec.form == "flag" else f"{spec.name}={GOOD[spec.name]}"


CRYPTSETUP_OPTIONS = [s for s in crypttab_options.OPTIONS.values() if not s.generator]


@pytest.mark.parametrize("spec", CRYPTSETUP_OPTIONS, ids=lambda s: s.name)
def test_the_version_table_matches_the_installed_systemd_cryptsetup(
    spec: crypttab_options.OptionSpec,
) -> None:
    option = spelled(spec)
    assert crypttab_options.check_option(option) == ""
    assert VERSION is not None
    assert systemd_takes(option) == (spec.since <= VERSION), (option, spec.since, VERSION)


@pytest.mark.parametrize("option", BAD)
def test_values_systemd_cryptsetup_would_ignore_or_refuse_are_refused(option: str) -> None:
    assert crypttab_options.check_option(option) != ""
    assert not systemd_takes(option)


@pytest.mark.parametrize("option", STRICTER)
def test_luksvm_is_stricter_only_where_its_manual_says(option: str) -> None:
    assert crypttab_options.check_option(option) != ""
    assert systemd_takes(option)
