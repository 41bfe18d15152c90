"""Distributed jobs over two workers (issue 16): the job's worker recruits another over the bus with a
signed `forseti.ranks.join`, each runs one rank, and the result equals one process training on the
same global batches; joins nobody trusted are refused."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest
from safetensors.torch import load_file

from forseti.adapters.bus import MemoryBroker, MemoryBus
from forseti.adapters.signing import Signer, generate, seal
from forseti.schemas.catalog import CONTROL, DEADLETTER, RANKS
from forseti.schemas.control import PauseJob, ResumeJob
from forseti.schemas.envelope import decode, encode
from forseti.schemas.ranks import RankJoin, RankJoined
from forseti.schemas.tasks import TaskBase, TaskKind, dump_task
from forseti.worker.engine.runtime import Worker
from forseti.worker.handlers.finetune import FinetuneHandler
from forseti.worker.handlers.training import TrainingHandler

from ..helpers import Watcher, breast_cancer_training, run_task, running_worker, submit, watch
from ..llm import finetune


@asynccontextmanager
async def two_workers(
    broker: MemoryBroker, tmp_path: Path, handlers: list[Any], **overrides: Any
) -> AsyncIterator[tuple[Worker, Worker]]:
    """Two workers with data dirs of their own (two hosts), one registry, one signing key."""
    key, _ = generate(tmp_path / "keys")
    settings = {"registry_url": f"sqlite:///{tmp_path / 'registry.db'}", "signing_key": key, **overrides}
    async with AsyncExitStack() as stack:
        first = await stack.enter_async_context(running_worker(MemoryBus(broker), handlers, tmp_path / "a", **settings))
        second = await stack.enter_async_context(
            running_worker(MemoryBus(broker), handlers, tmp_path / "b", **settings)
        )
        yield first, second


def exported_weights(result: Any) -> dict[str, Any]:
    """The safetensors a training job exported beside its ONNX."""
    return load_file(Path(result.export_path).with_suffix(".safetensors"))


async def test_a_classifier_over_two_workers_equals_one_process_on_the_same_batches(
    broker: MemoryBroker, client: MemoryBus, tmp_path: Path
) -> None:
    settings = {"epochs": 2, "batch_size": 63, "learning_rate": 1e-2, "hidden": [16]}
    async with two_workers(broker, tmp_path, [TrainingHandler()]) as workers:
        alone, _ = await run_task(
            client, breast_cancer_training(f"one-{uuid.uuid4().hex[:6]}", **settings), timeout=120
        )
        spread = breast_cancer_training(
            f"two-{uuid.uuid4().hex[:6]}", **settings, distributed=True, world_size=2, workers=2
        )
        done, events = await run_task(client, spread, timeout=180)
        assert sum(w._ranks.joins for w in workers if w._ranks) == 1, "the other worker joined once"
    one, two = exported_weights(alone.result), exported_weights(done.result)
    assert one.keys() == two.keys()
    for name, value in one.items():
        assert (two[name] - value).abs().max() < 1e-4, name
    progress = [e.data for e in events.events if e.type.endswith("progress.v1") and "world_size" in e.data.metrics]
    assert [p.step for p in progress] == [1, 2] and {p.metrics["world_size"] for p in progress} == {2.0}


async def test_a_lora_fine_tune_over_two_workers_equals_one_process(
    broker: MemoryBroker, client: MemoryBus, tmp_path: Path, data_root: Path
) -> None:
    config = {"epochs": 1, "batch_size": 3}
    handlers = [FinetuneHandler(progress_seconds=0)]
    async with two_workers(broker, tmp_path, handlers, data_root=data_root):
        alone, _ = await run_task(client, finetune(name="alone", config=config), timeout=180)
        spread = finetune(name="spread", config={**config, "distributed": True, "world_size": 2, "workers": 2})
        done, _ = await run_task(client, spread, timeout=240)
    one = load_file(Path(alone.result.adapter_path) / "adapter_model.safetensors")
    two = load_file(Path(done.result.adapter_path) / "adapter_model.safetensors")
    assert one.keys() == two.keys()
    for name, value in one.items():
        assert (two[name] - value).abs().max() < 1e-5, name
    assert done.result.metrics["world_size"] == 2.0 and done.result.metrics["steps"] == alone.result.metrics["steps"]


def joined_rank() -> psutil.Process | None:
    """The rank process the joining worker started (rank 1: the job's own worker holds rank 0), if
    it runs; ranks name themselves."""
    for process in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if process.name() == "forseti-rank-1":
                return process
    return None


async def test_a_rank_killed_on_the_joined_worker_restarts_the_group_from_the_checkpoint(
    broker: MemoryBroker, client: MemoryBus, tmp_path: Path
) -> None:
    """The joined worker's rank has no checkpoint on its disk: it resumes from rank 0's, which
    travels through the group's store, and every epoch is reported once."""
    settings = {"epochs": 30, "batch_size": 32, "hidden": [16]}
    task = breast_cancer_training(f"kill-{uuid.uuid4().hex[:6]}", **settings, distributed=True, world_size=2, workers=2)
    job_id = task.request_id or ""
    async with two_workers(broker, tmp_path, [TrainingHandler()]):
        alone, _ = await run_task(client, breast_cancer_training(f"one-{uuid.uuid4().hex[:6]}", **settings))
        events = await watch(client, job_id)
        await submit(client, task)
        await events.wait_until(
            lambda es: [e for e in es if e.type.endswith("progress.v1") and e.data.step >= 2], timeout=120
        )
        await client.publish(CONTROL, encode(PauseJob(job_id=job_id)))
        first = await wait_for(joined_rank, 30)
        await asyncio.sleep(1)  # rank 0 holds the group: the pause reached it
        os.kill(first.pid, signal.SIGKILL)
        await wait_for(lambda: (p := joined_rank()) is not None and p.pid != first.pid, 60)
        await client.publish(CONTROL, encode(ResumeJob(job_id=job_id)))
        done = await events.wait_end(timeout=180)
    progress = [e.data for e in events.events if e.type.endswith("progress.v1") and "world_size" in e.data.metrics]
    assert [p.step for p in progress] == list(range(1, 31)), "each epoch once: resumed from the checkpoint"
    assert progress[-1].metrics["restarts"] == 1.0
    # rank 1 resumed from rank 0's checkpoint (weights, optimizer, epoch), not from scratch
    one, two = exported_weights(alone.result), exported_weights(done.data.result)
    for name, value in one.items():
        assert (two[name] - value).abs().max() < 1e-4, name


async def wait_for(found: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := found()):
        assert time.monotonic() < deadline, "not in time"
        await asyncio.sleep(0.1)
    return value


def join_request(task: TaskBase) -> RankJoin:
    return RankJoin(
        job_id=task.request_id or "",
        kind=TaskKind.TRAINING,
        task=dump_task(task),
        run={"config": {"distributed": True, "world_size": 2, "workers": 2}},
        host="127.0.0.1",
        port=29_999,
        node=1,
        world_size=2,
        workers=2,
    )


@pytest.mark.parametrize("signed_by", ["nobody", "a stranger", "the workers' key, long ago"])
async def test_a_join_nobody_trusted_sent_is_refused_dead_lettered_and_counted(
    broker: MemoryBroker, client: MemoryBus, tmp_path: Path, signed_by: str
) -> None:
    """A join makes the worker connect to a store whose state torch unpickles: from anyone else on the
    bus it would run their code. Refused with `forbidden`, before anything is read or started."""
    key, _ = generate(tmp_path / "keys")
    stranger, _ = generate(tmp_path / "stranger")
    raw = encode(join_request(breast_cancer_training("hostile")))
    if signed_by == "a stranger":
        raw = seal(raw, Signer.from_file(stranger))
    elif signed_by == "the workers' key, long ago":
        doc = orjson.loads(raw)
        doc["time"] = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
        raw = seal(orjson.dumps(doc), Signer.from_file(key))
    letters = Watcher()
    await client.subscribe(DEADLETTER, letters.on_message)
    async with running_worker(MemoryBus(broker), [TrainingHandler()], tmp_path / "w", signing_key=key) as worker:
        answer = decode(await client.request(RANKS, raw, timeout=10), RankJoined).data
        dead = await letters.wait_until(lambda es: es, timeout=10)
        refused = worker.metrics.refused.labels("ranks")._value.get()
        joins = worker._ranks.joins if worker._ranks else -1
    assert (answer.joined, answer.code) == (False, "forbidden")
    assert dead[0].data.reason == "forbidden" and dead[0].data.channel == RANKS
    assert refused == 1 and joins == 0
    assert not (tmp_path / "w" / "ranks").exists()


async def test_a_group_short_of_workers_fails_with_rendezvous_timeout(
    broker: MemoryBroker, client: MemoryBus, tmp_path: Path
) -> None:
    key, _ = generate(tmp_path / "keys")
    task = breast_cancer_training(
        f"short-{uuid.uuid4().hex[:6]}", epochs=1, distributed=True, world_size=2, workers=2, rendezvous_timeout=2
    )
    async with running_worker(MemoryBus(broker), [TrainingHandler()], tmp_path / "w", signing_key=key):
        failed, _ = await run_task(client, task, "failed", timeout=60)
    assert failed.code == "rendezvous_timeout" and "0 of the 1 other workers joined" in failed.message


async def test_without_a_signing_key_a_job_cannot_spread_over_workers(
    broker: MemoryBroker, client: MemoryBus, tmp_path: Path
) -> None:
    task = breast_cancer_training(f"nokey-{uuid.uuid4().hex[:6]}", epochs=1, distributed=True, world_size=2, workers=2)
    async with running_worker(MemoryBus(broker), [TrainingHandler()], tmp_path / "w"):
        failed, _ = await run_task(client, task, "failed", timeout=60)
    assert failed.code == "invalid_task" and "signing key" in failed.message
