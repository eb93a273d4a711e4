"""Acks with as few frames as possible: one ``basic.ack multiple=true`` per run of finished deliveries.

Lanes finish deliveries out of order, so a delivery is acked only once it and every earlier
delivery of its channel have finished (committed and settled): then one frame with ``multiple``
acks them all. On a quorum queue each ack frame is also a write to the queue's Raft log, so this
saves the broker as much as the worker.

A delivery that takes long (a batch retrying through a database hiccup, a slow Stripe fetch)
would hold back the acks behind it and, with them, the prefetch window: once more than
``max_held`` finished deliveries wait behind an unfinished one, they are acked one by one. A later
``multiple`` ack that covers them again is harmless: it acks only what is still outstanding.

A window sends its frames one at a time, in the order its bookkeeping decided them. The frames of
a connection share aiormq's bounded write queue, and a sender that finds room there can overtake
one that was waiting for it: a multiple ack overtaking a nack would ack the delivery meant to be
requeued (lost), and one overtaking a single ack would make that ack name an unknown tag (the
broker closes the channel).
"""

from __future__ import annotations

import asyncio
import bisect
import collections
from typing import Any

from worker.amqp.delivery import Delivery

DEFAULT_MAX_HELD = 100


class AckWindow:
    """The deliveries of one channel, in delivery order, until they are acked."""

    def __init__(self, channel: Any, max_held: int = DEFAULT_MAX_HELD) -> None:
        self.channel = channel
        self.max_held = max_held
        self._outstanding: collections.deque[int] = collections.deque()
        self._finished: dict[int, Delivery] = {}
        self._settled: set[int] = set()  # finished and already acked or nacked on their own
        self._sending = asyncio.Lock()  # decide and send each frame in turn (the module's docstring)

    def delivered(self, message: Delivery) -> None:
        # Sorted even if callbacks ever ran out of order: a multiple ack covers every lower tag.
        bisect.insort(self._outstanding, _tag(message))

    @property
    def outstanding(self) -> int:
        """Delivered and not acked yet: in the lanes, in a running batch, or finished and held."""
        return len(self._outstanding)

    @property
    def held(self) -> int:
        """Finished deliveries not acked yet (waiting behind an unfinished one)."""
        return len(self._finished) - len(self._settled)

    async def ack(self, *messages: Delivery) -> bool:
        """Ack ``messages`` once they and everything delivered before them are finished: one frame
        for all of them (and whatever finished run they complete) when they reach the head.

        Shielded, like each frame: a caller cancelled mid-way (a stop) must not release the lock
        while a frame it decided is still waiting to be written, or the next could overtake it."""
        return await asyncio.shield(self._ack(messages))

    async def _ack(self, messages: tuple[Delivery, ...]) -> bool:
        async with self._sending:
            for message in messages:
                self._finished[_tag(message)] = message
            carrier = self._advance()
            acked = True
            if carrier is not None:
                acked = await carrier.ack(multiple=True)
            for message in messages:
                tag = _tag(message)
                if tag in self._finished and tag not in self._settled and self.held > self.max_held:
                    self._settled.add(tag)
                    acked = await message.ack() and acked
            return acked

    async def nack(self, message: Delivery) -> bool:
        """Requeue ``message`` now; it counts as finished for the acks held behind it (shielded as
        ``ack`` is)."""
        return await asyncio.shield(self._nack(message))

    async def _nack(self, message: Delivery) -> bool:
        async with self._sending:
            self._finished[_tag(message)] = message
            self._settled.add(_tag(message))
            requeued = await message.nack(requeue=True)
            carrier = self._advance()
            if carrier is not None:
                await carrier.ack(multiple=True)
            return requeued

    def _advance(self) -> Delivery | None:
        """Pop the finished run at the head; the last message of it not yet settled on its own
        carries the multiple ack (the settled ones are no longer outstanding at the broker)."""
        carrier = None
        while self._outstanding and self._outstanding[0] in self._finished:
            tag = self._outstanding.popleft()
            message = self._finished.pop(tag)
            if tag in self._settled:
                self._settled.discard(tag)
            else:
                carrier = message
        return carrier


def _tag(message: Delivery) -> int:
    return message.delivery_tag


class Acks:
    """One AckWindow per consuming channel (a reconnect opens a new channel with new tags)."""

    def __init__(self, max_held: int = DEFAULT_MAX_HELD) -> None:
        self.max_held = max_held
        self._windows: dict[int, AckWindow] = {}

    def hold_at_most(self, max_held: int) -> None:
        """A new bound for the windows, when the prefetch changes (a quarter of it, as at start)."""
        self.max_held = max_held
        for window in self._windows.values():
            window.max_held = max_held

    def window(self, message: Delivery) -> AckWindow:
        channel = message.channel
        window = self._windows.get(id(channel))
        if window is None or window.channel is not channel:
            # Forget windows of closed channels: their deliveries come back on the new one.
            self._windows = {key: w for key, w in self._windows.items() if not w.channel.is_closed}
            window = self._windows[id(channel)] = AckWindow(channel, self.max_held)
        return window

    def delivered(self, message: Delivery) -> None:
        self.window(message).delivered(message)

    @property
    def outstanding(self) -> int:
        """Deliveries not acked yet on the open channels (a closed one's come back redelivered)."""
        return sum(w.outstanding for w in self._windows.values() if not w.channel.is_closed)

    async def ack(self, *messages: Delivery) -> bool:
        """Ack ``messages`` (with as few frames as the windows allow); True if all were acked.

        A message whose channel closed while its batch ran (the connection dropped, its broker
        node died) is skipped, not raised on: its ack would be void, the broker redelivers it on
        its own, and the inbox makes that delivery a duplicate. Raising would end the settling of
        the rest of the batch and log the lane as crashed."""
        by_window: dict[int, tuple[AckWindow, list[Delivery]]] = {}
        acked = True
        for message in messages:
            if not message.on_open_channel:
                acked = False
                continue
            window = self.window(message)
            by_window.setdefault(id(window), (window, []))[1].append(message)
        for window, batch in by_window.values():
            acked = await window.ack(*batch) and acked
        return acked

    async def nack(self, message: Delivery) -> bool:
        """Requeue ``message``; one whose channel closed is back in the queue already."""
        if not message.on_open_channel:
            return False
        return await self.window(message).nack(message)
