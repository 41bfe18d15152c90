"""llama.cpp (through llama-cpp-python) as a runtime: load a GGUF (optionally with a GGUF LoRA on
top), tokenize, score and complete. Used by the export check and by `forseti llm-serve`. Torch-free.

A `Llama` object is not safe to use from two threads at once; callers serialise on it (the export
check runs in one thread, llm-serve keeps one completion thread per loaded model).
"""

from __future__ import annotations

import atexit
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from forseti.schemas.errors import ErrorCode, ForsetiError

if TYPE_CHECKING:
    from llama_cpp import Llama

F32_CACHE = 0
"""GGML type id of F32, for `type_k` / `type_v`: the export check compares logits with torch at
1e-4, which llama.cpp's default F16 KV cache alone exceeds (see shared/notes/gguf.md)."""


@dataclass(frozen=True)
class Completion:
    """One completion's text and how it ended."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


@functools.cache
def llama_class() -> type[Llama]:
    """llama_cpp.Llama, imported once. llama-cpp-python opens os.devnull twice at import (to silence
    llama.cpp's C output) and never closes it, so every process that used it ended with two
    'ResourceWarning: unclosed file /dev/null' lines; they are closed at exit here."""
    import llama_cpp._utils

    def close_devnull() -> None:
        for name in ("outnull_file", "errnull_file"):
            held = getattr(llama_cpp._utils, name, None)
            if held is not None and not held.closed:
                held.close()

    atexit.register(close_devnull)
    return llama_cpp.Llama


class LlamaRuntime:
    """One loaded GGUF model (plus an optional GGUF LoRA)."""

    def __init__(
        self,
        model_path: Path,
        *,
        lora_path: Path | None = None,
        context: int = 512,
        threads: int = 1,
        all_logits: bool = False,
        f32_cache: bool = False,
    ) -> None:
        Llama = llama_class()  # the class, named as llama_cpp names it

        self.model_path, self.lora_path = model_path, lora_path
        kwargs: dict[str, Any] = {
            "model_path": str(model_path),
            "n_ctx": context,
            "n_batch": context,
            "n_threads": threads,
            "n_threads_batch": threads,
            "logits_all": all_logits,
            "verbose": False,
        }
        if lora_path is not None:
            kwargs["lora_path"] = str(lora_path)
        if f32_cache:
            kwargs["type_k"] = kwargs["type_v"] = F32_CACHE
        try:
            self._llama = Llama(**kwargs)
        except (ValueError, RuntimeError, OSError) as exc:
            what = f"{model_path}" + (f" with LoRA {lora_path}" if lora_path else "")
            raise ForsetiError(f"llama.cpp cannot load {what}: {exc}", code=ErrorCode.EXPORT_MISMATCH) from exc

    def tokenize(self, text: str) -> list[int]:
        """Token ids, with BOS when the model's metadata asks for it."""
        return list(self._llama.tokenize(text.encode(), add_bos=True, special=False))

    def logits(self, ids: list[int]) -> np.ndarray:
        """Logits at every position of `ids` (needs `all_logits=True`)."""
        self._llama.reset()  # type: ignore[no-untyped-call]
        self._llama.eval(ids)
        return np.array(self._llama.scores[: len(ids)], dtype=np.float32)

    def complete(self, prompt: str, *, max_tokens: int, temperature: float, seed: int | None = None) -> Completion:
        """Generate up to `max_tokens` after `prompt`."""
        out: Any = self._llama.create_completion(
            prompt, max_tokens=max_tokens, temperature=temperature, seed=seed, top_k=0 if temperature == 0 else 40
        )
        choice, usage = out["choices"][0], out["usage"]
        return Completion(
            text=choice["text"],
            prompt_tokens=int(usage["prompt_tokens"]),
            completion_tokens=int(usage["completion_tokens"]),
            finish_reason=str(choice.get("finish_reason") or "stop"),
        )

    def close(self) -> None:
        """Free the model and its context."""
        self._llama.close()
