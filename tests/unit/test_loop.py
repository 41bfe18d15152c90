"""The commands' event loop: uvloop unless turned off."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from forseti.worker.engine.loop import run


async def loop_type() -> type[asyncio.AbstractEventLoop]:
    return type(asyncio.get_running_loop())


def test_commands_run_on_uvloop_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FORSETI_EVENT_LOOP", raising=False)
    assert run(loop_type()) is uvloop.Loop


def test_forseti_event_loop_asyncio_turns_uvloop_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORSETI_EVENT_LOOP", "asyncio")
    assert not issubclass(run(loop_type()), uvloop.Loop)
