"""crypttab(5) options as systemd reads them: which exist, the syntax of each value, and the
systemd version that added each one.

The value checks follow systemd-cryptsetup's parse_one_option() (src/cryptsetup/cryptsetup.c)
and the generator's option tests (src/cryptsetup/cryptsetup-generator.c): where systemd would
log "Failed to parse …, ignoring" or "Encountered unknown /etc/crypttab option", luksvm refuses
the option instead, so that what `luksvm config check` accepts is what systemd honours. Where
systemd is lenient about spelling (a leading "+", "0x10") luksvm asks for the plain form.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass

from luksvm.durations import parse_timespan

# systemd's parse_boolean(), compared case-insensitively.
TRUE_WORDS = frozenset({"1", "yes", "y", "true", "t", "on"})
FALSE_WORDS = frozenset({"0", "no", "n", "false", "f", "off"})

UINT_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1
INT_MAX = 2**31 - 1
TPM2_PCRS_MAX = 24


def _number(value: str, limit: int) -> str:
    if not re.fullmatch(r"[0-9]+", value):
        return f"{value!r} is not a whole number (digits only)"
    if int(value) > limit:
        return f"{value} is too large (at most {limit})"
    return ""


def _boolean(value: str) -> str:
    if value.lower() in TRUE_WORDS | FALSE_WORDS:
        return ""
    return f"{value!r} is not a boolean (yes/no, true/false, on/off, 1/0)"


def _uint(value: str) -> str:
    return _number(value, UINT_MAX)


def _uint64(value: str) -> str:
    return _number(value, UINT64_MAX)


def _key_slot(value: str) -> str:
    return _number(value, INT_MAX)


def _key_size(value: str) -> str:
    problem = _uint(value)
    if not problem and int(value) % 8:
        problem = f"{value} is not a multiple of 8 (the key size in bits)"
    return problem


def _sector_size(value: str) -> str:
    if value in ("512", "1024", "2048", "4096"):
        return ""
    return f"{value!r} is not a sector size: 512, 1024, 2048 or 4096"


def _timespan(value: str) -> str:
    try:
        parse_timespan(value, infinity=True)
    except ValueError as error:
        return str(error)
    return ""


def _text(value: str) -> str:
    return "" if value else "the value is empty"


def _absolute(value: str) -> str:
    return "" if value.startswith("/") else f"{value!r} is not an absolute path"


def _pkcs11(value: str) -> str:
    return (
        "" if value == "auto" or value.startswith("pkcs11:") else "expected auto or a pkcs11: URI"
    )


def _base64_or_auto(value: str) -> str:
    if value == "auto":
        return ""
    import base64  # here, not at import: every guest unit loads this module (bench/boot.py)
    import binascii

    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return f"{value!r} is not base64 (or auto)"
    return ""


def _echo(value: str) -> str:
    return "" if value == "masked" else _boolean(value)


def _cache(value: str) -> str:
    return "" if value == "read-only" else _boolean(value)


_PCR = r"[0-9A-Za-z-]+(?::[0-9a-z]+=(?:0x)?[0-9A-Fa-f]+)?"


def _pcrs(value: str) -> str:
    if value == "" or re.fullmatch(rf"{_PCR}(?:\+{_PCR})*", value):
        bad = [p for p in re.findall(r"(?:^|\+)([0-9]+)", value) if int(p) >= TPM2_PCRS_MAX]
        return f"PCR {bad[0]} does not exist (0 to 23)" if bad else ""
    return f"{value!r} is not a PCR list such as 7 or 7+11"


def _measure_pcr(value: str) -> str:
    if re.fullmatch(r"[0-9]+", value):
        return "" if int(value) < TPM2_PCRS_MAX else f"PCR {value} does not exist (0 to 23)"
    return _boolean(value)


def _link_key(value: str) -> str:
    return (
        ""
        if "::" in value
        else "expected KEYRING::KEY_DESCRIPTION, as cryptsetup --link-vk-to-keyring"
    )


@dataclass(frozen=True)
class OptionSpec:
    """One crypttab option: `flag` (no value), `value` (NAME=VALUE required) or `either`."""

    name: str
    form: str  # flag | value | either
    check: Callable[[str], str] | None  # the value's syntax: "" when good, else what is wrong
    since: int  # the systemd version that added it (0: older than any systemd luksvm runs on)
    generator: bool = False  # read by the crypttab generator, not by systemd-cryptsetup


def _spec(
    names: str,
    form: str,
    check: Callable[[str], str] | None,
    since: int = 0,
    generator: bool = False,
) -> list[OptionSpec]:
    return [OptionSpec(name, form, check, since, generator) for name in names.split()]


# Every option luksvm passes on. Versions from systemd's NEWS and crypttab(5), the ones up to 252
# measured against Debian 12's systemd-cryptsetup (an option it does not know makes it log
# "Encountered unknown /etc/crypttab option").
OPTIONS: dict[str, OptionSpec] = {
    spec.name: spec
    for spec in [
        *_spec("cipher hash", "value", _text),
        *_spec("size", "value", _key_size),
        *_spec("sector-size", "value", _sector_size, 236),
        *_spec("key-slot keyslot", "value", _key_slot),
        *_spec("keyfile-size", "value", _uint),
        *_spec("keyfile-offset", "value", _uint64),
        *_spec("keyfile-erase", "either", _boolean, 246),
        *_spec("tries", "value", _uint),
        *_spec("timeout", "value", _timespan),
        *_spec("offset skip", "value", _uint64),
        *_spec("luks discard allow-discards readonly read-only verify", "flag", None),
        *_spec("same-cpu-crypt submit-from-crypt-cpus", "flag", None),
        *_spec("no-read-workqueue no-write-workqueue", "flag", None, 248),
        *_spec("password-echo", "value", _echo, 249),
        *_spec("password-cache", "value", _cache, 257),
        *_spec("headless", "either", _boolean, 249),
        *_spec("try-empty-password", "either", _boolean, 245),
        *_spec("pkcs11-uri", "value", _pkcs11, 245),
        *_spec("fido2-device", "value", _text, 248),
        *_spec("fido2-cid", "value", _base64_or_auto, 248),
        *_spec("fido2-rp", "value", _text, 248),
        *_spec("fido2-pin fido2-up fido2-uv", "value", _boolean, 257),
        *_spec("tpm2-device", "value", _text, 248),
        *_spec("tpm2-pcrs", "value", _pcrs, 248),
        *_spec("tpm2-pin", "value", _boolean, 251),
        *_spec("token-timeout", "value", _timespan, 250),
        *_spec("tpm2-signature", "value", _absolute, 252),
        *_spec("tpm2-measure-pcr", "value", _measure_pcr, 253),
        *_spec("tpm2-measure-bank", "value", _text, 253),
        *_spec("tpm2-pcrlock", "value", _absolute, 255),
        *_spec("link-volume-key", "value", _link_key, 256),
        *_spec("tpm2-measure-keyslot-nvpcr", "value", _text, 259),
        *_spec("fixate-volume-key", "value", _text, 260),
        # The generator's own: luksvm implements them in its units.
        *_spec("noauto nofail _netdev", "flag", None, generator=True),
        *_spec("x-systemd.device-timeout", "value", _timespan, generator=True),
        *_spec("keyfile-timeout", "value", _timespan, 243, generator=True),
        *_spec("x-initrd.attach", "flag", None, 245, generator=True),
    ]
}

# Volume types other than LUKS, and their options.
NOT_LUKS = frozenset(
    (
        "plain bitlk tcrypt tcrypt-hidden tcrypthidden tcrypt-system tcrypt-veracrypt "
        "veracrypt veracrypt-pim tcrypt-keyfile swap tmp"
    ).split()
)
# Understood by systemd, but not by luksvm: the reason goes into the error.
NOT_SUPPORTED: dict[str, str] = {
    **{
        name: "luksvm manages LUKS volumes only (header backups, doctor and shrink read the LUKS "
        "header); use luks"
        for name in NOT_LUKS
    },
    "header": "a detached header is not supported: luksvm backs up, checks and resizes the LUKS "
    "header on the volume's own device; keep the header on the device",
    "auto": "volumes are unlocked at boot unless they say noauto; remove auto",
    "fail": "a volume that fails to unlock already fails only its own unit and guests; remove fail",
}


def check_option(text: str) -> str:
    """What is wrong with one option as systemd would read it, or "" (for known options)."""
    name, sep, value = text.partition("=")
    spec = OPTIONS[name]
    if spec.form == "flag" and sep:
        return (
            f"{name} takes no value: write {name} alone (systemd ignores {text!r} as an "
            "unknown option)"
        )
    if spec.form == "value" and not sep:
        return f"{name} needs a value: {name}=VALUE"
    if sep and spec.check is not None:
        problem = spec.check(value)
        if problem:
            return f"{name}=: {problem}"
    return ""


def installed_systemd_version(root: str = "/") -> int | None:
    """The version of the systemd under ROOT (from its libsystemd-shared-NNN.so), None when it
    cannot be told: systemd-cryptsetup is built from the same source and carries its version."""
    patterns = (
        "usr/lib/*/systemd/libsystemd-shared-*.so",
        "usr/lib/systemd/libsystemd-shared-*.so",
        "usr/lib64/systemd/libsystemd-shared-*.so",
        "lib/systemd/libsystemd-shared-*.so",
    )
    import glob

    versions = []
    for pattern in patterns:
        for path in glob.glob(os.path.join(root, pattern)):
            found = re.search(r"libsystemd-shared-(\d+)", os.path.basename(path))
            if found:
                versions.append(int(found.group(1)))
    return max(versions) if versions else None
