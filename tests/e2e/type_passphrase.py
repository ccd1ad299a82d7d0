"""Run a command on a terminal, answer its passphrase prompt, and record what the prompt said and
whether the passphrase showed up in any process's command line or environment while it waited.

Usage (inside the VM): type_passphrase.py PASSFILE PROMPT_OUT PS_OUT COMMAND...
Exits with COMMAND's status. Uses only the standard library and python3-pexpect (in the image).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pexpect


def hits(secret: bytes) -> tuple[int, int]:
    """Processes whose command line / environment contain `secret`."""
    in_argv = in_env = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        for name in ("cmdline", "environ"):
            try:
                with open(f"/proc/{pid}/{name}", "rb") as f:
                    found = secret in f.read()
            except OSError:
                continue
            if found and name == "cmdline":
                in_argv += 1
            elif found:
                in_env += 1
    return in_argv, in_env


def main() -> int:
    passfile, prompt_out, ps_out, *command = sys.argv[1:]
    with open(passfile, "rb") as f:
        secret = f.read()
    child = pexpect.spawn(command[0], command[1:], timeout=120)
    child.expect(rb"[Pp]assphrase[^\r\n]*")
    with open(prompt_out, "wb") as f:
        f.write(child.after.strip() + b"\n")
    # While the prompt waits: the secret is typed in below, so a hit now would be a leak of
    # something else; check again after typing, while the tool is still working on it.
    before = hits(secret)
    child.sendline(secret)
    after = hits(secret)
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, check=False).stdout
    child.expect(pexpect.EOF)
    child.close()
    with open(ps_out, "wb") as f:
        f.write(ps)
        f.write(f"HITS before={before} after={after}\n".encode())
        f.write(f"ECHOED {int(secret in (child.before or b''))}\n".encode())
    return child.exitstatus if child.exitstatus is not None else 1


if __name__ == "__main__":
    sys.exit(main())
