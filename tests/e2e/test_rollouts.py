"""A canary rollout as separate processes over a real nats-server: `forseti worker` judges it, two
`forseti llm-serve` replicas following `production` serve it, `forseti models rollout --follow`
starts and follows it, `forseti models rollouts` and `rollout-abort` show and end one."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from safetensors.numpy import load_file

from forseti.adapters.bus import create_bus
from forseti.adapters.bus.servers import NatsServer
from forseti.adapters.llm.gguf import write_model
from forseti.adapters.registry import ModelRecord, create_store
from forseti.schemas.catalog import llm_channel
from forseti.schemas.envelope import decode, encode
from forseti.schemas.llm import CompleteReply, CompleteRequest
from forseti.worker.engine.models import describe

from .test_cli import WorkerProcess, run

NAME = "assistant"


async def register(data_dir: Path, tiny_llama: Path) -> None:
    """v1, v2 and v3 of NAME in the data dir's registry: GGUF files of the tiny Llama; v3's file is
    damaged after it was registered, so no replica can load it."""
    tensors = load_file(tiny_llama / "model.safetensors")
    store = create_store(str(data_dir / "registry.db"))
    await store.open()
    try:
        for label in ("v1", "v2", "v3"):
            path = write_model(data_dir / f"{label}.gguf", tiny_llama, tensors, "f32", name=f"{NAME} {label}")
            model = await store.add_model(
                ModelRecord(id=f"{NAME}-{label}", name=NAME, model_type="llm", export_path=str(path),
                            export_format="gguf", label=label)
            )  # fmt: skip
            for artifact in describe([("gguf", "f32", path)], model.id):
                await store.add_artifact(artifact)
        with (data_dir / "v3.gguf").open("r+b") as damaged:
            damaged.seek(-8, 2)
            damaged.write(b"\x00" * 8)
    finally:
        await store.close()


class Clients:
    """Requests to the replicas all along, from a thread of their own; the versions that answered."""

    def __init__(self, bus: str) -> None:
        self.bus = bus
        self.versions: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        client = create_bus(self.bus)
        await client.connect()
        request = encode(CompleteRequest(prompt="Sensor 3 reads", max_tokens=2))
        try:
            while not self.stop.is_set():
                reply: Any = decode(await client.request(llm_channel(NAME), request, timeout=10)).data
                self.versions.append(reply.version if isinstance(reply, CompleteReply) else f"error: {reply}")
                await asyncio.sleep(0.01)
        finally:
            await client.close()

    def __enter__(self) -> Clients:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(30)


@pytest.fixture
def replicas(fresh_nats: NatsServer, tmp_path: Path) -> Iterator[list[WorkerProcess]]:
    started = []
    try:
        for name in ("replica-a", "replica-b"):
            command = ("llm-serve", "--name", NAME, "--artifact", "f32", "--alias", "production", "--context", "128",
                       "--threads", "1", "--health-every", "0.2", "--consumer", name)  # fmt: skip
            started.append(
                WorkerProcess(fresh_nats.url, tmp_path / name, handlers=[], command=command, ready="answers on")
            )
        yield started
    finally:
        for replica in started:
            assert replica.stop() == 0, "".join(replica.lines)


def test_a_canary_rollout_from_the_command_line(
    fresh_nats: NatsServer, tmp_path: Path, tiny_llama: Path, replicas: list[WorkerProcess]
) -> None:
    bus, data = fresh_nats.url, tmp_path / "data"
    data.mkdir()
    asyncio.run(register(data, tiny_llama))
    worker = WorkerProcess(bus, data, handlers=[])
    try:
        refused = run(bus, "models", "rollout", NAME, "v2", "--data-dir", str(data))
        assert refused.returncode == 1 and "promote a first one" in refused.stderr.decode()
        untagged = run(bus, "models", "rollout", NAME, "v2", "--strategy", "rolling", "--data-dir", str(data))
        assert untagged.returncode == 1 and "device_tag" in untagged.stderr.decode()
        mistagged = run(bus, "models", "rollout", NAME, "v2", "--tag", "pumps", "--data-dir", str(data))
        assert mistagged.returncode == 1 and "device_tag" in mistagged.stderr.decode()
        unheld = run(bus, "models", "rollout", NAME, "v2", "--max-hold", "0", "--data-dir", str(data))
        assert unheld.returncode == 1 and "max_hold_seconds: " in unheld.stderr.decode()
        assert run(bus, "models", "promote", NAME, "v1", "--data-dir", str(data)).returncode == 0
        with Clients(bus) as clients:
            while "v1" not in clients.versions[-4:]:  # the replicas load v1 from the object store
                assert clients.thread.is_alive()
                threading.Event().wait(0.1)
            done = run(bus, "models", "rollout", NAME, "v2", "--steps", "50,100", "--interval", "1s",
                       "--min-requests", "5", "--follow", "--data-dir", str(data), timeout=120)  # fmt: skip
            said = done.stdout.decode()
            assert done.returncode == 0, said + done.stderr.decode() + "".join(worker.lines)
            lines = said.strip().splitlines()
            assert [line.split(": ")[1].split(".")[0] for line in lines] == [
                "progressing", "progressing", "progressing", "completed"
            ], said  # fmt: skip
            assert "step 1 (50%)" in lines[1] and "step 2 (100%)" in lines[2]
            threading.Event().wait(1.0)
            tail = clients.versions[-10:]
        assert tail == ["v2"] * 10, tail
        assert "v1" in clients.versions and not [v for v in clients.versions if v.startswith("error")]

        listed = run(bus, "models", "rollouts", NAME, "--data-dir", str(data)).stdout.decode()
        assert "completed" in listed and "100%" in listed
        (rollout,) = json.loads(run(bus, "models", "rollouts", "--json", "--data-dir", str(data)).stdout)  # one so far
        assert [m["state"] for m in rollout["moves"]] == ["progressing"] * 3 + ["completed"]
        assert rollout["moves"][2]["evidence"]["candidate_requests"] >= 5

        # v3 cannot be loaded: the rollout rolls back on its own, and --follow exits 1
        failed = run(bus, "models", "rollout", NAME, "v3", "--interval", "1s", "--follow", "--data-dir", str(data),
                     timeout=120)  # fmt: skip
        said = failed.stdout.decode()
        assert failed.returncode == 1, said + failed.stderr.decode()
        assert "rolled_back" in said.splitlines()[-1] and "could not load it" in said and "sha256" in said, said
        assert "v2" in run(bus, "complete", NAME, "Sensor 3 reads", "--max-tokens", "2").stderr.decode()

        # a rollout back to v1, aborted before it is judged
        started = run(bus, "models", "rollout", NAME, "v1", "--interval", "10m", "--latency", "p99", "--max-hold", "1h",
                      "--data-dir", str(data))  # fmt: skip
        assert started.returncode == 0, started.stderr.decode()
        abort = run(bus, "models", "rollout-abort", NAME, "--reason", "not today", "--data-dir", str(data))
        assert abort.returncode == 0 and "aborted" in abort.stderr.decode()
        again = run(bus, "models", "rollout-abort", NAME, "--data-dir", str(data))
        assert again.returncode == 1 and "no rollout" in again.stderr.decode()
        shown = run(bus, "models", "rollouts", "--id", started.stdout.decode().strip(), "--data-dir", str(data))
        assert "aborted" in shown.stdout.decode() and "not today" in shown.stdout.decode()
        assert "candidate req/err/p99 ms" in shown.stdout.decode(), "the figure its latency bound is on"
        (aborted,) = json.loads(run(bus, "models", "rollouts", "--id", started.stdout.decode().strip(), "--json",
                                    "--data-dir", str(data)).stdout)  # fmt: skip
        assert aborted["spec"]["bounds"]["latency"] == "p99" and aborted["spec"]["bounds"]["max_hold_seconds"] == 3600
    finally:
        assert worker.stop() == 0, "".join(worker.lines)
