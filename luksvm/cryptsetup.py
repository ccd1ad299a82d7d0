"""LUKS operations over cryptsetup(8): read headers, open, close, status, back up a header.

Keys travel on stdin only (`--key-file=-`). LUKS1 counts its payload offset in 512-byte sectors,
LUKS2 in bytes: LuksHeader.data_offset is always bytes.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from luksvm import jsonshape
from luksvm.durations import USEC_PER_SEC, parse_timespan
from luksvm.errors import LuksvmError
from luksvm.run import run

TIMEOUT = 60
KEY_TIMEOUT = 120  # a real KDF may take seconds per keyslot tried


@dataclass(frozen=True)
class Keyslot:
    number: int
    kdf: str  # pbkdf2, argon2i, argon2id
    key_bits: int


@dataclass(frozen=True)
class LuksHeader:
    device: str
    version: int
    uuid: str
    label: str
    cipher: str  # e.g. aes-xts-plain64
    data_offset: int  # bytes from the start of the device to the encrypted payload
    sector_size: int  # encryption sector size in bytes (512 for LUKS1)
    keyslots: tuple[Keyslot, ...]
    flags: tuple[str, ...]  # LUKS2 persistent flags such as allow-discards
    tokens: tuple[str, ...]  # LUKS2 token types (systemd-tpm2, systemd-fido2, …)
    token_keyslots: tuple[int, ...] = ()  # keyslots a token unlocks (TPM2/FIDO2 enrolments)

    @property
    def header_size(self) -> int:
        """Bytes before the payload: everything a header backup can hold (the backup itself may be
        shorter: see header_backup)."""
        return self.data_offset


LUKS_MAGIC = b"LUKS\xba\xbe"
METADATA_PROBE = 4096  # bytes metadata_size() needs to see


def metadata_size(first: bytes) -> int:
    """How many bytes at the start of a LUKS device hold its metadata, from its first 4 KiB: LUKS1's
    header before the first keyslot (4096), LUKS2's two binary headers with their JSON areas
    (2 × hdr_size, 32 KiB by default). Every change cryptsetup makes to the keyslots rewrites
    these bytes (new salts; LUKS2 also bumps its sequence number). 0 when it is not LUKS."""
    if first[:6] != LUKS_MAGIC or len(first) < 16:
        return 0
    version = int.from_bytes(first[6:8], "big")
    if version == 1:
        return 4096
    hdr_size = int.from_bytes(first[8:16], "big")
    if version == 2 and 16384 <= hdr_size <= 4 << 20 and hdr_size % 4096 == 0:
        return 2 * hdr_size
    return 0


def is_luks(device: str) -> bool:
    return run(["cryptsetup", "isLuks", device], timeout=TIMEOUT, check=False).returncode == 0


def read_header(device: str) -> LuksHeader:
    """The header of the LUKS device (or header backup file) at `device`: one cryptsetup process.
    LUKS2: `luksDump --dump-json-metadata` (what cryptsetup validated), with the UUID and label
    from the binary header whose checksum matches; LUKS1, no LUKS, or a LUKS2 primary header
    that does not check out: the text dump (and the JSON for LUKS2 as well)."""
    identity = _luks2_identity(device)
    if identity is not None:
        result = run(
            ["cryptsetup", "luksDump", "--dump-json-metadata", device],
            timeout=TIMEOUT,
            check=False,
        )
        if result.returncode == 0:
            uuid, label = identity
            return _from_json(device, lambda metadata: luks2_header(device, uuid, label, metadata),
                              result.stdout)  # fmt: skip
    dump = run(["cryptsetup", "luksDump", device], timeout=TIMEOUT, check=False)
    if dump.returncode != 0:  # one process fewer than isLuks first: doctor reads many headers
        why = dump.stderr.strip().splitlines()[-1] if dump.stderr.strip() else "no LUKS header"
        raise LuksvmError(f"{device} is not a LUKS device (cryptsetup luksDump: {why})")
    text = dump.stdout
    version = _field(text, "Version")
    if version == "1":
        return parse_luks1_dump(device, text)
    dumped = run(["cryptsetup", "luksDump", "--dump-json-metadata", device], timeout=TIMEOUT)
    return _from_json(device, lambda metadata: parse_luks2(device, text, metadata), dumped.stdout)


def _from_json(
    device: str, parse: Callable[[dict[str, object]], LuksHeader], text: str
) -> LuksHeader:
    """parse(the LUKS2 JSON metadata cryptsetup printed); a shape luksvm does not know is an
    error that names the device and the member, not a traceback."""
    try:
        return parse(jsonshape.obj(json.loads(text), "metadata"))
    except (ValueError, KeyError, TypeError) as error:
        raise LuksvmError(
            f"{device}: cannot read its LUKS2 metadata ({type(error).__name__}: {error})"
        ) from None


def _field(text: str, name: str) -> str:
    match = re.search(rf"^{re.escape(name)}:\s*(.*?)\s*$", text, re.MULTILINE)
    return match.group(1) if match else ""


def parse_luks1_dump(device: str, text: str) -> LuksHeader:
    key_bits = int(_field(text, "MK bits") or 0)
    keyslots = tuple(
        Keyslot(int(n), "pbkdf2", key_bits)
        for n in re.findall(r"^Key Slot (\d+): ENABLED", text, re.MULTILINE)
    )
    return LuksHeader(
        device=device,
        version=1,
        uuid=_field(text, "UUID"),
        label="",
        cipher=f"{_field(text, 'Cipher name')}-{_field(text, 'Cipher mode')}",
        data_offset=int(_field(text, "Payload offset")) * 512,
        sector_size=512,
        keyslots=keyslots,
        flags=(),
        tokens=(),
    )


LUKS2_BINARY_HEADER = 4096  # the binary header before each JSON area (LUKS2_HDR_BIN_LEN)


def _luks2_identity(device: str) -> tuple[str, str] | None:
    """(UUID, label) from the primary LUKS2 binary header of `device` when it is one and its
    checksum (over the binary header with the checksum zeroed, then the JSON area) matches, as
    cryptsetup checks it; None otherwise (LUKS1, not LUKS, unreadable, damaged)."""
    try:
        with open(device, "rb") as f:
            first = f.read(METADATA_PROBE)
            size = metadata_size(first)
            if size == 0 or int.from_bytes(first[6:8], "big") != 2:
                return None
            area = first + f.read(size // 2 - len(first))
    except OSError:
        return None
    algorithm = area[72:104].split(b"\0")[0].decode("ascii", "replace")
    import hashlib  # loading OpenSSL is not for the boot path (unlock, lock)

    try:
        digest = hashlib.new(algorithm)
    except ValueError:
        return None
    digest.update(area[:448] + bytes(64) + area[512:])
    if area[448 : 448 + digest.digest_size] != digest.digest():
        return None

    def text(start: int, length: int) -> str:
        return area[start : start + length].split(b"\0")[0].decode("utf-8", "replace")

    return text(168, 40), text(24, 48)


def parse_luks2(device: str, text: str, metadata: dict[str, object]) -> LuksHeader:
    label = _field(text, "Label")
    return luks2_header(
        device, _field(text, "UUID"), "" if label == "(no label)" else label, metadata
    )


def luks2_header(device: str, uuid: str, label: str, metadata: dict[str, object]) -> LuksHeader:
    """A LUKS2 header from its JSON metadata and the binary header's UUID and label."""
    segments = jsonshape.objects(jsonshape.member(metadata, "segments", "metadata"), "segments")
    keyslots = jsonshape.objects(jsonshape.member(metadata, "keyslots", "metadata"), "keyslots")
    tokens = jsonshape.objects(metadata.get("tokens", {}), "tokens")
    config = jsonshape.obj(metadata.get("config", {}), "config")
    segment = segments[min(segments, key=int)]
    return LuksHeader(
        device=device,
        version=2,
        uuid=uuid,
        label=label,
        cipher=str(segment["encryption"]),
        data_offset=int(str(segment["offset"])),
        sector_size=int(str(segment.get("sector_size", 512))),
        keyslots=tuple(
            Keyslot(
                int(number),
                str(jsonshape.obj(slot.get("kdf", {}), f"keyslots[{number}].kdf").get("type", "")),
                int(str(slot.get("key_size", 0))) * 8,
            )
            for number, slot in sorted(keyslots.items(), key=lambda item: int(item[0]))
        ),
        flags=tuple(str(f) for f in jsonshape.arr(config.get("flags", []), "config.flags")),
        tokens=tuple(str(t.get("type", "")) for t in tokens.values()),
        token_keyslots=tuple(
            sorted(
                {
                    int(str(n))
                    for k, t in tokens.items()
                    for n in jsonshape.arr(t.get("keyslots", []), f"tokens[{k}].keyslots")
                }
            )
        ),
    )


@dataclass(frozen=True)
class MappingStatus:
    name: str
    active: bool
    in_use: bool
    device: str  # the backing device
    offset_sectors: int
    size_sectors: int
    discards: bool


def status(name: str) -> MappingStatus:
    """`cryptsetup status NAME`; inactive mappings come back with active=False."""
    result = run(["cryptsetup", "status", name], timeout=TIMEOUT, check=False)
    first = result.stdout.splitlines()[0] if result.stdout else ""
    if result.returncode != 0 or "inactive" in first:
        return MappingStatus(name, False, False, "", 0, 0, False)

    def number(label: str) -> int:
        value = _field(result.stdout, f"  {label}")
        return int(value.split()[0]) if value else 0

    return MappingStatus(
        name=name,
        active=True,
        in_use="in use" in first,
        device=_field(result.stdout, "  device"),
        offset_sectors=number("offset"),
        size_sectors=number("size"),
        discards="discards" in _field(result.stdout, "  flags"),
    )


def test_passphrase(device: str, key: bytes) -> bool:
    """True when `key` opens a keyslot of `device` (nothing is activated)."""
    result = run(
        ["cryptsetup", "open", "--test-passphrase", "--tries", "1", "--key-file=-", device],
        stdin=key,
        secret=True,
        timeout=KEY_TIMEOUT,
        check=False,
    )
    return result.returncode == 0


def header_backup(device: str, path: str) -> None:
    """Write the header of `device` to `path` (which must not exist yet: cryptsetup creates it,
    mode 0400). LUKS1 saves up to the end of its last keyslot area (about 1 MiB with 256-bit keys,
    2 MiB with 512-bit keys); LUKS2 its two metadata copies and keyslot area (16 MiB by default)."""
    run(
        ["cryptsetup", "luksHeaderBackup", device, "--header-backup-file", path],
        timeout=TIMEOUT,
    )


def header_restore(device: str, path: str) -> None:
    """Write the header backup `path` onto `device` (batch mode: the caller has confirmed)."""
    run(
        ["cryptsetup", "luksHeaderRestore", "--batch-mode", device, "--header-backup-file", path],
        timeout=TIMEOUT,
    )


def open_with_key(device: str, name: str, key: bytes) -> None:
    """Open the LUKS `device` as /dev/mapper/NAME, the key on stdin."""
    run(
        ["cryptsetup", "open", "--type", "luks", "--key-file=-", device, name],
        stdin=key,
        secret=True,
        timeout=KEY_TIMEOUT,
    )


def close_mapping(name: str) -> None:
    run(["cryptsetup", "close", name], timeout=TIMEOUT)


# --- opening and closing: argv builders for plans ---------------------------------------------

# Where systemd keeps systemd-cryptsetup, newest layout first (Debian 12: /lib/systemd).
SYSTEMD_CRYPTSETUP = (
    "/usr/bin/systemd-cryptsetup",
    "/usr/lib/systemd/systemd-cryptsetup",
    "/lib/systemd/systemd-cryptsetup",
)

# crypttab(5) options as `cryptsetup open` flags, for machines without systemd-cryptsetup.
OPEN_FLAGS = {
    "discard": "--allow-discards",
    "readonly": "--readonly",
    "read-only": "--readonly",
    "same-cpu-crypt": "--perf-same_cpu_crypt",
    "submit-from-crypt-cpus": "--perf-submit_from_crypt_cpus",
    "no-read-workqueue": "--perf-no_read_workqueue",
    "no-write-workqueue": "--perf-no_write_workqueue",
}
OPEN_VALUES = {
    "key-slot": "--key-slot",
    "keyfile-offset": "--keyfile-offset",
    "keyfile-size": "--keyfile-size",
    "tries": "--tries",
}
# Options that mean nothing to a LUKS volume opened with a key given to cryptsetup (the header
# fixes cipher, hash and offset; headless only matters to prompts systemd-cryptsetup would show).
OPEN_IGNORES = frozenset(
    {"luks", "cipher", "hash", "offset", "skip", "size", "sector-size", "verify", "headless"}
    | {"password-echo", "noauto", "nofail", "_netdev", "x-systemd.device-timeout"}
    | {"keyfile-timeout", "x-initrd.attach", "integrity-ignore-nofail"}
)


def find_systemd_cryptsetup(exists: Callable[[str], bool] = os.path.exists) -> str:
    """The systemd-cryptsetup binary, or "" when this machine has none."""
    return next((path for path in SYSTEMD_CRYPTSETUP if exists(path)), "")


def attach_argv(
    binary: str, name: str, device: str, key_file: str, options: Sequence[str]
) -> tuple[str, ...]:
    """`systemd-cryptsetup attach NAME DEVICE KEYFILE OPTIONS`; key_file "-" means ask."""
    return (binary, "attach", name, device, key_file or "-", ",".join(options))


def open_argv(
    device: str, name: str, options: Sequence[str], key_file: str = "", *, keyring: bool = False
) -> tuple[str, ...]:
    """`cryptsetup open` for a LUKS device with crypttab(5) `options` translated to flags.

    key_file "-" reads the key from stdin, "" asks for a passphrase on the terminal. An option
    cryptsetup cannot carry out (tokens, keyfile-erase, …) is refused rather than dropped.
    keyring: the key comes from python keyring (cryptsetup open is used whether or not
    systemd-cryptsetup is installed).
    """
    argv = ["cryptsetup", "open", "--type", "luks"]
    for option in options:
        key, sep, value = option.partition("=")
        if key in OPEN_FLAGS and not sep:
            if OPEN_FLAGS[key] not in argv:
                argv.append(OPEN_FLAGS[key])
        elif key in OPEN_VALUES and sep:
            argv += [OPEN_VALUES[key], value]
        elif key == "timeout" and sep:
            argv += ["--timeout", str(_seconds(value))]
        elif key not in OPEN_IGNORES and keyring:
            raise LuksvmError(
                f"{name}: option {option!r} cannot be used with a keyring: key: luksvm hands "
                "that key to cryptsetup open, which has no token support",
                fix="give the volume a keyfile or - as its key (systemd-cryptsetup then handles "
                "the option), or remove the option",
            )
        elif key not in OPEN_IGNORES:
            raise LuksvmError(
                f"{name}: option {option!r} needs systemd-cryptsetup, which this machine lacks "
                f"(looked at {', '.join(SYSTEMD_CRYPTSETUP)}); install it (Debian: "
                "systemd-cryptsetup) or remove the option"
            )
    if key_file == "-":
        argv.append("--key-file=-")
    elif key_file:
        argv += ["--key-file", key_file]
    argv += [device, name]
    return tuple(argv)


def _seconds(value: str) -> int:
    try:
        return -(-parse_timespan(value) // USEC_PER_SEC)  # round up: 0.5s must not become 0
    except ValueError as error:
        raise LuksvmError(f"timeout={value}: {error}") from None


def close_argv(name: str) -> tuple[str, ...]:
    return ("cryptsetup", "close", name)
