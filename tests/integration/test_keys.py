"""keys.obtain_key against real cryptsetup: LUKS2 tokens (the built-in luks2-keyring token type,
fed from the kernel keyring with keyctl), keyfiles with their checks, offset and size, --root,
python keyring, --key-file FILE and -, and the refusal when nothing gives a key."""

from __future__ import annotations

import io
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from luksvm import config, keys
from luksvm.errors import LuksvmError, UsageError
from luksvm.run import run
from tests.conftest import write_config
from tests.integration.conftest import make_luks, sh

KEY = b"correct horse battery staple"
STEP = "step 7 (cryptsetup resize)"
PLAINTEXT = "keyrings.alt.file.PlaintextKeyring"


def volume_of(root: Path, line: str, settings: str | None = None) -> config.Volume:
    write_config(root, {"10.conf": line + "\n"}, settings)
    cfg = config.load(str(root))
    return cfg.volumes[0]


def keyfile(path: Path, data: bytes, mode: int = 0o400) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)
    return path


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return make_luks(tmp_path / "disk.img", KEY)


@pytest.fixture
def stdin(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """Replace standard input (not a terminal) with given bytes."""

    def feed(data: bytes) -> None:
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data)))

    feed(b"")
    yield feed


@pytest.fixture
def token(image: Path) -> Iterator[str]:
    """A luks2-keyring token on `image` whose passphrase sits in the user keyring under a unique
    description; the key is purged afterwards."""
    description = f"luksvm-test-{uuid.uuid4().hex[:10]}"
    sh("cryptsetup", "token", "add", "--key-description", description, str(image))
    yield description
    subprocess.run(["keyctl", "purge", "user", description], capture_output=True, check=False)


def test_a_token_that_opens_the_container_comes_first_and_carries_no_secret(
    tmp_path: Path, image: Path, token: str
) -> None:
    sh("keyctl", "padd", "user", token, "@u", stdin=KEY)
    path = keyfile(tmp_path / "root/etc/luksvm/keys/k", KEY)
    volume = volume_of(tmp_path / "root", f"cr_t {image} /etc/luksvm/keys/k luks")
    assert path.exists()
    key = keys.obtain_key(str(image), step=STEP, volume=volume, root=str(tmp_path / "root"))
    assert (key.source, key.options(), key.stdin) == ("token", ("--token-only",), None)


def test_a_token_that_cannot_open_falls_through_to_the_configured_keyfile(
    tmp_path: Path, image: Path, token: str
) -> None:
    keyfile(tmp_path / "root/etc/luksvm/keys/k", KEY)
    volume = volume_of(tmp_path / "root", f"cr_t {image} /etc/luksvm/keys/k luks")
    key = keys.obtain_key(str(image), step=STEP, volume=volume, root=str(tmp_path / "root"))
    assert (key.source, key.options(), key.stdin) == ("keyfile", ("--key-file=-",), KEY)


def test_the_secret_never_shows_in_repr_or_str(tmp_path: Path, image: Path) -> None:
    keyfile(tmp_path / "k", KEY)
    volume = volume_of(tmp_path / "root", f"cr_t {image} {tmp_path / 'k'} luks")
    key = keys.obtain_key(str(image), step=STEP, volume=volume)
    assert key.secret == KEY
    assert KEY.decode() not in repr(key) + str(key)
    assert "correct" not in repr(key)


@pytest.mark.parametrize("mode", [0o644, 0o440, 0o404])
def test_a_keyfile_others_may_read_is_refused_as_unlock_refuses_it(
    tmp_path: Path, image: Path, mode: int
) -> None:
    path = keyfile(tmp_path / "k", KEY, mode)
    volume = volume_of(tmp_path / "root", f"cr_t {image} {path} luks")
    with pytest.raises(LuksvmError) as caught:
        keys.obtain_key(str(image), step=STEP, volume=volume, key_file="-")
    assert caught.value.message == (
        f"cr_t: keyfile {path} has mode {mode:04o}: group or others may access it"
    )
    assert caught.value.fix == f"chmod 0400 {path}"


def test_a_missing_keyfile_is_a_clean_error_with_a_fix(tmp_path: Path, image: Path) -> None:
    volume = volume_of(tmp_path / "root", f"cr_t {image} /etc/luksvm/keys/gone luks")
    with pytest.raises(LuksvmError) as caught:
        keys.obtain_key(str(image), step=STEP, volume=volume, root=str(tmp_path / "root"))
    assert caught.value.message.endswith("keys/gone does not exist")
    assert "mode 0400" in caught.value.fix


def test_keyfile_offset_and_size_select_the_key_bytes_under_root(
    tmp_path: Path, image: Path
) -> None:
    root = tmp_path / "root"
    keyfile(root / "etc/luksvm/keys/k", b"JUNK" + KEY + b"TRAILING")
    volume = volume_of(
        root, f"cr_t {image} /etc/luksvm/keys/k luks,keyfile-offset=4,keyfile-size={len(KEY)}"
    )
    key = keys.obtain_key(str(image), step=STEP, volume=volume, root=str(root))
    assert (key.source, key.secret) == ("keyfile", KEY)
    assert "bytes 4…32" in key.description


def test_a_keyfile_shorter_than_keyfile_size_is_named(tmp_path: Path, image: Path) -> None:
    path = keyfile(tmp_path / "k", KEY)
    volume = volume_of(tmp_path / "root", f"cr_t {image} {path} luks,keyfile-size=4096")
    with pytest.raises(LuksvmError, match="fewer than keyfile-size=4096"):
        keys.obtain_key(str(image), step=STEP, volume=volume)


def test_a_keyring_key_comes_from_the_configured_backend(
    tmp_path: Path, image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import keyring.core

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("PYTHON_KEYRING_BACKEND", raising=False)
    keyring.core.load_keyring(PLAINTEXT).set_password("luksvm", "cr_t", KEY.decode())
    root = tmp_path / "root"
    volume = volume_of(
        root, f"cr_t {image} keyring:luksvm/cr_t luks", f"[keys]\nkeyring_backend = {PLAINTEXT}\n"
    )
    key = keys.obtain_key(
        str(image), step=STEP, volume=volume, settings=config.load(str(root)).settings
    )
    assert (key.source, key.secret) == ("keyring", KEY)


def test_key_file_argument_and_stdin(tmp_path: Path, image: Path, stdin: object) -> None:
    given = keyfile(tmp_path / "given", KEY, 0o644)  # the admin's own file: no owner/mode rule
    key = keys.obtain_key(str(image), step=STEP, key_file=str(given))
    assert (key.source, key.secret) == ("key-file", KEY)
    stdin(KEY)  # type: ignore[operator]
    key = keys.obtain_key(str(image), step=STEP, key_file="-")
    assert (key.source, key.secret) == ("stdin", KEY)


def test_a_wrong_key_file_is_refused_naming_the_step(tmp_path: Path, image: Path) -> None:
    given = keyfile(tmp_path / "given", b"wrong")
    with pytest.raises(LuksvmError) as caught:
        keys.obtain_key(str(image), step=STEP, key_file=str(given))
    assert caught.value.message == (
        f"{STEP} needs the key of {image}, and none of --key-file {given} opens a keyslot of "
        f"{image}"
    )


def test_a_missing_key_file_is_a_usage_error(tmp_path: Path, image: Path) -> None:
    with pytest.raises(UsageError, match="cannot read it: No such file or directory"):
        keys.obtain_key(str(image), step=STEP, key_file=str(tmp_path / "nope"))


def test_with_no_source_and_no_terminal_it_refuses_naming_the_step(
    image: Path, stdin: object
) -> None:
    with pytest.raises(LuksvmError) as caught:
        keys.obtain_key(str(image), step=STEP)
    assert caught.value.message.startswith(f"{STEP} needs the key of {image}: no LUKS2 token")
    assert "--key-file -" in caught.value.fix
    assert "ssh -t" in caught.value.fix


def test_a_new_container_takes_the_configured_key_untested(tmp_path: Path) -> None:
    path = keyfile(tmp_path / "k", KEY)
    volume = volume_of(tmp_path / "root", f"cr_t /dev/null {path} luks")
    key = keys.obtain_key("/dev/null", step="format", volume=volume, new=True)
    assert key.secret == KEY


def test_memfd_path_hands_the_key_to_a_tool_that_wants_a_path(image: Path) -> None:
    key = keys.Key("stdin", "test", KEY)
    with keys.memfd_path(key) as (path, fd):
        result = run(
            ["cryptsetup", "open", "--test-passphrase", f"--key-file={path}", str(image)],
            timeout=60,
            check=False,
            pass_fds=(fd,),
        )
    assert result.returncode == 0, result.stderr
    with pytest.raises(OSError):
        os.fstat(fd)  # closed after the block
