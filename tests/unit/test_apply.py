from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from luksvm import apply, config, run, units
from luksvm.cli import main
from tests.conftest import SEED_CRYPTTAB, write_config

UNIT_DIR = "etc/systemd/system"
# cr_web unlocked by hand over SSH: a passphrase, noauto.
NOAUTO_WEB = SEED_CRYPTTAB.replace(
    "/etc/luksvm/keys/web.key   luks,discard,x-luksvm.guest=web",
    "-                          luks,noauto,x-luksvm.guest=web",
)
SEED_WITHOUT_WEB = "".join(SEED_CRYPTTAB.splitlines(keepends=True)[:2])


@pytest.fixture(autouse=True)
def fixed_luksvm_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(apply, "luksvm_path", lambda: "/opt/luksvm/bin/luksvm")


def tree(root: Path) -> dict[str, str]:
    """Everything under ROOT/etc/systemd/system: file text, or "-> target" for a symlink."""
    out = {}
    base = root / UNIT_DIR
    for directory, dirs, names in os.walk(base):
        for name in names + [d for d in dirs if os.path.islink(os.path.join(directory, d))]:
            full = Path(directory, name)
            key = str(full.relative_to(base))
            out[key] = f"-> {os.readlink(full)}" if full.is_symlink() else full.read_text()
    return out


def run_apply(root: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str, str]:
    code = main(["--root", str(root), "apply", *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_first_apply_writes_templates_dropins_and_links(
    seed_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_apply(seed_root, capsys)
    assert code == 0
    files = tree(seed_root)
    assert sorted(files) == [
        "luksvm-guest@.service",
        "luksvm-guest@mail.service.d/50-luksvm.conf",
        "luksvm-guest@web.service.d/50-luksvm.conf",
        "luksvm-header-backup.service",
        "luksvm-header-backup.timer",
        "luksvm-metrics.service",
        "luksvm-metrics.timer",
        "luksvm-shutdown-watch.service",
        "luksvm-trim.service",
        "luksvm-trim.timer",
        "luksvm-unlock@.service",
        "luksvm-unlock@cr_imap_encr.service.d/50-luksvm.conf",
        "luksvm-unlock@cr_web.service.d/50-luksvm.conf",
        "luksvm.target",
        "luksvm.target.wants/luksvm-guest@mail.service",
        "luksvm.target.wants/luksvm-guest@web.service",
        "luksvm.target.wants/luksvm-shutdown-watch.service",
        "luksvm.target.wants/luksvm-unlock@cr_imap_encr.service",
        "luksvm.target.wants/luksvm-unlock@cr_web.service",
    ]
    assert files["luksvm.target.wants/luksvm-guest@mail.service"] == (
        "-> /etc/systemd/system/luksvm-guest@.service"
    )
    assert (
        "ExecStart=/opt/luksvm/bin/luksvm unlock --no-start -- %I"
        in files["luksvm-unlock@.service"]
    )
    assert "ExecStart=/opt/luksvm/bin/luksvm header-backup" in files["luksvm-header-backup.service"]
    assert "changed: 14 files written, 5 links made, 0 removed; 0 up to date" in out


def test_second_apply_changes_nothing_and_says_so(
    seed_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_apply(seed_root, capsys)
    before = {p: os.lstat(seed_root / UNIT_DIR / p).st_mtime_ns for p in tree(seed_root)}
    manifest = (seed_root / apply.MANIFEST).stat().st_mtime_ns
    code, out, err = run_apply(seed_root, capsys)
    assert (code, out, err) == (0, "nothing to change: 19 unit files and links up to date\n", "")
    assert before == {p: os.lstat(seed_root / UNIT_DIR / p).st_mtime_ns for p in tree(seed_root)}
    assert (seed_root / apply.MANIFEST).stat().st_mtime_ns == manifest


def test_files_the_config_no_longer_asks_for_are_removed_and_foreign_ones_kept(
    seed_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_apply(seed_root, capsys)
    foreign = {
        "luksvm-unlock@cr_web.service.d/60-admin.conf": "[Unit]\nDescription=mine\n",
        "luksvm.target.wants/other.service": "-> /etc/systemd/system/other.service",
        "other.service": "[Service]\nExecStart=/bin/true\n",
    }
    for path, content in foreign.items():
        full = seed_root / UNIT_DIR / path
        if content.startswith("-> "):
            full.symlink_to(content[3:])
        else:
            full.write_text(content)
    write_config(seed_root, {"10-seed.conf": SEED_WITHOUT_WEB})

    code, out, _ = run_apply(seed_root, capsys)
    assert code == 0
    files = tree(seed_root)
    assert "luksvm-unlock@cr_web.service.d/50-luksvm.conf" not in files
    assert "luksvm-guest@web.service.d/50-luksvm.conf" not in files
    assert "luksvm.target.wants/luksvm-unlock@cr_web.service" not in files
    assert not (seed_root / UNIT_DIR / "luksvm-guest@web.service.d").exists()
    for path, content in foreign.items():
        assert files[path] == content
    assert (
        "removed " + str(seed_root / UNIT_DIR / "luksvm-guest@web.service.d/50-luksvm.conf") in out
    )
    assert "changed: 0 files written, 0 links made, 4 removed; 15 up to date" in out


def test_a_stale_file_edited_by_hand_is_left_with_a_warning(
    seed_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_apply(seed_root, capsys)
    dropin = seed_root / UNIT_DIR / "luksvm-guest@web.service.d/50-luksvm.conf"
    dropin.write_text("[Unit]\n# mine now\n")
    write_config(seed_root, {"10-seed.conf": SEED_WITHOUT_WEB})
    code, _, err = run_apply(seed_root, capsys)
    assert code == 0
    assert dropin.read_text() == "[Unit]\n# mine now\n"
    assert f"luksvm: left {dropin} in place" in err


def test_a_foreign_file_where_apply_would_write_is_refused_and_nothing_written(
    seed_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    foreign = seed_root / UNIT_DIR / "luksvm-guest@web.service.d/50-luksvm.conf"
    foreign.parent.mkdir(parents=True)
    foreign.write_text("[Unit]\n")
    code, _, err = run_apply(seed_root, capsys)
    assert code == 2
    assert f"luksvm: {foreign}: a file luksvm did not write" in err
    assert tree(seed_root) == {"luksvm-guest@web.service.d/50-luksvm.conf": "[Unit]\n"}
    assert not (seed_root / apply.MANIFEST).exists()


def test_config_errors_exit_64_and_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_config(tmp_path, {"10-a.conf": "cr_a /dev/vg/a keys/a.key luks\n"})
    code, _, err = run_apply(tmp_path, capsys)
    assert code == 64
    assert "10-a.conf:1:16: key" in err
    assert not (tmp_path / "etc/systemd").exists()
    assert not (tmp_path / "var").exists()


def test_dry_run_prints_and_writes_nothing(
    seed_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_apply(seed_root, capsys, "--dry-run", "--diff")
    assert code == 0
    assert not (seed_root / "etc/systemd").exists()
    assert not (seed_root / "var").exists()
    unit_dir = seed_root / UNIT_DIR
    assert f"would write {unit_dir}/luksvm-unlock@cr_web.service.d/50-luksvm.conf" in out
    assert f"+++ b/{UNIT_DIR}/luksvm-unlock@cr_web.service.d/50-luksvm.conf" in out
    assert "+RequiresMountsFor=/etc/luksvm/keys/web.key" in out
    assert (
        f"would link {unit_dir}/luksvm.target.wants/luksvm-guest@web.service -> "
        "/etc/systemd/system/luksvm-guest@.service" in out
    )
    assert "would change: 14 files written, 5 links made, 0 removed; 0 up to date" in out


def test_diff_shows_what_a_config_change_changes(
    seed_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_apply(seed_root, capsys)
    write_config(seed_root, {"10-seed.conf": NOAUTO_WEB})
    code, out, _ = run_apply(seed_root, capsys, "--diff")
    assert code == 0
    lines = out.splitlines()
    web = f"{UNIT_DIR}/luksvm-unlock@cr_web.service.d/50-luksvm.conf"
    assert f"--- a/{web}" in lines
    assert "-RequiresMountsFor=/etc/luksvm/keys/web.key" in lines
    assert "-Before=libvirtd.service virtqemud.service" in lines
    assert f"removed {seed_root / UNIT_DIR}/luksvm.target.wants/luksvm-guest@web.service" in lines
    assert "-symlink to /etc/systemd/system/luksvm-guest@.service" in lines
    assert "luksvm.target.wants/luksvm-unlock@cr_web.service" not in tree(seed_root)


def test_packaged_templates_are_used_and_copies_from_an_earlier_apply_removed(
    seed_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_apply(seed_root, capsys)
    packaged = seed_root / "usr/lib/systemd/system"
    packaged.mkdir(parents=True)
    for name, text in apply.shipped_templates().items():
        (packaged / name).write_text(text)
    code, out, _ = run_apply(seed_root, capsys)
    assert code == 0
    files = tree(seed_root)
    assert not [name for name in units.TEMPLATES if name in files]
    assert files["luksvm.target.wants/luksvm-unlock@cr_web.service"] == (
        "-> /usr/lib/systemd/system/luksvm-unlock@.service"
    )
    assert "changed: 0 files written, 5 links made, 10 removed; 4 up to date" in out


def test_manifest_lists_what_apply_wrote(
    seed_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_apply(seed_root, capsys)
    manifest = json.loads((seed_root / apply.MANIFEST).read_text())
    assert len(manifest["files"]) == 14
    assert manifest["links"][f"{UNIT_DIR}/luksvm.target.wants/luksvm-unlock@cr_web.service"] == (
        "/etc/systemd/system/luksvm-unlock@.service"
    )


def test_keyring_backend_dropin_comes_and_goes_with_the_setting(
    seed_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_config(seed_root, {}, "[keys]\nkeyring_backend = keyrings.alt.file.PlaintextKeyring\n")
    run_apply(seed_root, capsys)
    dropin = seed_root / UNIT_DIR / "luksvm-unlock@.service.d/50-luksvm-keys.conf"
    assert "PYTHON_KEYRING_BACKEND=keyrings.alt.file.PlaintextKeyring" in dropin.read_text()
    write_config(seed_root, {}, "[keys]\n")
    run_apply(seed_root, capsys)
    assert not dropin.exists()


def test_no_daemon_reload_for_another_root(seed_root: Path) -> None:
    plan = apply.plan(config.load(str(seed_root)), luksvm_path="/l")
    assert plan.changes
    assert not plan.reload


def test_daemon_reload_after_changes_only_when_systemd_runs(
    seed_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(apply, "systemd_running", lambda root: True)
    with run.dry_run() as commands:
        apply.apply(config.load(str(seed_root)))
        apply.apply(config.load(str(seed_root)))
    assert commands == [("systemctl", "daemon-reload")]


def test_the_units_run_the_luksvm_that_runs_apply(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.undo()  # the real luksvm_path, not the fixture's
    executable = tmp_path / "bin/luksvm"
    executable.parent.mkdir()
    executable.write_text("#!/bin/sh\n")
    executable.chmod(0o755)
    monkeypatch.setattr(sys, "argv", [str(executable), "apply"])
    assert apply.luksvm_path() == str(executable)


def test_apply_flushes_what_it_wrote_and_its_directories_not_the_machine(
    seed_root: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_sync() -> None:
        raise AssertionError("os.sync() flushes every filesystem of the machine")

    flushed: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        flushed.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "sync", no_sync)
    monkeypatch.setattr(os, "fsync", fsync)
    run_apply(seed_root, capsys)
    unit_dir = seed_root / UNIT_DIR
    written = {
        str(unit_dir / p) for p, text in tree(seed_root).items() if not text.startswith("-> ")
    }
    # each file under its hidden staging name, flushed before it was renamed into place
    assert {
        os.path.join(os.path.dirname(p), os.path.basename(p)[2:-7])
        for p in flushed
        if os.path.basename(p).startswith(".#")
    } == written | {str(seed_root / apply.MANIFEST)}
    directories = {p for p in flushed if not os.path.basename(p).startswith(".#")}
    assert directories >= {
        str(unit_dir),
        str(unit_dir / "luksvm.target.wants"),  # the links' entries
        str(unit_dir / "luksvm-guest@mail.service.d"),
        str(seed_root / "etc/systemd"),  # new folders' names in their parents
    }
    assert all(os.path.isdir(p) for p in directories)
    flushed.clear()
    write_config(seed_root, {"10-seed.conf": SEED_WITHOUT_WEB})
    run_apply(seed_root, capsys)  # removals: the directories they emptied or changed
    assert str(unit_dir / "luksvm.target.wants") in flushed
    assert str(unit_dir) in flushed  # the emptied luksvm-unlock@cr_web.service.d went from it
