"""Contract section 3 and 4, read over HTTP as ops read them: the worker's own /metrics on
RECON_WORKER_HTTP_PORT, and `recon run`'s /readyz through a database outage."""

from __future__ import annotations

import dataclasses
from urllib.parse import urlsplit

import aiohttp
import asyncpg
from prometheus_client.parser import text_string_to_metric_families

from tests import builders as b
from tests import host_records as host
from tests.consumer_harness import feeder
from tests.harness import events_settled, running, via_port, wait_until
from tests.tcp_proxy import TcpProxy
from worker.settings import Settings


async def scrape(base_url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics and parse the Prometheus text: (sample name, sorted labels) -> value."""
    async with aiohttp.ClientSession() as http, http.get(f"{base_url}/metrics") as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        text = await response.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


DEAD_LETTERED = ("recon_events_dead_lettered_total", (("type", "refund.created"),))
RECONCILED = ("recon_reconcile_seconds_count", ())


async def test_worker_metrics_over_http_count_dead_letters_and_reconcile_latency(settings: Settings) -> None:
    """`recon worker`'s /metrics on RECON_WORKER_HTTP_PORT: an event that applies adds exactly one
    observation to the recon_reconcile_seconds histogram and dead-letters nothing; a poison event
    (a payload the rules cannot apply) adds exactly one to recon_events_dead_lettered_total for its
    type once RECON_MAX_ATTEMPTS fail, and no reconcile observation (nothing of it committed)."""
    con = await asyncpg.connect(settings.database_url)
    try:
        await host.add_order_with_payment(con, "ORD-M", "ch_metrics")
    finally:
        await con.close()
    good = b.refund_event("refund.created", b.refund(charge_id="ch_metrics", amount=300))
    poison_refund = b.refund(charge_id="ch_metrics", amount=300)
    poison_refund["amount"] = "three hundred"
    poison = b.refund_event("refund.created", poison_refund)
    worker_url = f"http://127.0.0.1:{settings.worker_http_port}"
    async with feeder(settings.amqp_url, settings) as feed, running("worker", settings) as base_url:
        assert base_url == worker_url
        before = await scrape(worker_url)
        await feed.event(good)
        await wait_until(lambda: events_settled(settings.database_url, [good["id"]]), what="applied")
        after_good = await scrape(worker_url)
        await feed.event(poison)
        await wait_until(lambda: events_settled(settings.database_url, [poison["id"]]), what="dead-lettered")
        after_poison = await scrape(worker_url)
    assert after_good.get(RECONCILED, 0) == before.get(RECONCILED, 0) + 1
    assert after_good.get(DEAD_LETTERED, 0) == before.get(DEAD_LETTERED, 0)
    assert after_poison.get(DEAD_LETTERED, 0) == after_good.get(DEAD_LETTERED, 0) + 1
    assert after_poison.get(RECONCILED, 0) == after_good.get(RECONCILED, 0)
    bucket = ("recon_reconcile_seconds_bucket", (("le", "+Inf"),))
    assert after_poison[bucket] == after_poison[RECONCILED]


async def _readyz(base_url: str) -> tuple[int, dict[str, object]]:
    async with aiohttp.ClientSession() as http, http.get(f"{base_url}/readyz") as response:
        return response.status, await response.json()


async def test_run_readyz_is_503_while_the_database_is_down_and_200_after(settings: Settings) -> None:
    """`recon run` serves one /readyz on the receiver port: 200 while broker and database answer,
    503 naming the database while its connection is cut (the test's own TCP proxy), 200 again
    once it is back — read over HTTP, as a load balancer reads it."""
    proxy = TcpProxy("127.0.0.1", urlsplit(settings.database_url).port or 5432)
    await proxy.start()
    proxied = dataclasses.replace(settings, database_url=via_port(settings.database_url, proxy.port))
    try:
        async with running("run", proxied) as base_url:
            assert base_url.endswith(f":{settings.http_port}")
            assert await _readyz(base_url) == (200, {"ready": True})
            await proxy.cut()

            async def not_ready() -> bool:
                return await _readyz(base_url) == (503, {"ready": False, "reasons": ["database unreachable"]})

            await wait_until(not_ready, what="/readyz 503 during the outage")
            await proxy.restore()

            async def ready() -> bool:
                return await _readyz(base_url) == (200, {"ready": True})

            await wait_until(ready, what="/readyz 200 after the outage")
    finally:
        await proxy.close()
