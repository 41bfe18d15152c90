"""One trace across processes: `forseti submit` (the client), a worker running an RL job on a remote
executor, the executor and an edge agent that loads the policy, each exporting OTLP/HTTP to a
collector; and nothing traced when tracing is off."""

from __future__ import annotations

import asyncio
import json
import threading
from collections import defaultdict
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from forseti.adapters.bus import create_bus
from forseti.adapters.bus.servers import NatsServer
from forseti.schemas.catalog import LOADED

from ..helpers import Watcher
from .test_cli import WorkerProcess, run

DEVICE = "traced-device"


class Collector:
    """An OTLP/HTTP trace receiver: keeps (service, trace id, span name) of every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str, str]] = []
        collector = self

        class Receive(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                request = ExportTraceServiceRequest()
                request.ParseFromString(self.rfile.read(int(self.headers["Content-Length"])))
                for resource_spans in request.resource_spans:
                    service = next(
                        a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"
                    )
                    for scope in resource_spans.scope_spans:
                        collector.spans += [(service, s.trace_id.hex(), s.name) for s in scope.spans]
                body = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Receive)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def by_trace(self) -> dict[str, set[tuple[str, str]]]:
        """(service, span name) of each trace, by trace id."""
        traces: dict[str, set[tuple[str, str]]] = defaultdict(set)
        for service, trace_id, name in self.spans:
            traces[trace_id].add((service, name))
        return traces


@pytest.fixture
def collector() -> Iterator[Collector]:
    receiver = Collector()
    yield receiver
    receiver.server.shutdown()
    receiver.server.server_close()


def rl_task(tmp_path: Path, job_id: str) -> Path:
    task = {
        "request_id": job_id,
        "algorithm": "ppo",
        "environment": "CartPole-v1",
        "executor": "cartpole",
        "device_id": DEVICE,
        "config": {"total_timesteps": 256, "n_steps": 64, "num_envs": 1, "seed": 1},
        "policy": {"net_arch": [8]},
        "evaluation": {"episodes": 1},
    }
    path = tmp_path / f"{job_id}.json"
    path.write_text(json.dumps(task))
    return path


async def loaded_on_device(bus_url: str, job_id: str, submit: Any) -> None:
    """Run `submit` and wait until the edge agent reports the job's policy loaded."""
    client = create_bus(bus_url)
    await client.connect()
    reports = Watcher()
    await client.subscribe(LOADED, reports.on_message)
    done = await asyncio.to_thread(submit)
    assert done.returncode == 0, done.stderr.decode()
    await reports.wait_until(lambda es: [e for e in es if e.data.model_id == job_id and e.data.ok], timeout=120)
    await client.close()


def test_one_trace_spans_client_worker_executor_and_edge(
    nats_server: NatsServer, collector: Collector, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FORSETI_OTLP_ENDPOINT", collector.url)
    bus = nats_server.url
    handlers = ["--handler", "forseti.worker.handlers.rl:RLHandler"]
    processes = [
        WorkerProcess(bus, None, handlers=[], command=("executor", "--env", "CartPole-v1", "--id", "cartpole"),
                      ready="serving"),
        WorkerProcess(bus, tmp_path / "edge", handlers=[], command=("edge", "--device-id", DEVICE), ready="answers on"),
        WorkerProcess(bus, tmp_path / "worker", handlers=handlers),
    ]  # fmt: skip
    try:
        task = rl_task(tmp_path, "traced-rl")
        asyncio.run(
            loaded_on_device(
                bus, "traced-rl", lambda: run(bus, "submit", str(task), "--kind", "rl", "--watch", timeout=180)
            )
        )
    finally:
        for process in processes:
            assert process.stop() == 0  # SIGTERM flushes each one's spans
    traces = collector.by_trace()
    (trace,) = [spans for spans in traces.values() if ("forseti-client", "forseti.publish rl") in spans]
    assert {service for service, _ in trace} == {"forseti-client", "forseti-worker", "forseti-executor", "forseti-edge"}
    names = {name for _, name in trace}
    phases = {f"forseti.phase {p}" for p in ("training", "evaluation", "export", "register", "announce")}
    assert {"forseti.job rl", "forseti.env EnvOpen", "forseti.env EnvStep", "forseti.edge load"} | phases <= names
    steps = sum(1 for service, _, name in collector.spans if name == "forseti.env EnvStep")
    assert 1 <= steps < 256 // 50, "executor steps are sampled (1 in 100)"


def test_without_the_setting_events_carry_no_trace(nats_server: NatsServer, tmp_path: Path) -> None:
    """Tracing off (the default): a task published by the client carries no traceparent."""
    bus = nats_server.url
    seen: list[bytes] = []

    async def submit_and_read() -> None:
        client = create_bus(bus)
        await client.connect()

        async def keep(msg: Any) -> None:
            seen.append(msg.data)

        await client.subscribe("forseti.tasks.rl", keep)
        done = await asyncio.to_thread(run, bus, "submit", str(rl_task(tmp_path, "untraced")), "--kind", "rl")
        assert done.returncode == 0, done.stderr.decode()
        for _ in range(50):
            if seen:
                break
            await asyncio.sleep(0.1)
        await client.close()

    asyncio.run(submit_and_read())
    assert seen and "traceparent" not in orjson.loads(seen[0])
