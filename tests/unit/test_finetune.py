"""The fine-tune handler on the memory bus: versions with EWC, checked GGUF exports, announcements,
refusals of bad inputs, cancel, resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from forseti.adapters.bus import MemoryBroker, MemoryBus
from forseti.adapters.exporters import sha256_of
from forseti.schemas.catalog import CONTROL, MODELS
from forseti.schemas.control import CancelJob
from forseti.schemas.envelope import encode
from forseti.schemas.jobs import JobState
from forseti.worker.handlers.finetune import FinetuneHandler

from ..helpers import Watcher, run_task, running_worker, stored_job, submit, watch
from ..llm import finetune, pairs, write_dataset


async def test_two_versions_with_ewc_export_checked_gguf_and_announce_every_artifact(
    broker: MemoryBroker, client: MemoryBus, tmp_path: Path, data_root: Path
) -> None:
    models = Watcher()
    await client.subscribe(MODELS, models.on_message)
    async with running_worker(MemoryBus(broker), [FinetuneHandler(progress_seconds=0)], tmp_path) as worker:
        first = finetune(export={"gguf": ["f32", "f16", "q8_0", "q4_0", "q4_k_m"], "adapter_gguf": True})
        events = await watch(client, first.request_id or "")
        await submit(client, first)
        v1 = (await events.wait_end(timeout=240)).data.result
        assert (v1.version, v1.parent_version) == ("v1.0", None)
        assert set(v1.gguf) == {"f32", "f16", "q8_0", "q4_0", "q4_k_m", "base", "lora"}
        assert v1.metrics["f32_parity_max_abs_diff"] < 1e-4
        assert v1.metrics["f16_parity_max_abs_diff"] < 5e-3
        assert v1.metrics["q8_0_parity_top1"] >= 0.95
        assert min(v1.metrics["q4_0_parity_top1"], v1.metrics["q4_k_m_parity_top1"]) >= 0.6
        assert Path(v1.gguf["q4_0"]).stat().st_size < Path(v1.gguf["q8_0"]).stat().st_size
        assert v1.metrics["lora_parity_max_abs_diff"] < 1e-4
        assert v1.metrics["ewc_penalty"] == 0.0
        adapter = Path(v1.adapter_path)
        assert {"adapter_model.safetensors", "adapter_config.json", "fisher.safetensors"} <= {
            p.name for p in adapter.iterdir()
        }
        progress = [e.data for e in events.events if e.type.endswith("progress.v1")]
        assert {"loss", "tokens_per_second"} <= set(progress[0].metrics)

        available = await models.wait_until(lambda es: [e for e in es if e.type.endswith("available.v1")], 7)
        announced = [e.data for e in available]
        by_format = {(a.format, a.quantization): a for a in announced}
        assert set(by_format) == {
            ("peft", None),
            ("gguf", "f32"),
            ("gguf", "f16"),
            ("gguf", "q8_0"),
            ("gguf", "q4_0"),
            ("gguf", "q4_k_m"),
            ("gguf-lora", None),
        }
        peft = by_format["peft", None]
        assert peft.config_uri == (adapter / "adapter_config.json").as_uri(), "PeftModel needs it beside the weights"
        assert peft.config_sha256 == sha256_of(adapter / "adapter_config.json")
        lora = by_format["gguf-lora", None]
        assert lora.base_uri == Path(v1.gguf["base"]).as_uri()
        assert lora.base_sha256 == sha256_of(Path(v1.gguf["base"]))
        assert lora.sha256 == sha256_of(Path(v1.gguf["lora"]))
        assert lora.metrics["lora_parity_max_abs_diff"] < 1e-4
        assert all(a.version == "v1.0" and a.kind == "llm" for a in announced)

        second = finetune("v2.jsonl", ewc={"lambda": 500, "fisher_samples": 8})
        events = await watch(client, second.request_id or "")
        await submit(client, second)
        v2 = (await events.wait_end(timeout=240)).data.result
        assert (v2.version, v2.parent_version) == ("v1.1", "v1.0")
        assert v2.metrics["ewc_penalty"] > 0
        assert v2.gguf == {}
        stored = await worker.store.get_model(v2.model_id)
        assert stored is not None
        assert (stored.label, stored.parent_id, stored.model_type) == ("v1.1", v1.model_id, "llm")


def _gpt2_folder(root: Path) -> None:
    shutil.rmtree(root / "tiny")
    (root / "tiny").mkdir()
    (root / "tiny" / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))


@pytest.mark.parametrize(
    ("change", "fields", "code", "words"),
    [
        (None, {"base_model": "file://absent"}, "invalid_model", "nothing at"),
        (lambda root: (root / "tiny" / "config.json").write_text("{oops"), {}, "invalid_model", "config.json"),
        (_gpt2_folder, {}, "unsupported_model", "GPT2LMHeadModel"),
        (lambda root: (root / "v1.jsonl").write_text('{"text": "fine"}\n{not json\n'), {}, "invalid_data", "line 2"),
        (lambda root: (root / "v1.jsonl").write_text('{"prompt": "no response"}\n'), {}, "invalid_data", "line 1"),
        (lambda root: (root / "v1.jsonl").write_text('{"text": "x", "feedback": 3}\n'), {}, "invalid_data", "feedback"),
        (None, {"dataset": "file:///etc/passwd"}, "invalid_path", "outside the data root"),
        (None, {"dataset": "file://../../../etc/passwd"}, "invalid_path", "outside the data root"),
        (None, {"lora": {"target_modules": ["no_such_proj"]}}, "invalid_task", "target_modules"),
    ],
)
async def test_bad_inputs_fail_before_training_with_their_code(
    broker: MemoryBroker,
    client: MemoryBus,
    tmp_path: Path,
    data_root: Path,
    change: Any,
    fields: dict[str, Any],
    code: str,
    words: str,
) -> None:
    if change is not None:
        change(data_root)
    task = finetune(**fields)
    async with running_worker(MemoryBus(broker), [FinetuneHandler()], tmp_path):
        failed, events = await run_task(client, task, "failed", timeout=60)
    assert failed.code == code, failed.message
    assert words in failed.message
    assert not [e for e in events.events if e.type.endswith("progress.v1")], "no training started"


async def test_cancel_stops_training_and_a_handed_back_job_resumes_from_its_checkpoint(
    broker: MemoryBroker, client: MemoryBus, tmp_path: Path, data_root: Path
) -> None:
    write_dataset(data_root / "long.jsonl", pairs(0, 40))
    long_run = {"epochs": 40, "batch_size": 2, "checkpoint_interval": 2}
    cancelled = finetune("long.jsonl", config=long_run)
    job_id = cancelled.request_id or ""
    async with running_worker(MemoryBus(broker), [FinetuneHandler(progress_seconds=0)], tmp_path):
        events = await watch(client, job_id)
        await submit(client, cancelled)
        await events.wait_for("progress", count=3, timeout=60)
        await client.publish(CONTROL, encode(CancelJob(job_id=job_id)))
        await events.wait_end("cancelled", timeout=10)
    assert (tmp_path / "jobs" / job_id / "checkpoints" / "state.pt").is_file()

    resumed = finetune("long.jsonl", config={**long_run, "epochs": 2})
    job_id = resumed.request_id or ""
    events = await watch(client, job_id)
    async with running_worker(MemoryBus(broker), [FinetuneHandler(progress_seconds=0)], tmp_path, shutdown_grace=0.0):
        await submit(client, resumed)
        await events.wait_for("progress", count=4, timeout=60)
    assert (await stored_job(tmp_path, job_id)).state is JobState.PENDING
    async with running_worker(MemoryBus(broker), [FinetuneHandler()], tmp_path):
        done = (await events.wait_end(timeout=120)).data
    assert done.result.metrics["resumed_from_step"] >= 2
    assert done.result.metrics["steps"] == 40


async def test_an_export_outside_its_bound_fails_the_job_and_is_not_announced(
    broker: MemoryBroker, client: MemoryBus, tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from forseti.worker.handlers import finetune_export

    monkeypatch.setitem(finetune_export.MAX_ABS_DIFF, "f16", 1e-12)  # no f16 file can meet this
    models = Watcher()
    await client.subscribe(MODELS, models.on_message)
    task = finetune(export={"gguf": ["f32", "f16"]})
    async with running_worker(MemoryBus(broker), [FinetuneHandler()], tmp_path) as worker:
        events = await watch(client, task.request_id or "")
        await submit(client, task)
        failed = (await events.wait_end("failed", timeout=120)).data
        assert failed.code == "export_mismatch"
        assert "f16: max abs diff" in failed.message
        assert "needs max abs diff < 1e-12" in failed.message
        assert await worker.store.list_models(name="sensor-assistant") == []
    assert not [e for e in models.events if e.type.endswith("available.v1")]


async def test_a_registry_id_as_base_model_continues_from_that_version_under_a_new_name(
    broker: MemoryBroker, client: MemoryBus, tmp_path: Path, data_root: Path
) -> None:
    async with running_worker(MemoryBus(broker), [FinetuneHandler()], tmp_path) as worker:
        first = finetune()
        events = await watch(client, first.request_id or "")
        await submit(client, first)
        origin = (await events.wait_end(timeout=120)).data.result
        branch = finetune("v2.jsonl", base_model=origin.model_id, name="sensor-branch", ewc={"lambda": 100})
        events = await watch(client, branch.request_id or "")
        await submit(client, branch)
        result = (await events.wait_end(timeout=120)).data.result
        assert (result.version, result.parent_version) == ("v1.0", "v1.0")
        assert result.metrics["ewc_penalty"] > 0, "EWC holds the branch near the version it started from"
        stored = await worker.store.get_model(result.model_id)
        assert stored is not None
        assert (stored.name, stored.parent_id) == ("sensor-branch", origin.model_id)
        for wrong, code in (("no-such-model", "invalid_model"), (origin.model_id + "x", "invalid_model")):
            bad = finetune(base_model=wrong)
            events = await watch(client, bad.request_id or "")
            await submit(client, bad)
            assert (await events.wait_end("failed", timeout=60)).data.code == code
