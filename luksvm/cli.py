"""Command line: parse, call one function, map errors to exit codes. No logic lives here."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any, Callable, NoReturn

from luksvm import __version__, journal
from luksvm.errors import EXIT_FAIL, EXIT_OK, EXIT_USAGE, LuksvmError, UsageError

log = logging.getLogger("luksvm")


class Parser(argparse.ArgumentParser):
    """argparse exits 2 on usage errors; luksvm's usage errors are 64 (EX_USAGE)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def print_json(data: object) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def print_table(rows: Sequence[Sequence[str]]) -> None:
    """Columns padded to their widest cell; the first row is the header."""
    if not rows:
        return
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


# --- commands: each handler imports what it needs, so `luksvm --help` stays light -------------


def cmd_config_check(args: argparse.Namespace) -> int:
    from luksvm import config

    cfg = config.load(args.root)
    data = config.describe(cfg)
    if args.json:
        print_json(data)
        return EXIT_OK
    volumes: list[dict[str, Any]] = data["volumes"]  # type: ignore[assignment]
    guests: list[dict[str, Any]] = data["guests"]  # type: ignore[assignment]
    print_table(
        [["VOLUME", "SOURCE", "KEY", "OPTIONS", "GUESTS"]]
        + [
            [
                v["name"],
                v["source"],
                f"{v['key_kind']} {v['key']}" if v["key_kind"] != "ask" else "ask",
                ",".join(v["options"]) or "-",
                ",".join(v["guests"]) or "-",
            ]
            for v in volumes
        ]
    )
    if guests:
        print()
        print_table(
            [["GUEST", "VOLUMES", "ORDER", "STOP_TIMEOUT", "ON_TIMEOUT"]]
            + [
                [
                    g["name"],
                    ",".join(g["volumes"]),
                    str(g["order"]),
                    g["stop_timeout"],
                    g["on_timeout"],
                ]
                for g in guests
            ]
        )
    print(f"\nconfiguration valid: {len(volumes)} volumes, {len(guests)} guests")
    return EXIT_OK


def _volumes(args: argparse.Namespace) -> tuple[Any, list[Any]]:
    """The configuration and the volumes named on the command line (or all of them)."""
    from luksvm import config

    cfg = config.load(args.root)
    if args.all == bool(args.names):
        raise UsageError("name one or more volumes, or give --all")
    return cfg, list(cfg.volumes) if args.all else [cfg.volume(name) for name in args.names]


def print_plans(plans: Sequence[Any]) -> None:
    """A dry run: what would be run, one command a line, comments for the rest."""
    for plan in plans:
        label = f"{plan.volume}: " if plan.volume else ""
        for note in plan.notes:
            print(f"# {label}{note}")
        if plan.refusal:
            print(f"# {label}refused: {plan.refusal}")
        elif plan.done:
            print(f"# {label}{plan.done}")
        for step, command in zip(plan.steps, plan.commands()):
            print(
                command + ("  # key from python keyring on stdin" if step.key_from_keyring else "")
            )


def cmd_unlock(args: argparse.Namespace) -> int:
    from luksvm import unlock

    cfg, volumes = _volumes(args)
    plans = unlock.unlock(cfg, volumes, no_start=args.no_start, dry_run=args.dry_run)
    if args.dry_run:
        print_plans(plans)
        return EXIT_FAIL if any(p.refusal for p in plans) else EXIT_OK
    return EXIT_OK


def cmd_lock(args: argparse.Namespace) -> int:
    from luksvm import unlock

    cfg, volumes = _volumes(args)
    plans = unlock.lock(
        cfg, volumes[::-1] if args.all else volumes, from_unit=args.from_unit, dry_run=args.dry_run
    )
    if args.dry_run:
        print_plans(plans)
        return EXIT_FAIL if any(p.refusal for p in plans) else EXIT_OK
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from luksvm import config, status

    data = status.gather(config.load(args.root))
    if args.json:
        print_json(data)
        return EXIT_OK
    volumes, guests = status.rows(data)
    print_table(volumes)
    if len(guests) > 1:
        print()
        print_table(guests)
    for problem in data["problems"]:
        print(f"luksvm: {problem}", file=sys.stderr)
    return EXIT_FAIL if data["problems"] else EXIT_OK


def build_parser() -> Parser:
    parser = Parser(
        prog="luksvm",
        description="Unlock, run and safely stop libvirt guests on LUKS-encrypted raw volumes.",
    )
    parser.add_argument("--version", action="version", version=f"luksvm {__version__}")
    parser.add_argument(
        "--root", default="/", metavar="DIR", help="operate on the configuration under DIR"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every command run")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    commands.required = True

    config_parser = commands.add_parser("config", help="read and validate the configuration")
    config_commands = config_parser.add_subparsers(dest="config_command", metavar="ACTION")
    config_commands.required = True
    check = config_commands.add_parser("check", help="validate and show volumes and guests")
    check.add_argument("--json", action="store_true", help="print JSON")
    check.set_defaults(func=cmd_config_check)

    unlock = commands.add_parser(
        "unlock",
        help="unlock volumes (through their units when systemd runs), then start their guests",
    )
    unlock.add_argument("names", nargs="*", metavar="NAME", help="volume (mapping) name")
    unlock.add_argument("--all", action="store_true", help="every configured volume")
    unlock.add_argument(
        "--no-start",
        action="store_true",
        help="unlock directly, start no unit and no guest (what the unlock units run)",
    )
    unlock.add_argument("--dry-run", action="store_true", help="print the commands, run none")
    unlock.set_defaults(func=cmd_unlock)

    lock = commands.add_parser(
        "lock", help="deactivate the guest VGs on volumes and close them; refuse while held"
    )
    lock.add_argument("names", nargs="*", metavar="NAME", help="volume (mapping) name")
    lock.add_argument("--all", action="store_true", help="every configured volume")
    lock.add_argument(
        "--from-unit",
        action="store_true",
        help="lock directly, not through the unit (what the unlock units run at stop)",
    )
    lock.add_argument("--dry-run", action="store_true", help="print the commands, run none")
    lock.set_defaults(func=cmd_lock)

    status = commands.add_parser("status", help="show volumes and guests")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(func=cmd_status)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    journal.setup(verbose=args.verbose)
    handler: Callable[[argparse.Namespace], int] = args.func
    try:
        return handler(args)
    except LuksvmError as error:
        for line in str(error).splitlines():
            print(f"luksvm: {line}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("luksvm: interrupted", file=sys.stderr)
        return 130
