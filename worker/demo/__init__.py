"""The example data the docs use, shipped with Forseti so that every example runs as written:
`forseti demo-files` puts it into a worker's data root, where tasks may read it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

CANCER = "cancer.csv"
"""549 rows of the Wisconsin breast-cancer dataset: 30 numeric columns and `diagnosis` (0 / 1)."""
NEW_PATIENTS = "new_patients.csv"
"""The dataset's last 20 rows, without `diagnosis`: what a batch inference scores."""
FEEDBACK = "feedback.jsonl"
"""Prompt / response pairs of a support assistant, some with `feedback`."""
FEEDBACK_IN_ROOT = Path("feedback") / "november.jsonl"
"""Where the fine-tune dataset goes in the data root (the path docs/llm.md's task names)."""
TINY_LLAMA_IN_ROOT = Path("models") / "tiny-llama"
"""Where the tiny Llama goes in the data root (docs/llm.md's `base_model`)."""


def demo_file(name: str) -> Path:
    """The path of one shipped file (CANCER, NEW_PATIENTS, FEEDBACK): package data beside this module."""
    return Path(__file__).with_name(name)


def write_demo_files(root: Path) -> list[Path]:
    """Copy the data files into the data root `root`; the paths written (an existing file is kept)."""
    written = []
    for name, target in ((CANCER, Path(CANCER)), (NEW_PATIENTS, Path(NEW_PATIENTS)), (FEEDBACK, FEEDBACK_IN_ROOT)):
        path = root / target
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(demo_file(name), path)
        written.append(path)
    return written


def build_demo_llama(root: Path) -> Path:
    """A tiny Llama (about 0.2 M parameters, random weights, a BPE tokenizer trained on the feedback
    texts) under `root`/models/tiny-llama, built locally: nothing comes from a model hub. Needs the
    `llm` extra (torch, transformers, tokenizers). An existing one is kept."""
    from transformers.utils import logging as transformers_logging

    from forseti.adapters.llm.tiny import build_tiny_llama

    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # one tiny shard: a bar says nothing

    folder = root / TINY_LLAMA_IN_ROOT
    if (folder / "config.json").is_file():
        return folder
    lines = [json.loads(line) for line in demo_file(FEEDBACK).read_text().splitlines() if line.strip()]
    texts = [f"{r['prompt']} {r['response']}" for r in lines]
    return build_tiny_llama(folder, texts * 4)
