"""`forseti edge`: the edge agent. Torch-free: numpy, onnxruntime and the bus client are all it needs.

It follows `forseti.models` and takes the ONNX models meant for it: those announced with its
`device_id`, those announced for one of its tags (`--tag`, the task's `device_tags`), and those
announced for neither whose kind or name it follows (`--kind`, `--name`).
Each is fetched (from the NATS object store, or a `file://` path on one host), checked against the
announced size and sha256, loaded into onnxruntime beside the version serving its name, and swapped
in with one assignment, so requests in flight finish on the model they started on. Every attempt is
reported as `forseti.model.loaded.v1` (consumer: the device id); a file that fails its digest or its
load is refused and the serving version stays. The version served before is kept loaded, so a
`forseti.model.rollback.v1` for the name returns to it at once. Requests (`forseti.infer.request.v1`,
`forseti.edge.act.v1` for policies, `forseti.llm.complete.v1` for the LLMs it follows with `--llm`,
each with the model `name` when the device serves several) are answered on
`forseti.edge.<device_id>.infer`. LLMs are GGUF files run by llama.cpp through the same service as
`forseti llm-serve` (which needs `forseti[llm]`'s llama-cpp-python, not torch).
The agent follows `forseti.models` as a durable follower named after its device (`Bus.follow`), so
announcements made while it was stopped or cut off from the bus are handled, in order, when it is
back; meanwhile it serves what it holds, and a restart serves that again from `edge-state.json`.

With `--alias`, it takes only versions promoted to that alias, and takes part in the alias's rolling
rollouts across one of its tags (`forseti.rollout.step.v1`, strategy rolling): once a step's share of
devices includes it (`device_share`), it switches to the candidate, and back when the rollout is
rolled back. Every `health_every` seconds it reports each name's requests, failures and latency per
version (`forseti.model.health.v1`), by which the workers judge the rollout.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forseti.adapters import tracing
from forseti.adapters.artifacts import fetch
from forseti.adapters.bus import Bus, Message, Subscription
from forseti.adapters.encryption import Keyring
from forseti.adapters.inference import OnnxModel, OnnxPolicy
from forseti.adapters.objects import ObjectStore
from forseti.adapters.signing import Signer, TrustedKeys, refusal, seal
from forseti.schemas.catalog import HEALTH, LOADED, MODELS, edge_channel
from forseti.schemas.envelope import Event, decode, encode
from forseti.schemas.errors import ErrorCode, ForsetiError, InvalidTask
from forseti.schemas.inference import ActReply, ActRequest, InferError, InferReply, InferRequest
from forseti.schemas.llm import CompleteReply, CompleteRequest, LlmError
from forseti.schemas.models import ModelAvailable, ModelLoaded, ModelRollback
from forseti.schemas.rollouts import ENDED, RolloutStep, ServeHealth, device_share

from .traffic import Traffic, report_every

log = logging.getLogger(__name__)


@dataclass
class Served:
    """One loaded version of a model name."""

    model_id: str
    version: str
    model: OnnxModel | OnnxPolicy
    kind: str = ""
    """The model kind (policy, classifier, ...), to reload it the same way after a restart."""


@dataclass
class Rolling:
    """A rolling rollout of one model name that this device takes part in."""

    rollout_id: str
    candidate_id: str
    baseline_id: str
    share: int = 0
    """The share of devices the rollout is at."""
    switched: bool = False
    """Whether this device serves the candidate."""
    error: str | None = None
    """Why the candidate could not be loaded here, if it could not."""


class EdgeAgent:
    """Keeps the ONNX models meant for one device loaded and answers requests for them."""

    def __init__(
        self,
        bus: Bus,
        *,
        device_id: str,
        data_dir: Path,
        tags: set[str] | None = None,
        kinds: set[str] | None = None,
        names: set[str] | None = None,
        quantization: str | None = None,
        threads: int = 1,
        llms: set[str] | None = None,
        llm_artifact: str = "q8_0",
        objects: ObjectStore | None = None,
        trusted: TrustedKeys | None = None,
        keyring: Keyring | None = None,
        alias: str | None = None,
        health_every: float = 10.0,
        signer: Signer | None = None,
    ) -> None:
        self.bus, self.device_id = bus, device_id
        self.alias = alias
        """Take only versions promoted to this alias, and its rolling rollouts (None: every version meant
        for the device)."""
        self.health_every = health_every
        """Seconds between two health reports."""
        self.signer = signer
        """Signs the health reports (workers given `replica_keys` count only signed ones)."""
        self.rollouts: dict[str, Rolling] = {}
        """The rolling rollout of each name this device takes part in."""
        self.traffic: dict[str, Traffic] = {}
        """Requests per version of each name since the last health report."""
        self._seen: dict[str, int] = {}
        self._health: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()
        self.trusted = trusted
        """The keys announcements must be signed by (None: any announcement is acted on)."""
        self.keyring = keyring
        """Decrypts artifacts stored encrypted (None: such artifacts are refused)."""
        self.objects = objects
        """The S3 store `s3://` announcements are fetched from (Kafka deployments; None: none)."""
        self.tags, self.kinds, self.names = tags or set(), kinds or set(), names or set()
        self.cache = data_dir / "fetched"
        """Where fetched artifacts are kept."""
        self.state = data_dir / "edge-state.json"
        """What each name served last, so a restart serves it again before the bus is back."""
        self.threads = threads
        self.quantization = quantization
        """Which ONNX export to take: None for the float one, int8 for the quantised one."""
        self.current: dict[str, Served] = {}
        """The version serving each model name."""
        self.previous: dict[str, Served] = {}
        """The version each name served before, kept loaded for a rollback."""
        self._swap = asyncio.Lock()
        self._subs: list[Subscription] = []
        self.llms: dict[str, Any] = {}
        """An LLM service per followed LLM name (llama.cpp; only built when asked for)."""
        if llms:
            from .llm_serve import LlmService  # llama-cpp-python is imported when a GGUF loads

            self.llms = {
                name: LlmService(
                    bus,
                    name=name,
                    consumer=device_id,
                    artifact=llm_artifact,
                    cache=self.cache,
                    answer=False,
                    threads=threads,
                    durable=f"edge-{device_id}-llm-{name}",
                    objects=objects,
                    trusted=trusted,
                    keyring=keyring,
                    alias=alias,
                    health_every=health_every,
                    signer=signer,
                )
                for name in sorted(llms)
            }

    async def start(self) -> None:
        """Serve what was served before a restart, catch up on the announcements missed while away, then
        follow the models channel and answer on the device's channel."""
        await asyncio.to_thread(self._restore)
        self._subs.append(await self.bus.follow(MODELS, self._on_model, durable=f"edge-{self.device_id}"))
        self._subs.append(await self.bus.subscribe(edge_channel(self.device_id), self._on_request))
        for service in self.llms.values():
            await service.start()
        self._stopped.clear()
        self._health = asyncio.create_task(
            report_every(self.health_every, self._stopped, self.publish_health, f"edge {self.device_id}"),
            name=f"edge {self.device_id} health",
        )

    async def stop(self) -> None:
        """Stop listening and reporting."""
        self._stopped.set()
        if self._health is not None:
            await self._health
        for sub in self._subs:
            await sub.unsubscribe()
        self._subs.clear()
        for service in self.llms.values():
            await service.stop()

    def wants(self, event: ModelAvailable) -> bool:
        """Whether an announcement is an ONNX model meant for this device: by its id, else by one of its
        tags, else (addressed to neither) by a kind or name it follows."""
        if event.format != "onnx" or event.quantization != self.quantization:
            return False
        if self.alias is not None and event.alias != self.alias:
            return False
        if event.device_id is not None:
            return event.device_id == self.device_id
        if event.device_tags:
            return not self.tags.isdisjoint(event.device_tags)
        return event.kind in self.kinds or event.name in self.names

    async def _on_model(self, msg: Message) -> None:
        try:
            event: Event[Any] = decode(msg.data)
        except InvalidTask as exc:
            log.warning("edge %s: ignoring an unreadable models event: %s", self.device_id, exc.message)
            return
        if isinstance(event.data, ModelAvailable) and self.wants(event.data):
            attributes = {"forseti.device": self.device_id, "forseti.model_id": event.data.model_id}
            with tracing.span("forseti.edge load", parent=event, kind="consumer", attributes=attributes):
                if not await self._refused(msg.data, event.data.model_id, event.data.name, event.data.version):
                    await self.load(event.data)
        elif (
            isinstance(event.data, ModelRollback)
            and event.data.name in self.current
            and not await self._refused(msg.data, event.data.model_id, event.data.name, event.data.to_version)
        ):
            await self.roll_back(event.data)
        elif (
            isinstance(event.data, RolloutStep)
            and self.takes_part(event.data)
            and not await self._refused(
                msg.data, event.data.candidate_id, event.data.name, event.data.candidate_version
            )
        ):
            await self.follow_rollout(event.data)

    def takes_part(self, step: RolloutStep) -> bool:
        """Whether a rollout's move concerns this device: a rolling rollout of its alias across one of its tags."""
        return (
            step.strategy == "rolling"
            and self.alias is not None
            and step.alias == self.alias
            and step.device_tag in self.tags
        )

    async def _refused(self, raw: bytes, model_id: str, name: str, version: str) -> bool:
        """Whether an announcement fails its signature check (reported as not loaded, nothing fetched)."""
        reason = refusal(self.trusted, raw)
        if reason is not None:
            log.warning("edge %s: %s %s refused: %s", self.device_id, name, version, reason)
            await self._report(model_id, name, version, ok=False, message=f"{ErrorCode.INVALID_MODEL.value}: {reason}")
        return reason is not None

    async def load(self, event: ModelAvailable) -> bool:
        """Fetch, check and load an announced version beside the serving one, then switch; report either way."""
        async with self._swap:
            serving = self.current.get(event.name)
            if serving is not None and serving.model_id == event.model_id:
                # a rollout that completed here already switched to it
                model: OnnxModel | OnnxPolicy | None = None
            else:
                try:
                    model = await self._open(event)
                except ForsetiError as exc:
                    log.warning("edge %s: %s %s refused: %s", self.device_id, event.name, event.version, exc.message)
                    await self._report(event.model_id, event.name, event.version, ok=False, message=exc.message)
                    return False
            if model is not None:
                self._switch(event.name, Served(event.model_id, event.version, model, event.kind))
        await self._report(event.model_id, event.name, event.version, ok=True)
        return True

    async def _open(self, event: ModelAvailable) -> OnnxModel | OnnxPolicy:
        """Fetch an announced file, check it, and load it into onnxruntime."""
        with tracing.span("forseti.edge fetch", attributes={"forseti.uri": event.uri}):
            path = await fetch(
                self.bus,
                event.uri,
                sha256=event.sha256,
                size=event.size_bytes,
                cache=self.cache,
                objects=self.objects,
                keyring=self.keyring,
            )
        with tracing.span("forseti.edge open", attributes={"forseti.kind": event.kind}):
            runtime = OnnxPolicy if event.kind == "policy" else OnnxModel
            return await asyncio.to_thread(runtime, path, threads=self.threads)

    async def follow_rollout(self, step: RolloutStep) -> None:
        """Act on a rolling rollout's move: switch to the candidate once the share includes this device,
        back to the baseline when the rollout is rolled back or aborted. Older moves are ignored."""
        if step.seq <= self._seen.get(step.rollout_id, -1):
            return
        self._seen[step.rollout_id] = step.seq
        report: tuple[bool, str] | None = None
        async with self._swap:
            rolling = self.rollouts.get(step.name)
            if rolling is not None and rolling.rollout_id != step.rollout_id:
                self._revert(step.name, rolling)  # the end of the one before was missed
                rolling = None
            if step.state in ENDED:
                if rolling is not None and step.state != "completed":
                    self._revert(step.name, rolling)
                self.rollouts.pop(step.name, None)
                log.info("edge %s: rollout %s %s: %s", self.device_id, step.rollout_id, step.state, step.reason)
                return
            if rolling is None:
                rolling = self.rollouts[step.name] = Rolling(step.rollout_id, step.candidate_id, step.baseline_id)
            rolling.share = step.share
            joins = device_share(step.rollout_id, self.device_id) < step.share
            if joins and not rolling.switched and rolling.error is None:
                report = await self._take_candidate(step, rolling)
        if report is not None:
            await self._report(step.candidate_id, step.name, step.candidate_version, ok=report[0], message=report[1])

    async def _take_candidate(self, step: RolloutStep, rolling: Rolling) -> tuple[bool, str]:
        wanted = next((a for a in step.candidates if a.format == "onnx" and a.quantization == self.quantization), None)
        try:
            if wanted is None:
                raise ForsetiError(
                    f"{step.candidate_version} has no ONNX export of this device's quantization",
                    code=ErrorCode.INVALID_MODEL,
                )
            model = await self._open(wanted)
        except ForsetiError as exc:
            log.warning("edge %s: candidate %s not loaded: %s", self.device_id, step.candidate_version, exc.message)
            rolling.error = exc.message
            return False, exc.message
        self._switch(step.name, Served(step.candidate_id, step.candidate_version, model, wanted.kind))
        rolling.switched = True
        return True, f"switched for rollout {step.rollout_id} at {step.share}% of devices"

    def _revert(self, name: str, rolling: Rolling) -> None:
        held = self.previous.get(name)
        if rolling.switched and held is not None and held.model_id == rolling.baseline_id:
            del self.previous[name]
            self._switch(name, held)

    async def publish_health(self) -> None:
        """Report, per model name served, its versions' requests since the last report."""
        for name, served in list(self.current.items()):
            rolling = self.rollouts.get(name)
            health = ServeHealth(
                consumer=self.device_id,
                name=name,
                alias=self.alias,
                serving=served.model_id,
                every_seconds=self.health_every,
                rollout_id=rolling.rollout_id if rolling else None,
                candidate=rolling.candidate_id if rolling and rolling.switched else None,
                candidate_error=rolling.error[:4096] if rolling and rolling.error else None,
                share=rolling.share if rolling else 0,
                versions=self.traffic.pop(name, Traffic()).drain(),
            )
            await self.bus.publish(HEALTH, seal(encode(health, subject=name), self.signer))

    def _switch(self, name: str, served: Served) -> None:
        old, self.current[name] = self.current.get(name), served  # one assignment: new requests use it
        if old is not None and old.model_id != served.model_id:
            self.previous[name] = old
        log.info("edge %s: %s now serves %s (%s)", self.device_id, name, served.version, served.model_id)
        self._save()

    def _save(self) -> None:
        records = {
            name: {"model_id": s.model_id, "version": s.version, "kind": s.kind, "path": str(s.model.path)}
            for name, s in self.current.items()
        }
        self.state.parent.mkdir(parents=True, exist_ok=True)
        partial = self.state.with_name(self.state.name + ".partial")
        partial.write_text(json.dumps(records, indent=1))
        partial.replace(self.state)

    def _restore(self) -> None:
        if not self.state.is_file():
            return
        for name, record in json.loads(self.state.read_text()).items():
            try:
                runtime = OnnxPolicy if record["kind"] == "policy" else OnnxModel
                model = runtime(Path(record["path"]), threads=self.threads)
            except (ForsetiError, KeyError) as exc:
                log.warning("edge %s: %s not restored: %s", self.device_id, name, exc)
                continue
            self.current[name] = Served(record["model_id"], record["version"], model, record["kind"])
            log.info("edge %s: %s serves %s again (restored)", self.device_id, name, record["version"])

    async def roll_back(self, event: ModelRollback) -> bool:
        """Return a name to the version it served before, when that is the one asked for."""
        async with self._swap:
            held = self.previous.get(event.name)
            if held is None or held.model_id != event.model_id:
                message = f"{event.to_version} ({event.model_id}) is not held here; announce it to load it"
                await self._report(event.model_id, event.name, event.to_version, ok=False, message=message)
                return False
            del self.previous[event.name]
            self._switch(event.name, held)
        await self._report(event.model_id, event.name, event.to_version, ok=True)
        return True

    async def _report(self, model_id: str, name: str, version: str, *, ok: bool, message: str = "") -> None:
        loaded = ModelLoaded(
            model_id=model_id, name=name, version=version, consumer=self.device_id, ok=ok, message=message[:4096]
        )
        await self.bus.publish(LOADED, encode(loaded, subject=model_id))

    async def _on_request(self, msg: Message) -> None:
        try:
            request: Any = decode(msg.data).data
            if isinstance(request, CompleteRequest):
                await msg.respond(encode(await self._complete(request)))
                return
            if not isinstance(request, InferRequest | ActRequest):
                raise InvalidTask(f"{type(request).__name__} is not a request an edge device answers")
            name, served = self._serving(request.name)
            reply = await self._timed(name, served, request)
        except (InvalidTask, ForsetiError) as exc:
            await msg.respond(encode(InferError(code=exc.code, message=exc.message[:4096])))
            return
        await msg.respond(encode(reply))

    async def _timed(self, name: str, served: Served, request: InferRequest | ActRequest) -> InferReply | ActReply:
        """Answer on a served version, counting the request (and whether it failed) for health reports."""
        began = time.perf_counter()
        traffic = self.traffic.setdefault(name, Traffic())
        try:
            reply = await asyncio.to_thread(self._answer, served, request)
        except ForsetiError:
            traffic.record(served.model_id, served.version, (time.perf_counter() - began) * 1000, ok=False)
            raise
        traffic.record(served.model_id, served.version, (time.perf_counter() - began) * 1000, ok=True)
        return reply

    @staticmethod
    def _answer(served: Served, request: InferRequest | ActRequest) -> InferReply | ActReply:
        model = served.model
        if isinstance(request, ActRequest) and isinstance(model, OnnxPolicy):
            actions = model.act(request.observations).tolist()
            return ActReply(actions=actions, model_id=served.model_id, version=served.version)
        if isinstance(request, InferRequest) and isinstance(model, OnnxModel):
            outputs = model.predict([dict(row) for row in request.rows])
            return InferReply(outputs=outputs, model_id=served.model_id, version=served.version, batched=1)
        wanted = "act requests" if isinstance(model, OnnxPolicy) else "infer requests"
        raise ForsetiError(f"{served.version} ({served.model_id}) answers {wanted}", code=ErrorCode.INVALID_TASK)

    async def _complete(self, request: CompleteRequest) -> CompleteReply | LlmError:
        names = sorted(self.llms)
        name = request.name or (names[0] if len(names) == 1 else None)
        service = self.llms.get(name or "")
        if service is None:
            return LlmError(
                code=ErrorCode.INVALID_MODEL, message=f"device {self.device_id} serves LLMs: {names or 'none'}"
            )
        reply: CompleteReply | LlmError = await service.complete(request)
        return reply

    def _serving(self, name: str | None) -> tuple[str, Served]:
        if name is None and len(self.current) == 1:
            return next(iter(self.current.items()))
        if name is None:
            held = ", ".join(sorted(self.current)) or "none yet"
            raise ForsetiError(f"name the model to ask (this device serves: {held})", code=ErrorCode.INVALID_TASK)
        served = self.current.get(name)
        if served is None:
            raise ForsetiError(f"device {self.device_id} serves no model {name!r}", code=ErrorCode.INVALID_MODEL)
        return name, served
