"""Fine-tune test helpers: datasets drawn from the tiny LLM's texts, and tasks on the tiny model."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Any

from forseti.schemas.tasks import FinetuneTask

from .conftest import TINY_TEXTS


def write_dataset(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def pairs(start: int, count: int) -> list[dict[str, Any]]:
    """Prompt / response examples, every third with feedback."""
    records = []
    for i in range(start, start + count):
        prompt, _, response = TINY_TEXTS[i].partition(";")
        record: dict[str, Any] = {"prompt": prompt + ";", "response": response}
        if i % 3 == 0:
            record["feedback"] = 1 if i % 2 else -1
        records.append(record)
    return records


def data_root_with_tiny_llama(tmp_path: Path, tiny_llama: Path) -> Path:
    """A worker data root under tmp_path with the tiny model copied in (a symlink out of the root is
    refused) and two datasets, v1.jsonl (prompt / response with feedback) and v2.jsonl (text)."""
    root = tmp_path / "datasets"
    shutil.copytree(tiny_llama, root / "tiny")
    write_dataset(root / "v1.jsonl", pairs(0, 12))
    write_dataset(root / "v2.jsonl", [{"text": t} for t in TINY_TEXTS[60:72]])
    return root


def finetune(dataset: str = "v1.jsonl", **fields: Any) -> FinetuneTask:
    config = {"epochs": 2, "batch_size": 4, "learning_rate": 5e-3, "max_seq_len": 64, **fields.pop("config", {})}
    return FinetuneTask.model_validate(
        {
            "request_id": f"ft-{uuid.uuid4().hex[:8]}",
            "base_model": "file://tiny",
            "dataset": dataset if "://" in dataset else f"file://{dataset}",
            "name": "sensor-assistant",
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
            "config": config,
            **fields,
        }
    )
