"""One data-parallel training run for `bench/scale.py`, two ways:

    python bench/ddp_rank.py forseti FOLDER WORLD_SIZE OUT      # Forseti's train(): it launches the ranks
    torchrun --nproc-per-node=N bench/ddp_rank.py torchrun FOLDER N OUT   # each rank runs fit() itself

Both train the same classifier on FOLDER/rows.json with the same loop (`training_loop.fit`) and write
their figures as JSON to OUT (rank 0): wall time (Forseti: from the call to train()), training time,
samples/s, and for torchrun the time each rank spent preparing its data before training.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch.distributed as dist

from forseti.schemas.tasks import TrainingTask
from forseti.worker.engine.context import SafePoints
from forseti.worker.handlers.training_loop import fit, train
from forseti.worker.handlers.training_models import Prepared, prepare


class Quiet(SafePoints):
    """A job context that keeps nothing: the benchmark reads the returned Stats."""

    def __init__(self) -> None:
        super().__init__()
        self.job_id, self.memory_limit = "scale-ddp", 16 * 2**30

    def progress(self, fraction: float, **_: object) -> None:
        """Progress is not needed here."""

    def checkpointed(self, step: int) -> None:
        """Neither are checkpoints."""


def prepared_job(folder: Path, world_size: int) -> tuple[TrainingTask, Prepared]:
    """The task and its prepared data, as a worker would hold them."""
    from scale import DDP_CONFIG

    config = {**DDP_CONFIG, "distributed": world_size > 1, "world_size": world_size}
    task = TrainingTask.model_validate(
        {"model_type": "classifier", "config": config, "data_sources": [{"uri": "file://rows.json", "target": "label"}]}
    )
    rows = json.loads((folder / "rows.json").read_text())
    return task, prepare(task, rows)


def main(mode: str, folder: Path, world_size: int, out: Path) -> None:
    started = time.perf_counter()
    task, prepared = prepared_job(folder, world_size)
    prep = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as checkpoints:
        if mode == "forseti":
            start = time.perf_counter()
            stats = train(task.config, Quiet(), prepared, Path(checkpoints))
            wall = time.perf_counter() - start
            out.write_text(
                json.dumps(
                    {
                        "wall": wall,
                        "training": stats.training_time_ms / 1000,
                        "samples_per_second": stats.samples_per_second,
                    }
                )
            )
            return
        dist.init_process_group("gloo")
        stats = fit(task.config, Quiet(), prepared, Path(checkpoints))  # rank 0 writes; nobody resumes
        if dist.get_rank() == 0:
            out.write_text(json.dumps({"training": stats.training_time_ms / 1000, "prep": prep}))
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
