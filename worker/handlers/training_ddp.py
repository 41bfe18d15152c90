"""Data-parallel training: one job's network (or LoRA adapter) trained by `world_size` ranks, each
taking an equal share of every batch, with torch.distributed.

The job's work is the agent: it starts the ranks through torch's elastic launcher (the machinery
behind `torchrun`: a c10d rendezvous keyed by the job id, gloo on the CPU, NCCL on GPUs), each rank
a process of this host; a group spread over several workers meets at the job's worker, whose
recruiter (`engine/ranks.py`) found the others, and each worker's launcher starts its own share.
Rank 0, always on the job's own worker, owns the job's side of the run: its progress and
checkpoints come to the agent over a queue and go out as the job's; the other ranks only train,
and read rank 0's checkpoint through the group's store when the group starts. Pause and stop come
down through shared flags that rank 0 reads at each epoch and passes on to the others. A rank that
dies makes the launchers start the whole group again, up to `max_restarts` times, and every rank
resumes from the last checkpoint; past that the job fails with `handler_crashed`, naming the rank
and why. Ranks that cannot find each other within `rendezvous_timeout` fail the job with
`rendezvous_timeout`.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import logging
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch._C._distributed_c10d import PrefixStore, Store, TCPStore

from forseti.adapters.processes import free_port
from forseti.schemas.errors import ErrorCode, ForsetiError
from forseti.schemas.tasks import Distribution
from forseti.worker.engine.context import JobStopped, SafePoints, Steps, StopReason

log = logging.getLogger(__name__)

RUNNING, PAUSED, STOPPING = 0, 1, 2
"""What the agent tells rank 0 through the shared state flag."""
STOP, GO, HOLD = 0, 1, 2
"""What rank 0 tells the others before each epoch."""
POLL_SECONDS = 0.2
"""How often the agent looks at the job (paused, stopped) while it relays."""
STARTS = "group-starts"
"""The file in the job's folder where rank 0 counts the group's starts (`launch` clears it)."""
_reads = itertools.count()
"""Numbers the files rank 0 hands the others (`Rank.read`), alike on every rank."""


class Rank:
    """This process's place in a distributed run (rank 0 of 1 outside one)."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, *, cuda: bool = False) -> None:
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        """Where this rank's own collectives keep their tensors: NCCL takes GPU tensors only."""

    @classmethod
    def current(cls) -> Rank:
        """The rank of the process group this process belongs to, if any."""
        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return cls(dist.get_rank(), dist.get_world_size(), local_rank, cuda=dist.get_backend() == "nccl")

    @property
    def lead(self) -> bool:
        """Rank 0: it reports, checkpoints and decides when the run ends."""
        return self.rank == 0

    @property
    def shard(self) -> tuple[int, int]:
        """(rank, world size): which share of each batch this rank takes."""
        return self.rank, self.world_size

    def wrap(self, network: nn.Module, device: torch.device) -> nn.Module:
        """The network as this rank trains it: under DistributedDataParallel when there are others."""
        if self.world_size == 1:
            return network
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(network, device_ids=ids)

    def go_on(self, ctx: Steps, *, more: bool) -> bool:
        """Whether every rank trains another epoch: rank 0 decides (`more`, unless the job was stopped:
        then it raises JobStopped, after telling the others) and says so; the others hear it and
        ignore their own `more`. While the job is paused rank 0 tells them to hold, every
        `POLL_SECONDS`, so that no rank waits on a collective long enough to time out."""
        if self.world_size == 1:
            if more:
                ctx.check()
            return more
        if not self.lead:
            while (word := self._say(HOLD)) == HOLD:
                pass
            return word == GO
        while more and ctx.paused and not ctx.should_stop:
            self._say(HOLD)
            time.sleep(POLL_SECONDS)
        if more and ctx.should_stop:
            self._say(STOP)
            ctx.check()  # raises JobStopped
        return self._say(GO if more else STOP) == GO

    def _say(self, word: int) -> int:
        """Rank 0's word to the others (theirs is ignored), as every rank hears it."""
        flag = torch.tensor([float(word)], device=self.device)
        dist.broadcast(flag, src=0)
        return int(flag.item())

    def unsynchronised(self, model: nn.Module) -> contextlib.AbstractContextManager[Any]:
        """A context in which `model`'s backward passes leave the gradients on this rank: for work
        every rank does alike (DistributedDataParallel.no_sync)."""
        no_sync = getattr(model, "no_sync", None)
        return no_sync() if no_sync is not None else contextlib.nullcontext()

    def read(self, path: Path) -> bytes | None:
        """Rank 0's copy of the file at `path` (None when it has none), as every rank reads it: it
        travels through the group's store, as the other ranks may run on hosts that lack it (a
        checkpoint only rank 0 writes). Every rank calls this alike, in the same order."""
        if self.world_size == 1 or _group_store is None:  # alone, or ranks started by a bare torchrun
            return path.read_bytes() if path.exists() else None
        key = f"file-{next(_reads)}"
        if self.lead:
            data = b"\x01" + path.read_bytes() if path.exists() else b"\x00"
            _group_store.set(key, data)  # type: ignore[arg-type]  # the binding takes bytes (a C++ string)
        data = bytes(_group_store.get(key))
        return data[1:] if data[:1] == b"\x01" else None

    def add_gradients(self, params: list[nn.Parameter], *figures: float) -> list[float]:
        """Sum every rank's gradients of `params` into each rank's, and the `figures` given with them
        (one all-reduce of one flat buffer: for a small set of parameters, a LoRA adapter's, where
        DistributedDataParallel's buckets buy nothing); the figures summed."""
        if self.world_size == 1:
            return list(figures)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        extra = torch.tensor(figures, dtype=grads[0].dtype, device=grads[0].device)
        flat = torch.cat([*(g.reshape(-1) for g in grads), extra])
        dist.all_reduce(flat)
        offset = 0
        for param in params:
            param.grad = flat[offset : offset + param.numel()].view_as(param).clone()
            offset += param.numel()
        return [float(v) for v in flat[offset:]]

    def total(self, value: torch.Tensor) -> torch.Tensor:
        """`value` summed over every rank."""
        if self.world_size > 1:
            dist.all_reduce(value)
        return value


class RankContext(SafePoints):
    """What a rank's training sees of its job: rank 0's progress and checkpoints go to the agent; the
    job's pause and stop come from the agent's shared flag."""

    def __init__(self, messages: Any, state: Any, memory_limit: int, job_id: str, restarts: int = 0) -> None:
        super().__init__()
        self.messages, self.state, self.memory_limit, self.job_id = messages, state, memory_limit, job_id
        self.restarts = restarts
        """Times the group was started again before this start (counted by rank 0)."""

    @property
    def paused(self) -> bool:
        """True while the job is paused."""
        return bool(self.state.value == PAUSED)

    @property
    def should_stop(self) -> bool:
        """True once the job was stopped."""
        return bool(self.state.value == STOPPING)

    def check(self) -> None:
        """Wait while the job is paused; raise JobStopped once it was stopped."""
        while self.state.value == PAUSED:
            time.sleep(POLL_SECONDS)
        if self.state.value == STOPPING:
            raise JobStopped(StopReason.CANCEL, "stopped by its job")

    def progress(
        self,
        fraction: float,
        *,
        step: int = 0,
        total: int | None = None,
        message: str = "",
        metrics: dict[str, float] | None = None,
    ) -> None:
        """Hand the figures to the agent, which reports them as the job's."""
        figures = {**(metrics or {}), "world_size": float(dist.get_world_size()), "restarts": float(self.restarts)}
        report = {"step": step, "total": total, "message": message, "metrics": figures}
        self.messages.put(("progress", fraction, report))

    def checkpointed(self, step: int) -> None:
        """Tell the agent a whole checkpoint was written."""
        self.messages.put(("checkpointed", step))


@dataclass(frozen=True)
class Group:
    """How one job's ranks are laid out and how long they may take to meet (from its config)."""

    world_size: int
    workers: int
    """Workers (hosts) the ranks are spread over, `world_size / workers` on each."""
    cuda: bool
    """NCCL on one GPU per rank; gloo on the CPU otherwise."""
    max_restarts: int
    rendezvous_timeout: float

    @classmethod
    def of(cls, config: Distribution, *, cuda: bool) -> Group:
        """The group a task's config asks for."""
        return cls(config.ranks, config.workers, cuda, config.max_restarts, config.rendezvous_timeout)

    @property
    def per_worker(self) -> int:
        """Ranks each worker runs."""
        return self.world_size // self.workers

    @property
    def backend(self) -> str:
        """The process group's backend."""
        return "nccl" if self.cuda else "gloo"


@dataclass(frozen=True)
class Meeting:
    """Where the ranks of a group over several workers meet: the c10d rendezvous store, served by
    the job's own worker at an address the others reach."""

    host: str
    port: int
    local: str
    """This worker's own address, which its ranks tell each other (rank 0's serves their group)."""
    node: int
    """This worker's place in the group: its ranks are `node * per_worker` onwards, so the job's own
    worker (node 0) holds rank 0 whatever order torch's rendezvous admitted the workers in."""

    @property
    def hosting(self) -> bool:
        """True on the job's own worker (node 0), which serves the store; False on one that joins."""
        return self.node == 0

    @property
    def endpoint(self) -> str:
        """host:port, as torch's launcher takes it."""
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class RankJob:
    """What every rank needs to train its share (pickled to each rank's process)."""

    work: Callable[[Steps], Any]
    """The training, called with the rank's context; rank 0's return value is the job's."""
    group: Group
    folder: Path
    """The job's folder on this host."""
    memory_limit: int
    threads: int
    job_id: str
    node: int = 0
    """This worker's place in the group (`Meeting.node`)."""

    @property
    def rank(self) -> int:
        """This process's rank: the worker's first, plus its place on the worker (LOCAL_RANK)."""
        return self.node * self.group.per_worker + int(os.environ["LOCAL_RANK"])


class Recruit(Protocol):
    """Finds the other workers of a group spread over several, hands each the run, and says where
    the group meets (`engine.ranks.Recruiter`, on a worker of the bus)."""

    def __call__(self, group: Group, run: dict[str, Any]) -> Meeting:
        """Recruit `group.workers - 1` workers for the run (`run`: what they need beyond the task);
        where its ranks meet."""


def meet(group: Group, run: dict[str, Any], recruit: Recruit | None) -> Meeting | None:
    """Where the ranks of `group` meet: nothing to arrange on one worker; on several, where
    `recruit` says once it found the others."""
    if group.workers == 1:
        return None
    if recruit is None:
        raise ForsetiError(
            f"this run spreads its ranks over {group.workers} workers, which takes a worker on a bus",
            code=ErrorCode.INVALID_TASK,
        )
    return recruit(group, run)


_group_store: Store | None = None
"""This rank's group store (set once it joined its group): files rank 0 hands the others travel in it."""


def rank_main(job: RankJob, messages: Any, state: Any) -> tuple[str, Any]:
    """One rank's process: join the group, train, and say how it ended (a ForsetiError is an
    outcome, not a crash: the launcher must not start the group again for a refused task)."""
    global _group_store

    settle_in(job.rank)
    torch.set_num_threads(job.threads)
    if job.group.cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    timeout = datetime.timedelta(seconds=job.group.rendezvous_timeout)
    try:
        _group_store = group_store(job.job_id, timeout)
        dist.init_process_group(
            job.group.backend,
            store=_group_store,
            rank=job.rank,
            world_size=int(os.environ["WORLD_SIZE"]),
            timeout=timeout,
        )
    except dist.DistStoreError as exc:
        return "error", (ErrorCode.RENDEZVOUS_TIMEOUT, f"the ranks did not meet: {exc}")
    try:
        restarts = count_start(job.folder / STARTS) if job.rank == 0 else 0
        ctx = RankContext(messages, state, job.memory_limit, job.job_id, restarts)
        return "done", job.work(ctx)
    except JobStopped:
        return "stopped", None
    except ForsetiError as exc:
        return "error", (exc.code, exc.message)
    finally:
        dist.destroy_process_group()


def group_store(job_id: str, timeout: datetime.timedelta) -> Store:
    """The c10d store the ranks meet in: a TCPStore served by the launcher's rank 0 (on the host
    MASTER_ADDR names), new at every start of the group, since `launch` has the launchers pick a new
    port each round rather than share their rendezvous store. A group started again after a rank died
    then never reads an address its dead predecessor left (seen here: the new rank 1 dialled the old
    rank 0's port); and a prefix by start count would not do across workers, whose launchers count
    a restart only when their own ranks failed."""
    store = TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        int(os.environ["WORLD_SIZE"]),
        is_master=os.environ["RANK"] == "0",  # the launcher's numbering: its rank 0 is on MASTER_ADDR
        timeout=timeout,
        multi_tenant=True,
    )
    return PrefixStore(f"forseti/{job_id}", store)


def count_start(path: Path) -> int:
    """Count one more start of the group in `path` (rank 0's, on the job's worker); how many before."""
    before = int(path.read_text()) if path.exists() else 0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(str(before + 1))
    return before


def settle_in(rank: int) -> None:
    """Have the kernel kill this rank when the process that launched it dies (Linux): a worker killed
    mid-job must not leave its ranks training for nobody; and name the process `forseti-rank-<rank>`,
    so `ps` and `top` tell the ranks apart. Elsewhere they run to their end, unnamed."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig, pr_set_name = 1, 15
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    libc.prctl(pr_set_name, f"forseti-rank-{rank}".encode()[:15])


@contextlib.contextmanager
def quiet_launcher() -> Iterator[None]:
    """The elastic launcher's own log lines (one per rank start, a warning that it cannot install
    signal handlers off the main thread: the agent stops the ranks itself) kept to errors."""
    logger = logging.getLogger("torch.distributed.elastic")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def launch(
    group: Group,
    ctx: Steps,
    work: Callable[[Steps], Any],
    folder: Path,
    *,
    meeting: Meeting | None = None,
    entry: Callable[[RankJob, Any, Any], tuple[str, Any]] = rank_main,
) -> Any:
    """Run `work` on this worker's ranks of `group` and return rank 0's result (None on a worker that
    joined another's job: rank 0 is not here). Relays rank 0's progress and checkpoints, and the
    job's pause and stop, until the ranks end. A group over several workers meets at `meeting`."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousTimeoutError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    spawn = multiprocessing.get_context("spawn")
    messages, state = spawn.Queue(), spawn.Value("i", RUNNING)
    # the launchers pick a new store (and port) for every start of the group instead of sharing their
    # rendezvous store with the ranks: see group_store. Torch reads this from the environment.
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    (folder / STARTS).unlink(missing_ok=True)
    job = RankJob(
        work=work,
        group=group,
        folder=folder,
        memory_limit=ctx.memory_limit,
        threads=max(1, torch.get_num_threads() // group.per_worker),
        job_id=ctx.job_id,
        node=meeting.node if meeting is not None else 0,
    )
    place: dict[str, Any] = {"rdzv_endpoint": f"127.0.0.1:{free_port()}"}
    if meeting is not None:
        # the launcher's own guess (is this host named in the endpoint?) is wrong for two workers on one host
        place = {"rdzv_endpoint": meeting.endpoint, "local_addr": meeting.local, "hosting": meeting.hosting}
    launcher = LaunchConfig(
        min_nodes=group.workers,
        max_nodes=group.workers,
        nproc_per_node=group.per_worker,
        run_id=ctx.job_id,
        rdzv_backend="c10d",
        rdzv_endpoint=place["rdzv_endpoint"],
        rdzv_configs={"join_timeout": group.rendezvous_timeout}
        | ({"is_host": place["hosting"]} if meeting is not None else {}),
        max_restarts=group.max_restarts,
        monitor_interval=POLL_SECONDS,
        start_method="spawn",
        local_addr=place.get("local_addr"),
    )
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            with quiet_launcher():
                outcome["ranks"] = elastic_launch(launcher, entry)(job, messages, state)
        except BaseException as exc:  # handed to the job's thread, which raises what it means
            outcome["error"] = exc

    log.info(
        "%s: training with %d ranks here of %d (restarts allowed: %d)",
        ctx.job_id,
        group.per_worker,
        group.world_size,
        group.max_restarts,
    )
    thread = threading.Thread(target=run, name=f"ranks-{ctx.job_id}", daemon=True)
    thread.start()
    while thread.is_alive() or not messages.empty():
        state.value = STOPPING if ctx.should_stop else PAUSED if ctx.paused else RUNNING
        try:
            message = messages.get(timeout=POLL_SECONDS)
        except queue.Empty:
            continue
        if message[0] == "progress":
            ctx.progress(message[1], **message[2])
        else:
            ctx.checkpointed(message[1])
    thread.join()
    error = outcome.get("error")
    if isinstance(error, RendezvousTimeoutError):
        raise ForsetiError(
            f"the {group.world_size} ranks did not meet within {group.rendezvous_timeout:g}s: {error}",
            code=ErrorCode.RENDEZVOUS_TIMEOUT,
        )
    if isinstance(error, ChildFailedError):
        rank, failure = error.get_first_failure()
        raise ForsetiError(
            f"rank {rank} failed (the group was started {group.max_restarts} times again): "
            f"{failure.message or f'exit code {failure.exitcode}'}"[:4096],
            code=ErrorCode.HANDLER_CRASHED,
        )
    if error is not None:
        raise error
    ranks: dict[int, tuple[str, Any]] = outcome["ranks"]
    how, value = ranks[min(ranks)]  # this worker's first rank: rank 0 on the job's own worker
    if how == "error":
        code, message = value
        raise ForsetiError(message, code=code)
    if how == "stopped":
        ctx.check()  # raises the job's own JobStopped
    return value if job.node == 0 else None
