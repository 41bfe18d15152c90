"""The event loop Forseti's commands run on: uvloop where it is installed, else asyncio's own.

uvloop's socket I/O and cross-thread wake-ups are cheaper, which is what a remote env step pays
for several times over (training thread -> loop -> bus -> loop -> thread): 0.59x -> 0.62x of the
in-worker speed at one env over NATS in `bench/rl_throughput.py`. `FORSETI_EVENT_LOOP=asyncio`
turns it off.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory, or None for asyncio's default (not installed, or turned off)."""
    if os.environ.get("FORSETI_EVENT_LOOP", "uvloop") == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)` on the loop `loop_factory()` picks."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
