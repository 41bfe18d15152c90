"""`forseti infer-serve`: streaming inference by request-reply on `forseti.infer.<model_id>`.

Each request (`forseti.infer.request.v1`, a few raw rows) names its model by the channel. Requests
for one model are micro-batched: a batch closes when it holds `max_batch` requests, or `max_wait_ms`
after its first request arrived (0: as soon as no more are queued, so a lone request never waits),
and runs as one onnxruntime call; each request gets its own rows' predictions back
(`forseti.infer.result.v1`, with how many requests shared the call) or `forseti.infer.error.v1`.
Sessions come from the registry's ONNX exports and stay loaded (`ModelCache`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

from forseti.adapters.bus import Bus, Message, Subscription
from forseti.adapters.inference import ModelCache, OnnxModel
from forseti.adapters.registry.base import RegistryStore
from forseti.schemas.catalog import INFER
from forseti.schemas.envelope import decode, encode
from forseti.schemas.errors import ErrorCode, ForsetiError, InvalidTask
from forseti.schemas.inference import InferError, InferReply, InferRequest

from ..handlers.inference import registered_model

log = logging.getLogger(__name__)
PREFIX = INFER.removesuffix("{model_id}")
INLINE_ROWS = 1024
"""Batches up to this many rows run on the event loop: a thread hop would cost more than the call."""


@dataclass
class _Request:
    rows: list[dict[str, Any]]
    msg: Message


@dataclass
class _Batcher:
    """The queue and the running loop of one model."""

    model: OnnxModel
    version: int
    queue: asyncio.Queue[_Request] = field(default_factory=asyncio.Queue)
    task: asyncio.Task[None] | None = None


class InferenceService:
    """Answers streaming inference requests for every registered model, micro-batched per model."""

    def __init__(
        self,
        bus: Bus,
        store: RegistryStore,
        *,
        cache: ModelCache | None = None,
        max_batch: int = 64,
        max_wait_ms: float = 0.0,
    ) -> None:
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError("max_batch must be at least 1 and max_wait_ms at least 0")
        self.bus, self.store = bus, store
        self.cache = cache or ModelCache()
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000
        self._batchers: dict[str, _Batcher] = {}
        self._loading = asyncio.Lock()
        """Held while a model loads: loads are rare, and a lock per asked-for id would grow with every
        id a client makes up."""
        self._sub: Subscription | None = None

    async def start(self) -> None:
        """Answer on every model's channel (one queue group across services)."""
        self._sub = await self.bus.subscribe(PREFIX + ">", self._on_request, queue="forseti-infer")

    async def stop(self) -> None:
        """Stop answering; requests already queued get no reply and time out at their clients."""
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None
        for batcher in self._batchers.values():
            if batcher.task is not None:
                batcher.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await batcher.task
        self._batchers.clear()

    async def _on_request(self, msg: Message) -> None:
        model_id = msg.channel.removeprefix(PREFIX) if msg.channel.startswith(PREFIX) else msg.key or ""
        try:
            request = decode(msg.data, expect=InferRequest).data
            batcher = await self._batcher(model_id)
        except (InvalidTask, ForsetiError) as exc:
            await _refuse(msg, exc.code, exc.message)
            return
        await batcher.queue.put(_Request([dict(row) for row in request.rows], msg))

    async def _batcher(self, model_id: str) -> _Batcher:
        batcher = self._batchers.get(model_id)
        if batcher is not None:
            return batcher
        async with self._loading:  # one load per model, however many ask at once
            batcher = self._batchers.get(model_id)
            if batcher is None:
                model, version = await registered_model(self.store, self.cache, model_id)
                batcher = _Batcher(model, version)
                batcher.task = asyncio.create_task(self._serve(model_id, batcher))
                self._batchers[model_id] = batcher
        return batcher

    async def _serve(self, model_id: str, batcher: _Batcher) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await batcher.queue.get()]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch:
                if not batcher.queue.empty():
                    batch.append(batcher.queue.get_nowait())
                    continue
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(batcher.queue.get(), left))
                except TimeoutError:
                    break
            try:
                await self._answer(model_id, batcher, batch)
            except Exception:  # one bad batch must not end the model's loop
                log.exception("streaming inference on %s failed", model_id)

    async def _answer(self, model_id: str, batcher: _Batcher, batch: list[_Request]) -> None:
        try:
            outputs = await _predict(batcher.model, [request.rows for request in batch])
        except ForsetiError as exc:
            if len(batch) == 1:
                await _refuse(batch[0].msg, exc.code, exc.message)
                return
            for request in batch:  # find the request that is at fault; the others are answered
                await self._answer(model_id, batcher, [request])
            return
        for request, part in zip(batch, outputs, strict=True):
            reply = InferReply(outputs=part, model_id=model_id, version=str(batcher.version), batched=len(batch))
            await request.msg.respond(encode(reply))


async def _predict(model: OnnxModel, requests: list[list[dict[str, Any]]]) -> list[list[Any]]:
    if sum(map(len, requests)) <= INLINE_ROWS:
        return model.predict_many(requests)
    return await asyncio.to_thread(model.predict_many, requests)


async def _refuse(msg: Message, code: ErrorCode, message: str) -> None:
    await msg.respond(encode(InferError(code=code, message=message[:4096])))
