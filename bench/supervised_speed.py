"""Supervised speed benchmark: training throughput against a plain torch loop, batch inference through
onnxruntime on one core, and streaming inference over a real nats-server.

1. Training samples/s: the same MLP, data, optimizer, batch size and epochs, once through a Worker
   running the training handler (its samples/s covers the whole loop: validation metrics, progress
   events, checkpoints) and once as the plain torch loop anyone would write. Ratio target >= 0.9.
2. Batch inference: the breast-cancer classifier exported by the handler (preprocessing in the graph),
   one onnxruntime thread, raw feature rows in batches; rows/s. Target >= 1,000,000. The same through
   `OnnxModel.predict` (Python row dicts in, labelled dicts out) is given beside it.
3. Streaming inference: `forseti infer-serve`'s service on a real nats-server; one client sends one-row
   requests one after another (latency p50 / p99, target p50 < 1 ms), then 64 clients at once
   (throughput and how many requests shared an onnxruntime call).

    python bench/supervised_speed.py [--rounds 3] [--no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import platform
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from jobs import request_latencies, run_job
from report import write_section
from sklearn.datasets import load_breast_cancer, make_classification

from forseti.adapters.bus import create_bus
from forseti.adapters.bus.servers import NatsServer
from forseti.adapters.exporters.tabular import raw_inputs
from forseti.adapters.inference import ModelCache, OnnxModel
from forseti.adapters.registry import SqliteStore
from forseti.schemas.catalog import infer_channel
from forseti.schemas.envelope import decode, encode
from forseti.schemas.inference import InferReply, InferRequest
from forseti.schemas.jobs import TrainingResult
from forseti.schemas.tasks import TrainingTask
from forseti.worker.engine.inputs import Inputs
from forseti.worker.engine.loop import run as run_loop
from forseti.worker.handlers.training import TrainingHandler
from forseti.worker.handlers.training_data import read_rows
from forseti.worker.handlers.training_models import mlp, prepare
from forseti.worker.services.infer_serve import InferenceService

TRAIN_CONFIG: dict[str, Any] = {
    "epochs": 4,
    "batch_size": 256,
    "learning_rate": 1e-3,
    "hidden": [64, 64],
    "checkpoint_interval": 4,
}


def write_data(root: Path) -> None:
    """A 100,000-row synthetic classification set (training speed) and breast cancer (inference)."""
    x, y = make_classification(n_samples=100_000, n_features=32, n_informative=16, random_state=0)
    with (root / "synthetic.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*(f"f{i}" for i in range(32)), "label"])
        writer.writerows([*row, f"c{label}"] for row, label in zip(x, y, strict=True))
    cancer = load_breast_cancer()
    with (root / "cancer.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*(f"f{i}" for i in range(cancer.data.shape[1])), "label"])
        writer.writerows([*row, f"c{label}"] for row, label in zip(cancer.data, cancer.target, strict=True))


def task(uri: str, **config: Any) -> TrainingTask:
    """A classifier task on `uri`."""
    return TrainingTask.model_validate(
        {
            "request_id": f"s-{uuid.uuid4().hex[:8]}",
            "model_type": "classifier",
            "name": f"speed-{Path(uri).stem}",
            "config": config,
            "data_sources": [{"uri": uri, "target": "label"}],
        }
    )


def plain_loop(training: TrainingTask, root: Path) -> float:
    """Samples/s of the textbook torch loop on the handler's own training part and model."""
    rows = [row for s in training.data_sources for row in read_rows(s, Inputs(root))]
    prepared = prepare(training, rows)
    config = training.config
    torch.manual_seed(config.seed)
    network = mlp(prepared.train.x.shape[1], list(config.hidden), 2)
    optimizer = torch.optim.Adam(network.parameters(), lr=config.learning_rate)
    criterion = torch.nn.CrossEntropyLoss()
    x, y = torch.from_numpy(prepared.train.x), torch.from_numpy(prepared.train.y)
    started = time.monotonic()
    for _ in range(config.epochs):
        order = torch.randperm(len(x))
        for i in range(0, len(x), config.batch_size):
            batch = order[i : i + config.batch_size]
            optimizer.zero_grad()
            loss = criterion(network(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
    return config.epochs * len(x) / (time.monotonic() - started)


def batch_inference(onnx_path: Path, root: Path, rows_total: int = 1_000_000, batch: int = 100_000) -> dict[str, float]:
    """Rows/s of the exported classifier on one onnxruntime thread: raw arrays, and Python rows."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    model = OnnxModel(onnx_path, threads=1)
    rows = read_rows(task("file://cancer.csv").data_sources[0], Inputs(root))
    for row in rows:
        row.pop("label")
    feeds = raw_inputs(rows, model.card.numeric, model.card.categorical)
    numeric = np.tile(feeds["numeric"], (batch // len(rows) + 1, 1))[:batch]
    session.run(None, {"numeric": numeric})  # warm-up
    started = time.perf_counter()
    for _ in range(rows_total // batch):
        session.run(None, {"numeric": numeric})
    arrays = rows_total / (time.perf_counter() - started)
    many = rows * 20
    started = time.perf_counter()
    model.predict(many)
    python_rows = len(many) / (time.perf_counter() - started)
    return {"arrays": arrays, "python_rows": python_rows}


async def streaming(
    data_dir: Path, model_id: str, sequential: int = 2000, clients: int = 64, each: int = 50
) -> dict[str, float]:
    """Latency of one-row requests one at a time, then throughput with `clients` in flight, over nats-server."""
    with NatsServer(data_dir / "nats") as server:
        store = SqliteStore(data_dir / "r.db")
        await store.open()
        service_bus, client = create_bus(server.url), create_bus(server.url)
        await service_bus.connect()
        await client.connect()
        service = InferenceService(service_bus, store, cache=ModelCache(threads=1), max_batch=64)
        await service.start()
        row = dict(read_rows(task("file://cancer.csv").data_sources[0], Inputs(data_dir / "datasets"))[0])
        row.pop("label")
        request = encode(InferRequest.model_validate({"rows": [row]}))
        channel = infer_channel(model_id)
        latencies = await request_latencies(client, channel, request, sequential)  # warm-up loads the session
        batched: list[int] = []

        async def one_client() -> None:
            for _ in range(each):
                reply: Any = decode(await client.request(channel, request, timeout=10)).data
                assert isinstance(reply, InferReply)
                batched.append(reply.batched)

        started = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        throughput = clients * each / (time.perf_counter() - started)
        await service.stop()
        await client.close()
        await service_bus.close()
        await store.close()
    return {
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
        "throughput": throughput,
        "mean_batched": statistics.mean(batched),
    }


async def bench(rounds: int) -> dict[str, Any]:
    """Every measurement, `rounds` times for the training ratio."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "datasets"
        root.mkdir()
        write_data(root)
        ratios, ours, theirs = [], [], []
        for r in range(rounds):
            training = task("file://synthetic.csv", **TRAIN_CONFIG)
            result = await run_job("memory://", training, TrainingHandler(), Path(tmp) / f"t{r}", data_root=root)
            assert isinstance(result, TrainingResult)
            handler_rate = result.metrics.custom_metrics["samples_per_second"]
            plain_rate = plain_loop(training, root)
            ours.append(handler_rate)
            theirs.append(plain_rate)
            ratios.append(handler_rate / plain_rate)
            print(f"round {r}: handler {handler_rate:,.0f} samples/s, plain loop {plain_rate:,.0f}: {ratios[-1]:.2f}x")
        cancer = task("file://cancer.csv", epochs=30, batch_size=32, hidden=[64, 64])
        data_dir = Path(tmp) / "serve"
        result = await run_job("memory://", cancer, TrainingHandler(), data_dir, data_root=root)
        assert isinstance(result, TrainingResult)
        inference = batch_inference(Path(result.export_path), root)
        print(f"batch inference: {inference['arrays']:,.0f} rows/s (arrays), {inference['python_rows']:,.0f} (rows)")
        (data_dir / "datasets").symlink_to(root)
        stream = await streaming(data_dir, result.model_id)
        print(
            f"streaming: p50 {stream['p50_ms']:.3f} ms, p99 {stream['p99_ms']:.3f} ms, "
            f"{stream['throughput']:,.0f} req/s"
        )
    return {"ratios": ratios, "ours": ours, "theirs": theirs, "inference": inference, "stream": stream}


def report(figures: dict[str, Any]) -> str:
    """The markdown section."""
    ratios = figures["ratios"]
    ratio = statistics.median(ratios)
    inference, stream = figures["inference"], figures["stream"]
    return "\n".join(
        [
            "## Supervised speed (`bench/supervised_speed.py`)",
            "",
            f"Measured {time.strftime('%Y-%m-%d')} on {platform.processor() or platform.machine()}, CPU, "
            f"torch {torch.__version__}, onnxruntime {ort.__version__}.",
            "",
            "| measurement | Forseti | baseline | ratio / figure | target | met |",
            "| --- | --- | --- | --- | --- | --- |",
            f"| training samples/s, MLP 32-64-64-2 on 70,000 rows, batch 256, Adam, 4 epochs "
            f"(median of {len(ratios)} rounds) | {statistics.median(figures['ours']):,.0f} | plain torch loop "
            f"{statistics.median(figures['theirs']):,.0f} | {ratio:.2f}x [{min(ratios):.2f}-{max(ratios):.2f}] "
            f"| >= 0.9x | {'yes' if ratio >= 0.9 else 'no'} |",
            f"| batch inference, breast-cancer classifier (preprocessing in the graph), 1 onnxruntime thread, "
            f"batches of 100,000 raw rows | {inference['arrays']:,.0f} rows/s | | | >= 1,000,000 rows/s | "
            f"{'yes' if inference['arrays'] >= 1e6 else 'no'} |",
            f"| the same through `OnnxModel.predict` (Python row dicts in, labelled dicts out) | "
            f"{inference['python_rows']:,.0f} rows/s | | | | |",
            f"| streaming inference over nats-server, one-row requests one at a time | p50 {stream['p50_ms']:.3f} ms, "
            f"p99 {stream['p99_ms']:.3f} ms | | | p50 < 1 ms | {'yes' if stream['p50_ms'] < 1 else 'no'} |",
            f"| streaming inference, 64 clients in flight | {stream['throughput']:,.0f} requests/s | | "
            f"{stream['mean_batched']:.1f} requests per onnxruntime call on average | | |",
            "",
            "The handler's samples/s is measured over its whole loop: the validation metrics, a progress event and "
            "a best-model checkpoint each epoch. The plain loop trains on the handler's own training rows.",
        ]
    )


def main() -> None:
    """Parse arguments, run, print and record."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="training-ratio rounds")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    section = report(run_loop(bench(args.rounds)))
    print(section)
    if not args.no_write:
        write_section("supervised-speed", section)


if __name__ == "__main__":
    main()
