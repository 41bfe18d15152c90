"""`memory://`: an in-process bus with the same semantics as the real ones, for tests and embedding.

Several `MemoryBus` objects that share one `MemoryBroker` talk to each other, as clients of one
server would; nothing is durable beyond the broker's lifetime.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from collections import OrderedDict, defaultdict, deque
from collections.abc import Awaitable, Callable, Collection, Coroutine
from dataclasses import dataclass
from typing import Any

from forseti.schemas.errors import BusError, RequestTimeout

from .base import (
    ClosedSubscription,
    Delivery,
    Message,
    MessageHandler,
    Settle,
    Subscription,
    cancel_and_wait,
    empty_subscription,
)
from .channels import check_recorded, is_recorded_channel, is_task_channel, subject_matches

log = logging.getLogger(__name__)

DEDUP_KEPT = 10_000
"""Task de-duplication ids the memory broker remembers (JetStream keeps its own for a time window)."""


@dataclass
class _Stored:
    data: bytes
    attempt: int = 1


@dataclass
class _Sub:
    pattern: str
    handler: MessageHandler
    queue: str | None
    owner: MemoryBus


class _TaskQueue:
    """One durable task channel: pending messages and a wake-up for waiting consumers."""

    def __init__(self) -> None:
        self.pending: deque[_Stored] = deque()
        self.ready = asyncio.Condition()

    async def put(self, item: _Stored, *, front: bool = False) -> None:
        async with self.ready:
            (self.pending.appendleft if front else self.pending.append)(item)
            self.ready.notify()


class _Record:
    """A recorded channel's history, and a wake-up for its followers."""

    def __init__(self) -> None:
        self.items: list[bytes | None] = []
        """The history; an erased message leaves None, so followers' positions keep their meaning."""
        self.grew = asyncio.Condition()


class MemoryBroker:
    """The shared in-process server that MemoryBus clients connect to."""

    def __init__(self) -> None:
        self.subs: list[_Sub] = []
        self.queues: dict[str, _TaskQueue] = defaultdict(_TaskQueue)
        self.records: dict[str, _Record] = defaultdict(_Record)
        self.positions: dict[str, int] = {}
        """Per durable follower, the index of the first recorded message it has not handled."""
        self._round_robin = itertools.count()
        self._seen: OrderedDict[str, None] = OrderedDict()

    def first_sight(self, dedup_id: str) -> bool:
        """True the first time a task's de-duplication id is seen among the last `DEDUP_KEPT`."""
        if dedup_id in self._seen:
            return False
        self._seen[dedup_id] = None
        if len(self._seen) > DEDUP_KEPT:
            self._seen.popitem(last=False)
        return True

    async def route(self, channel: str, message: Message) -> None:
        if is_task_channel(channel):
            await self.queues[channel].put(_Stored(message.data))
        if is_recorded_channel(channel):
            record = self.records[channel]
            async with record.grew:
                record.items.append(message.data)
                record.grew.notify_all()
        plain = [s for s in self.subs if s.queue is None and subject_matches(s.pattern, channel)]
        groups: dict[tuple[str, str], list[_Sub]] = defaultdict(list)
        for sub in self.subs:
            if sub.queue is not None and subject_matches(sub.pattern, channel):
                groups[(sub.pattern, sub.queue)].append(sub)
        chosen = plain + [members[next(self._round_robin) % len(members)] for members in groups.values()]
        for sub in chosen:
            sub.owner.dispatch(sub.handler, message)


class _MemoryDelivery(Delivery):
    def __init__(self, queue: _TaskQueue, item: _Stored, channel: str, intake: _MemoryIntake) -> None:
        super().__init__(channel, item.data, item.attempt)
        self._queue, self._item, self._intake = queue, item, intake

    async def _do_settle(self, how: Settle, delay: float) -> None:
        self._intake.unsettled.discard(self)
        if how is Settle.NAK:
            retry = _Stored(self._item.data, self._item.attempt + 1)
            if delay > 0:
                self._intake.owner.dispatch_later(delay, self._queue.put(retry, front=True))
            else:
                await self._queue.put(retry, front=True)


class _MemoryIntake:
    def __init__(self, owner: MemoryBus, channel: str, queue: _TaskQueue) -> None:
        self.owner, self.channel, self.queue = owner, channel, queue
        self.unsettled: set[_MemoryDelivery] = set()

    async def take(self, limit: int, timeout: float) -> list[Delivery]:
        async with self.queue.ready:
            try:
                await asyncio.wait_for(self.queue.ready.wait_for(lambda: bool(self.queue.pending)), timeout)
            except TimeoutError:
                return []
            items = [self.queue.pending.popleft() for _ in range(min(limit, len(self.queue.pending)))]
        deliveries = [_MemoryDelivery(self.queue, item, self.channel, self) for item in items]
        self.unsettled.update(deliveries)
        return list(deliveries)

    async def close(self) -> None:
        for delivery in list(self.unsettled):
            await delivery.nak()


class MemoryBus:
    """A client of a MemoryBroker."""

    transport = "memory"

    def __init__(self, broker: MemoryBroker | None = None, *, url: str = "memory://") -> None:
        self.url = url
        self.broker = broker or MemoryBroker()
        self._tasks: set[asyncio.Task[None]] = set()
        self._intakes: list[_MemoryIntake] = []
        self._connected = False

    async def connect(self) -> None:
        """Nothing to open; marks the client usable."""
        self._connected = True

    async def reachable(self) -> bool:
        """True while connected: the broker lives in this process."""
        return self._connected

    async def close(self) -> None:
        """Drop this client's subscriptions and hand back its unsettled tasks."""
        self._connected = False
        self.broker.subs = [s for s in self.broker.subs if s.owner is not self]
        for intake in self._intakes:
            await intake.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _check(self) -> None:
        if not self._connected:
            raise BusError("memory bus is not connected")

    def dispatch(self, handler: MessageHandler, message: Message) -> None:
        """Run a handler in the background, as a network client's callback would run."""

        async def call() -> None:
            await handler(message)

        self._spawn(call())

    def dispatch_later(self, delay: float, coro: Coroutine[Any, Any, None]) -> None:
        """Run a coroutine after a delay in the background."""

        async def later() -> None:
            try:
                await asyncio.sleep(delay)
            except asyncio.CancelledError:
                coro.close()  # the bus closed first: what would have run is dropped, not left unawaited
                raise
            await coro

        self._spawn(later())

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)  # kept until done, so close() can cancel what is still running
        task.add_done_callback(self._tasks.discard)

    async def publish(self, channel: str, data: bytes, *, key: str | None = None, dedup_id: str | None = None) -> None:
        """Deliver to every matching subscriber (one per queue group) and store task messages."""
        self._check()
        if dedup_id is not None and is_task_channel(channel) and not self.broker.first_sight(dedup_id):
            return
        await self.broker.route(channel, Message(channel=channel, data=data, key=key))

    async def subscribe(self, channel: str, handler: MessageHandler, *, queue: str | None = None) -> Subscription:
        """Receive matching messages; NATS wildcards work."""
        self._check()
        sub = _Sub(channel, handler, queue, self)
        self.broker.subs.append(sub)

        async def stop() -> None:
            if sub in self.broker.subs:
                self.broker.subs.remove(sub)

        return ClosedSubscription(stop)

    async def follow(self, channel: str, handler: MessageHandler, *, durable: str | None) -> Subscription:
        """Hand over the channel's history from the follower's position, then each new message."""
        self._check()
        check_recorded(channel)
        record, positions = self.broker.records[channel], self.broker.positions
        if durable is None:  # a position of its own, forgotten with it
            durable = f"replay-{uuid.uuid4().hex}"

        async def pump() -> None:
            while True:
                async with record.grew:
                    await record.grew.wait_for(lambda: positions.get(durable, 0) < len(record.items))
                position = positions.get(durable, 0)
                data = record.items[position]
                try:
                    if data is not None:
                        await handler(Message(channel=channel, data=data))
                except Exception:  # a follower's bug must not stop it following
                    log.exception("follower %s failed on a message of %s", durable, channel)
                positions[durable] = position + 1

        task = asyncio.get_running_loop().create_task(pump())
        self._tasks.add(task)  # close() cancels it
        task.add_done_callback(self._tasks.discard)

        async def stop() -> None:
            await cancel_and_wait(task)

        return ClosedSubscription(stop)

    async def erase_kept(self, match: Callable[[str, bytes], bool]) -> int:
        """Delete the kept messages (recorded history, stored tasks) for which `match` holds."""
        deleted = 0
        for channel, record in self.broker.records.items():
            for i, data in enumerate(record.items):
                if data is not None and match(channel, data):
                    record.items[i] = None
                    deleted += 1
        for channel, queue in self.broker.queues.items():
            kept = deque(item for item in queue.pending if not match(channel, item.data))
            deleted += len(queue.pending) - len(kept)
            queue.pending = kept
        return deleted

    async def request(self, channel: str, data: bytes, *, timeout: float) -> bytes:
        """Send to one subscriber (one per queue group) and wait for the first answer."""
        self._check()
        answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        async def reply(payload: bytes) -> None:
            if not answer.done():
                answer.set_result(payload)

        await self.broker.route(channel, Message(channel=channel, data=data, reply=reply))
        try:
            return await asyncio.wait_for(answer, timeout)
        except TimeoutError as exc:
            raise RequestTimeout(f"no reply on {channel} within {timeout:g}s") from exc

    async def on_given_up(self, handler: Callable[[Delivery], Awaitable[None]], *, group: str) -> Subscription:
        """Never called: the in-process broker redelivers a task until it is settled."""
        return empty_subscription()

    async def take_strays(self, owned: Collection[str], limit: int) -> list[Delivery]:
        """Tasks queued on task channels outside `owned`."""
        self._check()
        strays: list[Delivery] = []
        for channel, queue in list(self.broker.queues.items()):
            if channel not in owned and queue.pending and len(strays) < limit:
                strays += await _MemoryIntake(self, channel, queue).take(limit - len(strays), 0.01)
        return strays

    async def intake(self, channel: str, *, group: str) -> _MemoryIntake:
        """Take tasks from a task channel; every intake of the channel shares its queue."""
        self._check()
        if not is_task_channel(channel):
            raise ValueError(f"{channel!r} is not a task channel")
        intake = _MemoryIntake(self, channel, self.broker.queues[channel])
        self._intakes.append(intake)
        return intake
