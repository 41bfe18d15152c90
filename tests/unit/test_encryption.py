"""Encryption at rest (issue 14): AES-GCM in authenticated chunks, key rotation, and refusals that
say why a file cannot be decrypted."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from forseti.adapters.bus import MemoryBroker, MemoryBus
from forseti.adapters.encryption import CHUNK, HEADER, TAG, Keyring, encrypted, new_key
from forseti.schemas.errors import ForsetiError
from forseti.schemas.tasks import TrainingTask
from forseti.worker.handlers.training import TrainingHandler

from ..helpers import running_worker, submit, watch


def keyring(*keys: str) -> Keyring:
    return Keyring.parse(",".join(keys), where="test")


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + CHUNK // 2])
def test_a_file_of_any_size_comes_back_whole(tmp_path: Path, size: int) -> None:
    ring = keyring(new_key())
    data = os.urandom(size)
    (tmp_path / "plain").write_bytes(data)
    ring.encrypt(tmp_path / "plain", tmp_path / "sealed")
    sealed = (tmp_path / "sealed").read_bytes()
    assert encrypted(tmp_path / "sealed") and not encrypted(tmp_path / "plain")
    chunks = max(1, -(-size // CHUNK))
    assert len(sealed) == HEADER.size + size + chunks * TAG
    if size >= 16:  # a shorter plaintext may turn up in random ciphertext by chance
        assert data[:64] not in sealed
    ring.decrypt(tmp_path / "sealed", tmp_path / "again")
    assert (tmp_path / "again").read_bytes() == data


def test_a_changed_cut_reordered_or_foreign_file_is_refused(tmp_path: Path) -> None:
    ring = keyring(new_key())
    (tmp_path / "plain").write_bytes(os.urandom(2 * CHUNK + 5))
    ring.encrypt(tmp_path / "plain", tmp_path / "sealed")
    sealed = (tmp_path / "sealed").read_bytes()
    body = HEADER.size
    first, second = sealed[body : body + CHUNK + TAG], sealed[body + CHUNK + TAG : body + 2 * (CHUNK + TAG)]
    forgeries = {
        "flipped": sealed[:-1] + bytes([sealed[-1] ^ 1]),
        "cut": sealed[: body + 2 * (CHUNK + TAG)],  # the last chunk dropped: the one before is not marked last
        "reordered": sealed[:body] + second + first + sealed[body + 2 * (CHUNK + TAG) :],
        "header": sealed[:8] + bytes([sealed[8] ^ 1]) + sealed[9:],
    }
    for name, forged in forgeries.items():
        (tmp_path / name).write_bytes(forged)
        with pytest.raises(ForsetiError, match="cannot decrypt") as refused:
            ring.decrypt(tmp_path / name, tmp_path / "out")
        assert refused.value.code == "invalid_data", name
    with pytest.raises(ForsetiError, match="does not hold"):
        keyring(new_key()).decrypt(tmp_path / "sealed", tmp_path / "out")
    with pytest.raises(ForsetiError, match="not encrypted by Forseti"):
        ring.decrypt(tmp_path / "plain", tmp_path / "out")


def test_a_rotated_keyring_encrypts_with_its_new_key_and_still_reads_the_old(tmp_path: Path) -> None:
    old, new = new_key(), new_key()
    (tmp_path / "plain").write_bytes(b"weights")
    keyring(old).encrypt(tmp_path / "plain", tmp_path / "by-old")
    rotated = keyring(new, old)
    rotated.encrypt(tmp_path / "plain", tmp_path / "by-new")
    for sealed in ("by-old", "by-new"):
        rotated.decrypt(tmp_path / sealed, tmp_path / "out")
        assert (tmp_path / "out").read_bytes() == b"weights"
    with pytest.raises(ForsetiError, match="does not hold"):
        keyring(old).decrypt(tmp_path / "by-new", tmp_path / "out")


def test_keys_come_from_a_value_or_a_file_and_bad_ones_are_named(tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text(f"# rotated 2026-12\n{new_key()}\n{new_key()}\n")
    ring = Keyring.load(value=new_key(), file=key_file)
    assert ring is not None and len(ring.keys) == 3
    assert Keyring.load() is None
    with pytest.raises(ForsetiError, match="32 bytes"):
        Keyring.parse(base64.b64encode(b"short").decode(), where="x")
    with pytest.raises(ForsetiError, match="not base64"):
        Keyring.parse("not base64!", where="x")
    with pytest.raises(ForsetiError, match="encryption key file"):
        Keyring.load(file=tmp_path / "missing")


async def test_a_dataset_stored_encrypted_is_read_by_a_worker_with_the_key_only(tmp_path: Path) -> None:
    """Datasets lay in the data root as plain files; one may now be put there encrypted (issue 14)."""
    key = new_key()
    rows = tmp_path / "datasets" / "secret.csv"
    rows.parent.mkdir()
    rows.write_text("a,b,label\n" + "".join(f"{i % 7},{(i * 3) % 5},{i % 2}\n" for i in range(120)))
    keyring(key).encrypt(rows, rows.with_suffix(".sealed"))
    rows.with_suffix(".sealed").replace(rows)
    task = TrainingTask.model_validate(
        {
            "model_type": "classifier",
            "config": {"epochs": 1, "hidden": [4]},
            "data_sources": [{"uri": "secret.csv", "target": "label"}],
        }
    )
    broker = MemoryBroker()
    client = MemoryBus(broker)
    await client.connect()
    for held, expect in ((key, "completed"), (None, "failed")):
        job_id = f"secret-{expect}"
        job = task.model_copy(update={"request_id": job_id})
        folder = tmp_path / expect
        async with running_worker(
            MemoryBus(broker), [TrainingHandler()], folder, data_root=rows.parent, encryption_key=held
        ):
            events = await watch(client, job_id)
            await submit(client, job)
            end = (await events.wait_end(expect)).data
        if expect == "failed":
            assert end.code == "invalid_data" and "is encrypted: give the worker the data key" in end.message
        else:
            assert end.result.metrics.custom_metrics["test_rows"] > 0
            copies = list((folder / "jobs" / job_id / "inputs").iterdir())
            assert [c.name.endswith("-secret.csv") for c in copies] == [True], "decrypted in the job's own folder"
    assert encrypted(rows), "the stored dataset stays encrypted"
    await client.close()
