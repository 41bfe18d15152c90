"""llm-serve with the fine-tune handler on the memory bus: load on announcement, answer, hot-swap,
promote / rollback, refuse a corrupted file, serve a LoRA GGUF on its base."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from forseti.adapters.bus import MemoryBroker, MemoryBus
from forseti.schemas.catalog import LOADED, MODELS, llm_channel
from forseti.schemas.envelope import decode, encode
from forseti.schemas.llm import CompleteReply, CompleteRequest, LlmError
from forseti.schemas.models import ModelAvailable
from forseti.worker.engine.models import promote, rollback
from forseti.worker.handlers.finetune import FinetuneHandler
from forseti.worker.services.llm_serve import LlmService

from ..helpers import Watcher, running_worker, submit, watch
from ..llm import finetune

PROMPT = "Sensor 3 reads"


async def ask(client: MemoryBus, name: str = "sensor-assistant") -> Any:
    reply = await client.request(llm_channel(name), encode(CompleteRequest(prompt=PROMPT, max_tokens=8)), timeout=30)
    return decode(reply).data


async def test_llm_serve_follows_versions_promotions_and_rollbacks(
    broker: MemoryBroker, client: MemoryBus, tmp_path: Path, data_root: Path
) -> None:
    models = Watcher()
    await client.subscribe(MODELS, models.on_message)
    await client.subscribe(LOADED, models.on_message)
    serve_bus = MemoryBus(broker)
    await serve_bus.connect()
    service = LlmService(serve_bus, name="sensor-assistant", consumer="test-llm", artifact="f32", context=128)
    lora_service = LlmService(serve_bus, name="sensor-lora", consumer="test-lora", artifact="lora", context=128)
    await service.start()
    await lora_service.start()
    try:
        nothing = await ask(client)
        assert isinstance(nothing, LlmError)
        assert nothing.code == "invalid_model"

        async with running_worker(MemoryBus(broker), [FinetuneHandler()], tmp_path) as worker:
            versions = []
            for dataset in ("v1.jsonl", "v2.jsonl"):
                task = finetune(dataset, export={"gguf": ["f32"]})
                events = await watch(client, task.request_id or "")
                await submit(client, task)
                versions.append((await events.wait_end(timeout=240)).data.result)
                loaded = (await models.wait_for("loaded", count=len(versions))).data
                assert (loaded.version, loaded.ok, loaded.consumer) == (versions[-1].version, True, "test-llm")
                answer = await ask(client)
                assert isinstance(answer, CompleteReply), answer
                assert (answer.version, answer.model_id) == (versions[-1].version, versions[-1].model_id)
                assert answer.completion_tokens > 0
            v1, v2 = versions

            # requests in flight during a swap all get answers
            in_flight = [asyncio.create_task(ask(client)) for _ in range(6)]
            await promote(worker.store, client, "sensor-assistant", "v1.0", alias="production")
            await models.wait_for("loaded", count=3)
            answers = await asyncio.gather(*in_flight)
            assert all(isinstance(a, CompleteReply) for a in answers)
            assert (await ask(client)).version == "v1.0"

            await promote(worker.store, client, "sensor-assistant", "v1.1", alias="production")
            await models.wait_for("loaded", count=4)
            assert (await ask(client)).version == "v1.1"
            back = await rollback(worker.store, client, "sensor-assistant", alias="production")
            assert (back.from_version, back.to_version, back.model_id) == ("v1.1", "v1.0", v1.model_id)
            loaded = (await models.wait_for("loaded", count=5)).data
            assert (loaded.version, loaded.ok) == ("v1.0", True)
            assert (await ask(client)).version == "v1.0"

            # a file that does not match its digest is refused; the serving version stays
            corrupt = tmp_path / "corrupt.gguf"
            shutil.copy(v2.gguf["f32"], corrupt)
            with corrupt.open("r+b") as f:
                f.seek(-8, 2)
                f.write(b"\x00" * 8)
            good = next(
                e.data for e in models.events if e.type.endswith("available.v1") and e.data.quantization == "f32"
            )
            bad = ModelAvailable.model_validate(
                {**good.model_dump(), "uri": corrupt.as_uri(), "version": "v9.9", "model_id": "corrupt"}
            )
            await client.publish(MODELS, encode(bad))
            refused = (await models.wait_for("loaded", count=6)).data
            assert (refused.version, refused.ok) == ("v9.9", False)
            assert "sha256" in refused.message
            assert (await ask(client)).version == "v1.0"

            # the LoRA GGUF on its base GGUF, through a service that follows the lora artifact
            task = finetune("v1.jsonl", name="sensor-lora", export={"adapter_gguf": True})
            events = await watch(client, task.request_id or "")
            await submit(client, task)
            await events.wait_end(timeout=240)
            loaded = (await models.wait_for("loaded", count=7)).data
            assert (loaded.consumer, loaded.ok) == ("test-lora", True), loaded.message
            answer = await ask(client, "sensor-lora")
            assert (answer.version, answer.model_id) == ("v1.0", task.request_id)

        # a service started after all that (the worker gone) catches up from the kept history: it ends
        # serving what the one running all along serves, with no promote to wake it
        late = LlmService(
            serve_bus, name="sensor-assistant", consumer="late", artifact="f32", context=128, answer=False
        )
        await late.start()
        try:
            reports = await models.wait_until(
                lambda es: [e for e in es if e.type.endswith("loaded.v1") and e.data.consumer == "late"], 6, timeout=120
            )
            assert [(r.data.version, r.data.ok) for r in reports] == [
                ("v1.0", True), ("v1.1", True), ("v1.0", True), ("v1.1", True), ("v1.0", True), ("v9.9", False)
            ]  # fmt: skip
            assert late.current is not None and (late.current.version, late.current.model_id) == ("v1.0", v1.model_id)
        finally:
            await late.stop()
    finally:
        await service.stop()
        await lora_service.stop()
        await serve_bus.close()


def test_a_process_that_used_llama_cpp_ends_without_unclosed_files() -> None:
    # llama-cpp-python opens /dev/null twice at import and never closes it: every test run ended
    # with two ResourceWarning lines
    probe = "from forseti.adapters.llm.llama import llama_class; llama_class()"
    done = subprocess.run(
        [sys.executable, "-W", "always::ResourceWarning", "-c", probe], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "unclosed file" not in done.stderr
