"""The rendered units against systemd itself: systemd-escape, systemd-analyze verify and
systemctl --root, on a root that `luksvm apply --root` filled."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from luksvm import units
from tests.conftest import MIXED_CRYPTTAB, MIXED_SETTINGS, SEED_CRYPTTAB, write_config

LUKSVM = os.path.join(os.path.dirname(sys.executable), "luksvm")
SYSTEM_UNITS = "/usr/lib/systemd/system"
UNIT_DIR = "etc/systemd/system"

TRICKY_NAMES = [
    "cr-client-a",
    "cr_imap_encr",
    "a.b",
    ".hidden",
    "..",
    "...",
    "a..b",
    "trailing.",
    "-",
    "--",
    "x:y_z",
    "über",
    "€uro",
    "日本",
    "a b",
    " lead",
    "tab\there",
    "a\\b",
    "\\x2d",
    "a/b",
    "/a/",
    "//",
    "a%b",
    "a$b",
    "@",
    "name@host",
    "#+=,;'\"",
    "é" * 40,
    "0",
    "",
    "a\x7fb",
    "\x01",
]
TRICKY_PATHS = [
    "/",
    "//",
    "/dev/volgrp4/lvimap_hd0",
    "/dev/disk/by-uuid/0a1b2c3d-1111-2222-3333-444455556666",
    "/dev/disk/by-id/nvme-Samsung_SSD_980_1TB-part3",
    "/dev/disk/by-label/my\\x20disk",
    "/dev/mapper/cr-web",
    "/dev//x/",
    "/dev/./x",
    "/.dot",
    "/a/.b",
    "/a/..b",
    "/a/.",
    "/./.x",
    "/with space/ü",
    "/trailing/",
    "rel/path",
    "/a-b/c.d",
    "/%",
    "/a\\b",
]

text_without_nul_or_newline = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\n"),
    max_size=40,
)


def systemd_escape(*args: str) -> list[str]:
    proc = subprocess.run(["systemd-escape", *args], capture_output=True, text=True, check=True)
    # One line, the escaped words separated by spaces (an escaped word never has one).
    return proc.stdout.rstrip("\n").split(" ")


def test_escape_matches_systemd_escape_on_tricky_names() -> None:
    assert [units.systemd_escape(n) for n in TRICKY_NAMES] == systemd_escape("--", *TRICKY_NAMES)


def test_path_escape_matches_systemd_escape_on_tricky_paths() -> None:
    assert [units.systemd_escape_path(p) for p in TRICKY_PATHS] == systemd_escape(
        "--path", "--", *TRICKY_PATHS
    )


@settings(max_examples=40, deadline=None)
@given(st.lists(text_without_nul_or_newline, min_size=1, max_size=30))
def test_escape_matches_systemd_escape_on_any_text(names: list[str]) -> None:
    assert [units.systemd_escape(n) for n in names] == systemd_escape("--", *names)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(text_without_nul_or_newline, max_size=5), min_size=1, max_size=20))
def test_path_escape_matches_systemd_escape_on_any_path(parts: list[list[str]]) -> None:
    paths = ["/" + "/".join(p) for p in parts if ".." not in "/".join(p).split("/")]
    if paths:
        ours = [units.systemd_escape_path(p) for p in paths]
        assert ours == systemd_escape("--path", "--", *paths)


@pytest.mark.parametrize("path", ["/dev/../x", "/..", "/" + "x" * 256])
def test_paths_systemd_escape_refuses_are_refused(path: str) -> None:
    proc = subprocess.run(
        ["systemd-escape", "--path", "--", path], capture_output=True, check=False
    )
    assert proc.returncode != 0
    with pytest.raises(ValueError):
        units.systemd_escape_path(path)


def test_unit_names_match_systemd_escape_templates() -> None:
    names = ["cr-client-a", ".x", "über"]
    assert [units.unlock_unit(n) for n in names] == systemd_escape(
        "--template=luksvm-unlock@.service", "--", *names
    )
    assert (
        units.device_unit("/dev/disk/by-uuid/0a-b")
        == systemd_escape("--path", "--suffix=device", "--", "/dev/disk/by-uuid/0a-b")[0]
    )


# --- a root filled by `luksvm apply --root` ------------------------------------------------------


def host_root(tmp_path: Path, *, packaged: bool) -> Path:
    """A root with the host's own system units (sysinit.target & co.), the seed and mixed
    configuration, and the luksvm executables the units name (ExecStart must exist)."""
    root = tmp_path / "root"
    shutil.copytree(SYSTEM_UNITS, root / SYSTEM_UNITS.lstrip("/"), symlinks=True)
    write_config(
        root, {"10-seed.conf": SEED_CRYPTTAB, "20-mixed.conf": MIXED_CRYPTTAB}, MIXED_SETTINGS
    )
    for path in (LUKSVM, units.PACKAGED_LUKSVM):
        stub = root / path.lstrip("/")
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text("#!/bin/sh\n")
        stub.chmod(0o755)
    if packaged:
        for name in units.TEMPLATES:
            shutil.copy(Path("units") / name, root / SYSTEM_UNITS.lstrip("/") / name)
    return root


def luksvm_apply(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [LUKSVM, "--root", str(root), "apply", *args], capture_output=True, text=True, check=True
    )


def units_to_verify(root: Path) -> list[str]:
    """Every concrete unit apply wrote something for, and every instance the target pulls in."""
    names = {units.TARGET}
    for entry in os.listdir(root / UNIT_DIR):
        if entry.endswith(".d") and "@." not in entry:
            names.add(entry[: -len(".d")])
    names.update(os.listdir(root / UNIT_DIR / f"{units.TARGET}.wants"))
    return sorted(names)


def verify(root: Path, names: list[str]) -> subprocess.CompletedProcess[str]:
    # --man=no: the man pages are not part of this root.
    return subprocess.run(
        ["systemd-analyze", "verify", "--man=no", f"--root={root}", *names],
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.parametrize("packaged", [False, True], ids=["templates-by-apply", "packaged"])
def test_systemd_analyze_verify_prints_nothing_for_every_unit(
    tmp_path: Path, packaged: bool
) -> None:
    root = host_root(tmp_path, packaged=packaged)
    luksvm_apply(root)
    names = units_to_verify(root)
    assert "luksvm-unlock@cr\\x2dweb\\x2ddata.service" in names  # noauto: no link, a drop-in
    assert (
        "dev-disk-by\\x2duuid-0A1B2C3D\\x2d1111\\x2d2222\\x2d3333\\x2d444455556666.device" in names
    )
    assert len(names) == 1 + 5 + 4 + 1 + 1  # target, unlock and guest instances, device, watch
    proc = verify(root, names)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


def test_keyfile_volumes_run_systemd_cryptsetup_from_their_units(tmp_path: Path) -> None:
    """Where systemd-cryptsetup is installed, a keyfile volume's unit runs it itself (no Python at
    boot) with the options luksvm would pass it; apply checks the keyfile instead, and leaves a
    volume whose keyfile fails the check to `luksvm unlock` (which refuses it at boot)."""
    root = host_root(tmp_path, packaged=True)
    binary = root / "usr/lib/systemd/systemd-cryptsetup"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    (root / "etc/luksvm/keys").mkdir(parents=True)
    (root / "etc/luksvm/keys/imap.key").write_bytes(b"k")
    (root / "etc/luksvm/keys/imap.key").chmod(0o400)
    (root / "etc/luksvm/keys/web.key").write_bytes(b"k")
    (root / "etc/luksvm/keys/web.key").chmod(0o644)
    applied = luksvm_apply(root)
    assert applied.stderr.splitlines()[0] == (
        f"luksvm: cr_web: keyfile {root}/etc/luksvm/keys/web.key has mode 0644: group or others "
        "may access it: its unit runs `luksvm unlock`, which refuses the keyfile at boot; "
        f"chmod 0400 {root}/etc/luksvm/keys/web.key, then luksvm apply"
    )
    imap = (root / UNIT_DIR / "luksvm-unlock@cr_imap_encr.service.d/50-luksvm.conf").read_text()
    service = imap.split("[Service]\n", 1)[1].splitlines()
    assert [line for line in service if not line.startswith("#")] == [
        "ExecStart=",
        "ExecStart=/usr/lib/systemd/systemd-cryptsetup attach cr_imap_encr "
        "/dev/volgrp4/lvimap_hd0 /etc/luksvm/keys/imap.key luks,discard,headless=true,tries=1",
        "LogExtraFields=LUKSVM_VOLUME=cr_imap_encr",
        "LogExtraFields=LUKSVM_KEY_SOURCE=keyfile",
    ]
    web = (root / UNIT_DIR / "luksvm-unlock@cr_web.service.d/50-luksvm.conf").read_text()
    assert "ExecStart" not in web
    # passphrase, keyring: and noauto passphrase volumes keep luksvm unlock too
    for name in ("cr_scratch", "cr_files", "cr\\x2dweb\\x2ddata"):
        dropin = root / UNIT_DIR / f"luksvm-unlock@{name}.service.d/50-luksvm.conf"
        assert "ExecStart" not in dropin.read_text(), name
    proc = verify(root, units_to_verify(root))
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    # the lock stays luksvm's: guest VGs off, then close
    template = (root / SYSTEM_UNITS.lstrip("/") / units.UNLOCK_TEMPLATE).read_text()
    assert "ExecStop=/usr/bin/luksvm lock --from-unit -- %I" in template


def test_verify_would_catch_a_bad_directive(tmp_path: Path) -> None:
    root = host_root(tmp_path, packaged=False)
    luksvm_apply(root)
    dropin = root / UNIT_DIR / "luksvm-guest@mail.service.d/50-luksvm.conf"
    dropin.write_text(dropin.read_text() + "TimeoutStopSecs=1\n")
    proc = verify(root, ["luksvm-guest@mail.service"])
    assert "Unknown key 'TimeoutStopSecs'" in proc.stderr


def test_systemctl_root_enables_the_target_offline(tmp_path: Path) -> None:
    root = host_root(tmp_path, packaged=False)
    luksvm_apply(root)
    subprocess.run(
        ["systemctl", f"--root={root}", "enable", units.TARGET], capture_output=True, check=True
    )
    link = root / UNIT_DIR / "multi-user.target.wants" / units.TARGET
    assert os.readlink(link) == f"/{UNIT_DIR}/{units.TARGET}"
    proc = subprocess.run(
        ["systemctl", f"--root={root}", "is-enabled", units.TARGET],
        capture_output=True,
        text=True,
        check=True,
    )
    assert proc.stdout.strip() == "enabled"
    # A later apply leaves the admin's enablement alone.
    assert luksvm_apply(root).stdout.startswith("nothing to change")
    assert link.is_symlink()


def test_a_wheel_carries_the_template_units(tmp_path: Path) -> None:
    source = tmp_path / "src"
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], capture_output=True, text=True, check=True
    ).stdout.split()
    for name in files:
        if os.path.isfile(name):
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp_path / "dist", source],
        capture_output=True,
        check=True,
    )
    (wheel,) = (tmp_path / "dist").glob("luksvm-*.whl")
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", target, wheel],
        capture_output=True,
        check=True,
    )
    probe = subprocess.run(
        [
            "/usr/bin/python3",
            "-c",
            "from luksvm import apply; print(apply.__file__); "
            "print(sorted(apply.shipped_templates()))",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(target)},
    )
    where, found = probe.stdout.splitlines()
    assert where.startswith(str(target))
    assert found == str(sorted(units.TEMPLATES))


def test_systemd_reads_tricky_names_and_paths_as_written(tmp_path: Path) -> None:
    """systemd's own dump of the loaded units (verify at debug level) shows the commands and
    paths it will use: specifiers, quotes and backslashes must arrive as they are."""
    root = host_root(tmp_path, packaged=False)
    for fragment in (root / "etc/luksvm/crypttab.d").iterdir():
        fragment.unlink()
    write_config(
        root,
        {"10-100%.conf": '.cr-x /dev/vg/p /etc/luksvm/keys/a%b\\c".key luks,x-luksvm.guest=g%1$x'},
        "",
    )
    luksvm_apply(root)
    proc = subprocess.run(
        [
            "systemd-analyze",
            "verify",
            "--man=no",
            f"--root={root}",
            units.unlock_unit(".cr-x"),
            units.guest_unit("g%1$x"),
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "debug"},
    )
    dump = {line.strip() for line in proc.stdout.splitlines()}  # the dump; logs go to stderr
    assert f"Command Line: {LUKSVM} unlock --no-start -- .cr-x" in dump
    assert f"Command Line: {LUKSVM} lock --from-unit -- .cr-x" in dump
    assert f'Command Line: {LUKSVM} guest start -- "g%1\\$x"' in dump  # shown shell-quoted
    assert "Source Path: /etc/luksvm/crypttab.d/10-100%.conf" in dump
    assert 'RequiresMountsFor: /etc/luksvm/keys/a%b\\c".key (origin-file)' in dump
    assert "BindsTo: dev-vg-p.device (origin-file)" in dump


def test_unattended_volumes_units_verify_with_their_bound_and_network_ordering(
    tmp_path: Path,
) -> None:
    root = host_root(tmp_path, packaged=True)
    write_config(
        root,
        {
            "10-seed.conf": SEED_CRYPTTAB,
            "30-unattended.conf": "cr_t /dev/vg/t - luks,tpm2-device=auto,x-luksvm.guest=t\n"
            "cr_n /dev/vg/n - luks,x-luksvm.tang,x-luksvm.unattended-timeout=20s\n"
            "cr_k /dev/vg/k /etc/luksvm/keys/k luks,tpm2-device=auto,x-luksvm.tang\n",
        },
        "[keys]\nunattended_timeout = 45s\n",
    )
    luksvm_apply(root)
    proc = verify(root, units_to_verify(root))
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")

    def dropin(volume: str) -> list[str]:
        path = root / UNIT_DIR / f"{units.unlock_unit(volume)}.d/50-luksvm.conf"
        return path.read_text().splitlines()

    t, n, k = dropin("cr_t"), dropin("cr_n"), dropin("cr_k")
    # never prompts: ordered before libvirt like a keyfile volume
    assert all("Before=libvirtd.service virtqemud.service" in d for d in (t, n, k))
    assert "TimeoutStartSec=1min 15s" in t  # one source × 45 s + 30 s
    assert "TimeoutStartSec=50s" in n  # the volume's own 20 s bound
    assert "TimeoutStartSec=2min 45s" in k  # TPM2, Tang, keyfile
    assert "After=network-online.target" in n and "Wants=network-online.target" in k
    assert not any("network-online" in line for line in t)
    target = (root / SYSTEM_UNITS.lstrip("/") / units.TARGET).read_text()
    assert "DefaultDependencies=no" in target.splitlines()
