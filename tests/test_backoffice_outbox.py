"""Rule 12's senders: the buyer e-mail over real SMTP (aiosmtplib to an in-process aiosmtpd), host
webhooks signed and retried until the host accepts, a dead server that delays and loses nothing,
and the backlog metrics. The loops are driven one pass at a time (``run_once``), never by sleeping."""

from __future__ import annotations

import json
import ssl
import subprocess
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest
import structlog
from prometheus_client import REGISTRY

from tests import builders as b
from tests import host_records as host
from tests.backoffice_setup import booked_app_refund, paid_order
from tests.conftest import free_port
from tests.host_sink import host_sink, verify_recon_signature
from tests.smtp_sink import smtp_sink
from worker.backoffice.host_webhooks import HostWebhookDeliverer
from worker.backoffice.mail import MailDeliverer
from worker.backoffice.money import format_money
from worker.backoffice.outbox import OutboxRow, OutboxSender, OutboxTimings, Sent

AGAIN_AT_ONCE = OutboxTimings(retry_delays_s=(0.0,))
SECRET = "whsec_host_9d3a61f0c2b84e57"
# An operator putting a finished e-mail back in the queue, due now.
AGAIN = (
    "update recon.outbox set state = 'pending', finished_at = null, due_at = now() where channel = 'email'"
)


async def states(con: asyncpg.Connection, channel: str) -> list[tuple[str, int]]:
    rows = await con.fetch("select state, attempts from recon.outbox where channel = $1 order by id", channel)
    return [(r["state"], r["attempts"]) for r in rows]


@pytest.mark.parametrize(
    ("major", "currency", "shown"),
    [
        ("110000", "jpy", "¥110,000"),
        ("20.00", "usd", "$20.00"),
        ("1.500", "kwd", "1.500 KWD"),
        ("1234.50", "eur", "€1,234.50"),
        ("9.99", "cad", "9.99 CAD"),
    ],
)
async def test_money_is_written_in_the_currencys_own_format(
    con: asyncpg.Connection, major: str, currency: str, shown: str
) -> None:
    """The database's exponent (finance.major_units) with the currency's grouping and symbol."""
    minor = int(Decimal(major) * 10 ** {"jpy": 0, "kwd": 3}.get(currency, 2))
    value = await con.fetchval("select finance.major_units($1, $2)", minor, currency)
    assert format_money(value, currency) == shown


async def test_the_buyer_email_goes_out_over_smtp_with_a_text_and_an_html_part(
    con: asyncpg.Connection, database_url: str
) -> None:
    """The refund e-mail: to the order's buyer, the amount as ¥110,000, the order number, the
    operator's message (escaped in HTML), the 5–10 business days, a Message-ID derived from the
    refund. Sent once; no address in the logs."""
    refund_id = await booked_app_refund(con, "ORD-M1", 110_000, "jpy", "Sorry <b>again</b>")
    port = free_port()
    mail = MailDeliverer(f"smtp://127.0.0.1:{port}", "refunds@shop.example", notify_dashboard_refunds=False)
    with structlog.testing.capture_logs() as logs, smtp_sink(port) as sink:
        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
        try:
            sender = OutboxSender(pool, "email", mail)
            assert await sender.run_once() == 1
            assert await sender.run_once() == 0
        finally:
            await pool.close()
    [message] = sink.messages
    assert sink.recipients == [["buyer@example.com"]]
    assert message["Message-ID"] == f"<refund.{refund_id}@shop.example>"
    assert message["Subject"] == "Your refund of ¥110,000 for order ORD-M1"
    text = message.get_body(("plain",)).get_content()
    html = message.get_body(("html",)).get_content()
    assert "¥110,000" in text and "order ORD-M1" in text and "5–10 business days" in text
    assert "Sorry <b>again</b>" in text
    assert "Sorry &lt;b&gt;again&lt;/b&gt;" in html and "<strong>¥110,000</strong>" in html
    assert await states(con, "email") == [("sent", 1)]
    assert "@example.com" not in repr(logs)


async def test_a_dead_smtp_server_delays_mail_loses_none_and_shows_in_the_metrics(
    con: asyncpg.Connection, database_url: str
) -> None:
    """Nothing listens on the SMTP port: the attempt fails, the row stays pending (attempts counted,
    error kept without the address) and recon_outbox_pending{channel="email"} says 1 with the age of
    the oldest row. When the server is back, the next pass delivers it."""
    await booked_app_refund(con, "ORD-M2", 2000, "usd", "")
    port = free_port()
    mail = MailDeliverer(
        f"smtp://127.0.0.1:{port}", "refunds@shop.example", notify_dashboard_refunds=False, timeout_s=2
    )
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        sender = OutboxSender(pool, "email", mail, AGAIN_AT_ONCE)
        await sender.run_once()
        assert await states(con, "email") == [("pending", 1)]
        error = await con.fetchval("select last_error from recon.outbox where channel = 'email'")
        assert error.startswith("SMTP unavailable") and "@" not in error
        await con.execute("update recon.outbox set created_at = created_at - interval '90 seconds'")
        pending, oldest_s = await sender.observe_backlog()
        assert pending == 1 and oldest_s >= 90
        assert REGISTRY.get_sample_value("recon_outbox_pending", {"channel": "email"}) == 1
        assert REGISTRY.get_sample_value("recon_outbox_oldest_age_seconds", {"channel": "email"}) >= 90
        with smtp_sink(port) as sink:
            await sender.run_once()
        assert len(sink.messages) == 1
        assert await states(con, "email") == [("sent", 2)]
        assert await sender.observe_backlog() == (0, 0.0)
    finally:
        await pool.close()


async def test_a_buyer_address_that_is_not_one_clean_address_is_given_up_and_the_rest_go_out(
    con: asyncpg.Connection, database_url: str
) -> None:
    """The host's buyer_email holds a line break (a header injection attempt) or two addresses: that
    e-mail is given up at once with the reason and no address kept, no one else is mailed, and the
    other rows of the same pass are sent: one bad row never stops the channel."""
    for number in ("ORD-M7", "ORD-M8", "ORD-M9"):
        await booked_app_refund(con, number, 1000, "usd", "")
    bad = {
        "ORD-M7": "buyer@example.com\r\nBcc: someone@elsewhere.example",
        "ORD-M8": "buyer@example.com, someone@elsewhere.example",
    }
    for number, to in bad.items():
        await con.execute(
            "update recon.outbox set payload = jsonb_set(payload, '{to}', to_jsonb($2::text))"
            " where channel = 'email' and payload ->> 'order_number' = $1",
            number,
            to,
        )
    port = free_port()
    mail = MailDeliverer(f"smtp://127.0.0.1:{port}", "refunds@shop.example", notify_dashboard_refunds=False)
    with smtp_sink(port) as sink:
        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
        try:
            assert await OutboxSender(pool, "email", mail).run_once() == 3
        finally:
            await pool.close()
    assert sink.recipients == [["buyer@example.com"]]
    assert [m["Subject"] for m in sink.messages] == ["Your refund of $10.00 for order ORD-M9"]
    rows = await con.fetch(
        "select payload ->> 'order_number' as number, state, last_error from recon.outbox"
        " where channel = 'email' order by id"
    )
    assert [(r["number"], r["state"]) for r in rows] == [
        ("ORD-M7", "gave_up"),
        ("ORD-M8", "gave_up"),
        ("ORD-M9", "sent"),
    ]
    assert all("@" not in (r["last_error"] or "") for r in rows)


async def test_a_deliverer_that_crashes_on_one_row_keeps_it_for_a_retry_and_sends_the_rest(
    con: asyncpg.Connection, database_url: str
) -> None:
    """A bug in a deliverer (here it raises KeyError on one row) is that row's failure, kept for a
    retry with the error's type only; the pass delivers the others and returns."""
    for number in ("ORD-M10", "ORD-M11"):
        await booked_app_refund(con, number, 1000, "usd", "")

    class Flaky:
        async def deliver(self, row: OutboxRow) -> Sent:
            if row.payload["order_number"] == "ORD-M10":
                raise KeyError("buyer@example.com")
            return Sent()

    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        assert await OutboxSender(pool, "email", Flaky()).run_once() == 2
    finally:
        await pool.close()
    rows = await con.fetch(
        "select state, attempts, last_error from recon.outbox where channel = 'email' order by id"
    )
    assert [tuple(r) for r in rows] == [("pending", 1, "unexpected KeyError"), ("sent", 1, None)]


def _self_signed_tls(directory: Path) -> ssl.SSLContext:
    """A server context with a certificate no client trusts (openssl, made for this test)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


async def test_smtp_upgrades_to_tls_whenever_the_server_offers_it(
    con: asyncpg.Connection, database_url: str, tmp_path: Path
) -> None:
    """A plain smtp:// URL takes STARTTLS when the server offers it, so the buyer's address (and a
    password) never cross in clear by default: against a certificate it cannot trust, nothing is
    sent and the row waits. ``?starttls=false`` is the explicit way to send in clear."""
    await booked_app_refund(con, "ORD-M12", 1000, "usd", "")
    port = free_port()
    with smtp_sink(port, tls_context=_self_signed_tls(tmp_path)) as sink:
        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
        try:
            for url in (f"smtp://127.0.0.1:{port}", f"smtp://127.0.0.1:{port}?starttls=false"):
                mail = MailDeliverer(url, "refunds@shop.example", notify_dashboard_refunds=False, timeout_s=5)
                await OutboxSender(pool, "email", mail, AGAIN_AT_ONCE).run_once()
                if "starttls" not in url:
                    assert (sink.messages, await states(con, "email")) == ([], [("pending", 1)])
        finally:
            await pool.close()
    assert len(sink.messages) == 1
    assert await states(con, "email") == [("sent", 2)]


async def test_host_webhooks_are_signed_and_retried_until_the_host_accepts(
    con: asyncpg.Connection, database_url: str
) -> None:
    """A host that answers 503 twice, then 200: three attempts of the same body (same id), each
    signed as rule 12 says (a host verifying with the secret accepts it, with another secret not);
    then the row is sent and not posted again."""
    (charge_id,) = await paid_order(con, None, "ORD-M3", [1000])  # pending -> paid: order.status_changed
    port = free_port()
    hooks = HostWebhookDeliverer(f"http://127.0.0.1:{port}/recon-webhooks", SECRET)
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        sender = OutboxSender(pool, "host_webhook", hooks, AGAIN_AT_ONCE)
        async with host_sink(port, fail_first=2) as sink:
            for _ in range(4):
                await sender.run_once()
    finally:
        await hooks.close()
        await pool.close()
    assert [status for *_, status in sink.attempts] == [503, 503, 200]
    bodies = {raw for _, raw, _, _ in sink.attempts}
    assert len(bodies) == 1
    body = json.loads(bodies.pop())
    assert body["type"] == "order.status_changed" and body["id"].startswith("evt_recon_")
    assert body["data"] == {
        "order_number": "ORD-M3",
        "status": "paid",
        "previous_status": "pending",
        "disputed": False,
    }
    assert isinstance(body["created"], int)
    for _, raw, signature, _ in sink.attempts:
        assert verify_recon_signature(raw, signature, SECRET)
        assert not verify_recon_signature(raw, signature, "whsec_someone_else")
    assert await states(con, "host_webhook") == [("sent", 3)]
    assert charge_id


async def test_a_host_webhook_is_given_up_after_its_deadline(
    con: asyncpg.Connection, database_url: str
) -> None:
    """Past the channel's deadline (3 days in production) a failing row is given up, with its error."""
    await paid_order(con, None, "ORD-M4", [1000])
    port = free_port()  # nothing listens
    hooks = HostWebhookDeliverer(f"http://127.0.0.1:{port}/recon-webhooks", SECRET, timeout_s=2)
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        await con.execute("update recon.outbox set created_at = now() - interval '4 days'")
        sender = OutboxSender(pool, "host_webhook", hooks, OutboxTimings(give_up_after_s=3 * 86400))
        await sender.run_once()
    finally:
        await hooks.close()
        await pool.close()
    state, error = await con.fetchrow("select state, last_error from recon.outbox")
    assert state == "gave_up" and error.startswith("unreachable")


async def test_without_smtp_or_a_host_url_messages_are_recorded_not_sent(
    con: asyncpg.Connection, database_url: str
) -> None:
    """No SMTP_URL: the e-mail row is kept as recorded (skipped), never retried. No host URL: host
    webhook rows are skipped. A refund made outside the app is e-mailed only with
    RECON_NOTIFY_DASHBOARD_REFUNDS."""
    (charge_id,) = await paid_order(con, None, "ORD-M5", [3000])
    await host.apply(
        con, b.incoming(b.refund_event("refund.created", b.refund(charge_id=charge_id, amount=300)))
    )
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    port = free_port()
    try:
        await OutboxSender(pool, "host_webhook", HostWebhookDeliverer(None, None)).run_once()
        quiet = MailDeliverer(f"smtp://127.0.0.1:{port}", "r@shop.example", notify_dashboard_refunds=False)
        await OutboxSender(pool, "email", quiet).run_once()
        dashboard_mail = await con.fetchval("select last_error from recon.outbox where channel = 'email'")
        await con.execute(AGAIN)
        await OutboxSender(
            pool, "email", MailDeliverer(None, "r@shop.example", notify_dashboard_refunds=True)
        ).run_once()
        unsent = await con.fetchval("select last_error from recon.outbox where channel = 'email'")
        await con.execute(AGAIN)
        loud = MailDeliverer(f"smtp://127.0.0.1:{port}", "r@shop.example", notify_dashboard_refunds=True)
        with smtp_sink(port) as sink:
            await OutboxSender(pool, "email", loud).run_once()
    finally:
        await pool.close()
    assert {s for s, _ in await states(con, "host_webhook")} == {"skipped"}
    assert "RECON_NOTIFY_DASHBOARD_REFUNDS" in dashboard_mail
    assert "SMTP_URL is not set" in unsent
    assert len(sink.messages) == 1 and await states(con, "email") == [("sent", 3)]


def test_retries_back_off_and_the_last_delay_repeats() -> None:
    """The default delays grow from 10 s to an hour and then stay at an hour."""
    timings = OutboxTimings()
    assert [timings.delay_after(n) for n in (1, 2, 3, 6, 7, 50)] == [
        10.0,
        30.0,
        120.0,
        3600.0,
        3600.0,
        3600.0,
    ]
