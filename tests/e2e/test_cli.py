"""The `forseti` command as separate processes over a real nats-server: submit, watch, cancel, jobs,
capabilities, SIGTERM, and a worker killed mid-job whose successor resumes from the checkpoint."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from forseti.adapters.bus.nats import NatsBus
from forseti.adapters.bus.servers import NatsServer, free_port, port_open
from forseti.envs.remote import RemoteVecEnv
from forseti.schemas.envelope import encode
from forseti.schemas.tasks import RLTask, TrainingTask

from ..helpers import breast_cancer_training, watch

REPO = Path(__file__).resolve().parents[2]
HANDLERS = ["--handler", "tests.helpers:StepHandler", "--handler", "tests.helpers:FailingHandler"]


def forseti_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "forseti.worker", *args]


def env(bus: str) -> dict[str, str]:
    return {
        **os.environ,
        "FORSETI_BUS_URL": bus,
        "FORSETI_HEARTBEAT_INTERVAL": "0.5",
        "FORSETI_POLL_INTERVAL": "0.2",
        "COLUMNS": "200",
    }


def run(bus: str, *args: str, stdin: bytes | None = None, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        forseti_cmd(*args), cwd=REPO, env=env(bus), input=stdin, capture_output=True, timeout=timeout, check=False
    )


class WorkerProcess:
    """`forseti worker` (or another long-running command) in its own process; returns once it logs
    the word that says it is ready."""

    def __init__(
        self,
        bus: str,
        data_dir: Path | None,
        *extra: str,
        handlers: list[str] = HANDLERS,
        command: tuple[str, ...] = ("worker", "--shutdown-grace", "5"),
        ready: str = "pulling",
    ) -> None:
        self.proc = subprocess.Popen(
            forseti_cmd(*command, *(("--data-dir", str(data_dir)) if data_dir else ()), *handlers, *extra),
            cwd=REPO,
            env=env(bus),
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stderr is not None
        self.lines: list[str] = []
        for line in self.proc.stderr:
            self.lines.append(line)
            if ready in line:
                break
        else:
            raise AssertionError("worker exited before it was ready:\n" + "".join(self.lines))
        # keep draining, or a full pipe would block the worker's logging
        self._drain = threading.Thread(target=lambda: self.lines.extend(self.proc.stderr or ()), daemon=True)
        self._drain.start()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(30)
        self._drain.join(10)
        assert self.proc.stderr is not None
        self.proc.stderr.close()
        return code


@pytest.fixture
def bus_url(nats_server: NatsServer) -> str:
    return nats_server.url + "?ack_wait=2"


@pytest.fixture
def worker(bus_url: str, tmp_path: Path) -> Iterator[WorkerProcess]:
    proc = WorkerProcess(bus_url, tmp_path / "data")
    yield proc
    assert proc.stop() == 0, "SIGTERM should end the worker cleanly"


def training_task(steps: int, job_id: str | None = None) -> bytes:
    data = {"model_type": "classifier", "config": {"epochs": steps}, "data_sources": [{"rows": [{"x": 1}]}]}
    if job_id:
        data["request_id"] = job_id
    return orjson.dumps(data)


def test_submit_watch_jobs_and_capabilities(worker: WorkerProcess, bus_url: str, tmp_path: Path) -> None:
    done = run(bus_url, "submit", "-", "--kind", "training", "--watch", stdin=training_task(5))
    assert done.returncode == 0, done.stderr.decode()
    job_id = done.stdout.decode().splitlines()[0]
    assert "completed" in done.stderr.decode()

    failed = run(
        bus_url,
        "submit",
        "-",
        "--kind",
        "rl",
        "--watch",
        stdin=orjson.dumps({"algorithm": "dqn", "environment": "fatal"}),
    )
    assert failed.returncode == 1
    assert "the environment does not exist" in failed.stderr.decode()

    again = run(bus_url, "watch", job_id, "--timeout", "10")  # already finished: answered from the registry
    assert again.returncode == 0

    listed = run(bus_url, "jobs", "--data-dir", str(tmp_path / "data"), "--json")
    states = {row["job_id"]: row["state"] for row in map(json.loads, listed.stdout.decode().splitlines())}
    assert states[job_id] == "completed"

    caps = json.loads(run(bus_url, "capabilities", "--json").stdout)
    assert "task kinds: training, rl" in run(bus_url, "capabilities").stdout.decode()
    assert sorted(caps["task_kinds"]) == ["rl", "training"]

    bad = run(bus_url, "submit", "-", "--kind", "rl", stdin=b'{"algorithm": "ppo"}')
    assert bad.returncode == 1
    assert "environment" in bad.stderr.decode()


def test_cancel_ends_a_watched_job_with_exit_code_2(worker: WorkerProcess, bus_url: str) -> None:
    job_id = f"long-{uuid.uuid4().hex[:6]}"
    submitted = run(bus_url, "submit", "-", "--kind", "training", stdin=training_task(2000, job_id))
    assert submitted.stdout.decode().strip() == job_id
    watcher = subprocess.Popen(
        forseti_cmd("watch", job_id, "--timeout", "60"), cwd=REPO, env=env(bus_url), stderr=subprocess.DEVNULL
    )
    assert run(bus_url, "cancel", job_id, "--reason", "test").returncode == 0
    assert watcher.wait(60) == 2


def test_unknown_jobs_ended_jobs_and_replays_are_said_with_their_exit_codes(
    worker: WorkerProcess, bus_url: str
) -> None:
    cancelled = run(bus_url, "cancel", "no-such-job")
    assert cancelled.returncode == 4, cancelled.stderr.decode()
    assert "no worker knows job no-such-job" in cancelled.stderr.decode()
    assert run(bus_url, "pause", "no-such-job").returncode == 4
    watched = run(bus_url, "watch", "no-such-job", "--accept-timeout", "1", timeout=30)
    assert watched.returncode == 4, watched.stderr.decode()
    assert "no worker knows job no-such-job" in watched.stderr.decode()

    job_id = f"once-{uuid.uuid4().hex[:6]}"
    first = run(bus_url, "submit", "-", "--kind", "training", "--watch", stdin=training_task(3, job_id))
    assert first.returncode == 0 and "replayed" not in first.stderr.decode()
    again = run(bus_url, "submit", "-", "--kind", "training", "--watch", stdin=training_task(3, job_id))
    assert again.returncode == 0
    assert f"replayed: job {job_id} ran before; this is its stored outcome" in again.stderr.decode()
    edited = run(bus_url, "submit", "-", "--kind", "training", "--watch", stdin=training_task(4, job_id))
    assert "your task did not run" in edited.stderr.decode()
    ended = run(bus_url, "cancel", job_id)
    assert ended.returncode == 1 and f"job {job_id} already completed: nothing to cancel" in ended.stderr.decode()


def test_a_killed_worker_hands_its_job_to_the_next_one_which_resumes(bus_url: str, tmp_path: Path) -> None:
    async def scenario() -> None:
        client = NatsBus(bus_url.split("?")[0])
        await client.connect()
        job_id = f"resume-{uuid.uuid4().hex[:6]}"
        events = await watch(client, job_id)
        first = WorkerProcess(bus_url, tmp_path / "data")
        await client.publish("forseti.tasks.training", run_task_event(job_id))
        await events.wait_for("progress", count=20, timeout=30)
        first.stop(signal.SIGKILL)  # no ack, no nak: the server redelivers after ack_wait
        second = WorkerProcess(bus_url, tmp_path / "data")
        try:
            done = (await events.wait_for("completed", timeout=60)).data
        finally:
            assert second.stop() == 0
            await client.close()
        assert done.result.metrics["started_from"] >= 20
        accepted = [e.data for e in events.events if e.type.endswith("accepted.v1")]
        assert [a.attempt for a in accepted] == [1, 2]

    asyncio.run(scenario())


def run_task_event(job_id: str) -> bytes:
    from forseti.schemas.envelope import encode
    from forseti.schemas.tasks import TrainingTask

    return encode(TrainingTask.model_validate(orjson.loads(training_task(150, job_id))))


def killed_and_resumed(bus_url: str, tmp_path: Path, task: RLTask | TrainingTask, progress: int) -> Any:
    """Run `task` on a worker with the installed handlers, SIGKILL it after `progress` progress events,
    start another on the same data directory; the job's final event data."""
    kind = "rl" if isinstance(task, RLTask) else "training"

    async def scenario() -> Any:
        client = NatsBus(bus_url.split("?")[0])
        await client.connect()
        events = await watch(client, task.request_id or "")
        first = WorkerProcess(bus_url, tmp_path / "data", handlers=[])
        await client.publish(f"forseti.tasks.{kind}", encode(task))
        await events.wait_for("progress", count=progress, timeout=120)
        first.stop(signal.SIGKILL)
        second = WorkerProcess(bus_url, tmp_path / "data", handlers=[])
        try:
            return (await events.wait_end(timeout=180)).data
        finally:
            assert second.stop() == 0
            await client.close()

    return asyncio.run(scenario())


def test_a_killed_rl_worker_is_replaced_by_one_that_resumes_training(bus_url: str, tmp_path: Path) -> None:
    task = RLTask.model_validate(
        {
            "request_id": f"rl-resume-{uuid.uuid4().hex[:6]}",
            "algorithm": "ppo",
            "environment": "CartPole-v1",
            "config": {"total_timesteps": 6000, "n_steps": 256, "checkpoint_interval": 500, "seed": 2},
            "policy": {"net_arch": [16]},
            "evaluation": {"episodes": 1},
        }
    )
    done = killed_and_resumed(bus_url, tmp_path, task, progress=3)
    # killed after its third progress event (one at each checkpoint: 500, 1,000, 1,500), which
    # follows the checkpoint it reports: the last checkpoint is at least 1,500
    assert done.result.metrics.custom_metrics["resumed_from_timesteps"] >= 1500
    assert done.result.metrics.custom_metrics["timesteps"] >= 6000


def test_a_killed_training_worker_is_replaced_by_one_that_resumes_from_its_checkpoint(
    bus_url: str, tmp_path: Path
) -> None:
    task = breast_cancer_training(f"tr-resume-{uuid.uuid4().hex[:6]}", epochs=40, batch_size=4, hidden=[16])
    rows = task.data_sources[0].rows or []
    done = killed_and_resumed(bus_url, tmp_path, task, progress=3)
    assert done.result.metrics.custom_metrics["resumed_from_epoch"] >= 3
    assert done.result.metrics.total_epochs == 40
    model_id = done.result.model_id
    serve = WorkerProcess(bus_url, tmp_path / "data", handlers=[], command=("infer-serve",), ready="answers on")
    try:
        asked = run(bus_url, "infer", model_id, json.dumps(rows[:3]))
        assert asked.returncode == 0, asked.stderr.decode()
        answers = json.loads(asked.stdout)
        assert [a["label"] for a in answers] == [r["label"] for r in rows[:3]], "integer classes stay integers"
        unknown = run(bus_url, "infer", "no-such-model", json.dumps(rows[:1]))
        assert unknown.returncode == 1
        assert "invalid_model" in unknown.stderr.decode()
    finally:
        assert serve.stop() == 0


def test_forseti_up_runs_the_ppo_demo_through_its_executor_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    bus = f"nats://127.0.0.1:{port}"
    proc = subprocess.Popen(
        forseti_cmd("up", "--bus", bus, "--data-dir", str(tmp_path), "--metrics-port", "0"),
        cwd=REPO,
        env=env(bus),
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    seen: list[str] = []
    for line in proc.stderr:
        seen.append(line)
        if "the policy is above" in line:
            break
    output = "".join(seen)
    assert "started NATS" in output
    assert "executor 'local' serves CartPole-v1" in output
    assert "completed demo-" in output, output[-3000:]
    assert '"onnx_action_agreement": 1.0' in output
    assert list((tmp_path / "artifacts").glob("demo-*/policy.onnx"))
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 0
    proc.stderr.close()
    assert not port_open("127.0.0.1", port), "forseti up stops the nats-server it started"


def test_forseti_up_on_a_busy_port_says_so_in_one_line_before_starting_anything(tmp_path: Path) -> None:
    nats_port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        bus = f"nats://127.0.0.1:{nats_port}"
        done = run(bus, "up", "--bus", bus, "--data-dir", str(tmp_path), "--metrics-port", str(busy), timeout=60)
    said = done.stderr.decode().strip()
    assert done.returncode == 1
    assert said.startswith(f"error: port {busy} on 127.0.0.1 is busy"), said
    assert len(said.splitlines()) <= 2 and "Traceback" not in said, said
    assert "started NATS" not in said and not port_open("127.0.0.1", nats_port), "nothing was started"


def test_forseti_executor_serves_an_env_over_nats(nats_server: NatsServer) -> None:
    executor = WorkerProcess(
        nats_server.url,
        None,
        handlers=[],
        command=("executor", "--env", "forseti/SensorAnomaly-v0", "--id", "sensors", "--num-envs", "3"),
        ready="serving",
    )

    async def use() -> tuple[int, tuple[int, ...]]:
        bus = NatsBus(nats_server.url)
        await bus.connect()
        loop = asyncio.get_running_loop()

        def steps() -> tuple[int, tuple[int, ...]]:
            remote = RemoteVecEnv(bus, "sensors", loop=loop, session_id="probe", environment="forseti/SensorAnomaly-v0")
            observations = np.asarray(remote.reset())
            remote.step(np.array([0, 1, 0]))
            remote.close()
            return remote.num_envs, observations.shape

        try:
            return await asyncio.to_thread(steps)
        finally:
            await bus.close()

    assert asyncio.run(use()) == (3, (3, 16))
    assert executor.stop() == 0


def test_a_worker_with_a_bad_setting_says_why_and_exits_1(tmp_path: Path) -> None:
    done = run("memory://", "worker", "--data-dir", str(tmp_path), "--object-store-url", "ftp://x", timeout=30)
    assert done.returncode == 1
    said = done.stderr.decode()
    assert "invalid settings: unsupported object store URL 'ftp://x'" in " ".join(said.split())
    assert "Traceback" not in said


def test_a_command_whose_bus_is_away_says_why_once() -> None:
    # nats-py's error callback printed the refusal, then the command's own error said it again
    done = run(f"nats://127.0.0.1:{free_port()}?connect_timeout=1", "capabilities", timeout=30)
    said = done.stderr.decode()
    assert done.returncode == 1
    assert said.count("Connection refused") == 1 and said.startswith("error: cannot reach NATS"), said


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_worker_waiting_for_its_bus_stops_at_once_on_a_signal(tmp_path: Path, sig: signal.Signals) -> None:
    """With no server on its bus, the worker could not be stopped but by SIGKILL (issue 13); it now
    ends its wait when told, after one warning rather than four a second."""
    absent = f"nats://127.0.0.1:{free_port()}?connect_timeout=120"
    worker = WorkerProcess(absent, tmp_path, command=("worker",), ready="Connection refused")
    time.sleep(1.5)  # several more tries, said only once
    asked = time.monotonic()
    code = worker.stop(sig)
    assert time.monotonic() - asked < 10, "the worker went on waiting for its bus"
    assert code == 0
    said = "".join(worker.lines)
    assert said.count("Connection refused") == 1, said
    assert "stopped before its bus" in said
