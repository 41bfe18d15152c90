"""The worker's concurrency limit, reserved in batches so intake can fetch several tasks per round trip."""

from __future__ import annotations

import asyncio
from collections import deque


class Slots:
    """How many more jobs may start; `reserve` waits for at least one and takes up to `most`.

    Waiters are served first come, first served: a caller that gives slots back and asks again at
    once queues behind those already waiting. Without that, the task kinds that poll while holding a
    slot could keep every slot between them, and a worker with more kinds than slots would never
    poll the others."""

    def __init__(self, size: int) -> None:
        self.free = size
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._promised = 0
        """Free slots set aside for waiters that were woken and have not run yet."""
        self._closed = False

    async def reserve(self, most: int) -> int:
        """Take between 1 and `most` free slots, waiting for one in turn; 0 once closed."""
        while not self._closed and (self.free - self._promised <= 0 or self._waiters):
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                elif not self._closed:  # woken, but it will not take its turn: pass the turn on
                    self._promised -= 1
                    self._wake()
                raise
            if self.closed():  # a method, not the attribute: close() may have run while this waited
                break
            self._promised -= 1
            taken = min(most, self.free - self._promised)
            self.free -= taken
            self._wake()  # slots left over go to the next in line
            return taken
        if self._closed:
            return 0
        taken = min(most, self.free - self._promised)
        self.free -= taken
        return taken

    def try_reserve(self, most: int) -> int:
        """Take up to `most` free slots now, without waiting: 0 when none is free, or when others
        wait in line for one (they go first), or once closed."""
        if self._closed or self._waiters:
            return 0
        taken = max(0, min(most, self.free - self._promised))
        self.free -= taken
        return taken

    def release(self, count: int = 1) -> None:
        """Give slots back, to the longest waiters first."""
        self.free += count
        self._wake()

    def closed(self) -> bool:
        """True once the worker is stopping."""
        return self._closed

    def close(self) -> None:
        """Wake every waiter with 0: the worker is stopping."""
        self._closed = True
        while self._waiters:
            self._waiters.popleft().set_result(None)

    def _wake(self) -> None:
        while self.free - self._promised > 0 and self._waiters:
            self._waiters.popleft().set_result(None)
            self._promised += 1
