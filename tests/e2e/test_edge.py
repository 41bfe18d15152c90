"""A worker and an edge agent as separate processes with separate data directories over real nats-server:
a classifier is trained, announced, fetched through the object store, verified, loaded and queried; a
corrupted artifact is refused; a new version is swapped in and a rollback returns the previous one; an
RL policy is fetched and acts on the device as it does on the worker."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from sklearn.datasets import load_breast_cancer

from forseti.adapters.bus import create_bus
from forseti.adapters.bus.servers import NatsServer, TansuBroker, free_port
from forseti.adapters.inference import OnnxPolicy
from forseti.schemas.catalog import LOADED, MODELS, edge_channel
from forseti.schemas.envelope import decode, encode
from forseti.schemas.inference import ActReply, ActRequest, InferError, InferReply, InferRequest
from forseti.schemas.models import ModelAvailable, ModelRollback
from forseti.schemas.tasks import RLTask, TrainingTask

from ..helpers import Watcher, watch
from .test_cli import REPO, WorkerProcess

DEVICE = "dev1"


def classifier_task(epochs: int) -> TrainingTask:
    cancer = load_breast_cancer()
    rows = [
        {**{f"f{i}": float(v) for i, v in enumerate(row)}, "label": int(label)}
        for row, label in zip(cancer.data, cancer.target, strict=True)
    ]
    return TrainingTask.model_validate(
        {
            "request_id": f"edge-{uuid.uuid4().hex[:6]}",
            "model_type": "classifier",
            "name": "edge-cls",
            "device_id": DEVICE,
            "config": {"epochs": epochs, "hidden": [16]},
            "data_sources": [{"rows": rows, "target": "label"}],
        }
    )


def policy_task() -> RLTask:
    return RLTask.model_validate(
        {
            "request_id": f"edge-rl-{uuid.uuid4().hex[:6]}",
            "algorithm": "ppo",
            "environment": "CartPole-v1",
            "name": "edge-policy",
            "device_id": DEVICE,
            "config": {"total_timesteps": 256, "n_steps": 128, "seed": 0},
            "policy": {"net_arch": [16]},
            "evaluation": {"episodes": 1},
        }
    )


def test_the_edge_agent_is_torch_free() -> None:
    blocked = "import sys; sys.modules.update(dict.fromkeys(['torch', 'transformers', 'peft', 'stable_baselines3']))"
    probe = f"{blocked}; import forseti.worker.services.edge, forseti.worker.cli; print('ok')"
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=False)
    assert done.stdout.strip() == "ok", done.stderr


def test_an_edge_agent_started_before_its_bus_waits_for_it(tmp_path: Path) -> None:
    port = free_port()
    edge = WorkerProcess(
        f"nats://127.0.0.1:{port}", tmp_path / "edge", handlers=[], command=("edge", "--device-id", "early"),
        ready="trying again",
    )  # fmt: skip
    try:
        with NatsServer(tmp_path / "nats", port=port) as server:
            deadline = time.monotonic() + 30
            while not any("answers on" in line for line in edge.lines):
                assert edge.proc.poll() is None and time.monotonic() < deadline, "".join(edge.lines)
                time.sleep(0.1)

            async def ask() -> Any:
                client = create_bus(server.url)
                await client.connect()
                try:
                    request = encode(InferRequest.model_validate({"rows": [{"a": 1.0}]}))
                    return decode(await client.request(edge_channel("early"), request, timeout=10)).data
                finally:
                    await client.close()

            answer = asyncio.run(ask())
            assert isinstance(answer, InferError) and "serves: none yet" in answer.message
    finally:
        assert edge.stop() == 0, "".join(edge.lines)


@pytest.mark.parametrize("over", ["nats", "kafka", "kafka-s3"])
def test_a_worker_and_an_edge_agent_on_separate_hosts(
    over: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    # NATS: artifacts through the object store; Kafka: through the worker's HTTP endpoint, or through
    # an S3 store that the worker and the device both reach (no endpoint of the worker's needed)
    device: tuple[str, ...] = ()
    if over == "nats":
        server: NatsServer | TansuBroker = request.getfixturevalue("nats_server")
        bus_url, expected, extra = server.url + "?ack_wait=2", "nats-object://forseti-artifacts/", []
    else:
        server = request.getfixturevalue("fresh_tansu")
        bus_url = server.url + "?session_timeout_ms=6000&heartbeat_interval_ms=500&partitions=2"
        expected, extra = "http://127.0.0.1:", ["--artifact-port", "0"]
        if over == "kafka-s3":
            s3_url: str = request.getfixturevalue("s3_url")
            expected, extra, device = (
                "s3://forseti-tests/",
                ["--object-store-url", s3_url],
                ("--object-store-url", s3_url),
            )
    edge = WorkerProcess(
        bus_url, tmp_path / "edge", handlers=[], command=("edge", "--device-id", DEVICE, *device), ready="answers on"
    )
    worker = WorkerProcess(
        bus_url,
        tmp_path / "worker",
        handlers=[
            *("--handler", "forseti.worker.handlers.training:TrainingHandler"),
            *("--handler", "forseti.worker.handlers.rl:RLHandler"),
            *extra,
        ],
    )

    async def scenario() -> None:
        client = create_bus(bus_url)
        await client.connect()
        models = Watcher()
        await client.subscribe(MODELS, models.on_message)
        await client.subscribe(LOADED, models.on_message)
        rows = [{"f0": 20.0, "f1": 20.0, "f2": 130.0}]

        async def ask() -> Any:
            request = InferRequest.model_validate({"rows": rows, "name": "edge-cls"})
            return decode(await client.request(f"forseti.edge.{DEVICE}.infer", encode(request), timeout=10)).data

        async def trained(task: TrainingTask | RLTask) -> tuple[ModelAvailable, Any, Any]:
            """Run a task on the worker; its announcement, the agent's load report and the job's result."""
            kind = "training" if isinstance(task, TrainingTask) else "rl"
            events = await watch(client, task.request_id or "")
            await client.publish(f"forseti.tasks.{kind}", encode(task))
            result = (await events.wait_end(timeout=120)).data.result
            # on Kafka the announcement may come after the job's end: they travel on different topics
            announced = (
                await models.wait_until(
                    lambda es: [
                        e
                        for e in es
                        if isinstance(e.data, ModelAvailable)
                        and e.data.format == "onnx"
                        and e.data.job_id == task.request_id
                    ]
                )
            )[0].data
            loaded = await models.wait_until(
                lambda es: [e for e in es if e.type.endswith("loaded.v1") and e.data.model_id == announced.model_id]
            )
            return announced, loaded[0].data, result

        try:
            v1, loaded, _ = await trained(classifier_task(epochs=3))
            assert v1.uri.startswith(expected), "fetched from another host, not a shared disk"
            assert (loaded.ok, loaded.consumer) == (True, DEVICE), loaded.message
            assert list((tmp_path / "edge" / "fetched").rglob("model.onnx")), "the device holds its own copy"
            answer = await ask()
            assert isinstance(answer, InferReply) and answer.model_id == v1.model_id
            assert set(answer.outputs[0]) == {"label", "probabilities"}

            corrupted = v1.model_copy(update={"model_id": "corrupted", "sha256": "0" * 64})
            await client.publish(MODELS, encode(corrupted, subject="corrupted"))
            refused = (
                await models.wait_until(
                    lambda es: [e for e in es if e.type.endswith("loaded.v1") and e.data.model_id == "corrupted"]
                )
            )[0].data
            assert not refused.ok and "sha256" in refused.message
            assert (await ask()).model_id == v1.model_id, "the last good model keeps serving"

            v2, loaded, _ = await trained(classifier_task(epochs=4))
            assert loaded.ok
            assert (await ask()).model_id == v2.model_id
            back = ModelRollback(name="edge-cls", from_version=v2.version, to_version=v1.version, model_id=v1.model_id)
            await client.publish(MODELS, encode(back, subject=v1.model_id))
            await models.wait_until(
                lambda es: [e for e in es if e.type.endswith("loaded.v1") and e.data.model_id == v1.model_id], count=2
            )
            assert (await ask()).model_id == v1.model_id

            unknown: Any = decode(
                await client.request(
                    f"forseti.edge.{DEVICE}.infer",
                    encode(InferRequest.model_validate({"rows": rows, "name": "other"})),
                    timeout=10,
                )
            ).data
            assert isinstance(unknown, InferError) and unknown.code == "invalid_model"

            # an RL policy: the device acts with it, as the worker's own copy does
            policy, loaded, result = await trained(policy_task())
            assert loaded.ok, loaded.message
            observations = [[0.0, 0.0, 0.0, 0.0], [0.1, 1.0, -0.2, -1.0], [-0.1, -1.0, 0.2, 1.0]]
            act = ActRequest.model_validate({"observations": observations, "name": "edge-policy"})
            acted: Any = decode(await client.request(edge_channel(DEVICE), encode(act), timeout=10)).data
            assert isinstance(acted, ActReply) and acted.model_id == policy.model_id
            assert acted.actions == OnnxPolicy(Path(result.policy_path)).act(observations).tolist()
        finally:
            await client.close()

    try:
        asyncio.run(scenario())
    finally:
        assert worker.stop() == 0
        assert edge.stop() == 0, "".join(edge.lines)
