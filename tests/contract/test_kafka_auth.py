"""Kafka with SASL and TLS (issue 14), as far as the test broker goes.

Tansu 0.6, the embedded broker, can require SASL (`--authentication`), and speaks SCRAM; but its
memory store cannot hold a user across the restart that turns authentication on, and its `--cert`
is not served (the listener stays plain text). So against it these tests show that a client
without credentials is refused, that a client with them does the SCRAM exchange with the broker and
is told why it was refused, and that a TLS client never falls back to plain text. The options
handed to aiokafka for each setting are checked one by one; a successful login needs a Kafka that
stores users (docs/security.md)."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from forseti.adapters.bus import create_bus
from forseti.adapters.bus.kafka import KafkaBus
from forseti.adapters.bus.servers import TansuBroker
from forseti.schemas.errors import BusError


@pytest.fixture(scope="module")
def secured_tansu() -> Iterator[TansuBroker]:
    with TansuBroker(authentication=True) as broker:
        yield broker


async def refused(url: str, reason: str) -> None:
    bus = create_bus(url)
    with pytest.raises(BusError, match=reason):
        await bus.connect()
    await bus.close()


async def test_a_broker_that_requires_sasl_refuses_a_client_without_credentials(secured_tansu: TansuBroker) -> None:
    await refused(secured_tansu.url, "cannot reach Kafka")


async def test_a_sasl_client_logs_in_with_scram_and_hears_why_it_was_refused(secured_tansu: TansuBroker) -> None:
    """aiokafka read the broker's `e=unknown-user` as a KeyError that escaped as a traceback."""
    url = secured_tansu.url.replace("kafka://", "kafka://mallory:guess@")
    await refused(url, "refused the SASL login")
    await refused(url + "?sasl_mechanism=SCRAM-SHA-256", "refused the SASL login")


async def test_a_tls_client_does_not_fall_back_to_plain_text(tansu: TansuBroker, tmp_path: Path) -> None:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    await refused(f"{tansu.url}?tls_ca={tmp_path / 'ca.pem'}&connect_timeout=2", "cannot reach Kafka")


def options(url: str) -> dict[str, object]:
    bus = create_bus(url)
    assert isinstance(bus, KafkaBus)
    return bus._security_options()


def test_each_setting_becomes_the_aiokafka_option_it_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca = trustme.CA()
    client = ca.issue_cert("worker")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    client.cert_chain_pems[0].write_to_path(str(tmp_path / "c.pem"))
    client.private_key_pem.write_to_path(str(tmp_path / "c.key"))
    assert options("kafka://h:9092") == {"security_protocol": "PLAINTEXT"}
    sasl = options("kafka://alice:p%40ss@h:9092")
    assert sasl == {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "alice",
        "sasl_plain_password": "p@ss",
    }
    assert options("kafka://alice:pw@h:9092?sasl_mechanism=PLAIN")["sasl_mechanism"] == "PLAIN"
    tls = options(
        f"kafka://h:9093?tls_ca={tmp_path / 'ca.pem'}&tls_cert={tmp_path / 'c.pem'}&tls_key={tmp_path / 'c.key'}"
    )
    assert tls["security_protocol"] == "SSL" and isinstance(tls["ssl_context"], ssl.SSLContext)
    assert options("kafka://alice:pw@h:9093?tls=true")["security_protocol"] == "SASL_SSL"
    monkeypatch.setenv("FORSETI_BUS_PASSWORD", "from-the-environment")
    assert options("kafka://alice@h:9092")["sasl_plain_password"] == "from-the-environment"
    monkeypatch.delenv("FORSETI_BUS_PASSWORD")
    with pytest.raises(BusError, match="no password"):
        options("kafka://alice@h:9092")
    with pytest.raises(BusError, match="sasl_mechanism is one of"):
        options("kafka://alice:pw@h:9092?sasl_mechanism=GSSAPI")
    with pytest.raises(BusError, match="tls_ca: no file"):
        options(f"kafka://h:9092?tls_ca={tmp_path / 'missing.pem'}")
    bus = create_bus("kafka://alice:s3cret@h:9092")
    assert isinstance(bus, KafkaBus) and "s3cret" not in bus.shown_url and bus.bootstrap == "h:9092"
