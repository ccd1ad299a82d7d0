"""Build-time documentation, generated so that it cannot drift from the code.

    python3 -m tools.gendocs OUTDIR     # in the source tree; `make docs` and the RPM build run it

writes into OUTDIR:

    luksvm.8            docs/luksvm.8.in + every command, option and exit code argparse knows
    luksvm-crypttab.5   docs/luksvm-crypttab.5.in + the option tables of luksvm/config.py
    luksvm.conf.5       docs/luksvm.conf.5.in + every setting of config.SETTINGS with its default
    luksvm.conf         the example /etc/luksvm/luksvm.conf: every setting commented at its default
    luksvm.bash         bash completion: packaging/luksvm.bash.in + the command table

Sources of truth: luksvm.cli.build_parser() for commands and options, luksvm.config.SETTINGS and
the option sets in luksvm.config for the configuration, units/ for the unit list. The prose of each
command is written by hand in docs/luksvm.8.in, after a line `.\\" @command WORDS`; a command
argparse knows without such a block is an error that names it, and so is a block for a command
argparse does not know (`.\\" @pending-command WORDS` marks prose written ahead of its command).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Callable

from luksvm import __version__, config, crypttab_options, errors
from luksvm.cli import build_parser

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(REPO, "docs")
UNITS = os.path.join(REPO, "units")
COMPLETION_TEMPLATE = os.path.join(REPO, "packaging", "luksvm.bash.in")
UNIT_SUFFIXES = (".service", ".socket", ".target", ".timer", ".path", ".mount")

# Exit codes of every luksvm command (values from luksvm/errors.py; 130 from cli.main).
EXIT_CODES = (
    (errors.EXIT_OK, "success"),
    (errors.EXIT_WARN, "completed with warnings (doctor found something to look at)"),
    (errors.EXIT_FAIL, "failure: what failed and why is on standard error and in the journal"),
    (
        errors.EXIT_USAGE,
        "usage or configuration error (EX_USAGE): nothing was changed; every problem is named "
        "with FILE:LINE:COLUMN",
    ),
    (130, "interrupted (Ctrl-C)"),
)

# What bash completes for an argument, by its metavar (anything else: nothing).
COMPLETION_KINDS = {
    "VOLUME": "volume",
    "VOLUMES": "volume",
    "NAME": "volume",
    "MAPPING": "volume",
    "GUEST": "guest",
    "GUESTS": "guest",
    "DIR": "dir",
    "DIRECTORY": "dir",
    "FILE": "file",
    "PATH": "file",
    "DEV": "file",
    "DEVICE": "file",
}


class DocError(Exception):
    """The documentation sources and the code disagree; the message says where and what to do."""


# --- the command line as data -------------------------------------------------------------------


@dataclass(frozen=True)
class Argument:
    flags: tuple[str, ...]  # empty for a positional
    metavar: str  # "" for an option that takes no value
    help: str
    nargs: str  # "" (one), "?", "*", "+" or a count
    required: bool
    choices: tuple[str, ...]

    @property
    def positional(self) -> bool:
        return not self.flags


@dataclass(frozen=True)
class Command:
    words: tuple[str, ...]  # () for luksvm itself, ("config", "check") for `luksvm config check`
    help: str
    description: str
    arguments: tuple[Argument, ...]
    children: tuple[str, ...]  # subcommands; empty for a command that runs something

    @property
    def name(self) -> str:
        return " ".join(self.words)


def _help_text(action: argparse.Action) -> str:
    text = action.help or ""
    if "%(" in text:
        text = text % {**vars(action), "prog": "luksvm"}
    return " ".join(text.split())


def _argument(action: argparse.Action) -> Argument:
    takes_value = action.nargs != 0
    metavar: str = ""
    if takes_value:
        if isinstance(action.metavar, tuple):
            metavar = " ".join(action.metavar)
        elif action.metavar:
            metavar = action.metavar
        elif action.choices:
            metavar = "{" + ",".join(str(c) for c in action.choices) + "}"
        else:
            metavar = action.dest.upper()
    nargs = "" if action.nargs is None or not takes_value else str(action.nargs)
    choices = tuple(str(c) for c in action.choices) if action.choices else ()
    return Argument(
        flags=tuple(action.option_strings),
        metavar=metavar,
        help=_help_text(action),
        nargs=nargs,
        required=bool(action.required) or not action.option_strings,
        choices=choices,
    )


def walk(parser: argparse.ArgumentParser) -> list[Command]:
    """Every command in definition order, groups (like `config`) included, luksvm itself first."""
    found: list[Command] = []

    def visit(parser: argparse.ArgumentParser, words: tuple[str, ...], help: str) -> None:
        arguments: list[Argument] = []
        children: list[tuple[str, argparse.ArgumentParser, str]] = []
        for action in parser._actions:  # argparse has no public way to list them
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
                continue
            if isinstance(action, argparse._SubParsersAction):
                helps = {a.dest: _help_text(a) for a in action._choices_actions}
                seen: set[int] = set()
                for name, child in action.choices.items():
                    if id(child) not in seen:  # aliases share the parser: document it once
                        seen.add(id(child))
                        children.append((name, child, helps.get(name, "")))
                continue
            arguments.append(_argument(action))
        description = " ".join((parser.description or "").split())
        found.append(
            Command(words, help, description, tuple(arguments), tuple(c[0] for c in children))
        )
        for name, child, child_help in children:
            visit(child, (*words, name), child_help)

    visit(parser, (), "")
    return found


def leaf_commands(commands: Iterable[Command]) -> list[Command]:
    return [c for c in commands if c.words and not c.children]


# --- roff ---------------------------------------------------------------------------------------


def roff(text: str) -> str:
    """Plain text as roff: backslashes and minus signs escaped, no line starting a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line[:1] in (".", "'") else line for line in text.split("\n"))


def _bold(text: str) -> str:
    return "\\fB" + roff(text) + "\\fR"


def _italic(text: str) -> str:
    return "\\fI" + roff(text) + "\\fR"


def _usage_item(argument: Argument) -> str:
    if argument.positional:
        item = _italic(argument.metavar)
        if argument.nargs in ("*", "+"):
            item += "\\&..."
        return f"[{item}]" if argument.nargs in ("?", "*") else item
    item = _bold(argument.flags[-1])
    if argument.metavar:
        item += " " + _italic(argument.metavar)
    return item if argument.required else f"[{item}]"


def synopsis(command: Command) -> str:
    """`luksvm WORDS [OPTIONS] ARGS` as roff, options first as argparse prints them."""
    parts = [_bold(" ".join(("luksvm", *command.words)))]
    options = [a for a in command.arguments if not a.positional]
    positionals = [a for a in command.arguments if a.positional]
    parts += [_usage_item(a) for a in options] + [_usage_item(a) for a in positionals]
    if command.children:
        parts.append(_italic("COMMAND" if not command.words else "ACTION"))
    return " ".join(parts)


# What a positional argument without help text is, by its completion kind.
KIND_HELP = {
    "volume": "a volume: its mapping name in /etc/luksvm/crypttab.d",
    "guest": "a guest: a libvirt domain named by x-luksvm.guest= of a volume",
}


def _argument_list(arguments: Sequence[Argument]) -> list[str]:
    lines: list[str] = []
    for argument in arguments:
        if argument.positional:
            text = argument.help or KIND_HELP.get(completion_kind(argument), "")
            if text:  # else the synopsis shows it and there is nothing more to say
                lines += [".TP", _italic(argument.metavar), roff(text)]
            continue
        head = ", ".join(_bold(flag) for flag in argument.flags)
        if argument.metavar:
            head += " " + _italic(argument.metavar)
        lines += [".TP", head, roff(argument.help or "(no description)")]
    return lines


def _subcommand_words(commands: Iterable[Command]) -> dict[str, Command]:
    return {c.name: c for c in commands}


# --- luksvm(8) ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prose:
    words: str
    lines: tuple[str, ...]
    pending: bool
    line: int  # in docs/luksvm.8.in, for messages


_MARKER = re.compile(r'^\.\\"\s*@(command|pending-command)\s+(\S.*?)\s*$')


def read_prose(template: str, path: str) -> tuple[list[str], dict[str, Prose]]:
    """Split luksvm.8.in into its frame (marker lines replaced by @COMMAND:WORDS@) and the prose
    block after each marker (up to the next marker or section heading)."""
    frame: list[str] = []
    blocks: dict[str, Prose] = {}
    current: list[str] | None = None
    head: tuple[str, bool, int] = ("", False, 0)

    def close() -> None:
        if current is not None:
            words, pending, line = head
            while current and not current[-1].strip():
                current.pop()
            blocks[words] = Prose(words, tuple(current), pending, line)

    for number, line in enumerate(template.split("\n"), start=1):
        match = _MARKER.match(line)
        if match:
            close()
            words = " ".join(match.group(2).split())
            if words in blocks:
                raise DocError(f"{path}:{number}: a second manual entry for `luksvm {words}`")
            head = (words, match.group(1) == "pending-command", number)
            current = []
            frame.append(f"@COMMAND:{words}@")
        elif line.startswith(".SH") and current is not None:
            close()
            current = None
            frame.append(line)
        elif current is not None:
            current.append(line)
        else:
            frame.append(line)
    close()
    return frame, blocks


def _has_text(lines: Iterable[str]) -> bool:
    return any(line.strip() and not line.startswith('.\\"') for line in lines)


def check_manual_entries(commands: Sequence[Command], blocks: dict[str, Prose], path: str) -> None:
    """Every command has hand-written prose; no prose describes a command that does not exist."""
    problems: list[str] = []
    known = {c.name for c in leaf_commands(commands)}
    for command in leaf_commands(commands):
        block = blocks.get(command.name)
        if block is None:
            problems.append(
                f"command `luksvm {command.name}` has no manual entry: add a line "
                f'`.\\" @command {command.name}` and a paragraph on what it does to {path} '
                "(COMMANDS section)"
            )
        elif not _has_text(block.lines):
            problems.append(
                f"{path}:{block.line}: the manual entry for `luksvm {command.name}` has no text"
            )
    for words, block in blocks.items():
        if words not in known and not block.pending:
            problems.append(
                f"{path}:{block.line}: manual entry for `luksvm {words}`, a command argparse does "
                "not know (luksvm/cli.py build_parser()); remove or rename it"
            )
    if problems:
        raise DocError("\n".join(problems))


def _command_entry(command: Command, prose: Prose) -> list[str]:
    lines = [f'.SS "{" ".join(command.words)}"', synopsis(command), ".PP"]
    lines.append(roff(_sentence(command.help)) if command.help else "")
    if command.description and command.description != command.help:
        lines += [".PP", roff(command.description)]
    lines += [".PP", *prose.lines]
    described = _argument_list(command.arguments)
    if described:
        lines += [".PP", ".RS 4", *described, ".RE"]
    return [line for line in lines if line != ""]


def _sentence(text: str) -> str:
    text = text.strip()
    if not text:
        return text
    return text[0].upper() + text[1:] + ("" if text.endswith((".", "!", "?")) else ".")


def _units_list() -> list[str]:
    names = unit_files()
    if not names:
        return ["(This build installs no unit files.)"]
    lines: list[str] = []
    for name in names:
        description = ""
        with open(os.path.join(UNITS, name), encoding="utf-8") as f:
            for line in f:
                if line.startswith("Description="):
                    description = line.split("=", 1)[1].strip()
                    break
        lines += [".TP", _bold(name), roff(description.replace("%I", "INSTANCE"))]
    return lines


def unit_files() -> list[str]:
    """The unit files in units/ that the package installs, sorted."""
    try:
        names = os.listdir(UNITS)
    except FileNotFoundError:
        return []
    return sorted(
        n for n in names if n.endswith(UNIT_SUFFIXES) and os.path.isfile(os.path.join(UNITS, n))
    )


def manual_luksvm(
    parser: argparse.ArgumentParser | None = None, template: str | None = None
) -> str:
    """luksvm(8) from docs/luksvm.8.in (or `template`) and build_parser() (or `parser`)."""
    path = os.path.join(DOCS, "luksvm.8.in")
    if template is None:
        with open(path, encoding="utf-8") as f:
            template = f.read()
    frame, blocks = read_prose(template, os.path.relpath(path, REPO))
    commands = walk(parser or build_parser())
    check_manual_entries(commands, blocks, os.path.relpath(path, REPO))
    top = commands[0]
    by_name = _subcommand_words(commands)
    generated = {
        "SYNOPSIS": [
            line for command in leaf_commands(commands) for line in (synopsis(command), ".br")
        ][:-1],
        "GLOBAL_OPTIONS": _argument_list(top.arguments),
        "EXIT_STATUS": [
            line for code, text in EXIT_CODES for line in (".TP", _bold(str(code)), roff(text))
        ],
        "UNITS": _units_list(),
    }
    out: list[str] = []
    for line in frame:
        if line.startswith("@COMMAND:"):
            words = line[len("@COMMAND:") : -1]
            if words in by_name:
                out += _command_entry(by_name[words], blocks[words])
            continue
        out += _expand(line, generated, path)
    return _finish(out, "docs/luksvm.8.in")


def _expand(line: str, generated: dict[str, list[str]], path: str) -> list[str]:
    """A line that is only @NAME@ becomes the generated lines; @NAME@ inside a line becomes its
    one generated line."""
    if line.startswith('.\\"'):
        return [line]  # a comment: may talk about placeholders
    values = {"VERSION": [__version__], **generated}
    whole = re.fullmatch(r"@([A-Z_]+)@", line.strip())
    if whole and whole.group(1) in values:
        return values[whole.group(1)]

    def inline(match: re.Match[str]) -> str:
        lines = values.get(match.group(1))
        if lines is None or len(lines) != 1:
            raise DocError(f"{os.path.relpath(path, REPO)}: cannot fill in {match.group()} here")
        return lines[0]

    return [re.sub(r"@([A-Z_]+)@", inline, line)]


def _finish(lines: list[str], source: str) -> str:
    """The page with the source's leading comment (about how it is filled in) replaced by a note
    that it is generated."""
    while lines and lines[0].startswith('.\\"'):
        lines = lines[1:]
    note = f'.\\" Generated by tools/gendocs from {source}; edit that file, not this one.'
    return "\n".join([note, *lines]).rstrip("\n") + "\n"


# --- luksvm-crypttab(5) and luksvm.conf(5) -------------------------------------------------------


def _word_list(names: Iterable[str]) -> str:
    return roff(", ".join(sorted(names)))


def manual_crypttab() -> str:
    path = os.path.join(DOCS, "luksvm-crypttab.5.in")
    generated = {
        "LUKSVM_OPTIONS": [
            line
            for name, text in config.LUKSVM_OPTIONS.items()
            for line in (
                ".TP",
                _bold(f"{config.LUKSVM_PREFIX}{name}=") + _italic(name.upper()),
                roff(_sentence(text)),
            )
        ],
        "STANDARD_OPTIONS": [_word_list(config.STANDARD_OPTIONS - config.GENERATOR_OPTIONS)],
        "GENERATOR_OPTIONS": [_word_list(config.GENERATOR_OPTIONS)],
        "REFUSED_OPTIONS": [_word_list(config.INITRAMFS_OPTIONS | config.NOT_LUKS_OPTIONS)],
        "TOKEN_OPTIONS": [_word_list(config.TOKEN_OPTIONS)],
        "OPTION_VERSIONS": [
            roff(
                ", ".join(
                    f"{spec.name} ({spec.since})"
                    for spec in sorted(
                        crypttab_options.OPTIONS.values(), key=lambda o: (o.since, o.name)
                    )
                    if spec.since
                )
            )
        ],
        "UNSUPPORTED_OPTIONS": [
            "; ".join(
                _bold(name + ("=" if name == "header" else "")) + ": " + roff(why)
                for name, why in sorted(crypttab_options.NOT_SUPPORTED.items())
                if name not in config.NOT_LUKS_OPTIONS
            )
            + "."
        ],
        "SOURCE_TAGS": [_word_list(t + "=" for t in config.SOURCE_TAGS)],
    }
    with open(path, encoding="utf-8") as f:
        lines = [x for line in f.read().split("\n") for x in _expand(line, generated, path)]
    return _finish(lines, "docs/luksvm-crypttab.5.in")


def _sections() -> list[str]:
    sections: list[str] = []
    for spec in config.SETTINGS:
        if spec.section not in sections:
            sections.append(spec.section)
    return sections


def manual_settings() -> str:
    path = os.path.join(DOCS, "luksvm.conf.5.in")
    lines: list[str] = []
    for section in _sections():
        lines += [f'.SS "[{section}]"']
        for spec in config.SETTINGS:
            if spec.section != section:
                continue
            default = (
                f"default: {spec.default}"
                if spec.default
                else (
                    "default: the value in [guests]"
                    if section.startswith("guest:") and spec.key != "order"
                    else "default: empty"
                )
            )
            lines += [
                ".TP",
                _bold(spec.key) + " = " + _italic(spec.kind),
                roff(_sentence(spec.doc)),
                ".br",
                roff(_sentence(default)),
            ]
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return _finish(
        [x for line in text.split("\n") for x in _expand(line, {"SETTINGS": lines}, path)],
        "docs/luksvm.conf.5.in",
    )


# --- the example luksvm.conf --------------------------------------------------------------------


def _comment(text: str, width: int = 98) -> list[str]:
    lines: list[str] = []
    current = "#"
    for word in text.split():
        if len(current) + 1 + len(word) > width:
            lines.append(current)
            current = "#"
        current += " " + word
    return [*lines, current]


def example_settings() -> str:
    """/etc/luksvm/luksvm.conf as installed: every setting commented out at its default."""
    lines = [
        "# /etc/luksvm/luksvm.conf: settings of luksvm; see luksvm.conf(5).",
        "# Every setting is shown commented out at its default: uncomment a line to change it.",
        "# Durations are systemd time spans (90s, 2min, 1h 30min, 30d); check with",
        "# `luksvm config check`.",
    ]
    for section in _sections():
        lines.append("")
        if section.startswith("guest:"):
            lines += [
                *_comment(
                    "Per-guest overrides, one section per libvirt guest named in a volume's "
                    "x-luksvm.guest= option, e.g. [guest:mail]. A setting left out here "
                    "takes its value from [guests]."
                ),
                "#[guest:mail]",
            ]
        else:
            lines.append(f"[{section}]")
        for spec in config.SETTINGS:
            if spec.section != section:
                continue
            lines += _comment(spec.doc)
            value = spec.default or (
                "" if not section.startswith("guest:") else _guest_example(spec.key)
            )
            lines.append(f"#{spec.key} = {value}".rstrip() if value else f"#{spec.key} =")
    return "\n".join(lines) + "\n"


def _guest_example(key: str) -> str:
    # Per-guest settings inherit from [guests]: show that default as an example value.
    for spec in config.SETTINGS:
        if spec.section == "guests" and spec.key == key:
            return spec.default
    return ""


# --- bash completion ----------------------------------------------------------------------------


def completion_kind(argument: Argument) -> str:
    if argument.choices:
        return "words:" + " ".join(argument.choices)
    return COMPLETION_KINDS.get(argument.metavar.upper(), "none")


def _shell_word(text: str) -> str:
    if re.fullmatch(r"[A-Za-z0-9_./:=@%+,\-]*", text):
        return text
    return "'" + text.replace("'", "'\\''") + "'"


def completion(parser: argparse.ArgumentParser | None = None) -> str:
    """The bash completion script: the template's logic plus a `case` table of every command."""
    cases: list[str] = []
    for command in walk(parser or build_parser()):
        options = ["--help"]
        valued: list[str] = []
        positionals: list[str] = []
        for argument in command.arguments:
            if argument.positional:
                kind = completion_kind(argument)
                if argument.nargs in ("*", "+"):
                    kind += "..."
                positionals.append(kind.replace(" ", ","))
                continue
            options += argument.flags
            if argument.metavar:
                kind = completion_kind(argument).replace(" ", ",")
                valued += [f"{flag}={kind}" for flag in argument.flags]
        cases += [
            f"    {_shell_word(command.name) or chr(39) * 2})",
            f"        children={_shell_word(' '.join(command.children))}",
            f"        options={_shell_word(' '.join(options))}",
            f"        valued={_shell_word(' '.join(valued))}",
            f"        positionals={_shell_word(' '.join(positionals))}",
            "        ;;",
        ]
    cases += ["    *) return 1 ;;"]
    with open(COMPLETION_TEMPLATE, encoding="utf-8") as f:
        template = f.read()
    return (
        template.replace("@VERSION@", __version__)
        .replace("@LUKSVM_PREFIX@", config.LUKSVM_PREFIX)
        .replace("@CRYPTTAB_DIR@", config.CRYPTTAB_DIR)
        .replace("    @CASES@\n", "\n".join(cases) + "\n")
    )


# --- entry point --------------------------------------------------------------------------------

OUTPUTS: dict[str, Callable[[], str]] = {
    "luksvm.8": manual_luksvm,
    "luksvm-crypttab.5": manual_crypttab,
    "luksvm.conf.5": manual_settings,
    "luksvm.conf": example_settings,
    "luksvm.bash": completion,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = argparse.ArgumentParser(prog="tools/gendocs", description=(__doc__ or "").split("\n")[0])
    args.add_argument("outdir", help="where to write the generated files")
    ns = args.parse_args(argv)
    try:
        rendered = {name: make() for name, make in OUTPUTS.items()}
    except DocError as error:
        for line in str(error).splitlines():
            print(f"gendocs: {line}", file=sys.stderr)
        return 1
    os.makedirs(ns.outdir, exist_ok=True)
    for name, text in rendered.items():
        with open(os.path.join(ns.outdir, name), "w", encoding="utf-8") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
