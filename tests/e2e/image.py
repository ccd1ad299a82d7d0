"""The e2e VM image: a Debian root filesystem built with mmdebstrap, cached by content.

One image per Debian release (RELEASES: bookworm = Debian 12, trixie = Debian 13). The cache key
is a hash of everything that shapes the image (release, package list, image size, this file, and
every file under tests/e2e/rootfs/); a change to any of them builds a new image next to the old
one. An image directory holds:

    root.img       ext4 root filesystem (raw, sparse); VMs boot from qcow2 overlays over it
    vmlinuz        kernel and initramfs, taken out of the root filesystem's /boot
    initrd.img
    packages.txt   "name<TAB>version" of every package that went in (dpkg-query in the rootfs)
    build.log      mmdebstrap's output
    manifest.json  key, build time, apt sources used
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from . import settings

RELEASES = ("bookworm", "trixie")  # Debian 12, Debian 13
DEFAULT_RELEASE = "bookworm"
IMAGE_SIZE = "4G"
PRUNE_AFTER_DAYS = 14
HERE = Path(__file__).resolve().parent
ROOTFS_OVERLAY = HERE / "rootfs"

PACKAGES = (
    # the host as systemd sees it
    "systemd",
    "systemd-sysv",
    "udev",
    "dbus",
    "kmod",
    "procps",
    "util-linux",
    "iproute2",
    "linux-image-amd64",
    "initramfs-tools",
    # storage
    "lvm2",
    "cryptsetup",
    "cryptsetup-bin",
    "keyutils",
    "parted",
    "fdisk",
    "e2fsprogs",
    # virtualisation, for nested guests
    "libvirt-daemon-system",
    "libvirt-clients",
    "libvirt-daemon-driver-qemu",
    "qemu-system-x86",
    "qemu-utils",
    "seabios",
    # luksvm's runtime: Python and the Debian packages of its dependencies, pip for the wheel
    "python3",
    "python3-libvirt",
    "python3-systemd",
    "python3-pexpect",
    "python3-keyring",
    "python3-pip",
    # unattended keys: TPM2 (RELEASE_PACKAGES: the libtss2 libraries) and Tang (a server on
    # loopback, clevis to bind and unlock)
    "tang",
    "clevis",
    "clevis-luks",
    "clevis-systemd",
    "curl",
    # many hosts: the Ansible collection runs here (connection local; python3-apt for its
    # package module), node_exporter serves luksvm's metrics over loopback
    "ansible-core",
    "python3-apt",
    "prometheus-node-exporter",
)

# What one release needs beyond PACKAGES. Debian 13 (systemd 257) ships systemd-cryptsetup, the
# binary luksvm's units run, in a package of its own.
# systemd-cryptenroll needs the libtss2 libraries (only Suggests of systemd) for TPM2; Debian 13
# renamed them (t64), and its scenarios (the `stack` ones) use no TPM.
RELEASE_PACKAGES: dict[str, tuple[str, ...]] = {
    "bookworm": ("libtss2-esys-3.0.2-0", "libtss2-rc0", "libtss2-mu0", "libtss2-tcti-device0"),
    "trixie": ("systemd-cryptsetup",),
}


def packages(release: str) -> tuple[str, ...]:
    """Every package that goes into the image of `release`."""
    return PACKAGES + RELEASE_PACKAGES[_known(release)]


def _known(release: str) -> str:
    if release not in RELEASES:
        raise ImageBuildError(
            f"unknown Debian release {release!r} for the e2e image; known: {', '.join(RELEASES)}"
        )
    return release


# Units that make boots slow or noisy, or fight a test runner for the serial console.
MASKED_UNITS = (
    "serial-getty@ttyS0.service",
    "getty@tty1.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "apt-daily.service",
    "apt-daily-upgrade.service",
    "man-db.timer",
    "man-db.service",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
)

# Files from rootfs/ that must be in place before the packages are installed (the initramfs is built
# when the kernel package is installed).
EARLY_FILES = ("etc/initramfs-tools/conf.d/e2e.conf", "usr/share/initramfs-tools/modules.d/e2e")

# Smaller image, faster mke2fs: no documentation or translations in the VM.
DPKG_EXCLUDES = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/info/*", "/usr/share/locale/*")


class ImageBuildError(RuntimeError):
    pass


@dataclass(frozen=True)
class Image:
    dir: Path
    key: str
    release: str = DEFAULT_RELEASE

    @property
    def root(self) -> Path:
        return self.dir / "root.img"

    @property
    def kernel(self) -> Path:
        return self.dir / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.dir / "initrd.img"

    @property
    def packages(self) -> Path:
        return self.dir / "packages.txt"

    def package_versions(self) -> dict[str, str]:
        versions = {}
        for line in self.packages.read_text().splitlines():
            name, _, version = line.partition("\t")
            versions[name] = version
        return versions


def image_key(release: str = DEFAULT_RELEASE) -> str:
    """Hash of everything that shapes the image of `release`; its first 16 hex digits name it."""
    digest = hashlib.sha256()
    digest.update(f"suite={_known(release)}\nsize={IMAGE_SIZE}\n".encode())
    digest.update(("packages=" + " ".join(packages(release)) + "\n").encode())
    digest.update(Path(__file__).read_bytes())
    for path in sorted(ROOTFS_OVERLAY.rglob("*")):
        if path.is_file():
            relative = path.relative_to(ROOTFS_OVERLAY).as_posix()
            mode = "x" if os.access(path, os.X_OK) else "-"
            digest.update(f"\0{relative}\0{mode}\0".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def ensure_image(
    cache: Path | None = None, *, release: str = DEFAULT_RELEASE, log: Path | None = None
) -> tuple[Image, bool]:
    """The image of `release` for the current key, built first if the cache lacks it. Returns
    (image, built).

    Several test sessions on one machine may ask at once: one builds under a lock, the others wait.
    """
    cache = cache or settings.cache_dir()
    images = cache / "images"
    images.mkdir(parents=True, exist_ok=True)
    key = image_key(release)
    image = Image(images / key, key, release)
    built = False
    if not (image.dir / "complete").exists():
        with _locked(images / f"{key}.lock"):
            if not (image.dir / "complete").exists():
                _build(image, log=log)
                built = True
    (image.dir / "last-used").touch()
    _prune(images, keep=key)
    return image, built


def _prune(images: Path, keep: str) -> None:
    """Delete images no session has used for PRUNE_AFTER_DAYS (other branches may use others)."""
    cutoff = time.time() - PRUNE_AFTER_DAYS * 86400
    for directory in images.iterdir():
        if directory.name == keep or not (directory / "complete").exists():
            continue
        stamp = directory / "last-used"
        used = (stamp if stamp.exists() else directory).stat().st_mtime
        if used < cutoff:
            with _locked(images / f"{directory.name}.lock", wait=False) as locked:
                if locked:
                    shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def _locked(path: Path, *, wait: bool = True) -> Iterator[bool]:
    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(image: Image, *, log: Path | None) -> None:
    started = time.monotonic()
    work = image.dir.with_name(f"{image.key}.building")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    rootfs = work / "rootfs"
    build_log = work / "build.log"
    sources = apt_sources(image.release)
    argv = [
        "mmdebstrap",
        "--variant=minbase",
        "--mode=root",
        "--include=" + ",".join(packages(image.release)),
        *[f"--dpkgopt=path-exclude={pattern}" for pattern in DPKG_EXCLUDES],
        "--dpkgopt=path-include=/usr/share/doc/*/copyright",
        "--setup-hook=" + _early_files_hook(),
        image.release,
        str(rootfs),
        *sources,
    ]
    _run(argv, log=build_log, timeout=settings.scaled(1200), what="mmdebstrap")
    customize(rootfs, image.key)
    versions = subprocess.run(
        ["dpkg-query", f"--admindir={rootfs}/var/lib/dpkg", "-W", "-f=${Package}\t${Version}\n"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    (work / "packages.txt").write_text("".join(sorted(versions.splitlines(keepends=True))))
    _copy_boot_files(rootfs, work)
    root_img = work / "root.img"
    _run(
        ["mke2fs", "-q", "-t", "ext4", "-L", "root", "-d", str(rootfs), str(root_img), IMAGE_SIZE],
        log=build_log,
        timeout=settings.scaled(600),
        what="mke2fs",
    )
    shutil.rmtree(rootfs)
    manifest = {
        "key": image.key,
        "suite": image.release,
        "apt_sources": sources,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_seconds": round(time.monotonic() - started, 1),
    }
    (work / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (work / "complete").touch()
    if image.dir.exists():
        shutil.rmtree(image.dir)
    work.rename(image.dir)
    if log is not None:
        shutil.copy(image.dir / "build.log", log)


def _early_files_hook() -> str:
    commands = []
    for relative in EARLY_FILES:
        target = '"$1"/' + shlex.quote(relative)
        source = shlex.quote(str(ROOTFS_OVERLAY / relative))
        commands.append(f'mkdir -p "$(dirname {target})" && cp {source} {target}')
    return " && ".join(commands)


def _run(argv: list[str], *, log: Path, timeout: float, what: str) -> None:
    with open(log, "ab") as out:
        out.write(f"$ {' '.join(argv)}\n".encode())
        out.flush()
        try:
            proc = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise ImageBuildError(
                f"{what} did not finish within {timeout:.0f} s; log: {log}\n" + _tail(log)
            ) from None
    if proc.returncode != 0:
        raise ImageBuildError(
            f"{what} failed with exit code {proc.returncode}; log: {log}\n" + _tail(log)
        )


def _tail(path: Path, lines: int = 30) -> str:
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


def customize(rootfs: Path, key: str) -> None:
    """Make the plain Debian tree a quiet, headless test host that runs the scenario runner."""
    for source in sorted(ROOTFS_OVERLAY.rglob("*")):
        target = rootfs / source.relative_to(ROOTFS_OVERLAY)
        if source.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            target.chmod(0o755 if os.access(source, os.X_OK) else 0o644)
    units = rootfs / "etc/systemd/system"
    for unit in MASKED_UNITS:
        link = units / unit
        if link.exists() or link.is_symlink():
            link.unlink()
        link.symlink_to("/dev/null")
    for wanted_by, unit in (
        ("multi-user.target", "e2e-runner.service"),
        ("sysinit.target", "e2e-heartbeat.service"),
    ):
        wants = units / f"{wanted_by}.wants"
        wants.mkdir(parents=True, exist_ok=True)
        link = wants / unit
        if not link.is_symlink():
            link.symlink_to(f"/etc/systemd/system/{unit}")
    # A fixed machine id: no "first boot" (systemd-firstboot would prompt on the console), and every
    # boot of every VM from this image writes its journal to the same /var/log/journal/<id>.
    (rootfs / "etc/machine-id").write_text(hashlib.sha256(key.encode()).hexdigest()[:32] + "\n")
    (rootfs / "var/log/journal").mkdir(parents=True, exist_ok=True)
    # Nested guests need no network; libvirt's default network would start dnsmasq and iptables.
    for network in rootfs.glob("etc/libvirt/qemu/networks/autostart/*.xml"):
        network.unlink()
    resolv = rootfs / "etc/resolv.conf"
    if resolv.is_symlink() or resolv.exists():
        resolv.unlink()
    resolv.write_text("")


def _copy_boot_files(rootfs: Path, work: Path) -> None:
    kernels = sorted((rootfs / "boot").glob("vmlinuz-*"))
    initrds = sorted((rootfs / "boot").glob("initrd.img-*"))
    if len(kernels) != 1 or len(initrds) != 1:
        raise ImageBuildError(
            f"expected one kernel and one initrd in {rootfs}/boot: {kernels} {initrds}"
        )
    shutil.copyfile(kernels[0], work / "vmlinuz")
    shutil.copyfile(initrds[0], work / "initrd.img")


def apt_sources(suite: str) -> list[str]:
    """One-line apt sources for SUITE, SUITE-updates, SUITE-security from this machine's apt config.

    The mirror is never written into the project: it is whatever this machine uses (or
    LUKSVM_E2E_MIRROR). A release this machine does not list itself (a Debian 12 machine building
    the Debian 13 image) comes from the same mirrors: the suite names of its entries are swapped.
    """
    override = settings.mirror_override()
    if override:
        return [f"deb {override} {suite} main"]
    entries: list[tuple[str, str, str, str]] = []  # (options, uri, suite, components)
    etc = Path("/etc/apt")
    one_line_files = [etc / "sources.list", *sorted((etc / "sources.list.d").glob("*.list"))]
    for path in one_line_files:
        if path.is_file():
            entries += _parse_one_line(path.read_text())
    for path in sorted((etc / "sources.list.d").glob("*.sources")):
        entries += _parse_deb822(path.read_text())
    entries = [e for e in entries if "main" in e[3].split()]
    if not any(entry_suite == suite for _, _, entry_suite, _ in entries):
        entries = [(o, uri, _swap_release(s, suite), c) for o, uri, s, c in entries]
    wanted = {suite, f"{suite}-updates", f"{suite}-security"}
    lines = []
    for options, uri, entry_suite, _ in entries:
        if entry_suite in wanted:
            prefix = f"deb [{options}] " if options else "deb "
            line = f"{prefix}{uri} {entry_suite} main"
            if line not in lines:
                lines.append(line)
    if not any(f" {suite} main" in line for line in lines):
        raise ImageBuildError(
            f"no apt source for Debian {suite} main in /etc/apt/sources.list(.d); "
            "set LUKSVM_E2E_MIRROR to a Debian mirror URI"
        )
    return lines


def _swap_release(entry_suite: str, release: str) -> str:
    """bookworm-security → trixie-security for release trixie; other suites stay as they are."""
    base, dash, pocket = entry_suite.partition("-")
    if base in RELEASES and pocket in ("", "updates", "security"):
        return release + dash + pocket
    return entry_suite


def _parse_one_line(text: str) -> list[tuple[str, str, str, str]]:
    entries = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line.startswith("deb "):
            continue
        line = line[4:].strip()
        options = ""
        if line.startswith("["):
            options, _, line = line[1:].partition("]")
        fields = line.split()
        if len(fields) >= 3:
            entries.append((_signed_by_only(options), fields[0], fields[1], " ".join(fields[2:])))
    return entries


def _parse_deb822(text: str) -> list[tuple[str, str, str, str]]:
    entries = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for raw in stanza.splitlines():
            if raw.startswith("#") or ":" not in raw or raw[:1].isspace():
                continue
            name, _, value = raw.partition(":")
            fields[name.strip().lower()] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() == "no":
            continue
        signed_by = fields.get("signed-by", "")
        options = f"signed-by={signed_by}" if signed_by.startswith("/") else ""
        for uri in fields.get("uris", "").split():
            for suite in fields.get("suites", "").split():
                entries.append((options, uri, suite, fields.get("components", "")))
    return entries


def _signed_by_only(options: str) -> str:
    kept = [option for option in options.split() if option.startswith("signed-by=")]
    return " ".join(kept)
