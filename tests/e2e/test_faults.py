"""The CI-sized run of bench/faults.py: its `combined` scenario (worker SIGKILL, SIGSTOP past the
lease, nats-server restart, executor SIGKILL, a cut connection) on a small workload, checked the
same way as the full bench: nothing lost, nothing duplicated, nothing stuck, and no job taken over
lost more than one checkpoint interval of work."""

from __future__ import annotations

import sys
from pathlib import Path

from forseti.adapters.bus.servers import NatsServer, free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import faults  # bench/ is not a package; its scripts import their neighbours by name


async def test_every_nemesis_in_turn_loses_duplicates_and_strands_nothing(tmp_path: Path, postgres_url: str) -> None:
    nats = NatsServer(tmp_path / "nats", port=free_port()).start()
    try:
        outcome = await faults.scenario(
            "combined", 30, tmp_path, nats, postgres_url, seed=7, every=3.0, most=5, waves=6
        )
    finally:
        nats.stop()
    assert outcome.faults == 5, f"each of the five nemeses struck once: {outcome}"
    assert (outcome.lost, outcome.duplicated, outcome.stuck) == (0, 0, 0), outcome
    assert not outcome.failed, f"jobs failed under the faults: {outcome.failed}"
    assert all(lost <= 1.0 for lost in outcome.work_lost), f"work lost at takeover, in intervals: {outcome.work_lost}"
