"""The manuals, the completion table and the example configuration follow the code: every command
argparse knows, every setting of config.SETTINGS, every x-luksvm option (tools/gendocs.py)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from luksvm import __version__, config
from luksvm.cli import build_parser
from tools import gendocs

REPO = Path(__file__).resolve().parents[2]


def real_manual() -> str:
    try:
        return gendocs.manual_luksvm()
    except gendocs.DocError as error:
        pytest.fail(str(error))


def leaf_commands() -> list[gendocs.Command]:
    return gendocs.leaf_commands(gendocs.walk(build_parser()))


def toy_parser(*extra: str) -> argparse.ArgumentParser:
    """A parser shaped like luksvm's, with the extra top-level commands named."""
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name in extra:
        sub = commands.add_parser(name, help=f"{name} things")
        sub.add_argument("volume", metavar="VOLUME", nargs="*")
        sub.add_argument("--policy", choices=["destroy", "fail"], help="what to do")
    return parser


def test_every_command_argparse_knows_has_a_manual_entry() -> None:
    manual = real_manual()
    for command in leaf_commands():
        assert f'.SS "{command.name}"' in manual, f"luksvm {command.name} missing from luksvm.8"


def test_every_option_of_every_command_is_in_the_manual() -> None:
    manual = real_manual()
    for command in [gendocs.walk(build_parser())[0], *leaf_commands()]:
        for argument in command.arguments:
            for flag in argument.flags:
                assert gendocs.roff(flag) in manual, f"{flag} of luksvm {command.name}"


def test_a_command_without_manual_entry_fails_naming_it() -> None:
    with pytest.raises(gendocs.DocError, match=r"`luksvm frobnicate` has no manual entry"):
        gendocs.manual_luksvm(toy_parser("frobnicate"))


def test_an_entry_for_a_command_argparse_does_not_know_fails() -> None:
    template = (REPO / "docs/luksvm.8.in").read_text() + '.SH X\n.\\" @command gone\nText.\n'
    with pytest.raises(gendocs.DocError, match=r"`luksvm gone`, a command argparse does not"):
        gendocs.manual_luksvm(template=template)


def test_an_entry_without_text_fails() -> None:
    template = (
        (REPO / "docs/luksvm.8.in")
        .read_text()
        .replace(
            '.\\" @command config check\n',
            '.\\" @command config check\n.\\" TODO\n.\\" @command x\n',
        )
    )
    with pytest.raises(gendocs.DocError, match=r"entry for `luksvm config check` has no text"):
        gendocs.manual_luksvm(template=template)


def test_pending_entries_appear_once_their_command_exists() -> None:
    template = (
        (REPO / "docs/luksvm.8.in")
        .read_text()
        .replace(".SH COMMANDS\n", '.SH COMMANDS\n.\\" @pending-command toy\nToy prose.\n')
    )
    assert "Toy prose." not in gendocs.manual_luksvm(template=template)
    manual = gendocs.manual_luksvm(toy_parser("toy"), template=template)
    section = manual.split('.SS "toy"', 1)[1].split(".SS", 1)[0]
    assert "Toy prose." in section
    assert "\\fB\\-\\-policy\\fR \\fI{destroy,fail}\\fR" in section
    synopsis = (
        "\\fBluksvm toy\\fR [\\fB\\-\\-policy\\fR \\fI{destroy,fail}\\fR] [\\fIVOLUME\\fR\\&...]"
    )
    assert synopsis in section


def test_exit_codes_are_the_ones_errors_defines() -> None:
    manual = real_manual()
    status = manual.split('.SH "EXIT STATUS"', 1)[1].split(".SH", 1)[0]
    assert re.findall(r"\\fB(\d+)\\fR", status) == ["0", "1", "2", "64", "130"]


def test_settings_manual_lists_every_setting_with_its_default() -> None:
    manual = gendocs.manual_settings()
    for spec in config.SETTINGS:
        section = manual.split(f'.SS "[{spec.section}]"', 1)[1].split(".SS", 1)[0]
        entry = section.split(f"\\fB{spec.key}\\fR", 1)[1].split(".TP", 1)[0]
        if spec.default:
            assert f"Default: {gendocs.roff(spec.default)}." in entry, spec
        else:
            assert "Default: " in entry, spec


def test_crypttab_manual_lists_every_luksvm_option() -> None:
    manual = gendocs.manual_crypttab()
    for name in config.LUKSVM_OPTIONS:
        written = config.LUKSVM_PREFIX + name + ("" if name in config.LUKSVM_FLAGS else "=")
        assert gendocs.roff(written) in manual
    for name in config.INITRAMFS_OPTIONS | config.GENERATOR_OPTIONS | config.TOKEN_OPTIONS:
        assert gendocs.roff(name) in manual


def test_no_placeholder_is_left_unfilled() -> None:
    for text in (real_manual(), gendocs.manual_crypttab(), gendocs.manual_settings()):
        assert re.search(r"@[A-Z_]+@", text) is None
        assert f"luksvm {__version__}" in text
    assert re.search(r"@[A-Z_]+@", gendocs.completion()) is None


def uncomment(text: str) -> str:
    """Every commented-out setting and section of the example switched on."""
    return re.sub(r"^#(\[|[a-z_]+ =)", r"\1", text, flags=re.M)


def test_example_settings_file_is_every_setting_at_its_default() -> None:
    text = gendocs.example_settings()
    settings, problems = config.parse_settings(text, "luksvm.conf")
    assert problems == [] and settings == config.Settings()
    switched_on, problems = config.parse_settings(uncomment(text), "luksvm.conf")
    assert problems == []
    assert switched_on.guest_overrides == (("mail", config.GuestPolicy()),)
    assert switched_on == config.Settings(guest_overrides=switched_on.guest_overrides)
    shown = set(re.findall(r"^#?\[(\w+)(?::\w+)?\]|^#(\w+) =", text, flags=re.M))
    keys = {key for _, key in shown if key}
    assert keys == {spec.key for spec in config.SETTINGS}


def test_example_fragments_parse_and_are_never_read(tmp_path: Path) -> None:
    examples = sorted((REPO / "crypttab.d").iterdir())
    assert examples and all(p.name.endswith(".conf.example") for p in examples)
    for example in examples:
        volumes, problems = config.parse_crypttab(example.read_text(), str(example))
        assert problems == []
        assert [v.name for v in volumes] == ["cr_imap_encr", "cr_web"]
        target = tmp_path / "etc/luksvm/crypttab.d"
        target.mkdir(parents=True, exist_ok=True)
        (target / example.name).write_text(example.read_text())
    assert config.load(str(tmp_path)).volumes == ()


def test_completion_table_has_every_command_and_option() -> None:
    script = gendocs.completion()
    for command in gendocs.walk(build_parser()):
        label = f"'{command.name}')" if " " in command.name else f"{command.name or chr(39) * 2})"
        assert f"    {label}\n" in script, command.name
        for argument in command.arguments:
            for flag in argument.flags:
                assert flag in script


def test_completion_kinds_follow_metavars() -> None:
    commands = {c.name: c for c in gendocs.walk(toy_parser("toy"))}
    volume, policy = (
        next(a for a in commands["toy"].arguments if a.positional),
        next(a for a in commands["toy"].arguments if a.flags == ("--policy",)),
    )
    assert gendocs.completion_kind(volume) == "volume"
    assert gendocs.completion_kind(policy) == "words:destroy fail"
    root = next(a for a in commands[""].arguments if a.flags == ("--root",))
    assert gendocs.completion_kind(root) == "dir"


def test_versions_agree() -> None:
    spec = (REPO / "packaging/luksvm.spec").read_text()
    pyproject = (REPO / "pyproject.toml").read_text()
    version = re.search(r"^Version:\s+(\S+)$", spec, re.M)
    assert version and version.group(1) == __version__
    assert f'version = "{__version__}"' in pyproject


def spec_units(name: str) -> list[str]:
    spec = (REPO / "packaging/luksvm.spec").read_text()
    match = re.search(rf"^%global {name} (.+)$", spec, re.M)
    assert match, name
    return match.group(1).split()


def test_scriptlet_units_are_the_timers_and_the_target_in_units_dir() -> None:
    timers, target = spec_units("luksvm_timers"), spec_units("luksvm_target")
    assert target == ["luksvm.target"]
    assert all(t.endswith(".timer") and "@" not in t for t in timers)
    for name in gendocs.unit_files():
        if name.endswith(".timer"):
            assert name in timers, (
                f"units/{name} is not in %luksvm_timers of packaging/luksvm.spec: add it, so that "
                "it is preset on install and restarted on upgrade"
            )
        if name.endswith(".target"):
            assert name in target, f"units/{name}: a second target; handle it in the spec"
