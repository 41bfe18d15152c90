"""`nats://`: core NATS for events and request-reply, a JetStream work-queue stream for tasks.

Tasks live in the stream `FORSETI_TASKS` (subjects `forseti.tasks.>`, work-queue retention, file
storage). Each task kind has one durable pull consumer that every worker of a group pulls from, so a
task goes to one worker; it is acked only when its job ends, and delivered again after `ack_wait`
if the worker dies first.

Recorded channels (`forseti.models`) are also kept in the stream `FORSETI_RECORDS` (limits retention,
`history_days`), so a follower reads them through a durable pull consumer of its own and, after a
restart or a lost connection, goes on from the first message it had not acknowledged.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import ssl
from collections.abc import Awaitable, Callable, Collection
from dataclasses import replace
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import AuthorizationError, ConnectionClosedError, NoRespondersError, NoServersError
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    ObjectStoreConfig,
    RawStreamMsg,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, BucketNotFoundError, NotFoundError
from nats.js.object_store import ObjectStore

from forseti.adapters.urls import redact
from forseti.schemas.errors import BusError, RequestTimeout

from .base import ClosedSubscription, Delivery, Message, MessageHandler, Settle, Subscription, cancel_and_wait
from .channels import RECORDED_CHANNELS, TASKS_PREFIX, check_recorded, is_task_channel
from .settings import BusSettings

log = logging.getLogger(__name__)

STREAM = "FORSETI_TASKS"
RECORDS = "FORSETI_RECORDS"
FOLLOW_ACK_WAIT = 30.0
"""Seconds a follower may hold a message before the server offers it again; a handler that runs
longer is kept alive by progress acks, so only a follower that died lets it lapse."""
LAST_ERRORS: dict[str, str] = {}
"""Per server URL, the connection error a client of it logged last (not logged again until it connects)."""
REPLAY_INACTIVE = 120.0
"""Seconds after its last fetch that the server removes a replaying (`durable=None`) follower's consumer."""
MAX_DELIVERIES = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES"
"""Where JetStream says a consumer stopped delivering a message (`.<stream>.<consumer>`)."""
CONSUMER_NOT_UNIQUE = 10100  # JetStream: "filtered consumer not unique on workqueue stream"


class _NatsDelivery(Delivery):
    def __init__(self, msg: Msg) -> None:
        super().__init__(msg.subject, msg.data, msg.metadata.num_delivered)
        self._msg = msg

    async def in_progress(self) -> None:
        """Reset the server's ack timer."""
        if self.settled is None:
            await self._msg.in_progress()

    async def _do_settle(self, how: Settle, delay: float) -> None:
        try:
            if how is Settle.ACK:
                await self._msg.ack()
            elif how is Settle.NAK:
                await self._msg.nak(delay=delay or None)
            else:
                await self._msg.term()
        except (ConnectionClosedError, TimeoutError) as exc:
            raise BusError(f"could not {how} task on {self.channel}: {exc}") from exc


class _StoredTask(Delivery):
    """A task read straight from the stream by its sequence number, not through a consumer."""

    def __init__(self, js: JetStreamContext, msg: RawStreamMsg) -> None:
        super().__init__(msg.subject or "", msg.data or b"", 1)
        self._js, self._seq = js, msg.seq or 0

    async def _do_settle(self, how: Settle, delay: float) -> None:
        if how is Settle.NAK:  # stays stored; the next sweep finds it again
            return
        try:
            await self._js.delete_msg(STREAM, self._seq)
        except NotFoundError:  # another worker's sweep removed it first
            return
        except (NatsError, TimeoutError) as exc:
            raise BusError(f"could not remove task {self._seq} on {self.channel}: {exc}") from exc


class _GivenUpTask(_StoredTask):
    """A task the consumer stopped delivering (max_deliver): settled by removing it, or, for a nak,
    by storing it again as a new message that the consumer delivers afresh."""

    def __init__(self, js: JetStreamContext, msg: RawStreamMsg, deliveries: int) -> None:
        super().__init__(js, msg)
        self.attempt = self.given_up_after = deliveries

    async def _do_settle(self, how: Settle, delay: float) -> None:
        if how is Settle.NAK:
            try:
                await self._js.publish(self.channel, self.data, stream=STREAM)
            except (NatsError, TimeoutError) as exc:
                raise BusError(f"could not store task {self._seq} on {self.channel} again: {exc}") from exc
        await super()._do_settle(Settle.TERM, 0.0)


class _NatsIntake:
    def __init__(self, sub: JetStreamContext.PullSubscription, channel: str) -> None:
        self._sub, self.channel = sub, channel

    async def take(self, limit: int, timeout: float) -> list[Delivery]:
        try:
            msgs = await self._sub.fetch(limit, timeout=timeout)
        except TimeoutError:  # nats-py raises its own subclass, or the builtin one near a deadline
            return []
        except (ConnectionClosedError, NoServersError) as exc:
            raise BusError(f"task intake on {self.channel} lost the server: {exc}") from exc
        return [_NatsDelivery(msg) for msg in msgs]

    async def close(self) -> None:
        try:
            await self._sub.unsubscribe()
        except ConnectionClosedError:
            log.debug("intake on %s closed after its connection", self.channel)


def durable_name(group: str, channel: str) -> str:
    """The JetStream consumer name for a group on a task channel."""
    return f"{group}-{channel.removeprefix(TASKS_PREFIX)}".replace(".", "_")


class NatsBus:
    """A NATS client with JetStream task intake."""

    transport = "nats"

    def __init__(
        self, url: str = "nats://127.0.0.1:4222", *, settings: BusSettings | None = None, name: str = "forseti"
    ) -> None:
        self.url = url
        self.shown_url = redact(url)
        """The URL as logs and errors show it: no password nor token."""
        self.settings = settings or BusSettings()
        self._name = name
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._followers: set[asyncio.Task[None]] = set()
        self._last_error: str | None = None
        self._connected = False
        """Whether the first connect succeeded: before it, failed tries are the connect's error to give."""
        self._refusal: str | None = None
        """The server's last refusal (authorization, TLS) of a connect: the reason a connect that
        timed out gives."""
        self.reconnected = asyncio.Event()
        """Set each time the client reconnects after losing the server."""

    def sibling(self, name: str) -> NatsBus:
        """An unconnected bus to the same server with the same settings, named `name`: a private
        connection for a thread that runs a loop of its own (a remote env's steps)."""
        return NatsBus(self.url, settings=self.settings, name=name)

    @property
    def nc(self) -> Client:
        """The live connection."""
        if self._nc is None:
            raise BusError("NATS bus is not connected")
        return self._nc

    async def connect(self) -> None:
        """Connect (reconnecting forever after a drop) and make sure the task stream exists."""
        if self._nc is not None:
            return
        try:
            # nats-py tries the first connection as often as a reconnection (forever here), so the
            # wait for a server that is not there is bounded by connect_timeout instead
            async with asyncio.timeout(self.settings.connect_timeout):
                self._nc = await self._connect()
        except (NoServersError, OSError, TimeoutError) as exc:
            # an authorization or TLS refusal shows only through error_cb: it is the reason to give
            reason = self._refusal or str(exc) or self._last_error or "no answer"
            raise BusError(
                f"cannot reach NATS at {self.shown_url} within {self.settings.connect_timeout:g}s: {reason}"
            ) from exc
        self._connected = True
        LAST_ERRORS.pop(self.shown_url, None)
        self._js = self._nc.jetstream()
        tasks = StreamConfig(
            name=STREAM,
            subjects=[f"{TASKS_PREFIX}>"],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            duplicate_window=120,
            max_bytes=self.settings.tasks_max_bytes,
            max_age=self.settings.tasks_max_age_days * 86_400,
            discard=DiscardPolicy.NEW,
        )
        records = StreamConfig(
            name=RECORDS,
            subjects=list(RECORDED_CHANNELS),
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=self.settings.history_days * 86_400,
        )
        for config in (tasks, records):
            try:
                info = await self._js.stream_info(config.name or "")
            except NotFoundError:
                await self._js.add_stream(config)
                continue
            if config is tasks:
                await self._limit_tasks(info.config, tasks)

    async def _limit_tasks(self, current: StreamConfig, tasks: StreamConfig) -> None:
        """Give a task stream made before its limits, or under other settings, this worker's: the
        newest worker to start sets them."""
        assert self._js is not None
        if (
            current.max_bytes != tasks.max_bytes
            or abs((current.max_age or 0) - (tasks.max_age or 0)) > 1
            or current.discard != tasks.discard
        ):
            await self._js.update_stream(
                replace(current, max_bytes=tasks.max_bytes, max_age=tasks.max_age, discard=tasks.discard)
            )

    def _credentials(self) -> dict[str, Any]:
        """nats-py's keyword arguments for the settings' creds file, nkey seed and TLS files, each
        checked to exist first (a missing file is a clear error, not a refused connection)."""
        s = self.settings
        s.check_files()
        options: dict[str, Any] = {}
        if s.creds is not None:
            options["user_credentials"] = s.creds
        if s.nkey_seed is not None:
            options["nkeys_seed"] = s.nkey_seed
        context = s.tls_context()
        if context is not None:
            options["tls"] = context
        return options

    async def _connect(self) -> Client:
        return await nats.connect(
            self.url,
            **self._credentials(),
            name=self._name,
            connect_timeout=max(1, int(self.settings.connect_timeout)),
            reconnect_time_wait=0.25,
            max_reconnect_attempts=-1,
            allow_reconnect=True,
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnect,
            reconnected_cb=self._on_reconnect,
        )

    async def put_object(self, bucket: str, name: str, path: Path, sha256: str) -> None:
        """Store a file in a JetStream object store bucket (made on first use), read and sent in chunks;
        a no-op when the object already holds exactly this content."""
        store = await self._object_store(bucket, create=True)
        try:
            info = await store.get_info(name)
            if info.digest and _hex_digest(info.digest) == sha256:
                return
        except NotFoundError:
            pass
        except NatsError as exc:
            raise BusError(f"cannot look up {bucket}/{name}: {exc}") from exc
        try:
            with path.open("rb") as handle:
                await store.put(name, handle)
        except (NatsError, OSError) as exc:
            raise BusError(f"cannot store {path} as {bucket}/{name}: {exc}") from exc

    async def get_object(self, bucket: str, name: str, dest: Path) -> None:
        """Stream an object into `dest` (chunk by chunk: memory stays flat)."""
        store = await self._object_store(bucket, create=False)
        try:
            with dest.open("wb") as handle:
                await store.get(name, writeinto=handle)
        except NotFoundError as exc:
            raise BusError(f"no object {name} in bucket {bucket}") from exc
        except NatsError as exc:
            raise BusError(f"cannot fetch {bucket}/{name}: {exc}") from exc

    async def delete_object(self, bucket: str, name: str) -> None:
        """Remove an object; nothing when it, or its bucket, is not there."""
        if self._js is None:
            raise BusError("NATS bus is not connected")
        try:
            store = await self._js.object_store(bucket)
            await store.delete(name)
        except (BucketNotFoundError, NotFoundError):
            return
        except NatsError as exc:
            raise BusError(f"cannot delete {bucket}/{name}: {exc}") from exc

    async def _object_store(self, bucket: str, *, create: bool) -> ObjectStore:
        if self._js is None:
            raise BusError("NATS bus is not connected")
        try:
            try:
                return await self._js.object_store(bucket)
            except BucketNotFoundError as exc:
                if not create:
                    raise BusError(f"no object store bucket {bucket} on {self.shown_url}") from exc
                return await self._js.create_object_store(bucket, config=ObjectStoreConfig(storage=StorageType.FILE))
        except NatsError as exc:  # the server is away (a timeout while nats-py reconnects): worth another try
            raise BusError(f"object store bucket {bucket} unreachable on {self.shown_url}: {exc}") from exc

    async def _on_error(self, exc: Exception) -> None:
        # nats-py reports every failed try (four a second while a server is away): the same error
        # again is only worth a debug line. Before the first connect, the connect's error says it
        # (a command that gives up prints it once); a worker waiting patiently still logs it once
        said = str(exc)
        # a caller that retries with a new client (the edge agent waiting for its bus) is the same
        # wait: what a client of this URL said last is not said again
        again = said in (self._last_error, LAST_ERRORS.get(self.shown_url))
        log.log(logging.DEBUG if again else logging.WARNING if self._connected else logging.INFO, "nats: %s", said)
        self._last_error = LAST_ERRORS[self.shown_url] = said
        # what a refused connect is to say (at connect nats-py reports the server's -ERR as a plain Error)
        if isinstance(exc, AuthorizationError | ssl.SSLError) or "authorization violation" in said.lower():
            self._refusal = said

    async def _on_disconnect(self) -> None:
        if self._nc is not None:  # None while close() runs: an intended disconnect
            log.warning("nats: disconnected from %s, reconnecting", self.shown_url)

    async def _on_reconnect(self) -> None:
        self._last_error = None
        LAST_ERRORS.pop(self.shown_url, None)
        log.info("nats: reconnected to %s", self.shown_url)
        self.reconnected.set()

    async def reachable(self) -> bool:
        """True while the connection stands (nats-py pings the server and reconnects by itself)."""
        return self._nc is not None and self._nc.is_connected

    async def close(self) -> None:
        """Drain and close."""
        for task in list(self._followers):
            await cancel_and_wait(task)
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None and not nc.is_closed:
            await nc.close()

    async def publish(self, channel: str, data: bytes, *, key: str | None = None, dedup_id: str | None = None) -> None:
        """Publish; task channels go through JetStream and wait for the stream's ack."""
        try:
            if is_task_channel(channel):
                assert self._js is not None
                headers = {"Nats-Msg-Id": dedup_id} if dedup_id else None
                await self._js.publish(channel, data, timeout=self.settings.connect_timeout, headers=headers)
            else:
                await self.nc.publish(channel, data)
        except (ConnectionClosedError, TimeoutError, NoRespondersError) as exc:
            raise BusError(f"publish to {channel} failed: {exc}") from exc
        except NatsError as exc:  # JetStream refused it: the task stream is full (tasks_max_bytes)
            raise BusError(f"publish to {channel} refused by {self.shown_url}: {exc}") from exc

    async def subscribe(self, channel: str, handler: MessageHandler, *, queue: str | None = None) -> Subscription:
        """Subscribe with core NATS; `queue` makes it a queue group."""

        async def on_msg(msg: Msg) -> None:
            reply = None
            if msg.reply:
                reply_to = msg.reply

                async def reply(data: bytes) -> None:
                    await self.nc.publish(reply_to, data)

            await handler(Message(channel=msg.subject, data=msg.data, headers=dict(msg.headers or {}), reply=reply))

        sub = await self.nc.subscribe(channel, queue=queue or "", cb=on_msg)
        await self._flush_subscriptions()

        async def stop() -> None:
            if not self.nc.is_closed:
                await sub.unsubscribe()

        return ClosedSubscription(stop)

    async def _flush_subscriptions(self) -> None:
        # nats-py queues SUB for its flusher task but writes flush()'s PING straight to the socket, so
        # one PONG can come back before the server has seen the SUB (traced: PUBs from another client
        # arrived first and were lost). The first round trip lets the flusher write the SUB; the
        # second PING is then behind it, so its PONG means the subscription is live.
        await self.nc.flush()
        await self.nc.flush()

    async def request(self, channel: str, data: bytes, *, timeout: float) -> bytes:
        """Core NATS request-reply."""
        try:
            msg = await self.nc.request(channel, data, timeout=timeout)
        except (NoRespondersError, TimeoutError) as exc:
            raise RequestTimeout(f"no reply on {channel} within {timeout:g}s") from exc
        return msg.data

    async def erase_kept(self, match: Callable[[str, bytes], bool]) -> int:
        """Delete the messages of the records and task streams for which `match(subject, data)` holds,
        read one by one from each stream's first sequence to its last (a privacy erase: rare, and the
        streams are bounded by their limits)."""
        assert self._js is not None, "connect first"
        deleted = 0
        for stream in (RECORDS, STREAM):
            try:
                state = (await self._js.stream_info(stream)).state
            except NotFoundError:
                continue
            except NatsError as exc:
                raise BusError(f"cannot read stream {stream}: {exc}") from exc
            if not state.messages:  # an empty stream reports sequence 0, which no message has
                continue
            for seq in range(state.first_seq, state.last_seq + 1):
                try:
                    msg = await self._js.get_msg(stream, seq)
                    if match(msg.subject or "", msg.data or b""):
                        deleted += bool(await self._js.delete_msg(stream, seq))
                except NotFoundError:  # deleted already, or taken off a work queue
                    continue
                except NatsError as exc:
                    raise BusError(f"cannot erase message {seq} of {stream}: {exc}") from exc
        return deleted

    async def follow(self, channel: str, handler: MessageHandler, *, durable: str | None) -> Subscription:
        """A durable pull consumer on the records stream, taken one message at a time, each acked
        after its handler returns; one unacked message at most, so a redelivery keeps the order."""
        check_recorded(channel)
        assert self._js is not None
        name = "follow-" + durable.replace(".", "_") if durable is not None else None
        config = ConsumerConfig(
            durable_name=name,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            filter_subject=channel,
            ack_wait=FOLLOW_ACK_WAIT,
            max_ack_pending=1,
            # a replaying follower's consumer is the server's to remove once it stops asking
            inactive_threshold=self.settings.history_days * 86_400 if name else REPLAY_INACTIVE,
        )
        try:
            sub = await self._js.pull_subscribe(channel, durable=name, stream=RECORDS, config=config)
        except NatsError as exc:
            raise BusError(f"cannot follow {channel} as {durable}: {exc}") from exc

        stopping = asyncio.Event()

        async def pump() -> None:
            while not stopping.is_set():
                try:
                    msgs = await sub.fetch(1, timeout=5)
                except TimeoutError:  # nothing new, or the server is away: the client reconnects by itself
                    continue
                except NatsError as exc:
                    if self._nc is None or self._nc.is_closed:
                        return
                    log.warning("following %s as %s: %s; retrying", channel, durable, exc)
                    await asyncio.sleep(1)
                    continue
                for msg in msgs:
                    if stopping.is_set():  # fetched as the cancel was lost: left unacked, it comes again
                        return
                    await self._handle_recorded(msg, handler)

        task = asyncio.get_running_loop().create_task(pump())
        self._followers.add(task)
        task.add_done_callback(self._followers.discard)

        async def stop() -> None:
            stopping.set()
            await cancel_and_wait(task)
            if self._nc is not None and not self._nc.is_closed:
                await sub.unsubscribe()

        return ClosedSubscription(stop)

    async def _handle_recorded(self, msg: Msg, handler: MessageHandler) -> None:
        message = Message(channel=msg.subject, data=msg.data, headers=dict(msg.headers or {}))

        async def run() -> None:
            await handler(message)

        work = asyncio.get_running_loop().create_task(run())
        try:
            while not work.done():
                await asyncio.wait([work], timeout=FOLLOW_ACK_WAIT / 3)
                if not work.done():
                    await _quietly(msg.in_progress())
        except asyncio.CancelledError:  # unsubscribed mid-message: it stays unacked and comes again
            await cancel_and_wait(work)
            raise
        if work.exception() is not None:  # a follower's bug must not stop it following
            log.error("follower of %s failed on a message", msg.subject, exc_info=work.exception())
        await self._ack_until_stored(msg)

    async def _ack_until_stored(self, msg: Msg) -> None:
        """Ack a followed message and wait for the server to confirm it, asking again until it does.
        A plain ack is fire-and-forget: one sent as the server went down was lost, and with one
        message in flight at most the follower then stalled for the whole ack wait before it came
        again. Asking again is safe (the server confirms an ack it already has) and needed on any
        failure: an ack sent on the connection that dropped is unanswered on the new one, and a
        server stopping its JetStream answers "no responders" while the connection still stands."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FOLLOW_ACK_WAIT
        while True:
            try:
                await msg.ack_sync(timeout=2)
                return
            except (TimeoutError, NatsError) as exc:
                nc = self._nc
                if nc is None or nc.is_closed or loop.time() > deadline:
                    log.debug("ack of a followed message on %s not confirmed: %s", msg.subject, exc)
                    return
                await asyncio.sleep(0.25)

    async def take_strays(self, owned: Collection[str], limit: int) -> list[Delivery]:
        """Tasks stored on subjects under `forseti.tasks.>` outside `owned`: the work-queue stream
        takes every such subject, and a subject that no consumer filters on is kept for ever."""
        if self._js is None:
            raise BusError("NATS bus is not connected")
        strays: list[Delivery] = []
        try:
            info = await self._js.stream_info(STREAM, subjects_filter=f"{TASKS_PREFIX}>")
            for subject in sorted(set(info.state.subjects or {}) - set(owned)):
                seq = 1
                while len(strays) < limit:
                    try:
                        msg = await self._js.get_msg(STREAM, seq=seq, subject=subject, next=True)
                    except NotFoundError:
                        break
                    strays.append(_StoredTask(self._js, msg))
                    seq = (msg.seq or seq) + 1
        except (NatsError, TimeoutError) as exc:
            raise BusError(f"cannot read stray tasks from {STREAM}: {exc}") from exc
        return strays

    async def on_given_up(self, handler: Callable[[Delivery], Awaitable[None]], *, group: str) -> Subscription:
        """Follow JetStream's max-deliveries advisories for the group's task consumers (a core NATS
        queue subscription, so one worker of the group takes each) and hand over the task they name,
        read from the stream by its sequence. An advisory sent while no worker listens is lost: its
        task stays stored until `tasks_max_age_days`."""
        if self._js is None:
            raise BusError("NATS bus is not connected")
        js = self._js
        prefix = durable_name(group, TASKS_PREFIX)

        async def on_advisory(msg: Msg) -> None:
            try:
                advisory = json.loads(msg.data)
                consumer, seq, deliveries = (
                    advisory["consumer"],
                    int(advisory["stream_seq"]),
                    int(advisory["deliveries"]),
                )
            except (ValueError, KeyError, TypeError):
                log.warning("unreadable max-deliveries advisory: %r", msg.data[:200])
                return
            if not consumer.startswith(prefix):
                return  # another group's consumer (or a follower's): not this group's task
            try:
                stored = await js.get_msg(STREAM, seq=seq)
            except NotFoundError:
                return  # settled (or swept) since
            except (NatsError, TimeoutError) as exc:
                log.warning("task %d that %s gave up on was not read: %s", seq, consumer, exc)
                return
            await handler(_GivenUpTask(js, stored, deliveries))

        sub = await self.nc.subscribe(f"{MAX_DELIVERIES}.{STREAM}.*", queue=group, cb=on_advisory)
        await self._flush_subscriptions()

        async def stop() -> None:
            if not self.nc.is_closed:
                await sub.unsubscribe()

        return ClosedSubscription(stop)

    async def intake(self, channel: str, *, group: str) -> _NatsIntake:
        """A pull subscription on the group's durable consumer for this task channel."""
        if not is_task_channel(channel):
            raise ValueError(f"{channel!r} is not a task channel")
        assert self._js is not None
        durable = durable_name(group, channel)
        config = ConsumerConfig(
            durable_name=durable,
            ack_policy=AckPolicy.EXPLICIT,
            filter_subject=channel,
            ack_wait=self.settings.ack_wait,
            max_deliver=self.settings.max_deliver,
            max_ack_pending=10_000,
        )
        try:
            sub = await self._js.pull_subscribe(channel, durable=durable, stream=STREAM, config=config)
        except BadRequestError as exc:
            if exc.err_code == CONSUMER_NOT_UNIQUE:
                raise BusError(
                    f"another consumer group already takes {channel} on {self.shown_url}: a work-queue stream "
                    f"gives each task kind to one group, so use the same --group ({group!r} is not it)"
                ) from exc
            raise BusError(f"cannot take tasks from {channel}: {exc.description}") from exc
        return _NatsIntake(sub, channel)


def _hex_digest(digest: str) -> str:
    """An object store digest (`SHA-256=<urlsafe base64>`) as lowercase hex."""
    encoded = digest.split("=", 1)[1] if digest.upper().startswith("SHA-256=") else digest
    return base64.urlsafe_b64decode(encoded).hex()


async def _quietly(settle: Awaitable[None]) -> None:
    """An ack or progress ack; if the connection is away the server offers the message again."""
    try:
        await settle
    except (NatsError, TimeoutError) as exc:
        log.warning("could not settle a followed message (it will come again): %s", exc)
