"""The RPM: `make rpm` builds it from the working tree; it holds exactly the expected files with
their modes and dependencies, its scriptlets touch only the timers and the target, it installs
into a scratch root and runs there, an upgrade keeps an edited luksvm.conf, and rpmlint passes
with the filters of packaging/rpmlint.toml."""

from __future__ import annotations

import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from luksvm import __version__
from tools import gendocs

REPO = Path(__file__).resolve().parents[2]
SCRIPT_TAGS = {"post": "POSTIN", "preun": "PREUN", "postun": "POSTUN"}


@dataclass(frozen=True)
class Built:
    rpm: Path
    srpm: Path


def make_rpm(distdir: Path, release: int) -> Built:
    proc = subprocess.run(
        ["make", "--no-print-directory", "rpm", f"DISTDIR={distdir}", f"RELEASE={release}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    name = f"luksvm-{__version__}-{release}"
    return Built(distdir / f"{name}.noarch.rpm", distdir / f"{name}.src.rpm")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return make_rpm(tmp_path_factory.mktemp("dist"), 1)


def rpm(*argv: str) -> str:
    proc = subprocess.run(["rpm", *argv], capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 0, f"rpm {' '.join(argv)}: {proc.stderr}"
    return proc.stdout


def expected_files() -> dict[str, int]:
    """Path → mode of everything the package must hold, derived from the source tree."""
    dirs = ["/etc/luksvm", "/etc/luksvm/crypttab.d", "/usr/lib/luksvm", "/usr/lib/luksvm/luksvm"]
    dirs += ["/usr/share/doc/luksvm", "/usr/share/licenses/luksvm", "/var/lib/luksvm"]
    dirs += ["/usr/share/luksvm", "/usr/share/luksvm/prometheus"]
    files = [
        "/etc/luksvm/luksvm.conf",
        "/usr/lib/systemd/system-preset/50-luksvm.preset",
        "/usr/share/bash-completion/completions/luksvm",
        "/usr/share/doc/luksvm/README.md",
        "/usr/share/licenses/luksvm/LICENSE",
        "/usr/share/man/man5/luksvm-crypttab.5.gz",
        "/usr/share/man/man5/luksvm.conf.5.gz",
        "/usr/share/man/man8/luksvm.8.gz",
        "/usr/share/luksvm/prometheus/luksvm.rules.yml",
    ]
    files += [f"/etc/luksvm/crypttab.d/{p.name}" for p in (REPO / "crypttab.d").glob("*.example")]
    files += [f"/usr/lib/luksvm/luksvm/{p.name}" for p in (REPO / "luksvm").glob("*.py")]
    files += ["/usr/lib/luksvm/luksvm/py.typed"]
    files += [f"/usr/lib/systemd/system/{name}" for name in gendocs.unit_files()]
    modes = {d: stat.S_IFDIR | 0o755 for d in dirs} | {f: stat.S_IFREG | 0o644 for f in files}
    modes["/usr/bin/luksvm"] = stat.S_IFREG | 0o755
    modes["/etc/luksvm/keys"] = stat.S_IFDIR | 0o700
    modes["/var/lib/luksvm/header-backups"] = stat.S_IFDIR | 0o700
    return modes


def test_make_rpm_builds_source_and_binary_rpm(built: Built) -> None:
    assert built.rpm.is_file() and built.srpm.is_file()
    assert rpm("-qp", "--qf", "%{ARCH}", str(built.rpm)) == "noarch"
    sources = rpm("-qlp", str(built.srpm)).split()
    assert sorted(sources) == [f"luksvm-{__version__}.tar.gz", "luksvm.spec"]


def test_rpm_holds_exactly_the_expected_files_with_their_modes(built: Built) -> None:
    listed = rpm("-qp", "--qf", "[%{FILENAMES} %{FILEMODES}\n]", str(built.rpm))
    found = {path: int(mode) for path, mode in (line.split() for line in listed.splitlines())}
    expected = expected_files()
    assert sorted(set(found) - set(expected)) == [], "unexpected files in the RPM"
    assert sorted(set(expected) - set(found)) == [], "files missing from the RPM"
    wrong = {p: (oct(found[p]), oct(m)) for p, m in expected.items() if found[p] != m}
    assert wrong == {}, "(found, expected) modes"
    config = rpm("-qp", "--qf", "[%{FILENAMES} %{FILEFLAGS:fflags}\n]", str(built.rpm))
    flags = dict(line.split(" ", 1) for line in config.splitlines())
    assert flags["/etc/luksvm/luksvm.conf"] == "cn"  # %config(noreplace)
    for path in expected:
        if path.startswith("/etc/luksvm/crypttab.d/"):
            assert flags[path] == "cn"


def test_rpm_requires_what_luksvm_runs_with(built: Built) -> None:
    requires = rpm("-qp", "--requires", str(built.rpm)).splitlines()
    for needed in (
        "python3 >= 3.9",
        "python3-libvirt",
        "python3-systemd",
        "python3-keyring",
        "python3-pexpect",
        "cryptsetup",
        "lvm2",
        "systemd",
        "/usr/bin/python3",
    ):
        assert needed in requires
    recommends = rpm("-qp", "--recommends", str(built.rpm)).splitlines()
    assert recommends == ["(libvirt-daemon or libvirt-daemon-driver-qemu)"]


def test_nothing_installed_depends_on_the_build_hosts_python(built: Built) -> None:
    paths = rpm("-qlp", str(built.rpm)).splitlines()
    assert [p for p in paths if re.search(r"python\d|site-packages|dist-packages|\.pyc$", p)] == []
    provides = rpm("-qp", "--requires", "--provides", str(built.rpm))
    assert not re.search(r"python\(abi\)|python3\.\d+dist", provides)
    launcher = rpm("-qp", "--qf", "[%{FILENAMES}\n]", str(built.rpm))
    assert "/usr/bin/luksvm" in launcher.split()


def scriptlets(built: Built) -> dict[str, str]:
    return {
        name: rpm("-qp", "--qf", f"%{{{tag}}}", str(built.rpm)) for name, tag in SCRIPT_TAGS.items()
    }


def test_scriptlets_call_no_luksvm_cryptsetup_or_virsh(built: Built) -> None:
    scripts = rpm("-qp", "--scripts", str(built.rpm))
    command = r"(^|[;&|(`]|\$\(|then|do|else)\s*(\S*/)?"
    for tool in ("luksvm", "cryptsetup", "virsh", "vgchange", "lvchange", "dmsetup", "virt\\S*"):
        assert not re.search(command + tool + r"(\s|$)", scripts, re.M), tool
    assert "@" not in scripts  # never a template unit


def run_scriptlet(text: str, arg: int, tmp_path: Path) -> list[list[str]]:
    """Run a scriptlet with $1 = arg and a `systemctl` that only records its arguments."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    log = tmp_path / "systemctl.log"
    log.write_text("")
    fake = bindir / "systemctl"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    fake.chmod(0o755)
    subprocess.run(
        ["sh", "-c", text, "scriptlet", str(arg)],
        env={"PATH": f"{bindir}:/usr/bin:/bin"},
        check=True,
        timeout=30,
    )
    return [line.split() for line in log.read_text().splitlines()]


def test_scriptlets_preset_timers_and_target_and_never_stop_the_target(
    built: Built, tmp_path: Path
) -> None:
    script = scriptlets(built)
    timers = ["luksvm-header-backup.timer", "luksvm-trim.timer", "luksvm-metrics.timer"]
    # install ($1=1 in %post), upgrade (2 / 1 in %preun, %postun), removal (0).
    assert run_scriptlet(script["post"], 1, tmp_path) == [
        ["--no-reload", "preset", "luksvm.target", *timers]
    ]
    assert run_scriptlet(script["post"], 2, tmp_path) == []
    assert run_scriptlet(script["preun"], 1, tmp_path) == []
    assert run_scriptlet(script["postun"], 1, tmp_path) == [["try-restart", *timers]]
    assert run_scriptlet(script["preun"], 0, tmp_path) == [
        ["--no-reload", "disable", "--now", *timers],
        ["--no-reload", "disable", "luksvm.target"],
    ]
    assert run_scriptlet(script["postun"], 0, tmp_path) == []


@pytest.fixture
def scratch_root(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "root"
    root.mkdir()
    yield root


def install(root: Path, package: Path, mode: str = "-i") -> None:
    # --noscripts: the scriptlets would run systemctl against this machine's systemd.
    rpm(mode, "--root", str(root), "--dbpath", "/rpmdb", "--nodeps", "--noscripts", str(package))


def test_installs_into_a_scratch_root_and_runs_from_its_files(
    built: Built, scratch_root: Path
) -> None:
    # This machine's Python has no luksvm: whatever runs below comes from the scratch root.
    bare = subprocess.run(
        ["/usr/bin/python3", "-I", "-c", "import luksvm"], capture_output=True, check=False
    )
    assert bare.returncode == 1
    install(scratch_root, built.rpm)
    assert rpm("-q", "--root", str(scratch_root), "--dbpath", "/rpmdb", "luksvm").startswith(
        f"luksvm-{__version__}-1"
    )
    launcher = scratch_root / "usr/bin/luksvm"
    shown = subprocess.run(
        [str(launcher), "--version"], capture_output=True, text=True, check=False, timeout=60
    )
    assert (shown.returncode, shown.stdout.strip()) == (0, f"luksvm {__version__}")
    checked = subprocess.run(
        [str(launcher), "--root", str(scratch_root), "config", "check", "--json"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stderr
    assert '"volumes": []' in checked.stdout  # the installed example configures nothing
    # The example, switched on, is a valid configuration, and apply finds the packaged templates.
    crypttab = scratch_root / "etc/luksvm/crypttab.d"
    (crypttab / "10-guests.conf").write_text((crypttab / "00-example.conf.example").read_text())
    applied = subprocess.run(
        [str(launcher), "--root", str(scratch_root), "apply", "--dry-run"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert applied.returncode == 0, applied.stderr
    assert "-> /usr/lib/systemd/system/luksvm-unlock@.service" in applied.stdout
    assert not list(scratch_root.rglob("__pycache__"))  # running wrote no bytecode
    assert (scratch_root / "etc/luksvm/keys").stat().st_mode & 0o777 == 0o700


def test_post_compiles_bytecode_the_launcher_loads_and_erase_removes_it(
    built: Built, scratch_root: Path, tmp_path: Path
) -> None:
    """The package ships sources only; %post compiles them with the installed host's Python, so
    no unit run compiles luksvm again; %preun removes the bytecode on erase, not on upgrade."""
    install(scratch_root, built.rpm)
    private = scratch_root / "usr/lib/luksvm/luksvm"
    assert not (private / "__pycache__").exists()
    script = {k: v.replace("/usr/lib/luksvm", f"{scratch_root}/usr/lib/luksvm")
              for k, v in scriptlets(built).items()}  # fmt: skip
    run_scriptlet(script["post"], 1, tmp_path)
    tag = sys.implementation.cache_tag
    compiled = sorted(p.name for p in (private / "__pycache__").iterdir())
    assert compiled == sorted(f"{p.stem}.{tag}.pyc" for p in private.glob("*.py"))
    # The launcher imports them (python -v names each code object it loads from bytecode).
    shown = subprocess.run(
        ["/usr/bin/python3", "-I", "-v", str(scratch_root / "usr/bin/luksvm"), "--version"],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert f"code object from '{private}/__pycache__/cli.{tag}.pyc'" in shown.stderr
    assert f"matches {private}/cli.py" in shown.stderr
    run_scriptlet(script["preun"], 1, tmp_path)  # an upgrade keeps them
    assert sorted(p.name for p in (private / "__pycache__").iterdir()) == compiled
    run_scriptlet(script["preun"], 0, tmp_path)  # erase
    assert not (private / "__pycache__").exists()
    assert sorted(p.name for p in private.iterdir()) == sorted(
        [p.name for p in (REPO / "luksvm").glob("*.py")] + ["py.typed"]
    )


def test_upgrade_keeps_an_edited_luksvm_conf(
    built: Built, scratch_root: Path, tmp_path: Path
) -> None:
    newer = make_rpm(tmp_path / "dist2", 2)
    install(scratch_root, built.rpm)
    conf = scratch_root / "etc/luksvm/luksvm.conf"
    edited = conf.read_text().replace("#stop_timeout = 120s", "stop_timeout = 5min")
    assert edited != conf.read_text()
    conf.write_text(edited)
    install(scratch_root, newer.rpm, "-U")
    assert rpm("-q", "--root", str(scratch_root), "--dbpath", "/rpmdb", "luksvm").startswith(
        f"luksvm-{__version__}-2"
    )
    assert conf.read_text() == edited
    assert (scratch_root / "usr/bin/luksvm").is_file()


def test_rpmlint_passes_with_only_the_documented_filters(built: Built) -> None:
    proc = subprocess.run(
        [
            "rpmlint",
            "-c",
            str(REPO / "packaging/rpmlint.toml"),
            str(REPO / "packaging/luksvm.spec"),
            str(built.rpm),
            str(built.srpm),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert " 0 errors, 0 warnings" in proc.stdout, proc.stdout


def test_spec_takes_the_pyproject_route_on_fedora() -> None:
    """Where %fedora is set the spec uses the distribution's pyproject macros (not run here:
    this machine has none) and no private directory or launcher."""
    spec = str(REPO / "packaging/luksvm.spec")
    fedora = subprocess.run(
        ["rpmspec", "-P", "--define", "fedora 41", spec],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert "\n%pyproject_wheel\n" in fedora and "%files -f %{pyproject_files}" in fedora
    assert "BuildRequires:  python3-devel" in fedora
    assert "launcher.py" not in fedora and "/usr/lib/luksvm" not in fedora
    here = subprocess.run(
        ["rpmspec", "-P", spec], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert "launcher.py" in here and "pyproject" not in here.split("%prep", 1)[1]


def test_spec_file_list_follows_units_dir() -> None:
    """The unit files are not named in the spec: %install takes whatever units/ holds."""
    spec = (REPO / "packaging/luksvm.spec").read_text()
    files = spec.split("\n%files", 1)[1]
    assert "%{_unitdir}" not in files and "-f systemd.files" in files
