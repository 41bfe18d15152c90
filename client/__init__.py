"""forseti.client: submit tasks and follow their jobs and models from Python, on any bus a worker takes.

    import asyncio
    from forseti.client import Client
    from forseti.schemas.tasks import RLConfig, RLTask

    async def main() -> None:
        async with await Client.connect("nats://127.0.0.1:4222") as forseti:
            task = RLTask(algorithm="ppo", environment="CartPole-v1", config=RLConfig(total_timesteps=2048))
            job = await forseti.submit(task)
            async for event in job.events():
                print(event)
            print(await job.result())

    asyncio.run(main())

`SyncClient` is the same without asyncio. Torch-free: it needs only the core install.
"""

from .client import ACCEPT_TIMEOUT, DEFAULT_BUS_URL, Client, Job, JobUpdate, ModelEvent, as_task
from .errors import ClientError, ClientTimeout, JobCancelledError, JobFailedError, QueryRefused, TaskRefused, UnknownJob
from .sync import SyncClient, SyncJob

__all__ = [
    "ACCEPT_TIMEOUT",
    "DEFAULT_BUS_URL",
    "Client",
    "ClientError",
    "ClientTimeout",
    "Job",
    "JobCancelledError",
    "JobFailedError",
    "JobUpdate",
    "ModelEvent",
    "QueryRefused",
    "SyncClient",
    "SyncJob",
    "TaskRefused",
    "UnknownJob",
    "as_task",
]
