"""``recon refund`` and ``recon reject-order``: rule 11 from the shell, through the same service as the API.

The caller is the OS user (``requested_by``); each invocation is one operator action with an
Idempotency-Key of its own. Exit 0 with the request printed (its Stripe refund ids and state, also
when Stripe refused it: the request is then ``failed`` with Stripe's message, exit 1), 1 over the
cap (naming what is refundable now) or for an unknown order, invoice or charge, 2 for a missing
setting or a note that ``--reason other`` needs.
"""

from __future__ import annotations

import getpass
import sys
import uuid
from decimal import Decimal
from typing import Any

import asyncpg

from worker.backoffice.api import open_backoffice_pool
from worker.backoffice.money import format_money
from worker.backoffice.service import Answer, BackOffice, fingerprint
from worker.backoffice.store import ExceedsRefundable, RefundAsk, RefundRefused
from worker.backoffice.stripe_refunds import StripeRefundApi
from worker.backoffice.submit import Submitter
from worker.settings import Settings, SettingsError

EXIT_OK, EXIT_REFUSED = 0, 1


def _operator() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        return "cli"


async def _money(pool: asyncpg.Pool, amount: int, currency: str) -> str:
    async with pool.acquire() as con:
        major: Decimal = await con.fetchval("select finance.major_units($1, $2)", amount, currency)
    return format_money(major, currency)


async def _print_request(pool: asyncpg.Pool, request: dict[str, Any]) -> None:
    owner = (
        f"order {request['order_number']}"
        if request["order_number"] and not request["charge"]
        else f"invoice {request['invoice_number']}"
        if request["invoice_number"] and not request["charge"]
        else f"charge {request['charge']}"
    )
    amount = await _money(pool, request["amount"], request["currency"])
    print(f"refund request {request['id']}: {request['state']}, {amount} on {owner} ({request['reason']})")
    for part in request["parts"]:
        part_amount = await _money(pool, part["amount"], request["currency"])
        refund_id = part["stripe_refund_id"] or "(not yet answered by Stripe)"
        line = f"  {part['stripe_charge_id']}  {refund_id}  {part_amount}  {part['state']}"
        print(line + (f"  {part['error']}" if part["error"] else ""))
    after = await _money(pool, request["refundable_after"], request["currency"])
    print(f"refundable now: {after}")


async def _run(settings: Settings, start: Any) -> int:
    if not settings.stripe_api_key:
        raise SettingsError("STRIPE_API_KEY is required to start a refund")
    pool = await open_backoffice_pool(settings, max_size=2)
    stripe_api = StripeRefundApi(settings.stripe_api_key, settings.stripe_api_base)
    try:
        backoffice = BackOffice(pool, Submitter(pool, stripe_api))
        try:
            answer: Answer = await start(backoffice)
        except ExceedsRefundable as over:
            refundable = await _money(pool, over.refundable, str(over.extra["currency"]))
            print(
                f"recon: refused: exceeds what is refundable now: {refundable} ({over.refundable})",
                file=sys.stderr,
            )
            return EXIT_REFUSED
        except RefundRefused as refused:
            print(f"recon: refused: {refused.detail}", file=sys.stderr)
            return EXIT_REFUSED
        if answer.request is None:
            print("nothing was refundable; the order is rejected")
            return EXIT_OK
        await _print_request(pool, answer.request)
        return EXIT_REFUSED if answer.request["state"] == "failed" else EXIT_OK
    finally:
        await stripe_api.close()
        await pool.close()


async def refund(
    settings: Settings,
    *,
    order: str | None,
    invoice: str | None,
    charge: str | None,
    amount: int | None,
    reason: str,
    note: str | None,
    notify_buyer: bool,
    message: str | None,
) -> int:
    note = (note or "").strip() or None
    if reason == "other" and note is None:
        raise SettingsError("--reason other needs --note")
    kind, owner = ("order", order) if order else ("invoice", invoice) if invoice else ("charge", charge)
    ask = RefundAsk(kind, str(owner), amount, reason, note, notify_buyer, message)  # type: ignore[arg-type]
    body = {"owner": [kind, owner], "amount": amount, "reason": reason, "note": note, "message": message}

    async def start(backoffice: BackOffice) -> Answer:
        return await backoffice.request_refund(
            ask,
            requested_by=_operator(),
            idempotency_key=f"cli-{uuid.uuid4()}",
            body_fingerprint=fingerprint(body),
        )

    return await _run(settings, start)


async def reject_order(settings: Settings, number: str, *, note: str) -> int:
    note = note.strip()
    if not note:
        raise SettingsError("reject-order needs a --note")

    async def start(backoffice: BackOffice) -> Answer:
        return await backoffice.reject_order(
            number,
            note,
            requested_by=_operator(),
            idempotency_key=None,
            body_fingerprint=fingerprint({"note": note}),
        )

    return await _run(settings, start)
