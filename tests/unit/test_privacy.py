"""Privacy requests on one host (the memory bus): rectify replaces a dataset and trains again; an export
stays on the host's disk; erase empties the bus's kept history too; a request played again, or too
old, is refused (issue 14)."""

from __future__ import annotations

import csv
import tarfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
from sklearn.datasets import load_breast_cancer

from forseti.adapters import signing
from forseti.adapters.bus import MemoryBroker, MemoryBus
from forseti.adapters.registry import create_store
from forseti.adapters.signing import Signer
from forseti.schemas.catalog import MODELS, PRIVACY, receipts_channel
from forseti.schemas.envelope import encode
from forseti.schemas.privacy import PrivacyErase, PrivacyExport, PrivacyRectify
from forseti.schemas.tasks import TrainingTask
from forseti.worker.cli.privacy import ask, gather_export
from forseti.worker.handlers.training import TrainingHandler

from ..helpers import Watcher, running_worker, submit, watch


def dataset(path: Path, rows: int) -> None:
    cancer = load_breast_cancer()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["f0", "f1", "f2", "label"])
        for row, label in list(zip(cancer.data, cancer.target, strict=True))[:rows]:
            writer.writerow([*row[:3], int(label)])


async def test_rectify_replaces_the_dataset_trains_again_and_marks_the_old_model(tmp_path: Path) -> None:
    broker = MemoryBroker()
    client = MemoryBus(broker)
    await client.connect()
    private, public = signing.generate(tmp_path / "keys")
    operator = Signer.from_file(private)
    dataset(tmp_path / "datasets" / "carol.csv", rows=120)
    dataset(tmp_path / "datasets" / "carol-fixed.csv", rows=180)
    carol = TrainingTask.model_validate(
        {
            "request_id": "carol-1",
            "user_id": "carol",
            "model_type": "classifier",
            "config": {"epochs": 1, "hidden": [4]},
            "data_sources": [{"uri": "carol.csv", "target": "label"}],
        }
    )
    async with running_worker(MemoryBus(broker), [TrainingHandler()], tmp_path, operator_keys=[public]):
        events = await watch(client, "carol-1")
        await submit(client, carol)
        first = (await events.wait_end()).data.result.metrics.custom_metrics["test_rows"]
        rectify = PrivacyRectify(
            request_id="rect-1", user_id="carol", dataset="carol.csv", replacement="carol-fixed.csv"
        )
        retrain_id = "carol-1.rectified-rect-1"
        retrained = await watch(client, retrain_id)
        (receipt,) = await ask(client, rectify, operator, quiet=0.5, timeout=10)
        assert receipt.error is None and receipt.retrains == [retrain_id]
        done = (await retrained.wait_end()).data
        assert done.result.metrics.custom_metrics["test_rows"] == first * 1.5, "the retrain read the corrected file"
        store = create_store(str(tmp_path / "registry.db"))
        await store.open()
        marks = {m.job_id: m.erased_lineage for m in await store.models_of("carol", ["carol-1", retrain_id])}
        await store.close()
        assert marks["carol-1"] and "rectify rect-1" in marks["carol-1"] and marks[retrain_id] is None
        (again,) = await ask(client, rectify, operator, quiet=0.5, timeout=10)
        assert again.error == "forbidden: request rect-1 was answered already"

        export = PrivacyExport(request_id="exp-1", user_id="carol")
        (part,) = await ask(client, export, operator, quiet=0.5, timeout=10)
        assert part.archive_uri and part.archive_uri.startswith("file://"), "no shared store: kept on this host"
        manifest = await gather_export(client, [part], tmp_path / "carol.tar.gz")
        with tarfile.open(tmp_path / "carol.tar.gz") as tar:
            assert any(n.endswith("disk/datasets/carol.csv") for n in tar.getnames())
        assert manifest["parts"][0]["found"]["registry.jobs"] == 2
        assert not list((tmp_path / "privacy").glob("*.tar.gz")), "the part is removed once fetched"

        stale = Watcher()
        await client.subscribe(receipts_channel("old-1"), stale.on_message)
        old = orjson.loads(encode(PrivacyExport(request_id="old-1", user_id="carol"), subject="old-1"))
        old["time"] = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
        await client.publish(PRIVACY, operator.sign(orjson.dumps(old)))
        (refused,) = await stale.wait_until(lambda es: es)
        assert "is not within" in refused.data.error

        announced = [raw for raw in broker.records[MODELS].items if raw and b"carol" in raw]
        assert announced, "the bus keeps carol's announcements"
        (erased,) = await ask(
            client, PrivacyErase(request_id="erase-1", user_id="carol"), operator, quiet=0.5, timeout=10
        )
        assert erased.error is None and erased.removed["bus.history"] == len(announced)
        assert erased.removed["registry.jobs"] == 2 and not (tmp_path / "datasets" / "carol.csv").exists()
        assert not [raw for raw in broker.records[MODELS].items if raw and b"carol" in raw]
    store = create_store(str(tmp_path / "registry.db"))
    await store.open()
    try:
        assert await store.models_of("carol", ["carol-1", retrain_id]) == []
        assert all(r.user_hash != "carol" for r in await store.list_privacy())
    finally:
        await store.close()
    await client.close()
