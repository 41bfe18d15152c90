"""A followed message's ack is asked for again until the server confirms it: with one message in
flight, a lost ack stalls the follower for the whole ack wait (the restart test saw both cases)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from nats.aio.msg import Msg
from nats.errors import NoRespondersError

from forseti.adapters.bus.nats import NatsBus


@dataclass
class Connection:
    """Stands in for a nats-py client that has (re)connected."""

    is_closed: bool = False
    is_connected: bool = True


@dataclass
class Followed:
    """A fetched message whose first acks fail with the given errors, then succeed."""

    failures: list[Exception]
    subject: str = "forseti.models"
    asked: int = field(default=0)

    async def ack_sync(self, timeout: float = 1.0) -> Followed:
        """One ack request."""
        self.asked += 1
        if self.failures:
            raise self.failures.pop(0)
        return self


@pytest.mark.parametrize(
    "failure",
    [
        pytest.param(NoRespondersError(), id="jetstream-stopping-while-connected"),
        pytest.param(TimeoutError(), id="sent-on-the-connection-that-dropped"),
    ],
)
async def test_an_unconfirmed_ack_is_asked_again_while_connected(failure: Exception) -> None:
    bus = NatsBus("nats://127.0.0.1:4222")
    bus._nc = cast(Any, Connection())
    msg = Followed([failure])
    await bus._ack_until_stored(cast(Msg, msg))
    assert msg.asked == 2, "the follower gave up on an ack the server never confirmed"


async def test_no_ack_is_asked_for_on_a_closed_bus() -> None:
    bus = NatsBus("nats://127.0.0.1:4222")
    bus._nc = cast(Any, Connection(is_closed=True))
    msg = Followed([TimeoutError()])
    await bus._ack_until_stored(cast(Msg, msg))
    assert msg.asked == 1
