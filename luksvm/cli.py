"""Command line: parse, call one function, map errors to exit codes. No logic lives here."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
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


def cmd_header_backup(args: argparse.Namespace) -> int:
    from luksvm import backup, config

    cfg = config.load(args.root)
    prune_before = backup.parse_date(args.prune_before) if args.prune_before else None
    report = backup.backup_headers(cfg, args.names, prune_before=prune_before, dry_run=args.dry_run)
    if args.json:
        print_json(report.as_dict())
        return EXIT_FAIL if report.failed else EXIT_OK
    if args.dry_run:
        for outcome in report.outcomes:
            if outcome.error:
                continue
            if not outcome.commands:
                print(f"# {outcome.volume}: header unchanged since the newest backup")
            for argv in outcome.commands:
                print(shlex.join(argv))
        return EXIT_FAIL if report.failed else EXIT_OK
    print_table(
        [["VOLUME", "STATUS", "FILE", "SIZE", "UUID"]]
        + [
            [
                o.volume,
                "FAILED" if o.error else ("written" if o.changed else "unchanged"),
                o.file or "-",
                str(o.size) if o.file else "-",
                o.uuid or "-",
            ]
            for o in report.outcomes
        ]
    )
    for outcome in report.outcomes:
        for path in outcome.removed:
            print(f"removed {path}")
    if any(o.changed for o in report.outcomes):
        print(f"note: {report.warning}")
    return EXIT_FAIL if report.failed else EXIT_OK


def cmd_header_restore(args: argparse.Namespace) -> int:
    from luksvm import backup, config

    cfg = config.load(args.root)
    plan = backup.plan_restore(
        cfg,
        args.name,
        args.from_file,
        device=args.device,
        force_uuid_mismatch=args.force_uuid_mismatch,
    )
    for line in plan.describe():
        print(line)
    if args.dry_run:
        return EXIT_OK
    if not args.yes:
        if not sys.stdin.isatty():
            raise UsageError(
                "header-restore asks for the mapping name on a terminal; or pass --yes"
            )
        backup.confirm(plan.volume.name, plan.device)
    saved = backup.restore_header(plan, cfg)
    print(f"restored the header of {plan.device}; the previous one is in {saved}")
    return EXIT_OK


def cmd_apply(args: argparse.Namespace) -> int:
    from luksvm import apply, config

    plan = apply.apply(config.load(args.root), dry_run=args.dry_run)
    for line in apply.describe(plan, dry_run=args.dry_run, diff=args.diff):
        print(line)
    for line in apply.warnings(plan):
        print(f"luksvm: {line}", file=sys.stderr)
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

    backup_parser = commands.add_parser(
        "header-backup",
        help="back up the LUKS headers of the volumes (verified, deduplicated, rotated)",
    )
    backup_parser.add_argument("names", nargs="*", metavar="NAME", help="volumes (default: all)")
    backup_parser.add_argument("--json", action="store_true", help="print JSON")
    backup_parser.add_argument(
        "--prune-before",
        metavar="DATE",
        help="also delete backups created before DATE (now, 2024-05-01, 2024-05-01T12:00Z), "
        "except the newest: they keep removed passphrases valid",
    )
    backup_parser.add_argument(
        "--dry-run", action="store_true", help="print what would be written and deleted"
    )
    backup_parser.set_defaults(func=cmd_header_backup)

    restore = commands.add_parser(
        "header-restore", help="restore a volume's LUKS header from a backup (volume locked)"
    )
    restore.add_argument("name", metavar="NAME", help="the volume (mapping name)")
    restore.add_argument(
        "--from", dest="from_file", required=True, metavar="FILE", help="the header backup"
    )
    restore.add_argument(
        "--device", metavar="DEV", help="the LUKS device, when its configured source is gone"
    )
    restore.add_argument("--yes", action="store_true", help="do not ask for the mapping name")
    restore.add_argument(
        "--force-uuid-mismatch",
        action="store_true",
        help="restore a backup whose UUID does not match the volume",
    )
    restore.add_argument("--dry-run", action="store_true", help="check and print the plan only")
    restore.set_defaults(func=cmd_header_restore)

    apply_parser = commands.add_parser(
        "apply",
        help="write the systemd units the configuration asks for",
        description="Write the drop-ins and luksvm.target links under ROOT/etc/systemd/system, "
        "remove those an earlier apply wrote that the configuration no longer asks for, and "
        "reload systemd.",
    )
    apply_parser.add_argument(
        "--dry-run", action="store_true", help="print what would change; change nothing"
    )
    apply_parser.add_argument("--diff", action="store_true", help="show unified diffs")
    apply_parser.set_defaults(func=cmd_apply)

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
