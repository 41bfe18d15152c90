"""Forseti's artifacts in the ecosystem's own hands: a plain nats-py client fetches what a worker
announced from the JetStream object store, and onnxruntime uses it as a scikit-learn user would, with
no Forseti code in between."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import nats
import numpy as np
import onnxruntime
import orjson
from sklearn.datasets import load_breast_cancer

from forseti.adapters.bus import create_bus
from forseti.adapters.bus.servers import NatsServer
from forseti.worker.handlers.training import TrainingHandler

from ..helpers import breast_cancer_training, running_worker, submit, watch


async def fetched(nc: Any, uri: str) -> bytes:
    """An object named by a `nats-object://BUCKET/NAME` announcement, read with nats-py alone."""
    bucket, name = uri.removeprefix("nats-object://").split("/", 1)
    store = await nc.jetstream().object_store(bucket)
    return bytes((await store.get(name)).data)


async def test_a_classifier_fetched_by_a_plain_nats_client_classifies_rows_in_their_own_column_order(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    nc = await nats.connect(nats_server.url)
    announced: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def on_model(msg: Any) -> None:
        await announced.put(orjson.loads(msg.data))

    await nc.subscribe("forseti.models", cb=on_model)
    task = breast_cancer_training("foreign-onnx", epochs=20, hidden=[16])
    async with running_worker(create_bus(nats_server.url), [TrainingHandler()], tmp_path):
        client = create_bus(nats_server.url)
        await client.connect()
        watcher = await watch(client, "foreign-onnx")
        await submit(client, task)
        await watcher.wait_for("completed", timeout=120)
        await client.close()
        event = await asyncio.wait_for(announced.get(), 30)
        while event["data"]["format"] != "onnx":
            event = await asyncio.wait_for(announced.get(), 30)
        blob = await fetched(nc, event["data"]["uri"])
    await nc.close()

    session = onnxruntime.InferenceSession(blob, providers=["CPUExecutionProvider"])
    card = json.loads(session.get_modelmeta().custom_metadata_map["forseti.card"])
    # the rows as scikit-learn gives them (f0, f1, ..., f29), the order the task's rows had
    assert card["numeric"] == [f"f{i}" for i in range(30)]
    assert card["classes"] == [0, 1], "an integer target's classes are integers"
    cancer = load_breast_cancer()
    (probabilities,) = session.run(None, {"numeric": cancer.data.astype(np.float32)})
    predicted = np.array(card["classes"])[probabilities.argmax(axis=1)]
    assert (predicted == cancer.target).mean() >= 0.9


async def test_a_peft_adapter_fetched_by_a_plain_nats_client_loads_with_peft(
    nats_server: NatsServer, tmp_path: Path, tiny_llama: Path
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from forseti.worker.handlers.finetune import FinetuneHandler

    from ..llm import data_root_with_tiny_llama, finetune

    nc = await nats.connect(nats_server.url)
    announced: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def on_model(msg: Any) -> None:
        await announced.put(orjson.loads(msg.data))

    await nc.subscribe("forseti.models", cb=on_model)
    task = finetune()
    data_root_with_tiny_llama(tmp_path, tiny_llama)  # the worker's data root: tmp_path/datasets
    async with running_worker(create_bus(nats_server.url), [FinetuneHandler(progress_seconds=0)], tmp_path):
        client = create_bus(nats_server.url)
        await client.connect()
        watcher = await watch(client, task.request_id or "")
        await submit(client, task)
        result = (await watcher.wait_for("completed", timeout=240)).data.result
        await client.close()
        event = (await asyncio.wait_for(announced.get(), 30))["data"]
        assert event["format"] == "peft"
        adapter = tmp_path / "fetched-adapter"
        adapter.mkdir()
        (adapter / "adapter_model.safetensors").write_bytes(await fetched(nc, event["uri"]))
        (adapter / "adapter_config.json").write_bytes(await fetched(nc, event["config_uri"]))
    await nc.close()

    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    loaded = PeftModel.from_pretrained(base, adapter)
    on_worker = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), result.adapter_path)
    tokens = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        assert torch.allclose(loaded(tokens).logits, on_worker(tokens).logits)
