"""Key sources: keyfiles (checked before use), python keyring secrets, and passphrase prompts.

Secrets exist only as bytes handed to a process's stdin: never in argv, the environment, logs or
exception messages. Passphrases are never read by luksvm at all: systemd-cryptsetup (or cryptsetup)
asks for them itself, through systemd's ask-password machinery or on the terminal.
"""

from __future__ import annotations

import os
import stat
import sys

from luksvm.config import KEYS_DIR, Settings, Volume
from luksvm.errors import LuksvmError

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
            f"{volume}: keyfile {path} does not exist; create it (root-owned, mode 0400, e.g. "
            f"under {KEYS_DIR}/) or change the key field of {volume}"
        ) from None
    except OSError as error:
        raise LuksvmError(f"{volume}: cannot read keyfile {path}: {error.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise LuksvmError(f"{volume}: keyfile {path} is not a regular file")
    if info.st_uid != 0:
        raise LuksvmError(
            f"{volume}: keyfile {path} is owned by uid {info.st_uid}, not root; "
            f"fix: chown root:root {path}"
        )
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise LuksvmError(
            f"{volume}: keyfile {path} has mode {mode:04o}: group or others may access it; "
            f"fix: chmod 0400 {path}"
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
            f"({type(error).__name__}: {error}); install the package that provides it or fix "
            "[keys] keyring_backend in luksvm.conf"
        ) from None
    backend_name = f"{type(backend).__module__}.{type(backend).__qualname__}"
    try:
        secret = backend.get_password(service, user)
    except keyring.errors.NoKeyringError:
        raise LuksvmError(
            f"{where}: python keyring has no usable backend here (it fell back to the fail "
            "backend: system units have no session bus, so the desktop keyrings cannot work); set "
            f"[keys] keyring_backend in luksvm.conf, e.g. {EXAMPLE_BACKEND}"
        ) from None
    except Exception as error:
        # Only the error's type: a backend's message is not ours to vouch for.
        raise LuksvmError(
            f"{where}: backend {backend_name} failed ({type(error).__name__})"
        ) from None
    if secret is None:
        raise LuksvmError(
            f"{where}: backend {backend_name} holds no secret for service {service!r} user "
            f"{user!r}; store it with: {BACKEND_VARIABLE}={backend_name} keyring set {service} "
            f"{user}"
        )
    return secret.encode("utf-8")


def terminal() -> bool:
    """True when a person at a terminal can answer a passphrase prompt."""
    return sys.stdin is not None and sys.stdin.isatty()


def in_unit() -> bool:
    """True inside a systemd service: its prompts go to systemd's ask-password agents."""
    return "INVOCATION_ID" in os.environ
