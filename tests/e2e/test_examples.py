"""The examples run as they are written, against a real worker on a real nats-server: the Python programs
in examples/, and the tasks that docs/training.md and docs/llm.md show, on the data `forseti demo-files`
puts in the data root."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson

from forseti.adapters.bus import create_bus
from forseti.adapters.bus.servers import NatsServer
from forseti.client import Client
from forseti.schemas.jobs import FinetuneResult, InferenceResult, TrainingResult
from forseti.worker.engine.context import Handler
from forseti.worker.handlers.finetune import FinetuneHandler
from forseti.worker.handlers.inference import InferenceHandler
from forseti.worker.handlers.rl import RLHandler
from forseti.worker.handlers.training import TrainingHandler

from ..helpers import running_worker

REPO = Path(__file__).parents[2]
EXAMPLES = REPO / "examples"


async def example(name: str, *args: str, timeout: float = 110) -> str:
    """Run examples/`name` with `args`; its stdout (the test fails on a non-zero exit)."""
    run = await asyncio.create_subprocess_exec(
        sys.executable, str(EXAMPLES / name), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(run.communicate(), timeout=timeout)
    assert run.returncode == 0, err.decode()[-2000:]
    return out.decode()


def doc_task(doc: str, marker: str) -> dict[str, Any]:
    """The JSON code block of docs/`doc` that contains `marker`, parsed."""
    blocks = re.findall(r"```json\n(.*?)```", (REPO / "docs" / doc).read_text(), flags=re.S)
    found = [block for block in blocks if marker in block]
    assert len(found) == 1, f"{len(found)} json blocks of docs/{doc} hold {marker!r}"
    task: dict[str, Any] = orjson.loads(found[0])
    return task


def demo_files(data_dir: Path, *options: str) -> None:
    """`forseti demo-files` into `data_dir`'s data root, as the docs say to run it."""
    done = subprocess.run(
        [sys.executable, "-m", "forseti.worker", "demo-files", "--data-dir", str(data_dir), *options],
        capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


async def test_the_readme_client_program_submits_an_rl_task_prints_progress_and_its_result(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    async with running_worker(create_bus(nats_server.url), [RLHandler(progress_every=256)], tmp_path):
        text = await example("submit_rl.py", nats_server.url)
        raw = await example("raw_nats.py", nats_server.url)
    assert "step" in text and "%" in text  # progress lines
    assert "agent_id=" in text and "mean_reward" in text  # the RLResult printed at the end
    assert "forseti.job.accepted.v1" in raw and "forseti.job.completed.v1" in raw  # nats-py alone


async def test_the_supervised_example_and_the_training_docs_run_on_the_demo_files(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    demo_files(tmp_path, "--no-llm")
    handlers: list[Handler] = [TrainingHandler(), InferenceHandler()]
    async with running_worker(create_bus(nats_server.url), handlers, tmp_path):
        text = await example("train_classifier.py", nats_server.url)
        async with await Client.connect(nats_server.url) as forseti:
            training = doc_task("training.md", '"request_id": "cancer-1"')
            trained = await (await forseti.submit(training, kind="training")).result(timeout=120)
            scoring = doc_task("training.md", '"request_id": "score-1"')
            scored = await (await forseti.submit(scoring, kind="inference")).result(timeout=60)
            distributed = doc_task("training.md", '"request_id": "cancer-ddp"')
            spread = await (await forseti.submit(distributed, kind="training")).result(timeout=180)
    assert "test_accuracy" in text and "patient 0: diagnosis " in text
    assert isinstance(trained, TrainingResult) and trained.model_id == "cancer-1"
    assert trained.metrics.custom_metrics["test_accuracy"] >= 0.9
    assert isinstance(scored, InferenceResult) and len(scored.outputs) == 20
    assert {p["label"] for p in scored.outputs} <= {0, 1}
    assert isinstance(spread, TrainingResult) and spread.metrics.custom_metrics["test_accuracy"] >= 0.9


async def test_the_finetune_doc_task_runs_as_written_on_the_demo_model(nats_server: NatsServer, tmp_path: Path) -> None:
    demo_files(tmp_path)
    task = doc_task("llm.md", '"request_id": "assistant-2026-11"')
    worker = running_worker(create_bus(nats_server.url), [FinetuneHandler()], tmp_path)
    async with worker, await Client.connect(nats_server.url) as forseti:
        result = await (await forseti.submit(task, kind="finetune")).result(timeout=300)
    assert isinstance(result, FinetuneResult) and result.version == "v1.0"
    assert set(result.gguf) >= {"f16", "q8_0", "lora"}
