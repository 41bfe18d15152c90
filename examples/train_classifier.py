"""Train a classifier on breast-cancer rows, then score new patients with it, through the Python
client. First `forseti demo-files` (it puts cancer.csv and new_patients.csv into the worker's data
root) and a worker (`forseti up`).

python examples/train_classifier.py [BUS_URL]
"""

import asyncio
import sys

from forseti.client import Client
from forseti.schemas.jobs import InferenceResult, JobProgress, TrainingResult


async def main(url: str) -> None:
    async with await Client.connect(url) as forseti:
        training = {
            "model_type": "classifier",
            "name": "cancer",
            "config": {"epochs": 30, "hidden": [32], "metrics": ["accuracy", "auroc"]},
            "data_sources": [{"uri": "file://cancer.csv", "target": "diagnosis"}],
        }
        job = await forseti.submit(training, kind="training")
        async for event in job.events():
            if isinstance(event, JobProgress):
                print(f"{event.fraction:6.1%}  {event.message}")
        trained = await job.result()
        assert isinstance(trained, TrainingResult)
        figures = {k: round(v, 3) for k, v in trained.metrics.custom_metrics.items() if k.startswith("test_")}
        print(f"model {trained.model_id}: {figures}")

        scoring = {"model_id": trained.model_id, "uri": "file://new_patients.csv"}
        scored = await (await forseti.submit(scoring, kind="inference")).result()
        assert isinstance(scored, InferenceResult)
        for row, prediction in enumerate(scored.outputs[:5]):
            print(f"patient {row}: diagnosis {prediction['label']}  p={prediction['probabilities']}")


asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "nats://127.0.0.1:4222"))
