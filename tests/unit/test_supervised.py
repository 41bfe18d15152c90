"""Autoencoders and forecasters, hyperparameter search, batch inference and streaming inference: trained
on the memory bus from small real data, then served from their ONNX exports."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from sklearn.datasets import load_digits

from forseti.adapters.bus import MemoryBroker, MemoryBus
from forseti.adapters.inference import ModelCache, OnnxModel
from forseti.adapters.registry import SqliteStore
from forseti.schemas.catalog import MODELS, infer_channel
from forseti.schemas.envelope import decode, encode
from forseti.schemas.inference import InferError, InferReply, InferRequest
from forseti.schemas.tasks import InferenceTask, TrainingTask
from forseti.worker.engine.context import Handler
from forseti.worker.handlers.inference import InferenceHandler
from forseti.worker.handlers.training import TrainingHandler
from forseti.worker.handlers.training_loop import trial_configs
from forseti.worker.services.infer_serve import InferenceService

from ..helpers import Watcher, run_task, running_worker


def training(model_type: str, uri: str, target: str | None, **config: Any) -> TrainingTask:
    source: dict[str, Any] = {"uri": uri} | ({"target": target} if target else {})
    return TrainingTask.model_validate(
        {
            "request_id": f"sv-{uuid.uuid4().hex[:8]}",
            "model_type": model_type,
            "name": f"test-{model_type}",
            "config": {"epochs": 10, "batch_size": 32, "learning_rate": 3e-3, **config},
            "data_sources": [source],
        }
    )


@pytest.fixture
def datasets(tmp_path: Path) -> Path:
    root = tmp_path / "datasets"
    root.mkdir()
    digits = load_digits()
    keep = np.isin(digits.target, [0, 1, 7])  # zeros are normal; ones and sevens are the anomalies
    with (root / "digits.jsonl").open("w") as handle:
        for image, digit in zip(digits.data[keep], digits.target[keep], strict=True):
            row = {f"p{i}": float(v) for i, v in enumerate(image)} | {"anomaly": int(digit != 0)}
            handle.write(json.dumps(row) + "\n")
    steps = np.arange(360)
    series = 10 + 3 * np.sin(2 * np.pi * steps / 12) + 0.02 * steps + np.random.default_rng(0).normal(0, 0.2, 360)
    with (root / "series.csv").open("w") as handle:
        handle.write("month,level\n" + "".join(f"{i},{v}\n" for i, v in enumerate(series)))
    return root


async def test_an_autoencoder_flags_anomalies_and_a_forecaster_beats_the_seasonal_naive_forecast(
    broker: MemoryBroker, client: MemoryBus, tmp_path: Path, datasets: Path
) -> None:
    handlers: list[Handler] = [TrainingHandler(), InferenceHandler()]
    async with running_worker(MemoryBus(broker), handlers, tmp_path):
        autoencoder = training("autoencoder", "file://digits.jsonl", "anomaly", hidden=[32, 8], epochs=30)
        done, _ = await run_task(client, autoencoder)
        custom = done.result.metrics.custom_metrics
        assert custom["test_auroc"] > 0.9
        assert custom["onnx_parity"] < 1e-5
        assert custom["threshold"] > 0
        scorer = OnnxModel(Path(done.result.export_path))
        assert scorer.card.threshold == pytest.approx(custom["threshold"])
        rows = [json.loads(line) for line in (datasets / "digits.jsonl").read_text().splitlines()]
        scored = scorer.predict(rows)
        labels = np.array([row["anomaly"] for row in rows])
        flags = np.array([s["anomaly"] for s in scored])
        assert flags[labels == 1].mean() > 0.5 > flags[labels == 0].mean()

        forecaster = training(
            "forecaster", "file://series.csv", "level", hidden=[16], window=24, horizon=3, season=12, epochs=40
        )
        done, events = await run_task(client, forecaster)
        custom = done.result.metrics.custom_metrics
        assert custom["test_mase"] < 1.0, "the LSTM must beat the seasonal naive forecast"
        assert custom["onnx_parity"] < 1e-5
        assert "val_mase" in [e.data for e in events.events if e.type.endswith("progress.v1")][-1].metrics

        # batch inference through the registry: the same forecasts as the exported file gives
        history = [{"level": 10 + 3 * np.sin(2 * np.pi * i / 12)} for i in range(30)]
        inference = InferenceTask(
            request_id=f"in-{uuid.uuid4().hex[:8]}", model_id=done.result.model_id, inputs=history
        )
        result = (await run_task(client, inference))[0].result
        assert result.outputs[:23] == [None] * 23
        assert len(result.outputs[23]) == 3
        assert result.outputs == OnnxModel(Path(done.result.export_path)).predict(history)


async def test_a_search_reports_each_trial_and_exports_the_best(
    broker: MemoryBroker, client: MemoryBus, tmp_path: Path, datasets: Path
) -> None:
    search = {"learning_rate": [1e-4, 1e-2], "hidden": [[8], [16]], "max_trials": 3}
    task = training("autoencoder", "file://digits.jsonl", "anomaly", epochs=3, search=search)
    async with running_worker(MemoryBus(broker), [TrainingHandler()], tmp_path):
        done, events = await run_task(client, task)
    trials = [e.data.metrics for e in events.events if e.type.endswith("progress.v1") and "trial" in e.data.metrics]
    assert [t["trial"] for t in trials] == [1.0, 2.0, 3.0]
    custom = done.result.metrics.custom_metrics
    assert custom["trials"] == 3
    best = min(trials, key=lambda t: t["trial_score"])
    assert custom["best_trial"] == best["trial"]
    assert custom["best_validation_score"] == pytest.approx(best["trial_score"])
    assert (tmp_path / "jobs" / (task.request_id or "") / "checkpoints" / "trial-3" / "trial.json").is_file()


def test_grid_and_random_searches_draw_distinct_points() -> None:
    config = training(
        "classifier",
        "file://x.csv",
        "y",
        search={"learning_rate": [1e-3, 1e-2], "batch_size": [16, 32, 64], "max_trials": 4, "method": "random"},
    ).config
    points = {(c.learning_rate, c.batch_size) for c in trial_configs(config)}
    assert len(points) == 4
    grid = config.model_copy(update={"search": config.search.model_copy(update={"method": "grid"})})  # type: ignore[union-attr]
    assert [(c.learning_rate, c.batch_size) for c in trial_configs(grid)] == [
        (1e-3, 16),
        (1e-3, 32),
        (1e-3, 64),
        (1e-2, 16),
    ]


async def test_inference_refusals_and_the_session_cache(
    broker: MemoryBroker, client: MemoryBus, tmp_path: Path, datasets: Path
) -> None:
    handler = InferenceHandler()
    async with running_worker(MemoryBus(broker), [TrainingHandler(), handler], tmp_path):
        trained, _ = await run_task(client, training("autoencoder", "file://digits.jsonl", None, epochs=2, hidden=[8]))
        model_id = trained.result.model_id
        for source in ({"uri": "file://digits.jsonl"}, {"inputs": [{"p0": 0.0}, {"p3": 16.0}]}):
            task = InferenceTask.model_validate(
                {"request_id": f"in-{uuid.uuid4().hex[:8]}", "model_id": model_id, **source}
            )
            result = (await run_task(client, task))[0].result
            assert {"score", "anomaly"} <= set(result.outputs[0])
        assert handler.cache.loads == 1, "the second job reuses the session"
        for fields, code in (
            ({"model_id": "no-such-model", "inputs": [{"p0": 1.0}]}, "invalid_model"),
            ({"model_id": model_id, "uri": "file://../../etc/passwd"}, "invalid_path"),
            ({"model_id": model_id, "uri": "file://missing.csv"}, "invalid_path"),
        ):
            task = InferenceTask.model_validate({"request_id": f"in-{uuid.uuid4().hex[:8]}", **fields})
            failed, _ = await run_task(client, task, "failed")
            assert failed.code == code, failed.message


async def test_streaming_inference_micro_batches_and_refuses_clearly(
    broker: MemoryBroker, client: MemoryBus, tmp_path: Path, datasets: Path
) -> None:
    async with running_worker(MemoryBus(broker), [TrainingHandler()], tmp_path):
        forecaster = training("forecaster", "file://series.csv", "level", hidden=[8], window=6, epochs=2)
        trained, _ = await run_task(client, forecaster)
    model_id = trained.result.model_id
    store = SqliteStore(tmp_path / "registry.db")
    await store.open()
    service = InferenceService(MemoryBus(broker), store, cache=ModelCache(), max_batch=8, max_wait_ms=20)
    await service.bus.connect()
    await service.start()
    try:
        series = [{"level": float(v)} for v in range(10)]
        ask = encode(InferRequest.model_validate({"rows": series}))
        replies = await asyncio.gather(*(client.request(infer_channel(model_id), ask, timeout=10) for _ in range(8)))
        answers: list[Any] = [decode(r).data for r in replies]
        assert all(isinstance(a, InferReply) for a in answers)
        assert max(a.batched for a in answers) > 1, "requests that arrive together share an onnxruntime call"
        expected = OnnxModel(Path(trained.result.export_path)).predict(series)
        assert all(a.outputs == expected for a in answers)

        bad = encode(InferRequest.model_validate({"rows": [{"level": "high"}]}))
        mixed = await asyncio.gather(
            client.request(infer_channel(model_id), bad, timeout=10),
            client.request(infer_channel(model_id), ask, timeout=10),
        )
        refused, answered = (cast(Any, decode(r).data) for r in mixed)
        assert isinstance(refused, InferError) and refused.code == "invalid_data"
        assert isinstance(answered, InferReply) and answered.outputs == expected

        for channel, data, code in (
            (infer_channel("no-such-model"), ask, "invalid_model"),
            (infer_channel(model_id), b"{not json", "malformed_json"),
        ):
            error: Any = decode(await client.request(channel, data, timeout=10)).data
            assert isinstance(error, InferError) and error.code == code
    finally:
        await service.stop()
        await service.bus.close()
        await store.close()


@pytest.mark.parametrize(
    ("model_type", "uri", "target", "figure"),
    [
        ("autoencoder", "file://digits.jsonl", "anomaly", "int8_agreement"),
        ("forecaster", "file://series.csv", "level", "int8_max_relative_diff"),
    ],
)
async def test_an_int8_export_is_announced_with_its_change_against_the_float_model(
    broker: MemoryBroker,
    client: MemoryBus,
    tmp_path: Path,
    datasets: Path,
    model_type: str,
    uri: str,
    target: str,
    figure: str,
) -> None:
    models = Watcher()
    await client.subscribe(MODELS, models.on_message)
    task = training(model_type, uri, target, epochs=3, hidden=[16], window=12, quantize_int8=True)
    async with running_worker(MemoryBus(broker), [TrainingHandler()], tmp_path):
        done, _ = await run_task(client, task)
        await models.wait_for("available", count=2)
    custom = done.result.metrics.custom_metrics
    announced = {e.data.quantization: e.data for e in models.events if e.data.format == "onnx"}
    assert set(announced) == {None, "int8"}
    assert announced["int8"].metrics[figure] == custom[figure]
    if figure == "int8_agreement":
        assert custom[figure] >= 0.9
    else:
        assert custom[figure] < 0.05
    quantized = OnnxModel(Path(announced["int8"].uri.removeprefix("file://")))
    assert quantized.card.model_type == model_type, "the card travels inside the file"
