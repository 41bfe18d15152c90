"""Distributed jobs spread over several workers: the job's worker recruits the others over the bus,
and every worker joins the groups it is asked to (`forseti.ranks`, schemas/ranks.py).

The job's worker picks where the group meets (its `rendezvous_host` and a free port: torch's c10d
rendezvous store runs there, inside the job's launcher) and sends one signed `forseti.ranks.join`
request per other worker needed, to the workers' queue group: one worker answers each. A worker
that takes it validates the task, reads its data under its own data root, builds the same run (a
handler's `rank_work`), answers "joined" and starts its share of the ranks through the same
launcher, pointed at the job's store. Until every other worker joined (or the rendezvous timeout
passed) the job's worker asks again; a worker that is busy, runs the job itself or took this start
of the group already says so and the next request goes to another.

Trust: a join makes the joiner connect to a store whose rendezvous state torch keeps pickled, so a
worker acts only on joins signed by its own key or one of its `peer_keys`; anything else is refused
with `forbidden`, dead-lettered and counted. A join older than `MAX_JOIN_AGE` is refused as a replay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from pydantic import ValidationError

from forseti.adapters.bus import Bus, Message
from forseti.adapters.processes import free_port
from forseti.adapters.registry import RegistryStore
from forseti.adapters.signing import Signer, TrustedKeys, refusal, seal
from forseti.schemas.catalog import RANKS
from forseti.schemas.envelope import decode, encode
from forseti.schemas.errors import BusError, ErrorCode, ForsetiError, InvalidTask
from forseti.schemas.ranks import RankJoin, RankJoined
from forseti.schemas.tasks import TASK_MODELS, TaskKind

from .context import SafePoints, Steps
from .inputs import Inputs
from .intake import Refused
from .limits import default_memory_limit
from .settings import WorkerSettings
from .slots import Slots

if TYPE_CHECKING:  # torch is imported by the jobs that use it, not when the worker starts
    from forseti.worker.handlers.training_ddp import Group, Meeting

log = logging.getLogger(__name__)

MAX_JOIN_AGE = 600.0
"""Seconds after which a join request is refused as a replay (a group waits at most its
`rendezvous_timeout`, itself at most an hour, for its workers; ten minutes covers clock skew)."""
ASK_AGAIN = 0.2
"""Seconds between join requests while workers are missing."""
ANSWER_WAIT = 30.0
"""Seconds a join request waits for its answer: the joiner reads the job's data before it says yes."""
SLOT_WAIT = 2.0
"""Seconds a join waits in line for a job slot before it says the worker is busy."""
KEPT_JOINS = 1024
"""Joins remembered per worker, so one start of a group is taken once."""


@dataclass(frozen=True)
class JoinSite:
    """Where a joining worker builds its share of a run."""

    inputs: Inputs
    """Its data root (and data key): the task's datasets are read here."""
    store: RegistryStore
    """The shared registry (a fine-tune's parent version)."""
    folder: Path
    """A folder of its own for this share, removed when the ranks end."""


@runtime_checkable
class Joinable(Protocol):
    """A handler whose distributed runs other workers can join."""

    async def rank_work(self, task: Any, run: dict[str, Any], site: JoinSite) -> tuple[Group, Callable[[Steps], Any]]:
        """The group and what each of this worker's ranks runs, for the run the
        job's worker described (`run`, as its `Recruit` was given it)."""


class JoinedRanks(SafePoints):
    """The context of ranks this worker runs for another worker's job: rank 0 is elsewhere, so there
    is nothing to report; its word stops these ranks."""

    def __init__(self, job_id: str, memory_limit: int) -> None:
        super().__init__()
        self.job_id, self.memory_limit = job_id, memory_limit

    def progress(self, fraction: float, **_: Any) -> None:
        """Rank 0 reports, on the job's worker."""

    def checkpointed(self, step: int) -> None:
        """Rank 0 checkpoints, on the job's worker."""


class RankDesk:
    """One worker's side of `forseti.ranks`: it recruits workers for its own jobs' groups and joins
    the groups other workers ask it to."""

    def __init__(
        self,
        *,
        bus: Bus,
        settings: WorkerSettings,
        store: RegistryStore,
        handlers: Mapping[TaskKind, object],
        slots: Slots,
        running: Mapping[str, object],
        signer: Signer | None,
        refuse: Callable[[Refused, bytes], Awaitable[None]],
    ) -> None:
        self.bus, self.settings, self.store, self.handlers = bus, settings, store, handlers
        self.slots, self.running, self.signer, self.refuse = slots, running, signer, refuse
        self.peers: TrustedKeys | None = settings.peers()
        """The keys whose joins this worker acts on (None: it acts on none)."""
        self.source = f"forseti/worker/{settings.worker_id}"
        self._taken: OrderedDict[tuple[str, str, int], None] = OrderedDict()
        self.joins = 0
        """Groups of other workers' jobs this worker joined since it started."""

    # -- the job's side --------------------------------------------------------------------------

    def recruiter(self, job_id: str, kind: TaskKind, task: dict[str, Any], ctx: Steps) -> Recruiter:
        """What a job's thread calls to spread its ranks over several workers."""
        return Recruiter(self, job_id, kind, task, ctx, asyncio.get_running_loop())

    async def recruit(self, join: RankJoin, timeout: float, stopped: Callable[[], bool]) -> list[str]:
        """Find a worker for each of the group's other nodes (`join` names none yet), one at a time;
        their ids. Fails the job with `rendezvous_timeout` when they do not join within `timeout`,
        and with the joiner's code when one refuses it for a reason about the job."""
        if self.signer is None:
            raise ForsetiError(
                "spreading ranks over workers takes a signing key (the other workers join signed requests "
                "only): give the workers one (forseti keys generate; --signing-key)",
                code=ErrorCode.INVALID_TASK,
            )
        deadline = time.monotonic() + timeout
        joined: list[str] = []
        for node in range(1, join.workers):
            raw = seal(
                encode(join.model_copy(update={"node": node}), source=self.source, subject=join.job_id), self.signer
            )
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or stopped():
                    raise ForsetiError(
                        f"{len(joined)} of the {join.workers - 1} other workers joined within {timeout:g}s"
                        + (f" ({', '.join(joined)})" if joined else ""),
                        code=ErrorCode.RENDEZVOUS_TIMEOUT,
                    )
                answer = await self._ask(raw, min(left, ANSWER_WAIT))
                if answer is not None and answer.joined:
                    joined.append(answer.worker_id)
                    log.info("%s: worker %s joined as node %d of %d", join.job_id, answer.worker_id, node, join.workers)
                    break
                if answer is not None and answer.code is not None:
                    refused = f"worker {answer.worker_id} refused the job's ranks: {answer.reason}"
                    raise ForsetiError(refused, code=answer.code)
                await asyncio.sleep(ASK_AGAIN)
        return joined

    async def _ask(self, raw: bytes, timeout: float) -> RankJoined | None:
        """One worker's answer to a join request; None when none came."""
        try:
            return decode(await self.bus.request(RANKS, raw, timeout=timeout), RankJoined).data
        except (BusError, InvalidTask) as exc:  # nobody answered (yet), or not in the protocol
            log.debug("join request not answered: %s", exc)
            return None

    # -- the joiner's side -----------------------------------------------------------------------

    async def on_join(self, msg: Message) -> None:
        """Answer a join request: taken (the ranks start), or why not."""
        try:
            answer = await self._consider(msg.data)
        except Exception as exc:  # a defect here must fail the job with its cause, not leave it waiting
            log.exception("join request failed")
            reason = f"the join failed on worker {self.settings.worker_id}: {exc!r}"[:4096]
            answer = RankJoined(
                joined=False, worker_id=self.settings.worker_id, code=ErrorCode.HANDLER_CRASHED, reason=reason
            )
        with contextlib.suppress(BusError):
            await msg.respond(encode(answer, source=self.source))

    async def _consider(self, raw: bytes) -> RankJoined:
        me = self.settings.worker_id
        distrust = refusal(self.peers, raw) if self.peers is not None else "this worker trusts no worker key"
        if distrust is not None:
            return await self._refused(raw, f"join refused: {distrust}")
        try:
            event = decode(raw, RankJoin)
        except InvalidTask as exc:
            return await self._refused(raw, f"join refused: {exc.message}", exc.code)
        join = event.data
        sent = event.time or datetime.min.replace(tzinfo=UTC)
        if abs((datetime.now(UTC) - sent).total_seconds()) > MAX_JOIN_AGE:
            return await self._refused(raw, f"join refused: sent at {sent.isoformat()}, too long ago (a replay?)")
        key = (join.job_id, join.host, join.port)
        handler = self.handlers.get(join.kind)
        if not isinstance(handler, Joinable):
            return self._not_now(f"it does not run distributed {join.kind.value} tasks")
        if join.job_id in self.running:
            return self._not_now("it runs the job itself")
        if key in self._taken:
            return self._not_now("it runs this group's ranks already")
        if not await self._slot():
            return self._not_now("no free slot")
        folder = self.settings.data_dir / "ranks" / f"{join.job_id}-{join.port}"
        try:
            task = TASK_MODELS[join.kind].model_validate(join.task)
            site = JoinSite(
                Inputs(self.settings.inputs_root, self.settings.keyring(), folder / "inputs"), self.store, folder
            )
            group, work = await handler.rank_work(task, join.run, site)
            if (group.world_size, group.workers) != (join.world_size, join.workers):
                raise ForsetiError(
                    f"the request's group ({join.world_size} ranks on {join.workers} workers) is not its task's "
                    f"({group.world_size} on {group.workers})",
                    code=ErrorCode.INVALID_TASK,
                )
        except (ValidationError, ForsetiError) as exc:
            self._give_back(folder)
            code = exc.code if isinstance(exc, ForsetiError) else ErrorCode.INVALID_TASK
            reason = exc.message if isinstance(exc, ForsetiError) else str(exc)
            log.warning("%s: not joining: %s", join.job_id, reason)
            return RankJoined(joined=False, worker_id=me, code=code, reason=reason[:4096])
        except BaseException:  # a defect, or the worker stopping: on_join answers it; the slot comes back
            self._give_back(folder)
            raise
        self._taken[key] = None
        while len(self._taken) > KEPT_JOINS:
            self._taken.popitem(last=False)
        self._start(join, group, work, folder)
        return RankJoined(joined=True, worker_id=me)

    def _give_back(self, folder: Path) -> None:
        """Undo a join that did not start: its slot and its folder."""
        self.slots.release()
        shutil.rmtree(folder, ignore_errors=True)

    async def _slot(self) -> bool:
        """Take a job slot, waiting in line `SLOT_WAIT` at most (an idle worker's intake holds its free
        slots through each poll, and gives them to those in line after it); False when none came."""
        try:
            return await asyncio.wait_for(self.slots.reserve(1), SLOT_WAIT) > 0
        except TimeoutError:
            return False

    def _not_now(self, reason: str) -> RankJoined:
        """This worker cannot take the join, another may: the asker asks again."""
        return RankJoined(joined=False, worker_id=self.settings.worker_id, reason=reason)

    async def _refused(self, raw: bytes, detail: str, code: ErrorCode = ErrorCode.FORBIDDEN) -> RankJoined:
        """A join nobody may make: a dead-letter record and a metric, and the reason back."""
        log.warning("%s", detail)
        await self.refuse(Refused(code, detail, None), raw)
        return RankJoined(joined=False, worker_id=self.settings.worker_id, code=code, reason=detail[:4096])

    def _start(self, join: RankJoin, group: Group, work: Callable[[Steps], Any], folder: Path) -> None:
        """Run this worker's ranks in a thread of their own until the group ends. The thread is a
        daemon: a worker that stops does not wait for another worker's job; its ranks die with it
        (`training_ddp.settle_in`) and the job's worker restarts or fails the group."""
        from forseti.worker.handlers.training_ddp import Meeting, launch

        memory = self.settings.max_job_memory_mb
        ctx = JoinedRanks(join.job_id, default_memory_limit() if memory is None else memory << 20)
        meeting = Meeting(join.host, join.port, local=self.settings.rendezvous_host, node=join.node)
        loop = asyncio.get_running_loop()
        self.joins += 1

        def run() -> None:
            try:
                launch(group, ctx, work, folder, meeting=meeting)
                log.info("%s: this worker's ranks ended", join.job_id)
            except ForsetiError as exc:
                log.warning("%s: this worker's ranks ended: %s", join.job_id, exc.message)
            except Exception:
                log.exception("%s: this worker's ranks failed", join.job_id)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
                with contextlib.suppress(RuntimeError):  # the worker's loop ended first: nothing to give back
                    loop.call_soon_threadsafe(self.slots.release)

        log.info("%s: joining as node %d at %s:%d", join.job_id, join.node, join.host, join.port)
        threading.Thread(target=run, name=f"joined-{join.job_id}", daemon=True).start()


@dataclass
class Recruiter:
    """A job's way to its desk from the job's thread (`training_ddp.Recruit`)."""

    desk: RankDesk
    job_id: str
    kind: TaskKind
    task: dict[str, Any]
    ctx: Steps
    loop: asyncio.AbstractEventLoop

    def __call__(self, group: Group, run: dict[str, Any]) -> Meeting:
        """Recruit the other workers of `group` for `run`; where the group meets (on this worker)."""
        from forseti.worker.handlers.training_ddp import Meeting

        host = self.desk.settings.rendezvous_host
        meeting = Meeting(host, free_port(host), local=host, node=0)
        join = RankJoin(
            job_id=self.job_id,
            kind=self.kind,
            task=self.task,
            run=run,
            host=host,
            port=meeting.port,
            node=1,
            world_size=group.world_size,
            workers=group.workers,
        )
        recruiting = self.desk.recruit(join, group.rendezvous_timeout, lambda: self.ctx.should_stop)
        asyncio.run_coroutine_threadsafe(recruiting, self.loop).result()
        return meeting
