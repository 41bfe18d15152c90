"""GGUF export of Llama-family models and LoRA adapters, written with the `gguf` package.

llama.cpp's `convert_hf_to_gguf.py` and `convert_lora_to_gguf.py` are the reference for what is
written here; `shared/notes/gguf.md` lists what llama.cpp refuses without, and what it loads but
computes wrong without (the explicit `tokenizer.ggml.pre`, `add_bos_token`, `output.weight` for
untied models, the q/k row permutation). Torch-free: tensors arrive as numpy arrays.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from forseti.schemas.errors import ErrorCode, ForsetiError

GgufType = Literal["f32", "f16", "q8_0", "q4_0", "q4_k_m"]
GGUF_TYPES: tuple[GgufType, ...] = get_args(GgufType)
"""The whole-model GGUF types a fine-tune exports."""
K_QUANTS = {"q4_k_m": 15}
"""Types llama.cpp's own quantiser writes from an F16 file (LlamaFileType); gguf-py has no K-quants."""
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama"}
"""Hugging Face architectures this exporter writes, and the llama.cpp architecture each becomes."""
BLOCK = 32
"""Row length a Q8_0 or Q4_0 block covers: rows that are not multiples of it are written as F16."""


def read_json(path: Path) -> dict[str, Any]:
    """A model folder's JSON object (config.json, tokenizer.json); invalid_model when it is missing or
    not a JSON object."""
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ForsetiError(
            f"{path.parent} is not a model folder: no {path.name}", code=ErrorCode.INVALID_MODEL
        ) from exc
    except (OSError, ValueError) as exc:
        raise ForsetiError(f"{path} cannot be read: {exc}", code=ErrorCode.INVALID_MODEL) from exc
    if not isinstance(value, dict):
        raise ForsetiError(f"{path} is not a JSON object", code=ErrorCode.INVALID_MODEL)
    return value


@dataclass(frozen=True)
class LlamaLayout:
    """What GGUF needs to know of a Llama-family config.json."""

    architecture: str
    blocks: int
    hidden: int
    feed_forward: int
    heads: int
    kv_heads: int
    context: int
    rms_eps: float
    rope_theta: float
    vocab_size: int
    tied: bool

    @classmethod
    def read(cls, folder: Path) -> LlamaLayout:
        """Read `folder/config.json`; invalid_model when it is missing or malformed, unsupported_model
        for an architecture this exporter does not write."""
        path = folder / "config.json"
        config = read_json(path)
        names = config.get("architectures") or []
        supported = [name for name in names if name in ARCHITECTURES]
        if not supported:
            raise ForsetiError(
                f"architecture {names or config.get('model_type')!r} cannot be exported to GGUF; "
                f"supported: {', '.join(sorted(ARCHITECTURES))}",
                code=ErrorCode.UNSUPPORTED_MODEL,
            )
        rope = config.get("rope_parameters") or {}  # transformers 5 moved rope_theta here
        try:
            heads = int(config["num_attention_heads"])
            return cls(
                architecture=ARCHITECTURES[supported[0]],
                blocks=int(config["num_hidden_layers"]),
                hidden=int(config["hidden_size"]),
                feed_forward=int(config["intermediate_size"]),
                heads=heads,
                kv_heads=int(config.get("num_key_value_heads") or heads),
                context=int(config["max_position_embeddings"]),
                rms_eps=float(config["rms_norm_eps"]),
                rope_theta=float(rope.get("rope_theta") or config.get("rope_theta") or 10_000.0),
                vocab_size=int(config["vocab_size"]),
                tied=bool(config.get("tie_word_embeddings", False)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ForsetiError(f"{path} lacks or garbles {exc}", code=ErrorCode.INVALID_MODEL) from exc


@dataclass(frozen=True)
class Vocab:
    """A byte-level BPE vocabulary as GGUF stores it."""

    tokens: list[str]
    types: list[int]
    pre: str
    adds_bos: bool

    @classmethod
    def read(cls, folder: Path, vocab_size: int) -> Vocab:
        """Read `folder/tokenizer.json`; unsupported_model for tokenizers other than byte-level BPE."""
        import gguf

        path = folder / "tokenizer.json"
        spec = read_json(path)
        model = spec.get("model") or {}
        if model.get("type") != "BPE" or not _byte_level(spec.get("pre_tokenizer")):
            raise ForsetiError(
                f"{path}: only byte-level BPE tokenizers are exported to GGUF "
                f"(found {model.get('type')!r} with pre-tokenizer {(spec.get('pre_tokenizer') or {}).get('type')!r})",
                code=ErrorCode.UNSUPPORTED_MODEL,
            )
        by_id = {int(i): t for t, i in model.get("vocab", {}).items()}
        special = set()
        for added in spec.get("added_tokens", []):
            by_id[int(added["id"])] = added["content"]
            if added.get("special"):
                special.add(int(added["id"]))
        tokens, types = [], []
        for i in range(vocab_size):
            if i in by_id:
                tokens.append(by_id[i])
                types.append(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL)
            else:  # embedding rows past the tokenizer, as convert_hf_to_gguf pads them
                tokens.append(f"[PAD{i}]")
                types.append(gguf.TokenType.UNUSED)
        processor = spec.get("post_processor") or {}
        single = processor.get("single") or [{}]
        adds_bos = processor.get("type") == "TemplateProcessing" and "SpecialToken" in single[0]
        return cls(tokens=tokens, types=[int(t) for t in types], pre="gpt-2", adds_bos=adds_bos)


def _byte_level(pre: dict[str, Any] | None) -> bool:
    """Whether a pre-tokenizer is GPT-2's: ByteLevel with its regex (alone or in a Sequence)."""
    if not pre:
        return False
    if pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers") or []
        return len(steps) == 1 and _byte_level(steps[0])
    return pre.get("type") == "ByteLevel" and bool(pre.get("use_regex", True))


def permute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Hugging Face's rotate-half q/k rows to GGML's interleaved rope layout."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


class TensorNames:
    """Hugging Face tensor names to GGUF ones, with the q/k permutation each needs."""

    def __init__(self, layout: LlamaLayout) -> None:
        import gguf

        self.layout = layout
        self._map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layout.blocks)

    def gguf_name(self, hf_name: str) -> str:
        """`model.layers.0.self_attn.q_proj.weight` -> `blk.0.attn_q.weight`."""
        name = self._map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ForsetiError(f"tensor {hf_name!r} has no GGUF name", code=ErrorCode.UNSUPPORTED_MODEL)
        return name

    def permute(self, hf_name: str, rows: np.ndarray) -> np.ndarray:
        """Rows of q or k projections in GGML's order; others unchanged."""
        if ".q_proj." in hf_name:
            return permute_rows(rows, self.layout.heads)
        if ".k_proj." in hf_name:
            return permute_rows(rows, self.layout.kv_heads)
        return rows


def _encode(array: np.ndarray, kind: GgufType) -> tuple[np.ndarray, Any]:
    """The bytes and GGML type of one tensor: norms and other 1-D tensors stay F32."""
    import gguf

    if kind == "f32" or array.ndim == 1:
        return array.astype(np.float32), None
    qtypes = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}
    if kind in qtypes and array.shape[-1] % BLOCK == 0:
        return gguf.quants.quantize(array.astype(np.float32), qtypes[kind]), qtypes[kind]
    return array.astype(np.float16), None


FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, **K_QUANTS}
"""`general.file_type` per export type (llama.cpp's LlamaFileType)."""


def write_model(
    path: Path,
    folder: Path,
    tensors: Mapping[str, np.ndarray] | Callable[[], Iterator[tuple[str, np.ndarray]]],
    kind: GgufType,
    *,
    name: str,
) -> Path:
    """Write a whole model as GGUF: metadata from `folder`'s config.json and tokenizer, weights from
    `tensors` (Hugging Face names, float arrays). Written to a temporary name, then renamed. K-quants
    are written as F16 first and quantised by llama.cpp (llama-cpp-python)."""
    import gguf

    if kind in K_QUANTS:
        f16 = write_model(path.with_name(path.name + ".f16"), folder, tensors, "f16", name=name)
        try:
            return llama_quantize(f16, path, K_QUANTS[kind])
        finally:
            f16.unlink(missing_ok=True)

    layout = LlamaLayout.read(folder)
    vocab = Vocab.read(folder, layout.vocab_size)
    names = TensorNames(layout)
    partial = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(partial, layout.architecture)
    # general.* as llama.cpp's convert_hf_to_gguf.py writes them: tools that list or filter GGUF files
    # (the Hub's viewer, LM Studio, ollama) read type and quantization_version beside name and file_type
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(layout.context)
    writer.add_embedding_length(layout.hidden)
    writer.add_block_count(layout.blocks)
    writer.add_feed_forward_length(layout.feed_forward)
    writer.add_head_count(layout.heads)
    writer.add_head_count_kv(layout.kv_heads)
    writer.add_rope_dimension_count(layout.hidden // layout.heads)
    writer.add_rope_freq_base(layout.rope_theta)
    writer.add_layer_norm_rms_eps(layout.rms_eps)
    writer.add_vocab_size(layout.vocab_size)
    writer.add_file_type(FILE_TYPES[kind])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=layout.vocab_size)
    special.add_special_token["bos"] = vocab.adds_bos
    special.add_to_gguf(writer, quiet=True)
    items = tensors() if callable(tensors) else iter(tensors.items())
    seen = set()
    for hf_name, array in items:
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        data, qtype = _encode(names.permute(hf_name, np.asarray(array)), kind)
        gguf_name = names.gguf_name(hf_name)
        seen.add(gguf_name)
        writer.add_tensor(gguf_name, data, raw_dtype=qtype)
    if "output.weight" not in seen and not layout.tied:
        raise ForsetiError(f"{folder}: untied model without lm_head.weight", code=ErrorCode.INVALID_MODEL)
    _finish(writer)
    partial.replace(path)
    return path


def llama_quantize(source: Path, path: Path, file_type: int) -> Path:
    """Quantise a GGUF with llama.cpp's quantiser into `file_type` (LlamaFileType). llama.cpp keeps
    norms in F32 and writes tensors whose rows are not multiples of 256 in a fallback type."""
    import llama_cpp

    from .llama import llama_class

    llama_class()  # imported through it, so the files it holds open are closed at exit
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = file_type
    params.nthread = 0  # all cores
    partial = path.with_name(path.name + ".partial")
    chatter = logging.getLogger("llama-cpp-python")  # llama.cpp's log, which says a line per tensor at info
    level = chatter.level
    chatter.setLevel(logging.ERROR)
    try:
        failed = llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), params) != 0
    finally:
        chatter.setLevel(level)
    if failed:
        partial.unlink(missing_ok=True)
        raise ForsetiError(f"llama.cpp could not quantise {source.name}", code=ErrorCode.EXPORT_MISMATCH)
    partial.replace(path)
    return path


def write_lora(path: Path, folder: Path, adapter: Mapping[str, np.ndarray], *, alpha: float, name: str) -> Path:
    """Write a peft LoRA adapter as a GGUF LoRA for the base model in `folder`: tensors
    `<gguf name>.lora_a` / `.lora_b` in their torch shapes, only `lora_b` of q and k permuted."""
    import gguf

    layout = LlamaLayout.read(folder)
    names = TensorNames(layout)
    partial = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(partial, layout.architecture)
    writer.add_name(name)
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(alpha))
    for peft_name, array in adapter.items():
        base, _, part = peft_name.removeprefix("base_model.model.").rpartition(".lora_")
        if part not in ("A.weight", "B.weight"):
            raise ForsetiError(f"adapter tensor {peft_name!r} is not a LoRA A or B", code=ErrorCode.UNSUPPORTED_MODEL)
        hf_name = base + ".weight"
        rows = np.asarray(array, dtype=np.float32)
        if part == "B.weight":
            rows = names.permute(hf_name, rows)
        writer.add_tensor(f"{names.gguf_name(hf_name)}.lora_{part[0].lower()}", rows)
    _finish(writer)
    partial.replace(path)
    return path


def _finish(writer: Any) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
