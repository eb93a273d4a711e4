"""The ``recon`` console script: the one place that wires commands to the parts that run them.

Bad arguments or settings exit 2 with one line; a server that cannot be reached exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime
from typing import NoReturn

from worker.logs import configure_logging
from worker.settings import Settings, SettingsError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One clear line, not argparse's usage block: ops grep for it.
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def parse_day(text: str) -> datetime:
    """A DATE argument: YYYY-MM-DD (UTC midnight) or a full ISO-8601 timestamp."""
    try:
        if len(text) == 10:
            return datetime.combine(date.fromisoformat(text), datetime.min.time(), tzinfo=UTC)
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="recon", description="Reconcile Stripe refunds and disputes into a PostgreSQL ledger."
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    migrate = commands.add_parser("migrate", help="apply schema/ migrations (idempotent, concurrency-safe)")
    migrate.add_argument(
        "--create-db", action="store_true", help="create the database first if it is missing"
    )
    commands.add_parser("receiver", help="run the webhook receiver")
    commands.add_parser("worker", help="run the reconciliation consumers")
    commands.add_parser("run", help="receiver and worker in one process")

    dead = commands.add_parser("dead-letters", help="inspect and re-queue dead-lettered events")
    dead_commands = dead.add_subparsers(dest="dead_command", required=True, parser_class=_Parser)
    dead_list = dead_commands.add_parser("list", help="list dead-lettered events")
    dead_list.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    replay = dead_commands.add_parser("replay", help="re-queue dead-lettered events for fresh attempts")
    replay.add_argument("event_ids", nargs="*", metavar="EVENT_ID")
    replay.add_argument("--all", action="store_true", help="replay every dead-lettered event")

    backfill = commands.add_parser("backfill", help="queue events from the Stripe API the inbox has not seen")
    backfill.add_argument("--since", type=parse_day, required=True, metavar="DATE")
    backfill.add_argument("--until", type=parse_day, metavar="DATE")

    report = commands.add_parser("report", help="print the finance summary")
    report.add_argument("--since", type=parse_day, metavar="DATE")
    report.add_argument("--currency", type=str.lower, metavar="CUR")
    report.add_argument("--format", choices=("table", "csv", "json"), default="table")

    _add_exceptions(commands)
    _add_refunds(commands)

    verify = commands.add_parser("verify", help="compare the ledger with the Stripe API; exit 1 on drift")
    verify.add_argument("--since", type=parse_day, metavar="DATE")
    verify.add_argument("--until", type=parse_day, metavar="DATE")
    verify.add_argument("--json", action="store_true", help="one JSON document instead of a table")

    payouts = commands.add_parser("payouts", help="reconcile paid-out payouts not yet matched")
    payouts.add_argument("--since", type=parse_day, metavar="DATE")
    payouts.add_argument("--json", action="store_true", help="one JSON document instead of a table")

    demo = commands.add_parser("demo", help="seed sample data and send signed webhooks to a running receiver")
    demo.add_argument("--url", help="receiver base URL (default: from RECON_HTTP_HOST/RECON_HTTP_PORT)")
    return parser


def _add_exceptions(commands: argparse._SubParsersAction[_Parser]) -> None:
    exceptions = commands.add_parser(
        "exceptions", help="list, resolve and retry the exceptions to work through"
    )
    sub = exceptions.add_subparsers(dest="exceptions_command", required=True, parser_class=_Parser)
    listing = sub.add_parser("list", help="list exceptions, newest first")
    listing.add_argument("--open", action="store_true", help="only those not resolved")
    listing.add_argument("--kind", metavar="KIND", help="only this kind (e.g. unmatched_charge)")
    listing.add_argument("--json", action="store_true", help="one JSON document instead of a table")
    resolve = sub.add_parser("resolve", help="mark exceptions resolved, with a note")
    resolve.add_argument("ids", nargs="+", type=int, metavar="ID")
    resolve.add_argument("--note", required=True, help="why it is resolved (kept with it)")
    resolve.add_argument("--by", default=None, help="who resolved it (default: the OS user)")
    retry = sub.add_parser("retry", help="re-queue the event behind an unmatched_charge or refund_mismatch")
    retry.add_argument("ids", nargs="+", type=int, metavar="ID")


def _add_refunds(commands: argparse._SubParsersAction[_Parser]) -> None:
    refund = commands.add_parser("refund", help="start a refund from the back office (capped, with a reason)")
    owner = refund.add_mutually_exclusive_group(required=True)
    owner.add_argument("--order", metavar="N", help="order number")
    owner.add_argument("--invoice", metavar="N", help="invoice number")
    owner.add_argument("--charge", metavar="ch_...", help="a Stripe charge id")
    refund.add_argument("--amount", type=_minor_units, metavar="MINOR", help="default: all refundable now")
    refund.add_argument(
        "--reason", required=True, choices=("duplicate", "fraudulent", "requested_by_customer", "other")
    )
    refund.add_argument("--note", help="required with --reason other")
    refund.add_argument("--no-notify", action="store_true", help="do not e-mail the buyer")
    refund.add_argument("--message", help="a line for the buyer's e-mail")
    reject = commands.add_parser(
        "reject-order", help="reject an order and refund everything refundable on it"
    )
    reject.add_argument("number", metavar="N")
    reject.add_argument("--note", required=True)


def _minor_units(text: str) -> int:
    """An --amount: a positive whole number of the currency's minor units (1000 = $10.00, ¥1000)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of minor units: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _migrate(args: argparse.Namespace, settings: Settings) -> int:
    from worker.ops import migrate

    async def _run() -> None:
        if args.create_db:
            await migrate.create_database(settings.database_url)
        await migrate.apply_migrations(settings.database_url)

    asyncio.run(_run())
    return 0


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from worker import serve

    return serve.serve(args.command, settings)


def _dead_letters(args: argparse.Namespace, settings: Settings) -> int:
    from worker.ops import dead_letter_replay

    if args.dead_command == "list":
        return asyncio.run(dead_letter_replay.list_dead_letters(settings, as_json=args.json))
    if bool(args.event_ids) == bool(args.all):
        raise SettingsError("dead-letters replay takes EVENT_ID... or --all, not both and not neither")
    return asyncio.run(dead_letter_replay.replay(settings, args.event_ids, replay_all=args.all))


def _backfill(args: argparse.Namespace, settings: Settings) -> int:
    from worker.ops import backfill

    return asyncio.run(backfill.backfill(settings, since=args.since, until=args.until))


def _report(args: argparse.Namespace, settings: Settings) -> int:
    from worker.ops import report

    return asyncio.run(
        report.print_report(settings, since=args.since, currency=args.currency, fmt=args.format)
    )


def _exceptions(args: argparse.Namespace, settings: Settings) -> int:
    from worker.ops import exceptions

    if args.exceptions_command == "list":
        return asyncio.run(
            exceptions.list_exceptions(settings, open_only=args.open, kind=args.kind, as_json=args.json)
        )
    if args.exceptions_command == "resolve":
        return asyncio.run(exceptions.resolve(settings, args.ids, note=args.note, by=args.by))
    return asyncio.run(exceptions.retry(settings, args.ids))


def _refund(args: argparse.Namespace, settings: Settings) -> int:
    from worker.ops import refund_command

    return asyncio.run(
        refund_command.refund(
            settings,
            order=args.order,
            invoice=args.invoice,
            charge=args.charge,
            amount=args.amount,
            reason=args.reason,
            note=args.note,
            notify_buyer=not args.no_notify,
            message=args.message,
        )
    )


def _reject_order(args: argparse.Namespace, settings: Settings) -> int:
    from worker.ops import refund_command

    return asyncio.run(refund_command.reject_order(settings, args.number, note=args.note))


def _verify(args: argparse.Namespace, settings: Settings) -> int:
    from worker.ops import verify

    return asyncio.run(verify.verify(settings, since=args.since, until=args.until, as_json=args.json))


def _payouts(args: argparse.Namespace, settings: Settings) -> int:
    from worker.ops import payouts

    return asyncio.run(payouts.reconcile_payouts(settings, since=args.since, as_json=args.json))


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    from worker.ops.demo.command import run_demo

    return asyncio.run(run_demo(settings, base_url=args.url))


# Imports stay inside each command: `recon migrate` must not pay for aiohttp, `recon report` for aio-pika.
_COMMANDS: dict[str, Callable[[argparse.Namespace, Settings], int]] = {
    "migrate": _migrate,
    "receiver": _serve,
    "worker": _serve,
    "run": _serve,
    "dead-letters": _dead_letters,
    "backfill": _backfill,
    "report": _report,
    "demo": _demo,
    "exceptions": _exceptions,
    "refund": _refund,
    "reject-order": _reject_order,
    "verify": _verify,
    "payouts": _payouts,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        servers = _COMMANDS[args.command] is _serve
        configure_logging(settings.log_format, settings.log_level, cache_loggers=servers)
        return _COMMANDS[args.command](args, settings)
    except SettingsError as exc:
        print(f"recon: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, ConnectionError) as exc:
        # Server unreachable: one line, no traceback, never the URL (it may hold a password).
        print(
            f"recon: error: cannot reach a server: {type(exc).__name__}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if type(exc).__module__.partition(".")[0] != "asyncpg":
            raise
        # PostgreSQL answered but refused (no such database, a role without rights): one line, as
        # for a server that cannot be reached, never a traceback. asyncpg's messages hold no URL.
        print(f"recon: error: the database refused: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
