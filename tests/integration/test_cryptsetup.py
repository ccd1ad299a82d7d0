from __future__ import annotations

from pathlib import Path

import pytest

from luksvm import cryptsetup
from luksvm.errors import LuksvmError
from tests.integration.conftest import make_luks, sh


@pytest.mark.parametrize("key_size", [256, 512])
def test_luks1_header_reads_with_sector_offset_in_bytes(tmp_path: Path, key_size: int) -> None:
    image = make_luks(tmp_path / "l1.img", b"secret", version=1, key_size=key_size)
    header = cryptsetup.read_header(str(image))
    assert header.version == 1
    assert header.uuid == sh("cryptsetup", "luksUUID", str(image)).strip()
    dump = sh("cryptsetup", "luksDump", str(image))
    payload_sectors = int(
        next(line for line in dump.splitlines() if "Payload offset" in line).split()[-1]
    )
    assert header.data_offset == payload_sectors * 512
    assert [(s.number, s.kdf, s.key_bits) for s in header.keyslots] == [(0, "pbkdf2", key_size)]
    assert header.cipher == "aes-xts-plain64"


def test_luks2_header_with_label_two_keyslots_and_flags(tmp_path: Path) -> None:
    image = make_luks(tmp_path / "l2.img", b"secret", extra=("--label", "mailbox"))
    old_key, new_key = tmp_path / "old.key", tmp_path / "new.key"
    old_key.write_bytes(b"secret")
    new_key.write_bytes(b"recovery")
    sh(
        "cryptsetup",
        "luksAddKey",
        "-q",
        "--pbkdf",
        "pbkdf2",
        "--pbkdf-force-iterations",
        "1000",
        "--key-file",
        str(old_key),
        str(image),
        str(new_key),
    )
    header = cryptsetup.read_header(str(image))
    assert header.version == 2
    assert header.label == "mailbox"
    assert header.data_offset == 16 * 1024 * 1024
    assert header.header_size == header.data_offset
    assert header.sector_size in (512, 4096)
    assert [(s.number, s.kdf) for s in header.keyslots] == [(0, "pbkdf2"), (1, "pbkdf2")]


def test_non_luks_is_refused_with_the_device_named(tmp_path: Path) -> None:
    image = tmp_path / "plain.img"
    image.write_bytes(b"\0" * 4096)
    assert not cryptsetup.is_luks(str(image))
    with pytest.raises(LuksvmError, match=f"{image} is not a LUKS device"):
        cryptsetup.read_header(str(image))


def test_test_passphrase_takes_the_key_on_stdin(luks2_image: Path) -> None:
    assert cryptsetup.test_passphrase(str(luks2_image), b"correct horse")
    assert not cryptsetup.test_passphrase(str(luks2_image), b"wrong")


def test_header_backup_is_the_header_area(luks2_image: Path, tmp_path: Path) -> None:
    backup = tmp_path / "h.bin"
    cryptsetup.header_backup(str(luks2_image), str(backup))
    header = cryptsetup.read_header(str(luks2_image))
    assert backup.stat().st_size == header.header_size
    assert cryptsetup.read_header(str(backup)).uuid == header.uuid


def _reading(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, ...]]:
    ran: list[tuple[str, ...]] = []
    real_run = cryptsetup.run

    def recording_run(argv: list[str], **kwargs: object) -> object:
        ran.append(tuple(argv[:3]))
        return real_run(argv, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(cryptsetup, "run", recording_run)
    return ran


def _two_dumps(image: Path) -> cryptsetup.LuksHeader:
    """What read_header returned before: the text dump, then the JSON dump."""
    import json

    text = sh("cryptsetup", "luksDump", str(image))
    metadata = json.loads(sh("cryptsetup", "luksDump", "--dump-json-metadata", str(image)))
    return cryptsetup.parse_luks2(str(image), text, metadata)


@pytest.mark.parametrize("version", [1, 2])
def test_a_header_is_read_with_one_cryptsetup_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version: int
) -> None:
    image = make_luks(tmp_path / "l.img", b"secret", version=version, extra=("--label", "mail"))
    ran = _reading(monkeypatch)
    header = cryptsetup.read_header(str(image))
    assert len(ran) == 1, ran
    assert header.uuid == sh("cryptsetup", "luksUUID", str(image)).strip()
    if version == 2:
        assert ran == [("cryptsetup", "luksDump", "--dump-json-metadata")]
        assert header == _two_dumps(image)
        assert header.label == "mail"


def test_a_luks2_primary_header_that_does_not_check_out_is_read_from_the_text_dump(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = make_luks(tmp_path / "l2.img", b"secret", extra=("--label", "mail"))
    expected = _two_dumps(image)
    with open(image, "r+b") as f:  # the label in the primary binary header: checksum breaks
        f.seek(24)
        f.write(b"evil\0")
    ran = _reading(monkeypatch)
    header = cryptsetup.read_header(str(image))
    # cryptsetup reads the intact secondary copy; luksvm does not trust the bytes it cannot check
    assert header == expected and header.label == "mail"
    assert ran[-2:] == [
        ("cryptsetup", "luksDump", str(image)),
        ("cryptsetup", "luksDump", "--dump-json-metadata"),
    ]
