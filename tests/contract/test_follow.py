"""An edge agent cut off from a real nats-server keeps serving what it holds and, when the connection
comes back, catches up on the announcement it missed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from forseti.adapters.bus import create_bus
from forseti.adapters.bus.servers import NatsServer
from forseti.adapters.processes import Cable
from forseti.schemas.catalog import LOADED, MODELS, edge_channel
from forseti.schemas.envelope import decode, encode
from forseti.schemas.inference import InferReply, InferRequest
from forseti.schemas.models import ModelLoaded
from forseti.worker.services.edge import EdgeAgent

from ..helpers import Watcher, tiny_announcement


async def test_an_agent_cut_off_from_the_server_catches_up_when_it_returns(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    cable = Cable(nats_server.port)
    await cable.plug()
    device_bus, client = create_bus(f"nats://127.0.0.1:{cable.port}"), create_bus(nats_server.url)
    await device_bus.connect()
    await client.connect()
    models = Watcher()
    await client.subscribe(MODELS, models.on_message)
    await client.subscribe(LOADED, models.on_message)
    agent = EdgeAgent(device_bus, device_id="cut-off", data_dir=tmp_path / "edge")
    await agent.start()

    async def loaded(model_id: str) -> ModelLoaded:
        reports = await models.wait_until(
            lambda es: [e for e in es if isinstance(e.data, ModelLoaded) and e.data.model_id == model_id], timeout=30
        )
        report: ModelLoaded = reports[0].data
        return report

    try:
        v1 = tiny_announcement(tmp_path / "v1", "cut-1", device_id="cut-off")
        await client.publish(MODELS, encode(v1, subject=v1.model_id))
        assert (await loaded("cut-1")).ok

        await cable.unplug()
        v2 = tiny_announcement(tmp_path / "v2", "cut-2", device_id="cut-off", version="2")
        await client.publish(MODELS, encode(v2, subject=v2.model_id))
        assert agent.current["tiny"].model_id == "cut-1", "cut off, the agent keeps what it holds"

        await cable.plug()
        assert (await loaded("cut-2")).ok
        ask = encode(InferRequest.model_validate({"rows": [{"a": 0.0, "b": 3.0}]}))
        reply: Any = decode(await client.request(edge_channel("cut-off"), ask, timeout=10)).data
        assert isinstance(reply, InferReply) and reply.model_id == "cut-2"
    finally:
        await agent.stop()
        await device_bus.close()
        await client.close()
        await cable.unplug()
