"""Boot test VMs under QEMU (software emulation) and run scenario scripts inside them.

A Machine is a set of disk files: a root disk (a qcow2 overlay over the cached image, or over a
seed's root disk) and named data disks the guest sees as /dev/disk/by-id/virtio-NAME. Every boot:

1. the host writes a small ext4 disk (serial "e2e") with the scenario script, the helpers
   (scenarios/lib.sh), the boot number and any files the test passes in;
2. QEMU boots the machine under a hard timeout; the runner unit in the image (rootfs/) runs the
   script, writes rc, output and the journal of every boot so far to that disk, and powers off;
3. the host reads the disk back with debugfs (no mount) into boot-N/ of the machine's directory.

Disks keep their state from one boot to the next, so a scenario can span several boots. A boot that
fails, hangs or panics raises BootFailed with the last lines of the serial console.
"""

from __future__ import annotations

import contextlib
import functools
import json
import operator
import os
import re
import resource
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from . import settings
from .image import Image
from .journal import Entry, Journal

HERE = Path(__file__).resolve().parent
SCENARIOS = HERE / "scenarios"
QEMU = "qemu-system-x86_64"
CONSOLE_TAIL = 40
JOURNAL_TAIL = 30
E2E_DISK_SIZE = "256M"
DEFAULT_TIMEOUT = 480.0  # generous: other VMs may share the 2 cores (seen: 5 at once)
KERNEL_ARGS = "root=/dev/disk/by-id/virtio-root rw console=ttyS0 quiet panic=1 mitigations=off"
# x86-64-v2 plus AES-NI, not `max`: under TCG, `max` (every feature TCG emulates) made the same
# boot and work slower (which feature costs most was not measured). Bare bookworm image, 2 cores:
# runner start 17.0-18.0 s vs 20.5-21.0 s, 5 × `python3 -c pass` 1.1 s vs 1.2-1.3 s, sha256 of
# 64 MiB 1.0 s vs 1.5-2.5 s; AES-NI kept for dm-crypt (aes-xts 57 MiB/s; qemu64 without it: 9).
CPU_MODEL = "qemu64,+ssse3,+sse4.1,+sse4.2,+popcnt,+aes,+pclmulqdq"

# Console text that means the boot cannot reach the scenario: stop at once instead of waiting for
# the timeout.
PANIC_CONSOLE = "Kernel panic - not syncing"
FATAL_CONSOLE = (
    PANIC_CONSOLE,
    "You are in emergency mode",
    "Cannot open access to console, the root account is locked",
    "Give root password for maintenance",
)

# A vCPU stuck this long is not a slow host: seen once in a seed boot (QEMU 7.2 TCG, -smp 2), the
# kernel reported a soft lockup of the nested QEMU on CPU#0 and a missed timer on CPU#1 for 13 min
# until the timeout. Short lockup reports do happen on a busy host and pass.
HUNG_CONSOLE = re.compile(r"watchdog: BUG: soft lockup - CPU#\d+ stuck for (\d+)s")
HUNG_SECONDS = 120

# The guest's heartbeat (e2e-heartbeat.service, rootfs/) writes a line to the second serial port
# every 5 s of its time from early boot on. A VM whose heartbeat stops this long has frozen as a
# whole, which no scenario can cause short of a kernel bug: seen once under TCG (doctor[bookworm]
# boot 2, CI of 1036cf4): an empty console, the journal on the disk ending 9.2 s into the boot
# although journald syncs every second, nothing more until the timeout 600 s later. A boot that
# only waits (a prompt, a start job) keeps its heartbeat and runs into the timeout as before.
# The heartbeat's last line (HEARTBEAT_END, when systemd-shutdown ends it) turns the watch off:
# a shutdown that hangs after it is the scenario's failure ("did not power off"), not a freeze.
HEARTBEAT_LOG = "heartbeat.log"
HEARTBEAT_END = "E2E-ALIVE-END"
FROZEN_SECONDS = 120.0
FROZEN_PROBLEM = "the VM froze"

_SERIAL = re.compile(r"^[A-Za-z0-9_-]{1,20}$")  # virtio-blk serials: at most 20 bytes
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

Script = Union[str, Path]
FileData = Union[Path, str, bytes]


def scenario(name: str) -> Path:
    """A scenario script under tests/e2e/scenarios/."""
    path = SCENARIOS / name
    if not path.is_file():
        raise FileNotFoundError(f"no scenario script {path}")
    return path


class BootFailed(AssertionError):
    """A boot did not end with the expected scenario result; `.result` has everything collected."""

    def __init__(self, message: str, result: BootResult):
        super().__init__(message)
        self.result = result


@dataclass(frozen=True)
class Disk:
    name: str  # QEMU serial: the guest sees /dev/disk/by-id/virtio-NAME
    path: Path
    format: str  # "raw" or "qcow2"


@dataclass(frozen=True)
class Step:
    name: str
    rc: int
    ms: int


@dataclass
class BootResult:
    machine: str
    index: int
    dir: Path  # console.log, qemu.log, output.log, rc, journal.json, files/
    script: str
    rc: int | None
    boot_id: str | None
    seconds: float  # wall time of the whole QEMU run
    problem: str | None  # why the boot counts as failed; None when it ran and returned 0
    timings: dict[str, float] = field(default_factory=dict)  # runner_start, scenario_end (host s)

    @property
    def hung(self) -> bool:
        """Stopped because a vCPU hung (HUNG_CONSOLE): the emulator's fault, not the scenario's."""
        return bool(self.problem and HUNG_CONSOLE.search(self.problem))

    @property
    def panicked(self) -> bool:
        """Stopped at a kernel panic. Seen once under TCG in a boot that passed on every other
        run (doctor[trixie] boot 2); one that luksvm causes panics again in the second boot."""
        return bool(self.problem and PANIC_CONSOLE in self.problem)

    @property
    def frozen(self) -> bool:
        """Stopped because the guest's heartbeat stopped (FROZEN_SECONDS): QEMU or the guest kernel
        froze as a whole."""
        return bool(self.problem and self.problem.startswith(FROZEN_PROBLEM))

    @property
    def broke(self) -> str:
        """How QEMU or the kernel, not the scenario, gave up: hung, panicked, frozen, or ""."""
        return next((how for how in ("hung", "panicked", "frozen") if getattr(self, how)), "")

    @property
    def boot_again(self) -> bool:
        """Worth one more boot from the same disks: QEMU or the kernel gave up, not the scenario."""
        return bool(self.broke)

    @property
    def system_state(self) -> str:
        """`systemctl is-system-running` as the scenario started: running, degraded, starting..."""
        path = self.dir / "system-state"
        return path.read_text().strip() if path.exists() else ""

    @property
    def console(self) -> str:
        return clean_console((self.dir / "console.log").read_bytes())

    @property
    def output(self) -> str:
        """What the scenario printed (stdout and stderr)."""
        path = self.dir / "output.log"
        return path.read_text(errors="replace") if path.exists() else ""

    @property
    def files(self) -> Path:
        """The scenario's results directory ($E2E_RESULTS), as read back from the VM."""
        return self.dir / "files"

    def path(self, name: str) -> Path:
        path = self.files / name
        if not path.exists():
            wrote = sorted(p.name for p in self.files.iterdir()) if self.files.is_dir() else []
            raise AssertionError(f"the scenario did not write {name!r}; it wrote: {wrote}")
        return path

    def text(self, name: str) -> str:
        """A file the scenario wrote, with surrounding whitespace stripped."""
        return self.path(name).read_text(errors="replace").strip()

    def json(self, name: str) -> Any:
        return json.loads(self.path(name).read_text())

    @property
    def steps(self) -> dict[str, Step]:
        """The scenario's `step` records (scenarios/lib.sh), by name."""
        steps = {}
        path = self.files / "steps.tsv"
        if path.exists():
            for line in path.read_text().splitlines():
                name, rc, ms = line.split("\t")
                steps[name] = Step(name, int(rc), int(ms))
        return steps

    @functools.cached_property
    def journal(self) -> Journal:
        """The journal of every boot of this disk so far (exported at the end of this scenario)."""
        return Journal.load(self.dir / "journal.json")

    def entries(self, message: str | None = None, **filters: Any) -> list[Entry]:
        """Journal entries of this boot only."""
        return self.journal.find(message, boot=self.boot_id, **filters)

    def console_tail(self, lines: int = CONSOLE_TAIL) -> str:
        return "\n".join(self.console.splitlines()[-lines:])

    def describe(self) -> str:
        head = (
            f"VM {self.machine!r} boot {self.index}: {self.problem or 'ok'} ({self.seconds:.1f} s)"
        )
        return (
            f"{head}\n"
            f"  script:  {self.script}\n"
            f"  results: {self.dir} (console.log, output.log, journal.json, files/)\n"
            f"--- serial console, last {CONSOLE_TAIL} lines ---\n"
            f"{self.console_tail()}\n"
            f"--- end of console ---"
        )


@dataclass
class Outcome:
    returncode: int | None  # QEMU's exit code; None if killed
    seconds: float
    timed_out: bool = False
    fatal: str | None = None  # console text that stopped the run
    frozen: float | None = None  # seconds without a heartbeat that stopped the run
    marks: dict[str, float] = field(default_factory=dict)  # console marker → seconds after start


def run_bounded(
    argv: Sequence[str],
    *,
    console: Path,
    log: Path,
    timeout: float,
    fatal: Sequence[str] = FATAL_CONSOLE,
    marks: Mapping[str, str] | None = None,
    heartbeat: Path | None = None,
) -> Outcome:
    """Run a VM process (in its own process group) until it exits, the console shows a fatal
    pattern, the `heartbeat` file stops growing for FROZEN_SECONDS (scaled), or `timeout` seconds
    pass; then kill it. Never waits longer than the timeout."""
    marks = dict(marks or {})
    seen: dict[str, float] = {}
    start = time.monotonic()
    frozen_after = settings.scaled(FROZEN_SECONDS)
    beats = 0  # the heartbeat file's size when it last grew
    last_beat = 0.0  # seconds after start; the start counts as a sign of life
    beats_ended = False  # the heartbeat said it ends (the shutdown's last stage)
    cpu_before = _children_cpu()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    offset = 0
    window = ""
    try:
        while True:
            try:
                returncode = proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                returncode = None
            elapsed = time.monotonic() - start
            if console.exists():
                with open(console, "rb") as handle:
                    handle.seek(offset)
                    new = handle.read()
                offset += len(new)
                window = (window + new.decode("utf-8", "replace"))[-8192:]
                for name, text in marks.items():
                    if name not in seen and text in window:
                        seen[name] = round(elapsed, 1)
                for pattern in fatal:
                    if pattern in window and returncode is None:
                        return Outcome(None, elapsed, fatal=pattern, marks=seen)
                hung = _hung(window)
                if hung and returncode is None:
                    return Outcome(None, elapsed, fatal=hung, marks=seen)
            if heartbeat is not None and not beats_ended and heartbeat.exists():
                with open(heartbeat, "rb") as handle:
                    handle.seek(beats)
                    new = handle.read()
                if new:
                    beats, last_beat = beats + len(new), elapsed
                    beats_ended = HEARTBEAT_END.encode() in new
            if returncode is not None:
                return Outcome(returncode, elapsed, marks=seen)
            if heartbeat is not None and not beats_ended and elapsed - last_beat > frozen_after:
                return Outcome(None, elapsed, frozen=round(elapsed - last_beat, 1), marks=seen)
            if elapsed > timeout:
                return Outcome(None, elapsed, timed_out=True, marks=seen)
    finally:
        if proc.poll() is None:
            _stop(proc)
        # CPU seconds the VM used: a measure of its work that is less noisy than wall time on a
        # machine shared with other VMs.
        seen["cpu"] = round(_children_cpu() - cpu_before, 1)


def _hung(console: str) -> str | None:
    """The console's report of a vCPU stuck for HUNG_SECONDS or more, or None."""
    for match in HUNG_CONSOLE.finditer(console):
        if int(match[1]) >= HUNG_SECONDS:
            return match[0]
    return None


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a VM we started: SIGTERM first (QEMU then closes its disk images cleanly, so the
    guest's journal can still be read from them), SIGKILL to the process group if that is slow."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Machine:
    """A test VM: its disks and its boots. Use `Machine.fresh()` or `SeedHost.clone()`."""

    def __init__(
        self,
        name: str,
        image: Image,
        workdir: Path,
        root: Disk,
        disks: Sequence[Disk] = (),
        *,
        memory_mib: int = 2048,
        cpus: int = 2,
        qemu: str = QEMU,
    ):
        self.name = name
        self.image = image
        self.workdir = workdir
        self.root = root
        self.disks = list(disks)
        self.memory_mib = memory_mib
        self.cpus = cpus
        self.qemu = qemu
        self.boots: list[BootResult] = []
        self.frozen = False  # a machine others are cloned from must not change
        self.tpm_state: Path | None = None  # a TPM 2.0 (swtpm) with its state here; see add_tpm

    @classmethod
    def fresh(
        cls,
        image: Image,
        workdir: Path,
        name: str = "vm",
        data_disks: Mapping[str, int] | None = None,
    ) -> Machine:
        """A new machine booting from a copy-on-write overlay over the image; data disks are
        sparse raw files of the given sizes in bytes."""
        workdir.mkdir(parents=True, exist_ok=True)
        root = Disk("root", workdir / "root.qcow2", "qcow2")
        _overlay(image.root, "raw", root.path)
        machine = cls(name, image, workdir, root)
        for disk_name, size in (data_disks or {}).items():
            machine.add_disk(disk_name, size)
        return machine

    def add_disk(self, name: str, size: int) -> Disk:
        """A new sparse raw data disk, seen as /dev/disk/by-id/virtio-NAME from the next boot."""
        if not _SERIAL.match(name) or name in ("root", "e2e"):
            raise ValueError(f"disk name {name!r}: 1-20 of [A-Za-z0-9_-], not root or e2e")
        if any(disk.name == name for disk in self.disks):
            raise ValueError(f"machine {self.name!r} already has a disk {name!r}")
        path = self.workdir / f"{name}.raw"
        with open(path, "wb") as handle:
            handle.truncate(size)
        disk = Disk(name, path, "raw")
        self.disks.append(disk)
        return disk

    def add_tpm(self, *, fresh: bool = False) -> Path:
        """Give the machine a TPM 2.0 from the next boot: swtpm on this host, its state in
        workdir/tpm, kept from boot to boot. fresh=True replaces it with a new TPM (new seeds:
        nothing sealed to the old one unseals)."""
        state = self.workdir / "tpm"
        if fresh:
            shutil.rmtree(state, ignore_errors=True)
        state.mkdir(exist_ok=True)
        self.tpm_state = state
        return state

    def disk(self, name: str) -> Disk:
        for disk in self.disks:
            if disk.name == name:
                return disk
        raise KeyError(f"machine {self.name!r} has no disk {name!r}")

    def clone(self, workdir: Path, name: str | None = None) -> Machine:
        """A machine whose every disk is a qcow2 overlay over this one's: independent, and cheap."""
        if not self.frozen:
            raise RuntimeError(f"freeze() machine {self.name!r} before cloning it")
        workdir.mkdir(parents=True, exist_ok=True)
        root = Disk("root", workdir / "root.qcow2", "qcow2")
        _overlay(self.root.path, self.root.format, root.path)
        disks = []
        for disk in self.disks:
            copy = Disk(disk.name, workdir / f"{disk.name}.qcow2", "qcow2")
            _overlay(disk.path, disk.format, copy.path)
            disks.append(copy)
        return Machine(
            name or f"{self.name}-clone",
            self.image,
            workdir,
            root,
            disks,
            memory_mib=self.memory_mib,
            cpus=self.cpus,
            qemu=self.qemu,
        )

    def freeze(self) -> None:
        """No more boots: clones depend on these disk files staying as they are."""
        self.frozen = True

    def boot(
        self,
        script: Script,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        files: Mapping[str, FileData] | None = None,
        kernel_args: str = "",
        boot_wait: float = 180.0,
        check: bool = True,
        again_if_broken: bool = True,
    ) -> BootResult:
        """Boot once and run `script` (a Path, e.g. scenario("x.sh"), or the text of a bash script).

        `timeout` (seconds, scaled by LUKSVM_E2E_TIMEOUT_FACTOR) bounds the whole QEMU run: boot,
        scenario and poweroff. `files` are put next to the script ($E2E_IN/NAME). The script starts
        when the boot has finished (`systemctl is-system-running --wait`), or after `boot_wait`
        seconds (scaled; 0: at once), whichever comes first; `result.system_state` says which.
        With check=True (the default) anything but a clean run with rc 0 raises BootFailed.
        A boot whose vCPU hung, whose kernel panicked or that froze (BootResult.boot_again) is run
        once more from the disks as they were before it, when they are all qcow2 (clones are).
        """
        # A failing test's traceback shows the test's line and BootFailed's message, not this frame.
        __tracebackhide__ = operator.methodcaller("errisinstance", BootFailed)
        if self.frozen:
            raise RuntimeError(f"machine {self.name!r} is frozen (others are cloned from it)")
        index = len(self.boots) + 1
        bdir = self.workdir / f"boot-{index}"
        if bdir.exists():
            shutil.rmtree(bdir)
        bdir.mkdir(parents=True)
        snapshot = f"before-boot-{index}" if again_if_broken else ""
        if snapshot and all(d.format == "qcow2" for d in (self.root, *self.disks)):
            self._snapshots("-c", snapshot)
        else:
            snapshot = ""
        inputs = {"boot": f"{index}\n", "boot-wait": f"{int(settings.scaled(boot_wait))}\n"}
        e2e_img = self._write_e2e_disk(bdir, inputs, script, files or {})
        console = bdir / "console.log"
        effective = settings.scaled(timeout)
        with _swtpm(self.tpm_state, bdir) as tpm_socket:
            outcome = run_bounded(
                self._qemu_argv(e2e_img, console, kernel_args, tpm_socket),
                console=console,
                log=bdir / "qemu.log",
                timeout=effective,
                marks={"runner_start": "E2E-BEGIN", "scenario_end": "E2E-RC:"},
                heartbeat=bdir / HEARTBEAT_LOG,
            )
        _read_back(e2e_img, bdir)
        e2e_img.unlink()
        rc_file = bdir / "rc"
        rc = int(rc_file.read_text().strip()) if rc_file.exists() else None
        boot_id_file = bdir / "boot_id"
        # as the journal spells it (_BOOT_ID): 32 hex digits, no dashes
        boot_id = (
            boot_id_file.read_text().strip().replace("-", "") if boot_id_file.exists() else None
        )
        result = BootResult(
            machine=self.name,
            index=index,
            dir=bdir,
            script=str(script) if isinstance(script, Path) else "<inline script>",
            rc=rc,
            boot_id=boot_id,
            seconds=round(outcome.seconds, 1),
            problem=_problem(outcome, rc, effective, bdir),
            timings=outcome.marks,
        )
        BOOT_LOG.append(result)
        if snapshot and result.boot_again:
            self._snapshots("-a", snapshot)
            self._snapshots("-d", snapshot)
            how = result.broke
            broken_dir = bdir.with_name(f"{bdir.name}-{how}")
            shutil.rmtree(broken_dir, ignore_errors=True)
            bdir.rename(broken_dir)
            note(
                f"{self.name} boot {index} {how}, booted again", f"{result.problem} ({broken_dir})"
            )
            return self.boot(
                script,
                timeout=timeout,
                files=files,
                kernel_args=kernel_args,
                boot_wait=boot_wait,
                check=check,
                again_if_broken=False,
            )
        if snapshot:
            self._snapshots("-d", snapshot)
        self.boots.append(result)
        if check:
            self.check(result)
        return result

    def _snapshots(self, action: str, name: str) -> None:
        """qemu-img snapshot ACTION (-c create, -a apply, -d delete) NAME on every disk."""
        for disk in (self.root, *self.disks):
            _check_call(["qemu-img", "snapshot", action, name, str(disk.path)])

    def check(self, result: BootResult) -> None:
        """Raise BootFailed for a failed boot of this machine (with its journal's tail when the
        scenario never reported back)."""
        __tracebackhide__ = operator.methodcaller("errisinstance", BootFailed)
        if result.problem:
            message = result.describe()
            if result.rc is None:
                message += "\n" + self._journal_tail(result.boot_id)
            raise BootFailed(message, result)

    def _journal_tail(self, boot_id: str | None, entries: int = JOURNAL_TAIL) -> str:
        """The end of a boot's journal read from the disk, for the failure message of a boot that
        never reported back (the console shows only part of what happened)."""
        try:
            journal = self.read_journal()
        except Exception as error:  # the message is the point here, not this detail
            return f"(journal not readable from the disk: {error})"
        if boot_id is None:  # the runner never started: the newest boot on the disk, if it is new
            earlier = {boot.boot_id for boot in self.boots[:-1]}
            boot_id = next((b for b in journal.boot_ids[-1:] if b not in earlier), None)
            if boot_id is None:
                return "(this boot wrote nothing to the journal on the disk)"
        lines = [str(entry) for entry in journal.find(boot=boot_id)[-entries:]]
        return (
            f"--- journal of this boot, read from the disk, last {len(lines)} entries ---\n"
            + "\n".join(lines)
            + "\n--- end of journal ---"
        )

    def collect(self, *, timeout: float = DEFAULT_TIMEOUT) -> BootResult:
        """A short boot that runs nothing: its result's journal includes the previous boot's
        shutdown (each boot's journal is exported before that boot powers off). read_journal()
        gets the same without a boot."""
        return self.boot("true\n", timeout=timeout)

    def read_journal(self) -> Journal:
        """The journal of every boot so far, the last boot's shutdown included, read on the host
        from the powered-off root disk (no boot): qemu-img convert, debugfs, journalctl."""
        if not self.boots:
            raise RuntimeError(f"machine {self.name!r} has not booted yet")
        work = self.workdir / "journal-read"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        try:
            raw = work / "root.raw"
            _check_call(
                [
                    "qemu-img",
                    "convert",
                    "-f",
                    self.root.format,
                    "-O",
                    "raw",
                    str(self.root.path),
                    str(raw),
                ]
            )
            _check_call(["debugfs", "-R", f"rdump /var/log/journal {work}", str(raw)])
            raw.unlink()
            directories = sorted((work / "journal").glob("*/"))
            if not directories:
                raise RuntimeError(f"no journal directory on the root disk of {self.name!r}")
            exported = work.parent / "journal-offline.json"
            with open(exported, "wb") as out:
                subprocess.run(
                    [
                        "journalctl",
                        f"--directory={directories[0]}",
                        "-o",
                        "json",
                        "--all",
                        "--no-pager",
                    ],
                    stdout=out,
                    check=True,
                    timeout=120,
                )
            return Journal.load(exported)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    @property
    def journal(self) -> Journal:
        """The journal as exported by the latest boot."""
        if not self.boots:
            raise RuntimeError(f"machine {self.name!r} has not booted yet")
        return self.boots[-1].journal

    def discard(self) -> None:
        """Delete the disk files (logs and results stay); LUKSVM_E2E_KEEP=1 keeps them."""
        if settings.keep_disks():
            return
        for disk in [self.root, *self.disks]:
            disk.path.unlink(missing_ok=True)

    def _write_e2e_disk(
        self, bdir: Path, runner: Mapping[str, str], script: Script, files: Mapping[str, FileData]
    ) -> Path:
        stage = bdir / "stage"
        inputs = stage / "in"
        inputs.mkdir(parents=True)
        text = script.read_text() if isinstance(script, Path) else script
        (inputs / "run.sh").write_text(text)
        shutil.copyfile(SCENARIOS / "lib.sh", inputs / "lib.sh")
        for name, text in runner.items():
            (inputs / name).write_text(text)
        reserved = {"run.sh", "lib.sh", *runner}
        for name, data in files.items():
            if "/" in name or name in reserved:
                raise ValueError(f"file name {name!r}: a plain name other than {sorted(reserved)}")
            if isinstance(data, Path):
                shutil.copyfile(data, inputs / name)
            elif isinstance(data, bytes):
                (inputs / name).write_bytes(data)
            else:
                (inputs / name).write_text(data)
        image = bdir / "e2e.img"
        _check_call(
            ["mke2fs", "-q", "-t", "ext4", "-L", "e2e", "-d", str(stage), str(image), E2E_DISK_SIZE]
        )
        shutil.rmtree(stage)
        return image

    def _qemu_argv(
        self, e2e_img: Path, console: Path, kernel_args: str, tpm_socket: Path | None = None
    ) -> list[str]:
        argv = [
            self.qemu,
            "-nodefaults",
            "-no-user-config",
            "-accel",
            "tcg,thread=multi",
            "-cpu",
            CPU_MODEL,
            "-machine",
            "q35",
            "-smp",
            str(self.cpus),
            "-m",
            str(self.memory_mib),
            "-display",
            "none",
            "-monitor",
            "none",
            "-serial",
            f"file:{console}",
            "-serial",
            f"file:{console.with_name(HEARTBEAT_LOG)}",
            "-nic",
            "none",
            "-no-reboot",
            "-device",
            "virtio-rng-pci",
            "-kernel",
            str(self.image.kernel),
            "-initrd",
            str(self.image.initrd),
            "-append",
            f"{KERNEL_ARGS} {kernel_args}".strip(),
        ]
        disks = [self.root, *self.disks, Disk("e2e", e2e_img, "raw")]
        for number, disk in enumerate(disks):
            argv += [
                "-drive",
                f"file={disk.path},if=none,id=d{number},format={disk.format},cache=unsafe,discard=unmap",
                "-device",
                f"virtio-blk-pci,drive=d{number},serial={disk.name}",
            ]
        if tpm_socket is not None:
            argv += [
                "-chardev", f"socket,id=chrtpm,path={tpm_socket}",
                "-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
                "-device", "tpm-tis,tpmdev=tpm0",
            ]  # fmt: skip
        return argv


@contextlib.contextmanager
def _swtpm(state: Path | None, bdir: Path) -> Iterator[Path | None]:
    """swtpm serving the TPM state in `state` to one QEMU run on a socket in `bdir`."""
    if state is None:
        yield None
        return
    socket_path = bdir / "swtpm.sock"
    with open(bdir / "swtpm.log", "wb") as log:
        proc = subprocess.Popen(
            [
                "swtpm", "socket", "--tpm2", "--tpmstate", f"dir={state}",
                "--ctrl", f"type=unixio,path={socket_path}", "--terminate",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not socket_path.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"swtpm did not start; see {bdir / 'swtpm.log'}")
            time.sleep(0.05)
        yield socket_path
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# Every boot of this session, and what tests chose to report, for the "e2e timings" summary at the
# end of the run (conftest.py).
BOOT_LOG: list[BootResult] = []
NOTES: dict[str, str] = {}


def note(name: str, text: str) -> None:
    """Show a line (e.g. measured timings) in the "e2e timings" summary at the end of the run."""
    NOTES[name] = text


def _problem(outcome: Outcome, rc: int | None, timeout: float, bdir: Path) -> str | None:
    if outcome.frozen is not None:
        beats = (bdir / HEARTBEAT_LOG).read_text(errors="replace").split()
        uptimes = [word.partition("=")[2] for word in beats if word.startswith("uptime=")]
        last = f"the last at uptime {uptimes[-1]} s" if uptimes else "none at all"
        return (
            f"{FROZEN_PROBLEM}: no heartbeat on ttyS1 for {outcome.frozen:.0f} s ({last}); QEMU or "
            "the guest kernel stopped, the console and the journal on the disk end there; "
            "the VM was killed"
        )
    if outcome.fatal:
        return f"the console shows {outcome.fatal!r}; the VM was stopped"
    if outcome.timed_out:
        if rc is not None:
            return (
                f"the scenario ended (rc={rc}) but the VM did not power off within {timeout:.0f} s"
            )
        return (
            f"no scenario result within {timeout:.0f} s (boot hung or scenario still running); "
            "the VM was killed"
        )
    if outcome.returncode != 0:
        qemu_log = (bdir / "qemu.log").read_text(errors="replace").strip()
        return f"QEMU exited with code {outcome.returncode}: {qemu_log[-600:]}"
    if rc is None:
        return "the VM stopped without a scenario result (boot failed, or the runner did not run)"
    if rc != 0:
        return f"the scenario exited with rc={rc}"
    return None


def _read_back(e2e_img: Path, bdir: Path) -> None:
    """Copy out/ from the results disk into bdir, without mounting it."""
    # A killed VM may leave the filesystem's journal unreplayed: let e2fsck replay it first.
    subprocess.run(["e2fsck", "-p", str(e2e_img)], capture_output=True, timeout=120, check=False)
    dump = bdir / "dump"
    dump.mkdir()
    subprocess.run(
        ["debugfs", "-R", f"rdump /out {dump}", str(e2e_img)],
        capture_output=True,
        timeout=120,
        check=False,
    )
    out = dump / "out"
    if out.is_dir():
        for item in out.iterdir():
            item.rename(bdir / item.name)
    shutil.rmtree(dump)


def _overlay(backing: Path, backing_format: str, path: Path) -> None:
    _check_call(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            str(backing.resolve()),
            "-F",
            backing_format,
            str(path),
        ]
    )


def _check_call(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")


def clean_console(raw: bytes) -> str:
    """Serial console bytes as readable text: no colour codes, no carriage returns."""
    text = raw.decode("utf-8", "replace")
    text = _ANSI.sub("", text)
    return text.replace("\r\n", "\n").replace("\r", "\n")
