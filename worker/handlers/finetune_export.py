"""A fine-tune's exports, each checked against torch before anything is announced.

The check loads every GGUF with llama.cpp, tokenizes a few dataset examples with both tokenizers
(the ids must be identical) and compares llama.cpp's logits at every position with the merged torch
model's. llama.cpp runs with an F32 KV cache here: its default F16 cache alone costs about 7.6e-4,
more than the f32 bound (shared/notes/gguf.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from forseti.adapters.llm.gguf import GgufType, write_lora, write_model
from forseti.adapters.llm.llama import LlamaRuntime
from forseti.schemas.errors import ErrorCode, ForsetiError

from .finetune_training import Trained

CHECK_TOKENS = 128
"""Tokens of each example the check evaluates (the start of it)."""
MAX_ABS_DIFF: dict[str, float] = {"f32": 1e-4, "f16": 5e-3, "lora": 1e-4}
"""Largest logit difference from torch each export may show."""
MIN_TOP1 = {"q8_0": 0.95, "q4_0": 0.6, "q4_k_m": 0.6}
"""Least share of positions whose most likely next token matches torch's. The 4-bit bounds are a
floor, not a proof of layout (the f32 check is that): on tiny random models, whose next-token
distributions are nearly flat, 4-bit files agreed on 69-81% (q4_0) and 80-89% (q4_k_m)."""


@dataclass(frozen=True)
class Parity:
    """How one GGUF agrees with torch."""

    max_abs_diff: float
    top1: float
    positions: int

    def passes(self, role: str) -> bool:
        """Whether this is within the bound for an export of this role (a GGUF type, or lora)."""
        if role in MIN_TOP1:
            return self.top1 >= MIN_TOP1[role]
        return self.max_abs_diff < MAX_ABS_DIFF[role]

    def bound(self, role: str) -> str:
        """The bound, for messages."""
        return f"top-1 >= {MIN_TOP1[role]:.0%}" if role in MIN_TOP1 else f"max abs diff < {MAX_ABS_DIFF[role]:g}"


@dataclass
class GgufExport:
    """The GGUF files written for one version and their check figures, by role."""

    files: dict[str, Path] = field(default_factory=dict)
    parity: dict[str, Parity] = field(default_factory=dict)

    def metrics(self, role: str) -> dict[str, float]:
        """The figures of one role for a model.available event."""
        figures = self.parity.get(role)
        if figures is None:
            return {}
        return {"parity_max_abs_diff": figures.max_abs_diff, "parity_top1": figures.top1}


def base_tensors(folder: Path) -> dict[str, np.ndarray]:
    """The base model's weights from its safetensors files, as float32 numpy."""
    from safetensors.torch import load_file

    tensors: dict[str, np.ndarray] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update({k: v.float().numpy() for k, v in load_file(path).items()})
    if not tensors:
        raise ForsetiError(f"{folder} has no .safetensors weights to export", code=ErrorCode.INVALID_MODEL)
    return tensors


def export_gguf(
    trained: Trained, folder: Path, out: Path, kinds: list[GgufType], *, adapter: bool, alpha: float, name: str
) -> tuple[GgufExport, Any]:
    """Write the requested GGUF files and check each; returns them and the merged torch model.
    Raises export_mismatch, with every figure, when any file fails its check."""
    export = GgufExport()
    lora_state = None
    if adapter:
        from peft import get_peft_model_state_dict

        lora_state = {k: v.detach().float().cpu().numpy() for k, v in get_peft_model_state_dict(trained.model).items()}
    merged = trained.model.merge_and_unload().float().cpu().eval()
    if kinds:
        state = {k: v.detach().numpy() for k, v in merged.state_dict().items()}
        for kind in kinds:
            export.files[kind] = write_model(out / f"model-{kind}.gguf", folder, state, kind, name=name)
    if lora_state is not None:
        export.files["base"] = write_model(out / "base-f32.gguf", folder, base_tensors(folder), "f32", name=name)
        export.files["lora"] = write_lora(out / "adapter-lora.gguf", folder, lora_state, alpha=alpha, name=name)
    check(export, merged, trained.tokenizer, [e.text for e in trained.examples])
    return export, merged


def check(export: GgufExport, merged: Any, tokenizer: Any, texts: list[str]) -> None:
    """Compare each GGUF with the merged torch model on `texts`; export_mismatch when any is off."""
    prompts = texts or ["Hello"]
    with torch.no_grad():
        expected = [
            (ids, merged(torch.tensor([ids])).logits[0].numpy())
            for ids in (tokenizer(text)["input_ids"][:CHECK_TOKENS] for text in prompts)
        ]
    failures = []
    for role, path in export.files.items():
        if role == "base":
            continue
        runtime = LlamaRuntime(
            export.files["base"] if role == "lora" else path,
            lora_path=path if role == "lora" else None,
            context=max(len(ids) for ids, _ in expected) + 8,
            all_logits=True,
            f32_cache=True,
        )
        try:
            worst, agree, positions = 0.0, 0, 0
            for text, (ids, logits) in zip(prompts, expected, strict=True):
                got_ids = runtime.tokenize(text)[:CHECK_TOKENS]
                if got_ids != ids:
                    failures.append(f"{role}: llama.cpp tokenizes {text[:40]!r} as {got_ids[:12]}, torch {ids[:12]}")
                    break
                got = runtime.logits(ids)
                worst = max(worst, float(np.abs(got - logits).max()))
                agree += int((got.argmax(-1) == logits.argmax(-1)).sum())
                positions += len(ids)
            else:
                export.parity[role] = figures = Parity(worst, agree / max(positions, 1), positions)
                if not figures.passes(role):
                    failures.append(
                        f"{role}: max abs diff {figures.max_abs_diff:.3g}, top-1 {figures.top1:.1%} "
                        f"over {positions} positions (needs {figures.bound(role)})"
                    )
        finally:
            runtime.close()
    if failures:
        raise ForsetiError("GGUF export does not match torch: " + "; ".join(failures), code=ErrorCode.EXPORT_MISMATCH)
