# -*- coding: utf-8 -*-
# Copyright: luksvm maintainers
# GNU Lesser General Public License v2.1 or later (see LICENSE or https://www.gnu.org/licenses/lgpl-2.1.txt)
"""What every luksvm.host module shares: running the luksvm CLI (with --root, reading its --json
output) and editing its configuration files, validated by `luksvm config check` on a copy before
anything is written. Nothing here imports luksvm: the CLI is the contract."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json
import os
import re
import shutil
import tempfile

CRYPTTAB_DIR = "etc/luksvm/crypttab.d"
SETTINGS_FILE = "etc/luksvm/luksvm.conf"
MANAGED = "# managed by Ansible (luksvm.host); edit the playbook, not this file"

COMMON_ARGS = dict(
    root=dict(type="path", default="/"),
    executable=dict(type="path"),
)


class Luksvm(object):
    """The luksvm CLI on the managed host, for one module run."""

    def __init__(self, module):
        self.module = module
        self.root = module.params["root"]
        self.executable = module.params.get("executable") or module.get_bin_path(
            "luksvm", required=True
        )

    def path(self, relative):
        return os.path.join(self.root, relative)

    def run(self, args, ok=(0,)):
        """Run `luksvm --root ROOT ARGS`; fail the task with luksvm's own message otherwise."""
        argv = [self.executable, "--root", self.root] + list(args)
        rc, out, err = self.module.run_command(argv, environ_update={"LC_ALL": "C.UTF-8"})
        if rc not in ok:
            self.module.fail_json(
                msg="luksvm %s failed (exit %d): %s" % (" ".join(args), rc, err.strip() or out.strip()),
                rc=rc,
                cmd=argv,
                stdout=out,
                stderr=err,
            )
        return rc, out, err

    def json(self, args, ok=(0,)):
        rc, out, err = self.run(list(args) + ["--json"], ok=ok)
        try:
            return rc, json.loads(out)
        except ValueError:
            self.module.fail_json(msg="luksvm %s printed no JSON" % " ".join(args), stdout=out,
                                  stderr=err)

    def config(self):
        """`luksvm config check --json` of the live configuration."""
        return self.json(["config", "check"])[1]

    def validate(self, changes):
        """Check the configuration as it would be with CHANGES ({relative path: text, or None to
        delete}) with `luksvm config check`, on a copy; fail the task with its message (naming
        the real file) when it does not pass. Nothing under root is touched."""
        scratch = tempfile.mkdtemp(prefix="luksvm-ansible-")
        try:
            for relative in (CRYPTTAB_DIR, os.path.dirname(SETTINGS_FILE)):
                os.makedirs(os.path.join(scratch, relative), exist_ok=True)
            source = self.path(CRYPTTAB_DIR)
            if os.path.isdir(source):
                for name in os.listdir(source):
                    if name.endswith(".conf") and os.path.isfile(os.path.join(source, name)):
                        shutil.copy(os.path.join(source, name), os.path.join(scratch, CRYPTTAB_DIR))
            if os.path.isfile(self.path(SETTINGS_FILE)):
                shutil.copy(self.path(SETTINGS_FILE), os.path.join(scratch, SETTINGS_FILE))
            for relative, text in changes.items():
                target = os.path.join(scratch, relative)
                if text is None:
                    if os.path.exists(target):
                        os.unlink(target)
                else:
                    with open(target, "w") as f:
                        f.write(text)
            argv = [self.executable, "--root", scratch, "config", "check"]
            rc, out, err = self.module.run_command(argv, environ_update={"LC_ALL": "C.UTF-8"})
            if rc != 0:
                message = err.strip() or out.strip()
                message = message.replace(scratch.rstrip("/") + "/", self.root.rstrip("/") + "/")
                self.module.fail_json(
                    msg="the configuration would not be valid, nothing was changed: %s" % message,
                    rc=rc,
                )
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def apply(self):
        """`luksvm apply` (in check mode `--dry-run`): (changed, its output lines)."""
        args = ["apply", "--dry-run"] if self.module.check_mode else ["apply"]
        rc, out, err = self.run(args)
        lines = out.splitlines()
        changed = bool(lines) and not lines[-1].startswith("nothing to change")
        return changed, lines + ["luksvm: " + x for x in err.splitlines() if x]

    def apply_pending(self):
        rc, out, err = self.run(["apply", "--dry-run"])
        lines = out.splitlines()
        return bool(lines) and not lines[-1].startswith("nothing to change")


def apply_units(cli, result):
    """Run `luksvm apply` after a configuration change, or when the units are not up to date.
    In check mode a changed configuration was not written, so apply is only announced."""
    if result["changed"] and cli.module.check_mode:
        result["apply"] = ["would run: luksvm apply"]
    elif result["changed"] or cli.apply_pending():
        changed, lines = cli.apply()
        result["apply"] = lines
        result["changed"] = result["changed"] or changed


def read(path):
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


def write(module, path, text, mode=0o644):
    """Replace PATH with TEXT atomically (ansible's own atomic_move keeps SELinux contexts)."""
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        os.makedirs(directory, 0o755)
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=".ansible-", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(temporary, mode)
    module.atomic_move(temporary, path)


# --- crypttab.d fragments: logical lines (a trailing backslash continues a line) -----------------


def logical_lines(text):
    """[(first index, last index, joined text)] of TEXT's physical lines."""
    physical = text.splitlines()
    out = []
    i = 0
    while i < len(physical):
        start, joined = i, physical[i]
        while joined.endswith("\\") and i + 1 < len(physical):
            i += 1
            joined = joined[:-1] + " " + physical[i]
        out.append((start, i, joined))
        i += 1
    return out


def defines(line, name):
    fields = line.split()
    return bool(fields) and not fields[0].startswith("#") and fields[0] == name


def set_volume_line(text, name, line):
    """TEXT with NAME's line replaced by LINE (appended when absent; LINE None removes it)."""
    physical = (text or "").splitlines()
    for start, end, joined in logical_lines(text or ""):
        if defines(joined, name):
            physical[start:end + 1] = [] if line is None else [line]
            break
    else:
        if line is not None:
            if not physical:
                physical = [MANAGED]
            physical.append(line)
    return "\n".join(physical) + "\n" if physical else ""


def volume_line(name, source, key, options, guests):
    words = list(options) + ["x-luksvm.guest=" + g for g in guests]
    return " ".join([name, source, key or "-", ",".join(words) or "luks"])


# --- luksvm.conf: [section] and key = value lines ------------------------------------------------

_SECTION = re.compile(r"^\s*\[([^\]]+)\]\s*$")
_KEY = re.compile(r"^\s*([A-Za-z0-9_.-]+)\s*=")


def set_settings(text, settings):
    """TEXT with each SETTINGS[section][key] set (None removes the line); comments and every
    other line kept; missing sections appended."""
    lines = (text or "").splitlines()
    for section, values in settings.items():
        for key, value in values.items():
            lines = _set_one(lines, section, key, value)
    return "\n".join(lines) + "\n" if lines else ""


def _set_one(lines, section, key, value):
    current, start, end, found = None, None, len(lines), None
    for i, line in enumerate(lines):
        match = _SECTION.match(line)
        if match:
            if current == section:
                end = i
                break
            current = match.group(1).strip()
            if current == section:
                start = i
            continue
        if current == section:
            key_match = _KEY.match(line)
            if key_match and key_match.group(1) == key:
                found = i
    if start is None:
        if value is None:
            return lines
        return lines + ([""] if lines and lines[-1].strip() else []) + [
            "[%s]" % section, "%s = %s" % (key, value)]
    if found is not None:
        if value is None:
            return lines[:found] + lines[found + 1:]
        return lines[:found] + ["%s = %s" % (key, value)] + lines[found + 1:]
    if value is None:
        return lines
    insert = end
    while insert > start + 1 and not lines[insert - 1].strip():
        insert -= 1
    return lines[:insert] + ["%s = %s" % (key, value)] + lines[insert:]


def get_settings(text):
    """{section: {key: value}} of the uncommented settings in TEXT."""
    out = {}
    current = None
    for line in (text or "").splitlines():
        match = _SECTION.match(line)
        if match:
            current = match.group(1).strip()
            out.setdefault(current, {})
            continue
        key_match = _KEY.match(line)
        if key_match and current is not None and not line.lstrip().startswith(("#", ";")):
            out[current][key_match.group(1)] = line.split("=", 1)[1].strip()
    return out
