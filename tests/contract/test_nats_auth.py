"""A nats-server that lets nobody in without credentials (issue 14): a client without them is
refused, one with them runs the whole path (a task trained, its model signed, stored encrypted,
announced, fetched and served by an edge agent) over mutual TLS. Certificates are made per test by
trustme; the nkey pair by nkeys."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nkeys  # type: ignore[import-untyped]
import pytest
import trustme

from forseti.adapters import signing
from forseti.adapters.bus import Bus, create_bus
from forseti.adapters.bus.servers import NatsServer, free_port
from forseti.adapters.encryption import Keyring, new_key
from forseti.adapters.signing import TrustedKeys
from forseti.schemas.catalog import LOADED, MODELS
from forseti.schemas.envelope import decode
from forseti.schemas.errors import BusError, InvalidTask
from forseti.schemas.models import ModelAvailable, ModelLoaded
from forseti.worker.handlers.training import TrainingHandler
from forseti.worker.services.edge import EdgeAgent

from ..helpers import Inbox, Watcher, breast_cancer_training, running_worker, submit, watch


class Pki:
    """A CA and the server's and a client's certificates, as PEM files under `folder`."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA()
        self.ca = folder / "ca.pem"
        ca.cert_pem.write_to_path(str(self.ca))
        server = ca.issue_cert("127.0.0.1")
        self.server_cert, self.server_key = folder / "server.pem", folder / "server.key"
        server.cert_chain_pems[0].write_to_path(str(self.server_cert))
        server.private_key_pem.write_to_path(str(self.server_key))
        client = ca.issue_cert("forseti-worker")
        self.client_cert, self.client_key = folder / "client.pem", folder / "client.key"
        client.cert_chain_pems[0].write_to_path(str(self.client_cert))
        client.private_key_pem.write_to_path(str(self.client_key))

    def server_config(self) -> str:
        """nats-server's tls block: its certificate, and clients must show one from the same CA."""
        files = {"cert_file": self.server_cert, "key_file": self.server_key, "ca_file": self.ca}
        return "tls {\n" + "".join(f"  {k}: {json.dumps(str(v))}\n" for k, v in files.items()) + "  verify: true\n}\n"

    def query(self, *, client: bool = True) -> str:
        """The bus URL settings that trust this CA (and show the client's certificate)."""
        q = f"tls_ca={self.ca}"
        return q + (f"&tls_cert={self.client_cert}&tls_key={self.client_key}" if client else "")


async def refused(url: str, reason: str | None = None) -> None:
    """Connecting with `url` fails with a BusError that says `reason`."""
    bus = create_bus(url + ("&" if "?" in url else "?") + "connect_timeout=2")
    with pytest.raises(BusError, match=reason):
        await bus.connect()
    await bus.close()


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


async def test_a_tls_server_with_passwords_refuses_strangers_and_runs_the_whole_path_for_its_users(
    tmp_path: Path, pki: Pki
) -> None:
    users = 'authorization {\n  users = [ {user: worker, password: "w-pass"}, {user: device, password: "d-pass"} ]\n}\n'
    with NatsServer(tmp_path / "nats", free_port(), config=pki.server_config() + users) as server:
        host = f"127.0.0.1:{server.port}"
        await refused(f"nats://{host}")  # plain text to a TLS server
        await refused(f"tls://{host}?{pki.query()}", "[Aa]uthorization")  # no password
        await refused(f"tls://worker:wrong@{host}?{pki.query()}", "[Aa]uthorization")
        await refused(f"tls://worker:w-pass@{host}?{pki.query(client=False)}")  # no client certificate

        worker_bus = create_bus(f"tls://worker:w-pass@{host}?{pki.query()}")
        client = create_bus(f"tls://device:d-pass@{host}?{pki.query()}")
        await client.connect()
        private, public = signing.generate(tmp_path / "keys")
        data_key = new_key()  # what the worker stores is encrypted; the device holds the key
        device = EdgeAgent(
            client,
            device_id="tls-dev",
            data_dir=tmp_path / "device",
            trusted=TrustedKeys.from_paths([public]),
            keyring=Keyring.parse(data_key, where="test"),
        )
        await device.start()
        try:
            announced, reports = Inbox(), Watcher()
            await client.subscribe(MODELS, announced.on_message)
            await client.subscribe(LOADED, reports.on_message)
            async with running_worker(
                worker_bus, [TrainingHandler()], tmp_path / "worker", signing_key=private, encryption_key=data_key
            ):
                task = breast_cancer_training("tls-1", epochs=2).model_copy(update={"device_id": "tls-dev"})
                watcher = await watch(client, "tls-1")
                await submit(client, task)
                await watcher.wait_for("completed", timeout=120)
                event = await onnx_announcement(announced)
                assert event.uri.startswith("nats-object://"), "fetched through the object store, over TLS"
                report = await reports.wait_until(
                    lambda es: [e for e in es if isinstance(e.data, ModelLoaded)], timeout=60
                )
            assert report[0].data.ok, report[0].data.message
            assert device.current[event.name].model_id == event.model_id, "the device serves the signed model"
            assert list((tmp_path / "device" / "fetched").rglob("*.onnx"))
        finally:
            await device.stop()
            await client.close()


async def onnx_announcement(inbox: Inbox) -> ModelAvailable:
    """The first model.available of an ONNX file among what `inbox` holds."""
    for raw in await inbox.wait_count(1):
        try:
            event = decode(raw, expect=ModelAvailable).data
        except InvalidTask:  # another event of the models channel
            continue
        if event.format == "onnx":
            return event
    raise AssertionError("no ONNX model announced")


async def test_an_nkey_user_gets_in_with_its_seed_and_nobody_else_does(tmp_path: Path) -> None:
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    user = nkeys.from_seed(bytearray(seed))
    seed_file = tmp_path / "worker.nk"
    seed_file.write_bytes(seed)
    seed_file.chmod(0o600)
    config = f"authorization {{\n  users = [ {{nkey: {user.public_key.decode()}}} ]\n}}\n"
    with NatsServer(tmp_path / "nats", free_port(), config=config) as server:
        await refused(server.url, "[Aa]uthorization")
        await refused(f"{server.url}?nkey_seed={tmp_path / 'missing.nk'}", "no file")
        bus: Bus = create_bus(f"{server.url}?nkey_seed={seed_file}")
        await bus.connect()
        try:
            inbox = Inbox()
            await bus.subscribe("forseti.test.nkey", inbox.on_message)
            await bus.publish("forseti.test.nkey", b"signed in")
            assert await inbox.wait_count(1) == [b"signed in"]
        finally:
            await bus.close()


async def test_a_token_server_takes_the_token_as_the_urls_user(tmp_path: Path) -> None:
    with NatsServer(tmp_path / "nats", free_port(), config='authorization {\n  token: "t0ken-s3cret"\n}\n') as server:
        await refused(server.url, "[Aa]uthorization")
        bus = create_bus(server.url.replace("nats://", "nats://t0ken-s3cret@"))
        await bus.connect()
        await bus.close()
