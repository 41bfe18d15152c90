"""/metrics and /healthz of a running worker, on an injected registry."""

from __future__ import annotations

import asyncio
from pathlib import Path

from prometheus_client import CollectorRegistry

from forseti.adapters.bus import MemoryBroker, MemoryBus
from forseti.worker.engine.metrics import Metrics

from ..helpers import EchoHandler, inference, running_worker, submit, watch


async def http_get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = raw.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


async def test_metrics_and_health_are_served(tmp_path: Path) -> None:
    broker = MemoryBroker()
    client = MemoryBus(broker)
    await client.connect()
    registry = CollectorRegistry()
    async with running_worker(
        MemoryBus(broker), [EchoHandler()], tmp_path, metrics=Metrics(registry), metrics_port=0
    ) as worker:
        task = inference()
        watcher = await watch(client, task.request_id or "")
        await submit(client, task)
        await watcher.wait_for("completed")
        await client.publish("forseti.tasks.inference", b"garbage")
        port = worker.metrics_port
        assert port is not None
        status, health = await http_get(port, "/healthz")
        assert status == 200
        assert '"ok":true' in health
        assert '"object_store":null' in health, "the memory bus has no object store: checkpoints stay local"
        status, text = await http_get(port, "/metrics")
        assert status == 200
        assert 'forseti_tasks_received_total{kind="inference"}' in text
        assert 'forseti_jobs_total{kind="inference",outcome="completed"} 1.0' in text
        assert "forseti_job_duration_seconds_bucket" in text
        assert 'forseti_bus_publish_duration_seconds_count{transport="memory"}' in text
        assert (await http_get(port, "/nope"))[0] == 404
    await client.close()
    assert registry.get_sample_value("forseti_deadletters_total", {"reason": "malformed_json"}) == 1.0


async def test_metrics_live_on_the_injected_registry(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.deadletters.labels("oversized").inc()
    assert registry.get_sample_value("forseti_deadletters_total", {"reason": "oversized"}) == 1.0
    other = Metrics()
    assert other.registry.get_sample_value("forseti_deadletters_total", {"reason": "oversized"}) is None
