"""Multiple-acks: deliveries finished out of order are acked in as few frames as possible, never
one that has not finished, and a slow delivery cannot hold the whole prefetch window; frames sent
concurrently reach the broker in the order the window decided them."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from worker.consume.acks import Acks

Frame = tuple[str, int, bool]  # ("ack"|"nack", delivery tag, multiple or requeue)


@dataclass
class FakeChannel:
    frames: list[Frame] = field(default_factory=list)
    is_closed: bool = False
    # Loop turns a tag's frame takes to be written (aiormq's write queue full, say); others: none.
    slow: dict[int, int] = field(default_factory=dict)

    async def send(self, frame: Frame) -> None:
        for _ in range(self.slow.get(frame[1], 0)):
            await asyncio.sleep(0)
        self.frames.append(frame)


@dataclass
class FakeMessage:
    """Just what Acks and AckWindow use of a worker.amqp.delivery.Delivery."""

    delivery_tag: int
    on: FakeChannel
    message_id: str = "evt_fake"

    @property
    def channel(self) -> FakeChannel:
        if self.on.is_closed:  # as Delivery.channel: a closed channel's acks are void
            raise RuntimeError("the delivery's channel is closed")
        return self.on

    @property
    def on_open_channel(self) -> bool:
        return not self.on.is_closed

    async def ack(self, *, multiple: bool = False) -> bool:
        await self.channel.send(("ack", self.delivery_tag, multiple))
        return True

    async def nack(self, *, requeue: bool = True) -> bool:
        await self.channel.send(("nack", self.delivery_tag, requeue))
        return False


def deliver(acks: Acks, channel: FakeChannel, count: int) -> list[Any]:
    messages = [FakeMessage(tag, channel) for tag in range(1, count + 1)]
    for message in messages:
        acks.delivered(message)  # type: ignore[arg-type]
    return messages


def acked_up_to(frames: list[Frame]) -> set[int]:
    """The tags the broker considers acked after these frames."""
    done: set[int] = set()
    for kind, tag, flag in frames:
        if kind == "ack" and flag:
            done |= set(range(1, tag + 1))
        else:
            done.add(tag)
    return done


def broker_replay(frames: list[Frame], delivered: int) -> tuple[set[int], set[int]]:
    """What RabbitMQ makes of these frames, in order: the tags acked and the tags requeued. A single
    ack or nack of a tag no longer outstanding is its 'unknown delivery tag', which closes the channel."""
    outstanding, acked, requeued = set(range(1, delivered + 1)), set(), set()
    for kind, tag, flag in frames:
        if kind == "ack" and flag:
            covered = {t for t in outstanding if t <= tag}
            acked |= covered
            outstanding -= covered
            continue
        assert tag in outstanding, f"{kind} of tag {tag}, no longer outstanding: the channel closes"
        outstanding.discard(tag)
        (acked if kind == "ack" else requeued).add(tag)
    return acked, requeued


async def test_in_order_run_is_one_frame() -> None:
    """Finishing 1..5 in order after 1 is done acks each run with one multiple frame."""
    channel = FakeChannel()
    acks = Acks(max_held=100)
    messages = deliver(acks, channel, 5)
    for message in messages[1:]:
        await acks.ack(message)
    assert channel.frames == []  # 1 is not finished: nothing may be acked yet
    await acks.ack(messages[0])
    assert channel.frames == [("ack", 5, True)]


async def test_never_acks_past_an_unfinished_delivery() -> None:
    """With 3 unfinished, 1-2 are acked and 4-6 wait; when 3 finishes, one frame acks 3-6."""
    channel = FakeChannel()
    acks = Acks(max_held=100)
    m = deliver(acks, channel, 6)
    for i in (0, 1, 3, 4, 5):
        await acks.ack(m[i])
    assert acked_up_to(channel.frames) == {1, 2}
    await acks.ack(m[2])
    assert channel.frames[-1] == ("ack", 6, True)
    assert acked_up_to(channel.frames) == set(range(1, 7))


async def test_requeued_delivery_counts_as_finished_and_is_not_acked() -> None:
    """A nack (requeue) settles its delivery alone; the multiple ack behind it carries a later tag."""
    channel = FakeChannel()
    acks = Acks(max_held=100)
    m = deliver(acks, channel, 3)
    await acks.ack(m[2])
    await acks.nack(m[1])
    await acks.ack(m[0])
    assert channel.frames == [("nack", 2, True), ("ack", 3, True)]


async def test_slow_delivery_does_not_hold_the_window() -> None:
    """Past max_held finished deliveries behind an unfinished one, they are acked one by one."""
    channel = FakeChannel()
    acks = Acks(max_held=2)
    m = deliver(acks, channel, 6)
    for message in m[1:]:
        await acks.ack(message)
    assert channel.frames == [("ack", 4, False), ("ack", 5, False), ("ack", 6, False)]
    await acks.ack(m[0])
    assert channel.frames[-1] == ("ack", 3, True)  # 4-6 are already acked: 3 carries the run
    assert acked_up_to(channel.frames) == set(range(1, 7))


async def test_new_channel_after_reconnect_has_its_own_window() -> None:
    """Tags restart on a new channel: its deliveries are acked without waiting for the old ones."""
    old, new = FakeChannel(), FakeChannel()
    acks = Acks(max_held=100)
    deliver(acks, old, 3)
    old.is_closed = True
    fresh = deliver(acks, new, 2)
    await acks.ack(fresh[0])
    await acks.ack(fresh[1])
    assert new.frames == [("ack", 1, True), ("ack", 2, True)]
    assert old.frames == []


async def test_out_of_order_registration_still_never_acks_an_unfinished_tag() -> None:
    """Even if deliveries were registered out of tag order, a multiple ack never covers a lower
    unfinished tag."""
    channel = FakeChannel()
    acks = Acks(max_held=100)
    m2, m1 = FakeMessage(2, channel), FakeMessage(1, channel)
    acks.delivered(m2)  # type: ignore[arg-type]
    acks.delivered(m1)  # type: ignore[arg-type]
    await acks.ack(m2)
    assert channel.frames == []
    await acks.ack(m1)
    assert channel.frames == [("ack", 2, True)]


async def test_a_batch_acked_together_is_one_frame() -> None:
    """A lane's batch is acked in one call: one multiple frame per call once it reaches the head,
    never one per message, and never past the other lane's unfinished deliveries."""
    channel = FakeChannel()
    acks = Acks(max_held=100)
    m = deliver(acks, channel, 6)
    await acks.ack(m[0], m[2], m[3])  # 2 is another lane's, unfinished
    assert channel.frames == [("ack", 1, True)]
    await acks.ack(m[1], m[4], m[5])
    assert channel.frames == [("ack", 1, True), ("ack", 6, True)]


async def test_a_batch_over_the_held_limit_acks_only_down_to_the_limit() -> None:
    """Behind an unfinished delivery, a batch is acked one by one only until max_held remain held."""
    channel = FakeChannel()
    acks = Acks(max_held=2)
    m = deliver(acks, channel, 6)
    await acks.ack(*m[1:])
    assert channel.frames == [("ack", 2, False), ("ack", 3, False), ("ack", 4, False)]
    await acks.ack(m[0])
    assert channel.frames[-1] == ("ack", 6, True)
    assert acked_up_to(channel.frames) == set(range(1, 7))


async def test_a_requeue_at_the_head_releases_the_run_held_behind_it() -> None:
    """Finished deliveries held behind an unfinished one are acked, in one multiple frame after
    the requeue, when that one is requeued instead: the requeue counts as finished."""
    channel = FakeChannel()
    acks = Acks(max_held=100)
    m = deliver(acks, channel, 3)
    await acks.ack(m[1], m[2])
    assert channel.frames == []
    await acks.nack(m[0])
    assert channel.frames == [("nack", 1, True), ("ack", 3, True)]


async def test_deliveries_whose_channel_closed_mid_batch_are_skipped_not_raised() -> None:
    """The connection drops while a batch runs: settling it acks what is still on an open channel
    and skips the rest (the broker redelivers them) instead of raising out of the lane."""
    old, new = FakeChannel(), FakeChannel()
    acks = Acks(max_held=100)
    stranded = deliver(acks, old, 2)
    fresh = FakeMessage(1, new)
    acks.delivered(fresh)  # type: ignore[arg-type]
    old.is_closed = True
    assert await acks.ack(*stranded, fresh) is False  # type: ignore[arg-type]
    assert await acks.nack(stranded[0]) is False  # type: ignore[arg-type]
    assert (old.frames, new.frames) == ([], [("ack", 1, True)])


async def test_a_multiple_ack_never_overtakes_a_requeue_still_being_sent() -> None:
    """Delivery 1 is requeued while its frame waits to be written, and 2-3 finish meanwhile: their
    multiple ack goes out after the requeue, so 1 is requeued, not acked (lost)."""
    channel = FakeChannel(slow={1: 5})
    acks = Acks(max_held=100)
    m = deliver(acks, channel, 3)
    await asyncio.gather(acks.nack(m[0]), acks.ack(m[1], m[2]))
    assert channel.frames == [("nack", 1, True), ("ack", 3, True)]
    assert broker_replay(channel.frames, 3) == ({2, 3}, {1})


async def test_a_multiple_ack_never_overtakes_a_single_ack_still_being_sent() -> None:
    """Past max_held, 2 is acked alone and its frame is slow; 1 finishes meanwhile and its multiple
    ack (covering 2) goes out after it, so the single ack never names a tag already acked."""
    channel = FakeChannel(slow={2: 5})
    acks = Acks(max_held=1)
    m = deliver(acks, channel, 3)
    await asyncio.gather(acks.ack(m[1], m[2]), acks.ack(m[0]))
    assert channel.frames == [("ack", 2, False), ("ack", 3, True)]
    assert broker_replay(channel.frames, 3) == ({1, 2, 3}, set())
