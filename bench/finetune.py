"""Fine-tune benchmark: LoRA tokens/s through the handler against a plain peft loop, GGUF export
throughput against a file copy, llm-serve load time and hot-swap pause, and EWC's effect.

Everything is measured in one run on this machine, on a small Llama built locally (no hub): 4 layers,
hidden 256, byte-level BPE with 1,024 tokens. The datasets are two sets of made-up facts about the
same made-up things (where each lives; what colour it is), so that learning the second can overwrite
the first: that is what EWC is for.

    python bench/finetune.py [--epochs 30] [--lambdas 0,1000,100000,10000000] [--no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from jobs import run_job
from report import write_section

from forseti.adapters.bus import create_bus
from forseti.adapters.bus.servers import NatsServer
from forseti.adapters.llm.gguf import write_model
from forseti.adapters.llm.llama import LlamaRuntime
from forseti.adapters.llm.tiny import build_tiny_llama
from forseti.adapters.registry import SqliteStore
from forseti.schemas.catalog import LOADED, MODELS, llm_channel
from forseti.schemas.envelope import decode, encode
from forseti.schemas.jobs import FinetuneResult
from forseti.schemas.llm import CompleteReply, CompleteRequest
from forseti.schemas.models import ModelLoaded
from forseti.schemas.tasks import FinetuneTask
from forseti.worker.engine.loop import run as run_loop
from forseti.worker.engine.models import announcements, find_version
from forseti.worker.handlers.finetune import FinetuneHandler
from forseti.worker.handlers.finetune_data import read_lines, tokenize
from forseti.worker.handlers.finetune_training import collate, example_losses
from forseti.worker.services.llm_serve import LlmService

SYLLABLES = ["zor", "bit", "ka", "lum", "vex", "dra", "nol", "pim", "qua", "rist", "sel", "tor", "ump", "wen", "yar"]
PLACES = ["the river", "the old mill", "a glass tower", "the north field", "the harbour", "a quiet cave"]
COLOURS = ["amber", "teal", "crimson", "ivory", "olive", "violet", "slate", "coral"]
CPU = torch.device("cpu")
LORA: dict[str, Any] = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def things(n: int, seed: int = 7) -> list[str]:
    """Made-up names, the subjects of both datasets."""
    rng = random.Random(seed)
    names: set[str] = set()
    while len(names) < n:
        names.add("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))))
    return sorted(names)


def datasets(root: Path, n: int) -> tuple[Path, Path, list[str]]:
    """Dataset A (where each thing lives) and B (its colour), and the text to train the tokenizer on."""
    rng = random.Random(11)
    names = things(n)
    a = [{"prompt": f"Where does the {t} live? ", "response": f"The {t} lives by {rng.choice(PLACES)}."} for t in names]
    b = [{"prompt": f"What colour is the {t}? ", "response": f"The {t} is {rng.choice(COLOURS)}."} for t in names]
    for path, records in ((root / "a.jsonl", a), (root / "b.jsonl", b)):
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return root / "a.jsonl", root / "b.jsonl", [r["prompt"] + r["response"] for r in a + b]


def task(name: str, dataset: str, epochs: int, **fields: Any) -> FinetuneTask:
    """A fine-tune task on the bench model."""
    return FinetuneTask.model_validate(
        {
            "request_id": f"ft-{uuid.uuid4().hex[:8]}",
            "base_model": "file://model",
            "dataset": f"file://{dataset}",
            "name": name,
            "lora": LORA,
            "config": {"epochs": epochs, "batch_size": 8, "learning_rate": 3e-3, "max_seq_len": 64, "seed": 1},
            **fields,
        }
    )


async def finetune(data: Path, root: Path, t: FinetuneTask) -> FinetuneResult:
    """One task through a worker on the memory bus, sharing `data` (registry, artifacts) across calls."""
    result = await run_job("memory://", t, FinetuneHandler(), data, data_root=root)
    assert isinstance(result, FinetuneResult)
    return result


def plain_peft_tokens_per_second(folder: Path, dataset: Path, epochs: int) -> float:
    """The same LoRA on the same batches in a plain peft loop, as a user would write it (HF's own loss)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    examples = tokenize(read_lines(dataset), tokenizer, 64)
    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    config = LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=0.0,
        target_modules=LORA["target_modules"],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    tokens, started = 0, time.monotonic()
    for epoch in range(epochs):
        order = list(range(len(examples)))
        random.Random(1 + epoch).shuffle(order)
        for i in range(0, len(order), 8):
            ids, mask, labels, _ = collate([examples[j] for j in order[i : i + 8]], tokenizer.pad_token_id, CPU)
            optimizer.zero_grad()
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            optimizer.step()
            tokens += int(mask.sum())
    return tokens / (time.monotonic() - started)


def response_loss(folder: Path, adapter: Path, dataset: Path) -> float:
    """Mean response loss of base + adapter on a dataset."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), adapter)
    model.eval()
    examples = tokenize(read_lines(dataset), tokenizer, 64)
    with torch.no_grad():
        ids, mask, labels, _ = collate(examples, tokenizer.pad_token_id, CPU)
        return float(example_losses(model, ids, mask, labels).mean())


def export_throughput(folder: Path, out: Path) -> list[tuple[str, float, float]]:
    """MB/s of writing each GGUF type from the model's weights, and of copying the f32 file's bytes."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    rows = []
    for kind in ("f32", "f16", "q8_0"):
        started = time.perf_counter()
        path = write_model(out / f"x-{kind}.gguf", folder, state, kind, name="bench")
        seconds = time.perf_counter() - started
        rows.append((f"write {kind}", path.stat().st_size / 1e6, seconds))
    f32 = out / "x-f32.gguf"
    started = time.perf_counter()
    shutil.copyfile(f32, out / "copy.gguf")
    rows.append(("copy of the f32 file", f32.stat().st_size / 1e6, time.perf_counter() - started))
    return rows


def load_seconds(path: Path, repeats: int = 5) -> float:
    """Median time to load a GGUF into llama.cpp (file in the page cache)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        LlamaRuntime(path, context=256, threads=2).close()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


async def hot_swap(
    store_dir: Path, registry: Path, name: str, versions: tuple[str, str], seconds: float
) -> dict[str, Any]:
    """Completion latency through llm-serve over NATS before and while it swaps to another version."""
    with NatsServer(store_dir) as server:
        url = server.url
        serve_bus, client = create_bus(url), create_bus(url)
        await serve_bus.connect()
        await client.connect()
        service = LlmService(serve_bus, name=name, consumer="bench", artifact="f16", context=256, threads=1)
        await service.start()
        store = SqliteStore(registry)
        await store.open()
        loaded: asyncio.Queue[ModelLoaded] = asyncio.Queue()

        async def on_model(msg: Any) -> None:
            event: Any = decode(msg.data).data
            if isinstance(event, ModelLoaded):
                loaded.put_nowait(event)

        await client.subscribe(MODELS, on_model)
        await client.subscribe(LOADED, on_model)

        async def announce(version: str) -> None:
            model = await find_version(store, name, version)
            for event in announcements(model, await store.list_artifacts(model.id)):
                await client.publish(MODELS, encode(event))

        await announce(versions[0])
        assert (await asyncio.wait_for(loaded.get(), 30)).ok
        request = encode(CompleteRequest(prompt="Where does the zorbit live? ", max_tokens=8))
        samples: list[tuple[float, float, str]] = []

        async def ask_until(deadline: float) -> None:
            while time.monotonic() < deadline:
                started = time.monotonic()
                reply: Any = decode(await client.request(llm_channel(name), request, timeout=30)).data
                assert isinstance(reply, CompleteReply)
                samples.append((started, time.monotonic() - started, reply.version))

        steady_until = time.monotonic() + seconds
        await ask_until(steady_until)
        swap_at = time.monotonic()
        asker = asyncio.create_task(ask_until(swap_at + seconds))
        await announce(versions[1])
        swapped = await asyncio.wait_for(loaded.get(), 30)
        swap_done = time.monotonic()
        await asker
        await service.stop()
        await store.close()
        await client.close()
        await serve_bus.close()
    steady = [s[1] for s in samples if s[0] < swap_at]
    # the window runs past the switch by a second, to catch the old version being freed as well
    during = [s[1] for s in samples if swap_at <= s[0] <= swap_done + 1.0]
    after = [s for s in samples if s[0] > swap_done]

    def ms(values: list[float], q: float) -> float:
        return 1000 * statistics.quantiles(values, n=100)[int(q) - 1] if len(values) >= 2 else 1000 * max(values or [0])

    return {
        "ok": swapped.ok,
        "swap_s": swap_done - swap_at,
        "steady_p50": ms(steady, 50),
        "steady_p99": ms(steady, 99),
        "during_n": len(during),
        "during_p50": ms(during, 50),
        "during_p99": ms(during, 99),
        "during_max": 1000 * max(during or [0]),
        "answers": len(samples),
        "after_version": after[-1][2] if after else "",
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--things", type=int, default=96)
    parser.add_argument("--lambdas", default="0,1000,100000,10000000")
    parser.add_argument("--swap-seconds", type=float, default=4.0)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    lambdas = [float(x) for x in args.lambdas.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        root = work / "datasets"
        root.mkdir()
        a, b, texts = datasets(root, args.things)
        folder = build_tiny_llama(
            root / "model", texts, vocab_size=1024, hidden=256, layers=4, heads=8, kv_heads=4, intermediate=704
        )
        print("model built", file=sys.stderr)

        # 1. tokens/s: handler against a plain peft loop (same model, data, batches, epochs)
        plain = plain_peft_tokens_per_second(folder, a, args.epochs)
        v1 = await finetune(work / "data", root, task("speed", "a.jsonl", args.epochs, export={"gguf": ["f16"]}))
        handler = v1.metrics["tokens_per_second"]
        print(f"tokens/s handler {handler:,.0f} plain {plain:,.0f}", file=sys.stderr)

        # 2. export throughput
        export_rows = export_throughput(folder, work)

        # 3. load time, and the hot swap over NATS (v1.0 -> v1.1 of one name)
        f16 = Path(v1.gguf["f16"])
        load_f16 = load_seconds(f16)
        v2 = await finetune(work / "data", root, task("speed", "b.jsonl", 1, export={"gguf": ["f16"]}))
        swap = await hot_swap(work / "nats", work / "data" / "r.db", "speed", ("v1.0", "v1.1"), args.swap_seconds)
        print(f"swap {swap}", file=sys.stderr)

        # 4. EWC: v1.0 on A, v1.1 on B with each lambda; loss on A and on B after v1.1
        ewc_rows = []
        v1_loss_a = None
        for lam in lambdas:
            name = f"ewc-{lam:g}"
            first = await finetune(work / "data", root, task(name, "a.jsonl", args.epochs))
            if v1_loss_a is None:
                v1_loss_a = response_loss(folder, Path(first.adapter_path), a)
            second = await finetune(
                work / "data",
                root,
                task(name, "b.jsonl", args.epochs, ewc={"lambda": lam, "fisher_samples": args.things}),
            )
            adapter = Path(second.adapter_path)
            ewc_rows.append(
                (
                    lam,
                    response_loss(folder, adapter, a),
                    response_loss(folder, adapter, b),
                    second.metrics["ewc_penalty"],
                )
            )
            print(f"ewc {ewc_rows[-1]}", file=sys.stderr)
        size_mb = f16.stat().st_size / 1e6  # noqa: ASYNC240 (one stat, after the timings)

    section = render(args, plain, handler, export_rows, load_f16, size_mb, swap, v2, ewc_rows, v1_loss_a or 0.0)
    print(section)
    if not args.no_write:
        write_section("bench/finetune.py", section)


def render(
    args: argparse.Namespace,
    plain: float,
    handler: float,
    export_rows: list[tuple[str, float, float]],
    load_f16: float,
    size_mb: float,
    swap: dict[str, Any],
    v2: FinetuneResult,
    ewc_rows: list[tuple[float, float, float, float]],
    v1_loss_a: float,
) -> str:
    """The markdown section for docs/benchmarks.md."""
    threads = torch.get_num_threads()
    lines = [
        "## Fine-tune (`bench/finetune.py`)",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()} CPU ({threads} torch threads), no GPU lent;",
        "a locally built Llama (4 layers, hidden 256, 8 heads, 4 KV heads, vocabulary 1,024), LoRA r=8 on q/k/v/o,",
        f"{args.things} prompt / response pairs per dataset, batch 8, {args.epochs} epochs.",
        "",
        "| LoRA training | tokens/s | ratio |",
        "|---|---:|---:|",
        f"| plain peft loop (HF loss, AdamW) | {plain:,.0f} | 1.00 |",
        f"| through the fine-tune handler (worker, bus, checkpoints) | {handler:,.0f} | {handler / plain:.2f} |",
        "",
        "| GGUF export | MB | seconds | MB/s |",
        "|---|---:|---:|---:|",
    ]
    for what, mb, seconds in export_rows:
        lines.append(f"| {what} | {mb:.1f} | {seconds:.3f} | {mb / seconds:,.0f} |")
    lines += [
        "",
        f"llm-serve load of the f16 GGUF ({size_mb:.1f} MB): median {load_f16 * 1000:.0f} ms (target < 1 s for models "
        "under 1B).",
        "",
        "Hot swap over NATS (llm-serve, 1 llama.cpp thread; a closed loop of 8-token completions while v1.0 -> "
        f"{v2.version} loads): the swap took {swap['swap_s']:.2f} s; {swap['answers']} requests answered, "
        "none dropped.",
        "",
        "| completions | n | p50 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|---:|",
        f"| steady, before the swap | | {swap['steady_p50']:.1f} | {swap['steady_p99']:.1f} | |",
        f"| from the announcement to 1 s after the switch | {swap['during_n']} | {swap['during_p50']:.1f} | "
        f"{swap['during_p99']:.1f} | "
        f"{swap['during_max']:.1f} |",
        "",
        "EWC: v1.0 trained on dataset A (where each thing lives), then v1.1 on dataset B (its colour) with each",
        f"lambda. Response loss on A right after v1.0: {v1_loss_a:.3f}.",
        "",
        "| lambda | loss on A after v1.1 (forgetting) | loss on B after v1.1 (learning) | final EWC penalty |",
        "|---:|---:|---:|---:|",
    ]
    for lam, loss_a, loss_b, penalty in ewc_rows:
        lines.append(f"| {lam:g} | {loss_a:.3f} | {loss_b:.3f} | {penalty:.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    run_loop(main())
