"""luksvm reads crypttab lines as systemd's own generator does (issue 15).

systemd-cryptsetup-generator runs here over a corpus of lines (SYSTEMD_CRYPTTAB=FILE), and what it
writes — the fields it passes to `systemd-cryptsetup attach`, the device unit it binds to, the
keyfile it waits for, the device timeout, which volumes start at boot, the lines it refuses — is
held against luksvm's reading of the same file. The deliberate differences are listed in
luksvm-crypttab(5) ("DIFFERENCES FROM CRYPTTAB"); the test names each where it skips one.
"""

from __future__ import annotations

import os
import random
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from luksvm import config, units, unlock
from luksvm.config import parse_crypttab
from luksvm.durations import parse_timespan

GENERATOR = "/lib/systemd/system-generators/systemd-cryptsetup-generator"
if not os.path.exists(GENERATOR):
    GENERATOR = "/usr/lib/systemd/system-generators/systemd-cryptsetup-generator"

pytestmark = pytest.mark.skipif(
    not os.path.exists(GENERATOR), reason="systemd-cryptsetup-generator is not installed"
)

SOURCES = [
    "/dev/vg/lv{i}",
    "/dev/disk/by-id/nvme-SSD_980_1TB-part{i}",
    "/dev/./vg//lv{i}/",
    "UUID=0a1b2c3d-1111-2222-3333-44445555{i:04d}",
    "UUID=ABCD-{i:04d}",
    "PARTUUID=Ab{i}",
    "LABEL=dätä{i}",
    "LABEL=a/b{i}",
    "LABEL=x\\y{i}",
    "LABEL='q{i}'",
    'PARTLABEL="p{i}"',
    "LABEL=x\u00a0y{i}",
    "LABEL=a\ufdd0b{i}",
    "LABEL=日本{i}",
    "PARTLABEL=a:b=c@d+e#{i}",
    "/dev/mapper/vg-lv{i}",
]
KEYS = ["", "-", "none", "/etc/luksvm/keys/k{i}.key", "/k/a:b{i}", "/etc/luksvm/keys/a b{i}"]
OPTIONS = [
    "luks",
    "discard",
    "allow-discards",
    "noauto",
    "nofail",
    "_netdev",
    "headless",
    "headless=false",
    "tries=0",
    "tries=3",
    "keyfile-offset=4096",
    "keyfile-size=64",
    "x-systemd.device-timeout=90s",
    "x-systemd.device-timeout=0",
    "x-systemd.device-timeout=1min 30s".replace(" ", ""),
    "timeout=30s",
    "tpm2-device=auto",
    "tpm2-pcrs=7+11",
    "fido2-device=auto",
    "read-only",
    "sector-size=4096",
    "x-luksvm.guest=g{i}",
]
SEPARATORS = [" ", "\t", "  \t", "\f", "\v"]
ENDINGS = ["\n", "\r\n", "\r", "\n\r"]


def corpus(count: int, seed: int = 15) -> str:
    """`count` distinct crypttab lines luksvm accepts, with comments and odd separators."""
    rng = random.Random(seed)
    lines = ["# a comment", "   # an indented comment", ""]
    for i in range(count):
        fields = [f"cr_{i}", rng.choice(SOURCES).format(i=i)]
        key = rng.choice(KEYS).format(i=i)
        options = ",".join(rng.sample(OPTIONS, rng.randint(0, 4))).format(i=i)
        if " " in key:
            key = key.replace(" ", "_")
        if key or options:
            fields.append(key or "-")
        if options:
            fields.append(options)
        lines.append(rng.choice(["", " ", "\t"]) + rng.choice(SEPARATORS).join(fields))
    return "".join(line + rng.choice(ENDINGS) for line in lines)


def run_generator(crypttab: Path, out: Path) -> str:
    out.mkdir()
    proc = subprocess.run(
        [GENERATOR, str(out), str(out), str(out)],
        env={
            **os.environ,
            "SYSTEMD_CRYPTTAB": str(crypttab),
            "SYSTEMD_PROC_CMDLINE": "",
            "SYSTEMD_LOG_LEVEL": "info",
            "RUNTIME_DIRECTORY": str(out / "run"),
        },
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def generated(out: Path) -> dict[str, dict[str, object]]:
    """Per volume: the attach arguments, BindsTo=, RequiresMountsFor=, and whether boot wants it."""
    wanted = set()
    for target in ("cryptsetup.target", "remote-cryptsetup.target"):
        for kind in ("requires", "wants"):
            folder = out / f"{target}.{kind}"
            if folder.is_dir():
                wanted |= {p.name for p in folder.iterdir()}
    found: dict[str, dict[str, object]] = {}
    for unit in out.glob("systemd-cryptsetup@*.service"):
        text = unit.read_text()
        (start,) = re.findall(r"^ExecStart=(.*)$", text, re.M)
        _, verb, name, device, key, options = shlex.split(start)
        assert verb == "attach"
        found[name] = {
            "device": device,
            "key": key,
            "options": options,
            "binds_to": re.findall(r"^BindsTo=(.*)$", text, re.M),
            "mounts_for": re.findall(r"^RequiresMountsFor=(.*)$", text, re.M),
            "at_boot": unit.name in wanted,
        }
    return found


def device_timeouts(out: Path) -> dict[str, int]:
    timeouts = {}
    for dropin in out.glob("*.device.d/*device-timeout.conf"):
        # difference 4: the generator's JobTimeoutSec=0 for /dev/mapper/NAME of volumes with a
        # key is not luksvm's (nothing waits on that device unit, DESIGN "Traps")
        for value in re.findall(r"^JobRunningTimeoutSec=(.*)$", dropin.read_text(), re.M):
            timeouts[dropin.parent.name[: -len(".d")]] = parse_timespan(value, infinity=True)
    return timeouts


def test_luksvm_reads_every_line_as_systemds_generator(tmp_path: Path) -> None:
    text = corpus(400)
    root = tmp_path / "root"
    directory = root / "etc/luksvm/crypttab.d"
    directory.mkdir(parents=True)
    fragment = directory / "10-corpus.conf"
    fragment.write_text(text)
    stderr = run_generator(fragment, tmp_path / "out")
    assert "Failed" not in stderr, stderr
    theirs = generated(tmp_path / "out")
    cfg = config.load(str(root))
    assert {v.name for v in cfg.volumes} == set(theirs) and len(theirs) == 400
    rendering = units.render(cfg, luksvm_path="/usr/bin/luksvm", template_dir="/t")
    ours_timeouts = {}
    for volume in cfg.volumes:
        them = theirs[volume.name]
        # fields: the device path as the generator passes it, byte for byte
        assert volume.device == them["device"], volume
        # the device unit the unlock unit binds to
        dropin = rendering.files[f"{units.unlock_unit(volume.name)}.d/{units.DROPIN}"]
        assert re.findall(r"^BindsTo=(.*)$", dropin, re.M) == them["binds_to"], volume
        # the key: a keyfile path as is; every "ask" spelling means ask to both
        if volume.key.kind == "file":
            assert them["key"] == volume.key.path
            assert them["mounts_for"] == [volume.key.path]
            assert f"RequiresMountsFor={units.unit_word(volume.key.path)}" in dropin
        else:
            assert them["key"] in ("", "-", "none") and them["mounts_for"] == []
        # options: what systemd-cryptsetup gets from the generator, luksvm passes on too;
        # difference 1: luksvm drops its own x-luksvm.* and the generator-only options
        passed = [o for o in str(them["options"]).split(",") if o]
        kept = [
            o
            for o in passed
            if not o.startswith(config.LUKSVM_PREFIX)
            and o.partition("=")[0] not in unlock.NOT_FOR_ATTACH
        ]
        attach = list(unlock.attach_options(volume))
        assert [o for o in attach if o in kept or o not in _ADDED] == kept, (volume, attach)
        # boot: what the generator starts at boot, luksvm.target wants
        wanted = f"{units.TARGET}.wants/{units.unlock_unit(volume.name)}" in rendering.links
        assert wanted == them["at_boot"], volume
        timeout = volume.option("x-systemd.device-timeout")
        if timeout is not None:
            ours_timeouts[units.device_unit(volume.device)] = parse_timespan(timeout, infinity=True)
    # the device timeouts: same device units; difference 2: "0" means no timeout to both
    theirs_timeouts = device_timeouts(tmp_path / "out")
    assert set(ours_timeouts) == set(theirs_timeouts)
    for unit, usec in ours_timeouts.items():
        assert usec == theirs_timeouts[unit] or (usec == 0 and theirs_timeouts[unit] == 0)
        dropin = rendering.files[f"{unit}.d/{units.DROPIN}"]
        (value,) = re.findall(r"^JobRunningTimeoutSec=(.*)$", dropin, re.M)
        assert parse_timespan(value, infinity=True) in (usec, 2**64 - 1)


# What luksvm adds to the options of keyfile/keyring volumes (README "Keys"): never a prompt.
_ADDED = {"luks", "headless=true", "tries=1"}


def test_lines_the_generator_refuses_luksvm_refuses_at_the_same_line(tmp_path: Path) -> None:
    text = (
        "ok1 /dev/vg/a\n"
        "lonely\r\n"
        "ok2\f/dev/vg/b\n"
        "\v\n"  # a line of only \v: not stripped, no field
        "ok3 /dev/vg/c\r"
        "alone\u00a0word\n"  # NBSP does not separate
        "a\u2028b /dev/vg/d\n"  # U+2028 ends no line
        "z\n"
    )
    crypttab = tmp_path / "crypttab"
    crypttab.write_text(text)
    stderr = run_generator(crypttab, tmp_path / "out")
    theirs = sorted(int(n) for n in re.findall(r"Failed to parse \S+:(\d+)", stderr))
    _, problems = parse_crypttab(text, "f")
    ours = sorted(p.where.line for p in problems if "field" in p.message)
    assert theirs == ours == [2, 4, 6, 8]


def test_a_dotdot_source_stops_the_generator_and_luksvm_refuses_it(tmp_path: Path) -> None:
    crypttab = tmp_path / "crypttab"
    crypttab.write_text("a /dev/../x\nb /dev/vg/b\n")
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run(
        [GENERATOR, str(out), str(out), str(out)],
        env={**os.environ, "SYSTEMD_CRYPTTAB": str(crypttab), "SYSTEMD_PROC_CMDLINE": ""},
        capture_output=True,
        text=True,
        check=False,
    )
    assert "Failed to generate unit name" in proc.stderr
    assert not list(out.glob("systemd-cryptsetup@b.service"))  # it gave up on the whole file
    _, problems = parse_crypttab(crypttab.read_text(), "f")
    assert [(p.where.line, p.where.column) for p in problems] == [(1, 3)]
