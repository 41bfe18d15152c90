"""The edge agent on the memory bus: a restarted agent serves what it served before, with no bus event."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto, helper

from forseti.adapters.bus import MemoryBroker, MemoryBus
from forseti.adapters.exporters import sha256_of
from forseti.adapters.inference import CARD_KEY, ModelCard
from forseti.schemas.catalog import edge_channel
from forseti.schemas.envelope import decode, encode
from forseti.schemas.inference import InferReply, InferRequest
from forseti.schemas.models import ModelAvailable
from forseti.worker.edge import EdgeAgent


def tiny_classifier(path: Path) -> Path:
    """A two-column, two-class 'classifier' (softmax of the raw columns) with its card inside."""
    graph = helper.make_graph(
        [helper.make_node("Softmax", ["numeric"], ["prediction"], axis=1)],
        "tiny",
        [helper.make_tensor_value_info("numeric", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("prediction", TensorProto.FLOAT, ["N", 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    card = ModelCard("classifier", numeric=["a", "b"], classes=["left", "right"])
    helper.set_model_props(model, {CARD_KEY: card.to_json()})
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


async def test_a_restarted_agent_serves_its_last_models_before_any_announcement(tmp_path: Path) -> None:
    broker = MemoryBroker()
    path = tiny_classifier(tmp_path / "worker" / "model.onnx")
    event = ModelAvailable(
        model_id="tiny-1",
        name="tiny",
        version="1",
        format="onnx",
        uri=path.as_uri(),
        sha256=sha256_of(path),
        size_bytes=path.stat().st_size,
        kind="classifier",
        created_at="2026-11-22T00:00:00Z",
        device_id="d1",
    )
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
