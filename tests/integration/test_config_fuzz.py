"""A configuration fuzzer (issue 15): thousands of generated trees of crypttab.d fragments and
luksvm.conf, on disk, with odd contents, file types and encodings. Only ConfigError may escape
reading them, every problem names FILE:LINE:COL, and every tree that loads renders its units with
timeouts systemd parses. The seed is fixed, so a failure reproduces; LUKSVM_FUZZ_TREES and
LUKSVM_FUZZ_SEED change the run."""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
import time
from pathlib import Path

from luksvm import config, units
from luksvm.config import ConfigError
from luksvm.durations import parse_timespan

TREES = int(os.environ.get("LUKSVM_FUZZ_TREES", "10000"))
SEED = int(os.environ.get("LUKSVM_FUZZ_SEED", "20261206"))

NAMES = [
    "cr_a",
    "cr-b",
    "c.d",
    "-data",
    "--all",
    ".",
    "..",
    "x" * 127,
    "y" * 128,
    "=" * 100,
    "#h",
    "dätä",
    "a:b@c+d",
    "",
    "na me",
    "cr\u00a0x",
    "-",
    "a\\b",
]
SOURCES = [
    "/dev/vg/a",
    "/dev/../x",
    "/dev/" + "a" * 256,
    "/dev/./sda//x/",
    "UUID=ABCD-12",
    "UUID=0a1b2c3d-1111-2222-3333-444455556666",
    "LABEL=dätä",
    "LABEL=a/b",
    "LABEL='q'",
    'PARTLABEL="x"',
    "LABEL=",
    "PARTUUID=",
    "ID=x",
    "relative",
    "/dev/" + "/".join(["c" * 200] * 3),
    "LABEL=a\ufdd0b",
    "LABEL=\\x20",
    "/dev/a%b",
    "/dev/a\x01b",
    "/dev/a\u2028b",
    "/" * 5000,
]
KEYS = [
    "-",
    "none",
    "/etc/luksvm/keys/a.key",
    "keys/a.key",
    "keyring:luksvm/a",
    "keyring:",
    "keyring:x",
    "keyfile:LABEL=keydev",
    "/k/a.key:/dev/sdb1",
    "/k/a:b",
    "/etc/../k",
    "/k/" + "k" * 300,
    "/dev/urandom",
    "keyfile",
    "/k/\x7f",
]
OPTIONS = [
    "luks",
    "discard",
    "discard=yes",
    "noauto",
    "nofail",
    "noauto=no",
    "_netdev",
    "headless",
    "headless=maybe",
    "headless=false",
    "tries=1",
    "tries=abc",
    "tries=99999999999",
    "tries=-1",
    "x-systemd.device-timeout=2min",
    "x-systemd.device-timeout=abc",
    "x-systemd.device-timeout=99999999999999999999d",
    "x-systemd.device-timeout=infinity",
    "x-systemd.device-timeout=0",
    "keyfile-timeout=5s",
    "timeout=0",
    "timeout=5parsecs",
    "tpm2-device=auto",
    "tpm2-pcrs=7+11",
    "tpm2-pcrs=7+99",
    "fido2-device=auto",
    "pkcs11-uri=auto",
    "pkcs11-uri=x",
    "sector-size=4096",
    "sector-size=1000",
    "size=256",
    "size=250",
    "cipher=",
    "cipher=aes-xts-plain64",
    "keyslot=1",
    "key-slot=x",
    "keyfile-offset=18446744073709551616",
    "header=/h",
    "auto",
    "fail",
    "plain",
    "tcrypt-veracrypt",
    "keyscript=/x",
    "initramfs",
    "x-luksvm.guest=mail",
    "x-luksvm.guest=-g",
    "x-luksvm.guest=",
    "x-luksvm.guest=web",
    "x-luksvm.gust=x",
    "x-luksvm.guest=" + "g" * 250,
    "x-luksvm.guest=dätä",
    "",
    "fixate-volume-key=ab",
    "link-volume-key=@u::k",
    "link-volume-key=x",
    "a\\,b",
    "unknown",
    "tpm2-signature=rel",
    "password-echo=masked",
    "password-cache=read-only",
]
SEPARATORS = [" ", "\t", "  ", " \t ", "\f", "\v", "\u00a0", "\u2028", "\u3000"]
ENDINGS = ["\n", "\r\n", "\r", "\n\r", "\0", "\u2028", "\f\n", ""]
SECTIONS = [
    "libvirt",
    "guests",
    "backup",
    "keys",
    "guest:mail",
    "guest:-x",
    "guest:",
    "nope",
    "guest:web",
]
SETTINGS = {
    "uri": ["qemu:///system", "nope", "", "qemu:///system # comment"],
    "stop_timeout": [
        "2min",
        "99999999999999999999d",
        "213503982d 8h",
        "584000y",
        "abc",
        "0",
        "infinity",
    ],
    "on_timeout": ["destroy", "managedsave", "fail", "explode", "fail ; x"],
    "start_delay": ["0s", "1h 30min", "-1s", "1.5s   # inline"],
    "order": ["1", "-3", "x", "99999999999999999999"],
    "dir": ["/var/lib/luksvm/header-backups", "rel", "/a/../b", "/b/" + "d" * 300, "/x\x01", "/"],
    "keep": ["5", "0", "x"],
    "max_age": ["30d", "forever"],
    "keyring_backend": ["", "keyrings.alt.file.PlaintextKeyring", "not a class"],
    "bogus": ["1"],
}


def _accepted(template: str, pieces: list[str]) -> list[str]:
    return [p for p in pieces if not config.parse_crypttab(template.format(p) + "\n", "f")[1]]


# Half the lines are built only from pieces luksvm accepts, so that many trees load and render.
VALID = {
    "names": _accepted("{} /dev/vg/a", NAMES),
    "sources": _accepted("a {}", SOURCES),
    "keys": _accepted("a /dev/vg/a {}", KEYS),
    "options": _accepted("a /dev/vg/a - {}", OPTIONS),
}


def pick(rng: random.Random, valid: bool, kind: str, every: list[str]) -> str:
    return rng.choice(VALID[kind] if valid else every)


def crypttab_text(rng: random.Random, valid: bool) -> str:
    """Fragment text; with valid=True only pieces luksvm accepts, joined as it accepts them."""
    lines = []
    for _ in range(rng.randint(0, 6)):
        if rng.random() < 0.1:
            lines.append(rng.choice(["# comment", "", "   ", "\t#x"] + ([] if valid else ["\v"])))
            continue
        unique = rng.randrange(10**9)  # names and sources once across the tree
        fields = [pick(rng, valid, "names", NAMES)[:100] + f"{unique}"]
        fields.append(pick(rng, valid, "sources", SOURCES)[:3000] + f"{unique}")
        if rng.random() < 0.8:
            fields.append(pick(rng, valid, "keys", KEYS))
            if rng.random() < 0.8:
                fields.append(
                    ",".join(pick(rng, valid, "options", OPTIONS) for _ in range(rng.randint(1, 5)))
                )
                if not valid and rng.random() < 0.05:
                    fields.append("extra")
        if not valid and rng.random() < 0.02:
            fields[rng.randrange(len(fields))] += "\0"
        if not valid and rng.random() < 0.01:
            fields[-1] += "x" * rng.choice([300, 70_000, 1_100_000])
        separators = SEPARATORS[:6] if valid else SEPARATORS
        line = rng.choice(separators).join(fields) if rng.random() < 0.3 else " ".join(fields)
        lines.append(rng.choice(["", " ", "\t"]) + line)
    endings = ENDINGS[:4] if valid else ENDINGS
    return "".join(line + rng.choice(endings) for line in lines)


VALID_SETTINGS = {
    key: [v for v in values if not config.parse_settings(f"[guests]\n{key} = {v}\n", "f")[1]]
    for key, values in SETTINGS.items()
    if key in ("stop_timeout", "on_timeout", "start_delay")
}


def settings_text(rng: random.Random, valid: bool) -> str:
    lines = []
    if valid:
        lines.append("[guests]")
        for key, values in VALID_SETTINGS.items():
            if rng.random() < 0.7:
                lines.append(f"{key} = {rng.choice(values)}")
        return "".join(line + rng.choice(["\n", "\r\n"]) for line in lines)
    for _ in range(rng.randint(0, 8)):
        roll = rng.random()
        if roll < 0.25:
            lines.append(f"[{rng.choice(SECTIONS)}]" + rng.choice(["", "  # c", " ]"]))
        elif roll < 0.3:
            lines.append(rng.choice(["# c", "; c", "garbage", "= x", "[unclosed", "  "]))
        else:
            key = rng.choice(list(SETTINGS))
            lines.append(f"{key}{rng.choice([' = ', '=', ' =  '])}{rng.choice(SETTINGS[key])}")
    return "".join(line + rng.choice(["\n", "\n", "\r\n", "\0", "\u2028"]) for line in lines)


def encode(text: str, rng: random.Random, valid: bool) -> bytes:
    roll = 1.0 if valid else rng.random()
    if roll < 0.03:
        return text.encode("utf-16")
    if roll < 0.06:
        return text.encode("latin-1", errors="replace")
    if roll < 0.08:
        return b"\xff\xfe" + text.encode()
    return text.encode()


def write_file(path: Path, data: bytes, rng: random.Random, valid: bool) -> None:
    roll = 1.0 if valid else rng.random()
    if roll < 0.02:
        os.mkfifo(path)
    elif roll < 0.04:
        path.mkdir()
    elif roll < 0.06:
        path.symlink_to(path)  # a loop
    elif roll < 0.08:
        path.symlink_to(path.parent / "missing")
    else:
        path.write_bytes(data)


def make_tree(root: Path, rng: random.Random) -> None:
    etc = root / "etc/luksvm"
    etc.mkdir(parents=True)
    directory = etc / "crypttab.d"
    valid = rng.random() < 0.4  # a tree built to load: everything in it is accepted
    roll = 1.0 if valid else rng.random()
    if roll < 0.02:
        directory.write_text("a /dev/vg/a\n")
    elif roll < 0.04:
        directory.symlink_to(directory)
    else:
        directory.mkdir()
        for index in range(rng.randint(0, 3)):
            name = f"{index}{rng.choice(['.conf', '.conf', '.txt', '.conf.example'])}"
            text = crypttab_text(rng, valid)
            write_file(directory / name, encode(text, rng, valid), rng, valid)
    if rng.random() < 0.7:
        text = settings_text(rng, valid)
        write_file(etc / "luksvm.conf", encode(text, rng, valid), rng, valid)


LOCATED = re.compile(r"^.+:\d+:\d+: \S")
TIMEOUT = re.compile(r"^(?:Timeout\w*Sec|JobRunningTimeoutSec)=(.*)$", re.M)


def check_tree(root: Path) -> str:
    """'loaded', 'refused': anything else raises."""
    _, problems = config.read(str(root))
    for problem in problems:
        assert problem.where.path and problem.where.line >= 1, problem
        assert LOCATED.match(str(problem)), problem
        assert len(str(problem).splitlines()) == 1, problem  # cli prints one line per problem
    try:
        loaded = config.load(str(root))
    except ConfigError as error:
        assert problems and error.problems == tuple(problems)
        return "refused"
    assert not problems
    rendering = units.render(loaded, luksvm_path="/usr/bin/luksvm", template_dir="/t")
    for text in rendering.files.values():
        for value in TIMEOUT.findall(text):
            parse_timespan(value, infinity=True)
    for name in [*rendering.files, *rendering.links]:
        for part in name.split("/"):
            assert len(part) <= 255, part
    return "loaded"


def test_generated_trees_fail_only_with_located_config_errors_and_load_only_what_renders(
    tmp_path: Path,
) -> None:
    rng = random.Random(SEED)
    outcomes = {"loaded": 0, "refused": 0}
    started = time.monotonic()
    # The trees live in memory when the machine has a tmpfs: the test is about parsing, not disks.
    shm = "/dev/shm"
    base = Path(tempfile.mkdtemp(dir=shm)) if os.access(shm, os.W_OK) else tmp_path
    try:
        for index in range(TREES):
            root = base / str(index)
            make_tree(root, rng)
            try:
                outcomes[check_tree(root)] += 1
            except Exception as error:
                where = f"tree {index} (seed {SEED})"
                raise AssertionError(f"{where}: {error!r}") from error
            shutil.rmtree(root)
    finally:
        if base != tmp_path:
            shutil.rmtree(base, ignore_errors=True)
    elapsed = time.monotonic() - started
    print(f"fuzz: {TREES} trees, {outcomes}, {elapsed:.1f} s")
    # Both outcomes must be common, or the generator has stopped exploring one side.
    assert outcomes["loaded"] > TREES // 4 and outcomes["refused"] > TREES // 2, outcomes
