"""Command line: parse, call one function, map errors to exit codes. No logic lives here."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any, Callable, NoReturn

from luksvm import __version__, journal
from luksvm.errors import EXIT_OK, EXIT_USAGE, LuksvmError

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


def cmd_guest_start(args: argparse.Namespace) -> int:
    import os

    from luksvm import config, guests, virt

    cfg = config.load(args.root)
    cfg.guest(args.guest)
    if guests.systemd_runs(cfg) and os.environ.get("INVOCATION_ID"):
        # From its unit: lower-order guests first (see wait_for_earlier_units).
        guests.wait_for_earlier_units(
            cfg, args.guest, guests.unit_state, timeout=guests.EARLIER_GUEST_WAIT
        )
    with virt.connect(cfg.settings.uri) as conn:
        guests.start_guest(cfg, args.guest, conn)
    return EXIT_OK


def cmd_guest_stop(args: argparse.Namespace) -> int:
    from luksvm import config, guests

    cfg = config.load(args.root)
    cfg.guest(args.guest)
    guests.stop_guest(cfg, args.guest, guests.connector(cfg))
    return EXIT_OK


def cmd_start(args: argparse.Namespace) -> int:
    from luksvm import config, guests

    cfg = config.load(args.root)
    names = guests.select(cfg, args.guests, args.all)
    through_units = guests.systemd_runs(cfg) and not args.direct
    if args.dry_run:
        print("\n".join(guests.plan(cfg, "start", names, through_units=through_units)))
        return EXIT_OK
    if through_units:
        guests.start_through_units(cfg, names)
    else:
        guests.start_directly(cfg, names)
    return EXIT_OK


def cmd_stop(args: argparse.Namespace) -> int:
    from luksvm import config, guests

    cfg = config.load(args.root)
    names = guests.select(cfg, args.guests, args.all)
    through_units = guests.systemd_runs(cfg) and not args.direct
    if args.dry_run:
        print("\n".join(guests.plan(cfg, "stop", names, through_units=through_units)))
        return EXIT_OK
    if through_units:
        stopped = guests.stop_through_units(cfg, names)
    else:
        stopped = guests.stop_guests(cfg, names, guests.connector(cfg))
    for done in stopped:
        print(
            f"{done.guest}: not running"
            if done.how == "not-running"
            else f"{done.guest}: {done.how} after {done.seconds:.1f} s"
        )
    return EXIT_OK


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

    guest_parser = commands.add_parser(
        "guest", help="start or stop one guest (what luksvm-guest@GUEST.service runs)"
    )
    guest_commands = guest_parser.add_subparsers(dest="guest_command", metavar="ACTION")
    guest_commands.required = True
    guest_start = guest_commands.add_parser(
        "start", help="start GUEST once all its volumes are unlocked; wait until it runs"
    )
    guest_start.add_argument("guest", metavar="GUEST")
    guest_start.set_defaults(func=cmd_guest_start)
    guest_stop = guest_commands.add_parser(
        "stop", help="ACPI shutdown, wait stop_timeout, then on_timeout (destroy|managedsave|fail)"
    )
    guest_stop.add_argument("guest", metavar="GUEST")
    guest_stop.set_defaults(func=cmd_guest_stop)

    for verb, func, what in (
        ("start", cmd_start, "start guests in their order (through their units when systemd runs)"),
        ("stop", cmd_stop, "stop guests, all at once (through their units when systemd runs)"),
    ):
        sub = commands.add_parser(verb, help=what)
        sub.add_argument("guests", nargs="*", metavar="GUEST")
        sub.add_argument("--all", action="store_true", help="every configured guest")
        sub.add_argument(
            "--direct",
            action="store_true",
            help="talk to libvirt directly even when systemd runs (the units do not notice)",
        )
        sub.add_argument("--dry-run", action="store_true", help="print what would be done")
        sub.set_defaults(func=func)

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
