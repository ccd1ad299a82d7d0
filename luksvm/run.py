"""The one place that starts processes.

argv lists only (never a shell), a timeout on every call, LANG=C so output parses the same
everywhere, secrets only through stdin. Every command is logged; stdin never is.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import shlex
import subprocess
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from luksvm.errors import LuksvmError

log = logging.getLogger("luksvm.run")

STDERR_TAIL_LINES = 5


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


class CommandError(LuksvmError):
    """A command failed, timed out or does not exist. Carries argv, exit code and stderr's tail."""

    def __init__(
        self, argv: Sequence[str], returncode: int | None, stderr: str, why: str, stdout: str = ""
    ) -> None:
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stderr_tail = "\n".join(stderr.strip().splitlines()[-STDERR_TAIL_LINES:])
        self.stdout_tail = "\n".join(stdout.strip().splitlines()[-STDERR_TAIL_LINES:])
        message = f"{shlex.join(self.argv)}: {why}"
        if self.stderr_tail:
            message += ": " + self.stderr_tail
        super().__init__(message)


# While a dry run is active, run() records argv here instead of starting anything.
_recording: contextvars.ContextVar[list[tuple[str, ...]] | None] = contextvars.ContextVar(
    "luksvm_run_recording", default=None
)


@contextlib.contextmanager
def dry_run() -> Iterator[list[tuple[str, ...]]]:
    """Within this block run() starts nothing; the yielded list collects the argv it would run."""
    recorded: list[tuple[str, ...]] = []
    token = _recording.set(recorded)
    try:
        yield recorded
    finally:
        _recording.reset(token)


def command_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra or {})
    env["LANG"] = "C"
    env["LC_ALL"] = "C"
    return env


def run(
    argv: Sequence[str],
    *,
    timeout: float,
    stdin: bytes | None = None,
    check: bool = True,
    secret: bool = False,
    env: Mapping[str, str] | None = None,
    pass_fds: Sequence[int] = (),
) -> Result:
    """Run argv (never a shell) and capture its output.

    stdin carries secrets; secret=True records that it did, so logs say so without the bytes.
    check=True raises CommandError on a non-zero exit. env adds variables for this one command
    (e.g. LVM_SYSTEM_DIR); never secrets. pass_fds: descriptors the command inherits (a key's
    memfd, opened by the command as /proc/self/fd/N: see keys.memfd_path).
    """
    argv = tuple(argv)
    recording = _recording.get()
    if recording is not None:
        recording.append(argv)
        return Result(argv, 0, "", "")
    log.debug("run: %s%s", shlex.join(argv), " (secret on stdin)" if secret else "")
    try:
        proc = subprocess.run(
            argv,
            input=stdin if stdin is not None else b"",
            capture_output=True,
            timeout=timeout,
            env=command_env(env),
            check=False,
            pass_fds=tuple(pass_fds),
        )
    except FileNotFoundError:
        raise CommandError(argv, None, "", f"{argv[0]} not found; install it") from None
    except subprocess.TimeoutExpired:
        raise CommandError(argv, None, "", f"timed out after {timeout:g} s") from None
    result = Result(
        argv,
        proc.returncode,
        proc.stdout.decode("utf-8", "replace"),
        proc.stderr.decode("utf-8", "replace"),
    )
    log.debug("exit %d: %s", proc.returncode, argv[0])
    if check and proc.returncode != 0:
        raise CommandError(
            argv, proc.returncode, result.stderr, f"exit status {proc.returncode}", result.stdout
        )
    return result


def run_interactive(argv: Sequence[str], *, check: bool = True) -> int:
    """Run argv on the caller's terminal (for passphrase prompts). The only call with no timeout:
    a prompt waits for the admin."""
    argv = tuple(argv)
    recording = _recording.get()
    if recording is not None:
        recording.append(argv)
        return 0
    log.debug("run (interactive): %s", shlex.join(argv))
    try:
        proc = subprocess.run(argv, env=command_env(), check=False)
    except FileNotFoundError:
        raise CommandError(argv, None, "", f"{argv[0]} not found; install it") from None
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, "", f"exit status {proc.returncode}")
    return proc.returncode


def stream(
    argv: Sequence[str],
    *,
    timeout: float,
    on_output: Callable[[str], None],
    check: bool = True,
) -> Result:
    """Run argv and hand each piece of its stdout to on_output as it comes (split at CR and LF,
    for progress meters such as `qemu-img -p`). stdin is empty; stderr is captured."""
    argv = tuple(argv)
    recording = _recording.get()
    if recording is not None:
        recording.append(argv)
        return Result(argv, 0, "", "")
    log.debug("run (streaming): %s", shlex.join(argv))
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=command_env(),
        )
    except FileNotFoundError:
        raise CommandError(argv, None, "", f"{argv[0]} not found; install it") from None
    stdout, stderr_pipe = proc.stdout, proc.stderr
    assert stdout is not None and stderr_pipe is not None
    errors: list[bytes] = []
    reader = threading.Thread(target=lambda: errors.append(stderr_pipe.read()), daemon=True)
    reader.start()
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    out: list[str] = []
    pending = ""
    try:
        while True:
            chunk = os.read(stdout.fileno(), 65536)
            if not chunk:
                break
            text = pending + chunk.decode("utf-8", "replace")
            *pieces, pending = text.replace("\r", "\n").split("\n")
            for piece in pieces:
                out.append(piece)
                if piece.strip():
                    on_output(piece)
        if pending.strip():
            out.append(pending)
            on_output(pending)
        returncode = proc.wait()
    finally:
        timed_out = not timer.is_alive() and proc.returncode is not None and proc.returncode < 0
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join()
        stdout.close()
        stderr_pipe.close()
    stderr = b"".join(errors).decode("utf-8", "replace")
    if timed_out:
        raise CommandError(argv, None, stderr, f"timed out after {timeout:g} s")
    result = Result(argv, returncode, "\n".join(out), stderr)
    log.debug("exit %d: %s", returncode, argv[0])
    if check and returncode != 0:
        raise CommandError(argv, returncode, stderr, f"exit status {returncode}", result.stdout)
    return result
