"""The webhook receiver over real HTTP, real signatures and the real broker: every answer it gives."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import aio_pika
import aiohttp
import pytest
import pytest_asyncio
import structlog
from yarl import URL

from tests.conftest import free_port
from tests.harness import post_event, running, wait_until
from tests.servers import rabbitmqctl, vhost_of
from tests.stripe_events import TEST_SECRET, encode, fixture, make_event, sign
from tests.tcp_proxy import TcpProxy
from tests.work_queue import drain_work_queue, work_queue_capped
from worker.amqp import topology
from worker.intake.broker_link import PUBLISH_CHANNELS
from worker.settings import Settings

MAX_BODY_BYTES = 32 * 1024
SECOND_SECRET = "whsec_rotated_0a9b8c7d6e5f4a3b2c1d"


@pytest.fixture
def receiver_settings(settings: Settings) -> Settings:
    """This test's settings with a small body limit, so 413 is cheap to reach."""
    return replace(settings, max_body_bytes=MAX_BODY_BYTES)


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """One HTTP client session for the test."""
    async with aiohttp.ClientSession() as session:
        yield session


@pytest_asyncio.fixture
async def receiver(receiver_settings: Settings) -> AsyncIterator[str]:
    """`recon receiver` running in this loop on its real port; its base URL."""
    async with running("receiver", receiver_settings) as base_url:
        yield base_url


def refund_event(**kwargs: Any) -> dict[str, Any]:
    return make_event("charge.refunded", fixture("charge"), **kwargs)


async def assert_only_sentinel_queued(http: aiohttp.ClientSession, base_url: str, amqp_url: str) -> None:
    """Publish a valid event after the others: the queue must hold it and nothing before it."""
    sentinel = refund_event()
    status, _ = await post_event(http, base_url, sentinel)
    assert status == 200
    messages = await drain_work_queue(amqp_url)
    assert [m.message_id for m in messages] == [sentinel["id"]]


async def post_raw(
    http: aiohttp.ClientSession, base_url: str, body: Any, headers: dict[str, str]
) -> tuple[int, dict[str, Any]]:
    async with http.post(f"{base_url}/webhooks/stripe", data=body, headers=headers) as response:
        return response.status, await response.json(content_type=None)


async def test_valid_event_lands_once_with_its_exact_bytes(
    receiver: str, http: aiohttp.ClientSession, amqp_url: str
) -> None:
    """A signed handled event is answered 200 only once queued: the exact raw bytes, id, type, headers."""
    event = refund_event()
    event["data"]["object"]["description"] = "Rückerstattung für Bestellung 1001"
    # Indented and non-ASCII: any re-serialisation on the way would change these bytes.
    body = json.dumps(event, indent=2, ensure_ascii=False).encode()
    status, answer = await post_event(http, receiver, body)
    assert (status, answer) == (200, {"received": True})
    messages = await drain_work_queue(amqp_url)
    assert len(messages) == 1
    message = messages[0]
    assert message.body == body
    assert message.message_id == event["id"]
    assert message.type == "charge.refunded"
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.headers[topology.HEADER_CREATED] == event["created"]
    first_seen_ms = message.headers[topology.HEADER_FIRST_SEEN_MS]
    assert isinstance(first_seen_ms, int) and abs(first_seen_ms - time.time() * 1000) < 60_000


def _tampered(body: bytes) -> tuple[bytes, str]:
    header = sign(body)
    return body.replace(b'"amount":', b'"amount":1', 1), header


def _signed_with(secret: str) -> Any:
    return lambda body: (body, sign(body, secret))


def _signed_at(offset_s: int) -> Any:
    return lambda body: (body, sign(body, timestamp=int(time.time()) + offset_s))


def _malformed(body: bytes) -> tuple[bytes, str]:
    signature = sign(body).split(",v1=")[1]
    return body, f"v1={signature}"  # no t=


@pytest.mark.parametrize(
    ("make_request", "reason"),
    [
        pytest.param(_tampered, "invalid_signature", id="tampered-body"),
        pytest.param(_signed_with("whsec_someone_else_1234567890"), "invalid_signature", id="wrong-secret"),
        pytest.param(lambda body: (body, None), "missing_signature", id="no-header"),
        pytest.param(_malformed, "malformed_signature", id="malformed-header"),
        pytest.param(lambda body: (body, "t=notanumber,v1=abc"), "malformed_signature", id="non-numeric-t"),
        pytest.param(_signed_at(-301), "timestamp_out_of_tolerance", id="stale-timestamp"),
        pytest.param(_signed_at(+301), "timestamp_out_of_tolerance", id="future-timestamp"),
    ],
)
async def test_bad_signature_is_400_and_queues_nothing(
    receiver: str, http: aiohttp.ClientSession, amqp_url: str, make_request: Any, reason: str
) -> None:
    """Every signature failure is a 400 with a stable reason code, and nothing reaches the queue."""
    body, header = make_request(encode(refund_event()))
    headers = {"Content-Type": "application/json"} | ({"Stripe-Signature": header} if header else {})
    status, answer = await post_raw(http, receiver, body, headers)
    assert status == 400
    assert answer["error"] == reason
    assert TEST_SECRET not in json.dumps(answer)
    await assert_only_sentinel_queued(http, receiver, amqp_url)


async def test_any_configured_secret_verifies_during_rotation(
    receiver_settings: Settings, http: aiohttp.ClientSession, amqp_url: str
) -> None:
    """With two secrets configured, an event signed with the second one is accepted (and the first too)."""
    settings = replace(receiver_settings, webhook_secrets=(SECOND_SECRET, TEST_SECRET))
    async with running("receiver", settings) as base_url:
        by_second, by_first = refund_event(), refund_event()
        assert (await post_event(http, base_url, by_second, secret=TEST_SECRET))[0] == 200
        assert (await post_event(http, base_url, by_first, secret=SECOND_SECRET))[0] == 200
    assert [m.message_id for m in await drain_work_queue(amqp_url)] == [by_second["id"], by_first["id"]]


async def test_oversize_body_is_413_with_content_length(
    receiver: str, http: aiohttp.ClientSession, amqp_url: str
) -> None:
    """A body whose declared length is over RECON_MAX_BODY_BYTES gets a JSON 413 and is not queued."""
    body = encode(refund_event(event_id="evt_oversize_declared") | {"padding": "x" * MAX_BODY_BYTES})
    status, answer = await post_raw(
        http, receiver, body, {"Stripe-Signature": sign(body), "Content-Type": "application/json"}
    )
    assert (status, answer["error"]) == (413, "body_too_large")
    await assert_only_sentinel_queued(http, receiver, amqp_url)


async def test_oversize_chunked_body_is_413(
    receiver: str, http: aiohttp.ClientSession, amqp_url: str
) -> None:
    """A chunked body (no Content-Length) is capped while it streams in: 413, not queued."""
    body = encode(refund_event(event_id="evt_oversize_chunked") | {"padding": "x" * MAX_BODY_BYTES})

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 4096):
            yield body[start : start + 4096]

    status, answer = await post_raw(
        http, receiver, chunks(), {"Stripe-Signature": sign(body), "Content-Type": "application/json"}
    )
    assert (status, answer["error"]) == (413, "body_too_large")
    await assert_only_sentinel_queued(http, receiver, amqp_url)


async def test_body_just_under_the_limit_is_accepted(
    receiver: str, http: aiohttp.ClientSession, amqp_url: str
) -> None:
    """The limit is on size only: a body of exactly RECON_MAX_BODY_BYTES is a normal event."""
    event = refund_event()
    bare = encode(event | {"padding": ""})
    body = encode(event | {"padding": "x" * (MAX_BODY_BYTES - len(bare))})
    assert len(body) == MAX_BODY_BYTES
    assert (await post_event(http, receiver, body))[0] == 200
    assert [m.body for m in await drain_work_queue(amqp_url)] == [body]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        pytest.param(b"not json at all", "invalid_json", id="not-json"),
        pytest.param(b'{"id": "evt_1", "type": "charge.refunded"', "invalid_json", id="truncated-json"),
        pytest.param(b'["evt_1"]', "not_an_event", id="json-array"),
        pytest.param(
            b'{"id": "ch_1", "type": "charge.refunded", "created": 1}', "not_an_event", id="not-evt-id"
        ),
        pytest.param(
            b'{"id": "evt_1", "type": "charge.refunded", "created": "1", "data": {"object": {}}}',
            "not_an_event",
            id="created-not-int",
        ),
        pytest.param(
            b'{"id": "evt_1", "object": "event", "created": 1, "data": {"object": {"id": "re_1"}}}',
            "not_an_event",
            id="no-type",
        ),
        pytest.param(
            b'{"id": "evt_1", "object": "event", "type": "charge.refunded", "created": 1, "data": {}}',
            "not_an_event",
            id="no-data-object",
        ),
        pytest.param(
            b'{"id": "evt_1", "object": "event", "type": "charge.refunded", "created": 1}',
            "not_an_event",
            id="no-data",
        ),
    ],
)
async def test_signed_body_that_is_not_an_event_is_400(
    receiver: str, http: aiohttp.ClientSession, amqp_url: str, body: bytes, reason: str
) -> None:
    """A correctly signed body that is not a JSON Stripe event envelope is a 400 and is not queued."""
    status, answer = await post_event(http, receiver, body)
    assert (status, answer["error"]) == (400, reason)
    await assert_only_sentinel_queued(http, receiver, amqp_url)


async def test_non_utf8_body_is_400(receiver: str, http: aiohttp.ClientSession, amqp_url: str) -> None:
    """A body that is not UTF-8 cannot carry a Stripe signature: 400 not_utf8, not a 500."""
    body = b'{"id": "evt_\xff\xfe", "type": "charge.refunded"}'
    header = f"t={int(time.time())},v1={'0' * 64}"
    status, answer = await post_raw(http, receiver, body, {"Stripe-Signature": header})
    assert (status, answer["error"]) == (400, "not_utf8")
    await assert_only_sentinel_queued(http, receiver, amqp_url)


async def test_wrong_livemode_is_400(
    receiver_settings: Settings, http: aiohttp.ClientSession, amqp_url: str
) -> None:
    """With STRIPE_LIVEMODE=true a test-mode event is a 400 wrong_livemode; a live one is queued."""
    settings = replace(receiver_settings, livemode=True)
    async with running("receiver", settings) as base_url:
        status, answer = await post_event(http, base_url, refund_event(livemode=False))
        assert (status, answer["error"]) == (400, "wrong_livemode")
        live = refund_event(livemode=True)
        assert (await post_event(http, base_url, live))[0] == 200
    assert [m.message_id for m in await drain_work_queue(amqp_url)] == [live["id"]]


async def test_unhandled_type_is_200_ignored_and_not_queued(
    receiver: str, http: aiohttp.ClientSession, amqp_url: str
) -> None:
    """A verified event of a type the worker does not handle is acknowledged but never queued."""
    status, answer = await post_event(http, receiver, fixture("event") | {"created": int(time.time())})
    assert (status, answer) == (200, {"received": True, "ignored": True})
    await assert_only_sentinel_queued(http, receiver, amqp_url)


async def _ready_status(http: aiohttp.ClientSession, base_url: str) -> int:
    async with http.get(f"{base_url}/readyz") as response:
        return response.status


def _through(proxy: TcpProxy, amqp_url: str) -> str:
    # A short reconnect interval (an AMQP_URL option of aio-pika) keeps the test quick.
    return str(URL(amqp_url).with_port(proxy.port).update_query(reconnect_interval="0.2"))


async def test_broker_outage_gives_503_then_recovers(
    receiver_settings: Settings, http: aiohttp.ClientSession, amqp_url: str
) -> None:
    """Broker cut: webhooks and /readyz answer 503; once it is back the same event is queued, once."""
    proxy = TcpProxy("127.0.0.1", 5672)
    await proxy.start()
    settings = replace(receiver_settings, amqp_url=_through(proxy, amqp_url))
    try:
        async with running("receiver", settings) as base_url:
            assert (await post_event(http, base_url, before := refund_event()))[0] == 200
            await proxy.cut()
            await wait_until(lambda: _is(503, _ready_status(http, base_url)), what="/readyz 503")
            event = refund_event()
            status, answer = await post_event(http, base_url, event)
            assert (status, answer["error"]) == (503, "broker_unavailable")
            await proxy.restore()
            await wait_until(lambda: _is(200, _ready_status(http, base_url)), what="/readyz 200 again")
            assert await post_event(http, base_url, event) == (200, {"received": True})
    finally:
        await proxy.close()
    assert [m.message_id for m in await drain_work_queue(amqp_url)] == [before["id"], event["id"]]


async def test_receiver_starts_while_broker_is_down(
    receiver_settings: Settings, http: aiohttp.ClientSession, amqp_url: str
) -> None:
    """Started with the broker unreachable: alive, not ready, 503; it connects once the broker comes."""
    proxy = TcpProxy("127.0.0.1", 5672)
    await proxy.start()
    settings = replace(receiver_settings, amqp_url=_through(proxy, amqp_url))
    await proxy.cut()
    try:
        async with running("receiver", settings) as base_url:
            async with http.get(f"{base_url}/healthz") as response:
                assert response.status == 200
            assert await _ready_status(http, base_url) == 503
            event = refund_event()
            assert (await post_event(http, base_url, event))[0] == 503
            await proxy.restore()
            await wait_until(lambda: _is(200, _ready_status(http, base_url)), what="first connection")
            assert (await post_event(http, base_url, event))[0] == 200
    finally:
        await proxy.close()
    assert [m.message_id for m in await drain_work_queue(amqp_url)] == [event["id"]]


async def _post_or_fail(http: aiohttp.ClientSession, base_url: str, event: dict[str, Any]) -> tuple[str, int]:
    try:
        return event["id"], (await post_event(http, base_url, event))[0]
    except (aiohttp.ClientError, OSError):
        return event["id"], 0  # the server went away before answering: Stripe would retry


async def test_shutdown_with_posts_in_flight_never_acknowledges_an_unqueued_event(
    receiver_settings: Settings, amqp_url: str
) -> None:
    """Stopping the receiver (the SIGTERM path) mid-stream: every event answered 200 is in the queue."""
    events = [refund_event() for _ in range(150)]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=50)) as http:
        async with running("receiver", receiver_settings) as base_url:
            posts = [asyncio.create_task(_post_or_fail(http, base_url, event)) for event in events]

            async def some_answered() -> bool:
                return any(post.done() for post in posts)

            await wait_until(some_answered, what="the first answers")
        answers = await asyncio.gather(*posts)
    accepted = {event_id for event_id, status in answers if status == 200}
    queued = {message.message_id for message in await drain_work_queue(amqp_url)}
    assert accepted, "no request was answered before the shutdown"
    assert accepted <= queued
    assert {status for _, status in answers} <= {200, 0}


async def test_broker_that_never_answers_neither_blocks_start_nor_hangs_shutdown() -> None:
    """A broker that accepts TCP but never speaks AMQP: the receiver starts, is not ready, 503s, and stops."""
    held: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        await reader.read()  # say nothing until the client hangs up

    black_hole = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = black_hole.sockets[0].getsockname()[1]
    # No shared server is involved: plain settings instead of the per-test fixtures.
    settings = Settings(
        amqp_url=f"amqp://guest:guest@127.0.0.1:{port}/",
        webhook_secrets=(TEST_SECRET,),
        http_port=free_port(),
    )
    try:
        # Started means serving: alive while the broker has not answered, so the first connect
        # did not hold up the start; leaving the block returns at all (pytest-timeout bounds it).
        async with aiohttp.ClientSession() as http, running("receiver", settings) as base_url:
            async with http.get(f"{base_url}/healthz") as alive:
                assert alive.status == 200
            assert await _ready_status(http, base_url) == 503
            status, answer = await post_event(http, base_url, refund_event())
            assert (status, answer["error"]) == (503, "broker_unavailable")
        assert held, "the receiver never tried the broker"
    finally:
        black_hole.close()
        for writer in held:
            writer.close()


async def _is(expected: int, status: Any) -> bool:
    return bool(await status == expected)


def _metric(text: str, name: str, labels: str = "") -> float:
    series = f"{name}{{{labels}}} " if labels else f"{name} "
    for line in text.splitlines():
        if line.startswith(series):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_metrics_count_received_verified_rejected_queued_ignored(
    receiver: str, http: aiohttp.ClientSession
) -> None:
    """/metrics counts what this receiver did, by type and by rejection reason, and the ack latency."""

    async def scrape() -> str:
        async with http.get(f"{receiver}/metrics") as response:
            assert response.status == 200
            return await response.text()

    queued, ignored = 'type="charge.refunded"', 'type="plan.created"'
    before = await scrape()
    await post_event(http, receiver, refund_event())
    await post_event(http, receiver, fixture("event") | {"created": int(time.time())})
    await post_event(http, receiver, refund_event(), secret="whsec_not_ours_123456")
    after = await scrape()

    def delta(name: str, labels: str) -> float:
        return _metric(after, name, labels) - _metric(before, name, labels)

    assert delta("recon_webhooks_received_total", queued) == 1
    assert delta("recon_webhooks_received_total", 'type="unverified"') == 1
    assert delta("recon_webhooks_verified_total", queued) == 1
    assert delta("recon_webhooks_queued_total", queued) == 1
    assert delta("recon_webhooks_ignored_total", ignored) == 1
    assert delta("recon_webhooks_rejected_total", 'reason="invalid_signature"') == 1
    assert delta("recon_webhook_ack_seconds_count", "") == 3


async def test_one_log_line_per_request_without_secrets_or_emails(
    receiver: str, http: aiohttp.ClientSession
) -> None:
    """Each POST logs one line with id, type, outcome and latency; never a secret, signature or e-mail."""
    charge = fixture("charge")
    charge["billing_details"]["email"] = "jenny.rosen@example.com"
    event = make_event("charge.refunded", charge)
    body = encode(event)
    header = sign(body)
    signature = header.split("v1=")[1]
    with structlog.testing.capture_logs() as logs:
        await post_event(http, receiver, body, signature=header)
        await post_event(http, receiver, body, signature=f"t={int(time.time())},v1={TEST_SECRET}")
        await post_event(http, receiver, fixture("event") | {"created": int(time.time())})
    lines = [entry for entry in logs if entry["event"] == "webhook"]
    assert [(e["outcome"], e["status"], e["reason"]) for e in lines] == [
        ("queued", 200, None),
        ("rejected", 400, "invalid_signature"),
        ("ignored", 200, None),
    ]
    assert lines[2]["event_type"] == "plan.created"
    assert lines[0]["event_id"] == event["id"] and lines[0]["event_type"] == "charge.refunded"
    assert all(isinstance(e["latency_ms"], float) for e in lines)
    logged = repr(logs)
    for forbidden in (TEST_SECRET, signature, "jenny.rosen", "@example.com"):
        assert forbidden not in logged


async def test_a_broker_nack_is_a_503_and_nothing_is_queued(
    receiver: str, http: aiohttp.ClientSession, amqp_url: str
) -> None:
    """When the broker refuses the message (a full queue with reject-publish nacks it), the answer
    is 503 publish_not_confirmed so Stripe retries, and nothing is queued; once the workers have
    drained the queue below its limit, the same event is accepted and queued, once."""
    refused: list[dict[str, Any]] = []
    async with work_queue_capped(amqp_url):
        await wait_until(lambda: _refused(http, receiver, refused), what="the broker to nack a publish")
        [event] = refused
        before = [m.message_id for m in await drain_work_queue(amqp_url)]  # the workers catch up
        assert event["id"] not in before and before  # what was confirmed stayed queued
        await wait_until(lambda: _accepted(http, receiver, event), what="the queue to take the event again")
        assert [m.message_id for m in await drain_work_queue(amqp_url)] == [event["id"]]


async def _refused(http: aiohttp.ClientSession, base_url: str, refused: list[dict[str, Any]]) -> bool:
    """POST a fresh event; keep it if it was answered 503 publish_not_confirmed."""
    event = refund_event()
    status, answer = await post_event(http, base_url, event)
    if status == 200:
        return False
    assert (status, answer.get("error")) == (503, "publish_not_confirmed"), (status, answer)
    refused.append(event)
    return True


async def _accepted(http: aiohttp.ClientSession, base_url: str, event: dict[str, Any]) -> bool:
    return (await post_event(http, base_url, event))[0] == 200


async def test_concurrent_webhooks_publish_over_several_confirm_channels(
    receiver: str, http: aiohttp.ClientSession, amqp_url: str
) -> None:
    """Requests in flight together are spread over the receiver's confirm channels (one channel
    passes aiormq one publish per event-loop turn); each is still confirmed, and lands once."""
    events = [refund_event() for _ in range(3 * PUBLISH_CHANNELS)]
    answers = await asyncio.gather(*(post_event(http, receiver, event) for event in events))
    assert [status for status, _ in answers] == [200] * len(events)
    queued = [m.message_id for m in await drain_work_queue(amqp_url)]
    assert sorted(queued) == sorted(event["id"] for event in events)
    vhost = vhost_of(amqp_url)
    listed = await asyncio.to_thread(rabbitmqctl, "list_channels", "vhost", "confirm")
    confirm_channels = [row for row in listed.splitlines() if row.split("\t") == [vhost, "true"]]
    assert len(confirm_channels) == PUBLISH_CHANNELS
