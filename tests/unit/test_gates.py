"""Evaluation gates: a weak first version takes the free alias, a better one takes it over, a worse one
is kept out; the verdicts are stored and shown by `forseti models compare`."""

from __future__ import annotations

import asyncio
import csv
import json
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from forseti.adapters.bus import MemoryBroker, MemoryBus
from forseti.adapters.registry import create_store
from forseti.schemas.catalog import MODELS
from forseti.schemas.models import ModelAvailable
from forseti.schemas.tasks import TrainingTask
from forseti.worker.cli import app
from forseti.worker.handlers.training import TrainingHandler
from forseti.worker.handlers.training_gate import wins

from ..helpers import Watcher, run_task, running_worker


def cancer_files(root: Path) -> None:
    """train.csv (400 rows) and holdout.csv (169 rows) of scikit-learn's breast-cancer data."""
    from sklearn.datasets import load_breast_cancer

    cancer = load_breast_cancer()
    header = [f"f{i}" for i in range(cancer.data.shape[1])] + ["label"]
    root.mkdir(parents=True, exist_ok=True)
    rows = [[*map(float, row), int(label)] for row, label in zip(cancer.data, cancer.target, strict=True)]
    for name, part in (("train.csv", rows[:400]), ("holdout.csv", rows[400:])):
        with (root / name).open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(part)


def gated(job_id: str, **config: Any) -> TrainingTask:
    """A classifier on train.csv for the `production` alias of `cancer`, gated on holdout.csv."""
    return TrainingTask.model_validate(
        {
            "request_id": job_id,
            "model_type": "classifier",
            "name": "cancer",
            "config": {"seed": 1, **config},
            "data_sources": [{"uri": "file://train.csv", "target": "label"}],
            "gate": {
                "alias": "production",
                "dataset": {"uri": "file://holdout.csv", "target": "label"},
                "margin": 0.01,
            },
        }
    )


def test_the_margin_decides_ties_and_direction() -> None:
    accuracy = gated("x").gate
    assert accuracy is not None
    assert wins(accuracy, 0.95, 0.90) and not wins(accuracy, 0.905, 0.90)
    loss = accuracy.model_copy(update={"metric": "mae", "margin": 0.0})
    assert wins(loss, 1.0, 2.0) and wins(loss, 2.0, 2.0) and not wins(loss, 2.1, 2.0)


async def test_a_gate_promotes_a_better_version_and_keeps_a_worse_one_out(tmp_path: Path) -> None:
    cancer_files(tmp_path / "datasets")
    broker = MemoryBroker()
    client = MemoryBus(broker)
    await client.connect()
    announced = Watcher()
    await client.subscribe(MODELS, announced.on_message)
    weak = {"epochs": 1, "learning_rate": 1e-6, "hidden": [4]}
    async with running_worker(MemoryBus(broker), [TrainingHandler()], tmp_path):
        first, _ = await run_task(client, gated("weak-1", **weak))
        second, _ = await run_task(client, gated("strong", epochs=30))
        third, _ = await run_task(client, gated("weak-2", **weak))
    await client.close()

    scores = {r.result.model_id: r.result.metrics.custom_metrics for r in (first, second, third)}
    assert scores["weak-1"]["gate_promoted"] == 1.0 and "gate_champion_score" not in scores["weak-1"]
    assert scores["strong"]["gate_promoted"] == 1.0
    assert scores["strong"]["gate_score"] > scores["strong"]["gate_champion_score"] + 0.01
    assert scores["weak-2"]["gate_promoted"] == 0.0
    assert scores["weak-2"]["gate_champion_score"] == scores["strong"]["gate_score"], "the same rows, the same model"

    store = create_store(str(tmp_path / "registry.db"))
    await store.open()
    champion = await store.get_alias("cancer", "production")
    verdicts = await store.list_evaluations(["weak-2"])
    await store.close()
    assert champion is not None and champion.id == "strong"
    (kept_out,) = verdicts
    assert (kept_out.against_id, kept_out.promoted, kept_out.rows) == ("strong", False, 169)
    assert "does not beat" in kept_out.reason
    aliases = {
        e.data.model_id: e.data.alias for e in announced.events if isinstance(e.data, ModelAvailable)
    }  # the promoted versions' announcements name the alias, so alias-following consumers load them
    assert aliases == {"weak-1": "production", "strong": "production", "weak-2": None}

    args = ["models", "compare", "cancer", "2", "3", "--data-dir", str(tmp_path)]
    # the command runs its own event loop: off this test's
    shown = await asyncio.to_thread(CliRunner().invoke, app, args, env={"COLUMNS": "240"}, terminal_width=240)
    assert shown.exit_code == 0, shown.output
    assert "production" in shown.output and "kept out: accuracy" in shown.output
    as_json = await asyncio.to_thread(CliRunner().invoke, app, [*args, "--json"])
    assert json.loads(as_json.output)["evaluations"][0]["model_id"] == "weak-2"
