"""Stopping a background task ends it even when the task let one cancel pass, as Python 3.11's
`asyncio.wait_for` does when a cancel meets its result (under every nats-py fetch)."""

from __future__ import annotations

import asyncio

import pytest

from forseti.adapters.bus.base import cancel_and_wait


async def test_a_task_that_lost_a_cancel_is_cancelled_again() -> None:
    lost: list[int] = []

    async def fetching() -> None:
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if lost:  # only the first cancel is lost, as one meeting a result is
                    raise
                lost.append(1)

    task = asyncio.create_task(fetching())
    await asyncio.sleep(0)
    stopping = asyncio.create_task(cancel_and_wait(task))
    await asyncio.wait([stopping], timeout=10)  # not wait_for: its own cancel would reach the task
    assert stopping.done(), "cancel_and_wait waited on a task that had let its cancel pass"
    assert task.cancelled() and lost == [1]
    await stopping


async def test_a_task_that_ended_with_an_error_hands_it_on() -> None:
    async def failing() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise RuntimeError("cleanup failed") from None

    task = asyncio.create_task(failing())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="cleanup failed"):
        await cancel_and_wait(task)
