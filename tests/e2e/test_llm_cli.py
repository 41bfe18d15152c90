"""The LLM path as separate processes over a real nats-server: `forseti worker` fine-tunes two
versions, `forseti llm-serve` loads each, `forseti complete` asks it, `forseti models` promotes and
rolls back what it serves."""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from forseti.adapters.bus import create_bus
from forseti.adapters.bus.servers import NatsServer
from forseti.schemas.catalog import edge_channel
from forseti.schemas.envelope import decode, encode
from forseti.schemas.llm import CompleteReply, CompleteRequest

from ..llm import data_root_with_tiny_llama, finetune
from .test_cli import REPO, WorkerProcess, env, forseti_cmd, run

NAME = "sensor-assistant"


async def edge_completion(bus: str, expect_version: str, timeout: float = 30) -> CompleteReply:
    """Ask the edge device's channel until it answers from `expect_version` (loads are asynchronous)."""
    client = create_bus(bus)
    await client.connect()
    request = encode(CompleteRequest(prompt="Sensor 3 reads", max_tokens=4, name=NAME))
    deadline = time.monotonic() + timeout
    try:
        while True:
            reply: Any = decode(await client.request(edge_channel("dev-llm"), request, timeout=10)).data
            if isinstance(reply, CompleteReply) and reply.version == expect_version:
                return reply
            if time.monotonic() > deadline:
                raise AssertionError(f"the edge device never answered from {expect_version}: {reply}")
            await asyncio.sleep(0.3)
    finally:
        await client.close()


def ask(bus: str, expect_version: str, timeout: float = 30) -> None:
    """`forseti complete` until the service answers from `expect_version` (loads are asynchronous)."""
    deadline = time.monotonic() + timeout
    while True:
        done = run(bus, "complete", NAME, "Sensor 3 reads", "--max-tokens", "4", "--timeout", "5")
        said = done.stderr.decode()
        if done.returncode == 0 and f"{NAME} {expect_version} " in said:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"never answered from {expect_version}: exit {done.returncode}\n{said}")
        time.sleep(0.3)


def test_finetune_serve_complete_promote_and_rollback_from_the_command_line(
    fresh_nats: NatsServer, tmp_path: Path, tiny_llama: Path
) -> None:
    # a server of its own: llm-serve reads the kept history of forseti.models, where other tests
    # announce versions of the same name
    bus = fresh_nats.url
    data_root_with_tiny_llama(tmp_path, tiny_llama)  # the worker's default data root, <data-dir>/datasets
    worker = WorkerProcess(bus, tmp_path, handlers=["--handler", "forseti.worker.handlers.finetune:FinetuneHandler"])
    # an edge device following the same LLM, answering on its own channel
    edge = WorkerProcess(
        bus,
        tmp_path / "edge-host",
        handlers=[],
        command=("edge", "--device-id", "dev-llm", "--llm", NAME),
        ready="answers on",
    )
    serve = subprocess.Popen(
        # its own data directory, as on another host: the GGUF reaches it through the object store
        forseti_cmd(
            "llm-serve",
            "--name",
            NAME,
            "--artifact",
            "q8_0",
            "--context",
            "128",
            "--threads",
            "1",
            "--data-dir",
            str(tmp_path / "llm-host"),
        ),
        cwd=REPO,
        env=env(bus),
        stderr=subprocess.PIPE,
        text=True,
    )
    assert serve.stderr is not None
    lines: list[str] = []
    drain: threading.Thread | None = None
    try:
        for line in serve.stderr:
            lines.append(line)
            if "answers on forseti.llm.sensor-assistant.complete" in line:
                break
        else:
            raise AssertionError("llm-serve exited before it was ready:\n" + "".join(lines))
        drain = threading.Thread(target=lambda: lines.extend(serve.stderr or ()), daemon=True)
        drain.start()

        for dataset, version in (("v1.jsonl", "v1.0"), ("v2.jsonl", "v1.1")):
            task = finetune(dataset, export={"gguf": ["q8_0"]}).model_dump(mode="json", by_alias=True)
            done = run(
                bus, "submit", "-", "--kind", "finetune", "--watch", stdin=json.dumps(task).encode(), timeout=120
            )
            assert done.returncode == 0, done.stderr.decode()
            ask(bus, version)

        assert asyncio.run(edge_completion(bus, "v1.1")).completion_tokens == 4
        fetched = sorted(p.name for p in (tmp_path / "llm-host" / "fetched").rglob("*.gguf"))
        assert len(fetched) == 2, "both versions come through the object store:\n" + "".join(lines)
        listed = run(bus, "models", "list", NAME, "--data-dir", str(tmp_path)).stdout.decode()
        assert "v1.0" in listed and "v1.1" in listed

        for version in ("v1.0", "v1.1"):
            promoted = run(bus, "models", "promote", NAME, version, "--data-dir", str(tmp_path))
            assert promoted.returncode == 0, promoted.stderr.decode()
            ask(bus, version)
        back = run(bus, "models", "rollback", NAME, "--data-dir", str(tmp_path))
        assert back.returncode == 0, back.stderr.decode()
        assert "v1.1 -> v1.0" in back.stderr.decode()
        ask(bus, "v1.0")
        again = run(bus, "models", "rollback", NAME, "--data-dir", str(tmp_path))
        assert again.returncode == 1
        assert "no earlier version" in again.stderr.decode()
    finally:
        serve.terminate()
        code = serve.wait(30)
        if drain is not None:
            drain.join(10)
        serve.stderr.close()
        worker.stop()
        assert edge.stop() == 0, "".join(edge.lines)
    assert code == 0, "".join(lines)
