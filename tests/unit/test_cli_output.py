"""What the command line shows people: the progress bar's figures, log lines printed above a live bar,
a worker's capabilities as text, tables that keep ids whole, help without placeholder types."""

from __future__ import annotations

import io
import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

from forseti.adapters.bus.memory import MemoryBroker, MemoryBus
from forseti.client import Client
from forseti.schemas.capabilities import Capabilities, Capability
from forseti.schemas.jobs import JobProgress, JobState
from forseti.schemas.tasks import TaskKind
from forseti.worker.cli.commands import app, capabilities_text, id_table
from forseti.worker.cli.follow import progress_detail
from forseti.worker.engine.logs import setup_logging

from ..helpers import EchoHandler, StepHandler, running_worker

REPO = Path(__file__).parents[2]


def rl_progress(step: int, total: int, metrics: dict[str, float]) -> JobProgress:
    return JobProgress(
        job_id="j",
        kind=TaskKind.RL,
        state=JobState.RUNNING,
        fraction=min(step / total, 1.0),
        step=step,
        total=total,
        message=f"{step:,} / {total:,} timesteps",
        metrics=metrics,
    )


def test_the_progress_bar_shows_mean_reward_and_steps_per_second_and_never_passes_the_total() -> None:
    # PPO collects whole rollouts, so its last report is past the budget: 20,480 of 20,000
    event = rl_progress(20_480, 20_000, {"timesteps": 20_480.0, "mean_reward_100": 187.25, "steps_per_second": 1234.6})
    assert progress_detail(event) == "20,000 / 20,000  mean reward 187.2  1,235 steps/s"


def test_a_progress_event_without_headline_figures_shows_its_message() -> None:
    event = rl_progress(3, 10, {"trial": 3.0})
    assert progress_detail(event) == "3 / 10 timesteps"


def test_log_lines_go_to_whatever_stderr_is_when_they_are_written() -> None:
    # rich swaps sys.stderr for a proxy that prints above a live progress bar: the log handler must
    # write to that proxy, not to the stderr it saw when logging was set up
    setup_logging()
    swapped = io.StringIO()
    saved, sys.stderr = sys.stderr, swapped
    try:
        logging.getLogger("forseti.test").info("job j completed")
    finally:
        sys.stderr = saved
    assert "job j completed" in swapped.getvalue()


class ExportingSteps(StepHandler):
    def capabilities(self) -> list[Capability]:
        return [Capability(area="training", name="steps"), Capability(area="model-export", name="onnx")]


class ExportingEcho(EchoHandler):
    def capabilities(self) -> list[Capability]:
        return [Capability(area="inference", name="echo"), Capability(area="model-export", name="onnx")]


async def test_a_format_two_handlers_export_is_listed_once(broker: MemoryBroker, tmp_path: Path) -> None:
    async with running_worker(MemoryBus(broker), [ExportingSteps(), ExportingEcho()], tmp_path):
        forseti = Client(MemoryBus(broker))
        await forseti.bus.connect()
        caps = await forseti.capabilities()
        await forseti.close()
    pairs = [(c.area, c.name) for c in caps.capabilities]
    assert sorted(pairs) == [("inference", "echo"), ("model-export", "onnx"), ("training", "steps")]


def test_capabilities_read_as_one_line_per_area() -> None:
    caps = Capabilities(
        worker="w-1",
        version="0.9.0",
        task_kinds=[TaskKind.RL, TaskKind.TRAINING],
        capabilities=[
            Capability(area="reinforcement-learning", name="ppo"),
            Capability(area="reinforcement-learning", name="dqn"),
            Capability(area="model-export", name="onnx"),
        ],
        devices=["cpu"],
        concurrency=2,
        running_jobs=1,
    )
    assert capabilities_text(caps).splitlines() == [
        "worker w-1 (forseti 0.9.0) on cpu: running 1 of 2 jobs",
        "task kinds: rl, training",
        "reinforcement-learning: ppo, dqn",
        "model-export: onnx",
    ]


@pytest.mark.parametrize("command", [[], ["up"], ["worker"], ["submit"], ["watch"], ["edge"], ["llm-serve"]])
def test_help_names_no_placeholder_types(command: list[str]) -> None:
    shown = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "200"}, terminal_width=200)
    assert shown.exit_code == 0, shown.output
    assert "<bool>" not in shown.output


def test_a_table_keeps_whole_ids_in_80_columns() -> None:
    table = id_table("job", "kind", "state", "attempt", "worker", "error", "updated", ids=("job",))
    job_id = "finetune-2026-12-06-8f3a9c1e2b4d"
    table.add_row(job_id, "finetune", "completed", "1", "w-5f0e1d2c3b4a", "", "2026-12-06T01:23:45.678901+00:00")
    console = Console(width=80, file=io.StringIO(), force_terminal=False)
    console.print(table)
    shown = console.file.getvalue()  # type: ignore[attr-defined]  # the StringIO given above
    assert job_id in shown


def leaves(command: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every runnable command under `command` (typer's own click), with its path (`models list`)."""
    if hasattr(command, "commands"):
        for name, sub in command.commands.items():
            yield from leaves(sub, f"{path} {name}".strip())
    else:
        yield path, command


def test_the_readme_names_exactly_the_commands_that_take_no_bus() -> None:
    # the README said every command takes --bus; forseti jobs did not
    readme = (REPO / "README.md").read_text()
    said = re.search(r"Every command that talks to the bus takes `--bus URL` \((.*?) do not", readme, re.S)
    assert said is not None
    named = set(re.findall(r"`([a-z -]+)`", said.group(1)))
    without_bus = {
        path
        for path, command in leaves(typer.main.get_command(app))
        if not any("--bus" in getattr(param, "opts", ()) for param in command.params)
    }
    # a group named in the README stands for all its commands
    assert {path if path.split()[0] not in named else path.split()[0] for path in without_bus} == named


def test_no_doc_tells_users_to_install_forseti_from_the_package_index() -> None:
    # the name forseti on PyPI is an unrelated project: `pip install forseti[edge]` installed it
    docs = [REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "examples").glob("*")]
    trap = re.compile(r"pip install\s+['\"]?forseti(?![-\w])")
    found = [
        f"{path.name}: {line.strip()}" for path in docs for line in path.read_text().splitlines() if trap.search(line)
    ]
    assert not found, found
    assert 'name = "forseti-worker"' in (REPO / "pyproject.toml").read_text()
