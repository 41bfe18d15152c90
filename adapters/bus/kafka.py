"""`kafka://`: aiokafka on any Apache-Kafka-compatible broker (Kafka, Redpanda, Tansu).

- Channels with a trailing id (`forseti.jobs.<id>`) become the topic `forseti.jobs` keyed by the id.
- Plain subscribers read every partition from the end, with no group; `queue` subscribers share a
  consumer group.
- Task intake is the consumer group `forseti-workers.<topic>` (or the caller's); an offset is committed only
  when every task before it in its partition has settled, so a worker that dies loses nothing.
  A nak publishes the task again with its attempt count raised, then lets the offset pass.
- Request-reply: each client owns a reply topic `forseti.replies.<client id>`; a request carries
  `forseti-reply-to` and `forseti-correlation-id` headers, the answer carries the correlation id.
  The reply topic is fetched only while a request is waiting.
- Recorded channels (`forseti.models`) are one-partition topics, so their order holds; a follower is
  the consumer group `forseti-follow-<name>.<topic>`, committing each offset after its handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from collections.abc import Awaitable, Callable, Collection
from typing import Any
from urllib.parse import unquote, urlsplit

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAlreadyExistsError

from forseti.adapters.urls import redact
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
from .channels import check_recorded, is_recorded_channel, is_task_channel, topic_and_key
from .settings import BusSettings

log = logging.getLogger(__name__)

SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
REPLY_TO = "forseti-reply-to"
CORRELATION = "forseti-correlation-id"
ATTEMPT = "forseti-attempt"
SEND_ATTEMPTS = 6
"""Tries of one produce that meets retriable broker errors (about 1.5 s of backoff in all)."""
HOT_TOPICS = ("forseti.replies", "forseti.env", "forseti.llm", "forseti.infer")
"""Topics whose consumers wait `fetch_max_wait_ms` for data: someone blocks on every message there."""


CE_MODES = ("structured", "binary")
"""The CloudEvents Kafka binding's two content modes."""
CE_PREFIX = "ce_"


def _headers(record: ConsumerRecord[bytes, bytes]) -> dict[str, str]:
    return {k: v.decode() for k, v in (record.headers or ())}


def binary_record(event: bytes) -> tuple[bytes, dict[str, str]] | None:
    """A structured JSON CloudEvent in the Kafka binary binding: its data as the value, every other
    attribute as a `ce_` header and its datacontenttype as `content-type`. None for what is not a JSON
    CloudEvent with string attributes (sent as it is). Written out here rather than through the
    CloudEvents SDK, whose round trip re-formats `time` and would change what signatures cover."""
    try:
        doc = orjson.loads(event)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict) or "specversion" not in doc or "data_base64" in doc:
        return None
    attributes = {k: v for k, v in doc.items() if k not in ("data", "datacontenttype")}
    if not all(isinstance(v, str) for v in attributes.values()):
        return None
    headers = {CE_PREFIX + k: v for k, v in attributes.items()}
    headers["content-type"] = str(doc.get("datacontenttype", "application/json"))
    return (orjson.dumps(doc["data"]) if "data" in doc else b""), headers


def structured_event(record: ConsumerRecord[bytes, bytes], headers: dict[str, str]) -> bytes:
    """A record's event as structured JSON: its value, or, for a record in the binary binding (a
    `ce_specversion` header among its `headers`, as `_headers` reads them), the CloudEvent rebuilt
    from its headers and value."""
    value = record.value or b""
    if CE_PREFIX + "specversion" not in headers:
        return value
    doc: dict[str, Any] = {k.removeprefix(CE_PREFIX): v for k, v in headers.items() if k.startswith(CE_PREFIX)}
    if "content-type" in headers:
        doc["datacontenttype"] = headers["content-type"]
    if value:
        try:
            doc["data"] = orjson.loads(value)
        except orjson.JSONDecodeError:
            return value  # not JSON data: the reader refuses it as it stands
    return orjson.dumps(doc)


def group_id(group: str, topic: str) -> str:
    """The Kafka consumer group for a Forseti group on one topic (`forseti-workers.forseti.tasks.rl`)."""
    return f"{group}.{topic}"


class _OffsetTracker:
    """Per partition, the offsets taken but not settled; the commit point is the lowest of them."""

    def __init__(self) -> None:
        self.open: dict[TopicPartition, set[int]] = {}
        self.high: dict[TopicPartition, int] = {}

    def take(self, tp: TopicPartition, offset: int) -> None:
        self.open.setdefault(tp, set()).add(offset)
        self.high[tp] = max(self.high.get(tp, -1), offset)

    def settle(self, tp: TopicPartition, offset: int) -> int:
        """Mark one offset settled; returns the offset to commit for its partition."""
        pending = self.open.get(tp, set())
        pending.discard(offset)
        return min(pending) if pending else self.high[tp] + 1


class _KafkaDelivery(Delivery):
    def __init__(self, intake: _KafkaIntake, record: ConsumerRecord[bytes, bytes], channel: str) -> None:
        headers = _headers(record)
        super().__init__(channel, structured_event(record, headers), int(headers.get(ATTEMPT, "1")))
        self._intake, self._record, self._key = intake, record, record.key

    async def _do_settle(self, how: Settle, delay: float) -> None:
        if how is Settle.NAK and delay > 0:
            # the wait runs in the background, so a task handed back for later holds no worker slot;
            # its offset stays uncommitted meanwhile, so a worker that stops first loses nothing
            self._intake.later(delay, self._hand_back)
            return
        if how is Settle.NAK:
            await self._hand_back()
            return
        await self._intake.settle(self._record)

    async def _hand_back(self) -> None:
        await self._intake.bus.send(
            self._record.topic, self.data, key=self._key, headers={ATTEMPT: str(self.attempt + 1)}
        )
        await self._intake.settle(self._record)


class _KafkaIntake:
    def __init__(self, bus: KafkaBus, channel: str, consumer: AIOKafkaConsumer) -> None:
        self.bus, self.channel, self.consumer = bus, channel, consumer
        self.tracker = _OffsetTracker()
        self._waiting: set[asyncio.Task[None]] = set()

    def later(self, delay: float, hand_back: Callable[[], Awaitable[None]]) -> None:
        """Hand a task back after `delay` seconds, in the background."""

        async def wait_then() -> None:
            await asyncio.sleep(delay)
            try:
                await hand_back()
            except BusError as exc:  # its offset stays uncommitted: the group delivers it again
                log.warning("a task handed back for later could not be requeued: %s", exc)

        task = asyncio.create_task(wait_then())
        self._waiting.add(task)
        task.add_done_callback(self._waiting.discard)

    async def take(self, limit: int, timeout: float) -> list[Delivery]:
        try:
            batch = await self.consumer.getmany(timeout_ms=int(timeout * 1000), max_records=limit)
        except KafkaError as exc:
            raise BusError(f"task intake on {self.channel} failed: {exc}") from exc
        deliveries: list[Delivery] = []
        for tp, records in batch.items():
            for record in records:
                self.tracker.take(tp, record.offset)
                deliveries.append(_KafkaDelivery(self, record, self.channel))
        return deliveries

    async def settle(self, record: ConsumerRecord[bytes, bytes]) -> None:
        tp = TopicPartition(record.topic, record.partition)
        commit_at = self.tracker.settle(tp, record.offset)
        if tp not in self.consumer.assignment():
            return  # the partition moved to another member during a rebalance; it redelivers
        # a commit waits out a rebalance in progress; bounded, so a stuck group hands the task back
        # (the bus redelivers it and the job store answers for it) instead of holding the job open
        limit = 2 * self.bus.settings.session_timeout_ms / 1000
        try:
            async with asyncio.timeout(limit):
                await self.consumer.commit({tp: commit_at})
        except KafkaError as exc:
            raise BusError(f"commit on {self.channel} failed: {exc}") from exc
        except TimeoutError as exc:
            raise BusError(f"commit on {self.channel} took more than {limit:g}s") from exc

    async def close(self) -> None:
        for task in list(self._waiting):
            await cancel_and_wait(task)
        await self.consumer.stop()


class KafkaBus:
    """An aiokafka client: one producer, consumers per subscription and intake."""

    transport = "kafka"

    def __init__(self, url: str = "kafka://127.0.0.1:9092", *, settings: BusSettings | None = None) -> None:
        self.url = url
        self.shown_url = redact(url)
        """The URL as logs and errors show it: no password nor token."""
        self.settings = settings or BusSettings()
        if self.settings.cloudevents_mode not in CE_MODES:
            raise ValueError(
                f"bus setting cloudevents_mode is structured or binary, not {self.settings.cloudevents_mode!r}"
            )
        self.bootstrap = urlsplit(url).netloc.rpartition("@")[2]
        self._security: dict[str, Any] = {}
        """aiokafka's TLS and SASL options, worked out at connect."""
        self.client_id = f"forseti-{uuid.uuid4().hex[:12]}"
        self._producer: AIOKafkaProducer | None = None
        self._admin: AIOKafkaAdminClient | None = None
        self._topics: set[str] = set()
        self._closers: list[Callable[[], Awaitable[None]]] = []
        self._replies: dict[str, asyncio.Future[bytes]] = {}
        self._reply_topic: str | None = None
        self._reply_consumer: AIOKafkaConsumer | None = None
        self._reply_lock = asyncio.Lock()

    def _security_options(self) -> dict[str, Any]:
        """aiokafka's keyword arguments for TLS and SASL: SASL when the URL names a user (its password
        from the URL, else `FORSETI_BUS_PASSWORD`), TLS when the settings ask for it."""
        parts, s = urlsplit(self.url), self.settings
        s.check_files()
        context = s.tls_context()
        options: dict[str, Any] = {"ssl_context": context} if context is not None else {}
        if not parts.username:
            options["security_protocol"] = "SSL" if context is not None else "PLAINTEXT"
            return options
        password = unquote(parts.password) if parts.password is not None else os.environ.get("FORSETI_BUS_PASSWORD")
        if password is None:
            raise BusError(f"{self.shown_url} names user {parts.username!r} but no password (or FORSETI_BUS_PASSWORD)")
        if s.sasl_mechanism not in SASL_MECHANISMS:
            raise BusError(
                f"bus setting sasl_mechanism is one of {', '.join(SASL_MECHANISMS)}, not {s.sasl_mechanism!r}"
            )
        options.update(
            security_protocol="SASL_SSL" if context is not None else "SASL_PLAINTEXT",
            sasl_mechanism=s.sasl_mechanism,
            sasl_plain_username=unquote(parts.username),
            sasl_plain_password=password,
        )
        return options

    async def connect(self) -> None:
        """Start the producer and the admin client."""
        if self._producer is not None:
            return
        self._security = self._security_options()
        try:
            self._admin = AIOKafkaAdminClient(
                bootstrap_servers=self.bootstrap, client_id=self.client_id, **self._security
            )
            # the first contact is bounded: a TLS client at a plain-text listener (or the reverse) would
            # otherwise wait out aiokafka's 40 s request timeout for an answer that never comes
            await asyncio.wait_for(self._admin.start(), self.settings.connect_timeout)
            self._producer = AIOKafkaProducer(
                bootstrap_servers=self.bootstrap,
                client_id=self.client_id,
                linger_ms=0,
                # every in-sync replica has a task before its publish returns
                acks="all",
                enable_idempotence=self.settings.idempotence,
                **self._security,
            )
            await self._producer.start()
        except (KafkaConnectionError, KafkaError, OSError) as exc:
            await self.close()
            raise BusError(f"cannot reach Kafka at {self.shown_url}: {exc}") from exc
        except TimeoutError as exc:
            await self.close()
            raise BusError(
                f"cannot reach Kafka at {self.shown_url}: no answer within {self.settings.connect_timeout:g}s "
                "(does the listener speak TLS where the URL asks for it, and only there?)"
            ) from exc
        except KeyError as exc:  # aiokafka's SCRAM reads a server's `e=unknown-user` answer as a KeyError
            await self.close()
            raise BusError(f"Kafka at {self.shown_url} refused the SASL login (unknown user or bad password)") from exc

    async def on_given_up(self, handler: Callable[[Delivery], Awaitable[None]], *, group: str) -> Subscription:
        """Never called: a nak on Kafka publishes the task again (its attempt header raised), so the
        broker never gives up on one; the registry counts the attempts."""
        return empty_subscription()

    async def take_strays(self, owned: Collection[str], limit: int) -> list[Delivery]:
        """None: on Kafka each task kind is a topic of its own, and a topic that no kind owns is bounded
        by the broker's retention (`retention.ms`, `retention.bytes`), not kept for ever."""
        return []

    async def reachable(self) -> bool:
        """True when a broker answers a metadata request within `connect_timeout`: aiokafka keeps no
        standing connection whose state would say so."""
        if self._producer is None:
            return False
        try:
            await asyncio.wait_for(self._producer.client.fetch_all_metadata(), self.settings.connect_timeout)
        except (TimeoutError, KafkaError, OSError):
            return False
        return True

    async def close(self) -> None:
        """Stop every consumer, drop the reply topic, stop the producer."""
        for closer in reversed(self._closers):
            await closer()
        self._closers.clear()
        if self._reply_topic and self._admin is not None:
            try:
                await self._admin.delete_topics([self._reply_topic])
            except KafkaError as exc:
                log.debug("reply topic %s not deleted: %s", self._reply_topic, exc)
        for part in (self._producer, self._admin):
            if part is not None:
                await part.close() if isinstance(part, AIOKafkaAdminClient) else await part.stop()
        self._producer, self._admin = None, None
        self._reply_topic, self._reply_consumer = None, None

    async def ensure_topic(self, topic: str, partitions: int | None = None) -> None:
        """Create a topic unless it exists."""
        if topic in self._topics:
            return
        if self._admin is None:
            raise BusError("Kafka bus is not connected")
        with contextlib.suppress(TopicAlreadyExistsError):  # another client made it first: what we wanted
            count = partitions or (1 if is_recorded_channel(topic) else self.settings.partitions)
            await self._admin.create_topics([NewTopic(topic, count, 1)])
        self._topics.add(topic)

    async def send(
        self, topic: str, data: bytes, *, key: bytes | str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        """Produce one record and wait for the broker's ack."""
        if self._producer is None:
            raise BusError("Kafka bus is not connected")
        await self.ensure_topic(topic)
        raw_key = key.encode() if isinstance(key, str) else key
        if self.settings.cloudevents_mode == "binary" and (binary := binary_record(data)) is not None:
            data, attributes = binary
            headers = {**attributes, **(headers or {})}
        encoded = [(k, v.encode()) for k, v in (headers or {}).items()]
        for attempt in range(SEND_ATTEMPTS):
            try:
                await self._producer.send_and_wait(topic, data, key=raw_key, headers=encoded)
                return
            except KafkaError as exc:
                # a topic created a moment ago may have no partition leader yet (NotLeaderForPartition,
                # LeaderNotAvailable): the broker says so with a retriable error; others are final
                if not exc.retriable or attempt == SEND_ATTEMPTS - 1:
                    raise BusError(f"publish to {topic} failed: {exc}") from exc
                await asyncio.sleep(0.05 * 2**attempt)

    async def publish(self, channel: str, data: bytes, *, key: str | None = None, dedup_id: str | None = None) -> None:
        """Produce to the channel's topic, keyed by the channel's id (or `key`)."""
        topic, channel_key = topic_and_key(channel)
        await self.send(topic, data, key=key or channel_key)

    def _consumer(self, topic: str, group: str | None, *, earliest: bool = False) -> AIOKafkaConsumer:
        hot = topic.startswith(HOT_TOPICS)
        return AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            client_id=self.client_id,
            group_id=group,
            enable_auto_commit=False,
            auto_offset_reset="earliest" if earliest else "latest",
            session_timeout_ms=self.settings.session_timeout_ms,
            heartbeat_interval_ms=self.settings.heartbeat_interval_ms,
            rebalance_timeout_ms=self.settings.session_timeout_ms,
            fetch_max_wait_ms=self.settings.fetch_max_wait_ms if hot else self.settings.background_fetch_max_wait_ms,
            **self._security,
        )

    async def _start_consumer(
        self, topic: str, group: str | None, *, earliest: bool = False, wait_assigned: bool = True
    ) -> AIOKafkaConsumer:
        """A started consumer of `topic`: in `group` (subscribed; with `wait_assigned`, returned once the
        group gave it partitions, so nothing published after is missed), or alone (all partitions, at
        the end, or the beginning with `earliest`)."""
        await self.ensure_topic(topic)
        # One Kafka group per (group, topic): members of a group that spans topics rebalance together,
        # so a worker joining for one task kind would stall every other kind.
        consumer = self._consumer(topic, group_id(group, topic) if group else None, earliest=earliest)
        try:
            await consumer.start()
            if group is None:
                assert self._producer is not None
                partitions = await self._producer.partitions_for(topic)
                tps = [TopicPartition(topic, p) for p in sorted(partitions)]
                consumer.assign(tps)
                # a replaying follower reads what is kept; everyone else what comes from now on
                await (consumer.seek_to_beginning(*tps) if earliest else consumer.seek_to_end(*tps))
                for tp in tps:  # resolve positions now, so nothing published after we return is missed
                    await consumer.position(tp)
            else:
                consumer.subscribe([topic])
                if wait_assigned:
                    await self._wait_assigned(consumer, topic)
        except KafkaError as exc:
            await consumer.stop()
            raise BusError(f"cannot consume {topic}: {exc}") from exc
        return consumer

    async def _wait_assigned(self, consumer: AIOKafkaConsumer, topic: str) -> None:
        deadline = asyncio.get_running_loop().time() + self.settings.session_timeout_ms / 1000 * 3
        while not consumer.assignment():
            if asyncio.get_running_loop().time() > deadline:
                raise BusError(f"no partitions of {topic} were assigned to this consumer")
            await asyncio.sleep(0.05)

    def _pump(
        self,
        consumer: AIOKafkaConsumer,
        want_key: str | None,
        handle: Callable[[ConsumerRecord[bytes, bytes]], Awaitable[None]],
    ) -> Callable[[], Awaitable[None]]:
        async def loop() -> None:
            async for record in consumer:
                if want_key is not None and (record.key or b"").decode() != want_key:
                    continue
                try:
                    await handle(record)
                except Exception:  # a subscriber's bug must not end the subscription
                    log.exception("handler for %s failed", record.topic)

        task = asyncio.get_running_loop().create_task(loop())

        async def stop() -> None:
            await cancel_and_wait(task)
            await consumer.stop()

        self._closers.append(stop)
        return stop

    def _subscription(self, stop: Callable[[], Awaitable[None]]) -> Subscription:
        """A subscription whose unsubscribe stops one pump (once, and not again at close)."""

        async def unsubscribe() -> None:
            if stop in self._closers:
                self._closers.remove(stop)
                await stop()

        return ClosedSubscription(unsubscribe)

    async def subscribe(self, channel: str, handler: MessageHandler, *, queue: str | None = None) -> Subscription:
        """Consume the channel's topic from now on, filtered to the channel's key."""
        topic, want_key = topic_and_key(channel)
        consumer = await self._start_consumer(topic, queue)

        async def handle(record: ConsumerRecord[bytes, bytes]) -> None:
            headers = _headers(record)
            reply = None
            if REPLY_TO in headers:
                reply_topic, correlation = headers[REPLY_TO], headers.get(CORRELATION, "")

                async def reply(data: bytes) -> None:
                    await self.send(reply_topic, data, headers={CORRELATION: correlation})

            key = record.key.decode() if record.key else None
            name = f"{topic}.{key}" if want_key is not None and key else topic
            data = structured_event(record, headers)
            await handler(Message(channel=name, data=data, key=key, headers=headers, reply=reply))

        return self._subscription(self._pump(consumer, want_key, handle))

    async def follow(self, channel: str, handler: MessageHandler, *, durable: str | None) -> Subscription:
        """Consume the topic in the follower's own group from its committed offset (the oldest kept
        for a new one), committing each record once its handler returns."""
        check_recorded(channel)
        topic, _ = topic_and_key(channel)
        group = f"forseti-follow-{durable}" if durable is not None else None
        # a follower reads from its group's committed offset (the oldest kept for a new group) whenever
        # the group assigns it the partitions: nothing is missed by returning before then. Waiting
        # made follow() fail when a rejoin outlasted the wait, as on a broker that ignores LeaveGroup
        # (Tansu): the departed member's session must lapse, then the group rebalances
        consumer = await self._start_consumer(topic, group, earliest=True, wait_assigned=False)

        async def handle(record: ConsumerRecord[bytes, bytes]) -> None:
            try:
                headers = _headers(record)
                await handler(Message(channel=topic, data=structured_event(record, headers), headers=headers))
            except Exception:  # a follower's bug must not stop it following
                log.exception("follower %s failed on a message of %s", durable, topic)
            if group is None:
                return  # no group: nothing to commit, a new start reads from the oldest again
            tp = TopicPartition(record.topic, record.partition)
            try:
                await consumer.commit({tp: record.offset + 1})
            except KafkaError as exc:  # the record comes again after the group settles
                log.warning("follower %s could not commit on %s: %s", durable, topic, exc)

        return self._subscription(self._pump(consumer, None, handle))

    async def _ensure_reply_consumer(self) -> str:
        async with self._reply_lock:
            if self._reply_topic is None:
                topic = f"forseti.replies.{self.client_id}"
                await self.ensure_topic(topic, partitions=1)
                consumer = await self._start_consumer(topic, None)

                async def on_reply(record: ConsumerRecord[bytes, bytes]) -> None:
                    headers = _headers(record)
                    future = self._replies.pop(headers.get(CORRELATION, ""), None)
                    if future is not None and not future.done():
                        future.set_result(structured_event(record, headers))

                self._pump(consumer, None, on_reply)
                self._reply_topic, self._reply_consumer = topic, consumer
            return self._reply_topic

    async def request(self, channel: str, data: bytes, *, timeout: float) -> bytes:
        """Produce with reply headers and wait for the answer on this client's reply topic."""
        reply_topic = await self._ensure_reply_consumer()
        correlation = uuid.uuid4().hex
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._replies[correlation] = future
        self._reply_fetching(True)
        topic, key = topic_and_key(channel)
        try:
            await self.send(topic, data, key=key, headers={REPLY_TO: reply_topic, CORRELATION: correlation})
            return await asyncio.wait_for(future, timeout)
        except TimeoutError as exc:
            raise RequestTimeout(f"no reply on {channel} within {timeout:g}s") from exc
        finally:
            self._replies.pop(correlation, None)
            self._reply_fetching(bool(self._replies))

    def _reply_fetching(self, on: bool) -> None:
        # The reply consumer fetches only while a request waits: idle, it would still send a fetch
        # every fetch_max_wait_ms, and in the worker those wake-ups take the GIL from the training
        # thread (on Tansu at 2 ms, PPO's update phase ran 22% slower). A fetch in flight when it
        # pauses is let go; what it brought for the paused partition is fetched again on resume.
        consumer = self._reply_consumer
        if consumer is None:
            return
        tps = consumer.assignment()
        if on:
            consumer.resume(*tps)
        else:
            consumer.pause(*tps)

    async def intake(self, channel: str, *, group: str) -> _KafkaIntake:
        """Join the consumer group on the task topic, reading from the oldest uncommitted offset."""
        if not is_task_channel(channel):
            raise ValueError(f"{channel!r} is not a task channel")
        consumer = await self._start_consumer(channel, group, earliest=True)
        intake = _KafkaIntake(self, channel, consumer)

        self._closers.append(intake.close)
        return intake
