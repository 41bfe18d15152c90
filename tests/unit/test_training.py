"""The supervised training handler on the memory bus: a classifier and a regressor on scikit-learn's
datasets, exported as one ONNX graph that takes raw rows; refusals; cancel and resume."""

from __future__ import annotations

import csv
import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from sklearn.datasets import load_breast_cancer, load_diabetes

from forseti.adapters.bus import MemoryBroker, MemoryBus
from forseti.adapters.exporters.tabular import raw_inputs
from forseti.adapters.registry import SqliteStore
from forseti.schemas.catalog import CONTROL, MODELS
from forseti.schemas.control import CancelJob
from forseti.schemas.envelope import encode
from forseti.schemas.jobs import JobState
from forseti.schemas.tasks import TrainingTask
from forseti.worker.handlers.training import TrainingHandler
from forseti.worker.handlers.training_data import Encoding

from ..helpers import Watcher, run_task, running_worker, stored_job, submit, watch


def training(model_type: str, uri: str, target: str, **config: Any) -> TrainingTask:
    return TrainingTask.model_validate(
        {
            "request_id": f"tr-{uuid.uuid4().hex[:8]}",
            "model_type": model_type,
            "name": f"test-{model_type}",
            "config": {"epochs": 20, "batch_size": 32, "learning_rate": 3e-3, "hidden": [32], **config},
            "data_sources": [{"uri": uri, "target": target}],
        }
    )


@pytest.fixture
def datasets(tmp_path: Path) -> Path:
    root = tmp_path / "datasets"
    root.mkdir()
    cancer = load_breast_cancer()
    with (root / "cancer.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        names = [f"f{i}" for i in range(cancer.data.shape[1])]
        writer.writerow([*names, "diagnosis"])
        for row, label in zip(cancer.data, cancer.target, strict=True):
            writer.writerow([*row, ["malignant", "benign"][label]])
    diabetes = load_diabetes()
    rng = np.random.default_rng(0)
    with (root / "diabetes.jsonl").open("w") as handle:
        for row, value in zip(diabetes.data, diabetes.target, strict=True):
            record: dict[str, float | str] = {f"x{i}": float(v) for i, v in enumerate(row)}
            record["clinic"] = str(rng.choice(["north", "south", "east"]))  # a text column, one-hot encoded
            handle.write(json.dumps({**record, "progression": float(value)}) + "\n")
    return root


async def test_a_classifier_and_a_regressor_train_export_raw_row_onnx_and_announce(
    broker: MemoryBroker, client: MemoryBus, tmp_path: Path, datasets: Path
) -> None:
    models = Watcher()
    await client.subscribe(MODELS, models.on_message)
    async with running_worker(MemoryBus(broker), [TrainingHandler()], tmp_path) as worker:
        for task, check in (
            (
                training("classifier", "file://cancer.csv", "diagnosis", metrics=["accuracy", "auroc"]).model_copy(
                    update={"device_tags": ["clinics"]}
                ),
                "accuracy",
            ),
            (training("regressor", "file://diabetes.jsonl", "progression", epochs=60, lr_scheduler="cosine"), "r2"),
        ):
            events = await watch(client, task.request_id or "")
            await submit(client, task)
            result = (await events.wait_end(timeout=120)).data.result
            custom = result.metrics.custom_metrics
            assert custom["onnx_parity"] < 1e-5, "abs for probabilities, relative for values"
            if check == "accuracy":
                assert custom["test_accuracy"] >= 0.9
                assert result.metrics.final_accuracy == custom["test_accuracy"]
            else:
                assert custom["test_r2"] >= 0.2
            progress = [e.data for e in events.events if e.type.endswith("progress.v1")]
            assert {"train_loss", "val_loss", "learning_rate", "rss_mb", "cpu_percent"} <= set(progress[-1].metrics)
            onnx_path = Path(result.export_path)
            encoding = Encoding.from_json((onnx_path.parent / "encoding.json").read_text())
            session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
            rows = [{"f0": 12.0, "clinic": "west"}]  # missing columns and an unseen category still predict
            (prediction,) = session.run(None, raw_inputs(rows, encoding.numeric, list(encoding.categorical)))
            assert prediction.shape[0] == 1
            assert np.isfinite(prediction).all()
            announced = (await models.wait_for("available", count=2 if check == "r2" else 1)).data
            assert (announced.format, announced.kind, announced.model_id) == ("onnx", task.model_type, result.model_id)
            assert announced.device_tags == task.device_tags, "addressed to the task's device tags"
            registered = await worker.store.get_model(result.model_id)
            assert registered is not None and registered.device_tags == task.device_tags
        runs = await worker.store.list_training_runs(status=JobState.COMPLETED)
        assert len(runs) == 2


@pytest.mark.parametrize(
    ("fields", "code", "words"),
    [
        (
            {
                "model_type": "forecaster",
                "config": {"window": 600},
                "data_sources": [{"uri": "file://cancer.csv", "target": "f0"}],
            },
            "invalid_data",
            "too few for windows of 600",
        ),
        ({"model_type": "forecaster"}, "invalid_data", "must hold finite numbers, got 'malignant'"),
        (
            {"model_type": "autoencoder", "data_sources": [{"uri": "file://cancer.csv", "target": "diagnosis"}]},
            "invalid_data",
            "must be 0 or 1",
        ),
        ({"config": {"num_gpus": 1}}, "invalid_task", "no CUDA device"),
        ({"data_sources": [{"uri": "file://cancer.csv"}]}, "invalid_task", "target column"),
        ({"data_sources": [{"uri": "file://cancer.csv", "target": "nope"}]}, "invalid_data", "'nope' is not in"),
        ({"config": {"loss_function": "mse"}}, "invalid_task", "does not fit a classification"),
        ({"data_sources": [{"uri": "file://../../etc/passwd", "target": "x"}]}, "invalid_path", "outside"),
    ],
)
async def test_bad_training_tasks_fail_with_their_code(
    broker: MemoryBroker,
    client: MemoryBus,
    tmp_path: Path,
    datasets: Path,
    fields: dict[str, Any],
    code: str,
    words: str,
) -> None:
    base = training("classifier", "file://cancer.csv", "diagnosis").model_dump(mode="json", exclude_none=True)
    task = TrainingTask.model_validate({**base, **fields})
    async with running_worker(MemoryBus(broker), [TrainingHandler()], tmp_path):
        failed, _ = await run_task(client, task, "failed", timeout=60)
    assert failed.code == code, failed.message
    assert words in failed.message


async def test_cancel_keeps_the_checkpoint_and_a_handed_back_job_resumes(
    broker: MemoryBroker, client: MemoryBus, tmp_path: Path, datasets: Path
) -> None:
    slow = training("classifier", "file://cancer.csv", "diagnosis", epochs=2000, batch_size=4)
    job_id = slow.request_id or ""
    async with running_worker(MemoryBus(broker), [TrainingHandler()], tmp_path):
        events = await watch(client, job_id)
        await submit(client, slow)
        await events.wait_for("progress", count=2, timeout=60)
        await client.publish(CONTROL, encode(CancelJob(job_id=job_id)))
        await events.wait_end("cancelled", timeout=10)
    assert (tmp_path / "jobs" / job_id / "checkpoints" / "latest.pt").is_file()
    store = SqliteStore(tmp_path / "registry.db")
    await store.open()
    assert [run.id for run in await store.list_training_runs(status=JobState.CANCELLED)] == [job_id]
    await store.close()

    resumed = training("classifier", "file://cancer.csv", "diagnosis", epochs=12, batch_size=4)
    job_id = resumed.request_id or ""
    events = await watch(client, job_id)
    async with running_worker(MemoryBus(broker), [TrainingHandler()], tmp_path, shutdown_grace=0.0):
        await submit(client, resumed)
        await events.wait_for("progress", count=3, timeout=60)
    assert (await stored_job(tmp_path, job_id)).state is JobState.PENDING
    async with running_worker(MemoryBus(broker), [TrainingHandler()], tmp_path):
        done = (await events.wait_end(timeout=120)).data
    assert done.result.metrics.custom_metrics["resumed_from_epoch"] >= 3
    assert done.result.metrics.total_epochs == 12


async def test_a_job_redelivered_after_its_last_checkpoint_completes_with_the_loss_it_saved(
    broker: MemoryBroker, client: MemoryBus, tmp_path: Path, datasets: Path
) -> None:
    """A training job killed after its final checkpoint trained no epoch when it was delivered again
    and failed with handler_error: its final loss was NaN (found by bench/faults.py, issue 13)."""
    first = training("classifier", "file://cancer.csv", "diagnosis", epochs=3)
    async with running_worker(MemoryBus(broker), [TrainingHandler()], tmp_path):
        done, _ = await run_task(client, first)
    again = first.model_copy(update={"request_id": f"{first.request_id}-again"})
    # what the killed worker left: every epoch checkpointed, the job never ended
    shutil.copytree(tmp_path / "jobs" / (first.request_id or ""), tmp_path / "jobs" / (again.request_id or ""))
    async with running_worker(MemoryBus(broker), [TrainingHandler()], tmp_path):
        redone, _ = await run_task(client, again)
    metrics = redone.result.metrics
    assert metrics.custom_metrics["resumed_from_epoch"] == 3 and metrics.total_epochs == 3
    assert metrics.final_loss == done.result.metrics.final_loss
