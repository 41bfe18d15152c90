"""A torch module to ONNX with the TorchScript exporter, batch dimension dynamic."""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import torch

OPSET = 17

_EXPORTING = threading.Lock()
"""One export at a time in a process: `torch.onnx.export` keeps process-global state (its
`GLOBALS.in_onnx_export` flag; concurrent jobs failed with "in_onnx_export must be False"), and
`warnings.catch_warnings` swaps a process-global filter list."""


def torch_to_onnx(
    module: torch.nn.Module,
    example: torch.Tensor,
    path: Path,
    input_name: str,
    output_name: str | list[str],
    *,
    quiet_tracer: bool = False,
) -> Path:
    """Export `module` (one input; one output, or a tuple of them named by `output_name`) to `path`.
    Every caller checks the graph against the module afterwards, which is what proves it right."""
    outputs = [output_name] if isinstance(output_name, str) else output_name
    with _EXPORTING, warnings.catch_warnings():
        # torch >= 2.9 marks the TorchScript exporter deprecated; the new one needs onnxscript and is
        # much slower for a small MLP
        warnings.filterwarnings(
            "ignore", message="You are using the legacy TorchScript-based ONNX export", category=DeprecationWarning
        )
        warnings.filterwarnings("ignore", message="The feature will be removed", category=DeprecationWarning)
        # an LSTM's export warns that other batch sizes "can" fail; the parity check that follows
        # every export runs the whole test set at once, which settles it
        warnings.filterwarnings("ignore", message="Exporting a model to ONNX with a batch_size other than 1")
        if quiet_tracer:
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # type: ignore[attr-defined]
        torch.onnx.export(
            module,
            (example,),
            path,
            input_names=[input_name],
            output_names=outputs,
            dynamic_axes={name: {0: "batch"} for name in [input_name, *outputs]},
            opset_version=OPSET,
            dynamo=False,
        )
    return path
