"""A realistic stream of events over many charges, for crash tests and bench/reconcile.py.

Per charge (the host app recorded an order and its payment): a succeeded refund, sometimes a
second refund that fails (booked, then reversed), sometimes a dispute that withdraws funds and
sometimes is won (reinstated); some events repeat the same refund under another event type.
On top, a share of exact duplicate deliveries (same event id), and the whole stream shuffled.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

import asyncpg

from tests import builders as b

CURRENCIES = ("usd", "usd", "usd", "eur", "jpy")


@dataclass(frozen=True, slots=True)
class HostPayment:
    order_number: str
    charge_id: str
    amount: int
    currency: str


@dataclass(frozen=True, slots=True)
class Stream:
    payments: list[HostPayment]
    events: list[dict[str, Any]]  # in delivery order, duplicates included

    @property
    def event_ids(self) -> list[str]:
        return sorted({event["id"] for event in self.events})


def _refund_events(rng: random.Random, charge_id: str, amount: int, currency: str) -> list[dict[str, Any]]:
    refund = b.refund(charge_id=charge_id, amount=amount // 10, currency=currency, created=b.T0 + 10)
    events = [b.refund_event("refund.created", refund, created=b.T0 + 10)]
    if rng.random() < 0.3:
        events.append(b.refund_event("charge.refund.updated", refund, created=b.T0 + 11))
    if rng.random() < 0.3:
        pending = b.refund(
            charge_id=charge_id, amount=amount // 20, currency=currency, status="pending", created=b.T0 + 20
        )
        failed = {**pending, "status": "failed"}
        events.append(b.refund_event("refund.created", pending, created=b.T0 + 20))
        events.append(b.refund_event("refund.failed", failed, created=b.T0 + 25))
    return events


def _dispute_events(rng: random.Random, charge_id: str, amount: int, currency: str) -> list[dict[str, Any]]:
    if rng.random() >= 0.25:
        return []
    withdrawal = b.balance_transaction(amount=-amount, currency=currency, fee=1500, created=b.T0 + 30)
    opened = b.dispute(charge_id=charge_id, amount=amount, currency=currency, created=b.T0 + 30)
    withdrawn = {**opened, "balance_transactions": [withdrawal]}
    events = [
        b.dispute_event("charge.dispute.created", opened, created=b.T0 + 30),
        b.dispute_event("charge.dispute.funds_withdrawn", withdrawn, created=b.T0 + 31),
    ]
    if rng.random() < 0.5:
        back = b.balance_transaction(amount=amount, currency=currency, fee=-1500, created=b.T0 + 40)
        won = {**withdrawn, "status": "won", "balance_transactions": [withdrawal, back]}
        events.append(b.dispute_event("charge.dispute.funds_reinstated", won, created=b.T0 + 40))
        events.append(b.dispute_event("charge.dispute.closed", won, created=b.T0 + 41))
    return events


def build(charges: int, *, seed: int = 7, duplicate_share: float = 0.1, tag: str = "s") -> Stream:
    rng = random.Random(seed)
    payments: list[HostPayment] = []
    events: list[dict[str, Any]] = []
    for i in range(charges):
        currency = rng.choice(CURRENCIES)
        amount = 10_000 + 100 * rng.randrange(100)
        payment = HostPayment(f"O-{tag}-{i:06d}", f"ch_{tag}_{i:06d}", amount, currency)
        payments.append(payment)
        events += _refund_events(rng, payment.charge_id, amount, currency)
        events += _dispute_events(rng, payment.charge_id, amount, currency)
    events += rng.sample(events, round(len(events) * duplicate_share))
    rng.shuffle(events)
    return Stream(payments, events)


async def seed(con: asyncpg.Connection, payments: list[HostPayment], *, buyer_emails: bool = False) -> None:
    """The host application's orders and payments, in two statements; ``buyer_emails`` gives each
    order a buyer's address, as a shop's orders have (bench/reconcile.py)."""
    await con.execute(
        """
        with o as (
            insert into recon.orders (number, currency, amount_total, buyer_email)
            select n, c, a, case when $5 then 'buyer-' || lower(n) || '@shop.example' end
            from unnest($1::text[], $2::text[], $3::bigint[]) as t(n, c, a)
            returning id, number, currency, amount_total
        )
        insert into recon.payments (stripe_charge_id, order_id, method, currency, amount)
        select c.charge_id, o.id, 'stripe_card', o.currency, o.amount_total
        from o join unnest($1::text[], $4::text[]) as c(number, charge_id) on c.number = o.number
        """,
        [p.order_number for p in payments],
        [p.currency for p in payments],
        [p.amount for p in payments],
        [p.charge_id for p in payments],
        buyer_emails,
    )


async def ledger_multiset(con: asyncpg.Connection) -> Counter[tuple[Any, ...]]:
    """The ledger without what depends on timing (entry ids, booking times, which event booked)."""
    rows = await con.fetch(
        "select kind, amount, currency, stripe_charge_id, stripe_object_id from finance.ledger"
    )
    return Counter(tuple(row) for row in rows)
