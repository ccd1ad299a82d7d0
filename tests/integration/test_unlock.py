"""unlock/lock/status against real cryptsetup, systemd-cryptsetup, python keyring and LVM metadata.

The host kernel has no device-mapper, so nothing here ends with an open mapping: a key is proved
right when the tool gets past the key check and fails only at device-mapper ("Operation not
supported", "Cannot initialize device-mapper"), and wrong when it says so. Every test that could
open a mapping on a machine with device-mapper closes it again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from luksvm import config, cryptsetup, devmapper, keys, lvm, unlock
from luksvm.devmapper import DmDevice
from luksvm.errors import LuksvmError
from luksvm.unlock import LockProbe
from tests.conftest import write_config
from tests.integration.conftest import make_luks, sh, unique

KEY = b"correct horse battery staple"
SYSTEMD_CRYPTSETUP = cryptsetup.find_systemd_cryptsetup()
PLAINTEXT = "keyrings.alt.file.PlaintextKeyring"


def luksvm(
    root: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "luksvm", "--root", str(root), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def mapping() -> Iterator[str]:
    """A mapping name nobody else uses; closed afterwards should a kernel with dm have opened it."""
    name = unique("cr_t")
    yield name
    subprocess.run(["cryptsetup", "close", name], capture_output=True, check=False)


def keyfile(path: Path, key: bytes, mode: int = 0o400) -> Path:
    path.write_bytes(key)
    path.chmod(mode)
    return path


# --- keyfiles ----------------------------------------------------------------------------------


def owned_by_nobody(path: Path) -> None:
    keyfile(path, KEY)
    os.chown(path, 65534, 0)


UNSAFE_KEYFILES: dict[str, tuple[Callable[[Path], object], str]] = {
    "world-readable": (
        lambda p: keyfile(p, KEY, 0o644),
        "has mode 0644: group or others may access it; fix: chmod 0400 {path}",
    ),
    "group-readable": (
        lambda p: keyfile(p, KEY, 0o440),
        "has mode 0440: group or others may access it; fix: chmod 0400 {path}",
    ),
    "not-root": (owned_by_nobody, "is owned by uid 65534, not root; fix: chown root:root {path}"),
    "directory": (
        Path.mkdir,
        "is not a regular file; fix: point the key field of {mapping} at a regular file",
    ),
    "missing": (
        lambda p: None,
        "does not exist; fix: create it (root-owned, mode 0400, e.g. under /etc/luksvm/keys/) or "
        "change the key field of {mapping}",
    ),
}


@pytest.mark.parametrize("case", UNSAFE_KEYFILES)
def test_unsafe_keyfile_is_refused_with_the_fix_before_anything_runs(
    tmp_path: Path, case: str, mapping: str
) -> None:
    make, expected = UNSAFE_KEYFILES[case]
    image = make_luks(tmp_path / "disk.img", KEY)
    root = write_config(
        tmp_path / "root", {"10.conf": f"{mapping} {image} /etc/luksvm/keys/a.key luks\n"}
    )
    path = root / "etc/luksvm/keys/a.key"
    path.parent.mkdir(parents=True)
    make(path)
    result = luksvm(root, "-v", "unlock", "--no-start", mapping)
    assert result.returncode == 2
    message = expected.format(path=path, mapping=mapping)
    assert result.stderr == f"luksvm: cannot unlock {mapping}: keyfile {path} {message}\n"


@pytest.mark.skipif(not SYSTEMD_CRYPTSETUP, reason="needs systemd-cryptsetup")
def test_keyfile_volume_runs_systemd_cryptsetup_headless_with_one_try(
    tmp_path: Path, mapping: str
) -> None:
    # Whether a wrong key then fails without a prompt needs device-mapper: the VM tier proves it.
    image = make_luks(tmp_path / "disk.img", KEY)
    root = write_config(
        tmp_path / "root",
        {"10.conf": f"{mapping} {image} /etc/luksvm/keys/a.key luks,discard,noauto\n"},
    )
    (root / "etc/luksvm/keys").mkdir(parents=True)
    keyfile(root / "etc/luksvm/keys/a.key", KEY)
    dry = luksvm(root, "unlock", "--no-start", "--dry-run", mapping)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines() == [
        f"{SYSTEMD_CRYPTSETUP} attach {mapping} {image} {root}/etc/luksvm/keys/a.key "
        "luks,discard,headless=true,tries=1"
    ]


# What only lock (LVM reports, udev settle) or header backups (OpenSSL's hashes) need: the boot
# path (an unlock unit's `unlock --no-start`) does not load it. Speed is bench/boot.py's to show.
NOT_ON_THE_UNLOCK_PATH = ("luksvm.lvm", "luksvm.blockdev", "hashlib", "concurrent.futures")


def test_unlock_from_its_unit_loads_only_what_unlock_uses(tmp_path: Path, mapping: str) -> None:
    image = make_luks(tmp_path / "disk.img", KEY)
    root = write_config(
        tmp_path / "root", {"10.conf": f"{mapping} {image} /etc/luksvm/keys/a.key luks\n"}
    )
    (root / "etc/luksvm/keys").mkdir(parents=True)
    keyfile(root / "etc/luksvm/keys/a.key", KEY)
    command = ["unlock", "--no-start", "--dry-run", mapping]
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "luksvm", "--root", str(root), *command],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert mapping in proc.stdout  # the plan: the command ran its whole unlock path
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()}
    assert {"luksvm.unlock", "luksvm.keys", "luksvm.cryptsetup"} <= imported
    assert sorted(imported & set(NOT_ON_THE_UNLOCK_PATH)) == []


def test_translated_cryptsetup_flags_are_ones_cryptsetup_accepts(tmp_path: Path) -> None:
    image = make_luks(tmp_path / "disk.img", b"pad" + KEY + b"tail")
    key = keyfile(tmp_path / "k", b"pad" + KEY + b"tail")
    options = (
        "luks,discard,read-only,same-cpu-crypt,submit-from-crypt-cpus,no-read-workqueue,"
        f"no-write-workqueue,key-slot=0,keyfile-offset=0,keyfile-size={len(KEY) + 7},"
        "timeout=30s,tries=1"
    )
    argv = cryptsetup.open_argv(str(image), "unused", options.split(","), str(key))
    # the same command, checking the key instead of activating: works without device-mapper
    test = [*argv[:2], "--test-passphrase", *argv[2:-1]]
    subprocess.run(test, check=True, capture_output=True, timeout=60)
    wrong = [*test[:-1], "--keyfile-size", "5", test[-1]]
    assert subprocess.run(wrong, capture_output=True, timeout=60, check=False).returncode != 0


# --- passphrases -------------------------------------------------------------------------------


@pytest.mark.parametrize("right", [True, False])
def test_interactive_run_hands_the_terminal_to_the_prompting_tool(
    tmp_path: Path, right: bool
) -> None:
    import pexpect

    image = make_luks(tmp_path / "disk.img", KEY)
    argv = ["cryptsetup", "open", "--test-passphrase", "--tries", "1", str(image)]
    driver = f"from luksvm.run import run_interactive; exit(run_interactive({argv!r}, check=False))"
    child = pexpect.spawn(sys.executable, ["-c", driver], timeout=30, encoding="utf-8")
    child.expect("passphrase for")
    child.sendline(KEY.decode() if right else "wrong")
    child.expect(pexpect.EOF)
    child.close()
    assert KEY.decode() not in child.before  # not echoed
    assert child.exitstatus == (0 if right else 2)
    assert ("No key available with this passphrase" in child.before) != right


@pytest.mark.skipif(not SYSTEMD_CRYPTSETUP, reason="needs systemd-cryptsetup")
def test_passphrase_volume_asks_on_the_terminal_through_luksvm(
    tmp_path: Path, mapping: str
) -> None:
    import pexpect

    image = make_luks(tmp_path / "disk.img", KEY)
    root = write_config(tmp_path / "root", {"10.conf": f"{mapping} {image} - luks,tries=1\n"})
    # A session keyring of its own: systemd-cryptsetup would otherwise take a passphrase cached
    # in root's kernel keyring by another test, and not ask.
    command = [sys.executable, "-m", "luksvm", "--root", str(root), "unlock", "--no-start", mapping]
    child = pexpect.spawn(
        "keyctl",
        ["session", "-", *command],
        timeout=30,
        encoding="utf-8",
    )
    child.expect(f"passphrase for disk {mapping}")
    child.sendline(KEY.decode())
    child.expect(pexpect.EOF)
    child.close()
    assert KEY.decode() not in child.before
    if child.exitstatus != 0:  # no device-mapper in this kernel
        assert f"luksvm: cannot unlock {mapping}: " in child.before


def test_passphrase_volume_without_a_terminal_fails_at_once(tmp_path: Path, mapping: str) -> None:
    image = make_luks(tmp_path / "disk.img", KEY)
    root = write_config(tmp_path / "root", {"10.conf": f"{mapping} {image} - luks,noauto\n"})
    started = time.monotonic()
    result = luksvm(root, "unlock", mapping)
    assert result.returncode == 2
    assert result.stderr == (
        f"luksvm: cannot unlock {mapping}: it asks for a passphrase and there is no terminal to "
        f"ask on; log in with one: ssh -t HOST luksvm unlock {mapping}\n"
    )
    assert time.monotonic() - started < 10


# --- python keyring ------------------------------------------------------------------------------


@pytest.fixture
def plaintext_keyring(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """keyrings.alt's file backend, storing under this test's own XDG_DATA_HOME."""
    import keyring.core

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("PYTHON_KEYRING_BACKEND", raising=False)
    yield keyring.core.load_keyring(PLAINTEXT)


def test_keyring_key_from_the_configured_backend_opens_the_header(
    tmp_path: Path, plaintext_keyring: object, mapping: str
) -> None:
    image = make_luks(tmp_path / "disk.img", KEY)
    plaintext_keyring.set_password("luksvm", mapping, KEY.decode())  # type: ignore[attr-defined]
    root = write_config(
        tmp_path / "root",
        {"10.conf": f"{mapping} {image} keyring:luksvm/{mapping} luks\n"},
        f"[keys]\nkeyring_backend = {PLAINTEXT}\n",
    )
    cfg = config.load(str(root))
    secret = keys.keyring_secret(cfg.volume(mapping), cfg.settings)
    assert secret == KEY
    assert cryptsetup.test_passphrase(str(image), secret)
    # The whole way through luksvm: the secret reaches cryptsetup's stdin, never argv or the log.
    result = luksvm(root, "-v", "unlock", "--no-start", mapping, env=dict(os.environ))
    assert KEY.decode() not in result.stdout + result.stderr
    assert "(secret on stdin)" in result.stderr


def test_default_backend_in_a_unit_is_the_fail_backend_and_the_error_says_so(
    tmp_path: Path, mapping: str
) -> None:
    root = write_config(
        tmp_path, {"10.conf": f"{mapping} /dev/null keyring:luksvm/{mapping} luks\n"}
    )
    env = {**os.environ, "PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring"}
    result = luksvm(root, "unlock", "--no-start", mapping, env=env)
    assert result.returncode == 2
    assert "python keyring has no usable backend here (it fell back to the fail backend" in (
        result.stderr
    )
    assert f"set [keys] keyring_backend in luksvm.conf, e.g. {PLAINTEXT}" in result.stderr


def test_missing_keyring_secret_says_how_to_store_it(
    tmp_path: Path, plaintext_keyring: object
) -> None:
    root = write_config(
        tmp_path / "root",
        {"10.conf": "cr_x /dev/null keyring:luksvm/cr_x luks\n"},
        f"[keys]\nkeyring_backend = {PLAINTEXT}\n",
    )
    cfg = config.load(str(root))
    with pytest.raises(LuksvmError) as caught:
        keys.keyring_secret(cfg.volume("cr_x"), cfg.settings)
    assert str(caught.value).endswith(
        f"store it with: PYTHON_KEYRING_BACKEND={PLAINTEXT} keyring set luksvm cr_x"
    )


def test_unknown_keyring_backend_is_named(tmp_path: Path) -> None:
    root = write_config(
        tmp_path,
        {"10.conf": "cr_x /dev/null keyring:luksvm/cr_x luks\n"},
        "[keys]\nkeyring_backend = nosuch.module.Keyring\n",
    )
    cfg = config.load(str(root))
    with pytest.raises(
        LuksvmError, match=r"cannot load python keyring backend 'nosuch\.module\.Keyring' \(\w+"
    ):
        keys.keyring_secret(cfg.volume("cr_x"), cfg.settings)


# --- lock plans against real LVM metadata ----------------------------------------------------


def test_lock_plan_finds_a_guest_vg_spanning_two_devices(
    tmp_path: Path,
    lvm_env: dict[str, str],
    loop_device: Callable[[Path], str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    devices = []
    for name in ("a", "b", "c"):
        image = tmp_path / f"{name}.img"
        sh("truncate", "-s", "32M", str(image))
        devices.append(loop_device(image))
    a, b, c = devices
    guest_vg, other_vg = unique("lvguest"), unique("lvother")
    sh("pvcreate", "-q", a, b, c, env=lvm_env)
    try:
        sh("vgcreate", "-q", "-s", "4m", guest_vg, a, b, env=lvm_env)
        sh("vgcreate", "-q", "-s", "4m", other_vg, c, env=lvm_env)
        (vg,) = unlock.guest_vgs(a, devices)
        assert (vg.name, vg.pv_count, sorted(vg.pvs)) == (guest_vg, 2, sorted([a, b]))
        # LVM reads the other mappings only for a VG with more PVs than the volume's own (at
        # shutdown the locks run together: a scan of every mapping holds the others' open)
        scanned: list[list[str]] = []
        real_run = lvm.run

        def run(argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
            scanned.append([argv[i + 1] for i, word in enumerate(argv) if word == "--devices"])
            return real_run(argv, **kwargs)

        monkeypatch.setattr(lvm, "run", run)
        assert [v.name for v in unlock.guest_vgs(c, devices)] == [other_vg]
        assert scanned == [[c]]
        (vg_again,) = unlock.guest_vgs(a, devices)
        assert vg_again == vg and scanned[1:] == [[a], devices]
        # b locked: the VG is partial, its missing PV is no device to hand to vgchange
        (partial,) = unlock.guest_vgs(a, [a, c])
        assert (partial.pv_count, partial.pvs) == (2, (a,))
        monkeypatch.setattr(lvm, "run", real_run)
        # dm devices as the kernel would show them with the guest's LV active across both
        root_lv = DmDevice(f"{guest_vg}-root", "dm-9", vg.dm_uuid_prefix + "L" * 32, 0, ())
        probe = LockProbe(
            (
                DmDevice("cr_a", "dm-1", "CRYPT-LUKS2-x-cr_a", 1, ("dm-9",)),
                DmDevice("cr_b", "dm-2", "CRYPT-LUKS2-x-cr_b", 1, ("dm-9",)),
                root_lv,
            ),
            (vg,),
        )
        volume = config.parse_crypttab("cr_a /dev/vg/a - luks", "t")[0][0]
        plan = unlock.lock_plan(volume, probe)
        deactivate = plan.steps[0].argv
        assert deactivate == lvm.deactivate_argv(vg)
        assert sorted(deactivate[3:-1:2]) == sorted([a, b])
        # the very command the plan holds is one LVM accepts (activation is off here)
        sh(*deactivate, env=lvm_env)
    finally:
        sh("vgremove", "-q", "-f", guest_vg, other_vg, env=lvm_env)
        sh("pvremove", "-q", a, b, c, env=lvm_env)


def test_a_scan_holding_the_mapping_is_waited_for_other_processes_are_not(
    tmp_path: Path, loop_device: Callable[[Path], str]
) -> None:
    """At shutdown the locks run together and each one's `pvs` reads every open mapping: a lock
    that finds another's scan holding its mapping waits for it; a dd holding it is refused at once.
    Real processes holding a real block device, found through /proc."""
    image = tmp_path / "disk.img"
    sh("truncate", "-s", "8M", str(image))
    device = loop_device(image)
    kernel = os.path.basename(device)
    hold = (
        "import sys, time; f = open(sys.argv[1], 'rb'); print('open', flush=True); time.sleep(60)"
    )
    holders: dict[str, subprocess.Popen[str]] = {}
    try:
        for name in ("pvs", "(udev-worker)", "dd"):
            holders[name] = subprocess.Popen(
                [name, "-c", hold, device],
                executable=sys.executable,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert holders[name].stdout is not None and holders[name].stdout.readline() == "open\n"
        found = {o.description: o.scanner for o in devmapper.users([kernel])[kernel]}
        assert found == {
            f"pvs (pid {holders['pvs'].pid})": True,
            f"(udev-worker) (pid {holders['(udev-worker)'].pid})": True,
            f"dd (pid {holders['dd'].pid})": False,
        }
        volume = config.parse_crypttab("cr_x /dev/vg/x - luks", "t")[0][0]

        def plan() -> unlock.Plan:
            users = devmapper.users([kernel])
            mapping = DmDevice("cr_x", kernel, "CRYPT-LUKS2-x-cr_x", len(users[kernel]), ())
            return unlock.lock_plan(volume, LockProbe((mapping,), (), users))

        held_by_dd = plan()
        assert "dd (pid" in held_by_dd.refusal and not held_by_dd.transient
        dd = holders.pop("dd")
        dd.kill()
        dd.wait()
        only_scans = plan()
        assert f"pvs (pid {holders['pvs'].pid})" in only_scans.refusal and only_scans.transient
    finally:
        for process in holders.values():
            process.kill()
            process.wait()


# --- status ------------------------------------------------------------------------------------


def test_status_json_shows_locked_volumes_and_guest_policies(tmp_path: Path) -> None:
    image = make_luks(tmp_path / "disk.img", KEY)
    node = tmp_path / "node.xml"  # libvirt's test driver: "mail" defined (and running), "web" not
    node.write_text(
        "<node><domain type='test'><name>mail</name><memory>65536</memory>"
        "<os><type>hvm</type></os></domain></node>"
    )
    root = write_config(
        tmp_path / "root",
        {
            "10.conf": f"cr_imap_encr {image} /etc/luksvm/keys/imap.key luks,x-luksvm.guest=mail\n"
            "cr_web /dev/nonexistent - luks,noauto,x-luksvm.guest=web\n"
        },
        f"[libvirt]\nuri = test://{node}\n[guests]\nstop_timeout = 90s\n"
        "[guest:web]\non_timeout = managedsave\n",
    )
    result = luksvm(root, "status", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert [(v["name"], v["state"], v["device_present"]) for v in data["volumes"]] == [
        ("cr_imap_encr", "locked", True),
        ("cr_web", "locked", False),
    ]
    assert (data["guests"][0]["name"], data["guests"][0]["state"]) == ("mail", "running")
    assert data["problems"] == []
    assert data["guests"][1] == {
        "name": "web",
        "state": "not defined in libvirt",
        "volumes": ["cr_web"],
        "may_start": False,
        "locked_volumes": ["cr_web"],
        "stop_timeout": "1min 30s",
        "on_timeout": "managedsave",
        "unit": None,
    }
    table = luksvm(root, "status").stdout
    assert "cr_web        locked  /dev/nonexistent (missing)" in table
    assert "no: cr_web locked" in table


def test_lock_all_goes_in_reverse_config_order_and_closed_is_success(seed_root: Path) -> None:
    result = luksvm(seed_root, "lock", "--all", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "# cr_web: already locked\n# cr_imap_encr: already locked\n"


def test_lock_reads_domain_states_from_libvirt(tmp_path: Path) -> None:
    pytest.importorskip("libvirt")
    root = write_config(tmp_path, {}, "[libvirt]\nuri = test:///default\n")
    cfg = config.load(str(root))
    assert unlock.libvirt_states(cfg, ["test", "nope"]) == {"test": "running", "nope": "missing"}
    unreachable = write_config(tmp_path / "b", {}, "[libvirt]\nuri = test:///nonexistent.xml\n")
    assert unlock.libvirt_states(config.load(str(unreachable)), ["test"]) == {}
