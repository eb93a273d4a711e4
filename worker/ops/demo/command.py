"""``recon demo``: seed sample orders and invoices, send signed webhooks to a running receiver,
wait until the worker has processed them, and print the ledger rows and the payments', orders' and
invoices' balances they produced.

Needs a running ``recon run`` (or receiver + worker) on the same database and broker. Every run
uses fresh order/invoice numbers and Stripe ids, so it can be run again and again.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
import time
from dataclasses import dataclass

import aiohttp
import asyncpg
import stripe

from worker.ops.demo.story import Payment, Scenario, Send, build_story
from worker.ops.report_render import Column, Section, as_table
from worker.settings import Settings, SettingsError

DEADLINE_S = 45.0  # the whole demo, sending and waiting
POLL_INTERVAL_S = 0.05
HTTP_TIMEOUT_S = 10.0
STORY_STARTS_S_AGO = 3 * 3600  # event times lie in the past, the latest about an hour ago

_SETTLED_SQL = """
select outcome from finance.events
where stripe_event_id = $1 and processed_at is not null
"""

_LEDGER_SQL = """
select coalesce(order_number, invoice_number) as owner, occurred_at, kind, amount_decimal, currency,
       stripe_object_id
from finance.ledger
where order_number = any($1::text[]) or invoice_number = any($1::text[])
order by array_position($1::text[], coalesce(order_number, invoice_number)), occurred_at, entry_id
"""

_BALANCES_SQL = """
select coalesce(order_number, invoice_number) as owner, stripe_charge_id, currency,
       finance.major_units(amount, currency) as amount,
       finance.major_units(amount_refunded, currency) as refunded,
       finance.major_units(net_amount, currency) as net,
       status, disputed, dispute_status
from finance.payment_balances
where order_number = any($1::text[]) or invoice_number = any($1::text[])
order by array_position($1::text[], coalesce(order_number, invoice_number)),
         array_position($2::text[], stripe_charge_id)
"""

# Orders and invoices side by side: their status and disputed flag come from all their payments.
_OWNER_BALANCES_SQL = """
select owner, currency,
       finance.major_units(amount_total, currency) as amount_total,
       finance.major_units(captured, currency) as captured,
       finance.major_units(refunded, currency) as refunded,
       finance.major_units(refundable_now, currency) as refundable_now,
       finance.major_units(balance_due, currency) as balance_due,
       status, disputed
from (
    select order_number as owner, currency, amount_total, captured, refunded, refundable_now,
           balance_due, status, disputed
    from finance.order_balances
    union all
    select invoice_number, currency, amount_total, captured, refunded, refundable_now,
           balance_due, status, disputed
    from finance.invoice_balances
) balances
where owner = any($1::text[])
order by array_position($1::text[], owner)
"""

LEDGER_COLUMNS = (
    Column("owner", "ORDER / INVOICE"),
    Column("occurred_at", "OCCURRED (UTC)", "moment"),
    Column("kind", "KIND"),
    Column("amount_decimal", "AMOUNT", "money"),
    Column("currency", "CUR"),
    Column("stripe_object_id", "STRIPE OBJECT"),
)
BALANCE_COLUMNS = (
    Column("owner", "ORDER / INVOICE"),
    Column("stripe_charge_id", "CHARGE"),
    Column("currency", "CUR"),
    Column("amount", "AMOUNT", "money"),
    Column("refunded", "REFUNDED", "money"),
    Column("net", "NET", "money"),
    Column("status", "STATUS"),
    Column("disputed", "DISPUTED", "flag"),
    Column("dispute_status", "DISPUTE"),
)
OWNER_BALANCE_COLUMNS = (
    Column("owner", "ORDER / INVOICE"),
    Column("currency", "CUR"),
    Column("amount_total", "TOTAL", "money"),
    Column("captured", "CAPTURED", "money"),
    Column("refunded", "REFUNDED", "money"),
    Column("refundable_now", "REFUNDABLE NOW", "money"),
    Column("balance_due", "BALANCE DUE", "money"),
    Column("status", "STATUS"),
    Column("disputed", "DISPUTED", "flag"),
)


class DemoFailed(Exception):
    """The receiver refused a webhook or the worker did not finish in time; one line for stderr."""


@dataclass(frozen=True, slots=True)
class Target:
    url: str  # the receiver's webhook endpoint
    secret: str  # whsec_… the receiver verifies with


def target_for(settings: Settings, base_url: str | None) -> Target:
    if not settings.webhook_secrets:
        raise SettingsError(
            "STRIPE_WEBHOOK_SECRETS is not set: the demo signs its webhooks with the first one"
        )
    if base_url is None:
        host = settings.http_host if settings.http_host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        base_url = f"http://{host}:{settings.http_port}"
    return Target(f"{base_url.rstrip('/')}/webhooks/stripe", settings.webhook_secrets[0])


_INSERT_PAYMENT_SQL = """
insert into recon.payments (stripe_charge_id, stripe_payment_intent_id, order_id, invoice_id, method,
                            currency, amount)
values ($1, $2, $3, $4, $5, $6, $7)
"""


async def _seed_payment(con: asyncpg.Connection, scenario: Scenario, owner_id: int, payment: Payment) -> None:
    """The host's payment row, for the authorised amount; none when it is left to the metadata."""
    if payment.recorded_by == "metadata":
        return
    on_order = scenario.owner.kind == "order"
    charge = payment.charge
    await con.execute(
        _INSERT_PAYMENT_SQL,
        charge.charge_id if payment.recorded_by == "charge_id" else None,
        charge.payment_intent_id,
        owner_id if on_order else None,
        None if on_order else owner_id,
        "stripe_card" if on_order else "stripe_link",
        charge.currency,
        charge.amount,
    )


async def _seed_owner(con: asyncpg.Connection, scenario: Scenario) -> None:
    """The host application's rows: the order or invoice, and its payments."""
    owner = scenario.owner
    table_sql = (
        "insert into recon.orders (number, currency, amount_total) values ($1, $2, $3) returning id"
        if owner.kind == "order"
        else "insert into recon.invoices (number, currency, amount_total, bill_to)"
        " values ($1, $2, $3, 'Demo Customer Ltd') returning id"
    )
    owner_id = await con.fetchval(table_sql, owner.number, owner.currency, owner.amount_total)
    for payment in scenario.payments:
        await _seed_payment(con, scenario, owner_id, payment)


async def seed(con: asyncpg.Connection, story: list[Scenario]) -> None:
    async with con.transaction():
        for scenario in story:
            await _seed_owner(con, scenario)


async def _post(http: aiohttp.ClientSession, target: Target, body: bytes) -> None:
    header = stripe.WebhookSignature.generate_signature_header(
        body.decode(), target.secret, timestamp=int(time.time())
    )
    headers = {"Stripe-Signature": header, "Content-Type": "application/json"}
    async with http.post(target.url, data=body, headers=headers) as response:
        if response.status != 200:
            answer = (await response.text())[:200]
            raise DemoFailed(f"receiver answered {response.status} to a signed webhook: {answer}")


async def deliver(http: aiohttp.ClientSession, target: Target, send: Send) -> None:
    """POST the event (``copies`` times at once: a duplicate delivery), each signed afresh."""
    body = json.dumps(send.event, separators=(",", ":")).encode()
    await asyncio.gather(*(_post(http, target, body) for _ in range(send.copies)))


async def wait_settled(con: asyncpg.Connection, event_id: str, deadline: float) -> str:
    """Poll finance.events until the worker reached a final outcome for the event."""
    while True:
        outcome = await con.fetchval(_SETTLED_SQL, event_id)
        if outcome is not None:
            return str(outcome)
        if time.monotonic() > deadline:
            raise DemoFailed(f"{event_id} not processed within {DEADLINE_S:.0f} s: is the worker running?")
        await asyncio.sleep(POLL_INTERVAL_S)


async def play(
    con: asyncpg.Connection, http: aiohttp.ClientSession, target: Target, story: list[Scenario]
) -> None:
    """Deliver each scenario's webhooks in order, each one processed before the next is sent."""
    deadline = time.monotonic() + DEADLINE_S
    for scenario in story:
        charges = ", ".join(payment.charge.charge_id for payment in scenario.payments)
        print(f"\n{scenario.title}\n  {scenario.owner.kind} {scenario.owner.number}, paid by {charges}")
        for send in scenario.sends:
            await deliver(http, target, send)
            outcome = await wait_settled(con, str(send.event["id"]), deadline)
            print(f"  {send.event['type']:<32} {send.label:<44} -> {outcome}")


async def results(con: asyncpg.Connection, story: list[Scenario]) -> str:
    numbers = [scenario.owner.number for scenario in story]
    charge_ids = [payment.charge.charge_id for scenario in story for payment in scenario.payments]
    await con.execute("set time zone 'UTC'")
    ledger = [dict(r) for r in await con.fetch(_LEDGER_SQL, numbers)]
    balances = [dict(r) for r in await con.fetch(_BALANCES_SQL, numbers, charge_ids)]
    owner_balances = [dict(r) for r in await con.fetch(_OWNER_BALANCES_SQL, numbers)]
    sections = [
        Section("ledger", "Ledger rows (finance.ledger)", LEDGER_COLUMNS, ledger),
        Section("payment_balances", "Payment balances (finance.payment_balances)", BALANCE_COLUMNS, balances),
        Section(
            "owner_balances",
            "Order and invoice balances (finance.order_balances, finance.invoice_balances)",
            OWNER_BALANCE_COLUMNS,
            owner_balances,
        ),
    ]
    return as_table(sections, "\nResult; amounts in major units")


def run_tag() -> str:
    """Six hex digits: short enough to read in ids and numbers, unique enough per database."""
    return secrets.token_hex(3)


async def run_demo(settings: Settings, *, base_url: str | None) -> int:
    """Seed, send, wait, print; exit 1 with one line if the receiver or worker lets us down."""
    target = target_for(settings, base_url)
    tag = run_tag()
    story = build_story(tag, int(time.time()) - STORY_STARTS_S_AGO)
    print(f"recon demo run {tag}: {sum(len(s.sends) for s in story)} webhooks to {target.url}")
    con = await asyncpg.connect(settings.database_url)
    try:
        await seed(con, story)
        timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            await play(con, http, target, story)
        print(await results(con, story))
    except DemoFailed as exc:
        print(f"recon: error: {exc}", file=sys.stderr)
        return 1
    finally:
        await con.close()
    return 0
