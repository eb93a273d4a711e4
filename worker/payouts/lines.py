"""A payout's lines and what the ledger says of each: matched, missing_in_ledger, amount_differs
or not_ours. Pure: the facts come in (``LedgerFacts``, read by ``store.py``), the verdicts go out.

Each balance transaction is matched by its source:

* ``charge`` / ``payment`` (``ch_`` / ``py_``): the payment's ``charge`` rows (with its
  ``capture_adjustment``, i.e. what was captured);
* ``refund`` / ``payment_refund`` (``re_`` / ``pyr_``): the refund's ``refund`` row;
* ``refund_failure`` (source the refund): the refund's ``refund_reversal`` row;
* a dispute movement (reporting category ``dispute`` / ``dispute_reversal``, source ``du_``/``dp_``):
  the ``dispute_withdrawal`` or ``dispute_reinstatement`` rule 6 keyed by this very transaction,
  and its fee the ``dispute_fee`` keyed the same way.

A line whose source belongs to no payment we know is ``not_ours`` (Stripe's own fees, transfers,
charges of another integration). Amounts are compared only when the line settled in the currency
the ledger row is in; a line converted from another currency matches by its source alone and keeps
Stripe's ``exchange_rate``. A charge or refund line's fee is booked by us (``processing_fee``,
keyed by the transaction id): the ledger explains it by construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal

Match = Literal["matched", "missing_in_ledger", "amount_differs", "not_ours"]
DIFFERENCES: frozenset[Match] = frozenset({"missing_in_ledger", "amount_differs"})

CHARGE_TYPES = frozenset({"charge", "payment"})
REFUND_TYPES = frozenset({"refund", "payment_refund"})
REFUND_FAILURE_TYPES = frozenset({"refund_failure", "payment_failure_refund"})
DISPUTE_CATEGORIES = frozenset({"dispute", "dispute_reversal"})
DISPUTE_PREFIXES = ("du_", "dp_")


def _id(value: Any) -> str | None:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, dict):
        return _id(value.get("id"))
    return None


@dataclass(frozen=True, slots=True)
class Line:
    """One balance transaction of a payout, in Stripe's settlement currency."""

    txn_id: str
    type: str
    reporting_category: str | None
    source_id: str | None
    amount: int
    fee: int
    net: int
    currency: str
    exchange_rate: Decimal | None
    created: datetime
    # From the expanded source: the charge a refund or dispute belongs to, a charge's intent.
    source_charge_id: str | None = None
    source_payment_intent_id: str | None = None

    @classmethod
    def from_stripe(cls, txn: dict[str, Any]) -> Line:
        source = txn.get("source")
        expanded = source if isinstance(source, dict) else {}
        rate = txn.get("exchange_rate")
        return cls(
            txn_id=str(txn["id"]),
            type=str(txn["type"]),
            reporting_category=txn.get("reporting_category"),
            source_id=_id(source),
            amount=int(txn["amount"]),
            fee=int(txn.get("fee") or 0),
            net=int(txn["net"]),
            currency=str(txn["currency"]).lower(),
            # Stripe sends a JSON number; its shortest repr is the rate Stripe applied.
            exchange_rate=Decimal(str(rate)) if rate is not None else None,
            created=datetime.fromtimestamp(int(txn["created"]), tz=UTC),
            source_charge_id=_id(expanded.get("charge")),
            source_payment_intent_id=_id(expanded.get("payment_intent")),
        )

    @property
    def family(self) -> str:
        if self.type in CHARGE_TYPES:
            return "charge"
        if self.type in REFUND_TYPES:
            return "refund"
        if self.type in REFUND_FAILURE_TYPES:
            return "refund_failure"
        is_dispute_source = (self.source_id or "").startswith(DISPUTE_PREFIXES)
        if self.reporting_category in DISPUTE_CATEGORIES or (self.type == "adjustment" and is_dispute_source):
            return "dispute"
        return "other"

    @property
    def books_processing_fee(self) -> bool:
        return self.fee != 0 and self.family in ("charge", "refund", "refund_failure")


@dataclass(frozen=True, slots=True)
class PaymentFacts:
    payment_id: int
    currency: str
    charge_booked: bool
    charge_total: int  # charge + capture_adjustment rows
    charge_entry_id: int | None


@dataclass(frozen=True, slots=True)
class EntryFacts:
    entry_id: int
    amount: int
    currency: str
    payment_id: int


@dataclass(slots=True)
class LedgerFacts:
    """What the database knows of the payout's sources, read in one go (store.py)."""

    payments_by_charge: dict[str, PaymentFacts] = field(default_factory=dict)
    payments_by_intent: dict[str, PaymentFacts] = field(default_factory=dict)
    refund_payments: dict[str, int] = field(default_factory=dict)  # re_ -> payment id (recon.refunds)
    dispute_payments: dict[str, int] = field(default_factory=dict)  # du_ -> payment id (recon.disputes)
    # (kind, source_id) -> the ledger row: refunds by re_, dispute movements and fees by txn_.
    entries: dict[tuple[str, str], EntryFacts] = field(default_factory=dict)

    def payment(self, charge_id: str | None, intent_id: str | None) -> PaymentFacts | None:
        if charge_id is not None and charge_id in self.payments_by_charge:
            return self.payments_by_charge[charge_id]
        return self.payments_by_intent.get(intent_id) if intent_id is not None else None


@dataclass(frozen=True, slots=True)
class Verdict:
    line: Line
    match: Match
    payment_id: int | None  # the payment the line belongs to (a processing_fee is booked on it)
    entry_id: int | None = None
    ledger_amount: int | None = None
    difference: int = 0  # what of the line's net the ledger does not explain


def _compare(line: Line, entry: EntryFacts, payment_id: int, fee_booked: int = 0) -> Verdict:
    """``fee_booked``: what the ledger books for the line's fee (−fee for ours; a dispute_fee row)."""
    if entry.currency != line.currency:  # settled in another currency: matched by source
        return Verdict(line, "matched", payment_id, entry.entry_id, entry.amount)
    difference = line.net - (entry.amount + fee_booked)
    match: Match = "matched" if difference == 0 else "amount_differs"
    return Verdict(line, match, payment_id, entry.entry_id, entry.amount, difference)


def _missing(line: Line, payment_id: int, fee_booked: int = 0) -> Verdict:
    return Verdict(line, "missing_in_ledger", payment_id, difference=line.net - fee_booked)


def _charge(line: Line, facts: LedgerFacts) -> Verdict:
    payment = facts.payment(line.source_id, line.source_payment_intent_id)
    if payment is None:
        return Verdict(line, "not_ours", None)
    if not payment.charge_booked or payment.charge_entry_id is None:
        return _missing(line, payment.payment_id, -line.fee)
    entry = EntryFacts(payment.charge_entry_id, payment.charge_total, payment.currency, payment.payment_id)
    return _compare(line, entry, payment.payment_id, -line.fee)


def _refund(line: Line, facts: LedgerFacts, kind: str) -> Verdict:
    """A refund (kind ``refund``) or its failure (``refund_reversal``)."""
    entry = facts.entries.get((kind, line.source_id or ""))
    if entry is not None:
        return _compare(line, entry, entry.payment_id, -line.fee)
    payment_id = facts.refund_payments.get(line.source_id or "")
    if payment_id is None:
        payment = facts.payment(line.source_charge_id, line.source_payment_intent_id)
        payment_id = payment.payment_id if payment is not None else None
    if payment_id is None:
        return Verdict(line, "not_ours", None)
    return _missing(line, payment_id, -line.fee)


def _dispute(line: Line, facts: LedgerFacts) -> Verdict:
    kind = "dispute_withdrawal" if line.amount < 0 else "dispute_reinstatement"
    movement = facts.entries.get((kind, line.txn_id))
    fee_row = facts.entries.get(("dispute_fee", line.txn_id))
    fee_booked = fee_row.amount if fee_row is not None else 0
    if movement is not None:
        verdict = _compare(line, movement, movement.payment_id, fee_booked)
        if verdict.match == "matched" and line.fee != 0 and fee_row is None:
            # Settled in another currency, so matched by source; the fee Stripe took is still not
            # in the ledger: the line's net is short of what the ledger books by that fee (−fee, as
            # _compare gives the same line in the ledger's own currency).
            return Verdict(
                line, "amount_differs", movement.payment_id, movement.entry_id, movement.amount, -line.fee
            )
        return verdict
    payment_id = facts.dispute_payments.get(line.source_id or "")
    if payment_id is None:
        payment = facts.payment(line.source_charge_id, line.source_payment_intent_id)
        payment_id = payment.payment_id if payment is not None else None
    if payment_id is None:
        return Verdict(line, "not_ours", None)
    return _missing(line, payment_id, fee_booked)


def judge(line: Line, facts: LedgerFacts) -> Verdict:
    family = line.family
    if family == "charge":
        return _charge(line, facts)
    if family == "refund":
        return _refund(line, facts, "refund")
    if family == "refund_failure":
        return _refund(line, facts, "refund_reversal")
    if family == "dispute":
        return _dispute(line, facts)
    return Verdict(line, "not_ours", None)


def payout_lines(payout_id: str, transactions: list[dict[str, Any]]) -> list[Line]:
    """The payout's lines: every transaction listed but the payout's own (type ``payout``)."""
    return [
        Line.from_stripe(txn)
        for txn in transactions
        if not (txn.get("type") == "payout" and _id(txn.get("source")) == payout_id)
    ]


@dataclass(frozen=True, slots=True)
class Judgement:
    """The whole payout: each line's verdict, and whether the lines add up to what was paid out."""

    verdicts: list[Verdict]
    lines_net: int
    payout_amount: int

    @property
    def net_differs(self) -> bool:
        return self.lines_net != self.payout_amount

    @property
    def differences(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.match in DIFFERENCES]

    @property
    def reconciliation(self) -> Literal["matched", "differences"]:
        return "differences" if self.differences or self.net_differs else "matched"

    @property
    def difference_amount(self) -> int:
        """What of the payout the ledger does not explain: the differing lines', and any gap between
        the lines and the payout itself."""
        return sum(v.difference for v in self.differences) + (self.payout_amount - self.lines_net)


def judge_payout(payout_amount: int, lines: list[Line], facts: LedgerFacts) -> Judgement:
    verdicts = [judge(line, facts) for line in lines]
    return Judgement(verdicts, sum(line.net for line in lines), payout_amount)
