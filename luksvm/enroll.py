"""Unattended keys for a configured volume: `luksvm enroll` and `luksvm keys`.

enroll adds a TPM2 key (systemd-cryptenroll), a Tang key (clevis luks bind, with the thumbprint
the admin gives: never trust on first use) or a recovery key (systemd-cryptenroll, shown once on
the terminal), or removes a keyslot or token, refusing to remove the last one. Each is planned
first (`--dry-run` prints the commands); the header is backed up before and after; the volume's
configuration line gets what the unlock needs, shown as a diff.

The current key authenticates the change; it reaches the tools as a memfd path
(/proc/self/fd/N: systemd-cryptenroll --unlock-key-file=, clevis luks bind -k), never argv.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from luksvm import backup, files, keys, tokens
from luksvm.config import Config, Volume
from luksvm.errors import LuksvmError, UsageError
from luksvm.run import run

TIMEOUT = 120  # enrolment runs a KDF and may talk to a TPM or a Tang server
KEY_PATH_SHOWN = "/proc/self/fd/N"  # what a dry run prints for the memfd path
TANG_OPTION = "x-luksvm.tang"
THUMBPRINT = re.compile(r"^[A-Za-z0-9_-]{20,}$")
PCR_LIST = re.compile(r"^(\d{1,2})([+,]\d{1,2})*$")


@dataclass(frozen=True)
class Request:
    """What the admin asked for: one of tpm2, tang, recovery, remove."""

    action: str
    tpm2_device: str = "auto"
    tpm2_pcrs: str = "7"
    tang_url: str = ""
    thumbprint: str = ""
    remove: str = ""  # N (keyslot), token:N, or a kind: tpm2 | tang | recovery


@dataclass(frozen=True)
class Plan:
    volume: str
    device: str
    action: str
    command: tuple[str, ...]  # the enrolment or removal, with KEY_PATH_SHOWN for the key
    needs_key: bool  # the command reads the current key (memfd path, or stdin for clevis)
    key_on_stdin: bool
    wipe_slots: tuple[int, ...] = ()
    wipe_salts: frozenset[str] = frozenset()  # of the keyslots removed: to find stale backups
    config_path: str = ""
    config_before: str = ""
    config_after: str = ""
    notes: tuple[str, ...] = field(default=())

    def diff(self) -> str:
        if self.config_before == self.config_after:
            return ""
        return "".join(
            difflib.unified_diff(
                self.config_before.splitlines(keepends=True),
                self.config_after.splitlines(keepends=True),
                self.config_path,
                self.config_path,
            )
        )


# --- the configuration line -------------------------------------------------------------------


def edit_line(
    line: str, *, key: str | None = None, add: Sequence[str] = (), drop: Sequence[str] = ()
) -> str:
    """A crypttab line with its key field replaced (when `key`), the options in `add` appended
    where missing and the options named in `drop` removed; the spacing kept (pure)."""
    matches = list(re.finditer(r"\S+", line))
    fields = [m.group() for m in matches]
    gaps = [line[: matches[0].start()]] + [
        line[a.end() : b.start()] for a, b in zip(matches, matches[1:])
    ]
    trailing = line[matches[-1].end() :]
    while len(fields) < 4:
        fields.append("-" if len(fields) == 2 else "luks")
        gaps.append("  ")
    if key is not None:
        fields[2] = key
    options = [o for o in fields[3].split(",") if o and o.partition("=")[0] not in drop]
    names = {o.partition("=")[0] for o in options}
    options += [o for o in add if o.partition("=")[0] not in names]
    fields[3] = ",".join(options) or "luks"
    return "".join(g + f for g, f in zip(gaps, fields)) + trailing


def edited_config(volume: Volume, edit: Callable[[str], str]) -> tuple[str, str]:
    """(before, after) of the fragment that defines `volume`, its line passed through `edit`."""
    path = volume.where.path
    with open(path, encoding="utf-8") as f:
        before = f.read()
    lines = before.splitlines(keepends=True)
    index = volume.where.line - 1
    text = lines[index].rstrip("\n")
    lines[index] = edit(text) + ("\n" if lines[index].endswith("\n") else "")
    return before, "".join(lines)


# --- planning ---------------------------------------------------------------------------------


def plan(config: Config, name: str, request: Request, inventory: tokens.Inventory) -> Plan:
    """What `luksvm enroll` would do for `request` on volume `name` (reads the fragment only)."""
    volume = config.volume(name)
    if inventory.version != 2:
        raise LuksvmError(
            f"{name}: {volume.device} is LUKS{inventory.version}; tokens need LUKS2",
            fix=f"convert it: cryptsetup convert --type luks2 {volume.device} (volume locked, "
            "header backed up first)",
        )
    device = volume.device
    if request.action == "tpm2":
        if not PCR_LIST.match(request.tpm2_pcrs):
            raise UsageError(
                f"--tpm2-pcrs {request.tpm2_pcrs!r}: expected PCR numbers joined by +, "
                "e.g. 7 or 0+7"
            )
        pcrs = request.tpm2_pcrs.replace(",", "+")
        if any(int(p) >= tokens.PCR_COUNT for p in pcrs.split("+")):
            raise UsageError(f"--tpm2-pcrs {request.tpm2_pcrs!r}: PCRs are numbered 0 to 23")
        command: tuple[str, ...] = (
            "systemd-cryptenroll",
            f"--unlock-key-file={KEY_PATH_SHOWN}",
            f"--tpm2-device={request.tpm2_device}",
            f"--tpm2-pcrs={pcrs}",
            device,
        )
        before, after = edited_config(
            volume,
            lambda line: edit_line(
                line, add=[f"tpm2-device={request.tpm2_device}"], drop=["tpm2-device"]
            ),
        )
        return Plan(
            name,
            device,
            "tpm2",
            command,
            True,
            False,
            (),
            frozenset(),
            volume.where.path,
            before,
            after,
        )
    if request.action == "tang":
        if not request.tang_url.startswith(("http://", "https://")):
            raise UsageError(f"--tang {request.tang_url!r}: expected a URL such as http://tang.lan")
        if not THUMBPRINT.match(request.thumbprint):
            raise UsageError(
                "--thumbprint is required with --tang: the thumbprint of the server's signing key "
                "(on the Tang server: tang-show-keys); luksvm never trusts a key on first use"
            )
        pin = json.dumps({"url": request.tang_url, "thp": request.thumbprint})
        # the key as a file (a memfd path): `-k -` reads one line with bash's `read`, which
        # mangles a binary keyfile (NUL bytes dropped, a newline ends it); a path goes to
        # cryptsetup's --key-file as it is
        command = ("clevis", "luks", "bind", "-k", KEY_PATH_SHOWN, "-d", device, "tang", pin)
        before, after = edited_config(volume, lambda line: edit_line(line, add=[TANG_OPTION]))
        return Plan(
            name,
            device,
            "tang",
            command,
            True,
            False,
            (),
            frozenset(),
            volume.where.path,
            before,
            after,
        )
    if request.action == "recovery":
        command = (
            "systemd-cryptenroll",
            f"--unlock-key-file={KEY_PATH_SHOWN}",
            "--recovery-key",
            device,
        )
        return Plan(name, device, "recovery", command, True, False)
    return _removal_plan(volume, request.remove, inventory)


def _removal_plan(volume: Volume, what: str, inventory: tokens.Inventory) -> Plan:
    name = volume.name
    slots: tuple[int, ...]
    if re.fullmatch(r"\d+", what):
        slots = (int(what),)
        if slots[0] not in inventory.slot_numbers():
            raise LuksvmError(
                f"{name}: {volume.device} has no keyslot {what} "
                f"(keyslots: {', '.join(map(str, inventory.slot_numbers()))})",
                fix=f"see them with luksvm keys {name}",
            )
    elif what.startswith("token:") and what[6:].isdigit():
        slots = inventory.token(int(what[6:])).keyslots
    elif what in ("tpm2", "tang", "recovery", "fido2", "pkcs11"):
        slots = tuple(s for t in inventory.tokens_of(what) for s in t.keyslots)
        if not slots:
            raise LuksvmError(
                f"{name}: {volume.device} has no {what} token", fix=f"see luksvm keys {name}"
            )
    else:
        raise UsageError(
            f"--remove {what!r}: expected a keyslot number, token:N, or tpm2, tang, recovery"
        )
    remaining = [s for s in inventory.slot_numbers() if s not in slots]
    if not remaining:
        raise LuksvmError(
            f"{name}: removing keyslot(s) {', '.join(map(str, slots))} would leave "
            f"{volume.device} with no key at all: its data would be lost",
            fix=f"enroll another key first (luksvm enroll {name} --recovery-key)",
        )
    left = [s for s in inventory.keyslots if s.number in remaining]
    if all(any(inventory.token(t).kind == "other" for t in s.tokens) for s in left):
        raise LuksvmError(
            f"{name}: after removing keyslot(s) {', '.join(map(str, slots))} only keyslots of "
            "tokens luksvm does not know would remain",
            fix=f"enroll a passphrase or recovery key first (luksvm enroll {name} --recovery-key)",
        )
    gone_kinds = {t.kind for t in inventory.tokens if t.keyslots and set(t.keyslots) <= set(slots)}
    kept_kinds = {
        t.kind for t in inventory.tokens if t.keyslots and not set(t.keyslots) <= set(slots)
    }
    drop = []
    if "tpm2" in gone_kinds - kept_kinds:
        drop.append("tpm2-device")
    if {"tang", "sss"} & gone_kinds and not {"tang", "sss"} & kept_kinds:
        drop.append(TANG_OPTION)
    before, after = edited_config(volume, lambda line: edit_line(line, drop=drop))
    command = (
        "systemd-cryptenroll",
        "--wipe-slot=" + ",".join(map(str, slots)),
        volume.device,
    )
    notes = (
        "header backups taken before this still hold the removed key: they are marked stale "
        f"(luksvm header-backup --prune-stale {name} removes them)",
    )
    return Plan(
        name,
        volume.device,
        "remove",
        command,
        False,
        False,
        slots,
        inventory.salts(slots),
        volume.where.path,
        before,
        after,
        notes,
    )


def dry_run_lines(plan: Plan, config: Config) -> list[str]:
    """The exact commands, in order, as `--dry-run` prints them."""
    folder = os.path.join(config.settings.backup_dir, plan.volume)
    lines = [f"# header backup of {plan.volume} into {folder}/ (before)", _shell(plan.command)]
    if plan.config_before != plan.config_after:
        lines.append(f"# then {plan.config_path} changes:")
        lines.extend("# " + line for line in plan.diff().splitlines())
    lines.append(f"# header backup of {plan.volume} into {folder}/ (after)")
    return lines


def _shell(argv: Sequence[str]) -> str:
    import shlex

    return shlex.join(argv)


# --- the current key --------------------------------------------------------------------------


def current_key(volume: Volume, config: Config, key_file: str | None) -> keys.Key:
    """A key with a secret that opens a keyslot of the volume now, to authenticate the change
    (keys.obtain_key without tokens: systemd-cryptenroll and clevis take a secret only)."""
    return keys.obtain_key(
        volume.device,
        step=f"enrolling or removing a key of {volume.name}",
        volume=volume,
        settings=config.settings,
        root=config.root,
        key_file=key_file,
        use_tokens=False,
    )


# --- doing it ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    plan: Plan
    backups: tuple[str, ...]  # before, after
    recovery_key: str = field(default="", repr=False)  # shown once by the caller, never logged
    stale_backups: tuple[str, ...] = ()


def execute(plan: Plan, config: Config, key: keys.Key | None) -> Outcome:
    """Back up, enrol or remove, write the configuration change, back up again."""
    before = _backup(config, plan.volume)
    argv = list(plan.command)
    recovery = ""
    if plan.needs_key:
        assert key is not None
        if plan.key_on_stdin:
            run(argv, stdin=key.secret, secret=True, timeout=TIMEOUT)
        else:
            with keys.memfd_path(key) as (path, fd):
                argv = [a.replace(KEY_PATH_SHOWN, path) for a in argv]
                result = run(argv, timeout=TIMEOUT, pass_fds=(fd,))
            if plan.action == "recovery":
                recovery = result.stdout.strip()
    else:
        run(argv, timeout=TIMEOUT)
    if plan.config_before != plan.config_after:
        _write_config(plan.config_path, plan.config_after)
    after = _backup(config, plan.volume)
    stale: tuple[str, ...] = ()
    if plan.wipe_slots:
        stale = backup.mark_stale(
            os.path.join(config.settings.backup_dir, plan.volume),
            plan.wipe_salts,
            keep=after,
            why=f"keyslot(s) {', '.join(map(str, plan.wipe_slots))} removed by luksvm enroll",
        )
    return Outcome(plan, (before, after), recovery, stale)


def _backup(config: Config, name: str) -> str:
    report = backup.backup_headers(config, [name])
    outcome = report.outcomes[0]
    if outcome.error:
        raise LuksvmError(
            f"{name}: header backup failed, so nothing further was changed: {outcome.error}"
        )
    return outcome.file


def _write_config(path: str, text: str) -> None:
    files.write_atomically(path, text, mode=os.stat(path).st_mode & 0o7777)


# --- luksvm keys ------------------------------------------------------------------------------


def report(config: Config, names: Sequence[str] = ()) -> list[dict[str, object]]:
    """What can unlock each volume, and whether each unattended source would unlock it now."""
    volumes = [config.volume(n) for n in names] if names else list(config.volumes)
    out = []
    for volume in volumes:
        entry: dict[str, object] = {
            "volume": volume.name,
            "device": volume.device,
            "configured_key": str(volume.key),
        }
        try:
            inventory = tokens.read_inventory(volume.device)
        except LuksvmError as error:
            entry.update(error=error.args[0], keyslots=[], tokens=[], unattended=[])
            out.append(entry)
            continue
        entry["luks_version"] = inventory.version
        entry["keyslots"] = [
            {
                "keyslot": s.number,
                "kdf": s.kdf,
                "priority": s.priority,
                "by": [inventory.token(t).kind for t in s.tokens] or ["passphrase"],
            }
            for s in inventory.keyslots
        ]
        entry["tokens"] = [t.as_dict() for t in inventory.tokens]
        entry["unattended"] = [c.as_dict() for c in checks(volume, config, inventory)]
        out.append(entry)
    return out


def checks(volume: Volume, config: Config, inventory: tokens.Inventory) -> list[tokens.Check]:
    """One check per unattended source, in the order the unlock tries them."""
    found: list[tokens.Check] = []
    tpm2_device = volume.option("tpm2-device") or "auto"
    for token in inventory.tokens:
        if token.kind == "tpm2":
            found.append(tokens.check_tpm2(volume.device, token, tpm2_device))
        elif token.kind in ("tang", "sss"):
            found.append(tokens.check_tang(volume.device, token))
        elif token.kind in ("fido2", "pkcs11"):
            found.append(
                tokens.Check(
                    token.kind,
                    f"token {token.number}: {token.describe()}",
                    "unknown",
                    "needs the device present (and maybe a touch or PIN): not tested",
                )
            )
    if volume.key.kind == "file":
        found.append(
            tokens.check_key(
                volume.device,
                "keyfile",
                f"keyfile {volume.key.path}",
                lambda: _read_file(keys.keyfile_path(volume, config.root)),
            )
        )
    elif volume.key.kind == "keyring":
        found.append(
            tokens.check_key(
                volume.device,
                "keyring",
                str(volume.key),
                lambda: keys.keyring_secret(volume, config.settings),
            )
        )
    return found


def _read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as error:
        raise LuksvmError(f"cannot read key file {path}: {error.strerror}") from None
