"""The contract every bus transport implements: publish, subscribe, request-reply and task intake.

Channels are written in NATS subject form everywhere (`forseti.jobs.<job_id>`); each transport maps
them onto its own addressing (see `channels.py` for Kafka's topic + key).
"""

from __future__ import annotations

import asyncio
import contextlib
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol, runtime_checkable


class Settle(StrEnum):
    """How a task delivery ends: done, hand it back for another try, or drop it for good."""

    ACK = "ack"
    NAK = "nak"
    TERM = "term"


@dataclass
class Message:
    """A message handed to a subscriber."""

    channel: str
    data: bytes
    key: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    reply: Callable[[bytes], Awaitable[None]] | None = None

    async def respond(self, data: bytes) -> None:
        """Answer a request; an error when the message was not a request."""
        if self.reply is None:
            raise RuntimeError(f"message on {self.channel} expects no reply")
        await self.reply(data)


MessageHandler = Callable[[Message], Awaitable[None]]


class Delivery(ABC):
    """A task taken from durable intake; it must be settled exactly once (ack, nak or term)."""

    def __init__(self, channel: str, data: bytes, attempt: int) -> None:
        self.channel = channel
        self.data = data
        self.attempt = attempt
        self.settled: Settle | None = None
        self.given_up_after: int | None = None
        """Deliveries after which the bus stopped delivering this task (`on_given_up`); None for a task
        taken from an intake."""

    async def ack(self) -> None:
        """The job reached a terminal state: never deliver this task again."""
        await self._settle(Settle.ACK, 0.0)

    async def nak(self, delay: float = 0.0) -> None:
        """Hand the task back; it is delivered again after `delay` seconds."""
        await self._settle(Settle.NAK, delay)

    async def term(self) -> None:
        """Drop the task for good (it was recorded in the dead-letter channel)."""
        await self._settle(Settle.TERM, 0.0)

    async def in_progress(self) -> None:
        """Tell the server the task is still being worked on, so it is not handed to another worker."""
        return None  # transports without an ack timer need no heartbeat

    async def _settle(self, how: Settle, delay: float) -> None:
        if self.settled is not None:
            return
        self.settled = how
        await self._do_settle(how, delay)

    @abstractmethod
    async def _do_settle(self, how: Settle, delay: float) -> None: ...


class Subscription(Protocol):
    """A live subscription."""

    async def unsubscribe(self) -> None:
        """Stop receiving."""


class TaskIntake(Protocol):
    """Durable, load-shared task intake from one channel for one consumer group."""

    async def take(self, limit: int, timeout: float) -> list[Delivery]:
        """Up to `limit` tasks: those ready now, else the first to arrive within `timeout` seconds
        (an empty list when none did). Take only as many as you will start: the rest wait unacked."""

    async def close(self) -> None:
        """Stop taking tasks; unsettled deliveries go to another consumer."""


class Bus(Protocol):
    """A connection to the message bus."""

    url: str
    transport: str

    async def connect(self) -> None:
        """Open the connection (idempotent)."""

    async def close(self) -> None:
        """Close it, ending every subscription and intake."""

    async def publish(self, channel: str, data: bytes, *, key: str | None = None, dedup_id: str | None = None) -> None:
        """Send one message; task channels are stored durably until a worker takes them. A task sent
        again with the same `dedup_id` (a retried publish) is stored once, where the transport can
        tell (NATS JetStream's duplicate window, the memory broker); Kafka's idempotent producer
        covers its own retries, and workers run one job per request_id whatever arrives twice."""

    async def subscribe(self, channel: str, handler: MessageHandler, *, queue: str | None = None) -> Subscription:
        """Call `handler` for every message on `channel`; with `queue`, once per group instead of per subscriber."""

    async def request(self, channel: str, data: bytes, *, timeout: float) -> bytes:
        """Send a request and wait for the first reply; RequestTimeout when none comes in time."""

    async def follow(self, channel: str, handler: MessageHandler, *, durable: str | None) -> Subscription:
        """Call `handler` for every message on a recorded channel, one at a time and in order, from the
        first one the follower named `durable` has not handled: what was published while it was away
        (stopped, or cut off from the server) comes first. A new name starts from the oldest kept.
        With `durable=None`, every kept message from the oldest, then each new one, and no position
        is kept: for a follower that rebuilds its state from the history at each start."""

    async def intake(self, channel: str, *, group: str) -> TaskIntake:
        """Take tasks from a task channel, shared with every other member of `group`."""

    async def reachable(self) -> bool:
        """Whether the server answers now, for health checks: False while the client reconnects. Never raises."""

    async def take_strays(self, owned: Collection[str], limit: int) -> list[Delivery]:
        """Up to `limit` tasks stored on task channels outside `owned`, which no intake takes and the
        bus would otherwise keep for ever; `term()` (or `ack()`) removes one, `nak()` leaves it."""

    async def on_given_up(self, handler: Callable[[Delivery], Awaitable[None]], *, group: str) -> Subscription:
        """Call `handler` (once per group) with each task the bus stopped delivering to `group`'s
        intakes, delivered `max_deliver` times without being settled; `term()` or `ack()` removes it,
        `nak()` stores it again as a new task. Transports that redeliver until a task is settled
        never give up and never call it."""


async def _nothing_to_stop() -> None:
    return None


@runtime_checkable
class KeptHistory(Protocol):
    """A bus whose kept messages (recorded channels' history, stored tasks) can be deleted one by one
    (NATS, memory; a Kafka topic keeps its records until its retention)."""

    async def erase_kept(self, match: Callable[[str, bytes], bool]) -> int:
        """Delete every kept message for which `match(channel, data)` holds; how many were deleted."""


def empty_subscription() -> Subscription:
    """A subscription with nothing behind it, for what a transport never delivers."""
    return ClosedSubscription(_nothing_to_stop)


class ClosedSubscription:
    """A subscription that runs a callback on unsubscribe; transports build theirs from it."""

    def __init__(self, stop: Callable[[], Awaitable[None]]) -> None:
        self._stop: Callable[[], Awaitable[None]] | None = stop

    async def unsubscribe(self) -> None:
        """Stop receiving (idempotent)."""
        stop, self._stop = self._stop, None
        if stop is not None:
            await stop()


RECANCEL_AFTER = 1.0
"""Seconds a cancelled task may take to end before it is cancelled again."""


async def cancel_and_wait(task: asyncio.Task[object] | None) -> None:
    """Cancel a background task and wait for it to end, cancelling it again while it runs on.

    One cancel can be lost: on Python 3.11, `asyncio.wait_for` returns its inner result when a cancel
    arrives just as that result does (cpython gh-86296, fixed in 3.12), and nats-py's `next_msg`, under
    every JetStream fetch, is built on it. A follower cancelled at that instant fetched on for ever and
    its unsubscribe never returned (seen about 1 run in 15 of tests/contract/test_follow.py)."""
    if task is None or task.done():
        return
    while not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=RECANCEL_AFTER)
    with contextlib.suppress(asyncio.CancelledError):
        await task
