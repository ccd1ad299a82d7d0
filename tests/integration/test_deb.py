"""The Debian package: `make deb` builds it with debhelper and pybuild from the working tree; it
holds exactly the expected files with their modes where Debian's python3 finds the package; its
maintainer scripts enable the timers and the target by preset and never start, stop (but the
timers on removal) or restart a luksvm unit; real dpkg installs, upgrades, removes and purges it
in a scratch root, with real deb-systemd-helper and `systemctl --root`; lintian passes with only
the overrides of packaging/debian/luksvm.lintian-overrides, each with its reason."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from luksvm import __version__
from tools import gendocs

REPO = Path(__file__).resolve().parents[2]
DEBIAN = REPO / "packaging/debian"
TARGET = "luksvm.target"
TIMERS = sorted(p.name for p in (REPO / "units").glob("*.timer"))
# The commands that change a unit's state (systemctl and deb-systemd-invoke take the same verbs).
STATE_VERBS = (
    r"start|stop|restart|try-restart|reload|reload-or-restart|try-reload-or-restart|isolate|kill"
)
# Debian's own tools only: a pyenv or virtualenv python3 first on PATH must not be what runs.
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def systemd_dir(variable: str) -> str:
    """Where this release keeps unit or preset files (what debian/rules asks pkg-config)."""
    proc = subprocess.run(
        ["pkg-config", f"--variable={variable}", "systemd"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return proc.stdout.strip()


UNITDIR = systemd_dir("systemdsystemunitdir")
PRESETDIR = systemd_dir("systemdsystempresetdir")


@dataclass(frozen=True)
class Built:
    deb: Path
    changes: Path
    buildinfo: Path
    version: str


def make_deb(distdir: Path, release: int) -> Built:
    proc = subprocess.run(
        ["make", "--no-print-directory", "deb", f"DISTDIR={distdir}", f"RELEASE={release}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    version = f"{__version__}-{release}"
    return Built(
        distdir / f"luksvm_{version}_all.deb",
        distdir / f"luksvm_{version}_amd64.changes",
        distdir / f"luksvm_{version}_amd64.buildinfo",
        version,
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return make_deb(tmp_path_factory.mktemp("dist"), 1)


@pytest.fixture(scope="module")
def newer(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return make_deb(tmp_path_factory.mktemp("dist2"), 2)


def dpkg_deb(*argv: str) -> str:
    proc = subprocess.run(
        ["dpkg-deb", *argv], capture_output=True, text=True, check=False, timeout=120
    )
    assert proc.returncode == 0, f"dpkg-deb {' '.join(argv)}: {proc.stderr}"
    return proc.stdout


def field(built: Built, name: str) -> str:
    return dpkg_deb("-f", str(built.deb), name).strip()


def control_file(built: Built, name: str) -> str | None:
    proc = subprocess.run(
        ["dpkg-deb", "--info", str(built.deb), name],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    return proc.stdout if proc.returncode == 0 else None


def expected_files() -> dict[str, int]:
    """Path → mode of everything the package must hold, derived from the source tree."""
    site = "/usr/lib/python3/dist-packages"
    dirs = ["/etc/luksvm", "/etc/luksvm/crypttab.d", f"{site}/luksvm"]
    dirs += [f"{site}/luksvm-{__version__}.dist-info", "/usr/share/doc/luksvm", "/var/lib/luksvm"]
    files = [
        "/etc/luksvm/luksvm.conf",
        f"{PRESETDIR}/50-luksvm.preset",
        "/usr/share/bash-completion/completions/luksvm",
        "/usr/share/doc/luksvm/README.md.gz",
        "/usr/share/doc/luksvm/changelog.Debian.gz",
        "/usr/share/doc/luksvm/copyright",
        "/usr/share/lintian/overrides/luksvm",
        "/usr/share/man/man5/luksvm-crypttab.5.gz",
        "/usr/share/man/man5/luksvm.conf.5.gz",
        "/usr/share/man/man8/luksvm.8.gz",
    ]
    files += [f"/etc/luksvm/crypttab.d/{p.name}" for p in (REPO / "crypttab.d").glob("*.example")]
    files += [f"{site}/luksvm/{p.name}" for p in (REPO / "luksvm").glob("*.py")]
    files += [f"{site}/luksvm/py.typed"]
    info = f"{site}/luksvm-{__version__}.dist-info"
    files += [f"{info}/{n}" for n in ("METADATA", "RECORD", "WHEEL", "entry_points.txt")]
    files += [f"{info}/top_level.txt"]
    files += [f"{UNITDIR}/{name}" for name in gendocs.unit_files()]
    if (REPO / "packaging/prometheus/luksvm.rules.yml").is_file():
        dirs += ["/usr/share/luksvm", "/usr/share/luksvm/prometheus"]
        files += ["/usr/share/luksvm/prometheus/luksvm.rules.yml"]
    modes = {d: stat.S_IFDIR | 0o755 for d in dirs} | {f: stat.S_IFREG | 0o644 for f in files}
    modes["/usr/bin/luksvm"] = stat.S_IFREG | 0o755
    modes["/etc/luksvm/keys"] = stat.S_IFDIR | 0o700
    modes["/var/lib/luksvm/header-backups"] = stat.S_IFDIR | 0o700
    return modes


def parent_dirs(paths: list[str]) -> set[str]:
    return {str(parent) for p in paths for parent in Path(p).parents if str(parent) != "/"}


def listing(built: Built) -> dict[str, int]:
    """Path → mode from `dpkg-deb -c`, owner root:root checked on the way."""
    found = {}
    for line in dpkg_deb("-c", str(built.deb)).splitlines():
        perms, owner, _size, _date, _time, name = line.split(None, 5)
        assert owner == "root/root", line
        path = "/" + name.split(" -> ")[0].removeprefix("./").rstrip("/")
        kind = {"d": stat.S_IFDIR, "-": stat.S_IFREG, "l": stat.S_IFLNK}[perms[0]]
        mode = 0
        for i, bit in enumerate(perms[1:]):
            if bit != "-":
                mode |= 1 << (8 - i)
        if path != "/":
            found[path] = kind | mode
    return found


def test_make_deb_builds_an_arch_all_package_with_debians_own_tools(built: Built) -> None:
    assert built.deb.is_file() and built.changes.is_file()
    assert (field(built, "Package"), field(built, "Version")) == ("luksvm", f"{__version__}-1")
    assert field(built, "Architecture") == "all"
    # Built by dh with pybuild and Debian's setuptools (pyproject.toml pins setuptools < 85 and
    # uses the `license = {text = …}` form that Debian 12's setuptools 66 reads).
    buildinfo = built.buildinfo.read_text()
    for package in ("debhelper", "dh-python", "pybuild-plugin-pyproject", "python3-setuptools"):
        assert re.search(rf"^ {package} \(= ", buildinfo, re.M), package


def test_deb_holds_exactly_the_expected_files_with_their_modes(built: Built) -> None:
    found = listing(built)
    expected = expected_files()
    expected |= {d: stat.S_IFDIR | 0o755 for d in parent_dirs(list(expected)) - set(expected)}
    assert sorted(set(found) - set(expected)) == [], "unexpected files in the .deb"
    assert sorted(set(expected) - set(found)) == [], "files missing from the .deb"
    wrong = {p: (oct(found[p]), oct(m)) for p, m in expected.items() if found[p] != m}
    assert wrong == {}, "(found, expected) modes"
    conffiles = sorted((control_file(built, "conffiles") or "").split())
    examples = [p for p in expected if p.startswith("/etc/luksvm/crypttab.d/")]
    assert conffiles == sorted(["/etc/luksvm/luksvm.conf", *examples])


def test_deb_depends_on_what_luksvm_runs_with(built: Built) -> None:
    depends = [d.strip() for d in field(built, "Depends").split(",")]
    for needed in (
        "python3:any (>= 3.9~)",
        "python3-libvirt",
        "python3-systemd",
        "python3-keyring",
        "python3-pexpect",
        "cryptsetup-bin",
        "lvm2",
        # Debian 13 moved systemd-cryptsetup (token support) out of systemd 256.
        "systemd-cryptsetup | systemd (<< 256~)",
    ):
        assert needed in depends
    suggests = field(built, "Suggests")
    assert "clevis-systemd" in suggests and "libtss2-esys-3.0.2-0" in suggests


def test_package_is_where_debians_python_finds_it(built: Built) -> None:
    paths = list(listing(built))
    assert [
        p for p in paths if re.search(r"python3\.\d+|site-packages|\.pyc$|__pycache__", p)
    ] == []
    # Debian's python3 has /usr/lib/python3/dist-packages on its path, whatever its version.
    syspath = subprocess.run(
        ["/usr/bin/python3", "-I", "-c", "import sys; print('\\n'.join(sys.path))"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.split()
    assert "/usr/lib/python3/dist-packages" in syspath
    assert "/usr/lib/python3/dist-packages/luksvm/cli.py" in paths
    # the wheel's copy of the unit files is not shipped: they are in UNITDIR
    assert not [p for p in paths if "/unitfiles" in p]


def maintainer_scripts(built: Built) -> dict[str, str]:
    scripts = {}
    for name in ("preinst", "postinst", "prerm", "postrm"):
        text = control_file(built, name)
        if text is not None:
            scripts[name] = text
    return scripts


def test_maintainer_scripts_never_start_stop_or_restart_a_luksvm_unit(built: Built) -> None:
    scripts = maintainer_scripts(built)
    assert sorted(scripts) == ["postinst", "postrm", "prerm"]  # no preinst: nothing stops
    text = "\n".join(
        line
        for script in scripts.values()
        for line in script.splitlines()
        if not re.match(r"\s*#", line)
    )
    command = r"(^|[;&|(`]|\$\(|then|do|else)\s*(\S*/)?"
    for tool in ("luksvm", "cryptsetup", "virsh", "vgchange", "lvchange", "dmsetup", "virt\\S*"):
        assert not re.search(command + tool + r"(\s|$)", text, re.M), tool
    assert "@" not in text  # never a template unit
    changes = re.findall(
        rf"(?:systemctl|deb-systemd-invoke)\s+(?:--\S+\s+)*({STATE_VERBS})\b(.*)", text
    )
    # The one state change: removal stops the timers (as the RPM does); not luksvm.target.
    assert changes == [("stop", " " + " ".join(TIMERS) + " >/dev/null || true")]
    assert re.search(r"\[ \"\$1\" = remove \]", scripts["prerm"])


def run_script(text: str, argv: list[str], tmp_path: Path) -> list[list[str]]:
    """Run a maintainer script with recording stand-ins for the systemd and Python helpers, as if
    systemd ran this machine (/run/systemd/system is pointed at a scratch directory)."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    log = tmp_path / "calls.log"
    log.write_text("")
    for tool in ("systemctl", "deb-systemd-helper", "deb-systemd-invoke", "py3compile", "py3clean"):
        fake = bindir / tool
        fake.write_text(f'#!/bin/sh\necho "{tool} $*" >> {log}\n')
        fake.chmod(0o755)
    running = tmp_path / "run-systemd-system"
    running.mkdir(exist_ok=True)
    script = tmp_path / "script"
    script.write_text(text.replace("/run/systemd/system", str(running)))
    subprocess.run(
        ["sh", str(script), *argv],
        env={"PATH": f"{bindir}:{SYSTEM_PATH}", "DPKG_MAINTSCRIPT_PACKAGE": "luksvm"},
        check=True,
        timeout=30,
    )
    return [line.split() for line in log.read_text().splitlines() if not line.startswith("py3")]


def test_maintainer_scripts_enable_by_preset_and_disable_on_removal(
    built: Built, tmp_path: Path
) -> None:
    scripts = maintainer_scripts(built)
    units = sorted([TARGET, *TIMERS])
    enable = []
    for unit in units:
        enable += [
            ["deb-systemd-helper", "unmask", unit],
            ["deb-systemd-helper", "--quiet", "was-enabled", unit],
            ["deb-systemd-helper", "enable", unit],  # systemctl preset when first installed
        ]
    # first installation: enabled by preset, nothing started, no reload needed
    assert run_script(scripts["postinst"], ["configure", ""], tmp_path) == enable
    # upgrade: prerm and postrm of the old package's kind do nothing; postinst reloads systemd
    # (running instances stop with the new definitions) and starts or restarts nothing.
    assert run_script(scripts["prerm"], ["upgrade", "0.1.0-2"], tmp_path) == []
    assert run_script(scripts["postrm"], ["upgrade", "0.1.0-2"], tmp_path) == []
    assert run_script(scripts["postinst"], ["configure", "0.1.0-1"], tmp_path) == [
        ["systemctl", "--system", "daemon-reload"],
        *enable,
    ]
    # removal: the timers stop; the target and the timers lose their enablement, the target
    # keeps running (stopping it would stop the guests and lock the volumes).
    assert run_script(scripts["prerm"], ["remove"], tmp_path) == [
        ["deb-systemd-invoke", "stop", *TIMERS],
        ["deb-systemd-helper", "purge", TARGET, *TIMERS],
    ]
    assert run_script(scripts["postrm"], ["remove"], tmp_path) == [
        ["systemctl", "--system", "daemon-reload"]
    ]
    assert run_script(scripts["postrm"], ["purge"], tmp_path) == [
        ["deb-systemd-helper", "purge", *units]
    ]


def test_unit_lists_follow_units_dir() -> None:
    """debian/rules takes the timers from units/; the prerm names them: both match units/."""
    prerm = (DEBIAN / "luksvm.prerm").read_text()
    for line in prerm.splitlines():
        if "deb-systemd-invoke stop" in line:
            assert line.split("stop", 1)[1].split(">")[0].split() == TIMERS
        if "deb-systemd-helper purge" in line:
            assert line.split("purge", 1)[1].split(">")[0].split() == [TARGET, *TIMERS]
    assert "$(wildcard units/*.timer)" in (DEBIAN / "rules").read_text()


# --- real dpkg into a scratch root ---------------------------------------------------------------


@pytest.fixture
def scratch_root(tmp_path: Path) -> Iterator[Path]:
    """An empty dpkg root whose default preset disables every unit (as on Fedora): what enables
    luksvm's units there is its own preset file."""
    root = tmp_path / "root"
    (root / "var/lib/dpkg/updates").mkdir(parents=True)
    (root / "var/lib/dpkg/info").mkdir()
    (root / "var/lib/dpkg/status").write_text("")
    # systemd is installed there (luksvm depends on it): deb-systemd-helper then enables through
    # `systemctl --root=ROOT preset` (this machine's systemctl) instead of making links itself.
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/systemctl").symlink_to(
        shutil.which("systemctl", path=SYSTEM_PATH) or "/bin/systemctl"
    )
    presets = root / "etc/systemd/system-preset"
    presets.mkdir(parents=True)
    (presets / "99-default.preset").write_text("disable *\n")
    yield root


def dpkg(root: Path, tmp_path: Path, *argv: str) -> None:
    """Real dpkg on ROOT; the maintainer scripts run outside it with DPKG_ROOT set, as
    deb-systemd-helper supports (it runs `systemctl --root=ROOT preset`). py3compile and py3clean
    do not support DPKG_ROOT: stand-ins that only record (the VM tier runs the real ones)."""
    bindir = tmp_path / "py3bin"
    bindir.mkdir(exist_ok=True)
    for tool in ("py3compile", "py3clean"):
        (bindir / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> {tmp_path}/py3.log\n')
        (bindir / tool).chmod(0o755)
    proc = subprocess.run(
        ["dpkg", f"--root={root}", "--force-script-chrootless", "--force-depends", *argv],
        env={"PATH": f"{bindir}:{SYSTEM_PATH}", "LC_ALL": "C"},
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert proc.returncode == 0, f"dpkg {' '.join(argv)}: {proc.stdout}{proc.stderr}"


def installed_version(root: Path) -> str:
    proc = subprocess.run(
        [
            "dpkg-query",
            f"--admindir={root}/var/lib/dpkg",
            "-W",
            "-f=${Status} ${Version}",
            "luksvm",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    return proc.stdout.strip()


def enabled_links(root: Path) -> list[str]:
    etc = root / "etc/systemd/system"
    return sorted(str(p.relative_to(etc)) for p in etc.rglob("*") if p.is_symlink())


def luksvm(root: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    """The installed /usr/bin/luksvm with Debian's python3, finding the package in ROOT's
    dist-packages (as /usr/lib/python3/dist-packages is found on a real host)."""
    return subprocess.run(
        ["/usr/bin/python3", str(root / "usr/bin/luksvm"), *argv],
        env={
            "PATH": SYSTEM_PATH,
            "PYTHONPATH": str(root / "usr/lib/python3/dist-packages"),
            "PYTHONDONTWRITEBYTECODE": "1",
        },
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


ALL_LINKS = [f"multi-user.target.wants/{TARGET}", *(f"timers.target.wants/{t}" for t in TIMERS)]


def test_installs_into_a_scratch_root_and_runs_from_its_files(
    built: Built, scratch_root: Path, tmp_path: Path
) -> None:
    bare = subprocess.run(
        ["/usr/bin/python3", "-I", "-c", "import luksvm"], capture_output=True, check=False
    )
    assert bare.returncode == 1  # this machine's Python has no luksvm: what runs is ROOT's
    dpkg(scratch_root, tmp_path, "-i", str(built.deb))
    assert installed_version(scratch_root) == f"install ok installed {built.version}"
    assert enabled_links(scratch_root) == ALL_LINKS  # by luksvm's preset over `disable *`
    assert (tmp_path / "py3.log").read_text().split("\n")[0].startswith("py3compile -p luksvm")
    shebang = (scratch_root / "usr/bin/luksvm").read_text().split("\n", 1)[0]
    assert shebang == "#!/usr/bin/python3"
    shown = luksvm(scratch_root, "--version")
    assert (shown.returncode, shown.stdout.strip()) == (0, f"luksvm {__version__}"), shown.stderr
    checked = luksvm(scratch_root, "--root", str(scratch_root), "config", "check", "--json")
    assert checked.returncode == 0, checked.stderr
    assert '"volumes": []' in checked.stdout  # the installed luksvm.conf sets nothing
    conf = (scratch_root / "etc/luksvm/luksvm.conf").read_text()
    assert [line for line in conf.splitlines() if line and line[0] not in "#["] == []
    crypttab = scratch_root / "etc/luksvm/crypttab.d"
    (crypttab / "10-guests.conf").write_text((crypttab / "00-example.conf.example").read_text())
    applied = luksvm(scratch_root, "--root", str(scratch_root), "apply", "--dry-run")
    assert applied.returncode == 0, applied.stderr
    assert f"-> {UNITDIR}/luksvm-unlock@.service" in applied.stdout  # the packaged templates
    assert (scratch_root / "etc/luksvm/keys").stat().st_mode & 0o777 == 0o700


def test_admin_preset_decides_over_the_packages(
    built: Built, scratch_root: Path, tmp_path: Path
) -> None:
    (scratch_root / "etc/systemd/system-preset/10-admin.preset").write_text(
        "disable luksvm-trim.timer\n"
    )
    dpkg(scratch_root, tmp_path, "-i", str(built.deb))
    assert enabled_links(scratch_root) == [
        link for link in ALL_LINKS if not link.endswith("luksvm-trim.timer")
    ]


def test_upgrade_keeps_config_and_enablement_removal_disables_purge_clears(
    built: Built, newer: Built, scratch_root: Path, tmp_path: Path
) -> None:
    dpkg(scratch_root, tmp_path, "-i", str(built.deb))
    conf = scratch_root / "etc/luksvm/luksvm.conf"
    edited = conf.read_text().replace("#stop_timeout = 120s", "stop_timeout = 5min")
    assert edited != conf.read_text()
    conf.write_text(edited)
    # an admin disables one timer; the upgrade keeps that
    os.unlink(scratch_root / "etc/systemd/system/timers.target.wants/luksvm-metrics.timer")
    dpkg(scratch_root, tmp_path, "-i", str(newer.deb))
    assert installed_version(scratch_root) == f"install ok installed {newer.version}"
    assert conf.read_text() == edited
    assert enabled_links(scratch_root) == [
        link for link in ALL_LINKS if not link.endswith("luksvm-metrics.timer")
    ]
    dpkg(scratch_root, tmp_path, "-r", "luksvm")
    assert installed_version(scratch_root).startswith("deinstall ok config-files")
    assert enabled_links(scratch_root) == []
    assert conf.read_text() == edited  # removal keeps conffiles
    assert not (scratch_root / "usr/bin/luksvm").exists()
    # installed again after a removal: presets apply as on a first installation
    dpkg(scratch_root, tmp_path, "-i", str(newer.deb))
    assert enabled_links(scratch_root) == ALL_LINKS
    dpkg(scratch_root, tmp_path, "--purge", "luksvm")
    assert installed_version(scratch_root) == ""
    assert enabled_links(scratch_root) == []
    assert not conf.exists()
    assert not list((scratch_root / "var/lib/systemd").rglob("*luksvm*"))


def test_lintian_passes_with_only_the_documented_overrides(built: Built) -> None:
    options = ["-I", "-E", "--pedantic", "--tag-display-limit", "0"]
    proc = subprocess.run(
        ["lintian", *options, str(built.deb), str(built.changes)],
        env={"PATH": SYSTEM_PATH, "LC_ALL": "C.UTF-8"},
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == ""  # no tag, not even an unused override
    # Each override comes with its reason: a comment right above it.
    lines = (DEBIAN / "luksvm.lintian-overrides").read_text().splitlines()
    for i, line in enumerate(lines):
        if line and not line.startswith("#"):
            assert i > 0 and (lines[i - 1].startswith("#") or lines[i - 1].startswith("luksvm:"))
