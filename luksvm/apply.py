"""`luksvm apply`: make ROOT/etc/systemd/system hold exactly the units the configuration asks for.

Plan first (read what is there, compare with what units.py renders), then act. apply writes and
removes only its own files: a file is luksvm's when an earlier apply recorded it in the manifest
and it still starts with the generated header; a symlink, when it still points where the manifest
says. Anything else in the way is refused, and nothing is written.
"""

from __future__ import annotations

import difflib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from luksvm import files, units
from luksvm.config import Config
from luksvm.errors import LuksvmError, UsageError
from luksvm.run import run
from luksvm.systemctl import systemd_running

UNIT_DIR = "etc/systemd/system"
# Where a package manager puts unit files; when the templates are there, apply leaves them be.
PACKAGED_UNIT_DIRS = ("usr/lib/systemd/system", "lib/systemd/system")
MANIFEST = "var/lib/luksvm/applied.json"


@dataclass(frozen=True)
class Change:
    verb: str  # write | link | remove
    path: str  # relative to ROOT
    old: str | None  # the file's text or the link's target; None when absent
    new: str | None
    is_link: bool


@dataclass(frozen=True)
class Plan:
    root: str
    changes: tuple[Change, ...]
    unchanged: int
    left: tuple[str, ...]  # stale paths no longer luksvm's (edited by hand): warned, kept
    manifest: str  # the manifest's new text
    manifest_changed: bool
    reload: bool  # systemctl daemon-reload after the changes


# --- where things are --------------------------------------------------------------------------


def luksvm_path() -> str:
    """The absolute path of the luksvm executable the units should run: the one running now."""
    argv0 = sys.argv[0] if sys.argv else ""
    candidates = []
    if os.path.basename(argv0) == "luksvm":
        candidates.append(os.path.abspath(argv0))
    # A console script sits next to its interpreter (a virtualenv's bin/, or /usr/bin).
    candidates.append(os.path.join(os.path.dirname(sys.executable), "luksvm"))
    candidates.append(shutil.which("luksvm") or "")
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return os.path.abspath(candidate)
    raise LuksvmError(
        "cannot find the luksvm executable the units should run",
        fix="install luksvm (pip install . or the package) so that `luksvm` is on PATH, and run "
        "apply through it",
    )


def shipped_templates() -> dict[str, str]:
    """The template units shipped with this luksvm (package data in a wheel; units/ in the
    source tree)."""
    here = Path(__file__).resolve().parent
    for directory in (here / "unitfiles", here.parent / "units"):
        if all((directory / name).is_file() for name in units.TEMPLATES):
            return {name: (directory / name).read_text() for name in units.TEMPLATES}
    raise LuksvmError(f"luksvm's template units are missing next to {here}", fix="reinstall luksvm")


def packaged_template_dir(root: str) -> str | None:
    """The directory (as the target sees it) where a package installed all the templates."""
    for directory in PACKAGED_UNIT_DIRS:
        if all(os.path.isfile(os.path.join(root, directory, n)) for n in units.TEMPLATES):
            return "/" + directory
    return None


# --- plan ----------------------------------------------------------------------------------------


def _read_manifest(root: str) -> tuple[set[str], dict[str, str]]:
    path = os.path.join(root, MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return set(data["files"]), dict(data["links"])
    except FileNotFoundError:
        return set(), {}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise LuksvmError(
            f"{path}: unreadable ({error}); luksvm records there what apply wrote",
            fix="remove it and run apply again (files it listed are then left in place)",
        ) from None


def _current(root: str, path: str) -> tuple[str, str | None]:
    """What is at ROOT/path: ("absent"|"file"|"link"|"other", text or link target)."""
    full = os.path.join(root, path)
    if os.path.islink(full):
        return "link", os.readlink(full)
    if not os.path.lexists(full):
        return "absent", None
    if not os.path.isfile(full):
        return "other", None
    try:
        with open(full, encoding="utf-8") as f:
            return "file", f.read()
    except UnicodeDecodeError:
        return "other", None


def _is_ours(text: str | None) -> bool:
    return text is not None and text.startswith(units.HEADER)


def plan(config: Config, *, luksvm_path: str) -> Plan:
    """Compare what `config` asks for with what ROOT holds. Reads; changes nothing."""
    root = config.root
    packaged = packaged_template_dir(root)
    rendering = units.render(
        config,
        luksvm_path=luksvm_path,
        template_dir=packaged or "/" + UNIT_DIR,
        templates=None if packaged else shipped_templates(),
    )
    wanted_files = {f"{UNIT_DIR}/{p}": text for p, text in rendering.files.items()}
    wanted_links = {f"{UNIT_DIR}/{p}": target for p, target in rendering.links.items()}
    old_files, old_links = _read_manifest(root)

    changes: list[Change] = []
    conflicts: list[str] = []
    left: list[str] = []
    unchanged = 0
    for path, text in sorted(wanted_files.items()):
        kind, current = _current(root, path)
        if kind == "file" and current == text:
            unchanged += 1
        elif kind == "absent" or (kind == "file" and _is_ours(current)):
            changes.append(Change("write", path, current, text, False))
        else:
            conflicts.append(f"{os.path.join(root, path)}: a {kind} luksvm did not write")
    for path, target in sorted(wanted_links.items()):
        kind, current = _current(root, path)
        if kind == "link" and current == target:
            unchanged += 1
        elif kind == "absent" or (kind == "link" and old_links.get(path) == current):
            changes.append(Change("link", path, current, target, True))
        else:
            shown = f"a symlink to {current}" if kind == "link" else f"a {kind}"
            conflicts.append(f"{os.path.join(root, path)}: {shown} luksvm did not write")
    if conflicts:
        raise LuksvmError(
            "refusing to replace what luksvm did not write (nothing changed):\n"
            + "\n".join(conflicts),
            fix="move these aside if luksvm should manage them, then run apply again",
        )

    for path in sorted(old_files - wanted_files.keys()):
        kind, current = _current(root, path)
        if kind == "file" and _is_ours(current):
            changes.append(Change("remove", path, current, None, False))
        elif kind != "absent":
            left.append(path)
    for path, target in sorted(old_links.items()):
        if path in wanted_links:
            continue
        kind, current = _current(root, path)
        if kind == "link" and current == target:
            changes.append(Change("remove", path, current, None, True))
        elif kind != "absent":
            left.append(path)

    manifest = json.dumps(
        {"files": sorted(wanted_files), "links": dict(sorted(wanted_links.items()))}, indent=1
    )
    _, old_manifest = _current(root, MANIFEST)
    return Plan(
        root=root,
        changes=tuple(changes),
        unchanged=unchanged,
        left=tuple(left),
        manifest=manifest + "\n",
        manifest_changed=old_manifest != manifest + "\n",
        reload=bool(changes) and systemd_running(root),
    )


# --- act -----------------------------------------------------------------------------------------


def _temporary(full: str) -> str:
    """A name next to `full` that systemd ignores (hidden) until it is renamed into place."""
    return os.path.join(os.path.dirname(full), f".#{os.path.basename(full)}.luksvm")


def _stage(full: str, text: str, is_link: bool, made: set[str]) -> str:
    """Write `text` (or a symlink to it) under the hidden name, flushed to disk. `made` collects
    the directories whose entries must be flushed once everything is in place."""
    directory = os.path.dirname(full)
    if directory not in made:
        missing = directory
        while missing and not os.path.isdir(missing):  # new folders' names live in their parents
            made.add(os.path.dirname(missing))
            missing = os.path.dirname(missing)
        os.makedirs(directory, exist_ok=True)
        made.add(directory)
    temporary = _temporary(full)
    if os.path.lexists(temporary):
        os.unlink(temporary)
    if is_link:
        os.symlink(text, temporary)  # a symlink is durable with its directory's entries
    else:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), 0o644)
            os.fsync(f.fileno())
    return temporary


def _remove(root: str, full: str) -> list[str]:
    """Remove `full`; the directories whose entries changed."""
    os.unlink(full)
    # Drop the .d / .wants directory when that emptied it; never the unit directory itself.
    directory = os.path.dirname(full)
    if directory != os.path.join(root, UNIT_DIR) and not os.listdir(directory):
        os.rmdir(directory)
        return [os.path.dirname(directory)]
    return [directory]


def execute(plan: Plan) -> None:
    """Make the plan true. Every new file is staged under a hidden name and fsync'd, then renamed
    into place, so a crash leaves each file old or new, never empty; then removals; then each
    directory whose entries changed is fsync'd once (what apply wrote, and nothing else: no
    machine-wide sync that waits for every other writer's dirty pages); then reload."""
    writes = [c for c in plan.changes if c.verb != "remove"]
    staged = [(os.path.join(plan.root, c.path), c.new or "", c.is_link) for c in writes]
    if plan.manifest_changed:
        staged.append((os.path.join(plan.root, MANIFEST), plan.manifest, False))
    try:
        touched: set[str] = set()
        renames = [(_stage(full, text, is_link, touched), full) for full, text, is_link in staged]
        for temporary, full in renames:
            os.replace(temporary, full)
        for change in plan.changes:
            if change.verb == "remove":
                touched.update(_remove(plan.root, os.path.join(plan.root, change.path)))
        for directory in sorted(touched, key=len, reverse=True):  # deepest first
            if os.path.isdir(directory):
                files.fsync(directory)
    except OSError as error:
        raise LuksvmError(f"apply: {error.filename}: {error.strerror}") from None
    if plan.reload:
        run(["systemctl", "daemon-reload"], timeout=120)


# --- tell ----------------------------------------------------------------------------------------


def _diff(change: Change) -> Iterator[str]:
    def lines(value: str | None) -> list[str]:
        if value is None:
            return []
        if change.is_link:
            return [f"symlink to {value}\n"]
        return value.splitlines(keepends=True)

    old_name = f"a/{change.path}" if change.old is not None else "/dev/null"
    new_name = f"b/{change.path}" if change.new is not None else "/dev/null"
    for line in difflib.unified_diff(lines(change.old), lines(change.new), old_name, new_name):
        yield line.rstrip("\n")


def describe(plan: Plan, *, dry_run: bool, diff: bool) -> Iterator[str]:
    """What apply did (or would do, with dry_run), line by line, with unified diffs on request."""
    would = "would " if dry_run else ""
    past = {"write": "wrote", "link": "linked", "remove": "removed"}
    for change in plan.changes:
        full = os.path.join(plan.root, change.path)
        verb = change.verb if dry_run else past[change.verb]
        suffix = f" -> {change.new}" if change.verb == "link" else ""
        yield f"{would}{verb} {full}{suffix}"
        if diff:
            yield from _diff(change)
    if plan.reload:
        yield f"{would}run systemctl daemon-reload"
    counts = {verb: sum(c.verb == verb for c in plan.changes) for verb in past}
    if plan.changes:
        yield (
            f"{'would change' if dry_run else 'changed'}: {counts['write']} files written, "
            f"{counts['link']} links made, {counts['remove']} removed; "
            f"{plan.unchanged} up to date"
        )
    else:
        yield f"nothing to change: {plan.unchanged} unit files and links up to date"


def warnings(plan: Plan) -> Iterator[str]:
    for path in plan.left:
        yield (
            f"left {os.path.join(plan.root, path)} in place: an earlier apply wrote it, the "
            "configuration no longer asks for it, and it was changed since; remove it by hand"
        )


def apply(config: Config, *, dry_run: bool = False) -> Plan:
    """Plan and, unless dry_run, execute. UsageError/LuksvmError leave everything untouched."""
    if not os.path.isdir(config.root):
        raise UsageError(f"--root {config.root}: no such directory")
    result = plan(config, luksvm_path=luksvm_path())
    if not dry_run:
        execute(result)
    return result
