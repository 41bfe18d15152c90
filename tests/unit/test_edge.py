"""The edge agent on the memory bus: a restarted agent serves what it served before, with no bus event;
a device that starts after an announcement, or was away for one, takes it from the channel's history."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from forseti.adapters.bus import MemoryBroker, MemoryBus
from forseti.schemas.catalog import LOADED, MODELS, edge_channel
from forseti.schemas.envelope import decode, encode
from forseti.schemas.inference import InferError, InferReply, InferRequest
from forseti.schemas.models import ModelLoaded
from forseti.worker.services.edge import EdgeAgent

from ..helpers import Watcher, tiny_announcement


async def test_a_restarted_agent_serves_its_last_models_before_any_announcement(tmp_path: Path) -> None:
    broker = MemoryBroker()
    event = tiny_announcement(tmp_path / "worker", "tiny-1", device_id="d1")
    client = MemoryBus(broker)
    await client.connect()
    ask = encode(InferRequest.model_validate({"rows": [{"a": 0.0, "b": 3.0}]}))

    buses = [MemoryBus(broker), MemoryBus(broker)]
    for bus in buses:
        await bus.connect()
    first = EdgeAgent(buses[0], device_id="d1", data_dir=tmp_path / "edge")
    await first.start()
    assert await first.load(event)
    await first.stop()

    again = EdgeAgent(buses[1], device_id="d1", data_dir=tmp_path / "edge")
    await again.start()
    try:
        reply: Any = decode(await client.request(edge_channel("d1"), ask, timeout=5)).data
        assert isinstance(reply, InferReply)
        assert (reply.model_id, reply.outputs[0]["label"]) == ("tiny-1", "right")
    finally:
        await again.stop()
        for bus in (*buses, client):
            await bus.close()


async def test_a_device_started_after_an_announcement_and_one_that_was_away_both_catch_up(tmp_path: Path) -> None:
    broker = MemoryBroker()
    client = MemoryBus(broker)
    await client.connect()
    models = Watcher()
    await client.subscribe(MODELS, models.on_message)
    await client.subscribe(LOADED, models.on_message)
    v1 = tiny_announcement(tmp_path / "v1", "tiny-1", device_id="d2")
    await client.publish(MODELS, encode(v1, subject=v1.model_id))

    late = MemoryBus(broker)
    await late.connect()
    agent = EdgeAgent(late, device_id="d2", data_dir=tmp_path / "edge")
    await agent.start()
    await loaded(models, "tiny-1")
    await agent.stop()
    await late.close()

    v2 = tiny_announcement(tmp_path / "v2", "tiny-2", device_id="d2", version="2")
    await client.publish(MODELS, encode(v2, subject=v2.model_id))
    back = MemoryBus(broker)
    await back.connect()
    again = EdgeAgent(back, device_id="d2", data_dir=tmp_path / "edge")
    await again.start()
    try:
        await loaded(models, "tiny-2")
        assert again.current["tiny"].model_id == "tiny-2"
        reports = [e.data.model_id for e in models.events if isinstance(e.data, ModelLoaded)]
        assert reports == ["tiny-1", "tiny-2"], "only what it missed was handled on return, in order"
        assert again.previous["tiny"].model_id == "tiny-1"
    finally:
        await again.stop()
        await back.close()
        await client.close()


async def loaded(models: Watcher, model_id: str) -> None:
    """Until the agent reports `model_id` loaded."""
    reports = await models.wait_until(
        lambda es: [e for e in es if isinstance(e.data, ModelLoaded) and e.data.model_id == model_id]
    )
    assert reports[0].data.ok, reports[0].data.message


@pytest.mark.parametrize(
    ("addressed", "taken"),
    [
        ({"device_id": "d3"}, True),
        ({"device_id": "other"}, False),
        ({"device_tags": ["valves", "pumps"]}, True),
        ({"device_tags": ["valves"]}, False),  # a kind it follows does not make a tagged model its own
        ({}, True),  # addressed to nobody: taken for its kind
        ({"quantization": "int8"}, False),  # not the export it takes
    ],
)
def test_what_an_agent_takes_by_id_tag_or_kind(tmp_path: Path, addressed: dict[str, Any], taken: bool) -> None:
    agent = EdgeAgent(MemoryBus(), device_id="d3", data_dir=tmp_path, tags={"pumps"}, kinds={"classifier"})
    event = tiny_announcement(tmp_path, "tiny-1", device_id="d3").model_copy(update={"device_id": None, **addressed})
    assert agent.wants(event) is taken


async def test_rows_that_give_none_of_the_models_columns_get_an_error_not_a_guess(tmp_path: Path) -> None:
    broker = MemoryBroker()
    client, bus = MemoryBus(broker), MemoryBus(broker)
    await client.connect()
    await bus.connect()
    agent = EdgeAgent(bus, device_id="d1", data_dir=tmp_path / "edge")
    await agent.start()
    try:
        assert await agent.load(tiny_announcement(tmp_path / "worker", "tiny-1", device_id="d1"))
        ask = encode(InferRequest.model_validate({"rows": [{"a": 1.0}, {"f0": 1.5}]}))
        reply: Any = decode(await client.request(edge_channel("d1"), ask, timeout=5)).data
        assert isinstance(reply, InferError)
        assert reply.code == "invalid_data"
        assert "row 1 gives none of the model's columns (a, b); it gives f0" in reply.message
    finally:
        await agent.stop()
        await client.close()
