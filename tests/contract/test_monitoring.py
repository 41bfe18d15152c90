"""The monitoring that ships in deploy/: promtool checks the rules and the config and runs the
rules' unit tests, every runbook link has its section, and a real Prometheus scraping a live worker
returns data for every query a dashboard panel or an alert uses."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from forseti.adapters.bus import MemoryBroker, MemoryBus
from forseti.adapters.processes import free_port
from forseti.adapters.registry import ModelRecord, RegistryStore
from forseti.schemas.capabilities import Capability
from forseti.schemas.catalog import CONTROL, HEALTH
from forseti.schemas.control import CancelJob
from forseti.schemas.envelope import encode
from forseti.schemas.jobs import GenericResult
from forseti.schemas.rollouts import RolloutBounds, RolloutSpec, ServeHealth, VersionHealth
from forseti.schemas.schedules import ScheduleCreate, ScheduleSpec
from forseti.schemas.tasks import RLTask, TaskKind, task_channel
from forseti.worker.cli.schedules import ask_schedules
from forseti.worker.engine.context import Handler, JobContext
from forseti.worker.rollouts.steps import start_rollout
from forseti.worker.services.traffic import Traffic

from ..helpers import EchoHandler, StepHandler, inference, running_worker, submit, training

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS = REPO / "deploy" / "prometheus"
DASHBOARDS = sorted((REPO / "deploy" / "grafana").glob("*.json"))
THRESHOLD = re.compile(r"\s*(>|<|==|!=|>=|<=)\s*[0-9.e+-]+\s*$")
"""An alert's comparison with its threshold, stripped to query the series it compares."""

needs_prometheus = pytest.mark.skipif(
    shutil.which("promtool") is None or shutil.which("prometheus") is None,
    reason="Debian's prometheus package is not installed (.ci/run installs it)",
)


def alert_rules() -> list[dict[str, Any]]:
    """Every alerting rule in deploy/prometheus/alerts.yml."""
    doc = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expression) of every target of every dashboard."""
    queries = []
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            queries += [(f"{path.name}: {panel['title']}", target["expr"]) for target in panel["targets"]]
    return queries


@needs_prometheus
def test_promtool_checks_rules_and_config_and_runs_the_rule_tests() -> None:
    for command in (
        ["promtool", "check", "rules", "alerts.yml"],
        ["promtool", "check", "config", "prometheus.yml"],
        ["promtool", "test", "rules", "alerts_test.yml"],
    ):
        done = subprocess.run(command, cwd=PROMETHEUS, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, f"{' '.join(command)}:\n{done.stdout}\n{done.stderr}"


def test_alerts_follow_the_mixin_conventions_and_their_runbooks_exist() -> None:
    runbooks = (REPO / "docs" / "runbooks.md").read_text()
    anchors = {line.removeprefix("## ").strip().lower() for line in runbooks.splitlines() if line.startswith("## ")}
    rules = alert_rules()
    assert len(rules) >= 8
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert {"summary", "description", "runbook_url"} <= set(rule["annotations"]), rule["alert"]
        page, anchor = rule["annotations"]["runbook_url"].split("#")
        assert page == "docs/runbooks.md" and anchor == rule["alert"].lower() and anchor in anchors, rule["alert"]


class StepsRL:
    """RL that reports timesteps in its progress, as the RL handler does."""

    kind = TaskKind.RL

    def capabilities(self) -> list[Capability]:
        return [Capability(area="reinforcement-learning", name="steps")]

    async def run(self, task: RLTask, ctx: JobContext) -> GenericResult:
        for step in range(1, 6):
            ctx.progress(step / 5, step=step * 1000, total=5000)
            await asyncio.sleep(0.05)
        return GenericResult(summary="5000 timesteps")


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[str, int]]:
    """A Prometheus that scrapes a worker's metrics port every second, with Forseti's rules loaded;
    yields its URL and the port it scrapes."""
    target = free_port()
    port = free_port()
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["scrape_configs"][0].pop("dns_sd_configs")
    config["scrape_configs"][0]["static_configs"] = [{"targets": [f"127.0.0.1:{target}"]}]
    config["rule_files"] = [str(PROMETHEUS / "alerts.yml")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
            time.sleep(0.2)
        yield url, target
    finally:
        proc.terminate()
        proc.wait(30)


def query(url: str, expr: str) -> list[dict[str, Any]]:
    """The result of an instant query."""
    with urllib.request.urlopen(f"{url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}", timeout=10) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


async def rolling_out(store: RegistryStore, client: MemoryBus) -> ServeHealth:
    """A rollout of a version that fails its requests, and the health report of the replica serving it
    (published every second, the rollout is rolled back)."""
    for label in ("v1", "v2"):
        await store.add_model(
            ModelRecord(id=f"llm-{label}", name="llm", model_type="llm", export_path="-", export_format="gguf",
                        label=label)
        )  # fmt: skip
    await store.set_alias("llm", "production", "llm-v1")
    spec = RolloutSpec(steps=[50, 100], interval_seconds=0.5, bounds=RolloutBounds(min_requests=2))
    rollout, _ = await start_rollout(store, client, "llm", "v2", spec)
    return ServeHealth(
        consumer="replica-x", name="llm", alias="production", serving="llm-v1", every_seconds=1.0,
        rollout_id=rollout.id, candidate="llm-v2", share=50,
        versions=[
            VersionHealth(model_id="llm-v1", version="v1", requests=10, errors=0, latency_ms_sum=50, latency_ms_max=9,
                          latency_ms_buckets=counted([5.0] * 10)),
            VersionHealth(model_id="llm-v2", version="v2", requests=3, errors=3, latency_ms_sum=20, latency_ms_max=9,
                          latency_ms_buckets=counted([6.0, 6.0, 8.0])),
        ],
    )  # fmt: skip


def counted(latencies_ms: list[float]) -> list[int]:
    """Latencies in a replica's buckets, as its health report carries them."""
    tallies = Traffic()
    for ms in latencies_ms:
        tallies.record("m", "v", ms, ok=True)
    return tallies.drain()[0].latency_ms_buckets


@needs_prometheus
async def test_every_dashboard_and_alert_query_returns_data_from_a_live_worker(
    prometheus: tuple[str, int], tmp_path: Path
) -> None:
    url, port = prometheus
    broker = MemoryBroker()
    client = MemoryBus(broker)
    await client.connect()
    named = dashboard_queries() + [(rule["alert"], THRESHOLD.sub("", rule["expr"].strip())) for rule in alert_rules()]
    queries = {expr for _, expr in named}
    handlers: list[Handler] = [EchoHandler(), StepHandler(delay=0.01), StepsRL()]
    running = running_worker(
        MemoryBus(broker), handlers, tmp_path, metrics_port=port, schedule_poll=0.2, rollout_poll=0.2
    )
    async with running as worker:
        health = await rolling_out(worker.store, client)
        template = inference(rows=1).model_dump(mode="json", exclude_none=True)
        template.pop("request_id")
        schedule = ScheduleSpec(kind=TaskKind.INFERENCE, task=template, every_seconds=0.5)
        await ask_schedules(client, ScheduleCreate(id="scraped", spec=schedule), None, timeout=5)
        await client.publish(task_channel(TaskKind.TRAINING), b"{not json")  # a dead letter
        stranger = CancelJob(job_id="someone-elses", user_id="mallory")
        for second in range(12):  # work in every scrape interval, so rates and quantiles have data
            await submit(client, inference(rows=2))
            await submit(client, training(steps=3))
            await submit(client, RLTask(request_id=f"rl-{second}", algorithm="ppo", environment="CartPole-v1"))
            if second == 2:
                owned = training(steps=1500).model_copy(update={"user_id": "ana", "request_id": "ana-job"})
                await submit(client, owned)
            if second >= 3:
                await client.publish(CONTROL, encode(stranger.model_copy(update={"job_id": "ana-job"})))
            await client.publish(HEALTH, encode(health))
            await asyncio.sleep(1.0)
        answers = await asyncio.to_thread(lambda: {expr: query(url, expr) for expr in queries})
    await client.close()
    missing = [title for title, expr in named if not answers[expr]]
    assert not missing, f"queries without data: {missing}"
    nan = {title for title, expr in named if any(sample["value"][1] == "NaN" for sample in answers[expr])}
    # workers answer requests but make none: their request-latency histogram exists, at zero
    assert nan <= {"forseti-workers.json: Bus publish / request p99"}, f"panels with no rate in the window: {nan}"
