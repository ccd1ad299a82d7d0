"""Configuration: /etc/luksvm/crypttab.d/*.conf (crypttab(5) syntax) and luksvm.conf (INI).

Reading never writes anything. Every problem is collected and reported at once, each as
FILE:LINE:COL: what was found, what was expected.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from luksvm.durations import format_timespan, parse_timespan
from luksvm.errors import UsageError

CRYPTTAB_DIR = "etc/luksvm/crypttab.d"
SETTINGS_FILE = "etc/luksvm/luksvm.conf"
KEYS_DIR = "/etc/luksvm/keys"

# crypttab(5) options that systemd-cryptsetup (or its generator) understands: passed on verbatim.
STANDARD_OPTIONS = frozenset(
    """
    discard cipher hash keyfile-offset keyfile-size keyfile-erase key-slot luks offset skip
    read-only readonly same-cpu-crypt submit-from-crypt-cpus no-read-workqueue no-write-workqueue
    sector-size size tries headless password-echo timeout verify noauto nofail _netdev
    x-systemd.device-timeout keyfile-timeout x-initrd.attach pkcs11-uri fido2-device fido2-cid
    fido2-rp fido2-pin fido2-up fido2-uv tpm2-device tpm2-pcrs tpm2-public-key
    tpm2-public-key-pcrs tpm2-signature tpm2-pin tpm2-pcrlock tpm2-measure-pcr tpm2-measure-bank
    token-timeout try-empty-password fixate-volume-key link-volume-key integrity-ignore-nofail
    """.split()
)
# Options only the crypttab generator acts on: luksvm implements them in its units instead.
GENERATOR_OPTIONS = frozenset({"noauto", "nofail", "x-systemd.device-timeout", "keyfile-timeout"})
NOT_LUKS_OPTIONS = frozenset({"plain", "bitlk", "tcrypt", "swap", "tmp", "tcrypt-hidden"})
INITRAMFS_OPTIONS = frozenset({"keyscript", "initramfs", "check", "checkargs", "precheck"})
TOKEN_OPTIONS = frozenset({"tpm2-device", "fido2-device", "pkcs11-uri"})

LUKSVM_PREFIX = "x-luksvm."
LUKSVM_OPTIONS = {"guest": "a libvirt guest (domain) whose disk this volume is; repeat per guest"}

# --- unattended keys (issue 16): luksvm's own options for them, parsed apart from the rest ------
UNATTENDED_OPTIONS = {
    "tang": "the volume has a Tang (clevis) key: unlock tries it, after network-online.target",
    "unattended-timeout": "bound on each unattended unlock attempt; overrides [keys] "
    "unattended_timeout",
}
LUKSVM_OPTIONS.update(UNATTENDED_OPTIONS)
LUKSVM_FLAGS = frozenset({"tang"})  # options without a value (for the manual)
LUKSVM_OPTION_VALUES = {"unattended-timeout": "DURATION"}  # value names (for the manual)
TOKEN_SOURCES = (("tpm2-device", "tpm2"), ("fido2-device", "fido2"), ("pkcs11-uri", "pkcs11"))
# Options that make systemd-cryptsetup use a token: never given with a keyfile (with tpm2-device=
# it reads a key file as a sealed TPM2 blob)
TOKEN_OPTION_PREFIXES = ("tpm2-", "fido2-", "pkcs11-", "token-timeout")
UNATTENDED_TIMEOUT = 30_000_000  # microseconds: [keys] unattended_timeout's default

SOURCE_TAGS = {
    "UUID": "by-uuid",
    "PARTUUID": "by-partuuid",
    "LABEL": "by-label",
    "PARTLABEL": "by-partlabel",
}

# Device-mapper names: what udev creates /dev/mapper links for unmangled (DM_NAME_LEN is 128).
MAPPING_NAME = re.compile(r"^[A-Za-z0-9#+\-.:=@_]{1,127}$")
# libvirt refuses "/" and control characters in domain names; crypttab options split on "," and
# fields on white space, so those cannot be written here either.
GUEST_NAME = re.compile(r"^[^\s/,\x00-\x1f\x7f]{1,200}$")

STOP_POLICIES = ("destroy", "managedsave", "fail")


@dataclass(frozen=True)
class Location:
    path: str
    line: int
    column: int = 1

    def __str__(self) -> str:
        return f"{self.path}:{self.line}:{self.column}"


@dataclass(frozen=True)
class Problem:
    where: Location
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


class ConfigError(UsageError):
    """Every problem found in the configuration, in file and line order."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


@dataclass(frozen=True)
class Key:
    """Where a volume's key comes from: `ask` (passphrase prompt), `file` (keyfile) or `keyring`
    (python keyring, SERVICE/USER)."""

    kind: str
    path: str = ""
    service: str = ""
    user: str = ""

    def __str__(self) -> str:
        if self.kind == "file":
            return self.path
        if self.kind == "keyring":
            return f"keyring:{self.service}/{self.user}"
        return "-"


@dataclass(frozen=True)
class Volume:
    name: str
    source: str  # as written: a path or UUID=…/PARTUUID=…/LABEL=…/PARTLABEL=…
    device: str  # the path it names: /dev/disk/by-uuid/… for a UUID= source
    key: Key
    options: tuple[str, ...]  # standard crypttab options, verbatim and in order
    guests: tuple[str, ...]
    where: Location
    tang: bool = False  # x-luksvm.tang
    unattended_timeout: int | None = None  # x-luksvm.unattended-timeout=, microseconds

    @property
    def mapper_path(self) -> str:
        return f"/dev/mapper/{self.name}"

    def option(self, name: str) -> str | None:
        """The value of option `name` ("" for a flag), None when absent; the last one wins."""
        found = None
        for option in self.options:
            key, _, value = option.partition("=")
            if key == name:
                found = value
        return found

    def has_flag(self, name: str) -> bool:
        value = self.option(name)
        return value is not None and value.lower() not in {"0", "no", "false", "off"}

    @property
    def noauto(self) -> bool:
        return self.has_flag("noauto")

    @property
    def token_source(self) -> str:
        """The token kind the options name (tpm2, fido2, pkcs11), "" for none."""
        for option, kind in TOKEN_SOURCES:
            if self.option(option) is not None:
                return kind
        return ""

    @property
    def unattended(self) -> bool:
        """True when a token or Tang key unlocks it at boot (never a prompt: the key field is the
        fallback, tried after them, and a failure fails the unit)."""
        return bool(self.token_source) or self.tang

    def unlock_sources(self) -> tuple[str, ...]:
        """The sources an unattended unlock tries, in order: the token, Tang, the configured key."""
        sources = [self.token_source] if self.token_source else []
        if self.tang:
            sources.append("tang")
        if self.key.kind == "file":
            sources.append("keyfile")
        elif self.key.kind == "keyring":
            sources.append("keyring")
        return tuple(sources)

    @property
    def interactive(self) -> bool:
        """True when unlocking may wait at a passphrase prompt."""
        if self.unattended:
            return False
        if self.key.kind != "ask":
            return False
        has_token = any(self.option(name) is not None for name in TOKEN_OPTIONS)
        return not (has_token and self.has_flag("headless"))


@dataclass(frozen=True)
class GuestPolicy:
    stop_timeout: int = 120_000_000  # microseconds
    on_timeout: str = "destroy"
    start_delay: int = 0
    order: int = 0


@dataclass(frozen=True)
class Guest:
    name: str
    volumes: tuple[str, ...]
    policy: GuestPolicy


@dataclass(frozen=True)
class Settings:
    uri: str = "qemu:///system"
    guests: GuestPolicy = field(default_factory=GuestPolicy)
    guest_overrides: tuple[tuple[str, GuestPolicy], ...] = ()
    backup_dir: str = "/var/lib/luksvm/header-backups"
    backup_keep: int = 5
    backup_max_age: int = 30 * 86400 * 1_000_000
    keyring_backend: str = ""
    unattended_timeout: int = UNATTENDED_TIMEOUT  # [keys] unattended_timeout, microseconds

    def policy_for(self, guest: str) -> GuestPolicy:
        return dict(self.guest_overrides).get(guest, self.guests)


@dataclass(frozen=True)
class Config:
    root: str
    volumes: tuple[Volume, ...]
    guests: tuple[Guest, ...]
    settings: Settings
    files: tuple[str, ...]

    def volume(self, name: str) -> Volume:
        for volume in self.volumes:
            if volume.name == name:
                return volume
        raise UsageError(
            f"no volume {name!r} in {os.path.join(self.root, CRYPTTAB_DIR)}/*.conf "
            f"(configured: {', '.join(v.name for v in self.volumes) or 'none'})"
        )

    def guest(self, name: str) -> Guest:
        for guest in self.guests:
            if guest.name == name:
                return guest
        raise UsageError(
            f"no guest {name!r}: no volume names it with x-luksvm.guest={name} "
            f"(configured guests: {', '.join(g.name for g in self.guests) or 'none'})"
        )

    def volumes_of(self, guest: str) -> tuple[Volume, ...]:
        return tuple(self.volume(name) for name in self.guest(guest).volumes)


# --- luksvm.conf: one table, so defaults, docs and the man page cannot drift ------------------


@dataclass(frozen=True)
class SettingSpec:
    section: str  # "guest:NAME" for the per-guest sections
    key: str
    default: str
    kind: str  # text | uri | duration | count | policy | path | order | backend
    doc: str


SETTINGS: tuple[SettingSpec, ...] = (
    SettingSpec("libvirt", "uri", "qemu:///system", "uri", "libvirt connection URI"),
    SettingSpec(
        "guests",
        "stop_timeout",
        "120s",
        "duration",
        "how long a guest may take to shut down after the ACPI request before on_timeout applies",
    ),
    SettingSpec(
        "guests",
        "on_timeout",
        "destroy",
        "policy",
        "what to do with a guest still running after stop_timeout: destroy (power off), "
        "managedsave (save its RAM; only when libvirt's save directory is encrypted) or fail "
        "(leave it running; its volumes then refuse to lock)",
    ),
    SettingSpec(
        "guests", "start_delay", "0s", "duration", "pause after starting a guest before the next"
    ),
    SettingSpec("guest:NAME", "order", "0", "order", "start order; lower starts first"),
    SettingSpec("guest:NAME", "start_delay", "", "duration", "overrides [guests] start_delay"),
    SettingSpec("guest:NAME", "stop_timeout", "", "duration", "overrides [guests] stop_timeout"),
    SettingSpec("guest:NAME", "on_timeout", "", "policy", "overrides [guests] on_timeout"),
    SettingSpec(
        "backup",
        "dir",
        "/var/lib/luksvm/header-backups",
        "path",
        "where header backups go, one folder per volume; must not be on a volume it backs up",
    ),
    SettingSpec("backup", "keep", "5", "count", "backups kept per volume (newest first)"),
    SettingSpec(
        "backup", "max_age", "30d", "duration", "doctor warns when the newest backup is older"
    ),
    SettingSpec(
        "keys",
        "keyring_backend",
        "",
        "backend",
        "python keyring backend for keyring: keys, e.g. keyrings.alt.file.PlaintextKeyring; "
        "system units have no session bus, so the default backend cannot work there",
    ),
    SettingSpec(
        "keys",
        "unattended_timeout",
        "30s",
        "duration",
        "bound on each unattended unlock attempt (TPM2, Tang, keyfile/keyring) at boot; per "
        "volume: x-luksvm.unattended-timeout=",
    ),
)


def _settings_spec(section: str, key: str) -> SettingSpec | None:
    generic = "guest:NAME" if section.startswith("guest:") else section
    for spec in SETTINGS:
        if spec.section == generic and spec.key == key:
            return spec
    return None


def _convert(spec: SettingSpec, value: str) -> str | int:
    """The typed value of a setting; ValueError says what was expected."""
    if spec.kind == "duration":
        return parse_timespan(value)
    if spec.kind in ("count", "order"):
        if not re.fullmatch(r"-?\d+", value):
            raise ValueError(f"{value!r} is not a whole number")
        number = int(value)
        if spec.kind == "count" and number < 1:
            raise ValueError(f"{number} is too small; at least 1")
        return number
    if spec.kind == "policy":
        if value not in STOP_POLICIES:
            raise ValueError(f"{value!r} is not one of {', '.join(STOP_POLICIES)}")
        return value
    if spec.kind == "path":
        if not value.startswith("/"):
            raise ValueError(f"{value!r} is a relative path; write an absolute path")
        return value.rstrip("/") or "/"
    if spec.kind == "uri":
        if "://" not in value and value != "":
            raise ValueError(f"{value!r} is not a libvirt URI such as qemu:///system")
        return value
    if spec.kind == "backend" and value and not re.fullmatch(r"[A-Za-z_][\w.]*\.\w+", value):
        raise ValueError(f"{value!r} is not a backend class path such as keyring.backends.X.Y")
    return value


def parse_settings(text: str, path: str) -> tuple[Settings, list[Problem]]:
    problems: list[Problem] = []
    values: dict[tuple[str, str], str | int] = {}
    seen: dict[tuple[str, str], Location] = {}
    section = ""
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        column = len(raw) - len(raw.lstrip()) + 1
        if not line or line[0] in "#;":
            continue
        here = Location(path, lineno, column)
        if line.startswith("["):
            if not line.endswith("]"):
                problems.append(Problem(here, f"{line!r}: a section header ends with ]"))
                section = "?"
                continue
            section = line[1:-1].strip()
            known = {s.section for s in SETTINGS}
            if section.startswith("guest:"):
                name = section[len("guest:") :]
                if not GUEST_NAME.match(name):
                    problems.append(
                        Problem(here, f"[{section}]: {name!r} is not a valid guest name")
                    )
            elif section not in known:
                problems.append(
                    Problem(
                        here,
                        f"unknown section [{section}]; expected one of "
                        + ", ".join(f"[{s}]" for s in sorted(known - {"guest:NAME"}))
                        + " or [guest:NAME]",
                    )
                )
                section = "?"
            continue
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            problems.append(Problem(here, f"{line!r}: expected key = value"))
            continue
        if section == "?":
            continue  # already reported the section
        if not section:
            problems.append(Problem(here, f"{key} = … stands before any [section]"))
            continue
        spec = _settings_spec(section, key)
        if spec is None:
            keys = [s.key for s in SETTINGS if s.section == _generic(section)]
            problems.append(
                Problem(here, f"unknown setting {key!r} in [{section}]; known: {', '.join(keys)}")
            )
            continue
        equals = raw.index("=")
        value_column = equals + 2 + len(raw[equals + 1 :]) - len(raw[equals + 1 :].lstrip())
        if (section, key) in seen:
            problems.append(
                Problem(here, f"{key} set again in [{section}] (first at {seen[section, key]})")
            )
            continue
        seen[section, key] = here
        try:
            values[section, key] = _convert(spec, value)
        except ValueError as error:
            problems.append(Problem(Location(path, lineno, value_column), f"{key}: {error}"))
    return _settings_from(values), problems


def _generic(section: str) -> str:
    return "guest:NAME" if section.startswith("guest:") else section


def _settings_from(values: dict[tuple[str, str], str | int]) -> Settings:
    def get(section: str, key: str, default: str | int) -> str | int:
        return values.get((section, key), default)

    defaults = GuestPolicy()
    policy = GuestPolicy(
        stop_timeout=int(get("guests", "stop_timeout", defaults.stop_timeout)),
        on_timeout=str(get("guests", "on_timeout", defaults.on_timeout)),
        start_delay=int(get("guests", "start_delay", defaults.start_delay)),
    )
    overrides = []
    for name in sorted({s[len("guest:") :] for s, _ in values if s.startswith("guest:")}):
        section = f"guest:{name}"
        overrides.append(
            (
                name,
                GuestPolicy(
                    stop_timeout=int(get(section, "stop_timeout", policy.stop_timeout)),
                    on_timeout=str(get(section, "on_timeout", policy.on_timeout)),
                    start_delay=int(get(section, "start_delay", policy.start_delay)),
                    order=int(get(section, "order", 0)),
                ),
            )
        )
    base = Settings()
    return Settings(
        uri=str(get("libvirt", "uri", base.uri)),
        guests=policy,
        guest_overrides=tuple(overrides),
        backup_dir=str(get("backup", "dir", base.backup_dir)),
        backup_keep=int(get("backup", "keep", base.backup_keep)),
        backup_max_age=int(get("backup", "max_age", base.backup_max_age)),
        keyring_backend=str(get("keys", "keyring_backend", base.keyring_backend)),
        unattended_timeout=int(get("keys", "unattended_timeout", base.unattended_timeout)),
    )


# --- crypttab.d fragments ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Token:
    text: str
    column: int


def _tokens(text: str, start_column: int, separator: str) -> Iterator[_Token]:
    column = start_column
    for part in text.split(separator):
        yield _Token(part, column)
        column += len(part) + len(separator)


def udev_escape(value: str) -> str:
    """Escape a tag value the way udev names /dev/disk/by-* links (\\xNN for unsafe bytes)."""
    out = []
    for char in value:
        if (char.isalnum() and char.isascii()) or char in "#+-.:=@_":
            out.append(char)
        else:
            out.extend(f"\\x{byte:02x}" for byte in char.encode())
    return "".join(out)


def resolve_source(source: str) -> str | None:
    """The device path a crypttab source names, as systemd's generator resolves it; None if bad."""
    if source.startswith("/"):
        return source
    tag, sep, value = source.partition("=")
    if sep and tag in SOURCE_TAGS and value:
        if tag in ("UUID", "PARTUUID"):
            value = value.lower()
        return f"/dev/disk/{SOURCE_TAGS[tag]}/{udev_escape(value)}"
    return None


def _parse_key(token: _Token, here: Location, problems: list[Problem]) -> Key:
    text = token.text
    if text in ("-", "none"):
        return Key("ask")
    if text.startswith("keyring:"):
        service, sep, user = text[len("keyring:") :].partition("/")
        if not (sep and service and user):
            problems.append(
                Problem(
                    here, f"key {text!r}: expected keyring:SERVICE/USER, e.g. keyring:luksvm/cr_web"
                )
            )
        return Key("keyring", service=service, user=user)
    if text.startswith("/"):
        if ":" in text:
            problems.append(
                Problem(
                    here,
                    f"key {text!r}: a keyfile on another device is not supported; copy the key "
                    f"into {KEYS_DIR}/ (root-owned, mode 0400)",
                )
            )
        return Key("file", path=text)
    problems.append(
        Problem(
            here,
            f'key "{text}" is a relative path; write an absolute path such as '
            f"{KEYS_DIR}/{os.path.basename(text) or 'NAME.key'}, or - to ask for a passphrase",
        )
    )
    return Key("file", path=text)


def _parse_options(
    token: _Token, path: str, lineno: int, problems: list[Problem]
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    options: list[str] = []
    guests: list[str] = []
    for option in _tokens(token.text, token.column, ","):
        here = Location(path, lineno, option.column)
        name, sep, value = option.text.partition("=")
        if not option.text:
            problems.append(Problem(here, "empty option (two commas in a row?)"))
        elif name[len(LUKSVM_PREFIX) :] in UNATTENDED_OPTIONS and name.startswith(LUKSVM_PREFIX):
            pass  # parse_unattended() reads these
        elif name.startswith(LUKSVM_PREFIX):
            ours = name[len(LUKSVM_PREFIX) :]
            if ours not in LUKSVM_OPTIONS:
                problems.append(
                    Problem(
                        here,
                        f"unknown luksvm option {name!r}; known: "
                        + ", ".join(LUKSVM_PREFIX + o for o in LUKSVM_OPTIONS),
                    )
                )
            elif not (sep and GUEST_NAME.match(value)):
                problems.append(
                    Problem(
                        here,
                        f"{option.text!r}: expected {LUKSVM_PREFIX}guest=NAME with a libvirt "
                        "domain name (no white space, '/' or ',')",
                    )
                )
            elif value in guests:
                problems.append(Problem(here, f"guest {value!r} named twice for this volume"))
            else:
                guests.append(value)
        elif name in INITRAMFS_OPTIONS:
            problems.append(
                Problem(
                    here,
                    f"option {name!r} is for Debian's initramfs scripts, which luksvm does not "
                    "use; remove it (keys come from the key field: a keyfile, - or keyring:)",
                )
            )
        elif name in NOT_LUKS_OPTIONS:
            problems.append(
                Problem(here, f"option {name!r}: luksvm manages LUKS volumes only; use luks")
            )
        elif name in STANDARD_OPTIONS:
            options.append(option.text)
        else:
            problems.append(
                Problem(
                    here,
                    f"unknown crypttab option {name!r}; see crypttab(5) (luksvm's own options "
                    f"start with {LUKSVM_PREFIX})",
                )
            )
    return tuple(options), tuple(guests)


def parse_unattended(
    token: _Token, path: str, lineno: int, problems: list[Problem]
) -> tuple[bool, int | None]:
    """x-luksvm.tang (a flag) and x-luksvm.unattended-timeout=DURATION from an options field."""
    tang, timeout = False, None
    for option in _tokens(token.text, token.column, ","):
        name, sep, value = option.text.partition("=")
        here = Location(path, lineno, option.column)
        if name == LUKSVM_PREFIX + "tang":
            if sep:
                problems.append(Problem(here, f"{option.text!r}: {name} takes no value"))
            tang = True
        elif name == LUKSVM_PREFIX + "unattended-timeout":
            try:
                timeout = parse_timespan(value) if sep else None
            except ValueError as error:
                problems.append(Problem(here, f"{name}: {error}"))
                continue
            if not timeout:
                problems.append(
                    Problem(here, f"{option.text!r}: expected {name}=DURATION above 0, e.g. 20s")
                )
    return tang, timeout


def parse_crypttab(text: str, path: str) -> tuple[list[Volume], list[Problem]]:
    volumes: list[Volume] = []
    problems: list[Problem] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        fields = [_Token(m.group(), m.start() + 1) for m in re.finditer(r"\S+", raw)]
        first = Location(path, lineno, fields[0].column)
        if len(fields) < 2 or len(fields) > 4:
            problems.append(
                Problem(
                    first,
                    f"{len(fields)} field{'s' if len(fields) != 1 else ''}; expected 2 to 4: "
                    "NAME SOURCE [KEY [OPTIONS]]",
                )
            )
            continue
        name, source = fields[0], fields[1]
        if name.text in (".", "..") or not MAPPING_NAME.match(name.text):
            problems.append(
                Problem(
                    first,
                    f"mapping name {name.text!r} is not valid; use letters, digits and "
                    "#+-.:=@_ (at most 127 characters)",
                )
            )
        device = resolve_source(source.text)
        if device is None:
            problems.append(
                Problem(
                    Location(path, lineno, source.column),
                    f"source {source.text!r}: expected an absolute device path or "
                    "UUID=, PARTUUID=, LABEL=, PARTLABEL=",
                )
            )
        key_token = fields[2] if len(fields) > 2 else _Token("-", 0)
        key = _parse_key(key_token, Location(path, lineno, key_token.column), problems)
        options: tuple[str, ...] = ()
        guests: tuple[str, ...] = ()
        if len(fields) > 3:
            options, guests = _parse_options(fields[3], path, lineno, problems)
        tang, timeout = (
            parse_unattended(fields[3], path, lineno, problems)
            if len(fields) > 3
            else (False, None)
        )
        volumes.append(
            Volume(name.text, source.text, device or "", key, options, guests, first, tang, timeout)
        )
    return volumes, problems


def fragment_paths(root: str) -> list[str]:
    """*.conf in ROOT/etc/luksvm/crypttab.d in lexical order, like systemd's .d directories."""
    directory = os.path.join(root, CRYPTTAB_DIR)
    try:
        names = sorted(n for n in os.listdir(directory) if n.endswith(".conf"))
    except FileNotFoundError:
        return []
    return [os.path.join(directory, n) for n in names]


def _read(path: str, problems: list[Problem]) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as error:
        problems.append(Problem(Location(path, 1), f"not UTF-8 text ({error.reason})"))
    except OSError as error:
        problems.append(Problem(Location(path, 1), f"cannot read: {error.strerror}"))
    return None


def build(
    volumes: list[Volume], settings: Settings, settings_path: str, problems: list[Problem]
) -> tuple[tuple[Volume, ...], tuple[Guest, ...]]:
    """Cross-file checks (duplicate names and sources) and the guest table."""
    first_by_name: dict[str, Location] = {}
    first_by_source: dict[str, Location] = {}
    kept: list[Volume] = []
    for volume in volumes:
        if volume.name in first_by_name:
            problems.append(
                Problem(
                    volume.where,
                    f"mapping name {volume.name!r} is already defined at "
                    f"{first_by_name[volume.name]}; each name once across all fragments",
                )
            )
            continue
        if volume.device and volume.device in first_by_source:
            problems.append(
                Problem(
                    volume.where,
                    f"source {volume.source!r} is already used at "
                    f"{first_by_source[volume.device]}; one mapping per LUKS device",
                )
            )
        first_by_name[volume.name] = volume.where
        if volume.device:
            first_by_source[volume.device] = volume.where
        kept.append(volume)
    guest_volumes: dict[str, list[str]] = {}
    for volume in kept:
        for guest in volume.guests:
            guest_volumes.setdefault(guest, []).append(volume.name)
    for name, _ in settings.guest_overrides:
        if name not in guest_volumes:
            problems.append(
                Problem(
                    Location(settings_path, 1),
                    f"[guest:{name}] has settings but no volume names it; add "
                    f"x-luksvm.guest={name} to its volumes' options or remove the section",
                )
            )
    guests = [
        Guest(name, tuple(names), settings.policy_for(name))
        for name, names in guest_volumes.items()
    ]
    guests.sort(key=lambda g: g.policy.order)  # stable: config order within one order value
    return tuple(kept), tuple(guests)


def load(root: str = "/") -> Config:
    """Read and validate the whole configuration under ROOT; ConfigError lists every problem."""
    config, problems = read(root)
    if problems:
        raise ConfigError(problems)
    return config


def read(root: str = "/") -> tuple[Config, list[Problem]]:
    """The configuration under ROOT as far as it parses, and every problem found (doctor reports
    the problems and still checks the volumes that did parse)."""
    problems: list[Problem] = []
    volumes: list[Volume] = []
    files = fragment_paths(root)
    for path in files:
        text = _read(path, problems)
        if text is not None:
            found, more = parse_crypttab(text, path)
            volumes.extend(found)
            problems.extend(more)
    settings_path = os.path.join(root, SETTINGS_FILE)
    settings = Settings()
    if os.path.exists(settings_path):
        text = _read(settings_path, problems)
        if text is not None:
            settings, more = parse_settings(text, settings_path)
            problems.extend(more)
        files.append(settings_path)
    kept, guests = build(volumes, settings, settings_path, problems)
    return Config(os.path.abspath(root), kept, guests, settings, tuple(files)), problems


def describe(config: Config) -> dict[str, object]:
    """The configuration as plain data (for `config check --json` and the human table)."""
    return {
        "files": list(config.files),
        "volumes": [
            {
                "name": v.name,
                "source": v.source,
                "device": v.device,
                "key": str(v.key),
                "key_kind": v.key.kind,
                "options": list(v.options),
                "guests": list(v.guests),
                "noauto": v.noauto,
                "interactive": v.interactive,
                "defined_at": str(v.where),
            }
            for v in config.volumes
        ],
        "guests": [
            {
                "name": g.name,
                "volumes": list(g.volumes),
                "order": g.policy.order,
                "start_delay": format_timespan(g.policy.start_delay),
                "stop_timeout": format_timespan(g.policy.stop_timeout),
                "on_timeout": g.policy.on_timeout,
            }
            for g in config.guests
        ],
    }
