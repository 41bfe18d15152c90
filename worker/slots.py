"""The worker's concurrency limit, reserved in batches so intake can fetch several tasks per round trip."""

from __future__ import annotations

import asyncio


class Slots:
    """How many more jobs may start; `reserve` waits for at least one and takes up to `most`."""

    def __init__(self, size: int) -> None:
        self.free = size
        self._changed = asyncio.Event()
        self._closed = False

    async def reserve(self, most: int) -> int:
        """Take between 1 and `most` free slots, waiting for one; 0 once closed."""
        while self.free == 0 and not self._closed:
            self._changed.clear()
            await self._changed.wait()
        if self._closed:
            return 0
        taken = min(most, self.free)
        self.free -= taken
        return taken

    def release(self, count: int = 1) -> None:
        """Give slots back."""
        self.free += count
        self._changed.set()

    def close(self) -> None:
        """Wake every waiter with 0: the worker is stopping."""
        self._closed = True
        self._changed.set()
