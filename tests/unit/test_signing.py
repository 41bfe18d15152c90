"""Signed announcements (issue 14): a worker signs every model.available it publishes, and a consumer
that trusts its key acts on nothing else. Before, any client on the bus could announce a model of
its own to a device, which loaded it."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import rfc8785
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from forseti.adapters import signing
from forseti.adapters.bus import MemoryBroker, MemoryBus
from forseti.adapters.signing import Signer, TrustedKeys
from forseti.schemas.catalog import LOADED, MODELS
from forseti.schemas.envelope import decode, encode
from forseti.schemas.errors import ForsetiError
from forseti.schemas.models import ModelAvailable, ModelLoaded, ModelRollback
from forseti.worker.handlers.training import TrainingHandler
from forseti.worker.services.edge import EdgeAgent

from ..helpers import Inbox, Watcher, breast_cancer_training, running_worker, submit, tiny_announcement, watch


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return signing.generate(tmp_path / "keys")


def verify_as_a_third_party(raw: bytes, public_pem: bytes) -> bool:
    """docs/security.md's recipe, with no Forseti code: drop the two attributes, canonicalise, verify."""
    event = json.loads(raw)
    signature = base64.b64decode(event.pop("signature"))
    key_id = event.pop("signingkey")
    public = load_pem_public_key(public_pem)
    raw_public = public.public_bytes_raw()  # type: ignore[union-attr]
    assert key_id == hashlib.sha256(raw_public).hexdigest()[:16]
    try:
        public.verify(signature, rfc8785.dumps(event))  # type: ignore[union-attr,call-arg]
    except Exception:
        return False
    return True


def test_a_signed_event_verifies_and_any_change_breaks_it(keys: tuple[Path, Path], tmp_path: Path) -> None:
    signer = Signer.from_file(keys[0])
    trusted = TrustedKeys.from_paths([keys[1].parent])
    raw = signer.sign(encode(tiny_announcement(tmp_path, "m-1", device_id="d1"), subject="m-1"))
    assert trusted.verify(raw) == signer.key_id
    assert verify_as_a_third_party(raw, keys[1].read_bytes())
    assert decode(raw, expect=ModelAvailable).data.model_id == "m-1", "the signed event still decodes"

    doc = json.loads(raw)
    doc["data"]["uri"] = "nats-object://forseti-artifacts/../../../etc/cron.d/x"
    with pytest.raises(ForsetiError, match="does not match its content") as changed:
        trusted.verify(json.dumps(doc).encode())
    assert changed.value.code == "invalid_model"
    assert not verify_as_a_third_party(json.dumps(doc).encode(), keys[1].read_bytes())
    with pytest.raises(ForsetiError, match="not signed"):
        trusted.verify(encode(tiny_announcement(tmp_path, "m-2", device_id="d1")))
    stranger = Signer.from_file(signing.generate(tmp_path / "stranger")[0])
    with pytest.raises(ForsetiError, match="not trusted here"):
        trusted.verify(stranger.sign(encode(tiny_announcement(tmp_path, "m-3", device_id="d1"))))


def test_key_files_that_hold_no_ed25519_key_are_refused_with_their_path(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.pub"
    bogus.write_text("not a key")
    with pytest.raises(ForsetiError, match=f"trusted key {bogus}"):
        TrustedKeys.from_paths([bogus])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ForsetiError, match=r"no \*\.pub file"):
        TrustedKeys.from_paths([tmp_path / "empty"])
    with pytest.raises(ForsetiError, match="signing key"):
        Signer.from_file(bogus)
    private, public = signing.generate(tmp_path / "k")
    assert private.stat().st_mode & 0o077 == 0, "the private key is its owner's alone"
    assert signing.generate(tmp_path / "k") == (private, public), "an existing pair is kept"


async def test_a_worker_with_a_key_signs_what_it_announces(keys: tuple[Path, Path], tmp_path: Path) -> None:
    broker = MemoryBroker()
    client = MemoryBus(broker)
    await client.connect()
    announced = Inbox()
    await client.subscribe(MODELS, announced.on_message)
    async with running_worker(MemoryBus(broker), [TrainingHandler()], tmp_path / "w", signing_key=keys[0]):
        events = await watch(client, "signed-1")
        await submit(client, breast_cancer_training("signed-1", epochs=1))
        await events.wait_end()
    raws = await announced.wait_count(1)
    trusted = TrustedKeys.from_paths([keys[1]])
    assert all(trusted.verify(raw) for raw in raws)
    assert all(verify_as_a_third_party(raw, keys[1].read_bytes()) for raw in raws)
    await client.close()


async def test_an_edge_agent_that_trusts_a_key_acts_only_on_what_it_signed(
    keys: tuple[Path, Path], tmp_path: Path
) -> None:
    """Any client could announce its own model to a device, which fetched and served it."""
    broker = MemoryBroker()
    attacker = MemoryBus(broker)
    await attacker.connect()
    reports = Watcher()
    await attacker.subscribe(LOADED, reports.on_message)
    agent_bus = MemoryBus(broker)
    await agent_bus.connect()
    trusted = TrustedKeys.from_paths([keys[1].parent])
    agent = EdgeAgent(agent_bus, device_id="d1", data_dir=tmp_path / "edge", trusted=trusted)
    await agent.start()
    signer = Signer.from_file(keys[0])
    stranger = Signer.from_file(signing.generate(tmp_path / "stranger")[0])

    async def report(model_id: str) -> Any:
        found = await reports.wait_until(
            lambda es: [e for e in es if isinstance(e.data, ModelLoaded) and e.data.model_id == model_id]
        )
        return found[0].data

    try:
        forged = tiny_announcement(tmp_path / "attacker", "forged", device_id="d1")
        await attacker.publish(MODELS, encode(forged, subject="forged"))
        await attacker.publish(MODELS, stranger.sign(encode(forged.model_copy(update={"model_id": "by-stranger"}))))
        for model_id, reason in (("forged", "not signed"), ("by-stranger", "not trusted here")):
            refused = await report(model_id)
            assert not refused.ok and refused.message.startswith("invalid_model") and reason in refused.message
        assert "tiny" not in agent.current, "nothing forged is served"

        genuine = tiny_announcement(tmp_path / "worker", "genuine", device_id="d1")
        await attacker.publish(MODELS, signer.sign(encode(genuine, subject="genuine")))
        assert (await report("genuine")).ok
        assert agent.current["tiny"].model_id == "genuine"

        back = ModelRollback(name="tiny", from_version="1", to_version="0", model_id="forged")
        await attacker.publish(MODELS, encode(back))
        about_forged = await reports.wait_until(
            lambda es: [e for e in es if isinstance(e.data, ModelLoaded) and e.data.model_id == "forged"], count=2
        )
        assert "not signed" in about_forged[1].data.message
        assert agent.current["tiny"].model_id == "genuine", "a forged rollback moves nothing"
    finally:
        await agent.stop()
        for bus in (agent_bus, attacker):
            await bus.close()
