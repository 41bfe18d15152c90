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


async def test_a_fine_tunes_peft_adapter_and_gguf_fetched_by_a_plain_nats_client_load_with_peft_and_llama_cpp(
    nats_server: NatsServer, tmp_path: Path, tiny_llama: Path
) -> None:
    import torch
    from gguf import GGUFReader, GGUFValueType
    from llama_cpp import Llama
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    INTEGERS = (GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.UINT64, GGUFValueType.UINT8)

    from forseti.worker.handlers.finetune import FinetuneHandler

    from ..llm import data_root_with_tiny_llama, finetune

    nc = await nats.connect(nats_server.url)
    announced: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def on_model(msg: Any) -> None:
        await announced.put(orjson.loads(msg.data))

    await nc.subscribe("forseti.models", cb=on_model)
    task = finetune(export={"gguf": ["q8_0"]})
    data_root_with_tiny_llama(tmp_path, tiny_llama)  # the worker's data root: tmp_path/datasets
    async with running_worker(create_bus(nats_server.url), [FinetuneHandler(progress_seconds=0)], tmp_path):
        client = create_bus(nats_server.url)
        await client.connect()
        watcher = await watch(client, task.request_id or "")
        await submit(client, task)
        result = (await watcher.wait_for("completed", timeout=240)).data.result
        await client.close()
        events: dict[str, dict[str, Any]] = {}
        while set(events) != {"peft", "gguf"}:
            event = (await asyncio.wait_for(announced.get(), 30))["data"]
            events[event["format"]] = event
        adapter = tmp_path / "fetched-adapter"
        adapter.mkdir()
        (adapter / "adapter_model.safetensors").write_bytes(await fetched(nc, events["peft"]["uri"]))
        (adapter / "adapter_config.json").write_bytes(await fetched(nc, events["peft"]["config_uri"]))
        model = tmp_path / "fetched.gguf"
        model.write_bytes(await fetched(nc, events["gguf"]["uri"]))
    await nc.close()

    # the metadata llama.cpp's own converter writes, read with gguf-py (llama.cpp's reader)
    fields = GGUFReader(model).fields
    text = {k: bytes(f.parts[f.data[0]]).decode() for k, f in fields.items() if f.types == [GGUFValueType.STRING]}
    number = {k: int(f.parts[f.data[0]][0]) for k, f in fields.items() if f.types and f.types[0] in INTEGERS}
    assert text["general.architecture"] == "llama" and text["general.type"] == "model"
    assert text["general.name"] == "sensor-assistant v1.0"
    assert number["general.file_type"] == 7, "LlamaFileType MOSTLY_Q8_0"
    assert number["general.quantization_version"] == 2
    assert text["tokenizer.ggml.model"] == "gpt2" and "tokenizer.ggml.pre" in text
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "llama.context_length"):
        assert key in fields, key
    # and it loads and generates with plain llama-cpp-python, no Forseti code in between
    llm = Llama(model_path=str(model), n_ctx=64, verbose=False)
    assert llm.n_vocab() == number["llama.vocab_size"]
    out = llm.create_completion("Sensor 3 reads", max_tokens=3, temperature=0.0, stream=False)
    assert isinstance(out, dict) and out["usage"]["completion_tokens"] >= 1
    llm.close()

    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    loaded = PeftModel.from_pretrained(base, adapter)
    on_worker = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), result.adapter_path)
    tokens = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        assert torch.allclose(loaded(tokens).logits, on_worker(tokens).logits)
