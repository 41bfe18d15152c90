"""The asyncio Worker: task intake per kind, control, capabilities, status, metrics, graceful shutdown.

    worker = Worker(bus=create_bus(url), store=create_store(path), handlers=[...], settings=WorkerSettings())
    await worker.run()          # until SIGTERM (request_stop), or until idle with settings.burst

Read it like arq's worker: `run()` starts everything, the intake loops pull one task per free slot,
`JobRunner` (jobs.py) owns each job, and `_shutdown()` stops pulling, waits a bounded time, hands
back what still runs and closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections import OrderedDict
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from forseti.adapters import tracing
from forseti.adapters.artifacts import share
from forseti.adapters.bus import Bus, Delivery, Message, Settle, Subscription, TaskIntake
from forseti.adapters.bus.base import cancel_and_wait
from forseti.adapters.objects import ObjectStore, open_object_store
from forseti.adapters.registry import RegistryStore
from forseti.adapters.signing import Signer, refusal, seal
from forseti.adapters.urls import redact
from forseti.schemas.capabilities import Capabilities, CapabilitiesError, CapabilitiesQuery
from forseti.schemas.catalog import (
    CAPABILITIES,
    CONTROL,
    DEADLETTER,
    MODELS,
    MODELS_QUERY,
    PRIVACY,
    RANKS,
    SCHEDULES,
    STATUS,
    jobs_channel,
)
from forseti.schemas.control import CancelJob, ControlCommand, PauseJob
from forseti.schemas.envelope import decode, encode
from forseti.schemas.errors import BusError, ErrorCode, ForsetiError, InvalidTask
from forseti.schemas.jobs import JobEvent, JobFailed, JobProgress, JobState, JobStatus, JobStatusError, JobStatusQuery
from forseti.schemas.models import ModelAvailable, ModelsList, ModelsQuery, ModelsQueryError, ModelSummary
from forseti.schemas.tasks import TaskKind, task_channel
from forseti.worker.rollouts.controller import RolloutController
from forseti.worker.rollouts.fleet import Fleet
from forseti.worker.schedules.desk import ScheduleDesk
from forseti.worker.schedules.firing import Scheduler

from .artifact_server import ArtifactServer
from .checkpoints import prune_ended
from .context import Handler, StopReason
from .holdings import UserData
from .http import MetricsServer
from .intake import KIND_OF_CHANNEL, OWNED_CHANNELS, Refused, read_stray, read_task
from .isolation import ChildPool
from .jobs import JobRunner, JobServices, load_result
from .logs import job_id_var
from .metrics import MeteredBus, Metrics
from .models import version_label
from .privacy import PrivacyDesk
from .ranks import RankDesk
from .settings import WorkerSettings
from .slots import Slots

log = logging.getLogger(__name__)

EARLY_CANCELS_KEPT = 10_000
STRAYS_PER_SWEEP = 100
"""Stray tasks read per round trip of a sweep; a sweep goes on until it finds fewer."""
BUS_PROBE_INTERVAL = 1.0
"""Seconds between checks that the bus's server answers, which /healthz reports."""
NOT_MINE_GRACE = 0.5
"""Seconds a worker waits before saying it cannot serve a query (an unknown job, a kind it does not
run), so that a worker that can is the first to answer."""


def may_act(owner: str | None, asker: str | None, *, operator: bool = False) -> bool:
    """Whether `asker` may control or read a job whose task named `owner` (a job with no owner
    is anyone's; an operator may act on every job)."""
    return operator or owner is None or asker == owner


DISTRIBUTION = "forseti-worker"
"""Forseti's name on the package index (`forseti` there is another project)."""


def forseti_version() -> str:
    """The installed Forseti version."""
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return "0+unknown"


def detect_devices() -> list[str]:
    """`cpu`, plus `cuda:N` per GPU: counted by torch when a handler has loaded it, else from the NVIDIA
    driver's /proc entries (importing torch only to answer a query would take seconds)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        count = int(torch.cuda.device_count())
    else:
        gpus = Path("/proc/driver/nvidia/gpus")
        count = len(list(gpus.iterdir())) if gpus.is_dir() else 0
    return ["cpu", *(f"cuda:{i}" for i in range(count))]


async def _all_done(tasks: Sequence[asyncio.Task[None]]) -> None:
    await asyncio.gather(*tasks)


class Worker:
    """Consumes `forseti.tasks.<kind>` for each registered handler and runs the jobs."""

    def __init__(
        self,
        *,
        bus: Bus,
        store: RegistryStore,
        handlers: Sequence[Handler],
        settings: WorkerSettings | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings or WorkerSettings()
        self.metrics = metrics or Metrics()
        self.bus = MeteredBus(bus, self.metrics)
        self.store = store
        self.handlers: dict[TaskKind, Handler] = {}
        for handler in handlers:
            if handler.kind in self.handlers:
                raise ValueError(f"two handlers for task kind {handler.kind.value!r}")
            self.handlers[handler.kind] = handler
        self.metrics.start_at_zero([kind.value for kind in self.handlers])
        self.running: dict[str, JobRunner] = {}
        self.ready = asyncio.Event()
        """Set once the worker is subscribed and pulling tasks."""
        self._stopping = asyncio.Event()
        self._jobs: set[asyncio.Task[None]] = set()
        self._late_replies: set[asyncio.Task[None]] = set()
        self._slots = Slots(self.settings.concurrency)
        self._early_cancels: OrderedDict[str, tuple[str, str | None, bool]] = OrderedDict()
        """Cancels of jobs not running here, by job id: (reason, the user who asked, by an operator)."""
        self._subs: list[Subscription] = []
        self._intakes: list[TaskIntake] = []
        self._bus_ok = False
        self._devices: list[str] | None = None
        self._http: MetricsServer | None = None
        self._artifacts: ArtifactServer | None = None
        self.objects: ObjectStore | None = None
        """Where checkpoints are shared with the other workers (None: local disk only)."""
        self._pruning: asyncio.Task[None] | None = None
        self._probe: asyncio.Task[None] | None = None
        self._sweep: asyncio.Task[None] | None = None
        self._scheduler: asyncio.Task[None] | None = None
        self._rollouts: asyncio.Task[None] | None = None
        self._bus_reachable = True
        self._job_services: JobServices | None = None
        self._ranks: RankDesk | None = None
        """Recruits workers for this worker's distributed jobs, and joins theirs (set by run())."""
        key = self.settings.signing_key_path
        self.signer = Signer.from_file(key) if key is not None else None
        """Signs model announcements (None: they go out unsigned)."""
        self.operators = self.settings.operators()
        """The keys whose signature makes a request an operator's (None: no operator)."""
        self.keyring = self.settings.keyring()
        """Encrypts what goes into shared stores: announced artifacts, checkpoints (None: nothing)."""
        self._pool = (
            ChildPool(size=self.settings.concurrency, stop_grace=self.settings.stop_grace)
            if self.settings.isolation == "process"
            else None
        )

    # -- lifecycle -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, serve until asked to stop (or idle in burst mode), then shut down gracefully."""
        if self.settings.otlp_endpoint:
            tracing.configure("forseti-worker", self.settings.otlp_endpoint, sample=self.settings.trace_sample)
        if not await self._connect():
            return
        try:
            # the transport itself: the metering wrapper holds no objects
            self.objects = open_object_store(self.settings.object_store_url, self.bus.inner)
            if self.objects is not None:
                self._pruning = asyncio.create_task(self._prune_checkpoints(self.objects), name="prune-checkpoints")
            self._ranks = RankDesk(
                bus=self.bus,
                settings=self.settings,
                store=self.store,
                handlers=self.handlers,
                slots=self._slots,
                running=self.running,
                signer=self.signer,
                refuse=self._refuse_join,
            )
            self._job_services = self._make_services()
            data = UserData(
                settings=self.settings,
                store=self.store,
                bus=self.bus,
                transport=self.bus.inner,  # the metering wrapper holds no objects nor history
                objects=self.objects,
                keyring=self.keyring,
            )
            privacy = PrivacyDesk(data, operators=self.operators, refused=self.metrics.refused)
            await self._start_http()
            if self.settings.artifact_port is not None:
                self._artifacts = ArtifactServer(
                    self.settings.data_dir / "artifacts",
                    host=self.settings.artifact_host,
                    port=self.settings.artifact_port,
                    advertise=self.settings.artifact_advertise,
                )
                await self._artifacts.start()
            self._subs = [
                await self.bus.subscribe(CONTROL, self._on_control),
                await self.bus.subscribe(CAPABILITIES, self._on_capabilities),
                await self.bus.subscribe(STATUS, self._on_status),
                await self.bus.subscribe(MODELS_QUERY, self._on_models_query),
                await self.bus.subscribe(PRIVACY, privacy.on_request),
                await self.bus.subscribe(RANKS, self._ranks.on_join, queue=f"{self.settings.group}-ranks"),
                await self.bus.on_given_up(self._on_given_up, group=self.settings.group),
            ]
            loops = []
            for kind in self.handlers:
                intake = await self.bus.intake(task_channel(kind), group=self.settings.group)
                self._intakes.append(intake)
                loops.append(asyncio.create_task(self._intake_loop(kind, intake), name=f"intake-{kind.value}"))
            self._bus_ok = True
            self._probe = asyncio.create_task(self._probe_bus(), name="probe-bus")
            self._sweep = asyncio.create_task(self._sweep_strays(), name="sweep-strays")
            fleet = Fleet(metrics=self.metrics, trusted=self.settings.replicas())
            if self.settings.schedules or self.settings.rollouts:
                self._subs.append(await fleet.follow(self.bus))
            if self.settings.schedules:
                await self._start_schedules(fleet)
            if self.settings.rollouts:
                controller = RolloutController(
                    self.bus,
                    self.store,
                    fleet,
                    metrics=self.metrics,
                    signer=self.signer,
                    poll=self.settings.rollout_poll,
                )
                self._rollouts = asyncio.create_task(controller.run(self._stopping), name="rollouts")
            self.ready.set()
            log.info(
                "worker %s pulling %s on %s (concurrency %d, registry %s, announcements %s)",
                self.settings.worker_id,
                ", ".join(k.value for k in self.handlers) or "no task kinds",
                redact(self.bus.url),
                self.settings.concurrency,
                redact(self.settings.registry),
                f"signed by key {self.signer.key_id}" if self.signer else "unsigned",
            )
            if self.keyring is not None:
                log.info("shared artifacts and checkpoints are encrypted under key %s", self.keyring.key_id)
            ends: list[asyncio.Task[Any]] = [asyncio.create_task(self._stopping.wait())]
            if self.settings.burst:
                ends.append(asyncio.create_task(_all_done(loops)))
            await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
            for end in ends:
                end.cancel()
            self.request_stop()
            await asyncio.gather(*loops, return_exceptions=True)
            await self._shutdown()
        finally:
            await self._close()

    async def _connect(self) -> bool:
        """Open the registry and the bus; False when asked to stop first. A bus that does not answer
        is tried until its `connect_timeout`, and a SIGTERM or Ctrl-C meanwhile ends the wait now."""
        opening = asyncio.create_task(self._open())
        stopping = asyncio.create_task(self._stopping.wait())
        await asyncio.wait([opening, stopping], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not opening.done():
            await cancel_and_wait(opening)
            await self.bus.close()
            await self.store.close()
            log.info("worker %s stopped before its bus %s answered", self.settings.worker_id, redact(self.bus.url))
            return False
        opening.result()
        return True

    async def _open(self) -> None:
        await self.store.open()
        try:
            await self.bus.connect()
        except BaseException:
            await self.store.close()
            raise

    def request_stop(self) -> None:
        """Stop pulling and shut down (what SIGTERM calls)."""
        self._stopping.set()
        self._slots.close()

    async def _shutdown(self) -> None:
        if self._jobs:
            log.info("waiting up to %.0fs for %d running job(s)", self.settings.shutdown_grace, len(self._jobs))
            await asyncio.wait(self._jobs, timeout=self.settings.shutdown_grace)
        if self._jobs:
            for runner in list(self.running.values()):
                if runner.ctx is not None:
                    runner.ctx.request_stop(StopReason.SHUTDOWN, "worker shutting down")
            await asyncio.wait(self._jobs, timeout=max(5.0, self.settings.shutdown_grace))
        for task in list(self._jobs):  # stuck past every bound: leave it unsettled, the bus redelivers
            log.warning("a job did not stop in time; its task goes back to the bus")
            task.cancel()

    async def _prune_checkpoints(self, objects: ObjectStore) -> None:
        try:
            removed = await prune_ended(objects, self.store)
        except ForsetiError as exc:
            log.warning("checkpoints of ended jobs not pruned: %s", exc.message)
            return
        if removed:
            log.info("removed %d checkpoint(s) of jobs that had ended", removed)

    async def _probe_bus(self) -> None:
        """Ask the bus whether its server answers, for /healthz: an intake whose server is away sees
        only empty fetches while its client reconnects, so health answered 200 through a whole outage."""
        while not self._stopping.is_set():
            reachable = await self.bus.reachable()
            if reachable != self._bus_reachable:
                level, state = (logging.INFO, "answers again") if reachable else (logging.WARNING, "does not answer")
                log.log(level, "the bus at %s %s", redact(self.bus.url), state)
            self._bus_reachable = reachable
            await self._sleep_unless_stopping(BUS_PROBE_INTERVAL)

    async def _sweep_strays(self) -> None:
        """Dead-letter the tasks stored on channels that no kind owns, every `stray_sweep_interval`:
        nobody takes them, so the bus kept them (and their bytes) for ever."""
        while not self._stopping.is_set():
            try:
                strays = await self.bus.take_strays(OWNED_CHANNELS, STRAYS_PER_SWEEP)
            except BusError as exc:
                log.warning("stray tasks not swept: %s", exc)
                strays = []
            for delivery in strays:
                refused, kind = read_stray(delivery.data, delivery.channel, max_bytes=self.settings.max_task_bytes)
                await self._refuse(delivery, kind, refused)
            # a full round that removed them all may have more behind it; one that left some (the
            # dead-letter channel refused them) must not read the same ones again at once
            if sum(1 for d in strays if d.settled is Settle.TERM) < STRAYS_PER_SWEEP:
                await self._sleep_unless_stopping(self.settings.stray_sweep_interval)

    async def _close(self) -> None:
        for background in (
            self._pruning,
            self._probe,
            self._sweep,
            self._scheduler,
            self._rollouts,
            *self._late_replies,
        ):
            if background is not None:
                background.cancel()
        for sub in self._subs:
            await sub.unsubscribe()
        for intake in self._intakes:
            await intake.close()
        if self._http is not None:
            await self._http.close()
        if self._artifacts is not None:
            await self._artifacts.close()
        if self._pool is not None:
            await asyncio.to_thread(self._pool.close)
        await self.bus.close()
        await self.store.close()
        if self.settings.otlp_endpoint:
            tracing.disable()
        log.info("worker %s stopped", self.settings.worker_id)

    async def _start_schedules(self, fleet: Fleet) -> None:
        """Answer schedule requests (one worker of the group each) and fire schedules (every worker)."""
        scheduler = Scheduler(
            bus=self.bus,
            store=self.store,
            metrics=self.metrics,
            source=self._source,
            poll=self.settings.schedule_poll,
            fleet=fleet,
        )
        desk = ScheduleDesk(self.store, source=self._source, by_operator=self._by_operator, changed=scheduler.wake)
        queue = f"{self.settings.group}-schedules"
        self._subs.append(await self.bus.subscribe(SCHEDULES, desk.on_request, queue=queue))
        self._scheduler = asyncio.create_task(scheduler.run(self._stopping), name="schedules")

    async def _start_http(self) -> None:
        if self.settings.metrics_port is None:
            return
        self._http = MetricsServer(
            self.metrics.registry, self.health, host=self.settings.metrics_host, port=self.settings.metrics_port
        )
        await self._http.start()

    def health(self) -> tuple[bool, dict[str, object]]:
        """Healthy while pulling tasks with a working bus."""
        bus_ok = self._bus_ok and self._bus_reachable
        ok = self.ready.is_set() and bus_ok and not self._stopping.is_set()
        return ok, {
            "worker": self.settings.worker_id,
            "bus": redact(self.bus.url),
            "bus_ok": bus_ok,
            "registry": redact(self.settings.registry),
            "object_store": self.objects.location if self.objects is not None else None,
            "running_jobs": len(self.running),
            "stopping": self._stopping.is_set(),
        }

    @property
    def metrics_port(self) -> int | None:
        """The port /metrics is served on, once started."""
        return self._http.port if self._http else None

    # -- intake ----------------------------------------------------------------------------------

    async def _intake_loop(self, kind: TaskKind, intake: TaskIntake) -> None:
        # Slots are taken for what is ready, never held through a poll: a kind that waited on an
        # empty channel with a slot kept it from the kinds that had work (at concurrency 1, a 42 ms
        # job took 3 s). With no slot free, a kind still looks ahead by one task and waits for a
        # slot with it in hand. Each kind takes a share of the free slots per round trip, so one
        # busy kind cannot take every slot at once.
        share = max(1, self.settings.concurrency // len(self.handlers))
        while not self._stopping.is_set():
            reserved = self._slots.try_reserve(share)
            try:
                deliveries = await intake.take(max(reserved, 1), self.settings.poll_interval)
            except BusError as exc:
                self._slots.release(reserved)
                self._bus_ok = False
                log.warning("intake %s: %s; retrying", kind.value, exc)
                await self._sleep_unless_stopping(1.0)
                continue
            except Exception:  # an intake loop that died would leave a healthy-looking worker idle
                self._slots.release(reserved)
                log.exception("intake %s failed unexpectedly; retrying", kind.value)
                await self._sleep_unless_stopping(1.0)
                continue
            except BaseException:
                self._slots.release(reserved)
                raise
            self._bus_ok = True
            if len(deliveries) > reserved:  # the task taken ahead: it starts once a slot is free
                if not await self._slot_for(deliveries[reserved]):
                    await self._nak_quietly(deliveries[reserved], delay=0.0)
                    deliveries = deliveries[:reserved]
            else:
                self._slots.release(reserved - len(deliveries))
            if not deliveries and self.settings.burst and not self._jobs:
                return
            for delivery in deliveries:
                self.metrics.tasks_received.labels(kind.value).inc()
                job = asyncio.create_task(self._handle(kind, delivery))
                self._jobs.add(job)
                job.add_done_callback(self._job_done)

    async def _slot_for(self, delivery: Delivery) -> bool:
        """Wait in line for a slot for a task already taken, telling the bus it is still in hand;
        False when the worker stops first."""
        waiting = asyncio.create_task(self._slots.reserve(1))
        while not waiting.done():
            await asyncio.wait([waiting], timeout=self.settings.heartbeat_interval)
            if not waiting.done():
                try:
                    await delivery.in_progress()
                except BusError as exc:
                    log.debug("task waiting for a slot not kept alive: %s", exc)
        return waiting.result() > 0

    def _job_done(self, job: asyncio.Task[None]) -> None:
        self._jobs.discard(job)
        self._slots.release()

    async def _sleep_unless_stopping(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            return

    async def _handle(self, kind: TaskKind, delivery: Delivery) -> None:
        """Read a delivery of `kind` and run its job, or refuse it; hand it back when the registry or
        the bus failed around the job."""
        verdict = read_task(delivery.data, kind, max_bytes=self.settings.max_task_bytes)
        if isinstance(verdict, Refused):
            await self._refuse(delivery, kind, verdict)
            return
        job_id_var.set(verdict.job_id)
        try:
            assert self._job_services is not None, "tasks are taken only once run() has started"
            # a task the bus gave up on may be of a kind this worker does not run: it is not run here
            await JobRunner(self._job_services, delivery, verdict, self.handlers.get(kind)).run()
        except ForsetiError as exc:  # the store or the bus failed around the job: try again later
            log.warning("job could not be run: %s; handing it back", exc)
            await self._nak_quietly(delivery)
        except Exception:
            log.exception("job could not be run; handing it back")
            await self._nak_quietly(delivery)

    async def _on_given_up(self, delivery: Delivery) -> None:
        """A task the bus stopped delivering: its job goes through the claim like any delivery (a job
        that ended replays its outcome, one whose lease is live gets the task stored again, as a
        copy it may need), and otherwise is dead-lettered and failed as `retries_exhausted`. Any
        worker of the group does this, whether or not it runs the task's kind."""
        kind = KIND_OF_CHANNEL.get(delivery.channel)
        if kind is None:
            refused, stray_kind = read_stray(delivery.data, delivery.channel, max_bytes=self.settings.max_task_bytes)
            await self._refuse(delivery, stray_kind, refused)
        else:  # a hand-back when the registry is away stores the task again: it is not left stranded
            await self._handle(kind, delivery)

    async def _nak_quietly(self, delivery: Delivery, *, delay: float | None = None) -> None:
        try:
            await delivery.nak(self.settings.retry_delay if delay is None else delay)
        except BusError as exc:
            log.warning("could not hand the task back (%s); the bus redelivers it after ack_wait", exc)

    async def _refuse(self, delivery: Delivery, kind: TaskKind | None, refused: Refused) -> None:
        """Dead-letter an invalid task, fail its job where an id (and a kind) could be read and no job
        holds that id already, and drop it."""
        log.warning("refused a task on %s: %s: %s", delivery.channel, refused.reason.value, refused.detail)
        try:
            # anyone may publish a bad task under another job's id: that job's channel hears nothing of it
            taken = refused.job_id is not None and await self.store.get_job(refused.job_id) is not None
        except ForsetiError as exc:
            log.warning("refused task not checked against the registry (%s); handing it back", exc)
            await self._nak_quietly(delivery)
            return
        try:
            await self.dead_letter(refused, delivery.data, channel=delivery.channel)
            if refused.job_id is not None and kind is not None and not taken:
                await self.publish_job(
                    JobFailed(
                        job_id=refused.job_id,
                        kind=kind,
                        code=ErrorCode.INVALID_TASK,
                        message=f"{refused.reason.value}: {refused.detail}"[:4096],
                    )
                )
        except BusError as exc:
            log.warning("dead-letter not recorded (%s); handing the task back", exc)
            await self._nak_quietly(delivery)
            return
        await delivery.term()

    async def dead_letter(self, refused: Refused, raw: bytes, *, channel: str) -> None:
        """Publish a `forseti.deadletter.v1` record."""
        record = refused.dead_letter(
            raw, channel=channel, worker=self.settings.worker_id, limit=self.settings.max_task_bytes
        )
        await self.bus.publish(DEADLETTER, encode(record, source=self._source))
        self.metrics.deadletters.labels(refused.reason.value).inc()

    # -- events out ------------------------------------------------------------------------------

    @property
    def _source(self) -> str:
        return f"forseti/worker/{self.settings.worker_id}"

    async def publish_job(self, event: JobEvent) -> None:
        """Publish a job event on `forseti.jobs.<job_id>`."""
        await self.bus.publish(jobs_channel(event.job_id), encode(event, source=self._source, subject=event.job_id))

    def _make_services(self) -> JobServices:
        """What every job of this worker is given (after run() opened the object store)."""
        return JobServices(
            settings=self.settings,
            store=self.store,
            metrics=self.metrics,
            events=self,
            bus=self.bus,
            objects=self.objects,
            running=self.running,
            early_cancel=self.take_early_cancel,
            pool=self._pool,
            keyring=self.keyring,
            ranks=self._ranks,
        )

    async def announce_model(self, event: ModelAvailable, job_id: str) -> None:
        """Publish `forseti.model.available.v1` (JobEvents), its files first put where other hosts can
        fetch them (the bus's object store on NATS, the S3 object store on Kafka)."""
        served = self._artifacts
        http = (served.root, served.base_url) if served is not None else None
        # the transport itself: the metering wrapper holds no objects
        event = await share(self.bus.inner, event, objects=self.objects, http=http, keyring=self.keyring)
        await self.bus.publish(MODELS, seal(encode(event, source=self._source, subject=job_id), self.signer))

    def take_early_cancel(self, job_id: str, owner: str | None) -> str | None:
        """The reason of a cancel that arrived before the job did, consumed once; None also when
        it came from someone other than the job's `owner`."""
        early = self._early_cancels.pop(job_id, None)
        if early is None:
            return None
        reason, asker, operator = early
        if not may_act(owner, asker, operator=operator):
            log.warning("a cancel of job %s by user %r, which is not its owner, was dropped", job_id, asker)
            self.metrics.refused.labels("control").inc()
            return None
        return reason

    # -- requests and control --------------------------------------------------------------------

    async def _on_control(self, msg: Message) -> None:
        try:
            command = decode(msg.data, expect=ControlCommand).data
        except InvalidTask as exc:
            log.warning("refused a control message: %s", exc.message)
            await self.dead_letter(Refused(exc.code, exc.message, None), msg.data, channel=CONTROL)
            return
        runner = self.running.get(command.job_id)
        operator = self._by_operator(msg.data)
        if runner is not None and not may_act(runner.accepted.task.user_id, command.user_id, operator=operator):
            await self._forbid(msg, command.job_id, f"{type(command).__name__} by user {command.user_id!r}")
            return
        if isinstance(command, CancelJob):
            if runner is None or runner.ctx is None:
                reason = command.reason or "cancelled before it started"
                self._early_cancels[command.job_id] = (reason, command.user_id, operator)
                while len(self._early_cancels) > EARLY_CANCELS_KEPT:
                    self._early_cancels.popitem(last=False)
                return
            runner.ctx.request_stop(StopReason.CANCEL, command.reason or "cancelled on request")
        elif runner is not None and runner.ctx is not None:
            paused = isinstance(command, PauseJob)
            (runner.ctx.pause if paused else runner.ctx.resume)()
            state = JobState.PAUSED if paused else JobState.RUNNING
            await runner.set_state(state)
            runner.progress(
                JobProgress(
                    job_id=command.job_id,
                    kind=runner.kind,
                    state=state,
                    fraction=0.0,
                    message="paused" if paused else "resumed",
                )
            )
        else:
            log.debug("control for job %s, which does not run here", command.job_id)

    def _by_operator(self, raw: bytes) -> bool:
        """Whether an event is signed by one of the operators' keys (which may act on any job)."""
        return self.operators is not None and refusal(self.operators, raw) is None

    async def _forbid(self, msg: Message, job_id: str, what: str) -> None:
        """Refuse a control event from someone other than the job's owner: a dead-letter record
        (reason `forbidden`) and the refused-requests metric; nothing on the job's channel."""
        detail = f"{what} refused: job {job_id} belongs to another user"
        log.warning("%s", detail)
        self.metrics.refused.labels("control").inc()
        try:
            await self.dead_letter(Refused(ErrorCode.FORBIDDEN, detail, job_id), msg.data, channel=CONTROL)
        except BusError as exc:
            log.warning("dead-letter not recorded: %s", exc)

    async def _refuse_join(self, refused: Refused, raw: bytes) -> None:
        """A join request this worker may not act on: a dead-letter record and the refused-requests metric."""
        self.metrics.refused.labels("ranks").inc()
        try:
            await self.dead_letter(refused, raw, channel=RANKS)
        except BusError as exc:
            log.warning("dead-letter not recorded: %s", exc)

    async def _answer_later(self, msg: Message, reply: bytes) -> None:
        """Answer a query this worker cannot serve, after `NOT_MINE_GRACE`: the first reply ends a
        request, and a worker that can serve it (knows the job, runs the kind) answers sooner."""

        async def late() -> None:
            await asyncio.sleep(NOT_MINE_GRACE)
            with contextlib.suppress(BusError):
                await msg.respond(reply)

        task = asyncio.create_task(late(), name="late-reply")
        self._late_replies.add(task)
        task.add_done_callback(self._late_replies.discard)

    async def _on_capabilities(self, msg: Message) -> None:
        query = CapabilitiesQuery()
        if msg.data:
            try:
                query = decode(msg.data, expect=CapabilitiesQuery).data
            except InvalidTask as exc:
                log.warning("bad capabilities query: %s", exc.message)
                refusal = CapabilitiesError(code=exc.code, message=exc.message, worker=self.settings.worker_id)
                await msg.respond(encode(refusal, source=self._source))
                return
        if query.kind is not None and query.kind not in self.handlers:
            runs = ", ".join(k.value for k in self.handlers) or "no task kinds"
            refusal = CapabilitiesError(
                code=ErrorCode.UNKNOWN_KIND,
                message=f"worker {self.settings.worker_id} runs no {query.kind.value} tasks (it runs {runs})",
                worker=self.settings.worker_id,
            )
            await self._answer_later(msg, encode(refusal, source=self._source))
            return
        if self._devices is None:
            self._devices = detect_devices()
        # two handlers export the same format (onnx): one entry per capability
        caps = list({(c.area, c.name): c for h in self.handlers.values() for c in h.capabilities()}.values())
        answer = Capabilities(
            worker=self.settings.worker_id,
            version=forseti_version(),
            task_kinds=list(self.handlers),
            capabilities=caps,
            devices=self._devices,
            concurrency=self.settings.concurrency,
            running_jobs=len(self.running),
        )
        await msg.respond(encode(answer, source=self._source))

    async def _on_models_query(self, msg: Message) -> None:
        try:
            query = decode(msg.data, expect=ModelsQuery).data
        except InvalidTask as exc:
            await msg.respond(encode(ModelsQueryError(code=exc.code, message=exc.message), source=self._source))
            return
        rows = await self.store.list_models(name=query.name, limit=query.limit)
        summaries = [
            ModelSummary(
                model_id=row.id,
                name=row.name,
                version=version_label(row),
                kind=row.model_type,
                format=row.export_format,
                metrics=row.metrics,
                parent_id=row.parent_id,
                created_at=row.created_at,
            )
            for row in rows
        ]
        await msg.respond(encode(ModelsList(worker=self.settings.worker_id, models=summaries), source=self._source))

    async def _on_status(self, msg: Message) -> None:
        try:
            query = decode(msg.data, expect=JobStatusQuery).data
        except InvalidTask as exc:
            log.warning("bad status query: %s", exc.message)
            await msg.respond(encode(JobStatusError(code=exc.code, message=exc.message), source=self._source))
            return
        job = await self.store.get_job(query.job_id)
        if job is None:
            unknown = JobStatusError(
                code=ErrorCode.UNKNOWN_JOB,
                message=f"no job {query.job_id} in the registry: never submitted, or still waiting for a worker",
                job_id=query.job_id,
            )
            await self._answer_later(msg, encode(unknown, source=self._source, subject=query.job_id))
            return
        shown = may_act(job.task.get("user_id"), query.user_id, operator=self._by_operator(msg.data))
        if not shown:
            self.metrics.refused.labels("status").inc()
        status = JobStatus(
            job_id=job.job_id,
            kind=job.kind,
            state=job.state,
            attempt=job.attempt,
            error_code=job.error_code,
            error_message=job.error_message if shown else None,
            result=load_result(job.result) if job.result and shown else None,
            created_at=job.created_at,
            updated_at=job.updated_at,
            worker=job.worker,
            lease_expires_at=job.lease_expires_at,
            orphaned=job.orphaned(),
            withheld=not shown,
        )
        await msg.respond(encode(status, source=self._source, subject=job.job_id))
