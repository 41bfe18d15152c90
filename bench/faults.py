"""Fault injection, Jepsen-style: a mixed workload on real servers while a nemesis strikes, then a
checker that counts what was lost, duplicated or left stuck.

    python bench/faults.py                      # every scenario, 200 tasks each; rewrites its docs section
    python bench/faults.py --tasks 40 --quick   # a smaller run, printed only
    python bench/faults.py --scenarios kill     # one scenario

Two `forseti worker` processes with data dirs of their own (two hosts) share one nats-server (whose
object store shares their checkpoints) and one PostgreSQL registry, with leases of 3 s and an
`ack_wait` of 4 s so that faults are noticed quickly; the first reaches nats-server through a TCP
forwarder that the `cut` nemesis unplugs. The workload is supervised training on scikit-learn's
iris rows, PPO on CartPole in the worker and through a `forseti executor` process, and inference on
a model trained first. The nemeses, one per scenario, then all of them in turn:

- `kill`: SIGKILL a worker, start it again at once (same data dir);
- `pause`: SIGSTOP a worker for longer than its lease and `ack_wait`, then SIGCONT;
- `nats`: restart nats-server (3 s down, same store);
- `executor`: SIGKILL the executor, start it again under its id at once;
- `cut`: cut the first worker's connection to nats-server for longer than `ack_wait`, then restore it;
- `combined`: the five above in turn.

The checker reads the registry and the job events: every request id must have exactly one terminal
outcome (lost: none by the end; duplicated: two different terminal outcomes for one id, or a model
announced twice; stuck: a job still running or pending at the end; work lost: how far a job taken
over had come before its last delivery, less where its finishing attempt resumed, in checkpoint
intervals, at most 1). Recovery is, for each fault,
the time from the fault until every job the registry had running at that moment had ended.
Not covered here: Tansu restarts (its memory store drops every record when it stops, so a restart
loses by design) and fine-tunes (minutes each on this machine; tests/e2e/test_many_hosts.py kills
a fine-tune's worker and checks the other host finishes it from its checkpoint).
tests/e2e/test_faults.py runs a CI-sized `combined` scenario through `scenario()` below.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from report import write_section
from sklearn.datasets import load_iris

from forseti.adapters.bus import Message
from forseti.adapters.bus.nats import NatsBus
from forseti.adapters.bus.servers import NatsServer, free_port
from forseti.adapters.processes import Cable
from forseti.adapters.registry import RegistryStore, create_store
from forseti.adapters.registry.server import PostgresServer
from forseti.schemas.catalog import MODELS
from forseti.schemas.envelope import decode, encode
from forseti.schemas.errors import InvalidTask
from forseti.schemas.jobs import (
    JobAccepted,
    JobCancelled,
    JobCompleted,
    JobEvent,
    JobFailed,
    JobProgress,
    JobState,
    RLResult,
    TrainingResult,
)
from forseti.schemas.models import ModelAvailable
from forseti.schemas.tasks import TASK_MODELS, InferenceTask, RLTask, TaskBase, TrainingTask, task_channel

REPO = Path(__file__).resolve().parents[1]
SCENARIOS = ("kill", "pause", "nats", "executor", "cut", "combined")
LEASE_TTL, ACK_WAIT = 3.0, 4.0
PAUSE_SECONDS = 6.0
"""Longer than the lease and ack_wait: the paused worker's jobs are taken over while it sleeps."""
CUT_SECONDS = 6.0
"""Longer than ack_wait: the bus hands the cut worker's tasks to the other, which finds them leased."""
FAULT_EVERY = 8.0
"""Seconds between faults."""
EXECUTOR = "fault-exec"
"""The executor id the remote PPO tasks name."""
END_WAIT = 240.0
"""Seconds the checker waits, after the last fault, for every job to end."""


def iris_rows() -> list[dict[str, Any]]:
    """scikit-learn's iris measurements with their class, as inline rows."""
    iris = load_iris()
    return [
        {**{f"f{i}": float(v) for i, v in enumerate(row)}, "species": int(label)}
        for row, label in zip(iris.data, iris.target, strict=True)
    ]


def training(request_id: str, rows: list[dict[str, Any]]) -> TrainingTask:
    """A small classifier on `rows`, checkpointed every epoch."""
    return TrainingTask.model_validate(
        {
            "request_id": request_id,
            "model_type": "classifier",
            "config": {"epochs": 4, "hidden": [16], "checkpoint_interval": 1},
            "data_sources": [{"rows": rows, "target": "species"}],
        }
    )


def workload(n: int, model_id: str, seed: int) -> list[TaskBase]:
    """`n` tasks: 60% training, 10% PPO in the worker, 10% PPO on the executor, 20% inference on
    `model_id`, in a seeded shuffle."""
    rows, rng = iris_rows(), random.Random(seed)
    tasks: list[TaskBase] = []
    for i in range(n):
        request_id = f"fault-{seed}-{i}-{uuid.uuid4().hex[:6]}"
        share = i % 5
        if share < 3:
            tasks.append(training(request_id, rows))
        elif share == 3:
            tasks.append(
                RLTask.model_validate(
                    {
                        "request_id": request_id,
                        "algorithm": "ppo",
                        "environment": "CartPole-v1",
                        "executor": EXECUTOR if i % 10 == 8 else None,
                        "config": {"total_timesteps": 512, "n_steps": 128, "checkpoint_interval": 128, "seed": i},
                        "policy": {"net_arch": [16, 16]},
                        "evaluation": {"episodes": 2},
                    }
                )
            )
        else:
            inputs = [{k: v for k, v in row.items() if k != "species"} for row in rng.sample(rows, 8)]
            tasks.append(InferenceTask(request_id=request_id, model_id=model_id, inputs=inputs))
    rng.shuffle(tasks)
    return tasks


class Process:
    """One `forseti` command as a process, its output in `<logs>/<name>.log`, started again by a
    nemesis as often as it likes."""

    ready = b""
    """What the process logs once it serves."""

    def __init__(self, name: str, logs: Path, args: list[str], env: dict[str, str] | None = None) -> None:
        self.name, self.log_path, self.args, self.env = name, logs / f"{name}.log", args, env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the process and wait until it logs `ready`."""
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0  # a restart appends
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "forseti.worker", *self.args],
                cwd=REPO,
                env={**os.environ, **self.env},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while self.ready not in self.log_path.read_bytes()[offset:]:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start; see {self.log_path}")
            time.sleep(0.1)

    def signal(self, sig: int) -> None:
        """Send `sig` to the worker process."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self) -> None:
        """SIGCONT (if paused), then SIGTERM and wait."""
        if self.proc is None:
            return
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Worker(Process):
    """`forseti worker`: a host with its own data dir."""

    ready = b"pulling"

    def __init__(self, name: str, bus_url: str, registry_url: str, data_dir: Path) -> None:
        args = ["worker", "--bus", bus_url, "--data-dir", str(data_dir), "--worker-id", name]
        env = {
            "FORSETI_REGISTRY_URL": registry_url,
            "FORSETI_LEASE_TTL": str(LEASE_TTL),
            "FORSETI_HEARTBEAT_INTERVAL": "1",
            "FORSETI_POLL_INTERVAL": "0.2",
            "FORSETI_RETRY_DELAY": "1",
        }
        super().__init__(name, data_dir.parent, [*args, "--concurrency", "2", "--shutdown-grace", "5"], env)


class Executor(Process):
    """`forseti executor` serving CartPole as `EXECUTOR`."""

    ready = b"serving"

    def __init__(self, name: str, bus_url: str, logs: Path) -> None:
        super().__init__(name, logs, ["executor", "--env", "CartPole-v1", "--id", EXECUTOR, "--bus", bus_url])


@dataclass
class Observed:
    """What a client saw on the bus during one scenario."""

    ends: dict[str, list[tuple[str, bool, float]]] = field(default_factory=lambda: defaultdict(list))
    """Per job id: (terminal event type, replayed, when seen)."""
    announcements: Counter[tuple[str, str, str | None]] = field(default_factory=Counter)
    """model.available events per (model id, format, quantization)."""
    reached: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    """Per job: the furthest progress step seen before its latest `accepted`."""
    furthest: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    """Per job: the furthest progress step seen so far."""
    resumed_from: dict[str, int] = field(default_factory=dict)
    """Per job taken over: the step its finishing attempt started from, by its result."""

    async def on_job(self, msg: Message) -> None:
        """Record a job's terminal events, how far it had come when it was delivered again, and
        where its finishing attempt resumed."""
        event = decode(msg.data, expect=JobEvent).data
        if isinstance(event, JobAccepted) and event.attempt > 1:
            self.reached[event.job_id] = self.furthest[event.job_id]
        elif isinstance(event, JobProgress):
            self.furthest[event.job_id] = max(self.furthest[event.job_id], event.step)
        elif isinstance(event, JobCompleted | JobFailed | JobCancelled):
            replayed = isinstance(event, JobCompleted) and event.replayed
            self.ends[event.job_id].append((type(event).__name__, replayed, time.monotonic()))
            if isinstance(event, JobCompleted) and not replayed and event.job_id in self.reached:
                start = resumed_step(event)
                if start is not None:
                    self.resumed_from[event.job_id] = start

    async def on_model(self, msg: Message) -> None:
        """Count announcements."""
        try:
            event = decode(msg.data, expect=ModelAvailable).data
        except InvalidTask:  # another event on the models channel (an alias moved)
            return
        self.announcements[event.model_id, event.format, event.quantization] += 1


def resumed_step(event: JobCompleted) -> int | None:
    """The step a completed training or RL job's attempt started from (0: from scratch)."""
    result = event.result
    if isinstance(result, TrainingResult):
        return int(result.metrics.custom_metrics.get("resumed_from_epoch", 0))
    if isinstance(result, RLResult):
        return int(result.metrics.custom_metrics.get("resumed_from_timesteps", 0))
    return None


def interval(task: TaskBase) -> int:
    """A task's checkpoint interval in its progress unit (epochs, timesteps)."""
    config = getattr(task, "config", None)
    return int(getattr(config, "checkpoint_interval", 1))


@dataclass
class Outcome:
    """One scenario's figures."""

    scenario: str
    tasks: int
    faults: int
    lost: int
    duplicated: int
    stuck: int
    failed: Counter[str]
    unseen: int
    recovery: list[float]
    seconds: float
    resumed: int = 0
    """Jobs delivered again after they had made progress, that then completed."""
    work_lost: list[float] = field(default_factory=list)
    """For each of those: progress lost at its last takeover, in checkpoint intervals."""


def duplicates(ends: dict[str, list[tuple[str, bool, float]]], announced: Counter[Any]) -> int:
    """Ids with two different terminal outcomes or two non-replayed completions, plus models announced twice."""
    twice = sum(1 for e in ends.values() if len({kind for kind, _, _ in e}) > 1)
    twice += sum(
        1 for e in ends.values() if sum(1 for kind, replayed, _ in e if kind == "JobCompleted" and not replayed) > 1
    )
    return twice + sum(1 for count in announced.values() if count > 1)


async def publish(client: NatsBus, task: TaskBase) -> None:
    """Publish a task on its kind's channel, trying again while the server is away."""
    kind = next(kind for kind, model in TASK_MODELS.items() if isinstance(task, model))
    for _ in range(100):
        try:
            await client.publish(task_channel(kind), encode(task))
            return
        except Exception:  # the server is restarting: a publisher tries again, as a client would
            await asyncio.sleep(0.2)
    raise RuntimeError(f"could not publish {task.request_id}")


async def wait_ended(store: RegistryStore, ids: list[str], timeout: float) -> dict[str, JobState | None]:
    """Poll the registry until every id has a terminal state or `timeout` passes; the last states."""
    deadline = time.monotonic() + timeout
    states: dict[str, JobState | None] = {}
    while True:
        for job_id in ids:
            state = states.get(job_id)
            if state is None or not state.terminal:
                try:
                    job = await store.get_job(job_id)
                except Exception:
                    job = None
                states[job_id] = job.state if job else None
        if all(s is not None and s.terminal for s in states.values()) or time.monotonic() > deadline:
            return states
        await asyncio.sleep(0.5)


@dataclass
class Cluster:
    """What a nemesis strikes: the workers, the executor, the server and the first worker's cable."""

    workers: list[Worker]
    executor: Executor
    nats: NatsServer
    cable: Cable


async def scenario(
    name: str,
    n: int,
    root: Path,
    nats: NatsServer,
    registry_url: str,
    seed: int,
    *,
    every: float = FAULT_EVERY,
    most: int = 40,
    waves: int = 1,
) -> Outcome:
    """Run `n` tasks through two workers while the `name` nemesis strikes every `every` seconds (at
    most `most` times); check what came out. With `waves` > 1 the tasks are published in that many
    parts, the next one halfway between two faults, so that every fault finds work in flight."""
    cable = Cable(nats.port)
    await cable.plug()
    urls = [f"nats://127.0.0.1:{port}?ack_wait={ACK_WAIT:g}" for port in (cable.port, nats.port)]
    workers = [
        Worker(f"{name}-{h}", url, registry_url, root / f"{name}-{h}") for h, url in zip("ab", urls, strict=True)
    ]
    executor = Executor(f"{name}-executor", nats.url, root)
    for process in [executor, *workers]:
        await asyncio.to_thread(process.start)  # in a thread: the cable forwards on this loop meanwhile
    cluster = Cluster(workers, executor, nats, cable)
    client, store = NatsBus(nats.url), create_store(registry_url)
    await client.connect()
    await store.open()
    seen = Observed()
    await client.subscribe("forseti.jobs.*", seen.on_job)
    await client.subscribe(MODELS, seen.on_model)
    started = time.monotonic()
    try:
        model_id = f"fault-model-{seed}-{uuid.uuid4().hex[:6]}"  # what the inference tasks run
        await publish(client, training(model_id, iris_rows()))
        await wait_ended(store, [model_id], 120)
        tasks = workload(n, model_id, seed)
        ids = [t.request_id or "" for t in tasks]
        parts = [tasks[k::waves] for k in range(waves)]

        async def feed() -> None:
            for task in parts.pop(0) if parts else ():
                await publish(client, task)

        await feed()
        faults, snapshots = await nemesis(name, cluster, store, ids, feed, every=every, most=most)
        states = await wait_ended(store, ids, END_WAIT)
    finally:
        for process in [*workers, executor]:
            await asyncio.to_thread(process.stop)
        await cable.unplug()
    await asyncio.sleep(1.0)  # late events of jobs that just ended
    failed: Counter[str] = Counter()
    for job_id in ids:
        job = await store.get_job(job_id)
        if job is not None and job.state is JobState.FAILED:
            failed[str(job.error_code)] += 1
    ends = {job_id: seen.ends.get(job_id, []) for job_id in ids}
    outcome = Outcome(
        scenario=name,
        tasks=n,
        faults=faults,
        lost=sum(1 for s in states.values() if s is None or s is JobState.PENDING),
        duplicated=duplicates(ends, seen.announcements),
        stuck=sum(1 for s in states.values() if s in (JobState.RUNNING, JobState.PAUSED)),
        failed=failed,
        unseen=sum(1 for e in ends.values() if not e),
        recovery=[
            max((min(t for _, _, t in ends[j]) for j in running if ends.get(j)), default=at) - at
            for at, running in snapshots
        ],
        seconds=time.monotonic() - started,
    )
    intervals = {t.request_id: interval(t) for t in tasks}
    for job_id, start in seen.resumed_from.items():
        if seen.reached[job_id] > 0:
            outcome.resumed += 1
            outcome.work_lost.append(max(0, seen.reached[job_id] - start) / intervals[job_id])
    await store.close()
    await client.close()
    return outcome


async def nemesis(
    name: str,
    cluster: Cluster,
    store: RegistryStore,
    ids: list[str],
    feed: Callable[[], Awaitable[None]],
    *,
    every: float,
    most: int,
) -> tuple[int, list[tuple[float, list[str]]]]:
    """Strike every `every` seconds while jobs of `ids` are unfinished (or unpublished: `feed`
    publishes the next part, halfway to each strike); the faults, and for each the time it struck
    with the jobs the registry had running then."""
    workers = cluster.workers
    moves: dict[str, Callable[[int], Awaitable[None]]] = {
        "kill": lambda k: kill(workers[k % 2]),
        "pause": lambda k: pause(workers[k % 2]),
        "nats": lambda k: restart(cluster.nats),
        "executor": lambda k: kill(cluster.executor),
        "cut": lambda k: cut(cluster.cable),
    }
    order = [s for s in SCENARIOS if s != "combined"] if name == "combined" else [name]
    snapshots: list[tuple[float, list[str]]] = []
    pending = set(ids)
    k = 0
    while pending and k < most:
        await asyncio.sleep(every / 2)
        await feed()
        await asyncio.sleep(every / 2)
        try:
            running = [j.job_id for j in await store.list_jobs(state=JobState.RUNNING, limit=200)]
        except Exception:
            running = []
        snapshots.append((time.monotonic(), [j for j in running if j in pending]))
        await moves[order[k % len(order)]](k)
        k += 1
        done = await wait_ended(store, list(pending), 0)
        pending = {j for j, s in done.items() if s is None or not s.terminal}
    return k, snapshots


async def kill(process: Process) -> None:
    """SIGKILL, then start again (a worker on the same data dir, the executor under its id)."""
    process.signal(signal.SIGKILL)
    assert process.proc is not None
    await asyncio.to_thread(process.proc.wait)
    await asyncio.to_thread(process.start)


async def cut(cable: Cable) -> None:
    """Cut every connection through `cable` for CUT_SECONDS, then let them connect again."""
    await cable.unplug()
    await asyncio.sleep(CUT_SECONDS)
    await cable.plug()


async def pause(worker: Worker) -> None:
    """SIGSTOP for PAUSE_SECONDS, then SIGCONT."""
    worker.signal(signal.SIGSTOP)
    await asyncio.sleep(PAUSE_SECONDS)
    worker.signal(signal.SIGCONT)


async def restart(nats: NatsServer) -> None:
    """Stop nats-server, wait 3 s, start it again on its port and store."""
    await asyncio.to_thread(nats.stop)
    await asyncio.sleep(3.0)
    await asyncio.to_thread(nats.start)


def render(outcomes: list[Outcome]) -> str:
    """The docs section."""
    lines = [
        "## Fault injection (`bench/faults.py`)",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()} with {os.cpu_count()} cores: two "
        "`forseti worker` processes (separate data dirs, concurrency 2 each, jobs in child processes) on one "
        "nats-server (its object store sharing checkpoints) and one PostgreSQL registry, leases of "
        f"{LEASE_TTL:g} s, `ack_wait` {ACK_WAIT:g} s, a "
        f"fault every {FAULT_EVERY:g} s while jobs remain (pauses and cuts last {PAUSE_SECONDS:g} s). Workload: "
        "60% training (iris, 4 epochs), 10% PPO in the worker and 10% through a `forseti executor` (CartPole, "
        "512 steps), 20% inference. Rerun with `python bench/faults.py`.",
        "",
        "| scenario | tasks | faults | lost | duplicated | stuck | failed | outcome unseen on the bus "
        "| resumed | work lost at takeover, max (intervals) | recovery p50 / max (s) | wall (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- | ---: |",
    ]
    for o in outcomes:
        failed = ", ".join(f"{code} {count}" for code, count in sorted(o.failed.items())) or "0"
        recovery = f"{statistics.median(o.recovery):.1f} / {max(o.recovery):.1f}" if o.recovery else "-"
        work_lost = f"{max(o.work_lost):.2f}" if o.work_lost else "-"
        lines.append(
            f"| {o.scenario} | {o.tasks} | {o.faults} | {o.lost} | {o.duplicated} | {o.stuck} | {failed} "
            f"| {o.unseen} | {o.resumed} | {work_lost} | {recovery} | {o.seconds:.0f} |"
        )
    lines += [
        "",
        "Lost: no terminal outcome in the registry by the end. Duplicated: two different terminal outcomes "
        "for one id, two non-replayed completions, or a model announced twice. Stuck: still running at the "
        "end. Outcome unseen: the registry has the outcome but the client, subscribed throughout, never saw "
        "its event (core NATS drops what is published while the server is down; `forseti status` answers "
        "from the registry). Resumed: jobs delivered again after they had reported progress, that then "
        "completed. Work lost: for each, the furthest step it had reported before its last delivery minus "
        "the step its finishing attempt started from (its result's `resumed_from_*`), in checkpoint "
        "intervals (1 epoch, 128 timesteps); at most 1 is the promise. Recovery: from a fault until every "
        "job the registry had running then had ended.",
    ]
    return "\n".join(lines)


def workspace() -> Path:
    """A fresh folder for the servers, workers and logs."""
    root = Path(tempfile.mkdtemp(prefix="forseti-faults-"))
    root.chmod(0o755)  # PostgreSQL runs as its own user when this runs as root
    return root


async def main(scenarios: list[str], n: int, seed: int, root: Path) -> list[Outcome]:
    """Start the servers once and run each scenario on them."""
    nats = NatsServer(root / "nats", port=free_port()).start()
    postgres = PostgresServer(root / "postgres", durable=True).start()
    outcomes = []
    try:
        for k, name in enumerate(scenarios):
            outcome = await scenario(name, n, root, nats, postgres.url, seed + k)
            print(outcome, file=sys.stderr, flush=True)
            outcomes.append(outcome)
    finally:
        nats.stop()
        postgres.stop()
    print(f"logs under {root}", file=sys.stderr)
    return outcomes


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=200, help="tasks per scenario")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated: " + ", ".join(SCENARIOS))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="print only; do not rewrite the docs")
    args = parser.parse_args()
    chosen = [s for s in args.scenarios.split(",") if s]
    unknown = sorted(set(chosen) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenarios {unknown}; choose from {', '.join(SCENARIOS)}")
    section = render(asyncio.run(main(chosen, args.tasks, args.seed, workspace())))
    print(section)
    if not args.quick:
        write_section("bench/faults.py", section)
        print("wrote docs/benchmarks.md", file=sys.stderr)
