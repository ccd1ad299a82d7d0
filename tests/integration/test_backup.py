"""header-backup and header-restore with real cryptsetup on image files and loop devices."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from luksvm import backup, config, cryptsetup
from luksvm.cli import main
from luksvm.errors import UsageError
from tests.conftest import write_config
from tests.integration.conftest import FAST_KDF, flip_byte, make_luks, sh

KEY = b"correct horse"
Attach = Callable[..., str]


def configure(root: Path, volumes: dict[str, str], keep: int = 5) -> Path:
    """A config tree with one line per volume (name → source) and backups under ROOT/backups."""
    lines = "".join(f"{name} {source} - luks\n" for name, source in volumes.items())
    write_config(root, {"10-test.conf": lines}, f"[backup]\ndir = {root}/backups\nkeep = {keep}\n")
    return root / "backups"


def backups_of(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.luksheader"))


def add_key(image: Path, tmp_path: Path, new: bytes = b"second") -> None:
    old_key, new_key = tmp_path / "old.key", tmp_path / "new.key"
    old_key.write_bytes(KEY)
    new_key.write_bytes(new)
    kdf = (
        ["--pbkdf-force-iterations", "1000"]
        if cryptsetup.read_header(str(image)).version == 1
        else FAST_KDF
    )
    sh(
        "cryptsetup", "luksAddKey", "-q", *kdf, "--key-file", str(old_key), str(image),
        str(new_key),
    )  # fmt: skip


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("version", "key_size", "expected_size"),
    [(1, 256, 1052672), (1, 512, 2068480), (2, None, 16 << 20)],
    ids=["luks1-256", "luks1-512", "luks2"],
)
def test_backup_is_what_luksheaderbackup_writes_and_verifies(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    version: int,
    key_size: int | None,
    expected_size: int,
) -> None:
    image = make_luks(tmp_path / "disk.img", KEY, version=version, key_size=key_size)
    directory = configure(tmp_path, {"cr_test": str(image)})
    assert main(["--root", str(tmp_path), "header-backup", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    entry = report["volumes"][0]
    uuid = sh("cryptsetup", "luksUUID", str(image)).strip()
    (file,) = backups_of(directory / "cr_test")
    assert entry["file"] == str(file)
    assert entry["changed"] is True
    assert entry["uuid"] == uuid
    assert file.name.endswith(f"Z_{uuid}.luksheader")
    assert entry["size"] == file.stat().st_size == expected_size
    assert entry["created"].endswith("Z")
    # byte for byte what the bare tool writes
    bare = tmp_path / "bare.img"
    sh("cryptsetup", "luksHeaderBackup", str(image), "--header-backup-file", str(bare))
    assert file.read_bytes() == bare.read_bytes()
    copy, live = cryptsetup.read_header(str(file)), cryptsetup.read_header(str(image))
    assert backup.header_differences(live, copy) == []
    assert "--prune-before" in report["warning"]


@pytest.mark.parametrize("version", [1, 2])
def test_unchanged_header_writes_nothing_and_a_new_key_writes_one(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    version: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    image = make_luks(tmp_path / "disk.img", KEY, version=version)
    directory = configure(tmp_path, {"cr_test": str(image)}) / "cr_test"
    assert main(["--root", str(tmp_path), "header-backup"]) == 0
    (first,) = backups_of(directory)
    first_bytes = digest(first)
    capsys.readouterr()

    ran: list[tuple[str, ...]] = []
    real_run = cryptsetup.run

    def recording_run(argv: list[str], **kwargs: object) -> object:
        ran.append(tuple(argv))
        return real_run(argv, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(cryptsetup, "run", recording_run)
    assert main(["--root", str(tmp_path), "header-backup"]) == 0
    assert ran == []  # the metadata digest answers it: no isLuks, no luksDump
    out = capsys.readouterr().out
    assert "unchanged" in out
    assert "note:" not in out  # the passphrase warning comes with new backups
    assert backups_of(directory) == [first]

    add_key(image, tmp_path)
    assert main(["--root", str(tmp_path), "header-backup", "--json"]) == 0
    entry = json.loads(capsys.readouterr().out)["volumes"][0]
    assert entry["changed"] is True
    older, newer = backups_of(directory)
    assert older == first and digest(first) == first_bytes
    assert entry["file"] == str(newer)
    assert [k.number for k in cryptsetup.read_header(str(newer)).keyslots] == [0, 1]

    # a changed passphrase rewrites the keyslot: a third backup
    old_key, new_key = tmp_path / "old.key", tmp_path / "changed.key"
    new_key.write_bytes(b"changed")
    kdf = FAST_KDF if version == 2 else ["--pbkdf-force-iterations", "1000"]
    sh(
        "cryptsetup", "luksChangeKey", "-q", *kdf, "--key-file", str(old_key), str(image),
        str(new_key),
    )  # fmt: skip
    assert main(["--root", str(tmp_path), "header-backup"]) == 0
    assert len(backups_of(directory)) == 3


def test_rotation_keeps_the_newest_and_prune_purges_old_passphrases(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = make_luks(tmp_path / "disk.img", KEY)
    directory = configure(tmp_path, {"cr_test": str(image)}, keep=2) / "cr_test"
    written = []
    for n in range(3):
        if n:
            add_key(image, tmp_path, new=f"key{n}".encode())
        assert main(["--root", str(tmp_path), "header-backup", "--json"]) == 0
        written.append(json.loads(capsys.readouterr().out)["volumes"][0])
    assert written[2]["removed"] == [written[0]["file"]]
    assert [str(p) for p in backups_of(directory)] == [written[1]["file"], written[2]["file"]]
    assert not Path(written[0]["file"] + ".json").exists()

    # after luksKillSlot a new backup is taken, and --prune-before now leaves only that one
    sh("cryptsetup", "luksKillSlot", "-q", str(image), "1")
    assert main(["--root", str(tmp_path), "header-backup", "--prune-before", "now"]) == 0
    (last,) = backups_of(directory)
    assert [k.number for k in cryptsetup.read_header(str(last)).keyslots] == [0, 2]
    assert sorted(p.name for p in directory.iterdir()) == [last.name, last.name + ".json"]


def test_prune_never_deletes_the_copy_of_the_live_header(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = make_luks(tmp_path / "disk.img", KEY)
    directory = configure(tmp_path, {"cr_test": str(image)}) / "cr_test"
    assert main(["--root", str(tmp_path), "header-backup"]) == 0
    (only,) = backups_of(directory)
    assert main(["--root", str(tmp_path), "header-backup", "--prune-before", "now"]) == 0
    assert backups_of(directory) == [only]


def test_permissions_are_root_only_and_a_foreign_directory_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = make_luks(tmp_path / "disk.img", KEY)
    directory = configure(tmp_path, {"cr_test": str(image)})
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    assert main(["--root", str(tmp_path), "header-backup"]) == 0
    for folder in (directory, directory / "cr_test"):
        st = folder.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o700, 0)
    for file in (directory / "cr_test").iterdir():
        st = file.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o600, 0)

    os.chown(directory, 1234, 1234)
    assert main(["--root", str(tmp_path), "header-backup"]) == 2
    assert "owned by uid 1234" in capsys.readouterr().err


def test_backup_that_does_not_verify_is_deleted_and_fails_the_volume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    good = make_luks(tmp_path / "good.img", KEY)
    other = make_luks(tmp_path / "other.img", KEY)  # another UUID
    directory = configure(tmp_path, {"cr_good": str(good), "cr_other": str(other)})
    real_backup = cryptsetup.header_backup

    def wrong_header(device: str, path: str) -> None:
        real_backup(str(other) if device == str(good) else device, path)

    monkeypatch.setattr(cryptsetup, "header_backup", wrong_header)
    assert main(["--root", str(tmp_path), "header-backup"]) == 2
    captured = capsys.readouterr()
    assert "cr_good: the backup does not verify: UUID" in captured.err
    assert re.search(r"^cr_good +FAILED", captured.out, re.MULTILINE)
    assert list((directory / "cr_good").iterdir()) == []  # no final file, no temporary left
    assert len(backups_of(directory / "cr_other")) == 1  # the other volume went on


def test_a_volume_whose_header_is_gone_fails_and_names_the_backup_to_restore(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = make_luks(tmp_path / "disk.img", KEY)
    directory = configure(tmp_path, {"cr_test": str(image)})
    assert main(["--root", str(tmp_path), "header-backup"]) == 0
    (saved,) = backups_of(directory / "cr_test")
    sh("dd", "if=/dev/zero", f"of={image}", "bs=4096", "count=8", "conv=notrunc")
    capsys.readouterr()
    assert main(["--root", str(tmp_path), "header-backup"]) == 2
    assert f"luksvm header-restore cr_test --from {saved}" in capsys.readouterr().err


def test_killed_mid_write_leaves_older_backup_intact_and_no_partial_final_file(
    tmp_path: Path,
) -> None:
    image = make_luks(tmp_path / "disk.img", KEY)
    folder = configure(tmp_path, {"cr_test": str(image)}) / "cr_test"
    luksvm = [sys.executable, "-m", "luksvm", "--root", str(tmp_path), "header-backup"]
    subprocess.run(luksvm, check=True, capture_output=True)
    (older,) = backups_of(folder)
    older_digest = digest(older)
    add_key(image, tmp_path)

    caught_temporary = False
    for _attempt in range(10):
        proc = subprocess.Popen(
            luksvm, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + 20
        while proc.poll() is None and time.monotonic() < deadline:
            if any(name.endswith(".tmp") for name in os.listdir(folder)):
                os.killpg(proc.pid, signal.SIGKILL)  # luksvm and the cryptsetup it runs
                caught_temporary = True
                break
        proc.wait()
        if caught_temporary:
            break
        for path in backups_of(folder):  # it finished before we saw it: undo, try again
            if path != older:
                path.unlink()
                Path(f"{path}.json").unlink()
    assert caught_temporary, "never caught the run while it wrote its temporary file"
    assert backups_of(folder) == [older]
    assert digest(older) == older_digest
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == sorted(
        [older.name, older.name + ".json"]
    )
    # the next run removes the leftover and backs up the changed header
    subprocess.run(luksvm, check=True, capture_output=True)
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert len(backups_of(folder)) == 2


# --- restore ---------------------------------------------------------------------------------


def zero_header(device: str) -> None:
    sh("dd", "if=/dev/zero", f"of={device}", "bs=1M", "count=1", "conv=notrunc,fsync")


def test_restore_onto_a_zeroed_header_on_a_loop_device(
    tmp_path: Path, loop_device: Attach, capsys: pytest.CaptureFixture[str]
) -> None:
    image = make_luks(tmp_path / "disk.img", KEY)
    device = loop_device(image)
    directory = configure(tmp_path, {"cr_test": device})
    assert main(["--root", str(tmp_path), "header-backup"]) == 0
    (saved,) = backups_of(directory / "cr_test")
    zero_header(device)
    assert not cryptsetup.is_luks(device)
    assert not cryptsetup.test_passphrase(device, KEY)

    argv = ["--root", str(tmp_path), "header-restore", "cr_test", "--from", str(saved), "--yes"]
    assert main(argv) == 0
    assert "matched by backup folder name" in capsys.readouterr().out
    assert cryptsetup.test_passphrase(device, KEY)
    (raw,) = (directory / "cr_test").glob("*_raw-before-restore.bin")
    assert raw.stat().st_size == saved.stat().st_size
    assert raw.read_bytes()[: 1 << 20] == bytes(1 << 20)  # the zeroed area, as it was
    assert stat.S_IMODE(raw.stat().st_mode) == 0o600


def test_restore_matches_a_configured_uuid_and_backs_up_a_live_header_first(
    tmp_path: Path, loop_device: Attach, capsys: pytest.CaptureFixture[str]
) -> None:
    image = make_luks(tmp_path / "disk.img", KEY)
    device = loop_device(image)
    uuid = sh("cryptsetup", "luksUUID", device).strip()
    directory = configure(tmp_path, {"cr_test": f"UUID={uuid}"})
    saved = tmp_path / "elsewhere.img"  # not in a folder named after the volume
    sh("cryptsetup", "luksHeaderBackup", device, "--header-backup-file", str(saved))

    # a live header that differs from the backup: it is backed up before being overwritten
    add_key(image, tmp_path)
    restore = ["--root", str(tmp_path), "header-restore", "cr_test", "--from", str(saved)]
    assert main([*restore, "--device", device, "--yes"]) == 0
    assert "matched by device UUID" in capsys.readouterr().out
    (before,) = backups_of(directory / "cr_test")
    assert len(cryptsetup.read_header(str(before)).keyslots) == 2
    assert len(cryptsetup.read_header(device).keyslots) == 1

    zero_header(device)
    assert main([*restore, "--device", device, "--yes"]) == 0
    assert "matched by configured UUID=" in capsys.readouterr().out
    assert cryptsetup.test_passphrase(device, KEY)


def test_restore_refusals_change_nothing(
    tmp_path: Path, loop_device: Attach, capsys: pytest.CaptureFixture[str]
) -> None:
    image = make_luks(tmp_path / "disk.img", KEY)
    stranger = make_luks(tmp_path / "stranger.img", KEY)
    device = loop_device(image)
    configure(tmp_path, {"cr_test": device})
    foreign = tmp_path / "foreign.img"
    sh("cryptsetup", "luksHeaderBackup", str(stranger), "--header-backup-file", str(foreign))
    garbage = tmp_path / "garbage.img"
    garbage.write_bytes(os.urandom(4096))
    restore = ["--root", str(tmp_path), "header-restore", "cr_test", "--yes", "--from"]
    before = digest(image)

    assert main([*restore, str(garbage)]) == 2
    assert "does not verify as a LUKS header backup" in capsys.readouterr().err
    assert main([*restore, str(foreign)]) == 2
    assert "is not the device's" in capsys.readouterr().err
    zero_header(device)
    zeroed = digest(image)
    assert main([*restore, str(foreign)]) == 2  # not LUKS and nothing ties the backup to it
    assert "nothing ties it to this volume" in capsys.readouterr().err
    assert main([*restore, str(foreign), "--dry-run"]) == 2
    assert digest(image) == zeroed != before

    # the override works, and what was there is saved first
    assert main([*restore, str(foreign), "--force-uuid-mismatch"]) == 0
    assert "matched by --force-uuid-mismatch" in capsys.readouterr().out
    header = cryptsetup.read_header(device)
    assert header.uuid == sh("cryptsetup", "luksUUID", str(stranger)).strip()


def test_restore_without_a_terminal_needs_yes(tmp_path: Path) -> None:
    image = make_luks(tmp_path / "disk.img", KEY)
    directory = configure(tmp_path, {"cr_test": str(image)})
    assert main(["--root", str(tmp_path), "header-backup"]) == 0
    (saved,) = backups_of(directory / "cr_test")
    argv = [sys.executable, "-m", "luksvm", "--root", str(tmp_path), "header-restore", "cr_test"]
    proc = subprocess.run(
        [*argv, "--from", str(saved)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 64
    assert "--yes" in proc.stderr


def test_restore_asks_for_the_mapping_name_on_a_terminal(tmp_path: Path) -> None:
    import pexpect

    image = make_luks(tmp_path / "disk.img", KEY)
    directory = configure(tmp_path, {"cr_test": str(image)})
    assert main(["--root", str(tmp_path), "header-backup"]) == 0
    (saved,) = backups_of(directory / "cr_test")
    zero_header(str(image))
    zeroed = digest(image)
    argv = ["-m", "luksvm", "--root", str(tmp_path), "header-restore", "cr_test"]
    argv += ["--from", str(saved)]

    child = pexpect.spawn(sys.executable, argv, encoding="utf-8", timeout=30)
    child.expect("Type the mapping name cr_test to overwrite the LUKS header on")
    child.sendline("cr_tes")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 2
    assert "not confirmed" in (child.before or "")
    assert digest(image) == zeroed

    child = pexpect.spawn(sys.executable, argv, encoding="utf-8", timeout=30)
    child.expect("Type the mapping name cr_test")
    child.sendline("cr_test")
    child.expect("restored the header of")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert cryptsetup.test_passphrase(str(image), KEY)


def test_restore_refuses_a_backup_that_rotted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = make_luks(tmp_path / "disk.img", KEY)
    directory = configure(tmp_path, {"cr_test": str(image)})
    assert main(["--root", str(tmp_path), "header-backup"]) == 0
    (saved,) = backups_of(directory / "cr_test")
    flip_byte(saved, 1 << 20)  # in keyslot material: still reads as LUKS
    assert main(["--root", str(tmp_path), "header-restore", "cr_test", "--from", str(saved)]) == 2
    assert "changed since it was written" in capsys.readouterr().err


def test_config_volume_names_are_checked(tmp_path: Path) -> None:
    configure(tmp_path, {"cr_test": "/dev/null"})
    with pytest.raises(UsageError, match="no volume 'cr_nope'"):
        backup.backup_headers(config.load(str(tmp_path)), ["cr_nope"])


# --- the backup file's stamp: hashed in full only when the filesystem says it changed ------------


def _hash_counter(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    hashed: list[str] = []
    real = backup.sha256_of

    def counting(path: str, size: int | None = None) -> str:
        if size is None:
            hashed.append(os.path.realpath(path))
        return real(path, size)

    monkeypatch.setattr(backup, "sha256_of", counting)
    return hashed


def _one_backup(tmp_path: Path) -> tuple[Path, Path]:
    """A LUKS2 image configured as cr_test, backed up once: (its backup folder, the backup)."""
    image = make_luks(tmp_path / "disk.img", KEY)
    directory = configure(tmp_path, {"cr_test": str(image)}) / "cr_test"
    assert main(["--root", str(tmp_path), "header-backup"]) == 0
    (file,) = backups_of(directory)
    return directory, file


def _doctor_says(root: Path) -> tuple[str, str]:
    from luksvm import doctor

    # doctor reads [backup] dir under --root, header-backup as written: point the one at the other
    inside = root / str(root).lstrip("/") / "backups"
    if not inside.exists():
        inside.parent.mkdir(parents=True)
        inside.symlink_to(root / "backups")
    (found,) = doctor.run_checks(doctor.Host(str(root)), doctor.select(["header-backup"]))
    return found.status, found.message


def test_an_unchanged_backup_file_is_not_hashed_again_a_tampered_one_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory, file = _one_backup(tmp_path)
    record = json.loads(Path(f"{file}.json").read_text())
    assert record["file_stamp"]["size"] == file.stat().st_size == 16 << 20
    assert record["file_stamp"]["ctime_ns"] == file.stat().st_ctime_ns
    hashed = _hash_counter(monkeypatch)

    assert _doctor_says(tmp_path) == ("OK", f"backup {file.name} verifies and is current")
    assert main(["--root", str(tmp_path), "header-backup"]) == 0
    assert hashed == []  # neither doctor nor the rerun read the 16 MiB

    # one byte changed in the keyslot area, and the mtime set back: ctime still moved
    before = file.stat()
    flip_byte(file, 1 << 20)
    os.utime(file, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (file.stat().st_size, file.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    status, message = _doctor_says(tmp_path)
    assert status == "FAIL" and "no longer hashes as recorded" in message
    assert hashed == [str(file)]

    # header-backup takes a new backup beside the damaged one (left for the admin to see)
    assert main(["--root", str(tmp_path), "header-backup"]) == 0
    assert len(backups_of(directory)) == 2
    assert _doctor_says(tmp_path)[0] == "OK"


def test_what_the_stamp_cannot_see_is_found_by_the_periodic_full_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A change beneath the filesystem (bit rot, a write to the raw disk) leaves the stamp as it
    was: doctor finds it once the last full hash is older than [backup] max_age, header-backup
    once it is older than REHASH_AFTER (a week)."""
    directory, file = _one_backup(tmp_path)
    record_path = Path(f"{file}.json")
    flip_byte(file, 1 << 20)
    # what such a change looks like: the recorded stamp matches the file as it is now
    record = json.loads(record_path.read_text())
    st = file.stat()
    record["file_stamp"] = {
        "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
        "inode": st.st_ino,
    }  # fmt: skip
    record_path.write_text(json.dumps(record))
    assert _doctor_says(tmp_path)[0] == "OK"  # not seen: the documented limit

    record["file_hashed"] = "2000-01-01T00:00:00.000Z"  # the last full hash long ago
    record_path.write_text(json.dumps(record))
    status, message = _doctor_says(tmp_path)
    assert status == "FAIL" and "no longer hashes as recorded" in message
    assert main(["--root", str(tmp_path), "header-backup"]) == 0
    assert len(backups_of(directory)) == 2  # a new backup of the unchanged header


def test_a_record_without_a_stamp_is_hashed_and_header_backup_adds_the_stamp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory, file = _one_backup(tmp_path)
    record_path = Path(f"{file}.json")
    old = json.loads(record_path.read_text())
    del old["file_stamp"], old["file_hashed"]  # as luksvm wrote records before
    record_path.write_text(json.dumps(old))
    hashed = _hash_counter(monkeypatch)
    assert _doctor_says(tmp_path)[0] == "OK"
    assert hashed == [str(file)]
    assert main(["--root", str(tmp_path), "header-backup"]) == 0
    assert backups_of(directory) == [file]
    new = json.loads(record_path.read_text())
    assert new["file_stamp"]["inode"] == file.stat().st_ino
    assert {k: new[k] for k in old} == old
    hashed.clear()
    assert _doctor_says(tmp_path)[0] == "OK"
    assert hashed == []
