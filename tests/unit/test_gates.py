"""Evaluation gates: a weak first version takes the free alias, a better one takes it over, a worse one
is kept out; the verdicts are stored and shown by `forseti models compare`."""

from __future__ import annotations

import asyncio
import csv
import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from forseti.adapters.bus import MemoryBroker, MemoryBus
from forseti.adapters.registry import create_store
from forseti.schemas.catalog import MODELS
from forseti.schemas.models import ModelAvailable
from forseti.schemas.tasks import RLTask, TrainingTask
from forseti.worker.cli import app
from forseti.worker.handlers.gates import wins
from forseti.worker.handlers.rl import RLHandler
from forseti.worker.handlers.training import TrainingHandler

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
    assert wins("accuracy", 0.01, 0.95, 0.90) and not wins("accuracy", 0.01, 0.905, 0.90)
    assert wins("mae", 0.0, 1.0, 2.0) and wins("mae", 0.0, 2.0, 2.0) and not wins("mae", 0.0, 2.1, 2.0)
    assert wins("mean_reward", 5.0, 200.0, 20.0) and not wins("mean_reward", 5.0, 24.0, 20.0)


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


def policy(job_id: str, timesteps: int) -> RLTask:
    """PPO on CartPole for the `production` alias of `cartpole`, gated on the job's 5 seeded episodes."""
    return RLTask.model_validate(
        {
            "request_id": job_id,
            "algorithm": "ppo",
            "environment": "CartPole-v1",
            "name": "cartpole",
            "config": {"total_timesteps": timesteps, "n_steps": 256, "seed": 1},
            "policy": {"net_arch": [32]},
            "evaluation": {"episodes": 5},
            "gate": {"alias": "production", "margin": 5.0},
        }
    )


def test_a_policy_gate_needs_seeded_episodes() -> None:
    with pytest.raises(ValidationError, match="same seeded episodes"):
        RLTask.model_validate({**policy("x", 256).model_dump(), "evaluation": {"episodes": 0}})


async def test_a_policy_gate_compares_returns_on_the_same_episodes(tmp_path: Path) -> None:
    broker = MemoryBroker()
    client = MemoryBus(broker)
    await client.connect()
    async with running_worker(MemoryBus(broker), [RLHandler(progress_every=10_000)], tmp_path):
        weak, _ = await run_task(client, policy("untrained", 256))
        strong, _ = await run_task(client, policy("trained", 12_000))
        again, _ = await run_task(client, policy("untrained-again", 256))
    await client.close()
    scores = {r.result.agent_id: r.result.metrics.custom_metrics for r in (weak, strong, again)}
    assert scores["untrained"]["gate_promoted"] == 1.0  # the alias was free
    assert scores["trained"]["gate_promoted"] == 1.0
    assert scores["trained"]["gate_score"] > scores["trained"]["gate_champion_score"] + 5.0
    assert scores["untrained-again"]["gate_promoted"] == 0.0
    # the champion acted on the same seeded episodes as when it was the challenger
    assert scores["untrained-again"]["gate_champion_score"] == scores["trained"]["gate_score"]
    store = create_store(str(tmp_path / "registry.db"))
    await store.open()
    champion = await store.get_alias("cartpole", "production")
    (verdict,) = await store.list_evaluations(["untrained-again"])
    await store.close()
    assert champion is not None and champion.id == "trained"
    assert verdict.metric == "mean_reward" and "does not beat" in verdict.reason
