"""Rule 11 when things go wrong: the cap under concurrency, a crash between Stripe's answer and our
record of it (within and after Stripe's 24-hour idempotency window), Stripe unreachable, and the
webhook that arrives before Stripe's answer was recorded. Against the real database and localstripe."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests import builders as b
from tests import host_records as host
from tests.backoffice_setup import (
    api_served,
    front_fixture,  # noqa: F401 - the fixture `front`
    localstripe_url_fixture,  # noqa: F401 - the fixture `localstripe_url`
    paid_order,
    post,
    with_stripe,
)
from tests.harness import wait_until
from tests.stripe_front import API_KEY, StripeFront
from worker.backoffice import store
from worker.backoffice.api import open_backoffice_pool
from worker.backoffice.service import BackOffice, fingerprint
from worker.backoffice.stripe_refunds import StripeRefund, StripeRefundApi
from worker.backoffice.submit import Submitter, SubmitTimings
from worker.settings import Settings

pytestmark = pytest.mark.filterwarnings("ignore:Bare functions are deprecated:DeprecationWarning")

# A restarted worker recovers at once (tests do not wait out the 60 s a fresh request is left to
# its API call) and leases for a short time.
RESTARTED = SubmitTimings(lease_s=0.5, recover_after_s=0.0, recover_every_s=0.05)


class SimulatedCrash(BaseException):
    """The process dying: not an Exception, so nothing on the way catches it."""


async def crash_after_stripe_answered(_part: store.PartToSubmit, _refund: StripeRefund) -> None:
    raise SimulatedCrash


@asynccontextmanager
async def process(
    settings: Settings, api_base: str, hook: Any = None, timings: SubmitTimings = RESTARTED
) -> AsyncIterator[BackOffice]:
    """One life of a process: its own pool and Stripe client, gone when it ends (or dies)."""
    pool = await open_backoffice_pool(settings)
    stripe_api = StripeRefundApi(API_KEY, api_base)
    try:
        yield BackOffice(pool, Submitter(pool, stripe_api, timings, hook))
    finally:
        await stripe_api.close()
        pool.terminate()


async def ask(backoffice: BackOffice, number: str, amount: int, key: str) -> dict[str, Any]:
    body = {"order_number": number, "amount": amount, "reason": "requested_by_customer", "note": "crash test"}
    answer = await backoffice.request_refund(
        store.RefundAsk("order", number, amount, "requested_by_customer", "crash test"),
        requested_by="shop",
        idempotency_key=key,
        body_fingerprint=fingerprint(body),
    )
    assert answer.request is not None
    return answer.request


async def recovered(backoffice: BackOffice) -> None:
    """The restarted worker's recovery, once the dead process's lease on the part has run out."""

    async def one_pass() -> bool:
        return await backoffice.submitter.recover_once() > 0

    await wait_until(one_pass, timeout_s=10, what="recovery to take the request")


async def deliver_refund_webhooks(con: asyncpg.Connection, refund: dict[str, Any]) -> None:
    """What Stripe sends for the refund, twice over (refund.created and charge.refund.updated)."""
    obj = {
        **b.refund(charge_id=refund["charge"], amount=refund["amount"]),
        **refund,
        "reason": "requested_by_customer",
    }
    await host.apply(con, b.incoming(b.refund_event("refund.created", obj)))
    await host.apply(con, b.incoming(b.refund_event("charge.refund.updated", obj)))


async def test_the_cap_holds_for_parallel_requests_against_the_database(
    settings: Settings, con: asyncpg.Connection, front: tuple[StripeFront, str]
) -> None:
    """Rule 11's cap: 16 requests of 700 at once, through two API processes, on an order that can
    refund 5000 over two payments. Exactly 7 are taken (4900), the other 9 are 422 naming what is
    left, and Stripe refunds no more than was captured."""
    api, base = front
    await paid_order(con, base, "ORD-C1", [3000, 2000])
    s = with_stripe(settings, base)
    body = {"order_number": "ORD-C1", "amount": 700, "reason": "duplicate"}
    async with api_served(s) as one, api_served(s) as two, aiohttp.ClientSession() as http:
        started = time.monotonic()
        answers = await asyncio.gather(
            *(post(http, f"{(one, two)[i % 2]}/v1/refunds", body, key=f"cap-{i}") for i in range(16))
        )
        elapsed_s = time.monotonic() - started
    taken = [a for status, a in answers if status == 201]
    refused = [a for status, a in answers if status == 422]
    assert len(taken) == 7 and len(refused) == 9, answers
    assert all(a["error"] == "exceeds_refundable" and a["refundable"] < 700 for a in refused)
    assert sum(r["amount"] for r in api.created) == 4900
    assert (
        await con.fetchval("select refundable_now from finance.order_balances where order_number = 'ORD-C1'")
        == 100
    )
    print(f"cap: 16 parallel requests in {elapsed_s:.2f}s, 7 taken, 9 refused")


async def test_a_crash_after_stripe_answered_leaves_one_refund_and_one_ledger_row(
    settings: Settings, con: asyncpg.Connection, front: tuple[StripeFront, str]
) -> None:
    """Killed after Stripe created the refund and before we recorded it: the request is left
    `requested`. The restarted worker looks first, finds the refund by its metadata and records
    it without a second call to create; the webhook then books one row, linked to the request."""
    api, base = front
    (charge_id,) = await paid_order(con, base, "ORD-C2", [2500])
    with pytest.raises(SimulatedCrash):
        async with process(settings, base, crash_after_stripe_answered) as dying:
            await ask(dying, "ORD-C2", 1500, "crash-1")
    request_id = await con.fetchval("select id from recon.refund_requests")
    assert await con.fetchval("select state from recon.refund_requests") == "requested"
    assert len(api.refunds_for(request_id)) == 1

    async with process(settings, base) as restarted:
        await recovered(restarted)
        request = await restarted.get_request(request_id)
    assert request is not None
    [refund] = api.refunds_for(request_id)
    assert (request["state"], request["parts"][0]["stripe_refund_id"]) == ("submitted", refund["id"])
    assert api.create_calls == 1

    await deliver_refund_webhooks(con, refund)
    assert await host.ledger(con, charge_id) == [
        ("charge", 2500, "usd", charge_id),
        ("refund", -1500, "usd", refund["id"]),
    ]
    row = await con.fetchrow(
        "select source, refund_request_id, note, requested_by, reason from finance.refunds"
    )
    assert tuple(row) == ("app", request_id, "crash test", "shop", "requested_by_customer")
    assert await con.fetchval("select state from finance.refund_requests") == "succeeded"


async def test_after_stripes_24_hours_the_existing_refund_is_found_by_metadata_not_made_again(
    settings: Settings, con: asyncpg.Connection, front: tuple[StripeFront, str]
) -> None:
    """The same crash, with the request older than Stripe's idempotency window (Stripe has
    forgotten the key): the same key would now create a second refund. Recovery lists the charge's
    refunds, finds the one whose metadata names the request, and creates nothing."""
    api, base = front
    await paid_order(con, base, "ORD-C3", [4000])
    with pytest.raises(SimulatedCrash):
        async with process(settings, base, crash_after_stripe_answered) as dying:
            await ask(dying, "ORD-C3", 4000, "crash-2")
    await con.execute("update recon.refund_requests set requested_at = now() - interval '25 hours'")
    api.forget_idempotency_keys()
    request_id = await con.fetchval("select id from recon.refund_requests")

    async with process(settings, base) as restarted:
        await recovered(restarted)
        request = await restarted.get_request(request_id)
    assert request is not None
    [refund] = api.refunds_for(request_id)
    assert request["parts"][0]["stripe_refund_id"] == refund["id"]
    assert api.create_calls == 1 and len(api.created) == 1


async def test_stripe_unreachable_leaves_the_request_requested_and_recovery_sends_it(
    settings: Settings, con: asyncpg.Connection, front: tuple[StripeFront, str]
) -> None:
    """Every try fails (500s): the answer is the committed request, `requested`, holding its amount
    back; the worker's recovery later looks first, finds nothing, and creates the refund."""
    api, base = front
    await paid_order(con, base, "ORD-C4", [900])
    api.fail_next = 100
    async with process(settings, base) as first:
        request = await ask(first, "ORD-C4", 900, "down")
    assert (request["state"], request["parts"][0]["stripe_refund_id"], request["refundable_after"]) == (
        "requested",
        None,
        0,
    )
    api.fail_next = 0
    async with process(settings, base) as worker:
        await recovered(worker)
        after = await worker.get_request(request["id"])
    assert after is not None and after["state"] == "submitted"
    assert len(api.refunds_for(request["id"])) == 1


async def test_a_webhook_faster_than_stripes_answer_is_linked_by_metadata(
    settings: Settings, con: asyncpg.Connection, front: tuple[StripeFront, str]
) -> None:
    """The refund's webhook is applied before the process that called Stripe recorded the answer
    (it died): the rules link it by metadata, the part takes the refund's id and the request
    succeeds; recovery then has nothing left to send."""
    api, base = front
    await paid_order(con, base, "ORD-C5", [1000])
    with pytest.raises(SimulatedCrash):
        async with process(settings, base, crash_after_stripe_answered) as dying:
            await ask(dying, "ORD-C5", 1000, "fast")
    request_id = await con.fetchval("select id from recon.refund_requests")
    [refund] = api.refunds_for(request_id)
    await deliver_refund_webhooks(con, refund)
    async with process(settings, base) as restarted:
        # The dead process's lease on the part has run out (as its clock would have it).
        await con.execute("update recon.refund_request_parts set lease_until = now() - interval '1 second'")
        assert await restarted.submitter.recover_once() == 0
        request = await restarted.get_request(request_id)
    assert request is not None
    assert (request["state"], request["parts"][0]["stripe_refund_id"]) == ("succeeded", refund["id"])
    assert api.create_calls == 1
    actions = await host.audit_actions(con)
    assert actions.count("refund_requested") == 1 and actions.count("stripe_refund_recorded") == 1
