"""Jobs export at once, on threads of one worker: torch's exporter keeps process-global state, and
concurrent exports failed with "GLOBALS.in_onnx_export must be False" (issue 13)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from forseti.adapters.exporters.torch_onnx import torch_to_onnx


def test_concurrent_exports_do_not_race(tmp_path: Path) -> None:
    def export_many(job: int) -> list[Path]:
        torch.manual_seed(job)
        module = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2)).eval()
        return [torch_to_onnx(module, torch.zeros(1, 8), tmp_path / f"{job}-{n}.onnx", "x", "y") for n in range(10)]

    with ThreadPoolExecutor(4) as pool:
        exported = [path for paths in pool.map(export_many, range(4)) for path in paths]
    assert len(exported) == 40
    rows = np.ones((3, 8), dtype=np.float32)
    first = ort.InferenceSession(str(tmp_path / "0-0.onnx")).run(None, {"x": rows})[0]
    assert first.shape == (3, 2), "the batch dimension stays dynamic"
