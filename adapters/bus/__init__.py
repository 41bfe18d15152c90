"""Bus transports behind one interface: `memory://`, `nats://`, `kafka://`."""

from __future__ import annotations

from urllib.parse import urlsplit

from forseti.adapters.urls import redact

from .base import Bus, Delivery, Message, MessageHandler, Settle, Subscription, TaskIntake
from .memory import MemoryBroker, MemoryBus
from .settings import BusSettings

SCHEMES = ("memory", "nats", "tls", "kafka")


def create_bus(url: str, *, broker: MemoryBroker | None = None) -> Bus:
    """A bus for a URL (not yet connected); query parameters set BusSettings."""
    base, settings = BusSettings.from_url(url)
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        return MemoryBus(broker, url="memory://")
    if scheme in ("nats", "tls"):  # tls://: NATS over TLS
        from .nats import NatsBus

        return NatsBus(base, settings=settings)
    if scheme == "kafka":
        from .kafka import KafkaBus

        return KafkaBus(base, settings=settings)
    raise ValueError(f"unknown bus URL {redact(url)!r}: use one of {', '.join(s + '://' for s in SCHEMES)}")


__all__ = [
    "Bus",
    "BusSettings",
    "Delivery",
    "MemoryBroker",
    "MemoryBus",
    "Message",
    "MessageHandler",
    "Settle",
    "Subscription",
    "TaskIntake",
    "create_bus",
]
