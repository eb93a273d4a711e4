"""The receiver's one AMQP connection and its confirm channels, kept up for the app's lifetime.

The receiver starts even when the broker is down: it answers 503 (Stripe retries for days)
and /readyz says why, while a background task keeps connecting. Once connected, aio-pika's
robust connection reconnects by itself and restores the confirm channels.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aio_pika
import aiormq
import structlog
from aio_pika.abc import AbstractRobustConnection

from worker.amqp.connection import CONNECT_TIMEOUT_S, connect, declare_topology
from worker.amqp.publisher import PUBLISH_TIMEOUT_S, Outgoing, Publisher, open_publisher
from worker.settings import Settings
from worker.shutdown import Deadline

log = structlog.get_logger(__name__)

# A healthy broker answers in tens of milliseconds; a dead one must not delay start-up long.
FIRST_CONNECT_WAIT_S = 5.0
RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 10.0
# Publishes still in flight at shutdown get this long to be confirmed before the connection
# closes; a publish gives up on its own after PUBLISH_TIMEOUT_S anyway.
DRAIN_S = PUBLISH_TIMEOUT_S + 1.0
CLOSE_TIMEOUT_S = 5.0
# An attempt in progress ends by itself: handshake, then declarations, then a close if it failed.
CONNECTOR_STOP_S = CONNECT_TIMEOUT_S * 2 + CLOSE_TIMEOUT_S

# aiormq serialises a channel's publishes under a lock that it holds until the writer task has
# taken the frame, and hands to the next publisher a loop turn later: one channel carries at most
# about one publish per turn, and concurrent webhooks queue for it. Measured with one channel
# against eight: POST → 200 p99 ~230 ms against ~25 ms in `recon run` at 700/s (the lanes share the
# loop, so turns are long), and 79–98 ms against 47–56 ms in intake alone at 64 in flight
# (docs/performance.md, "The seventh session"). Publishes go round-robin over the channels, each
# with its own confirms; mandatory and the exact bytes are unchanged.
PUBLISH_CHANNELS = 8

_CONNECTION_LOST = "broker connection lost, reconnecting"

_TRANSIENT = (aiormq.exceptions.AMQPConnectionError, ConnectionError, OSError, asyncio.TimeoutError)


class BrokerUnavailable(Exception):
    """No usable connection right now: the request gets 503 without trying to publish."""


class BrokerLink:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._connection: AbstractRobustConnection | None = None
        self._publishers: list[Publisher] = []  # one per confirm channel
        self._turn = 0
        self._connector: asyncio.Task[None] | None = None
        self._problem = "broker not connected yet"
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._first_attempt = asyncio.Event()
        self._closing = asyncio.Event()

    async def start(self) -> None:
        """Connect and declare the topology; if the broker is unreachable, keep trying in the background.

        Returns after the first attempt. A broker that answers but rejects our topology (argument
        drift: PRECONDITION_FAILED) is an operator error, not an outage: it fails the start.
        """
        self._connector = asyncio.create_task(self._keep_connecting(), name="recon-broker-connect")
        first_attempt = asyncio.create_task(self._first_attempt.wait())
        try:
            await asyncio.wait(
                {self._connector, first_attempt},
                timeout=FIRST_CONNECT_WAIT_S,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            first_attempt.cancel()
        if self._connector.done():
            self._connector.result()

    async def _keep_connecting(self) -> None:
        delay_s = RECONNECT_MIN_S
        while not self._closing.is_set():
            try:
                await self._connect()
                if self._connection is not None:  # None: close() came first and it was closed again
                    log.info("broker_connected")
                return
            except _TRANSIENT as exc:
                # Never the URL: it may hold a password.
                self._problem = f"broker unreachable ({type(exc).__name__})"
                log.warning("broker_unreachable", error=type(exc).__name__, retry_in_s=delay_s)
            except aio_pika.exceptions.AMQPError as exc:
                self._problem = f"broker refused the topology ({type(exc).__name__})"
                log.error("broker_topology_failed", error=type(exc).__name__, detail=str(exc))
                raise
            self._first_attempt.set()
            # Only the pause is cut short by close(): cancelling an attempt mid-handshake would
            # leave aio-pika's own reconnect task behind, which swallows cancellation and hangs exit.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay_s):
                    await self._closing.wait()
            delay_s = min(delay_s * 2, RECONNECT_MAX_S)

    async def _connect(self) -> None:
        # connect bounds the handshake itself (CONNECT_TIMEOUT_S), so an attempt ends.
        connection = await connect(self._settings.amqp_url)
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                await declare_topology(connection, self._settings)
                publishers = [await open_publisher(connection) for _ in range(PUBLISH_CHANNELS)]
        except BaseException:
            await self._close_connection(connection)
            raise
        if self._closing.is_set():
            await self._close_connection(connection)
            return
        # A broker that came back without our definitions (a new node) would make every
        # publish unroutable: declare again after each reconnect (idempotent).
        connection.reconnect_callbacks.add(self._redeclare)
        self._connection = connection
        self._publishers = publishers

    @staticmethod
    async def _close_connection(
        connection: AbstractRobustConnection, within_s: float = CLOSE_TIMEOUT_S
    ) -> None:
        timeout_s = min(CLOSE_TIMEOUT_S, within_s)
        try:
            # A broker that stopped answering would never send Close-Ok: SIGTERM must not hang.
            async with asyncio.timeout(timeout_s):
                await connection.close()
        except TimeoutError:
            log.warning("broker_close_timed_out", after_s=timeout_s)

    async def _redeclare(self, _sender: Any) -> None:
        if self._connection is None:
            return
        try:
            await declare_topology(self._connection, self._settings)
        except (*_TRANSIENT, aio_pika.exceptions.AMQPError) as exc:
            log.error("broker_redeclare_failed", error=type(exc).__name__)

    def not_ready_reason(self) -> str | None:
        """None while publishes can be confirmed, else why not (for /readyz and the logs)."""
        if self._connection is None or not self._publishers:
            return self._problem
        if not self._connection.connected.is_set() or any(p.channel.is_closed for p in self._publishers):
            return _CONNECTION_LOST
        return None

    async def publish(self, message: Outgoing) -> None:
        """Returns once the broker confirmed; raises BrokerUnavailable or PublishFailed."""
        if self._connection is None or not self._publishers:
            raise BrokerUnavailable(self._problem)
        self._turn = (self._turn + 1) % len(self._publishers)
        publisher = self._publishers[self._turn]
        # Only the channel this publish takes: asking all eight, as readiness does, was 2.5% of
        # the receiver's py-spy samples under load (docs/performance.md, "The eighth session").
        if not self._connection.connected.is_set() or publisher.channel.is_closed:
            raise BrokerUnavailable(_CONNECTION_LOST)
        self._in_flight += 1
        self._idle.clear()
        try:
            await publisher.publish_event(message)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def close(self, deadline: Deadline) -> None:
        """Stop connecting, let in-flight publishes be confirmed, then close the connection: each
        step bounded by its own limit and by what the shutdown deadline leaves."""
        self._closing.set()
        if self._connector is not None:
            done, _ = await asyncio.wait(
                {self._connector}, timeout=min(CONNECTOR_STOP_S, deadline.remaining())
            )
            if not done:
                self._connector.cancel()
            # Also collects a fatal topology error the task may have ended with.
            await asyncio.gather(self._connector, return_exceptions=True)
        try:
            async with asyncio.timeout(min(DRAIN_S, deadline.remaining())):
                await self._idle.wait()
        except TimeoutError:
            log.warning("broker_close_with_publishes_in_flight", in_flight=self._in_flight)
        if self._connection is not None:
            await self._close_connection(self._connection, deadline.remaining())
