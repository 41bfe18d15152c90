"""`forseti llm-serve`: the reference LLM service (the contract the seed's Geri implements).

It follows `forseti.models` for one model name, loads each announced GGUF (or base + LoRA GGUF) with
llama.cpp after checking size and sha256 (downloading it first when it was announced in the NATS
object store, `adapters/artifacts.py`), and answers `forseti.llm.complete.v1` requests on
`forseti.llm.<name>.complete`. A new version loads beside the one serving and takes over in one
assignment, so requests in flight finish on the model they started on and none is dropped. Every
load is reported as `forseti.model.loaded.v1`, ok or not; a file that fails its digest or its load
leaves the serving version in place. The versions it served before stay loaded (`keep` of them), so
a `forseti.model.rollback.v1` returns to one at once. A service started after versions were announced
catches up: it reads the kept history of `forseti.models` first (each version of its name in turn,
ending on the newest, or on the one an alias holds), then what comes.

A service that follows an alias takes part in that alias's rollouts (`forseti.rollout.step.v1`): it
loads the candidate beside the serving version, sends it the rollout's share of requests (an exact
split, `traffic.Split`), drops it on a rollback and serves it alone once the rollout completes.
Every `health_every` seconds it reports what it serves and each version's requests, failures and
latency (`forseti.model.health.v1`), which the workers judge the rollout by.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forseti.adapters.artifacts import fetch
from forseti.adapters.bus import Bus, Message, Subscription
from forseti.adapters.encryption import Keyring
from forseti.adapters.llm.gguf import GGUF_TYPES
from forseti.adapters.llm.llama import LlamaRuntime
from forseti.adapters.objects import ObjectStore
from forseti.adapters.signing import Signer, TrustedKeys, refusal, seal
from forseti.schemas.base import ID_PATTERN
from forseti.schemas.catalog import HEALTH, LOADED, MODELS, llm_channel
from forseti.schemas.envelope import Event, decode, encode
from forseti.schemas.errors import ErrorCode, ForsetiError, InvalidTask
from forseti.schemas.llm import CompleteReply, CompleteRequest, LlmError
from forseti.schemas.models import ModelAvailable, ModelLoaded, ModelRollback
from forseti.schemas.rollouts import ENDED, RolloutStep, ServeHealth

from ..engine.settings import default_data_dir
from .traffic import Split, Traffic, report_every

log = logging.getLogger(__name__)
ARTIFACTS = (*GGUF_TYPES, "lora")
"""What llm-serve can follow: a merged GGUF of one type, or the LoRA GGUF on its base GGUF."""


@dataclass
class Served:
    """One loaded version and the lock that serialises its completions (a llama.cpp context serves one
    request at a time)."""

    model_id: str
    version: str
    runtime: LlamaRuntime
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def close(self) -> None:
        """Free the model once the request using it (if any) is done."""
        async with self.lock:
            await asyncio.to_thread(self.runtime.close)


@dataclass
class Canary:
    """The rollout this service takes part in: its candidate, loaded beside the serving version."""

    rollout_id: str
    candidate_id: str
    served: Served | None = None
    """The candidate, once loaded."""
    error: str | None = None
    """Why the candidate could not be loaded, if it could not."""
    share: int = 0
    """The percentage of requests it answers now."""


class LlmService:
    """Serves completions of one model name, following its announcements."""

    def __init__(
        self,
        bus: Bus,
        *,
        name: str,
        consumer: str,
        artifact: str = "f16",
        alias: str | None = None,
        context: int = 512,
        threads: int = 2,
        keep: int = 1,
        cache: Path | None = None,
        answer: bool = True,
        durable: str | None = None,
        catch_up: bool = True,
        objects: ObjectStore | None = None,
        trusted: TrustedKeys | None = None,
        keyring: Keyring | None = None,
        health_every: float = 10.0,
        signer: Signer | None = None,
    ) -> None:
        if not re.match(ID_PATTERN, name):
            raise ForsetiError(
                f"model name {name!r} cannot name a channel; use [A-Za-z0-9._-]", code=ErrorCode.INVALID_TASK
            )
        if artifact not in ARTIFACTS:
            raise ForsetiError(f"artifact must be one of {', '.join(ARTIFACTS)}", code=ErrorCode.INVALID_TASK)
        self.bus, self.name, self.consumer = bus, name, consumer
        self.artifact, self.alias = artifact, alias
        self.context, self.threads = context, threads
        self.keep = keep
        """Versions served before that stay loaded for rollbacks."""
        self.cache = cache or default_data_dir() / "fetched"
        """Where files announced in the object store are downloaded to."""
        self.objects = objects
        """The S3 store `s3://` announcements are fetched from (Kafka deployments; None: none)."""
        self.answer = answer
        """Whether to answer on the completion channel (an edge device answers on its own instead)."""
        self.durable = durable
        """A follower name: announcements missed while away are handled on return, the service's state
        being kept elsewhere (the edge agent's); None: no position kept."""
        self.catch_up = catch_up
        """Without a `durable` name: start from the channel's kept history, so a service started after a
        fine-tune serves it (False: only announcements made from now on)."""
        self.trusted = trusted
        """The keys announcements must be signed by (None: any announcement is acted on)."""
        self.keyring = keyring
        """Decrypts artifacts stored encrypted (None: such artifacts are refused)."""
        self.current: Served | None = None
        """The version answering requests now."""
        self.previous: list[Served] = []
        """Versions served before, newest first, kept loaded for rollbacks."""
        self.rollout: Canary | None = None
        """The rollout of the followed alias going on, if any."""
        self.health_every = health_every
        """Seconds between two health reports."""
        self.signer = signer
        """Signs the health reports (workers given `replica_keys` count only signed ones)."""
        self.traffic = Traffic()
        """Requests per version since the last health report."""
        self._split = Split()
        self._seen: dict[str, int] = {}
        self._subs: list[Subscription] = []
        self._swap = asyncio.Lock()
        self._health: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        """Follow the models channel and answer on the completion channel."""
        if self.durable or self.catch_up:
            # with no durable name, the whole kept history at every start: the versions announced,
            # promoted and rolled back before, in order, so it ends serving what a service running
            # all along would serve
            self._subs.append(await self.bus.follow(MODELS, self._on_model, durable=self.durable))
        else:
            self._subs.append(await self.bus.subscribe(MODELS, self._on_model))
        if self.answer:
            self._subs.append(await self.bus.subscribe(llm_channel(self.name), self._on_request, queue="llm-serve"))
        self._stopped.clear()
        self._health = asyncio.create_task(
            report_every(self.health_every, self._stopped, self.publish_health, f"llm-serve {self.name}"),
            name=f"llm-serve {self.name} health",
        )

    async def stop(self) -> None:
        """Stop listening and reporting, and free every loaded model."""
        self._stopped.set()
        if self._health is not None:
            await self._health
        for sub in self._subs:
            await sub.unsubscribe()
        self._subs.clear()
        candidate = self.rollout.served if self.rollout else None
        for served in [s for s in (self.current, *self.previous, candidate) if s is not None]:
            await served.close()
        self.current, self.previous, self.rollout = None, [], None

    def wants(self, event: ModelAvailable) -> bool:
        """Whether an announcement is of this service's name, artifact and (when set) alias."""
        return not (self.alias and event.alias != self.alias) and self.serves(event)

    def serves(self, event: ModelAvailable) -> bool:
        """Whether an announcement is of this service's name and artifact, whatever its alias."""
        if event.name != self.name or event.kind != "llm":
            return False
        if self.artifact == "lora":
            return event.format == "gguf-lora" and event.base_uri is not None
        return event.format == "gguf" and event.quantization == self.artifact

    async def _on_model(self, msg: Message) -> None:
        try:
            event: Event[Any] = decode(msg.data)
        except InvalidTask as exc:
            log.warning("ignoring an unreadable models event: %s", exc.message)
            return
        if isinstance(event.data, ModelAvailable) and self.wants(event.data):
            if not await self._refused(msg.data, event.data.model_id, event.data.version):
                await self.load(event.data)
        elif (
            isinstance(event.data, ModelRollback)
            and event.data.name == self.name
            and not await self._refused(msg.data, event.data.model_id, event.data.to_version)
        ):
            await self.roll_back(event.data)
        elif (
            isinstance(event.data, RolloutStep)
            and (event.data.name, event.data.alias) == (self.name, self.alias)
            and not await self._refused(msg.data, event.data.candidate_id, event.data.candidate_version)
        ):
            await self.follow_rollout(event.data)

    async def _refused(self, raw: bytes, model_id: str, version: str) -> bool:
        """Whether an announcement fails its signature check (reported as not loaded, nothing fetched)."""
        reason = refusal(self.trusted, raw)
        if reason is not None:
            log.warning("llm-serve %s: %s (%s) refused: %s", self.name, version, model_id, reason)
            await self._report(model_id, version, ok=False, message=f"{ErrorCode.INVALID_MODEL.value}: {reason}")
        return reason is not None

    async def load(self, event: ModelAvailable) -> bool:
        """Check and load an announced version beside the serving one, then switch to it; report either way."""
        async with self._swap:
            canary = self.rollout
            if self.current is not None and self.current.model_id == event.model_id:
                ready = True  # a rollout that completed here already switched to it
            elif canary is not None and canary.served is not None and canary.candidate_id == event.model_id:
                await self._switch(canary.served)  # its rollout's end is still to come: it takes over now
                self.rollout, ready = None, True
            else:
                ready = False
        if ready:
            await self._report(event.model_id, event.version, ok=True)
            return True
        async with self._swap:
            log.info("llm-serve %s: loading %s (%s) from %s", self.name, event.version, event.model_id, event.uri)
            try:
                runtime = await self._open(event)
            except ForsetiError as exc:
                log.warning("llm-serve %s: %s %s not loaded: %s", self.name, event.version, event.model_id, exc.message)
                await self._report(event.model_id, event.version, ok=False, message=exc.message)
                return False
            await self._switch(Served(event.model_id, event.version, runtime))
        await self._report(event.model_id, event.version, ok=True)
        return True

    async def _open(self, event: ModelAvailable) -> LlamaRuntime:
        path = await fetch(
            self.bus,
            event.uri,
            sha256=event.sha256,
            size=event.size_bytes,
            cache=self.cache,
            objects=self.objects,
            keyring=self.keyring,
        )
        if event.format == "gguf-lora":
            base = await fetch(
                self.bus,
                event.base_uri or "",
                sha256=event.base_sha256 or "",
                size=None,
                cache=self.cache,
                objects=self.objects,
                keyring=self.keyring,
            )
            return await asyncio.to_thread(
                LlamaRuntime, base, lora_path=path, context=self.context, threads=self.threads
            )
        return await asyncio.to_thread(LlamaRuntime, path, context=self.context, threads=self.threads)

    async def _switch(self, served: Served) -> None:
        old, self.current = self.current, served  # one assignment: new requests go to the new version
        if old is not None:
            self.previous.insert(0, old)
        stale, self.previous = self.previous[self.keep :], self.previous[: self.keep]
        for served_before in stale:
            await served_before.close()
        log.info("llm-serve %s now serves %s (%s)", self.name, served.version, served.model_id)

    async def roll_back(self, event: ModelRollback) -> bool:
        """Return to a version kept loaded; report failure when it is not held."""
        async with self._swap:
            held = next((s for s in self.previous if s.model_id == event.model_id), None)
            if held is None:
                message = f"{event.to_version} ({event.model_id}) is not loaded here; announce it to load it"
                await self._report(event.model_id, event.to_version, ok=False, message=message)
                return False
            self.previous.remove(held)
            await self._switch(held)
        await self._report(event.model_id, event.to_version, ok=True)
        return True

    async def follow_rollout(self, step: RolloutStep) -> None:
        """Act on a rollout's move: load the candidate beside the serving version (reported like any
        load), give it the step's share of requests, serve it alone when the rollout completes, drop
        it when it is rolled back or aborted. A move older than one already acted on is ignored."""
        if step.seq <= self._seen.get(step.rollout_id, -1):
            return
        self._seen[step.rollout_id] = step.seq
        report: tuple[bool, str] | None = None
        async with self._swap:
            canary = self.rollout
            if canary is not None and canary.rollout_id != step.rollout_id:
                await self._drop_candidate()  # the end of the one before was missed: a new rollout replaces it
                canary = None
            if step.state in ENDED:
                if canary is not None and canary.served is not None and step.state == "completed":
                    await self._switch(canary.served)
                    self.rollout = None
                elif canary is not None:
                    await self._drop_candidate()
                log.info("llm-serve %s: rollout %s %s: %s", self.name, step.rollout_id, step.state, step.reason)
                return
            if canary is None:
                canary = self.rollout = Canary(step.rollout_id, step.candidate_id)
                report = await self._load_candidate(canary, step)
            canary.share = step.share if canary.served is not None else 0
        if report is not None:
            await self._report(step.candidate_id, step.candidate_version, ok=report[0], message=report[1])

    async def _load_candidate(self, canary: Canary, step: RolloutStep) -> tuple[bool, str]:
        announcement = next((a for a in step.candidates if self.serves(a)), None)
        if announcement is None:
            canary.error = f"{step.candidate_version} has no {self.artifact} artifact to serve"
            return False, canary.error
        try:
            runtime = await self._open(announcement)
        except ForsetiError as exc:
            log.warning("llm-serve %s: candidate %s not loaded: %s", self.name, step.candidate_version, exc.message)
            canary.error = exc.message
            return False, exc.message
        canary.served = Served(step.candidate_id, step.candidate_version, runtime)
        log.info("llm-serve %s: %s loaded beside %s for rollout %s", self.name, step.candidate_version,
                 self.current.version if self.current else "nothing", step.rollout_id)  # fmt: skip
        return True, f"loaded for rollout {step.rollout_id}"

    async def _drop_candidate(self) -> None:
        canary, self.rollout = self.rollout, None
        if canary is not None and canary.served is not None:
            await canary.served.close()

    async def publish_health(self) -> None:
        """Report what this service serves and each version's requests since the last report."""
        canary = self.rollout
        health = ServeHealth(
            consumer=self.consumer,
            name=self.name,
            alias=self.alias,
            serving=self.current.model_id if self.current else None,
            every_seconds=self.health_every,
            rollout_id=canary.rollout_id if canary else None,
            candidate=canary.served.model_id if canary and canary.served else None,
            candidate_error=canary.error[:4096] if canary and canary.error else None,
            share=canary.share if canary else 0,
            versions=self.traffic.drain(),
        )
        await self.bus.publish(HEALTH, seal(encode(health, subject=self.name), self.signer))

    async def _report(self, model_id: str, version: str, *, ok: bool, message: str = "") -> None:
        loaded = ModelLoaded(
            model_id=model_id, name=self.name, version=version, consumer=self.consumer, ok=ok, message=message[:4096]
        )
        await self.bus.publish(LOADED, encode(loaded, subject=model_id))

    async def _on_request(self, msg: Message) -> None:
        try:
            request = decode(msg.data, expect=CompleteRequest).data
        except InvalidTask as exc:
            await msg.respond(encode(LlmError(code=exc.code, message=exc.message[:4096])))
            return
        await msg.respond(encode(await self.complete(request)))

    async def complete(self, request: CompleteRequest) -> CompleteReply | LlmError:
        """Continue a prompt with the serving version (or, during a rollout, its share of requests with the
        candidate); an LlmError when none is loaded or llama.cpp refuses."""
        served = self.current
        canary = self.rollout
        if canary is not None and canary.served is not None and self._split.candidate(canary.share):
            served = canary.served
        if served is None:
            return LlmError(code=ErrorCode.INVALID_MODEL, message=f"no version of {self.name} loaded yet")
        began = time.perf_counter()
        reply = await self._complete_on(served, request)
        latency_ms = (time.perf_counter() - began) * 1000
        self.traffic.record(served.model_id, served.version, latency_ms, ok=isinstance(reply, CompleteReply))
        return reply

    async def _complete_on(self, served: Served, request: CompleteRequest) -> CompleteReply | LlmError:
        try:
            async with served.lock:
                done = await asyncio.to_thread(
                    served.runtime.complete,
                    request.prompt,
                    max_tokens=request.max_tokens,
                    temperature=request.temperature,
                    seed=request.seed,
                )
        except (ValueError, RuntimeError) as exc:  # llama-cpp-python's words for a prompt past the context, etc.
            return LlmError(code=ErrorCode.INVALID_TASK, message=str(exc)[:4096])
        return CompleteReply(
            text=done.text,
            model_id=served.model_id,
            version=served.version,
            prompt_tokens=done.prompt_tokens,
            completion_tokens=done.completion_tokens,
            finish_reason=done.finish_reason,
        )
