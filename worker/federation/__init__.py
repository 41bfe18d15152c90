"""Federated learning: the coordinator service, its strategies and privacy options, and the agents' side."""

from __future__ import annotations

import asyncio


async def woken(event: asyncio.Event, timeout: float) -> bool:
    """Wait until `event` is set or `timeout` passes; whether it was set. Built on `asyncio.wait`, not
    `asyncio.wait_for`, whose cancellation on Python 3.11 could leave a cancelled caller waiting on
    the event (a coordinator's `stop()` hung on it)."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter}, timeout=timeout)
    finally:
        waiter.cancel()
    return event.is_set()
