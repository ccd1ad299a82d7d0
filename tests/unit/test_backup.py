from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from luksvm import backup, cryptsetup
from luksvm.config import Key, Location, Volume
from luksvm.cryptsetup import Keyslot, LuksHeader
from luksvm.errors import LuksvmError, UsageError
from tests.unit.fake_sysfs import host_stack

T0 = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=timezone.utc)


def made(n: int, raw: bool = False) -> backup.Backup:
    """The n-th backup, one day apart (higher n is newer)."""
    moment = T0 + timedelta(days=n)
    name = f"{backup.stamp(moment)}_" + ("raw-before-restore.bin" if raw else "u.luksheader")
    return backup.Backup(f"/b/{name}", moment.replace(microsecond=123000), "" if raw else "u", raw)


def newest_first(*items: backup.Backup) -> list[backup.Backup]:
    return sorted(items, key=lambda b: b.created, reverse=True)


def test_stamp_sorts_as_it_reads_and_round_trips() -> None:
    assert backup.stamp(T0) == "20240501T120000.123Z"
    assert backup.parse_stamp("20240501T120000.123Z") == T0.replace(microsecond=123000)
    assert backup.iso(T0) == "2024-05-01T12:00:00.123Z"


def test_list_backups_knows_its_own_names_only(tmp_path: Path) -> None:
    names = [
        "20240501T120000.123Z_0a1b-c2.luksheader",
        "20240502T120000.000Z_0a1b-c2.luksheader",
        "20240502T120000.000Z_0a1b-c2.luksheader.json",
        "20240503T000000.000Z_raw-before-restore.bin",
        ".20240504T000000.000Z.77.tmp",
        "notes.txt",
    ]
    for name in names:
        (tmp_path / name).touch()
    found = backup.list_backups(str(tmp_path))
    assert [(Path(b.path).name, b.raw) for b in found] == [
        (names[3], True),
        (names[1], False),
        (names[0], False),
    ]
    assert found[1].uuid == "0a1b-c2"
    assert backup.list_backups(str(tmp_path / "none")) == []


def test_rotation_counts_the_backup_being_added() -> None:
    existing = newest_first(*(made(n) for n in range(5)))
    assert backup.deletions(existing, keep=5, adding=False) == []
    assert backup.deletions(existing, keep=5, adding=True) == [existing[4]]
    assert backup.deletions(existing, keep=2, adding=True) == existing[1:]
    assert backup.deletions(existing[:1], keep=1, adding=True) == existing[:1]


def test_rotation_ignores_raw_copies_and_prune_takes_them() -> None:
    raw = made(1, raw=True)
    existing = newest_first(made(0), raw, made(2), made(3))
    assert backup.deletions(existing, keep=2, adding=False) == [made(0)]
    cutoff = T0 + timedelta(days=2, hours=1)
    assert backup.deletions(existing, keep=5, adding=False, prune_before=cutoff) == [
        made(2),
        raw,
        made(0),
    ]


def test_prune_keeps_the_newest_unless_a_new_one_replaces_it() -> None:
    existing = newest_first(made(0), made(1))
    far_future = T0 + timedelta(days=100)
    assert backup.deletions(existing, keep=5, adding=False, prune_before=far_future) == [made(0)]
    assert backup.deletions(existing, keep=5, adding=True, prune_before=far_future) == existing


def test_prune_dates() -> None:
    now = datetime(2024, 6, 1, tzinfo=timezone.utc)
    assert backup.parse_date("now", now) == now
    assert backup.parse_date("2024-05-01T12:00Z") == datetime(2024, 5, 1, 12, tzinfo=timezone.utc)
    assert backup.parse_date("2024-05-01T12:00+02:00").hour == 10
    assert backup.parse_date("2024-05-01").tzinfo == timezone.utc
    with pytest.raises(UsageError, match="expected now, a date"):
        backup.parse_date("last tuesday")


def header(uuid: str = "u-1", slots: tuple[int, ...] = (0,), version: int = 2) -> LuksHeader:
    return LuksHeader(
        "/dev/x", version, uuid, "", "aes-xts-plain64", 16 << 20, 512,
        tuple(Keyslot(n, "argon2id", 512) for n in slots), (), (),
    )  # fmt: skip


def test_header_differences_name_what_differs() -> None:
    assert backup.header_differences(header(), header()) == []
    assert backup.header_differences(header(), header("u-2", (0, 1))) == [
        "UUID u-2 where the device has u-1",
        "keyslots (number, kdf, key bits) ((0, 'argon2id', 512), (1, 'argon2id', 512)) where "
        "the device has ((0, 'argon2id', 512),)",
    ]
    assert "LUKS version 1" in backup.header_differences(header(), header(version=1))[0]


def volume(name: str, device: str = "/dev/volgrp4/lvimap_hd0") -> Volume:
    return Volume(name, device, device, Key("ask"), ("luks",), (), Location("t.conf", 1))


def test_backup_dir_on_a_volume_it_backs_up_is_refused_with_the_stack(tmp_path: Path) -> None:
    host_stack(tmp_path)
    volumes = [volume("cr_web"), volume("cr_imap_encr")]
    reason = backup.directory_on_volumes(
        "/srv/backups", volumes, sys_dir=str(tmp_path), number="253:4"
    )
    assert reason is not None
    assert reason.startswith("backup dir /srv/backups is on the encrypted volume cr_imap_encr")
    assert "vgmail-root (dm-4) → cr_imap_encr (dm-3) → volgrp4-lvimap_hd0 (dm-2)" in reason
    assert "set [backup] dir" in reason
    # on the host LV below (not decrypted by luksvm), or with other volumes: fine
    assert backup.directory_on_volumes("/b", volumes, sys_dir=str(tmp_path), number="253:2") is None
    assert (
        backup.directory_on_volumes("/b", volumes[:1], sys_dir=str(tmp_path), number="253:4")
        is None
    )


def test_confirmation_wants_the_mapping_name_exactly() -> None:
    backup.confirm("cr_web", "/dev/x", ask=lambda prompt: " cr_web\n")
    for answer in ("yes", "cr_we", ""):
        with pytest.raises(LuksvmError, match="not confirmed"):
            backup.confirm("cr_web", "/dev/x", ask=lambda prompt, a=answer: a)  # type: ignore[misc]

    def closed(prompt: str) -> str:
        raise EOFError

    with pytest.raises(LuksvmError, match="nothing changed"):
        backup.confirm("cr_web", "/dev/x", ask=closed)


def test_metadata_size_from_the_first_bytes() -> None:
    luks1 = b"LUKS\xba\xbe\x00\x01" + bytes(4088)
    luks2 = b"LUKS\xba\xbe\x00\x02" + (16384).to_bytes(8, "big") + bytes(4080)
    assert cryptsetup.metadata_size(luks1) == 4096
    assert cryptsetup.metadata_size(luks2) == 32768
    assert cryptsetup.metadata_size(luks2[:8] + (12345).to_bytes(8, "big")) == 0  # implausible
    assert cryptsetup.metadata_size(bytes(4096)) == 0


def test_a_record_whose_stamp_does_not_read_keeps_its_hashes(tmp_path: Path) -> None:
    record = tmp_path / "x.luksheader.json"
    record.write_text(
        '{"file_sha256": "ab", "metadata_bytes": 32768, "metadata_sha256": "cd", '
        '"file_stamp": "garbage", "file_hashed": "2024-05-01T12:00:00.000Z"}'
    )
    found = backup.read_record(
        backup.Backup(str(tmp_path / "x.luksheader"), datetime.now(timezone.utc), "u", False)
    )
    assert found == backup.Record("ab", 32768, "cd")  # no stamp: the file is hashed in full
