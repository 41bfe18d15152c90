"""Submit a task and follow its job with nothing but nats-py, as a program in any language would with
its NATS client: a CloudEvent in JSON on forseti.tasks.<kind>, the job's events on forseti.jobs.<id>.

python examples/raw_nats.py [NATS_URL]
"""

import asyncio
import json
import sys
import uuid

import nats


async def main(url: str) -> None:
    nc = await nats.connect(url)
    job_id = f"raw-{uuid.uuid4().hex[:8]}"
    ended = asyncio.Event()

    async def on_event(msg: nats.aio.msg.Msg) -> None:
        event = json.loads(msg.data)
        print(event["type"], json.dumps(event["data"])[:120])
        if event["type"] in ("forseti.job.completed.v1", "forseti.job.failed.v1", "forseti.job.cancelled.v1"):
            ended.set()

    await nc.subscribe(f"forseti.jobs.{job_id}", cb=on_event)  # before publishing: no event is missed
    task = {
        "specversion": "1.0",
        "id": uuid.uuid4().hex,
        "source": "examples/raw_nats.py",
        "type": "forseti.task.rl.v1",
        "datacontenttype": "application/json",
        "data": {
            "request_id": job_id,
            "algorithm": "ppo",
            "environment": "CartPole-v1",
            "config": {"total_timesteps": 2048, "n_steps": 256},
        },
    }
    await nc.publish("forseti.tasks.rl", json.dumps(task).encode())
    await asyncio.wait_for(ended.wait(), 300)
    await nc.close()


asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "nats://127.0.0.1:4222"))
