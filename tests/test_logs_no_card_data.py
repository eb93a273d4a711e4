"""Rule 10 and section 3: no card data (last4, fingerprint), no e-mail address and no `sk_` key in
any log line of a real `recon worker` run that handles events carrying them — an applied charge,
a checkpoint whose refund fetch with the key fails, and a poison event that is dead-lettered."""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path
from typing import Any

import asyncpg

from tests import builders as b
from tests import host_records as host
from tests.conftest import free_port
from tests.consumer_harness import WorkerProcess, feeder
from tests.harness import events_settled, wait_until
from worker.amqp import topology
from worker.settings import Settings

API_KEY = "sk_test_51RECONlogcheckDoNotLog"
LAST4 = "8431"
FINGERPRINT = "fpRECONcard8431x"
EMAIL = "card.holder@example.org"
SECRETS = (API_KEY, LAST4, FINGERPRINT, EMAIL)


def with_card(charge: dict[str, Any]) -> dict[str, Any]:
    """The charge as Stripe sends it, its card details and billing e-mail made recognisable."""
    card = charge["payment_method_details"]["card"]
    card.update(last4=LAST4, fingerprint=FINGERPRINT)
    charge["billing_details"]["email"] = EMAIL
    charge["receipt_email"] = EMAIL
    return charge


async def test_no_card_data_no_email_and_no_api_key_in_any_worker_log_line(
    settings: Settings, tmp_path: Path
) -> None:
    """Every line `recon worker` writes while it applies a charge carrying card data, fails to
    fetch a checkpoint's refunds with STRIPE_API_KEY set (the API refuses connections), and
    dead-letters a poison event carrying card data, is JSON, and none contains the last4, the
    fingerprint, the e-mail address or any `sk_test_`/`sk_live_` key. The run provably handled
    all three (their event_handled lines and the fetch failure are in the log)."""
    con = await asyncpg.connect(settings.database_url)
    try:
        await host.add_order_with_payment(con, "ORD-CARD", "ch_card", amount=5000)
    finally:
        await con.close()
    charge = with_card(b.charge(charge_id="ch_card", amount=5000))
    applied = b.charge_event("charge.succeeded", charge)
    checkpoint = b.charge_event(
        "charge.refunded",
        with_card(b.charge(charge_id="ch_card", amount=5000, amount_refunded=700)),
        created=b.T0 + 9,
    )
    poison_charge = with_card(b.charge(charge_id="ch_card", amount=5000))
    poison_charge["amount_captured"] = "five thousand"  # the rules cannot read it: dead-lettered
    poison = b.charge_event("charge.captured", poison_charge, created=b.T0 + 10)
    log_path = tmp_path / "worker.log"
    closed_api = f"http://127.0.0.1:{free_port()}"
    worker = WorkerProcess(settings, log_path, STRIPE_API_KEY=API_KEY, STRIPE_API_BASE=closed_api)
    long_ago_ms = int((time.time() - settings.unmatched_retry_s - 60) * 1000)
    ids = [applied["id"], checkpoint["id"], poison["id"]]
    try:
        worker.start()
        await worker.ready()
        async with feeder(settings.amqp_url, settings) as feed:
            await feed.event(applied)
            await feed.event(checkpoint, headers={topology.HEADER_FIRST_SEEN_MS: long_ago_ms})
            await feed.event(poison)
            await wait_until(lambda: events_settled(settings.database_url, ids), what="all three settled")
        worker.signal(signal.SIGTERM)
        assert await worker.wait() == 0
    finally:
        worker.kill()
    lines = log_path.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is JSON
    handled = {record["event_id"] for record in records if record.get("event") == "event_handled"}
    assert handled == set(ids)
    assert any(record.get("event") == "refund_fetch_failed" for record in records)
    key_shaped = re.compile(r"\b[sr]k_(test|live)_")
    for line in lines:
        assert not [secret for secret in SECRETS if secret in line], line
        assert not key_shaped.search(line), line
