"""The Ansible collection luksvm.host (ansible/ansible_collections/luksvm/host) run by the real
ansible-core (Debian 12's 2.14) against a --root tree with the real luksvm CLI: every module in
check mode, diff mode, twice (idempotence) and with bad input; the role from variables; and
`ansible-test sanity` and `ansible-galaxy collection build` on the collection."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from luksvm import __version__
from tests.conftest import write_config
from tests.integration.conftest import make_luks

REPO = Path(__file__).resolve().parents[2]
COLLECTIONS = REPO / "ansible"
COLLECTION = COLLECTIONS / "ansible_collections/luksvm/host"
LUKSVM = str(Path(sys.executable).parent / "luksvm")
ANSIBLE_ENV = {
    "ANSIBLE_COLLECTIONS_PATH": str(COLLECTIONS),
    "ANSIBLE_LOCALHOST_WARNING": "false",
    "ANSIBLE_INVENTORY_UNPARSED_WARNING": "false",
    "ANSIBLE_NOCOLOR": "1",
    "ANSIBLE_PYTHON_INTERPRETER": "/usr/bin/python3",
}


@dataclass(frozen=True)
class Ran:
    result: dict[str, Any]
    stdout: str  # diff mode prints its diffs here

    @property
    def changed(self) -> bool:
        return bool(self.result.get("changed"))

    @property
    def failed(self) -> bool:
        return bool(self.result.get("failed"))


def module(
    tmp_path: Path, name: str, args: dict[str, Any], *, check: bool = False, diff: bool = False
) -> Ran:
    """Run luksvm.host.NAME once through `ansible localhost` (connection local)."""
    tree = tmp_path / f"ansible-tree-{os.urandom(4).hex()}"
    argv = ["ansible", "localhost", "-c", "local", "-m", f"luksvm.host.{name}", "-t", str(tree)]
    argv += ["-a", json.dumps({"executable": LUKSVM, **args})]
    argv += ["--check"] * check + ["--diff"] * diff
    proc = subprocess.run(
        argv,
        env={**os.environ, **ANSIBLE_ENV},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    result = json.loads((tree / "localhost").read_text())
    shutil.rmtree(tree)
    assert proc.returncode in (0, 2), proc.stdout + proc.stderr  # 2: the task failed
    # the tree callback leaves "failed" out of what it saves
    return Ran({**result, "failed": proc.returncode == 2}, proc.stdout)


def tree(root: Path) -> dict[str, str]:
    """Every file under ROOT and its text (symlinks as their target), to prove nothing changed."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            out[str(path.relative_to(root))] = "-> " + os.readlink(path)
        elif path.is_file():
            out[str(path.relative_to(root))] = path.read_text(errors="replace")
    return out


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return write_config(
        tmp_path / "root",
        {"10-admin.conf": "# the admin's own\ncr_a /dev/x - luks,x-luksvm.guest=mail\n"},
    )


# --- volume --------------------------------------------------------------------------------------


def test_volume_is_written_checked_applied_and_idempotent(tmp_path: Path, root: Path) -> None:
    args = {
        "name": "cr_db",
        "source": "/dev/vg0/db",
        "key": "/etc/luksvm/keys/db.key",
        "options": ["luks", "discard"],
        "guests": ["db"],
        "root": str(root),
    }
    first = module(tmp_path, "volume", args, diff=True)
    assert first.changed, first.result
    fragment = root / "etc/luksvm/crypttab.d/50-cr_db.conf"
    line = "cr_db /dev/vg0/db /etc/luksvm/keys/db.key luks,discard,x-luksvm.guest=db"
    assert fragment.read_text().splitlines()[-1] == line
    assert "+" + line in first.stdout  # the diff
    units = root / "etc/systemd/system"
    assert (units / "luksvm-unlock@cr_db.service.d/50-luksvm.conf").is_file()
    assert (units / "luksvm.target.wants/luksvm-guest@db.service").is_symlink()
    before = tree(root)
    second = module(tmp_path, "volume", args)
    assert not second.changed, second.result
    assert tree(root) == before


def test_volume_check_mode_shows_the_diff_and_changes_nothing(tmp_path: Path, root: Path) -> None:
    args = {"name": "cr_db", "source": "/dev/vg0/db", "guests": ["db"], "root": str(root)}
    module(tmp_path, "volume", args)
    before = tree(root)
    ran = module(tmp_path, "volume", {**args, "source": "/dev/vg0/db2"}, check=True, diff=True)
    assert ran.changed
    assert "-cr_db /dev/vg0/db - luks,x-luksvm.guest=db" in ran.stdout
    assert "+cr_db /dev/vg0/db2 - luks,x-luksvm.guest=db" in ran.stdout
    assert tree(root) == before


def test_volume_in_the_admins_fragment_is_edited_in_place(tmp_path: Path, root: Path) -> None:
    ran = module(
        tmp_path, "volume", {"name": "cr_a", "source": "/dev/x", "guests": ["mail", "web"],
                             "root": str(root)}
    )  # fmt: skip
    assert ran.changed
    assert ran.result["file"] == str(root / "etc/luksvm/crypttab.d/10-admin.conf")
    assert (root / "etc/luksvm/crypttab.d/10-admin.conf").read_text() == (
        "# the admin's own\ncr_a /dev/x - luks,x-luksvm.guest=mail,x-luksvm.guest=web\n"
    )
    gone = module(tmp_path, "volume", {"name": "cr_a", "state": "absent", "root": str(root)})
    assert gone.changed
    assert (root / "etc/luksvm/crypttab.d/10-admin.conf").read_text() == "# the admin's own\n"
    assert not module(
        tmp_path, "volume", {"name": "cr_a", "state": "absent", "root": str(root)}
    ).changed


def test_volume_bad_input_fails_with_luksvms_message_and_changes_nothing(
    tmp_path: Path, root: Path
) -> None:
    module(tmp_path, "volume", {"name": "cr_db", "source": "/dev/vg0/db", "root": str(root)})
    before = tree(root)
    bad = module(
        tmp_path,
        "volume",
        {"name": "cr_db", "source": "/dev/vg0/db", "options": ["luks", "bogus"], "root": str(root)},
    )
    assert bad.failed
    fragment = root / "etc/luksvm/crypttab.d/50-cr_db.conf"
    assert f"{fragment}:2:" in bad.result["msg"]
    assert "unknown crypttab option 'bogus'" in bad.result["msg"]
    assert "/tmp/luksvm-ansible-" not in bad.result["msg"]  # the real file is named, not the copy
    twice = module(tmp_path, "volume", {"name": "cr_b", "source": "/dev/x", "root": str(root)})
    assert twice.failed
    assert "already used at" in twice.result["msg"]
    no_source = module(tmp_path, "volume", {"name": "cr_new", "root": str(root)})
    assert no_source.failed
    assert "source" in no_source.result["msg"]
    wrong_file = module(
        tmp_path, "volume", {"name": "cr_c", "source": "/dev/c", "file": "../x", "root": str(root)}
    )
    assert wrong_file.failed
    assert "ending in .conf" in wrong_file.result["msg"]
    assert tree(root) == before


def test_volume_unlock_in_check_mode_reports_a_change_and_runs_nothing(
    tmp_path: Path, root: Path
) -> None:
    before = tree(root)
    ran = module(tmp_path, "volume", {"name": "cr_a", "state": "unlocked", "root": str(root)},
                 check=True)  # fmt: skip
    assert ran.changed
    assert ran.result["volume_state"] == "unlocked"
    assert tree(root) == before
    locked = module(
        tmp_path, "volume", {"name": "cr_a", "state": "locked", "apply": False, "root": str(root)}
    )
    assert not locked.changed  # it is locked: nothing to do, nothing run
    assert locked.result["volume_state"] == "locked"


# --- settings ------------------------------------------------------------------------------------


def test_settings_keep_comments_are_checked_and_idempotent(tmp_path: Path, root: Path) -> None:
    conf = root / "etc/luksvm/luksvm.conf"
    conf.write_text("# mine\n[guests]\n# stop_timeout = 2min\n")
    args = {
        "settings": {"guests": {"stop_timeout": "5min"}, "guest:mail": {"on_timeout": "destroy"}},
        "root": str(root),
    }
    ran = module(tmp_path, "settings", args, diff=True)
    assert ran.changed
    assert conf.read_text() == (
        "# mine\n[guests]\n# stop_timeout = 2min\nstop_timeout = 5min\n\n"
        "[guest:mail]\non_timeout = destroy\n"
    )
    assert "+stop_timeout = 5min" in ran.stdout
    assert (
        "TimeoutStopSec="
        in (root / "etc/systemd/system/luksvm-guest@mail.service.d/50-luksvm.conf").read_text()
    )
    before = tree(root)
    assert not module(tmp_path, "settings", args).changed
    check = module(
        tmp_path, "settings", {"settings": {"guests": {"stop_timeout": None}}, "root": str(root)},
        check=True, diff=True,
    )  # fmt: skip
    assert check.changed
    assert "-stop_timeout = 5min" in check.stdout
    bad = module(
        tmp_path, "settings", {"settings": {"guests": {"stop_timeout": "soon"}}, "root": str(root)}
    )
    assert bad.failed
    assert f"{conf}:4:" in bad.result["msg"]
    assert "is not a time span" in bad.result["msg"]
    assert tree(root) == before


# --- info, header_backup, guest ------------------------------------------------------------------


def test_info_gathers_luksvm_facts_and_changes_nothing(tmp_path: Path, root: Path) -> None:
    before = tree(root)
    ran = module(tmp_path, "info", {"root": str(root)})
    facts = ran.result["ansible_facts"]["luksvm"]
    assert not ran.changed
    assert facts["version"] == __version__
    assert [v["name"] for v in facts["config"]["volumes"]] == ["cr_a"]
    assert facts["status"]["volumes"][0]["state"] == "locked"
    assert {f["check"] for f in facts["doctor"]} >= {"config", "luks"}
    assert facts["doctor_exit"] in (1, 2)
    assert "keys" in facts
    assert tree(root) == before


def test_header_backup_returns_paths_and_checksums(tmp_path: Path) -> None:
    image = make_luks(tmp_path / "a.img", b"pw")
    root = write_config(tmp_path / "root", {"10.conf": f"cr_img {image} - luks\n"})
    dry = module(tmp_path, "header_backup", {"root": str(root)}, check=True)
    assert dry.changed
    assert not (root / "var/lib/luksvm/header-backups").exists()
    ran = module(tmp_path, "header_backup", {"root": str(root)})
    assert ran.changed
    (backup,) = ran.result["backups"]
    assert backup["volume"] == "cr_img"
    assert backup["sha256"] == hashlib.sha256(Path(backup["file"]).read_bytes()).hexdigest()
    again = module(tmp_path, "header_backup", {"root": str(root), "names": ["cr_img"]})
    assert not again.changed
    assert again.result["backups"][0]["file"] == backup["file"]
    unknown = module(tmp_path, "header_backup", {"root": str(root), "names": ["cr_nope"]})
    assert unknown.failed
    assert "cr_nope" in unknown.result["msg"]


def test_guest_start_is_a_no_op_for_a_running_guest_and_stop_is_checked(tmp_path: Path) -> None:
    root = write_config(
        tmp_path / "root",
        {"10.conf": "cr_t /dev/x - luks,x-luksvm.guest=test\n"},
        "[libvirt]\nuri = test:///default\n",  # its domain "test" runs
    )
    started = module(tmp_path, "guest", {"name": "test", "root": str(root)})
    assert not started.changed
    assert started.result["guest_state"] == "running"
    stop = module(tmp_path, "guest", {"name": "test", "state": "stopped", "root": str(root)},
                  check=True)  # fmt: skip
    assert stop.changed
    unknown = module(tmp_path, "guest", {"name": "nope", "root": str(root)})
    assert unknown.failed
    assert "x-luksvm.guest=nope" in unknown.result["msg"]


# --- the role ------------------------------------------------------------------------------------

PLAYBOOK = """\
- hosts: localhost
  connection: local
  gather_facts: false
  roles:
    - role: luksvm.host.luksvm
"""


def play(tmp_path: Path, variables: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "site.yml").write_text(PLAYBOOK)
    (tmp_path / "vars.json").write_text(json.dumps(variables))
    return subprocess.run(
        ["ansible-playbook", "-i", "localhost,", "-e", f"@{tmp_path / 'vars.json'}",
         str(tmp_path / "site.yml"), *args],
        env={**os.environ, **ANSIBLE_ENV, "PATH": f"{Path(LUKSVM).parent}:{os.environ['PATH']}"},
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip


def recap(proc: subprocess.CompletedProcess[str]) -> dict[str, int]:
    match = re.search(r"localhost\s+:\s+(.*)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", match.group(1))}


def test_role_sets_up_from_variables_then_changes_nothing_and_check_mode_shows_the_diff(
    tmp_path: Path,
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    variables: dict[str, Any] = {
        "luksvm_root": str(root),
        "luksvm_settings": {"guests": {"stop_timeout": "3min"}},
        "luksvm_volumes": [
            {"name": "cr_mail", "source": "/dev/vg0/mail", "key": "/etc/luksvm/keys/mail.key",
             "options": ["luks", "discard"], "guests": ["mail"]},
            {"name": "cr_web", "source": "/dev/vg0/web", "options": ["luks", "noauto"],
             "guests": ["web"]},
        ],
    }  # fmt: skip
    # The wheel's version is the installed luksvm's: copied, and not installed again.
    wheel = tmp_path / f"luksvm-{__version__}-py3-none-any.whl"
    wheel.write_bytes(b"not installed: the version matches")
    variables["luksvm_package"] = str(wheel)
    variables["luksvm_package_dir"] = str(tmp_path / "packages")
    variables["luksvm_wheel_dependencies"] = []
    first = play(tmp_path, variables)
    assert first.returncode == 0, first.stdout + first.stderr
    assert recap(first)["changed"] >= 3
    assert (root / "etc/luksvm/crypttab.d/50-cr_mail.conf").is_file()
    assert (root / "etc/systemd/system/luksvm.target.wants/luksvm-guest@mail.service").is_symlink()
    assert "stop_timeout = 3min" in (root / "etc/luksvm/luksvm.conf").read_text()
    assert (tmp_path / "packages" / wheel.name).read_bytes() == wheel.read_bytes()
    assert re.search(r"TASK \[luksvm.host.luksvm : Install the wheel\] \*+\nskipping", first.stdout)
    before = tree(root)
    second = play(tmp_path, variables)
    assert recap(second)["changed"] == 0, second.stdout
    assert tree(root) == before
    variables["luksvm_settings"]["guests"]["stop_timeout"] = "4min"
    check = play(tmp_path, variables, "--check", "--diff")
    assert check.returncode == 0, check.stdout + check.stderr
    assert recap(check)["changed"] == 1
    assert "-stop_timeout = 3min" in check.stdout
    assert "+stop_timeout = 4min" in check.stdout
    assert tree(root) == before
    bad = play(tmp_path, {**variables, "luksvm_package": str(tmp_path / "luksvm.tar.gz")})
    assert bad.returncode != 0
    assert "give an .rpm, a .deb or a .whl file" in bad.stdout


# --- the collection as a whole -------------------------------------------------------------------


def test_galaxy_version_is_luksvms_and_the_collection_builds(tmp_path: Path) -> None:
    galaxy = (COLLECTION / "galaxy.yml").read_text()
    (version,) = re.findall(r"^version:\s*(\S+)\s*$", galaxy, re.MULTILINE)
    pyproject = (REPO / "pyproject.toml").read_text()
    assert version == re.findall(r'^version = "([^"]+)"', pyproject, re.MULTILINE)[0] == __version__
    proc = subprocess.run(
        ["ansible-galaxy", "collection", "build", str(COLLECTION), "--output-path", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    artifact = tmp_path / f"luksvm-host-{__version__}.tar.gz"
    listing = subprocess.run(
        ["tar", "-tzf", str(artifact)], capture_output=True, text=True, check=True
    ).stdout.split()
    for name in ("volume", "settings", "info", "header_backup", "guest"):
        assert f"plugins/modules/{name}.py" in listing
    assert "roles/luksvm/tasks/main.yml" in listing
    assert (COLLECTION / "LICENSE").read_bytes() == (REPO / "LICENSE").read_bytes()


def test_ansible_test_sanity_is_clean(tmp_path: Path) -> None:
    """ansible-test needs the ansible_collections/NAMESPACE/NAME layout; it runs on a copy so that
    its output stays out of the tree."""
    copy = tmp_path / "ansible_collections/luksvm/host"
    shutil.copytree(COLLECTION, copy)
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    proc = subprocess.run(
        ["ansible-test", "sanity", "--local", "--python", python],
        cwd=copy, capture_output=True, text=True, timeout=1200, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert 'Running sanity test "validate-modules"' in proc.stdout
