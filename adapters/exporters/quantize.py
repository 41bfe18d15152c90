"""Dynamic int8 quantisation of an exported ONNX graph (onnxruntime.quantization), for devices."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic


def int8_copy(path: Path, dest: Path) -> Path:
    """Write a dynamically int8-quantised copy of an ONNX file to `dest` (int8 weights, activations
    quantised as they flow), keeping the metadata that tells a consumer how to feed it."""
    quantize_dynamic(str(path), str(dest), weight_type=QuantType.QInt8)
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    model = onnx.load(str(dest))
    onnx.helper.set_model_props(model, props)
    onnx.save(model, str(dest))
    return dest
