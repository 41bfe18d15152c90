"""The Python examples run as they are written, against a real worker on a real nats-server."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from forseti.adapters.bus import create_bus
from forseti.adapters.bus.servers import NatsServer
from forseti.worker.handlers.rl import RLHandler

from ..helpers import running_worker

EXAMPLES = Path(__file__).parents[2] / "examples"


async def test_the_readme_client_program_submits_an_rl_task_prints_progress_and_its_result(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    async with running_worker(create_bus(nats_server.url), [RLHandler(progress_every=256)], tmp_path):
        run = await asyncio.create_subprocess_exec(
            sys.executable,
            str(EXAMPLES / "submit_rl.py"),
            nats_server.url,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(run.communicate(), timeout=110)
    text = out.decode()
    assert run.returncode == 0, err.decode()[-2000:]
    assert "step" in text and "%" in text  # progress lines
    assert "agent_id=" in text and "mean_reward" in text  # the RLResult printed at the end
