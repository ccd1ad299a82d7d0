"""enroll, keys and stale header backups against real tools: systemd-cryptenroll with a software
TPM (swtpm, through systemd's swtpm: TCTI), clevis luks bind against a Tang server (tangd behind
socat on 127.0.0.1), cryptsetup on LUKS2 image files. Nothing is opened: no device-mapper here."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest

from luksvm import tokens
from luksvm.cli import main
from tests.conftest import write_config
from tests.integration.conftest import make_luks, sh

KEY = b"correct horse"
# a keyfile as `head -c 64 /dev/urandom` makes them: NUL bytes and a newline inside
BINARY_KEY = b"\x00key\nfile\xff\x00" * 4
TANGD = "/usr/libexec/tangd"


def tool(path: str) -> None:
    if not (os.path.exists(path) or shutil.which(path)):
        pytest.fail(f"{path} is missing: run tools/install-deps")


@pytest.fixture
def swtpm(tmp_path: Path) -> Iterator[str]:
    """A fresh software TPM 2.0; yields the tpm2-device= value that reaches it."""
    tool("swtpm")
    state = tmp_path / "tpm"
    state.mkdir()
    sock = tmp_path / "swtpm.sock"
    proc = subprocess.Popen(
        [
            "swtpm", "socket", "--tpm2", "--tpmstate", f"dir={state}",
            "--server", f"type=unixio,path={sock}",
            "--ctrl", f"type=unixio,path={sock}.ctrl",
            "--flags", "startup-clear,not-need-init",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(100):
            if sock.exists() and Path(f"{sock}.ctrl").exists():
                break
            time.sleep(0.05)
        yield f"swtpm:path={sock}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Tang:
    def __init__(self, db: Path) -> None:
        self.db = db
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "socat", f"TCP-LISTEN:{self.port},bind=127.0.0.1,fork,reuseaddr",
                f"EXEC:{TANGD} {self.db}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        for _ in range(100):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        pytest.fail("tangd behind socat did not listen")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    def thumbprint(self) -> str:
        """The signing key's thumbprint as the Tang admin would read it (jose, S256)."""
        for key in sorted(self.db.glob("*.jwk")):
            if "verify" in json.loads(key.read_text()).get("key_ops", []):
                return sh("jose", "jwk", "thp", "-a", "S256", "-i", str(key)).strip()
        pytest.fail("tangd-keygen made no signing key")


@pytest.fixture
def tang(tmp_path: Path) -> Iterator[Tang]:
    tool(TANGD)
    tool("socat")
    db = tmp_path / "tangdb"
    db.mkdir()
    sh("/usr/libexec/tangd-keygen", str(db))
    server = Tang(db)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def host(
    tmp_path: Path, options: str = "luks", *, keyfile: bool = True, key: bytes = KEY
) -> tuple[Path, Path]:
    """A LUKS2 image whose volume cr_t is configured under ROOT (keyfile or -), backups under
    ROOT/backups. Returns (root, image)."""
    root = tmp_path / "root"
    image = make_luks(tmp_path / "t.img", key)
    key_field = "-"
    if keyfile:
        keys = root / "etc/luksvm/keys"
        keys.mkdir(parents=True)
        (keys / "t.key").write_bytes(key)
        (keys / "t.key").chmod(0o400)
        key_field = "/etc/luksvm/keys/t.key"
    write_config(
        root,
        {"10-t.conf": f"cr_t  {image}  {key_field}  {options}\n"},
        f"[backup]\ndir = {root}/backups\n",
    )
    return root, image


def metadata(image: Path) -> dict[str, object]:
    return json.loads(sh("cryptsetup", "luksDump", "--dump-json-metadata", str(image)))


def keys_json(root: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, object]]:
    capsys.readouterr()
    code = main(["--root", str(root), "keys", "--json"])
    return code, json.loads(capsys.readouterr().out)[0]


def conf(root: Path) -> str:
    return (root / "etc/luksvm/crypttab.d/10-t.conf").read_text()


def test_enroll_tpm2_through_swtpm_and_keys_follows_the_pcr_policy(
    tmp_path: Path, swtpm: str, capsys: pytest.CaptureFixture[str]
) -> None:
    root, image = host(tmp_path)
    assert main(["--root", str(root), "enroll", "cr_t", "--tpm2", "--tpm2-device", swtpm,
                 "--tpm2-pcrs", "7+8"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert f"+cr_t  {image}  /etc/luksvm/keys/t.key  luks,tpm2-device={swtpm}" in out
    assert f"luks,tpm2-device={swtpm}\n" in conf(root)
    token = metadata(image)["tokens"]["0"]  # type: ignore[index]
    assert token["type"] == "systemd-tpm2" and token["tpm2-pcrs"] == [7, 8]
    backups = sorted((root / "backups/cr_t").glob("*.luksheader"))
    assert len(backups) == 2  # before and after: the header changed
    assert len(tokens.read_inventory(str(backups[0])).tokens) == 0
    assert len(tokens.read_inventory(str(backups[1])).tokens) == 1

    code, entry = keys_json(root, capsys)
    assert code == 0, entry
    states = {c["source"]: c["state"] for c in entry["unattended"]}  # type: ignore[attr-defined]
    assert states == {"tpm2": "ok", "keyfile": "ok"}
    assert [s["by"] for s in entry["keyslots"]] == [["passphrase"], ["tpm2"]]  # type: ignore[attr-defined]

    # what a firmware update does: PCR 8 moves on; the sealed key no longer matches
    sh("tpm2_pcrextend", "-T", swtpm, "8:sha256=" + "ab" * 32)
    code, entry = keys_json(root, capsys)
    assert code == 2
    tpm2 = next(c for c in entry["unattended"] if c["source"] == "tpm2")  # type: ignore[attr-defined]
    assert tpm2["state"] == "fail" and "PCRs changed" in tpm2["detail"]


def test_enroll_tang_needs_the_thumbprint_and_keys_asks_the_server(
    tmp_path: Path, tang: Tang, capsys: pytest.CaptureFixture[str]
) -> None:
    # a binary keyfile: clevis's `-k -` would mangle it (bash's read), a key file path does not
    root, image = host(tmp_path, key=BINARY_KEY)
    with pytest.raises(SystemExit) as usage:
        main(["--root", str(root), "enroll", "cr_t", "--tang", tang.url, "--tpm2"])
    assert usage.value.code == 64
    assert main(["--root", str(root), "enroll", "cr_t", "--tang", tang.url]) == 64
    assert "never trusts a key on first use" in capsys.readouterr().err
    wrong = "A" * 43
    assert main(["--root", str(root), "enroll", "cr_t", "--tang", tang.url,
                 "--thumbprint", wrong]) == 2  # fmt: skip
    assert "tokens" not in metadata(image) or not metadata(image)["tokens"]
    assert "x-luksvm.tang" not in conf(root)

    thp = tang.thumbprint()
    assert main(["--root", str(root), "enroll", "cr_t", "--tang", tang.url,
                 "--thumbprint", thp]) == 0  # fmt: skip
    assert "luks,x-luksvm.tang\n" in conf(root)
    code, entry = keys_json(root, capsys)
    assert code == 0, entry
    [token] = entry["tokens"]  # type: ignore[misc]
    assert token["kind"] == "tang" and token["urls"] == [tang.url]
    assert token["thumbprints"] == [thp]  # computed by luksvm, as jose computes it
    assert {c["source"]: c["state"] for c in entry["unattended"]} == {  # type: ignore[attr-defined]
        "tang": "ok",
        "keyfile": "ok",
    }

    tang.stop()
    code, entry = keys_json(root, capsys)
    assert code == 2
    check = next(c for c in entry["unattended"] if c["source"] == "tang")  # type: ignore[attr-defined]
    assert check["state"] == "fail" and "did not answer" in check["detail"]


def test_dry_run_prints_the_commands_and_changes_nothing(
    tmp_path: Path, swtpm: str, capsys: pytest.CaptureFixture[str]
) -> None:
    root, image = host(tmp_path)
    before = metadata(image)
    assert main(["--root", str(root), "enroll", "cr_t", "--tpm2", "--tpm2-device", swtpm,
                 "--dry-run"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert (
        f"systemd-cryptenroll --unlock-key-file=/proc/self/fd/N --tpm2-device={swtpm} "
        f"--tpm2-pcrs=7 {image}\n" in out
    )
    assert f"# +cr_t  {image}  /etc/luksvm/keys/t.key  luks,tpm2-device={swtpm}" in out
    assert metadata(image) == before
    assert "tpm2-device" not in conf(root)
    assert not (root / "backups").exists()


def test_remove_refuses_the_last_key_then_marks_and_prunes_stale_backups(
    tmp_path: Path, swtpm: str, capsys: pytest.CaptureFixture[str]
) -> None:
    root, image = host(tmp_path)
    assert main(["--root", str(root), "enroll", "cr_t", "--remove", "0"]) == 2
    assert "no key at all" in capsys.readouterr().err
    assert list(metadata(image)["keyslots"]) == ["0"]  # type: ignore[arg-type]

    assert main(["--root", str(root), "enroll", "cr_t", "--tpm2", "--tpm2-device", swtpm]) == 0
    assert main(["--root", str(root), "enroll", "cr_t", "--remove", "tpm2"]) == 0
    out = capsys.readouterr().out
    assert f"-cr_t  {image}  /etc/luksvm/keys/t.key  luks,tpm2-device={swtpm}" in out
    assert "tpm2-device" not in conf(root)
    assert list(metadata(image)["keyslots"]) == ["0"]  # type: ignore[arg-type]
    assert not metadata(image)["tokens"]
    folder = root / "backups/cr_t"
    # the backups from before the removal hold the TPM2 keyslot; the newest is the live header
    backups = sorted(folder.glob("*.luksheader"))
    stale = sorted(p.name[: -len(".stale")] for p in folder.glob("*.stale"))
    holding = [b.name for b in backups if len(tokens.read_inventory(str(b)).keyslots) == 2]
    assert stale == holding and len(holding) >= 1
    assert backups[-1].name not in stale

    assert main(["--root", str(root), "header-backup", "--prune-stale", "--dry-run"]) == 0
    assert sorted(folder.glob("*.stale"))  # the dry run deleted nothing
    assert main(["--root", str(root), "header-backup", "--prune-stale"]) == 0
    left = sorted(folder.glob("*.luksheader"))
    assert backups[-1] in left
    assert all(len(tokens.read_inventory(str(b)).keyslots) == 1 for b in left)
    assert not list(folder.glob("*.stale"))


def test_recovery_key_is_shown_once_on_the_terminal_and_opens_the_volume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, image = host(tmp_path)
    # standard output is not a terminal here: refused, nothing changed
    assert main(["--root", str(root), "enroll", "cr_t", "--recovery-key"]) == 2
    assert "shown once, on the terminal" in capsys.readouterr().err
    assert len(metadata(image)["keyslots"]) == 1  # type: ignore[arg-type]

    child = pexpect.spawn(
        sys.executable,
        ["-m", "luksvm", "--root", str(root), "enroll", "cr_t", "--recovery-key"],
        timeout=60,
    )
    child.expect(r"shown once.*\n\s*\n\s+([a-z]{8}(?:-[a-z]{8}){7})\s")
    recovery = child.match.group(1)  # type: ignore[union-attr]
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert [t["type"] for t in metadata(image)["tokens"].values()] == ["systemd-recovery"]  # type: ignore[attr-defined]
    assert tokens.key_slot(str(image), recovery) == 1


def findings(root: Path, check: str) -> list[tuple[str, str]]:
    from luksvm import doctor

    found = doctor.run_checks(doctor.Host(str(root)), doctor.select([check]))
    return [(f.status, f.message + " | " + f.fix) for f in found]


def test_doctor_says_what_broke_and_whether_a_way_back_exists(
    tmp_path: Path, swtpm: str, tang: Tang, capsys: pytest.CaptureFixture[str]
) -> None:
    root, image = host(tmp_path, f"luks,tpm2-device={swtpm}")
    # configured for TPM2, but nothing enrolled yet: that attempt would fail at every boot
    [(status, text)] = findings(root, "unattended-keys")[:1]
    assert status == "FAIL" and "no tpm2 token" in text and "luksvm enroll cr_t --tpm2" in text

    assert main(["--root", str(root), "enroll", "cr_t", "--tpm2", "--tpm2-device", swtpm]) == 0
    assert main(["--root", str(root), "enroll", "cr_t", "--tang", tang.url,
                 "--thumbprint", tang.thumbprint()]) == 0  # fmt: skip
    found = findings(root, "unattended-keys")
    assert [s for s, _ in found] == ["OK", "OK", "WARN"], found
    assert "nothing but its unattended keys" in found[-1][1]  # the keyfile is one of them
    assert "--recovery-key" in found[-1][1]

    sh("cryptsetup", "luksAddKey", "-q", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
       "--key-file", str(root / "etc/luksvm/keys/t.key"), str(image), "-",
       stdin=b"a passphrase kept offline")  # fmt: skip
    tang.stop()
    sh("tpm2_pcrextend", "-T", swtpm, "7:sha256=" + "cd" * 32)
    found = findings(root, "unattended-keys")
    assert [s for s, _ in found] == ["FAIL", "FAIL", "OK"], found
    assert "PCRs changed" in found[0][1] and "did not answer" in found[1][1]
    assert "keyslot(s) 3" in found[2][1]


def test_doctor_names_stale_backups_until_they_are_pruned(
    tmp_path: Path, swtpm: str, capsys: pytest.CaptureFixture[str]
) -> None:
    root, _ = host(tmp_path)
    assert main(["--root", str(root), "enroll", "cr_t", "--tpm2", "--tpm2-device", swtpm]) == 0
    # doctor reads the backup directory under its root, as it does on a mounted root
    mirror = root / str(root / "backups").lstrip("/")
    mirror.parent.mkdir(parents=True)
    mirror.symlink_to(root / "backups")
    assert [s for s, _ in findings(root, "stale-backups")] == ["OK"]
    assert main(["--root", str(root), "enroll", "cr_t", "--remove", "tpm2"]) == 0
    [(status, text)] = findings(root, "stale-backups")
    assert status == "WARN" and "still hold a removed key" in text
    assert "luksvm header-backup --prune-stale cr_t" in text
    assert main(["--root", str(root), "header-backup", "--prune-stale", "cr_t"]) == 0
    assert [s for s, _ in findings(root, "stale-backups")] == ["OK"]


def test_a_key_on_stdin_authenticates_and_a_wrong_one_changes_nothing(
    tmp_path: Path, swtpm: str
) -> None:
    root, image = host(tmp_path, keyfile=False)  # key "-": nothing configured to authenticate
    argv = [sys.executable, "-m", "luksvm", "--root", str(root), "enroll", "cr_t", "--tpm2",
            "--tpm2-device", swtpm, "--key-file", "-"]  # fmt: skip
    wrong = subprocess.run(argv, input=b"not the key", capture_output=True, check=False)
    assert wrong.returncode == 2, wrong.stderr
    assert b"--key-file -" in wrong.stderr and b"not the key" not in wrong.stderr + wrong.stdout
    assert not metadata(image)["tokens"] and not (root / "backups").exists()
    right = subprocess.run(argv, input=KEY, capture_output=True, check=False)
    assert right.returncode == 0, right.stderr
    assert KEY not in right.stderr + right.stdout
    assert [t["type"] for t in metadata(image)["tokens"].values()] == ["systemd-tpm2"]  # type: ignore[attr-defined]
