"""The one way to a key: LUKS2 tokens, configured keyfiles (checked before use) and python keyring
secrets, `--key-file FILE|-`, and a terminal prompt.

`obtain_key` is what every command that hands a key to cryptsetup itself calls (shrink, migrate,
and later enroll and grow). Unlocking at boot does not: systemd-cryptsetup reads the keyfile and
asks for passphrases itself; unlock and doctor share `check_keyfile` with `obtain_key` so the three
refuse the same keyfiles.

Secrets exist only as bytes handed to a process's stdin, or as a memfd a process opens by its
/proc/self/fd path: never in argv, the environment, logs, exception messages or a Key's repr.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

from luksvm import cryptsetup
from luksvm.config import KEYS_DIR, Settings, Volume
from luksvm.errors import LuksvmError, UsageError
from luksvm.run import run

BACKEND_VARIABLE = "PYTHON_KEYRING_BACKEND"
EXAMPLE_BACKEND = "keyrings.alt.file.PlaintextKeyring"


def keyfile_path(volume: Volume, root: str = "/") -> str:
    """The keyfile of `volume` as seen from here (under ROOT), after checking it is safe to use."""
    path = os.path.join(root, volume.key.path.lstrip("/")) if root != "/" else volume.key.path
    check_keyfile(volume.name, path)
    return path


def check_keyfile(volume: str, path: str) -> None:
    """Refuse a keyfile that is missing, not a regular file, not root's, or readable by others."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise LuksvmError(
            f"{volume}: keyfile {path} does not exist",
            fix=f"create it (root-owned, mode 0400, e.g. under {KEYS_DIR}/) or change the key "
            f"field of {volume}",
        ) from None
    except (OSError, ValueError) as error:
        why = error.strerror if isinstance(error, OSError) else str(error)
        raise LuksvmError(f"{volume}: cannot read keyfile {path}: {why}") from None
    if not stat.S_ISREG(info.st_mode):
        raise LuksvmError(
            f"{volume}: keyfile {path} is not a regular file",
            fix=f"point the key field of {volume} at a regular file",
        )
    if info.st_uid != 0:
        raise LuksvmError(
            f"{volume}: keyfile {path} is owned by uid {info.st_uid}, not root",
            fix=f"chown root:root {path}",
        )
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise LuksvmError(
            f"{volume}: keyfile {path} has mode {mode:04o}: group or others may access it",
            fix=f"chmod 0400 {path}",
        )


def keyring_backend_name(settings: Settings) -> str:
    """The backend `keyring:` keys come from: [keys] keyring_backend, else $PYTHON_KEYRING_BACKEND,
    else "" (python keyring's own choice, which is the fail backend in a system unit)."""
    return settings.keyring_backend or os.environ.get(BACKEND_VARIABLE, "")


def keyring_secret(volume: Volume, settings: Settings) -> bytes:
    """The secret python keyring holds for the `keyring:SERVICE/USER` key of `volume`."""
    import keyring.core
    import keyring.errors

    service, user = volume.key.service, volume.key.user
    where = f"{volume.name}: keyring:{service}/{user}"
    name = keyring_backend_name(settings)
    try:
        backend = keyring.core.load_keyring(name) if name else keyring.get_keyring()
    except Exception as error:
        raise LuksvmError(
            f"{where}: cannot load python keyring backend {name!r} "
            f"({type(error).__name__}: {error})",
            fix="install the package that provides it or fix [keys] keyring_backend in luksvm.conf",
        ) from None
    backend_name = f"{type(backend).__module__}.{type(backend).__qualname__}"
    try:
        secret = backend.get_password(service, user)
    except keyring.errors.NoKeyringError:
        raise LuksvmError(
            f"{where}: python keyring has no usable backend here (it fell back to the fail "
            "backend: system units have no session bus, so the desktop keyrings cannot work)",
            fix=f"set [keys] keyring_backend in luksvm.conf, e.g. {EXAMPLE_BACKEND}",
        ) from None
    except Exception as error:
        # Only the error's type: a backend's message is not ours to vouch for.
        raise LuksvmError(
            f"{where}: backend {backend_name} failed ({type(error).__name__})"
        ) from None
    if secret is None:
        raise LuksvmError(
            f"{where}: backend {backend_name} holds no secret for service {service!r} user "
            f"{user!r}",
            fix=f"store it with: {BACKEND_VARIABLE}={backend_name} keyring set {service} {user}",
        )
    return secret.encode("utf-8")


def terminal() -> bool:
    """True when a person at a terminal can answer a passphrase prompt."""
    return sys.stdin is not None and sys.stdin.isatty()


def in_unit() -> bool:
    """True inside a systemd service: its prompts go to systemd's ask-password agents."""
    return "INVOCATION_ID" in os.environ


# --- obtaining a key for cryptsetup ------------------------------------------------------------

PROMPT_TRIES = 3  # as cryptsetup's own --tries default
MAX_KEY_BYTES = 8 * 1024 * 1024  # cryptsetup's keyfile size limit (--keyfile-size maximum)


@dataclass(frozen=True)
class Key:
    """A key obtained for one LUKS device, ready to hand to cryptsetup.

    `source` is where it came from, as journald's LUKSVM_KEY_SOURCE names it (token, keyfile,
    keyring, key-file, stdin, prompt); `description` says it for people ("keyfile /etc/…",
    "--key-file -"). A token key holds no secret: cryptsetup unlocks through the volume's LUKS2
    token itself (`--token-only`). The secret never shows in repr() or str().
    """

    source: str
    description: str
    secret: bytes = field(default=b"", repr=False)

    @property
    def token_only(self) -> bool:
        return self.source == "token"

    def options(self) -> tuple[str, ...]:
        """The cryptsetup options that hand this key over: `--token-only`, or `--key-file=-`
        with `stdin` on the command's standard input."""
        return ("--token-only",) if self.token_only else ("--key-file=-",)

    @property
    def stdin(self) -> bytes | None:
        """What goes to the command's stdin (None for a token key)."""
        return None if self.token_only else self.secret


def obtain_key(
    device: str,
    *,
    step: str,
    volume: Volume | None = None,
    settings: Settings | None = None,
    root: str = "/",
    key_file: str | None = None,
    new: bool = False,
) -> Key:
    """The key for the LUKS container `device`, needed by `step` (e.g. "step 5 (cryptsetup
    resize)"), from the first source that has one, in this order:

    1. the container's LUKS2 tokens (a TPM2 token needs no one), if one opens it now;
    2. the configured key of `volume` (keyfile: owner and mode checked as unlock does,
       keyfile-offset=/keyfile-size= honoured, under `root`; keyring: [keys] keyring_backend);
    3. `key_file`: a file the admin named (`--key-file FILE`), or "-" for standard input;
    4. a passphrase prompt on the terminal (asked twice when `new`).

    Each key is tested against the container's keyslots before it is returned (not when `new`:
    the container is about to be formatted with it). With no source that opens it, raises a
    LuksvmError naming `step`; call this before the first change, so the refusal changes nothing.
    """
    name = volume.name if volume is not None else device
    tried: list[str] = []
    if not new and _has_tokens(device):
        if _opens(device, ("--token-only",), None):
            return Key("token", f"a LUKS2 token of {device}")
        tried.append("its LUKS2 token(s)")
    if volume is not None and volume.key.kind != "ask":
        key = _configured_key(volume, settings or Settings(), root)
        if new or _opens(device, key.options(), key.stdin):
            return key
        tried.append(key.description)
    if key_file is not None:
        key = _named_key(key_file)
        if new or _opens(device, key.options(), key.stdin):
            return key
        tried.append(key.description)
    elif terminal():
        return _prompted_key(device, name, new=new)
    if tried:
        raise LuksvmError(
            f"{step} needs the key of {name}, and none of {', '.join(tried)} opens a keyslot of "
            f"{device}",
            fix="give a key that does with --key-file FILE (or --key-file - on standard input), "
            "or run luksvm in a terminal to be asked",
        )
    raise LuksvmError(
        f"{step} needs the key of {name}: no LUKS2 token opens it, no key is configured for it, "
        "no --key-file was given, and there is no terminal to ask on; nothing was changed",
        fix="pass --key-file FILE (or --key-file - with the key on standard input), or run "
        "luksvm in a terminal (ssh -t HOST …)",
    )


def _has_tokens(device: str) -> bool:
    header = cryptsetup.read_header(device)
    return header.version == 2 and bool(header.tokens)


def _opens(device: str, options: tuple[str, ...], stdin: bytes | None) -> bool:
    """True when the key opens a keyslot of `device` (nothing is activated)."""
    result = run(
        ["cryptsetup", "open", "--test-passphrase", "--tries", "1", *options, device],
        stdin=stdin,
        secret=stdin is not None,
        timeout=cryptsetup.KEY_TIMEOUT,
        check=False,
    )
    return result.returncode == 0


def _configured_key(volume: Volume, settings: Settings, root: str) -> Key:
    if volume.key.kind == "keyring":
        return Key("keyring", str(volume.key), keyring_secret(volume, settings))
    path = keyfile_path(volume, root)
    offset = _option_bytes(volume, "keyfile-offset")
    size = _option_bytes(volume, "keyfile-size")
    with open(path, "rb") as f:
        f.seek(offset)
        secret = f.read(size if size else MAX_KEY_BYTES)
    where = f" (bytes {offset}…{offset + len(secret)})" if offset or size else ""
    if not secret or len(secret) < size:
        short = f"fewer than keyfile-size={size}" if size else "none"
        raise LuksvmError(
            f"{volume.name}: keyfile {path} holds {len(secret)} bytes after keyfile-offset="
            f"{offset}: {short}",
            fix=f"check the keyfile and its keyfile-offset=/keyfile-size= at {volume.where}",
        )
    return Key("keyfile", f"keyfile {volume.key.path}{where}", secret)


def _option_bytes(volume: Volume, option: str) -> int:
    value = volume.option(option)
    if not value:
        return 0
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise UsageError(
            f"{volume.where}: {option}={value} is not a byte count",
            fix=f"write {option}=N with N a whole number of bytes",
        )
    return number


def _named_key(key_file: str) -> Key:
    """The key the admin named with --key-file: a file's bytes, or standard input's with "-".
    Read as cryptsetup reads a keyfile: every byte, a trailing newline included."""
    if key_file == "-":
        secret = sys.stdin.buffer.read(MAX_KEY_BYTES + 1)
        description = "--key-file - (standard input)"
    else:
        description = f"--key-file {key_file}"
        try:
            with open(key_file, "rb") as f:
                secret = f.read(MAX_KEY_BYTES + 1)
        except (OSError, ValueError) as error:
            why = error.strerror if isinstance(error, OSError) else str(error)
            raise UsageError(
                f"--key-file {key_file}: cannot read it: {why}",
                fix="name a readable file holding the key, or - to pass it on standard input",
            ) from None
    if not secret:
        raise UsageError(f"{description} is empty", fix="pass the key itself")
    if len(secret) > MAX_KEY_BYTES:
        raise UsageError(
            f"{description} holds more than {MAX_KEY_BYTES} bytes (cryptsetup's limit)"
        )
    return Key("stdin" if key_file == "-" else "key-file", description, secret)


def _prompted_key(device: str, name: str, *, new: bool) -> Key:
    if new:
        first = getpass.getpass(f"New passphrase for {name}: ")
        if not first:
            raise UsageError("empty passphrase; nothing was changed")
        if getpass.getpass(f"Repeat the passphrase for {name}: ") != first:
            raise UsageError("the two passphrases differ; nothing was changed")
        return Key("prompt", "the passphrase typed", first.encode("utf-8"))
    for _ in range(PROMPT_TRIES):
        secret = getpass.getpass(f"Enter passphrase for {name} ({device}): ").encode("utf-8")
        if secret and _opens(device, ("--key-file=-",), secret):
            return Key("prompt", "the passphrase typed", secret)
        print("No key available with this passphrase.", file=sys.stderr)
    raise LuksvmError(
        f"no passphrase typed opens a keyslot of {device}", fix="check the passphrase and run again"
    )


@contextlib.contextmanager
def memfd_path(key: Key) -> Iterator[tuple[str, int]]:
    """The key as a file a child process can open, for tools that take key files only by path
    (`systemd-cryptenroll --unlock-key-file=`): yields (/proc/self/fd/N, N); pass N to the child
    (run(..., pass_fds=(N,))). The memory file is closed (and gone) after the block."""
    fd = os.memfd_create("luksvm-key", 0)
    try:
        os.write(fd, key.secret)
        os.lseek(fd, 0, os.SEEK_SET)
        yield f"/proc/self/fd/{fd}", fd
    finally:
        os.close(fd)
