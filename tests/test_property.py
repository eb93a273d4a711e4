"""Rule 3 end to end: any delivery order, with duplicates, ends in the model's ledger and statuses.

Each hypothesis example gets a database and a vhost of its own (function-scoped fixtures do not
run per example, so they are made here), seeds the host app's rows, posts the rendered events —
shuffled, some twice — signed to the real receiver, and lets TWO ``recon worker`` processes
consume them concurrently, as in production. Once every event has a final outcome the finance
views are compared with ``tests.model``.

Cost: one example is ~3-4 s (two interpreters start, events flow, workers drain), more when an
event must wait out RECON_UNMATCHED_RETRY_S; so few examples, and no shrinking (each shrink step
is a whole example again; the failing example is printed in full anyway). RECON_PROPERTY_EXAMPLES
and RECON_PROPERTY_SHRINK=1 raise both for a long local run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import asyncpg
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests import servers
from tests.conftest import _vhosts, free_port
from tests.harness import events_settled, fetch, post_event, running, wait_until
from tests.histories import deliveries, render_all
from tests.histories import histories as history_strategy
from tests.model import Charge, Expected, expected, ledger_differences
from tests.stripe_events import TEST_SECRET
from worker.amqp import topology
from worker.settings import Settings

PROJECT_ROOT = Path(__file__).resolve().parent.parent
UNMATCHED_RETRY_S = 8  # waiting for a metadata charge's own event, or a checkpoint that never meets
EXAMPLES = int(os.environ.get("RECON_PROPERTY_EXAMPLES", "12"))
PHASES = [Phase.explicit, Phase.reuse, Phase.generate]
if os.environ.get("RECON_PROPERTY_SHRINK") == "1":
    PHASES.append(Phase.shrink)


def worker_env(s: Settings) -> dict[str, str]:
    """The environment of a ``recon worker`` process for these settings (no API key unless set)."""
    ours = ("STRIPE_", "RECON_", "DATABASE_", "AMQP_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    env.update(
        DATABASE_URL=s.database_url,
        AMQP_URL=s.amqp_url,
        STRIPE_WEBHOOK_SECRETS=",".join(s.webhook_secrets),
        RECON_WORKER_HTTP_PORT=str(s.worker_http_port),
        RECON_RETRY_DELAYS_S=",".join(str(d) for d in s.retry_delays_s),
        RECON_UNMATCHED_RETRY_S=str(s.unmatched_retry_s),
        RECON_MAX_ATTEMPTS=str(s.max_attempts),
        LOG_FORMAT="json",
        LOG_LEVEL="info",
        # The project itself, ahead of the editable install's finder (which may predate a package).
        PYTHONPATH=str(PROJECT_ROOT),
    )
    if s.stripe_api_key:
        env.update(STRIPE_API_KEY=s.stripe_api_key, STRIPE_API_BASE=s.stripe_api_base or "")
    return env


@dataclass
class Workers:
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    def check_alive(self) -> None:
        """Fail at once, with the log, when a worker died (instead of waiting out a deadline)."""
        for proc, log in zip(self.procs, self.logs, strict=True):
            if proc.poll() is not None:
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-12:])
                raise AssertionError(f"recon worker exited with {proc.returncode}:\n{tail}")


@contextlib.asynccontextmanager
async def worker_processes(s: Settings, count: int, log_dir: Path) -> AsyncIterator[Workers]:
    """``count`` real ``recon worker`` processes (distinct health ports), with their log files.

    Leaving sends SIGTERM and waits for the drain, so the logs are complete afterwards.
    """
    workers = Workers()
    procs, logs = workers.procs, workers.logs
    try:
        for n in range(count):
            log_path = log_dir / f"worker{n}.log"
            port_settings = replace(s, worker_http_port=free_port())
            with log_path.open("wb") as out:
                procs.append(
                    subprocess.Popen(  # noqa: ASYNC220 - start-up only, returns at once
                        [sys.executable, "-P", "-m", "worker.cli", "worker"],  # -P: not the cwd's modules
                        env=worker_env(port_settings),
                        cwd=log_dir,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                )
            logs.append(log_path)
        yield workers
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                await asyncio.to_thread(proc.wait, 30)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)


def _method(charge: Charge) -> str:
    if charge.card_present:
        return "stripe_terminal"
    return "stripe_link" if charge.owner == "invoice" else "stripe_card"


async def seed_host_rows(database_url: str, history: list[Charge]) -> None:
    """What the host app writes (the host tables): an order or invoice per charge, a payment if recorded."""
    con = await asyncpg.connect(database_url)
    try:
        for c in history:
            if c.owner == "order":
                owner_id = await con.fetchval(
                    "insert into recon.orders (number, currency, amount_total, buyer_email, status)"
                    " values ($1, $2, $3, $4, $5) returning id",
                    c.number,
                    c.currency,
                    c.amount,
                    f"{c.number.lower()}@example.com",
                    "rejected" if c.rejected else "pending",
                )
            else:
                owner_id = await con.fetchval(
                    "insert into recon.invoices (number, currency, amount_total, bill_to)"
                    " values ($1, $2, $3, $4) returning id",
                    c.number,
                    c.currency,
                    c.amount,
                    f"{c.number.lower()}@example.com",
                )
            if c.host_recorded:
                await con.execute(
                    "insert into recon.payments (stripe_charge_id, stripe_payment_intent_id, order_id,"
                    " invoice_id, method, currency, amount) values ($1, $2, $3, $4, $5, $6, $7)",
                    c.id if c.recorded == "charge" else None,
                    c.payment_intent if c.recorded == "payment_intent" else None,
                    owner_id if c.owner == "order" else None,
                    owner_id if c.owner == "invoice" else None,
                    _method(c),
                    c.currency,
                    c.amount,
                )
    finally:
        await con.close()


async def read_outcome(database_url: str) -> dict[str, Any]:
    """Everything the comparison needs, read from what finance and the host app see."""
    ledger = await fetch(
        database_url, "select kind, amount, currency, stripe_object_id, stripe_charge_id from finance.ledger"
    )
    return {
        "ledger": [tuple(r) for r in ledger],
        "balances": {
            r["stripe_charge_id"]: dict(r)
            for r in await fetch(database_url, "select * from finance.payment_balances")
        },
        "owners": {
            r["number"]: (r["status"], r["disputed"])
            for r in await fetch(
                database_url,
                "select number, status, disputed from recon.orders union all "
                "select number, payment_link_status, disputed from recon.invoices",
            )
        },
        "payments": await fetch(database_url, "select stripe_charge_id, method from recon.payments"),
        "events": {
            r["stripe_event_id"]: r["outcome"]
            for r in await fetch(database_url, "select stripe_event_id, outcome from finance.events")
        },
        "exceptions": [
            tuple(r)
            for r in await fetch(
                database_url, "select kind, stripe_event_id, stripe_object_id from finance.exceptions"
            )
        ],
    }


def may_never_meet(event: dict[str, Any], exp: Expected) -> bool:
    """A charge.refunded whose live refunds exceed what finally stays refunded (a refund failed
    after it): rule 4 lets it end as a refund_mismatch, depending on when it is judged."""
    charge = event["data"]["object"]
    if event["type"] != "charge.refunded":
        return False
    live = charge["amount_refunded"] - (charge["amount"] - charge["amount_captured"])
    return bool(live > exp.balances[charge["id"]].amount_refunded)


def charge_differences(c: Charge, exp: Expected, got: dict[str, Any]) -> list[str]:
    problems = []
    want, have = exp.balances[c.id], got["balances"].get(c.id)
    if have is None:
        return [f"{c.id}: no payment_balances row"]
    for column, value in vars(want).items():
        if (value is not None or column == "dispute_status") and have[column] != value:
            problems.append(f"{c.id}: payment_balances.{column} = {have[column]!r}, model says {value!r}")
    status, disputed = got["owners"][c.number]
    if exp.statuses[c.number] is not None and status != exp.statuses[c.number]:
        problems.append(f"{c.number}: status {status!r}, model says {exp.statuses[c.number]!r}")
    if disputed != exp.disputed[c.number]:
        problems.append(f"{c.number}: disputed {disputed}, model says {exp.disputed[c.number]}")
    methods = [p["method"] for p in got["payments"] if p["stripe_charge_id"] == c.id]
    if methods != [_method(c)]:
        problems.append(f"{c.id}: payments rows with methods {methods}, expected one {_method(c)!r}")
    return problems


def differences(history: list[Charge], events: list[dict[str, Any]], got: dict[str, Any]) -> list[str]:
    exp = expected(history)
    problems = ledger_differences(exp, got["ledger"])
    for c in history:
        problems += charge_differences(c, exp, got)
    never_meet = {e["id"] for e in events if may_never_meet(e, exp)}
    for e in events:
        outcome = got["events"].get(e["id"])
        if outcome in ("applied", "duplicate", "stale") or (outcome == "mismatch" and e["id"] in never_meet):
            continue
        problems.append(f"{e['type']} {e['id']} ({e['data']['object']['id']}): outcome {outcome!r}")
    failed_seen: list[str] = []
    for kind, event_id, object_id in got["exceptions"]:
        if kind == "refund_failed":
            failed_seen.append(object_id)
        elif not (kind == "refund_mismatch" and event_id in never_meet):
            problems.append(f"exception {kind} for {event_id} / {object_id}")
    if sorted(failed_seen) != sorted(exp.refund_failed):
        problems.append(
            f"refund_failed raised for {sorted(failed_seen)}, model says {sorted(exp.refund_failed)}"
        )
    return problems


async def release_queues(s: Settings) -> None:
    """Delete this vhost's queues once done with it: each quorum queue is a Raft group the shared
    broker keeps running until the vhost goes at the end of the session, and a few hundred of them
    make every vhost operation take a minute."""
    with contextlib.suppress(Exception):  # cleanup of a run that may have failed on the broker
        connection = await aio_pika.connect(s.amqp_url, timeout=10)
        async with connection:
            channel = await connection.channel()
            names = [topology.WORK_QUEUE, topology.DEAD_QUEUE]
            names += [q.name for q in topology.retry_queues(s.retry_delays_s)]
            for name in names:
                await channel.queue_delete(name)


async def unsettled(database_url: str, ids: list[str], log_dir: Path) -> str:
    """Why an example did not settle: the outcomes so far and the tail of each worker's log."""
    rows = await fetch(database_url, "select stripe_event_id, type, outcome, attempts from finance.events")
    seen = {r["stripe_event_id"]: f"{r['type']} {r['outcome']} x{r['attempts']}" for r in rows}
    lines = [f"  {i}: {seen.get(i, 'never recorded')}" for i in dict.fromkeys(ids)]
    for log in sorted(log_dir.glob("worker*.log")):  # noqa: ASYNC240 - a failure report, after the fact
        lines += [f"--- {log.name}", *log.read_text(errors="replace").splitlines()[-15:]]
    return "\n".join(lines)


async def run_example(pg_template: str, history: list[Charge], delivered: list[dict[str, Any]]) -> None:
    db_name = await servers.clone_database(pg_template)
    s = Settings(
        database_url=servers.database_url(db_name),
        amqp_url=servers.amqp_url(await _vhosts.take()),
        webhook_secrets=(TEST_SECRET,),
        http_port=free_port(),
        worker_http_port=free_port(),
        retry_delays_s=(0.2, 0.5, 1.0),
        unmatched_retry_s=UNMATCHED_RETRY_S,
        max_attempts=5,
    )
    try:
        await seed_host_rows(s.database_url, history)
        with tempfile.TemporaryDirectory() as tmp:
            async with running("receiver", s) as base_url, aiohttp.ClientSession() as http:
                async with worker_processes(s, 2, Path(tmp)) as workers:
                    for event in delivered:
                        status, body = await post_event(http, base_url, event)
                        assert status == 200, (status, body)
                    ids = [e["id"] for e in delivered]

                    async def settled() -> bool:
                        workers.check_alive()
                        return await events_settled(s.database_url, ids)

                    try:
                        await wait_until(
                            settled,
                            timeout_s=UNMATCHED_RETRY_S + 40,
                            interval_s=0.2,
                            what="every event to reach a final outcome",
                        )
                    except AssertionError as exc:
                        why = await unsettled(s.database_url, ids, Path(tmp))
                        raise AssertionError(f"{exc}\n{why}") from None
                    got = await read_outcome(s.database_url)
        problems = differences(history, delivered, got)
        assert not problems, "\n".join(["the finance views disagree with the model:", *problems])
    finally:
        await servers.drop_database(db_name)
        await release_queues(s)


@st.composite
def scenarios(draw: Any) -> tuple[list[Charge], list[dict[str, Any]]]:
    history = draw(history_strategy())
    events = render_all(history, run_tag=uuid.uuid4().hex[:8])
    return history, draw(deliveries(events))


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    phases=PHASES,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(scenario=scenarios())
def test_any_delivery_order_with_duplicates_ends_in_the_models_ledger(
    pg_template: str, scenario: tuple[list[Charge], list[dict[str, Any]]]
) -> None:
    """Rule 3 (with 2, 4, 5, 6, 7): whatever the delivery order and duplicates, across both API eras
    and two concurrent workers, finance.ledger, finance.payment_balances and the order/invoice
    statuses end as the model of the true history says; no event ends unmatched or dead-lettered."""
    history, delivered = scenario
    asyncio.run(run_example(pg_template, history, delivered))


def test_model_lets_a_failed_refund_net_to_zero_only_as_a_whole_pair() -> None:
    """Rule 4 as the oracle reads it: a refund that ends failed is either never booked or booked
    and reversed once; half a pair, or the pair twice, is a difference."""
    from tests.model import Authorise, RefundStep

    charge = Charge(
        id="ch_1",
        payment_intent="pi_1",
        currency="eur",
        amount=1000,
        recorded="charge",
        owner="order",
        number="ORD-1",
        rejected=False,
        card_present=False,
        era="new",
        announce_succeeded=True,
        dispute_id="dp_1",
        dispute_reason="general",
        dispute_amount=1000,
        steps=(
            Authorise(1, True),
            RefundStep(2, "re_1", 400, "pending"),
            RefundStep(3, "re_1", 400, "failed"),
        ),
    )
    exp = expected([charge])
    base = [("charge", 1000, "eur", "ch_1", "ch_1")]
    booked = ("refund", -400, "eur", "re_1", "ch_1")
    reversal = ("refund_reversal", 400, "eur", "re_1", "ch_1")
    assert ledger_differences(exp, base) == []
    assert ledger_differences(exp, [*base, booked, reversal]) == []
    assert ledger_differences(exp, [*base, booked]) != []
    assert ledger_differences(exp, [*base, booked, reversal, booked, reversal]) != []
    assert exp.balances["ch_1"].status == "paid" and exp.balances["ch_1"].net_amount == 1000
