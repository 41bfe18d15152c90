"""Submit a small PPO task, print its progress, and print its result (start `forseti up` first).

python examples/submit_rl.py [BUS_URL]
"""

import asyncio
import sys

from forseti.client import Client
from forseti.schemas.jobs import JobProgress
from forseti.schemas.tasks import RLConfig, RLTask


async def main(url: str) -> None:
    async with await Client.connect(url) as forseti:
        task = RLTask(algorithm="ppo", environment="CartPole-v1", config=RLConfig(total_timesteps=2048, n_steps=256))
        job = await forseti.submit(task)
        async for event in job.events():
            if isinstance(event, JobProgress):
                print(f"{event.fraction:6.1%}  step {event.step}  {event.metrics}")
        print(await job.result())


asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "nats://127.0.0.1:4222"))
