"""Unit-test fixtures: one in-process broker per test and a connected client on it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from forseti.adapters.bus import MemoryBroker, MemoryBus


@pytest.fixture
def broker() -> MemoryBroker:
    """The in-process server a test's workers and clients share."""
    return MemoryBroker()


@pytest.fixture
async def client(broker: MemoryBroker) -> AsyncIterator[MemoryBus]:
    """A connected client of the test's broker."""
    bus = MemoryBus(broker)
    await bus.connect()
    yield bus
    await bus.close()


@pytest.fixture
def data_root(tmp_path: Path, tiny_llama: Path) -> Path:
    """The worker's data root (`tmp_path/datasets`) with the tiny LLM and two fine-tune datasets."""
    from ..llm import data_root_with_tiny_llama

    return data_root_with_tiny_llama(tmp_path, tiny_llama)
