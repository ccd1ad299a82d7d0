"""Configuration: /etc/luksvm/crypttab.d/*.conf (crypttab(5) syntax) and luksvm.conf (INI).

Reading never writes anything. Every problem is collected and reported at once, each as
FILE:LINE:COL: what was found, what was expected.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from luksvm import crypttab_options
from luksvm.durations import USEC_INFINITY, USEC_PER_SEC, format_timespan, parse_timespan
from luksvm.errors import UsageError

CRYPTTAB_DIR = "etc/luksvm/crypttab.d"
SETTINGS_FILE = "etc/luksvm/luksvm.conf"
KEYS_DIR = "/etc/luksvm/keys"

# crypttab(5) options that systemd-cryptsetup (or its generator) understands: passed on verbatim
# once their values are checked (crypttab_options.py holds the table, with the systemd versions).
STANDARD_OPTIONS = frozenset(crypttab_options.OPTIONS)
# Options only the crypttab generator acts on: luksvm implements them in its units instead.
GENERATOR_OPTIONS = frozenset({"noauto", "nofail", "x-systemd.device-timeout", "keyfile-timeout"})
NOT_LUKS_OPTIONS = crypttab_options.NOT_LUKS
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
# Not starting with "-": the units run `luksvm unlock NAME`, where it would read as an option.
MAPPING_NAME = re.compile(r"^(?!-)[A-Za-z0-9#+\-.:=@_]{1,127}$")
# libvirt refuses "/" and control characters in domain names; crypttab options split on "," and
# fields on white space, so those cannot be written here either; no leading "-" (as above).
GUEST_NAME = re.compile(r"^(?!-)[^\s/,\x00-\x1f\x7f]{1,200}$")

# How systemd reads crypttab (src/basic/fileio.c read_line(), then strstrip() and sscanf("%ms")):
# lines end at \n, \r or NUL (\r\n and \n\r count once); WHITESPACE is stripped from both ends;
# fields are separated by C isspace(): WHITESPACE plus \v and \f, never NBSP or U+2028.
WHITESPACE = " \t\n\r"
FIELD_SEPARATORS = " \t\n\r\v\f"
LONG_LINE_MAX = 1024 * 1024  # systemd's LONG_LINE_MAX: a longer line stops the generator
PATH_MAX = 4096
NAME_MAX = 255
# Durations luksvm.conf accepts: systemd's limit less what luksvm adds for its units' timeouts.
UNIT_TIMEOUT_HEADROOM = 3600 * USEC_PER_SEC
MAX_DURATION = USEC_INFINITY - 1 - UNIT_TIMEOUT_HEADROOM

STOP_POLICIES = ("destroy", "managedsave", "fail")


@dataclass(frozen=True)
class Location:
    """Where in the configuration: file, line, column (1-based, as compilers print them)."""

    path: str
    line: int
    column: int = 1

    def __str__(self) -> str:
        return f"{self.path}:{self.line}:{self.column}"


@dataclass(frozen=True)
class Problem:
    """One thing wrong in the configuration, and where."""

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
    """One crypttab.d line: a volume luksvm unlocks, its key, options and guests."""

    name: str
    source: str  # as written: a path or UUID=…/PARTUUID=…/LABEL=…/PARTLABEL=…
    device: str  # the path it names: /dev/disk/by-uuid/… for a UUID= source
    key: Key
    options: tuple[str, ...]  # standard crypttab options, verbatim and in order
    guests: tuple[str, ...]
    where: Location
    # where each of `options` stands on its line (for warnings about one option)
    option_columns: tuple[int, ...] = field(default=(), compare=False)
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
            # A keyfile or keyring key with headless=false falls back to a prompt when it fails.
            return self.option("headless") is not None and not self.has_flag("headless")
        has_token = any(self.option(name) is not None for name in TOKEN_OPTIONS)
        return not (has_token and self.has_flag("headless"))


@dataclass(frozen=True)
class GuestPolicy:
    """How a guest starts and stops ([guests], overridden by [guest:NAME]); times in µs."""

    stop_timeout: int = 120_000_000  # microseconds
    on_timeout: str = "destroy"
    start_delay: int = 0
    order: int = 0


@dataclass(frozen=True)
class Guest:
    """A libvirt guest named by volumes (x-luksvm.guest=), with its policy."""

    name: str
    volumes: tuple[str, ...]
    policy: GuestPolicy


@dataclass(frozen=True)
class Settings:
    """luksvm.conf, defaults filled in; durations in microseconds."""

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
    """The whole configuration under a root: volumes, guests, settings, the files read."""

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
    """One luksvm.conf setting: its default, kind and the line the manual shows."""

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
        "backup",
        "max_age",
        "30d",
        "duration",
        "doctor warns when header-backup took or confirmed no backup for longer",
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
        usec = parse_timespan(value)
        if usec > MAX_DURATION:
            raise ValueError(
                f"{value!r} is too long: luksvm adds up to an hour to it for its units' timeouts "
                f"and systemd counts at most {format_timespan(USEC_INFINITY - 1)}"
            )
        return usec
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
        problem = path_problem(value)
        if problem:
            raise ValueError(problem)
        return value.rstrip("/") or "/"
    if spec.kind == "uri":
        if "://" not in value and value != "":
            raise ValueError(f"{value!r} is not a libvirt URI such as qemu:///system")
        return value
    if spec.kind == "backend" and value and not re.fullmatch(r"[A-Za-z_][\w.]*\.\w+", value):
        raise ValueError(f"{value!r} is not a backend class path such as keyring.backends.X.Y")
    return value


def read_lines(text: str) -> list[str]:
    """The lines of `text` as systemd's read_line() splits them: at \\n, \\r and NUL, where
    \\r\\n, \\n\\r and a NUL right after them count as one end of line; never at \\f, \\v or
    U+2028 (str.splitlines() would)."""
    lines = _EOL.split(text)
    if lines and lines[-1] == "" and len(lines) > 1:
        lines.pop()  # the text ended with an end of line
    return [] if lines == [""] else lines


_EOL = re.compile("\0|\n\r?\0?|\r\n?\0?")


def _strip_comment(raw: str) -> str:
    """A luksvm.conf line without an inline comment: white space, then # to the end."""
    found = re.search(r"[ \t]+#", raw)
    return raw[: found.start()] if found else raw


def _nul_problems(text: str, path: str) -> list[Problem]:
    """A NUL byte anywhere: systemd would end the line there; luksvm refuses the file."""
    problems = []
    if "\0" in text:
        lineno, column = 1, 1
        for char in text:
            if char == "\0":
                problems.append(
                    Problem(
                        Location(path, lineno, column),
                        "a NUL byte; configuration files are text (remove it)",
                    )
                )
                break
            if char == "\n":
                lineno, column = lineno + 1, 1
            else:
                column += 1
    return problems


def parse_settings(text: str, path: str) -> tuple[Settings, list[Problem]]:
    problems: list[Problem] = _nul_problems(text, path)
    if problems:
        return Settings(), problems
    values: dict[tuple[str, str], str | int] = {}
    seen: dict[tuple[str, str], Location] = {}
    section = ""
    for lineno, whole in enumerate(read_lines(text), start=1):
        raw = whole if whole.lstrip(WHITESPACE)[:1] in ("#", ";") else _strip_comment(whole)
        line = raw.strip(WHITESPACE)
        column = len(raw) - len(raw.lstrip(WHITESPACE)) + 1
        if not line or line[0] in "#;":
            continue
        here = Location(path, lineno, column)
        if line.startswith("["):
            if not line.endswith("]"):
                problems.append(Problem(here, f"{line!r}: a section header ends with ]"))
                section = "?"
                continue
            section = line[1:-1].strip(WHITESPACE)
            known = {s.section for s in SETTINGS}
            if section.startswith("guest:"):
                name = section[len("guest:") :]
                if not GUEST_NAME.match(name):
                    problems.append(
                        Problem(
                            here,
                            f"[guest:…]: {name!r} is not a valid guest name (no white space, "
                            "'/' or ',', and not starting with -)",
                        )
                    )
            elif section not in known:
                problems.append(
                    Problem(
                        here,
                        f"unknown section [{_shown(section)}]; expected one of "
                        + ", ".join(f"[{s}]" for s in sorted(known - {"guest:NAME"}))
                        + " or [guest:NAME]",
                    )
                )
                section = "?"
            continue
        key, sep, value = line.partition("=")
        key, value = key.strip(WHITESPACE), value.strip(WHITESPACE)
        if not sep or not key:
            problems.append(Problem(here, f"{line!r}: expected key = value"))
            continue
        if section == "?":
            continue  # already reported the section
        if not section:
            problems.append(Problem(here, f"{key!r} = … stands before any [section]"))
            continue
        spec = _settings_spec(section, key)
        if spec is None:
            keys = [s.key for s in SETTINGS if s.section == _generic(section)]
            problems.append(
                Problem(
                    here,
                    f"unknown setting {key!r} in [{_shown(section)}]; known: {', '.join(keys)}",
                )
            )
            continue
        equals = raw.index("=")
        after = raw[equals + 1 :]
        value_column = equals + 2 + len(after) - len(after.lstrip(WHITESPACE))
        if (section, key) in seen:
            problems.append(
                Problem(
                    here,
                    f"{key} set again in [{_shown(section)}] (first at {seen[section, key]})",
                )
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
    """A word of a crypttab line and the column it starts at."""

    text: str
    column: int


def _tokens(text: str, start_column: int, separator: str) -> Iterator[_Token]:
    column = start_column
    for part in text.split(separator):
        yield _Token(part, column)
        column += len(part) + len(separator)


def _shown(text: str, *, quote: bool = False) -> str:
    """`text` for a message that must stay one line: as it is (in double quotes with quote=True)
    when printable, else Python's escaped repr."""
    if text.isprintable():
        return f'"{text}"' if quote else text
    return repr(text)


def path_problem(path: str) -> str:
    """What makes `path` unusable in a unit (systemd refuses it, or it names no file), or ""."""
    if not path.startswith("/"):
        return f"{path!r} is a relative path; write an absolute path"
    if re.search(r"[\x00-\x1f\x7f]", path):
        return f"{path!r} has a control character"
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if ".." in parts:
        return f"{path!r} has a .. component; write the path without it"
    long = [part for part in parts if len(part.encode()) > NAME_MAX]
    if long:
        return (
            f"{path!r} has a component of {len(long[0].encode())} bytes; a file name has at "
            f"most {NAME_MAX}"
        )
    if len(path.encode()) >= PATH_MAX:
        return f"{path!r} is {len(path.encode())} bytes long; a path has fewer than {PATH_MAX}"
    return ""


def _is_noncharacter(char: str) -> bool:
    code = ord(char)
    return 0xFDD0 <= code <= 0xFDEF or (code & 0xFFFE) == 0xFFFE


def udev_escape(value: str) -> str:
    """A tag value as systemd's generator names its /dev/disk/by-* link (encode_devnode_name()):
    valid multi-byte UTF-8 characters as they are, every other byte outside [A-Za-z0-9#+-.:=@_]
    (and every backslash) as \\xNN."""
    out = []
    for char in value:
        if (
            (char.isascii() and char.isalnum())
            or char in "#+-.:=@_"
            or (not char.isascii() and not _is_noncharacter(char))
        ):
            out.append(char)
        else:
            out.extend(f"\\x{byte:02x}" for byte in char.encode())
    return "".join(out)


def _unquote(value: str) -> str:
    """systemd's unquote(value, QUOTES): one pair of matching outer quotes removed."""
    if len(value) >= 2 and value[0] in "'\"" and value[-1] == value[0]:
        return value[1:-1]
    return value


def resolve_source(source: str) -> str | None:
    """The device path a crypttab source names, byte for byte as systemd's generator resolves it
    (fstab_node_to_udev_node()); None if it names none."""
    if source.startswith("/"):
        return source
    tag, sep, value = source.partition("=")
    if sep and tag in SOURCE_TAGS:
        value = _unquote(value)
        if value:
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
    keyfile, device = _split_keyspec(text)
    if device:
        name = _shown(os.path.basename(keyfile)) or "NAME.key"
        problems.append(
            Problem(
                here,
                f"key {text!r} is keyfile {keyfile!r} on device {_shown(device)}; a keyfile on "
                f"another device is not supported by luksvm (it would have to mount that device at "
                f"boot): copy the key to {KEYS_DIR}/{name} (root-owned, mode 0400) and write "
                f"that path",
            )
        )
        return Key("file", path=keyfile)
    if text.startswith("/"):
        problem = path_problem(text)
        if problem:
            problems.append(Problem(here, f"key {problem}"))
        return Key("file", path=text)
    problems.append(
        Problem(
            here,
            f"key {_shown(text, quote=True)} is a relative path; write an absolute path such as "
            f"{KEYS_DIR}/{_shown(os.path.basename(text)) or 'NAME.key'}, or - to ask for a "
            "passphrase",
        )
    )
    return Key("file", path=text)


def _split_keyspec(text: str) -> tuple[str, str]:
    """KEYFILE:DEVICE as systemd's generator splits a key field (split_keyspec()): at the last
    colon, when what follows names a device; (text, "") otherwise."""
    keyfile, sep, device = text.rpartition(":")
    if sep and (resolve_source(device) or "").startswith("/"):
        return keyfile, device
    return text, ""


def _parse_options(
    token: _Token, path: str, lineno: int, problems: list[Problem]
) -> tuple[tuple[_Token, ...], tuple[str, ...]]:
    options: list[_Token] = []
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
                        "domain name (no white space, '/' or ',', not starting with -)",
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
        elif name in crypttab_options.NOT_SUPPORTED:
            why = crypttab_options.NOT_SUPPORTED[name]
            problems.append(Problem(here, f"option {name!r} is not supported by luksvm: {why}"))
        elif name in STANDARD_OPTIONS:
            problem = crypttab_options.check_option(option.text)
            if not problem and "\\" in option.text:
                problem = (
                    f"{option.text!r} has a backslash; systemd reads \\, as an escaped comma "
                    "and luksvm does not: write the value without backslashes"
                )
            if problem:
                problems.append(Problem(here, problem))
            else:
                options.append(option)
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


def _fields(line: str) -> list[_Token]:
    """The white-space separated fields of a crypttab line, as sscanf("%ms") splits them."""
    return [
        _Token(m.group(), m.start() + 1)
        for m in re.finditer(f"[^{re.escape(FIELD_SEPARATORS)}]+", line)
    ]


def parse_crypttab(text: str, path: str) -> tuple[list[Volume], list[Problem]]:
    volumes: list[Volume] = []
    problems: list[Problem] = _nul_problems(text, path)
    if problems:
        return volumes, problems
    for lineno, raw in enumerate(read_lines(text), start=1):
        stripped = raw.strip(WHITESPACE)
        if not stripped or stripped.startswith("#"):
            continue
        if len(raw.encode()) >= LONG_LINE_MAX:
            problems.append(
                Problem(
                    Location(path, lineno),
                    f"line of {len(raw.encode())} bytes; systemd reads lines of less than "
                    f"{LONG_LINE_MAX} bytes",
                )
            )
            continue
        fields = _fields(raw)
        first = Location(path, lineno, fields[0].column if fields else 1)
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
                    "#+-.:=@_ (at most 127 characters, not starting with -)",
                )
            )
        device = resolve_source(source.text)
        source_at = Location(path, lineno, source.column)
        if device is None:
            problems.append(
                Problem(
                    source_at,
                    f"source {source.text!r}: expected an absolute device path or "
                    "UUID=, PARTUUID=, LABEL=, PARTLABEL=",
                )
            )
        else:
            problem = path_problem(device) or _device_unit_problem(device)
            if problem:
                problems.append(Problem(source_at, f"source {source.text!r}: {problem}"))
                device = None
        key_token = fields[2] if len(fields) > 2 else _Token("-", 0)
        key = _parse_key(key_token, Location(path, lineno, key_token.column), problems)
        options: tuple[_Token, ...] = ()
        guests: tuple[str, ...] = ()
        if len(fields) > 3:
            options, guests = _parse_options(fields[3], path, lineno, problems)
        tang, timeout = (
            parse_unattended(fields[3], path, lineno, problems)
            if len(fields) > 3
            else (False, None)
        )
        volumes.append(
            Volume(
                name.text,
                source.text,
                device or "",
                key,
                tuple(o.text for o in options),
                guests,
                first,
                tuple(o.column for o in options),
                tang=tang,
                unattended_timeout=timeout,
            )
        )
    return volumes, problems


def _device_unit_problem(device: str) -> str:
    """What stops systemd naming the device unit of `device`, or ""."""
    from luksvm import units  # units renders from the configuration: imported when needed

    try:
        units.device_unit(device)
    except UsageError as error:
        return str(error)
    return ""


def fragment_paths(root: str) -> list[str]:
    """*.conf in ROOT/etc/luksvm/crypttab.d in lexical order, like systemd's .d directories;
    OSError when the folder exists but cannot be listed (not a folder, a symlink loop …)."""
    directory = os.path.join(root, CRYPTTAB_DIR)
    try:
        names = sorted(n for n in os.listdir(directory) if n.endswith(".conf"))
    except FileNotFoundError:
        return []
    return [os.path.join(directory, n) for n in names]


# Configuration files are small; a bigger "file" is a mistake (a device, a log) and is refused.
MAX_FILE_SIZE = 16 * 1024 * 1024
_FILE_TYPES = {
    stat.S_IFDIR: "a folder",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def read_text_file(path: str) -> str:
    """A configuration file's text. Never blocks: opened with O_NONBLOCK, and anything but a
    regular file is refused before reading. OSError (strerror says why) or UnicodeDecodeError."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = _FILE_TYPES.get(stat.S_IFMT(info.st_mode), "not a regular file")
            raise OSError(errno.EINVAL, f"it is {kind}, not a regular file")
        if info.st_size > MAX_FILE_SIZE:
            raise OSError(errno.EFBIG, f"{info.st_size} bytes; a configuration file is smaller")
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode("utf-8")


def _read(path: str, problems: list[Problem]) -> str | None:
    try:
        return read_text_file(path)
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
        _check_unit_names(volume, problems)
        for guest in volume.guests:
            guest_volumes.setdefault(guest, []).append(volume.name)
    for name, _ in settings.guest_overrides:
        if name not in guest_volumes:
            problems.append(
                Problem(
                    Location(settings_path, 1),
                    f"[guest:{_shown(name)}] has settings but no volume names it; add "
                    f"x-luksvm.guest={_shown(name)} to its volumes' options or remove the section",
                )
            )
    guests = [
        Guest(name, tuple(names), settings.policy_for(name))
        for name, names in guest_volumes.items()
    ]
    guests.sort(key=lambda g: g.policy.order)  # stable: config order within one order value
    return tuple(kept), tuple(guests)


def _check_unit_names(volume: Volume, problems: list[Problem]) -> None:
    """The units named after the volume and its guests must fit systemd's name limit."""
    from luksvm import units  # units renders from the configuration: imported when needed

    for make, name in [(units.unlock_unit, volume.name)] + [
        (units.guest_unit, guest) for guest in volume.guests
    ]:
        try:
            make(name)
        except UsageError as error:
            problems.append(Problem(volume.where, str(error)))


def _root_problem(root: str) -> Problem | None:
    """--root must name an existing folder: a typo must not read as "no volumes"."""
    try:
        info = os.stat(root)
    except OSError as error:
        return Problem(Location(root, 1), f"cannot use --root {root}: {error.strerror}")
    if not stat.S_ISDIR(info.st_mode):
        return Problem(Location(root, 1), f"cannot use --root {root}: not a folder")
    return None


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
    bad_root = _root_problem(root)
    if bad_root is not None:
        return Config(os.path.abspath(root), (), (), Settings(), ()), [bad_root]
    try:
        files = fragment_paths(root)
    except OSError as error:
        directory = os.path.join(root, CRYPTTAB_DIR)
        problems.append(Problem(Location(directory, 1), f"cannot list: {error.strerror}"))
        files = []
    for path in files:
        text = _read(path, problems)
        if text is not None:
            found, more = parse_crypttab(text, path)
            volumes.extend(found)
            problems.extend(more)
    settings_path = os.path.join(root, SETTINGS_FILE)
    settings = Settings()
    if os.path.lexists(settings_path):
        text = _read(settings_path, problems)
        if text is not None:
            settings, more = parse_settings(text, settings_path)
            problems.extend(more)
        files.append(settings_path)
    kept, guests = build(volumes, settings, settings_path, problems)
    return Config(os.path.abspath(root), kept, guests, settings, tuple(files)), problems


def option_warnings(config: Config, systemd_version: int | None) -> list[Problem]:
    """Options the installed systemd-cryptsetup (of `systemd_version`) does not know yet: it would
    ignore them. None (the version cannot be told): no warnings."""
    if systemd_version is None:
        return []
    warnings = []
    for volume in config.volumes:
        columns = volume.option_columns or (volume.where.column,) * len(volume.options)
        for option, column in zip(volume.options, columns):
            spec = crypttab_options.OPTIONS.get(option.partition("=")[0])
            # the generator's options are luksvm's to implement: its units do, on any systemd
            if spec is not None and not spec.generator and spec.since > systemd_version:
                name = spec.name + ("=" if spec.form == "value" else "")
                warnings.append(
                    Problem(
                        Location(volume.where.path, volume.where.line, column),
                        f"{name} needs systemd {spec.since}; this host has systemd "
                        f"{systemd_version}, whose systemd-cryptsetup ignores it",
                    )
                )
    return warnings


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
