"""Command line: parse, call one function, map errors to exit codes. No logic lives here."""

from __future__ import annotations

import logging
import os
import re
import shlex
import signal
import sys
import types
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Callable, NoReturn

from luksvm import __version__, journal
from luksvm.errors import EXIT_FAIL, EXIT_OK, EXIT_USAGE, EXIT_WARN, LuksvmError, UsageError

if TYPE_CHECKING:
    import argparse  # at run time only in build_parser: the units' commands do without it

    from luksvm import guests
    from luksvm.config import Config

log = logging.getLogger("luksvm")


class Args(types.SimpleNamespace):
    """A command line's values: set by argparse (build_parser) or by unit_command."""


def print_json(data: object) -> None:
    import json

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


def option_warnings(cfg: Config) -> tuple[int | None, list[str]]:
    """The installed systemd's version and the options it would ignore, each printed once."""
    from luksvm import config, crypttab_options

    version = crypttab_options.installed_systemd_version(cfg.root)
    warnings = [str(w) for w in config.option_warnings(cfg, version)]
    for warning in warnings:
        print(f"luksvm: warning: {warning}", file=sys.stderr)
    return version, warnings


def cmd_config_check(args: Args) -> int:
    from luksvm import config

    cfg = config.load(args.root)
    data = config.describe(cfg)
    version, warnings = option_warnings(cfg)
    if args.json:
        print_json({**data, "systemd_version": version, "warnings": warnings})
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


def cmd_doctor(args: Args) -> int:
    from luksvm import doctor

    if args.list:
        print_table(
            [["CHECK", "WHAT IT PROVES"]] + [[c.name, c.description] for c in doctor.CHECKS]
        )
        return EXIT_OK
    if args.prometheus:
        # Two writers of luksvm.prom would be duplicate series: metrics is the only one.
        raise UsageError(
            "luksvm doctor --prometheus is gone: luksvm.prom has one writer now, luksvm metrics "
            "(its luksvm_doctor_status holds doctor's results)",
            fix=f"luksvm metrics --textfile {shlex.quote(args.prometheus)}, or systemctl enable "
            "--now luksvm-metrics.timer",
        )
    report = doctor.doctor(args.root, args.checks)
    if args.json:
        print_json(doctor.as_json(report.findings))
    else:
        sys.stdout.write(doctor.format_report(report.checks, report.findings))
    return report.exit_code


def cmd_metrics(args: Args) -> int:
    from luksvm import metrics

    text = metrics.render(metrics.collect(args.root))
    if args.textfile:
        metrics.write_textfile(args.textfile, text)
    else:
        sys.stdout.write(text)
    return EXIT_OK


def _volumes(args: Args) -> tuple[Any, list[Any]]:
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


def cmd_unlock(args: Args) -> int:
    from luksvm import unlock

    cfg, volumes = _volumes(args)
    plans = unlock.unlock(cfg, volumes, no_start=args.no_start, dry_run=args.dry_run)
    if args.dry_run:
        print_plans(plans)
        return EXIT_FAIL if any(p.refusal for p in plans) else EXIT_OK
    return EXIT_OK


def cmd_lock(args: Args) -> int:
    from luksvm import unlock

    cfg, volumes = _volumes(args)
    plans = unlock.lock(
        cfg, volumes[::-1] if args.all else volumes, from_unit=args.from_unit, dry_run=args.dry_run
    )
    if args.dry_run:
        print_plans(plans)
        return EXIT_FAIL if any(p.refusal for p in plans) else EXIT_OK
    return EXIT_OK


def cmd_status(args: Args) -> int:
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


def cmd_guest_start(args: Args) -> int:
    from luksvm import config, guests, virt

    cfg = config.load(args.root)
    cfg.guest(args.guest)
    if os.environ.get("INVOCATION_ID") and guests.earlier_guests(cfg, args.guest):
        # From its unit: lower-order guests first (see wait_for_earlier_units). systemctl (and
        # the process runner) is imported only then: ~60 ms in the e2e VM.
        from luksvm import systemctl

        if systemctl.systemd_running(cfg.root):
            guests.wait_for_earlier_units(
                cfg, args.guest, systemctl.unit_states, timeout=guests.EARLIER_GUEST_WAIT
            )
    with virt.connect(cfg.settings.uri) as conn:
        guests.start_guest(cfg, args.guest, conn)
    return EXIT_OK


def cmd_guest_stop(args: Args) -> int:
    from luksvm import config, guests

    cfg = config.load(args.root)
    cfg.guest(args.guest)
    guests.stop_guest(cfg, args.guest, guests.connector(cfg))
    return EXIT_OK


def cmd_shutdown_watch(args: Args) -> int:
    from luksvm import logind

    logind.watch()
    return EXIT_OK


def cmd_start(args: Args) -> int:
    from luksvm import config, guests, systemctl

    cfg = config.load(args.root)
    names = guests.select(cfg, args.guests, args.all)
    through_units = systemctl.systemd_running(cfg.root) and not args.direct
    if args.dry_run:
        print("\n".join(guests.plan(cfg, "start", names, through_units=through_units)))
        return EXIT_OK
    steps = guests.start_through_units if through_units else guests.start_directly
    for step in steps(cfg, names):
        print(_progress_line(step), flush=True)
    return EXIT_OK


def _progress_line(step: guests.Progress | guests.Stopped) -> str:
    """How `luksvm start|stop` tells a step (before a command runs, or once a guest is done)."""
    from luksvm import guests

    if isinstance(step, guests.Stopped):
        if step.how == "not-running":
            return f"{step.guest}: not running"
        return f"{step.guest}: {step.how} after {step.seconds:.1f} s"
    if step.argv:
        command = shlex.join(step.argv)
        return f"{step.guest}: {command}" if step.guest else command
    return f"{step.guest}: {step.action}"


def cmd_stop(args: Args) -> int:
    from luksvm import config, guests, systemctl

    cfg = config.load(args.root)
    names = guests.select(cfg, args.guests, args.all)
    through_units = systemctl.systemd_running(cfg.root) and not args.direct
    if args.dry_run:
        print("\n".join(guests.plan(cfg, "stop", names, through_units=through_units)))
        return EXIT_OK
    if through_units:
        steps: Iterable[guests.Progress | guests.Stopped] = guests.stop_through_units(cfg, names)
    else:
        steps = guests.stop_guests(cfg, names, guests.connector(cfg))
    for step in steps:
        print(_progress_line(step), flush=True)
    return EXIT_OK


def cmd_header_backup(args: Args) -> int:
    from luksvm import backup, config

    cfg = config.load(args.root)
    if args.prune_stale:
        return _prune_stale(args, cfg)
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


def cmd_keys(args: Args) -> int:
    from luksvm import config, enroll

    data = enroll.report(config.load(args.root), args.names)
    failed = any(
        e.get("error") or any(c["state"] == "fail" for c in e["unattended"])  # type: ignore[attr-defined]
        for e in data
    )
    if args.json:
        print_json(data)
        return EXIT_FAIL if failed else EXIT_OK
    for index, entry in enumerate(data):
        if index:
            print()
        print(f"{entry['volume']}  {entry['device']}  configured key: {entry['configured_key']}")
        if entry.get("error"):
            print(f"  error: {entry['error']}")
            continue
        slots: list[dict[str, Any]] = entry["keyslots"]  # type: ignore[assignment]
        toks: list[dict[str, Any]] = entry["tokens"]  # type: ignore[assignment]
        rows = [["  KEYSLOT", "UNLOCKED BY", "DETAIL"]]
        for slot in slots:
            held = [t for t in toks if slot["keyslot"] in t["keyslots"]]
            detail = ", ".join(_token_detail(t) for t in held) or "passphrase or keyfile"
            rows.append([f"  {slot['keyslot']}", ",".join(slot["by"]), detail])
        print_table(rows)
        checks: list[dict[str, str]] = entry["unattended"]  # type: ignore[assignment]
        for check in checks:
            print(
                f"  {check['state'].upper():7} {check['source']}: {check['what']}: "
                f"{check['detail']}"
            )
    return EXIT_FAIL if failed else EXIT_OK


def _token_detail(token: dict[str, Any]) -> str:
    text = f"token {token['token']}"
    if token["kind"] == "tpm2":
        text += f" PCRs {'+'.join(str(p) for p in token['pcrs']) or 'none'}"
        text += " PIN" if token["pin"] else ""
    for url, thp in zip(token.get("urls", []), token.get("thumbprints", []) or ["?"]):
        text += f" {url} thp {thp}"
    return text


def cmd_enroll(args: Args) -> int:
    from luksvm import config, enroll, journal, tokens

    cfg = config.load(args.root)
    volume = cfg.volume(args.name)
    if args.tpm2:
        request = enroll.Request("tpm2", tpm2_device=args.tpm2_device, tpm2_pcrs=args.tpm2_pcrs)
    elif args.tang:
        request = enroll.Request("tang", tang_url=args.tang, thumbprint=args.thumbprint or "")
    elif args.recovery_key:
        request = enroll.Request("recovery")
    else:
        request = enroll.Request("remove", remove=args.remove)
    plan = enroll.plan(cfg, args.name, request, tokens.read_inventory(volume.device))
    if args.dry_run:
        for line in enroll.dry_run_lines(plan, cfg):
            print(line)
        return EXIT_OK
    if plan.action == "recovery" and not sys.stdout.isatty():
        raise LuksvmError(
            f"{args.name}: a recovery key is shown once, on the terminal, and standard output "
            "is not one; nothing was changed",
            fix=f"run it in a terminal: ssh -t HOST luksvm enroll {args.name} --recovery-key",
        )
    key = enroll.current_key(volume, cfg, args.key_file) if plan.needs_key else None
    outcome = enroll.execute(plan, cfg, key)
    event = "key-removed" if plan.action == "remove" else "key-enrolled"
    what = {
        "tpm2": "a TPM2 key",
        "tang": f"a Tang key ({args.tang})",
        "recovery": "a recovery key",
    }.get(plan.action, "keyslot(s) " + ", ".join(map(str, plan.wipe_slots)))
    log.info(
        "%s: %s %s",
        args.name,
        "removed" if plan.action == "remove" else "enrolled",
        what,
        extra=journal.fields(volume=args.name, message_id=event),
    )
    if plan.diff():
        print(plan.diff(), end="")
    for path in outcome.stale_backups:
        log.warning(
            "%s: header backup %s still holds the removed key; delete it with luksvm "
            "header-backup --prune-stale %s",
            args.name,
            path,
            args.name,
            extra=journal.fields(volume=args.name, message_id="backup-stale"),
        )
    print(f"header backups: {outcome.backups[0]} (before), {outcome.backups[1]} (after)")
    if outcome.recovery_key:
        print(f"\nRecovery key for {args.name} (shown once; write it down, it is not stored):")
        print(f"\n    {outcome.recovery_key}\n")
    if plan.config_before != plan.config_after:
        print(f"run luksvm apply to bring the units in line with {plan.config_path}")
    return EXIT_OK


def _prune_stale(args: Args, cfg: Any) -> int:
    from luksvm import backup

    removed = backup.prune_stale(cfg, args.names, dry_run=args.dry_run)
    if args.json:
        print_json({"removed": removed, "dry_run": args.dry_run})
        return EXIT_OK
    for path in removed:
        print(shlex.join(["rm", "--", path]) if args.dry_run else f"removed {path}")
    if not removed:
        print("no stale header backups")
    return EXIT_OK


def cmd_trim(args: Args) -> int:
    from luksvm import config, trim, virt

    cfg = config.load(args.root)
    results = trim.trim_guests(cfg, args.guests, lambda: virt.connect(cfg.settings.uri))
    if args.json:
        print_json(trim.report(results))
    else:
        rows = [["GUEST", "TRIM", "DISCARD CHAIN"]]
        for result in results:
            broken = [(c.volume, c.broken) for c in result.disks if c.broken is not None]
            chain = "; ".join(f"{v}: {link.name}: {link.detail}" for v, link in broken if link)
            rows.append([result.guest, result.trim, chain or "ok"])
        print_table(rows)
        for result in results:
            if result.detail:
                print(f"{result.guest}: {result.detail}")
            for disk in result.disks:
                if disk.broken is not None and disk.broken.fix:
                    print(f"{result.guest}/{disk.volume}: fix: {disk.broken.fix}")
        print(f"note: {trim.HOST_NOTE}")
    return EXIT_OK if all(r.ok for r in results) else EXIT_WARN


def cmd_header_restore(args: Args) -> int:
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


def check_new_size(option: str, text: str) -> None:
    """Refuse a negative size with a message of its own (sizes count up from zero)."""
    if text.strip().startswith("-"):
        raise UsageError(
            f"{option} {text}: a size cannot be negative",
            fix=f"give the new size itself with its unit, e.g. {option} 60GiB",
        )


def percent(text: str) -> int:
    """argparse type: a whole number 0 or more (--margin)."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text}: a margin cannot be negative; 0 keeps none")
    return value


def cmd_shrink_plan(args: Args) -> int:
    from luksvm import shrink

    check_new_size("--to", args.to)
    shrink.check_size_syntax(args.to)
    with shrink.session(args.lv, args.device, root=args.root, key_file=args.key_file) as (
        where,
        _key,
    ):
        _layout, plan = shrink.plan_for(
            where,
            args.to,
            margin_percent=args.margin,
            backup_dir=shrink.default_backup_dir(where.vg, where.lv),
        )
    if args.json:
        print_json(shrink.describe(plan))
    else:
        print(shrink.format_plan(plan))
    return EXIT_OK


def cmd_shrink_run(args: Args) -> int:
    from luksvm import shrink

    check_new_size("--to", args.to)
    shrink.check_size_syntax(args.to)
    if not args.dry_run and not args.yes_i_have_a_backup:
        raise UsageError(
            "shrink run changes every layer of the disk: back the data up, then pass "
            "--yes-i-have-a-backup (or look first with --dry-run)"
        )
    with shrink.session(args.lv, args.device, root=args.root, key_file=args.key_file) as (
        where,
        opened_with,
    ):
        backup_dir = args.backup_dir or shrink.default_backup_dir(where.vg, where.lv)
        _layout, plan = shrink.plan_for(
            where, args.to, margin_percent=args.margin, backup_dir=backup_dir
        )
        if args.dry_run:
            for step in plan.steps:
                print(shrink.command_line(step))
            return EXIT_OK
        # Before the first change: without a key, refuse here, naming the step that needs it.
        key = shrink.key_for_plan(
            plan, where, root=args.root, key_file=args.key_file, key=opened_with
        )
        print(shrink.format_plan(plan), flush=True)
        if plan.nothing_to_do:
            return EXIT_OK
        print(flush=True)
        shrink.run_plan(where, plan, key, backup_dir, lambda line: print(line, flush=True))
    print(f"\n{where.vg}/{where.lv} is {plan.targets.lv_size:,} B; every check held")
    return EXIT_OK


def cmd_grow(args: Args) -> int:
    from luksvm import grow
    from luksvm.errors import UsageError

    amount = grow.parse_amount(args.by, args.to)
    if (args.guest is None) == (args.lv is None):
        raise UsageError("grow takes a GUEST or --lv VG/LV (one of them)")
    if args.lv is not None and (args.disk or args.inside):
        raise UsageError("--disk and --inside belong to grow GUEST, not to grow --lv")
    if args.guest is not None and args.device:
        raise UsageError("--device belongs to grow --lv, not to grow GUEST")
    if args.lv is not None:
        grow.split_lv(args.lv)
    out = sys.stderr if args.json else sys.stdout

    def progress(line: str) -> None:
        print(line, file=out, flush=True)

    if args.lv is not None:
        plan = grow.grow_lv(args.root, args.lv, args.device, amount, dry_run=args.dry_run,
                            key_file=args.key_file, progress=progress)  # fmt: skip
    else:
        plan = grow.grow_guest(args.root, args.guest, args.disk, amount, dry_run=args.dry_run,
                               inside=args.inside, key_file=args.key_file,
                               progress=progress)  # fmt: skip
    if args.json:
        data = grow.describe(plan)
        data["done"] = not args.dry_run
        print_json(data)
    elif args.dry_run:
        print(grow.format_plan(plan))
    else:
        print(f"\n{plan.subject} is {plan.target:,} B; every check held")
        if plan.inside is not None and not args.inside:
            print("Inside the guest:")
            for line in grow.describe_inside(plan.inside):
                print(line)
    return EXIT_OK


def cmd_apply(args: Args) -> int:
    from luksvm import apply, config, guests

    cfg = config.load(args.root)
    option_warnings(cfg)
    plan = apply.apply(cfg, dry_run=args.dry_run)
    for line in apply.describe(plan, dry_run=args.dry_run, diff=args.diff):
        print(line)
    for line in apply.warnings(plan):
        print(f"luksvm: {line}", file=sys.stderr)
    for line in guests.apply_autostart_policy(cfg, take_over=args.take_over, dry_run=args.dry_run):
        print(f"luksvm: {line}", file=sys.stderr)
    return EXIT_OK


def cmd_migrate(args: Args) -> int:
    from luksvm import config, migrate, virt

    cfg = config.load(args.root)
    request = None
    # Every argument is checked before libvirt is asked anything: a bad name is a usage error,
    # not "cannot connect to libvirt".
    if args.rollback:
        extra = [o for o, v in (("--to", args.to), ("--name", args.name)) if v]
        if extra:
            raise UsageError(f"--rollback takes GUEST and --disk only, not {', '.join(extra)}")
    elif not (args.disk and args.to and args.name):
        raise UsageError("migrate needs --disk TARGET, --to VG/LV and --name MAPPING")
    else:
        vg, lv = migrate.split_vg_lv(args.to)
        request = migrate.Request(
            guest=args.guest,
            disk=args.disk,
            vg=vg,
            lv=lv,
            mapping=args.name,
            luks_type=args.luks_type,
            cipher=args.cipher or "",
            hash=args.hash or "",
            key_size=args.key_size or 0,
            pbkdf=args.pbkdf or "",
            pbkdf_iterations=args.pbkdf_force_iterations or 0,
            pbkdf_memory=args.pbkdf_memory or 0,
            verify=args.verify,
            key=args.key,
        )
        migrate.fragment_volume(request)  # --key and the names as luksvm will read them
    with virt.connect(cfg.settings.uri) as domains:
        ctx = migrate.Context(
            root=args.root,
            config=cfg,
            domains=domains,
            services=migrate.default_services(),
            out=lambda line: print(line, flush=True),
            tty=sys.stderr.isatty(),
        )
        if request is None:
            migrate.rollback(args.guest, args.disk, ctx, dry_run=args.dry_run)
        else:
            migrate.migrate(request, ctx, shutdown=args.shutdown, dry_run=args.dry_run)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    # argparse is imported here, not on the units' path (unit_command): ~70 ms in the e2e VM.
    import argparse

    class Parser(argparse.ArgumentParser):
        """argparse exits 2 on usage errors; luksvm's usage errors are 64 (EX_USAGE)."""

        def error(self, message: str) -> NoReturn:
            self.print_usage(sys.stderr)
            self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")

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

    doctor_parser = commands.add_parser(
        "doctor",
        help="check the host: what is wrong, why it matters, the fix (exit 0 ok, 1 warn, 2 fail)",
    )
    doctor_parser.add_argument("--json", action="store_true", help="print the findings as JSON")
    doctor_parser.add_argument(
        "--prometheus",
        metavar="FILE",
        help=argparse.SUPPRESS,  # moved to `luksvm metrics --textfile`; says so when given
    )
    doctor_parser.add_argument("--list", action="store_true", help="list the checks and exit")
    doctor_parser.add_argument("checks", nargs="*", metavar="CHECK", help="run only these checks")
    doctor_parser.set_defaults(func=cmd_doctor)

    metrics_parser = commands.add_parser(
        "metrics",
        help="the host's state as Prometheus metrics (node_exporter textfile); doctor included",
    )
    metrics_parser.add_argument(
        "--textfile",
        metavar="FILE",
        help="write FILE atomically (node_exporter's textfile directory) instead of stdout",
    )
    metrics_parser.set_defaults(func=cmd_metrics)

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

    watch = commands.add_parser(
        "shutdown-watch",
        help="stop the guests as soon as logind announces a shutdown or reboot "
        "(what luksvm-shutdown-watch.service runs)",
    )
    watch.set_defaults(func=cmd_shutdown_watch)

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
        "--prune-stale",
        action="store_true",
        help="delete the backups marked as still holding a removed key (the newest is kept)",
    )
    backup_parser.add_argument(
        "--dry-run", action="store_true", help="print what would be written and deleted"
    )
    backup_parser.set_defaults(func=cmd_header_backup)

    keys_parser = commands.add_parser(
        "keys",
        help="what can unlock each volume: keyslots, tokens (TPM2, Tang, FIDO2, recovery), the "
        "configured key; whether each unattended source would unlock it now",
    )
    keys_parser.add_argument("names", nargs="*", metavar="NAME", help="volumes (default: all)")
    keys_parser.add_argument("--json", action="store_true", help="print JSON")
    keys_parser.set_defaults(func=cmd_keys)

    enroll_parser = commands.add_parser(
        "enroll",
        help="add an unattended key (TPM2, Tang) or a recovery key to a volume, or remove a key",
    )
    enroll_parser.add_argument("name", metavar="NAME", help="the volume (mapping name)")
    source = enroll_parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tpm2", action="store_true", help="seal a key to this machine's TPM2")
    source.add_argument("--tang", metavar="URL", help="bind to a Tang server (needs --thumbprint)")
    source.add_argument(
        "--recovery-key", action="store_true", help="add a recovery key, shown once"
    )
    source.add_argument(
        "--remove",
        metavar="SLOT|TOKEN",
        help="remove a keyslot (N), a token's keyslots (token:N) or every tpm2|tang|recovery key",
    )
    enroll_parser.add_argument(
        "--tpm2-pcrs", default="7", metavar="L", help="PCRs to seal against, e.g. 7 or 0+7 (7)"
    )
    enroll_parser.add_argument(
        "--tpm2-device",
        default="auto",
        metavar="DEV",
        help="auto, a device node, or a TCTI such as swtpm:path=SOCK (auto)",
    )
    enroll_parser.add_argument(
        "--thumbprint", metavar="TP", help="the Tang server's signing key (tang-show-keys)"
    )
    enroll_parser.add_argument(
        "--key-file",
        metavar="FILE",
        help="a current key of the volume, - for standard input (default: the configured key, "
        "else a passphrase asked in the terminal)",
    )
    enroll_parser.add_argument(
        "--dry-run", action="store_true", help="print the commands and the config diff"
    )
    enroll_parser.set_defaults(func=cmd_enroll)

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

    trim_parser = commands.add_parser(
        "trim", help="fstrim inside running guests (guest agent) and check each discard chain"
    )
    trim_parser.add_argument("guests", nargs="*", metavar="GUEST", help="guests (default: all)")
    trim_parser.add_argument("--json", action="store_true", help="print JSON")
    trim_parser.set_defaults(func=cmd_trim)

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
    apply_parser.add_argument(
        "--take-over",
        action="store_true",
        help="clear libvirt's autostart flag on the guests luksvm manages (it would start them "
        "before their volumes are unlocked)",
    )
    apply_parser.set_defaults(func=cmd_apply)

    shrink_parser = commands.add_parser(
        "shrink", help="shrink an LV and every layer below it (LVM on LUKS) exactly"
    )
    shrink_commands = shrink_parser.add_subparsers(dest="shrink_command", metavar="ACTION")
    shrink_commands.required = True
    for name, func, help_text in (
        ("plan", cmd_shrink_plan, "show the exact steps, sizes and checks; change nothing"),
        ("run", cmd_shrink_run, "carry the plan out step by step, checking after each"),
    ):
        sub = shrink_commands.add_parser(name, help=help_text)
        sub.add_argument("--lv", required=True, metavar="VG/LV", help="the LV to shrink")
        sub.add_argument(
            "--to",
            required=True,
            metavar="SIZE",
            help="new LV size with its unit: 60GiB, 64424509440B, 125829120s, 15360e (extents)",
        )
        sub.add_argument(
            "--device",
            metavar="DEV",
            help="the LUKS container (partition or host LV) or its open mapping; "
            "default: found from the VG's PV",
        )
        sub.add_argument(
            "--key-file",
            metavar="FILE",
            help="the LUKS key when no token or configured key gives it and no terminal can "
            "ask: a file, or - for standard input (read as cryptsetup reads a keyfile: every "
            "byte, a trailing newline included)",
        )
        sub.add_argument(
            "--margin",
            type=percent,
            default=25,
            metavar="PERCENT",
            help="free space kept above resize2fs's minimum, as a share of the used space "
            "(default 25)",
        )
        if name == "plan":
            sub.add_argument("--json", action="store_true", help="print JSON")
        else:
            sub.add_argument(
                "--yes-i-have-a-backup",
                action="store_true",
                help="required: the run rewrites the partition table or host LV",
            )
            sub.add_argument(
                "--dry-run", action="store_true", help="print the commands it would run"
            )
            sub.add_argument(
                "--backup-dir",
                metavar="DIR",
                help="where the LUKS header, LVM metadata, plan and step log go "
                "(default /var/lib/luksvm/shrink/VG-LV-TIME)",
            )
        sub.set_defaults(func=func)

    grow_parser = commands.add_parser(
        "grow",
        help="grow a guest's disk while it runs, or an LV and every layer below it",
        description="grow GUEST: host LV (whole extents) -> LUKS mapping (512-byte sectors) -> the "
        "running QEMU (bytes), then the steps inside the guest. grow --lv VG/LV: LV and ext4, "
        "and the PV, mapping and partition or host LV below when the VG lacks free extents. "
        "Interrupted, the same command resumes.",
    )
    grow_parser.add_argument("guest", metavar="GUEST", nargs="?", help="the libvirt domain")
    grow_parser.add_argument("--lv", metavar="VG/LV", help="grow this LV (the host's own stack)")
    grow_parser.add_argument("--disk", metavar="TARGET", help="the guest's disk, e.g. vda")
    grow_parser.add_argument(
        "--device",
        metavar="DEV",
        help="with --lv: the LUKS container or its open mapping (default: from the VG's PV)",
    )
    size_group = grow_parser.add_mutually_exclusive_group()
    size_group.add_argument(
        "--by", metavar="SIZE", help="add SIZE (with its unit: 10GiB, 2560e...)"
    )
    size_group.add_argument(
        "--to",
        metavar="SIZE",
        help="the new size: of the guest's disk (GUEST) or of the LV (--lv)",
    )
    grow_parser.add_argument(
        "--inside",
        action="store_true",
        help="also run the steps inside the guest through its QEMU guest agent",
    )
    grow_parser.add_argument(
        "--key-file",
        metavar="FILE",
        help="the LUKS2 key for cryptsetup resize when none is configured (- reads stdin)",
    )
    grow_parser.add_argument("--dry-run", action="store_true", help="show the plan; change nothing")
    grow_parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    grow_parser.set_defaults(func=cmd_grow)

    migrate_parser = commands.add_parser(
        "migrate",
        help="move a guest's disk onto a new LUKS-encrypted raw LV",
        description="Size, create and LUKS-format a new LV, copy the guest's disk onto it with "
        "verification, point the domain at /dev/mapper/NAME, add the volume to crypttab.d and "
        "apply. Interrupted, the same command resumes. The old disk is never written or deleted.",
    )
    migrate_parser.add_argument("guest", metavar="GUEST", help="the libvirt domain")
    migrate_parser.add_argument(
        "--disk", metavar="TARGET", help="the disk's target dev in the domain, e.g. vda"
    )
    migrate_parser.add_argument("--to", metavar="VG/LV", help="the new LV (must not exist)")
    migrate_parser.add_argument("--name", metavar="MAPPING", help="the new mapping's name")
    migrate_parser.add_argument(
        "--key",
        default="-",
        metavar="KEYSPEC",
        help="a keyfile path, keyring:SERVICE/USER, or - to ask for a passphrase twice on the "
        "terminal (default)",
    )
    migrate_parser.add_argument(
        "--luks-type", choices=("luks1", "luks2"), default="luks2", help="default luks2"
    )
    migrate_parser.add_argument("--cipher", metavar="CIPHER", help="default: cryptsetup's")
    migrate_parser.add_argument("--hash", metavar="HASH", help="default: cryptsetup's")
    migrate_parser.add_argument(
        "--key-size", type=int, metavar="BITS", help="default: cryptsetup's"
    )
    migrate_parser.add_argument(
        "--pbkdf", choices=("argon2id", "argon2i", "pbkdf2"), help="default: cryptsetup's"
    )
    migrate_parser.add_argument(
        "--pbkdf-force-iterations", type=int, metavar="N", help="fixed KDF cost (no benchmark)"
    )
    migrate_parser.add_argument("--pbkdf-memory", type=int, metavar="KIB", help="argon2 memory")
    migrate_parser.add_argument(
        "--verify",
        choices=("full", "sample"),
        default="full",
        help="full: compare every byte (default); sample: 64 windows of 1 MiB, for big disks",
    )
    migrate_parser.add_argument(
        "--shutdown", action="store_true", help="stop the guest first (luksvm's guest stop)"
    )
    migrate_parser.add_argument(
        "--rollback",
        action="store_true",
        help="undo GUEST's newest migration (or --disk's): previous domain XML, fragment removed, "
        "volume locked; the new LV is kept",
    )
    migrate_parser.add_argument(
        "--dry-run", action="store_true", help="print the plan with exact commands; change nothing"
    )
    migrate_parser.set_defaults(func=cmd_migrate)

    return parser


# Options whose value may begin with "-", which argparse would take for an option and say
# "expected one argument": a value that looks like theirs is attached (`--to=-5GiB`). A negative
# size (`--to -5GiB`), which the command then refuses with its own message; a Tang thumbprint,
# base64url (RFC 7638), of which one in 64 begins with "-" — `--thumbprint "$(tang-show-keys)"`
# must not fail at random. A thumbprint is 27 (SHA-1) or 43 (SHA-256) characters; no option of
# luksvm is that long, so an option that follows a missing thumbprint is never taken for one.
DASH_VALUE_OPTIONS = {
    "--to": re.compile(r"-[0-9.]"),
    "--by": re.compile(r"-[0-9.]"),
    "--margin": re.compile(r"-[0-9.]"),
    "--thumbprint": re.compile(r"-[A-Za-z0-9_-]{26,}$"),
}


def attach_dash_values(argv: Sequence[str]) -> list[str]:
    """`--to -5GiB` → `--to=-5GiB`, for the options in DASH_VALUE_OPTIONS (not after `--`)."""
    out: list[str] = []
    rest = list(argv)
    while rest:
        arg = rest.pop(0)
        if arg == "--":
            out += [arg, *rest]
            break
        looks = DASH_VALUE_OPTIONS.get(arg)
        if looks is not None and rest and looks.match(rest[0]):
            arg = f"{arg}={rest.pop(0)}"
        out.append(arg)
    return out


# The commands luksvm's units run at every boot and shutdown, in exactly the words the units give
# them (units/luksvm-guest@.service, luksvm-unlock@.service), with the attributes build_parser()
# gives them (a unit test compares the two). They skip importing argparse and building the whole
# parser (120 options): ~0.3 s in the e2e VM, paid by every guest start and stop.
Handler = Callable[[Args], int]
UNIT_COMMANDS: dict[tuple[str, str, str], tuple[Handler, dict[str, Any]]] = {
    ("guest", "start", "--"): (
        cmd_guest_start,
        {"command": "guest", "guest_command": "start"},
    ),
    ("guest", "stop", "--"): (
        cmd_guest_stop,
        {"command": "guest", "guest_command": "stop"},
    ),
    ("unlock", "--no-start", "--"): (
        cmd_unlock,
        {"command": "unlock", "all": False, "no_start": True, "dry_run": False},
    ),
    ("lock", "--from-unit", "--"): (
        cmd_lock,
        {"command": "lock", "all": False, "from_unit": True, "dry_run": False},
    ),
}


def unit_command(argv: Sequence[str]) -> Args | None:
    """`argv` parsed as build_parser() would, when it is one of the units' commands; else None."""
    if len(argv) != 4:
        return None
    words, name = (argv[0], argv[1], argv[2]), argv[3]
    if words not in UNIT_COMMANDS:
        return None
    func, attributes = UNIT_COMMANDS[words]
    args = Args(root="/", verbose=False, func=func, **attributes)
    if args.command == "guest":
        args.guest = name
    else:
        args.names = [name]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = unit_command(argv) or build_parser().parse_args(attach_dash_values(argv), Args())
    journal.setup(verbose=args.verbose)
    handler: Handler = args.func
    try:
        return handler(args)
    except LuksvmError as error:
        if not error.logged:
            for line in str(error).splitlines():
                print(f"luksvm: {line}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("luksvm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`luksvm status --json | head`): end quietly, as tools killed by
        # SIGPIPE do, and keep Python from failing again while flushing stdout at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
