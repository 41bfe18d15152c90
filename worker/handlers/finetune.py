"""The fine-tune handler: a LoRA adapter on a local causal LM, versioned per name with EWC against
forgetting the parent version, exported as peft and GGUF, checked against torch, registered and
announced."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from forseti.adapters.llm.gguf import GGUF_TYPES, LlamaLayout, Vocab
from forseti.adapters.registry import ModelRecord, RegistryStore
from forseti.schemas.capabilities import Capability
from forseti.schemas.errors import ErrorCode, ForsetiError
from forseti.schemas.jobs import FinetuneResult
from forseti.schemas.tasks import FinetuneTask, TaskKind
from forseti.worker.engine.context import JobContext, Steps, Work
from forseti.worker.engine.inputs import Inputs
from forseti.worker.engine.models import ANNOUNCED_FORMATS, BASE_FORMAT, PEFT_CONFIG_FORMAT
from forseti.worker.engine.ranks import JoinSite

if TYPE_CHECKING:  # torch is imported in the training thread, not when the worker loads its handlers
    from .finetune_training import Figures
    from .training_ddp import Group, Recruit

LABEL = re.compile(r"^v(\d+)\.(\d+)$")


def next_label(
    latest: ModelRecord | None, base_model: str, origin: ModelRecord | None = None
) -> tuple[str, ModelRecord | None]:
    """This version's label and the parent it continues from. v1.0 first; the minor number grows
    while the base model stays, continuing from the latest version; another base model starts the
    next major version. `origin` (a version named as the task's base_model) is the parent whatever
    the name's latest version is."""
    if latest is None:
        return "v1.0", origin
    match = LABEL.match(latest.label or "")
    major, minor = (int(match[1]), int(match[2])) if match else (latest.version, 0)
    if latest.base_model != base_model:
        return f"v{major + 1}.0", origin
    return f"v{major}.{minor + 1}", origin or latest


async def base_of(task: FinetuneTask, store: RegistryStore, inputs: Inputs) -> tuple[Path, ModelRecord | None]:
    """The base model folder, and the version to continue from when `base_model` is the registry id
    of an earlier fine-tune (whose base folder it then uses)."""
    origin = None if "://" in task.base_model else await store.get_model(task.base_model)
    if origin is not None and origin.model_type != "llm":
        raise ForsetiError(
            f"base_model {task.base_model!r} is a {origin.model_type} in the registry, not an LLM",
            code=ErrorCode.INVALID_MODEL,
        )
    uri = Path(origin.base_model or "").as_uri() if origin is not None else task.base_model
    folder = inputs.resolve(uri, what="base_model", missing=ErrorCode.INVALID_MODEL)
    if not folder.is_dir():
        raise ForsetiError(f"base_model {task.base_model!r} is not a model folder", code=ErrorCode.INVALID_MODEL)
    return folder, origin


@dataclass(frozen=True)
class Produced:
    """What the training thread hands back."""

    adapter_dir: Path
    files: dict[str, Path]
    parity: dict[str, dict[str, float]]
    metrics: dict[str, float]
    training_time_ms: int


class FinetuneHandler:
    """Runs `forseti.task.finetune.v1`."""

    kind = TaskKind.FINETUNE

    def __init__(self, *, progress_seconds: float = 1.0) -> None:
        self.progress_seconds = progress_seconds
        """Least seconds between progress events (the last step always reports)."""

    def capabilities(self) -> list[Capability]:
        """LoRA with EWC, over ranks of one host or several, and the formats adapters and merged models
        are exported to."""
        return [
            Capability(area="fine-tuning", name="lora"),
            Capability(area="fine-tuning", name="ewc"),
            Capability(area="fine-tuning", name="distributed"),
            Capability(area="fine-tuning", name="distributed-workers"),
            *(Capability(area="model-export", name=f"gguf-{kind}") for kind in GGUF_TYPES),
            Capability(area="model-export", name="gguf-lora"),
            Capability(area="model-export", name="peft"),
        ]

    async def run(self, task: FinetuneTask, ctx: JobContext) -> FinetuneResult:
        """Check inputs, train (in a child process), export and check, then register and announce."""
        folder, origin = await base_of(task, ctx.store, ctx.inputs)
        dataset = ctx.inputs.resolve(task.dataset, what="dataset")
        layout = LlamaLayout.read(folder)
        if task.export.gguf or task.export.adapter_gguf:
            Vocab.read(folder, layout.vocab_size)  # refuse an unexportable tokenizer before training

        earlier = [m for m in await ctx.store.list_models(name=task.name, limit=2) if m.id != ctx.job_id]
        label, parent = next_label(earlier[0] if earlier else None, str(folder), origin)
        # a distributed job's training runs in its ranks' processes; its agent stays in the worker (a
        # daemonic child process may not start processes)
        recruit = ctx.recruiter(task) if task.config.workers > 1 else None
        produced = await ctx.work(
            self._produce, task, folder, dataset, parent, label, recruit, isolate=task.config.ranks == 1
        )

        metrics = dict(produced.metrics)
        for role, figures in produced.parity.items():
            metrics.update({f"{role}_{k}": v for k, v in figures.items()})
        model = await ctx.register_model(
            ModelRecord(
                id=ctx.job_id,
                name=task.name,
                model_type="llm",
                framework="peft",
                base_model=str(folder),
                export_path=str(produced.adapter_dir),
                export_format="peft",
                metrics=metrics,
                parent_id=parent.id if parent else None,
                label=label,
                user_id=task.user_id,
                device_id=task.device_id,
                device_tags=list(task.device_tags),
                job_id=ctx.job_id,
            )
        )
        files: list[tuple[str, str | None, Path]] = [
            ("peft", None, produced.adapter_dir / "adapter_model.safetensors"),
            (PEFT_CONFIG_FORMAT, None, produced.adapter_dir / "adapter_config.json"),
        ]
        for role, path in produced.files.items():
            fmt = {"lora": "gguf-lora", "base": BASE_FORMAT}.get(role, "gguf")
            files.append((fmt, "f32" if role == "base" else None if role == "lora" else role, path))
        await ctx.publish_files(
            model, files, announce=ANNOUNCED_FORMATS, parent_version=parent.label if parent else None
        )
        return FinetuneResult(
            model_id=model.id,
            name=task.name,
            version=label,
            parent_version=parent.label if parent else None,
            adapter_path=str(produced.adapter_dir),
            gguf={role: str(path) for role, path in produced.files.items()},
            training_time_ms=produced.training_time_ms,
            metrics=metrics,
        )

    async def rank_work(
        self, task: FinetuneTask, run: dict[str, Any], site: JoinSite
    ) -> tuple[Group, Callable[[Steps], Figures]]:
        """Another worker's fine-tune of `task` (`run`: the version it continues from): its group, and
        what this worker's ranks train, on the base model and dataset as found here."""
        from .finetune_training import Parent, on_cuda, rank_work
        from .training_ddp import Group

        folder, _ = await base_of(task, site.store, site.inputs)
        dataset = site.inputs.resolve(task.dataset, what="dataset")
        parent = None
        if run.get("parent"):
            record = await site.store.get_model(str(run["parent"]))
            if record is None or not await asyncio.to_thread(Path(record.export_path).is_dir):
                raise ForsetiError(
                    f"the version this fine-tune continues from ({run['parent']}) has no adapter folder on this "
                    "worker: its ranks need it where every worker reads it (a shared data dir)",
                    code=ErrorCode.INVALID_MODEL,
                )
            parent = Parent(record.id, record.label or "", Path(record.export_path))
        work = rank_work(task, folder, dataset, parent, checkpoints=site.folder, progress_seconds=self.progress_seconds)
        return Group.of(task.config, cuda=on_cuda(task)), work

    def _produce(
        self,
        task: FinetuneTask,
        folder: Path,
        dataset: Path,
        parent: ModelRecord | None,
        label: str,
        recruit: Recruit | None,
        ctx: Work,
    ) -> Produced:
        from .finetune_export import export_gguf
        from .finetune_training import Parent, save_adapter, train

        ancestor = Parent(parent.id, parent.label or "", Path(parent.export_path)) if parent else None
        trained = train(
            task,
            ctx,
            folder,
            dataset,
            ancestor,
            checkpoints=ctx.checkpoint_dir,
            progress_seconds=self.progress_seconds,
            recruit=recruit,
        )
        figures = trained.figures
        ctx.check()
        ctx.progress(1.0, step=figures.steps, total=figures.steps, message="exporting and checking")
        adapter_dir = save_adapter(trained, ctx.artifacts_dir / "adapter", task.ewc.fisher_samples)
        files: dict[str, Path] = {}
        parity: dict[str, dict[str, float]] = {}
        if task.export.gguf or task.export.adapter_gguf:
            export, _ = export_gguf(
                trained,
                folder,
                ctx.artifacts_dir,
                list(task.export.gguf),
                adapter=task.export.adapter_gguf,
                alpha=task.lora.alpha,
                name=f"{task.name} {label}",
            )
            files = export.files
            parity = {role: export.metrics(role) for role in export.parity}
        metrics: dict[str, Any] = {
            "loss": figures.loss,
            "ewc_penalty": figures.ewc_penalty,
            "tokens_per_second": figures.tokens_per_second,
            "steps": float(figures.steps),
            "resumed_from_step": float(figures.resumed_from),
            "examples": float(len(trained.examples)),
        }
        if task.config.ranks > 1:
            metrics["world_size"] = float(task.config.ranks)
        return Produced(adapter_dir, files, parity, metrics, figures.training_time_ms)
