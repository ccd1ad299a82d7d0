"""The generated manuals render cleanly with the real man and groff; the generated bash completion
completes commands, options, volume and guest names (from the configuration files) in real bash."""

from __future__ import annotations

import argparse
import os
import subprocess
from pathlib import Path

import pytest

from luksvm.cli import build_parser
from tests.conftest import write_config
from tools import gendocs

PAGES = {
    "luksvm.8": gendocs.manual_luksvm,
    "luksvm-crypttab.5": gendocs.manual_crypttab,
    "luksvm.conf.5": gendocs.manual_settings,
}


def render(path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MANWIDTH": "80", "MANPAGER": "cat", "LC_ALL": "C.UTF-8"}
    return subprocess.run(
        ["man", "--warnings", "-E", "UTF-8", "-l", str(path)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=60,
    )


@pytest.mark.parametrize("name", sorted(PAGES))
def test_manual_renders_without_warnings(name: str, tmp_path: Path) -> None:
    page = tmp_path / name
    page.write_text(PAGES[name]())
    shown = render(page)
    assert shown.returncode == 0 and shown.stderr == "", shown.stderr
    groff = subprocess.run(
        ["groff", "-ww", "-man", "-Tutf8", "-z", str(page)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert groff.returncode == 0 and groff.stderr == "", groff.stderr


def test_rendered_manual_shows_every_command(tmp_path: Path) -> None:
    page = tmp_path / "luksvm.8"
    page.write_text(gendocs.manual_luksvm())
    text = render(page).stdout
    commands = text.split("\nCOMMANDS\n", 1)[1].split("\nEXIT STATUS\n", 1)[0]
    commands = " ".join(commands.split())  # man justifies lines: "luksvm  shrink  plan"
    for command in gendocs.leaf_commands(gendocs.walk(build_parser())):
        assert f"luksvm {command.name}" in commands, f"luksvm {command.name} not in luksvm(8)"


def toy_parser() -> argparse.ArgumentParser:
    """luksvm's parser plus commands with volume and guest arguments, whatever main has yet."""
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    unlock = commands.add_parser("unlock-toy", help="toy")
    unlock.add_argument("volume", metavar="VOLUME")
    unlock.add_argument("--no-start", action="store_true")
    group = commands.add_parser("guest-toy", help="toy")
    actions = group.add_subparsers(dest="action", metavar="ACTION")
    start = actions.add_parser("start", help="toy")
    start.add_argument("guests", metavar="GUEST", nargs="+")
    start.add_argument("--policy", choices=["destroy", "managedsave", "fail"])
    return parser


def complete(script: Path, line: str, cwd: Path) -> list[str]:
    """COMPREPLY of `luksvm` completion for the command line `line` (cursor at its end)."""
    driver = (
        f"source {script}\n"
        'read -ra COMP_WORDS <<<"$LINE"\n'
        '[[ $LINE == *" " ]] && COMP_WORDS+=("")\n'
        "COMP_CWORD=$((${#COMP_WORDS[@]} - 1))\n"
        "_luksvm\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    proc = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", driver],
        capture_output=True,
        text=True,
        env={"PATH": os.environ["PATH"], "LINE": line},
        cwd=cwd,
        check=True,
        timeout=30,
    )
    assert proc.stderr == ""
    return sorted(word for word in proc.stdout.split("\n") if word)


@pytest.fixture
def completion_root(tmp_path: Path) -> tuple[Path, Path]:
    root = write_config(
        tmp_path / "root",
        {
            "10-a.conf": "# name source key options\n"
            "cr_imap_encr /dev/vg/a - luks,x-luksvm.guest=mail\n"
            "cr_imap_hd1 /dev/vg/b - luks,discard,x-luksvm.guest=mail,x-luksvm.guest=mx\n",
            "20-b.conf": "cr_web /dev/vg/c\n",
            "30-c.conf.example": "cr_example /dev/vg/d - luks,x-luksvm.guest=example\n",
        },
    )
    script = tmp_path / "luksvm.bash"
    script.write_text(gendocs.completion(toy_parser()))
    (tmp_path / "rootdir-sibling").mkdir()
    return root, script


def test_completion_script_is_valid_bash(tmp_path: Path) -> None:
    script = tmp_path / "luksvm.bash"
    script.write_text(gendocs.completion())
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)


def test_completes_commands_and_their_actions(completion_root: tuple[Path, Path]) -> None:
    root, script = completion_root
    top = {c.words[0] for c in gendocs.walk(toy_parser()) if len(c.words) == 1}
    assert complete(script, "luksvm ", root) == sorted(top)
    assert complete(script, "luksvm con", root) == ["config"]
    assert complete(script, "luksvm -v config ", root) == ["check"]
    assert complete(script, "luksvm config check --", root) == ["--help", "--json"]
    assert "--root" in complete(script, "luksvm --", root)


def test_completes_volume_and_guest_names_from_the_config(
    completion_root: tuple[Path, Path],
) -> None:
    root, script = completion_root
    at = f"luksvm --root {root}"
    assert complete(script, f"{at} unlock-toy ", root) == ["cr_imap_encr", "cr_imap_hd1", "cr_web"]
    assert complete(script, f"{at} unlock-toy --no-start cr_i", root) == [
        "cr_imap_encr",
        "cr_imap_hd1",
    ]
    assert complete(script, f"{at} unlock-toy cr_web ", root) == []  # one VOLUME only
    assert complete(script, f"{at} guest-toy start ", root) == ["mail", "mx"]
    assert complete(script, f"{at} guest-toy start mail m", root) == ["mail", "mx"]  # GUEST...
    assert complete(script, f"{at} guest-toy start --policy ", root) == [
        "destroy",
        "fail",
        "managedsave",
    ]
    # Without --root the names come from /etc: none here (and never from libvirt).
    assert "cr_web" not in complete(script, "luksvm unlock-toy ", root)


def test_completes_directories_for_root(completion_root: tuple[Path, Path]) -> None:
    root, script = completion_root
    assert complete(script, "luksvm --root rootdir-", root.parent) == ["rootdir-sibling"]
