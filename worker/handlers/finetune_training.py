"""One LoRA fine-tune, in the handler's thread: base model, adapter, the loop with EWC, checkpoints,
and the Fisher information of the result.

EWC (Kirkpatrick et al. 2017): after a version is trained, the diagonal of its empirical Fisher
information, E[(d loss / d theta)^2] over `fisher_samples` of its examples, is stored beside the
adapter. The next version of the same name starts from that adapter and trains on
`task + lambda / 2 * sum F_i (theta_i - theta*_i)^2`, so weights that mattered for the old data move
least.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from forseti.schemas.errors import ErrorCode, ForsetiError
from forseti.schemas.tasks import FinetuneTask
from forseti.worker.engine.context import JobStopped, Steps

from .finetune_data import IGNORE, Example, read_lines, tokenize
from .training_ddp import Group, Rank, Recruit, launch, meet

log = logging.getLogger(__name__)
FISHER = "fisher.safetensors"
CHECKPOINT = "state.pt"


@dataclass(frozen=True)
class Parent:
    """The version a new one continues from: its adapter folder (with the Fisher beside it)."""

    model_id: str
    label: str
    adapter_dir: Path


@dataclass(frozen=True)
class Figures:
    """How a run went (what a distributed run's rank 0 hands back)."""

    steps: int
    resumed_from: int
    tokens: int
    loss: float
    ewc_penalty: float
    training_time_ms: int
    tokens_per_second: float


@dataclass
class Trained:
    """What a finished run hands to the export."""

    model: Any
    tokenizer: Any
    examples: list[Example]
    figures: Figures


def on_cuda(task: FinetuneTask) -> bool:
    """Whether the task trains on CUDA (invalid_task when it asks for CUDA and there is none)."""
    cuda = torch.cuda.is_available()
    if task.config.device == "cuda" and not cuda:
        raise ForsetiError("device cuda was asked for, but this worker has no CUDA device", code=ErrorCode.INVALID_TASK)
    return cuda and task.config.device != "cpu"


def device_and_dtype(task: FinetuneTask, local_rank: int = 0) -> tuple[torch.device, torch.dtype]:
    """Where to train (a distributed run: the rank's own GPU) and in what precision: fp32 on CPU;
    bf16 (or fp16 where bf16 is missing) on CUDA."""
    config = task.config
    device = torch.device("cuda", local_rank) if on_cuda(task) else torch.device("cpu")
    if device.type == "cpu":
        if config.precision in ("bf16", "fp16"):
            raise ForsetiError(f"precision {config.precision} needs CUDA; use fp32 on CPU", code=ErrorCode.INVALID_TASK)
        return device, torch.float32
    if config.precision == "fp32":
        return device, torch.float32
    if config.precision == "fp16" or (config.precision == "auto" and not torch.cuda.is_bf16_supported()):
        return device, torch.float16
    return device, torch.bfloat16


def open_base(folder: Path) -> tuple[Any, Any]:
    """The tokenizer and fp32 causal LM of a Hugging Face folder; invalid_model when either cannot load."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise ForsetiError(f"cannot load the model in {folder}: {exc}", code=ErrorCode.INVALID_MODEL) from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, model


def attach_adapter(task: FinetuneTask, base: Any, parent: Parent | None) -> Any:
    """A trainable peft model: the parent's adapter when there is one, else a fresh LoRA."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if parent is not None:
        saved = json.loads((parent.adapter_dir / "adapter_config.json").read_text())
        wanted = {"r": task.lora.r, "target_modules": sorted(task.lora.target_modules)}
        had = {"r": saved.get("r"), "target_modules": sorted(saved.get("target_modules") or [])}
        if wanted != had:
            raise ForsetiError(
                f"{task.name} {parent.label} has LoRA {had}; a new version continues from it and must keep "
                f"that shape (asked {wanted}), or use a new name",
                code=ErrorCode.INVALID_TASK,
            )
        return PeftModel.from_pretrained(base, parent.adapter_dir, is_trainable=True)
    config = LoraConfig(
        r=task.lora.r,
        lora_alpha=task.lora.alpha,  # type: ignore[arg-type]  # peft annotates int, computes alpha / r in float
        lora_dropout=task.lora.dropout,
        target_modules=list(task.lora.target_modules),
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(base, config)
    except ValueError as exc:  # peft names the modules it could not find
        raise ForsetiError(f"LoRA target_modules: {exc}", code=ErrorCode.INVALID_TASK) from exc


def adapter_name(param_name: str) -> str:
    """A trainable parameter's name as peft's saved state dict spells it (without the adapter name)."""
    return param_name.replace(".default", "")


def trainable(model: Any) -> dict[str, torch.nn.Parameter]:
    """The adapter's parameters by saved name."""
    return {adapter_name(n): p for n, p in model.named_parameters() if p.requires_grad}


def collate(examples: list[Example], pad_id: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Right-padded ids, attention mask, labels and weights of a micro-batch."""
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.ids)
        ids[row, :n] = torch.tensor(example.ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    weights = torch.tensor([e.weight for e in examples], dtype=torch.float32)
    return ids.to(device), mask.to(device), labels.to(device), weights.to(device)


def example_losses(model: Any, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each example over its labelled tokens."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    target = labels[:, 1:]
    losses = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=IGNORE, reduction="none")
    counted = (target != IGNORE).sum(dim=1).clamp(min=1)
    return losses.sum(dim=1) / counted


class Ewc:
    """The penalty that holds the adapter near its parent where the parent's Fisher is large."""

    def __init__(self, lam: float, anchor: dict[str, torch.Tensor], fisher: dict[str, torch.Tensor]) -> None:
        self.lam, self.anchor, self.fisher = lam, anchor, fisher

    @classmethod
    def of(cls, lam: float, parent: Parent | None, device: torch.device) -> Ewc | None:
        """The penalty against `parent`, or None when lambda is 0 or there is no parent."""
        if lam == 0 or parent is None:
            return None
        fisher_path = parent.adapter_dir / FISHER
        if not fisher_path.exists():
            raise ForsetiError(f"{parent.label} has no {FISHER}; EWC needs it", code=ErrorCode.INVALID_MODEL)
        anchor = {k: v.to(device) for k, v in load_file(parent.adapter_dir / "adapter_model.safetensors").items()}
        fisher = {k: v.to(device) for k, v in load_file(fisher_path).items()}
        return cls(lam, anchor, fisher)

    def penalty(self, params: dict[str, torch.nn.Parameter]) -> torch.Tensor:
        """lambda / 2 * sum F (theta - theta*)^2 over the adapter parameters."""
        total = sum(
            (self.fisher[name] * (param - self.anchor[name]) ** 2).sum()
            for name, param in params.items()
            if name in self.fisher
        )
        return self.lam / 2 * torch.as_tensor(total)


def fisher_information(
    model: Any, examples: list[Example], pad_id: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher of the adapter parameters: mean squared gradient of each example's loss."""
    params = trainable(model)
    fisher = {name: torch.zeros_like(p, device="cpu") for name, p in params.items()}
    model.eval()  # dropout off: the Fisher is of the model as it will be used
    for example in examples:
        model.zero_grad(set_to_none=True)
        ids, mask, labels, _ = collate([example], pad_id, device)
        example_losses(model, ids, mask, labels).sum().backward()  # type: ignore[no-untyped-call]
        for name, p in params.items():
            if p.grad is not None:
                fisher[name] += p.grad.detach().float().cpu() ** 2
    model.zero_grad(set_to_none=True)
    return {name: f / max(len(examples), 1) for name, f in fisher.items()}


def train(
    task: FinetuneTask,
    ctx: Steps,
    folder: Path,
    dataset: Path,
    parent: Parent | None,
    *,
    checkpoints: Path,
    progress_seconds: float,
    recruit: Recruit | None = None,
) -> Trained:
    """Check the inputs, then train (or resume) the adapter, alone or over the task's ranks (`recruit`
    finds the other workers when they are spread over several); raises JobStopped when stopped."""
    if task.config.ranks == 1:
        return fit(
            task,
            ctx,
            folder=folder,
            dataset=dataset,
            parent=parent,
            checkpoints=checkpoints,
            progress_seconds=progress_seconds,
        )
    group = Group.of(task.config, cuda=on_cuda(task))
    meeting = meet(group, {"parent": parent.model_id if parent is not None else None}, recruit)
    work = rank_work(task, folder, dataset, parent, checkpoints=checkpoints, progress_seconds=progress_seconds)
    figures: Figures = launch(group, ctx, work, checkpoints, meeting=meeting)
    tokenizer, model, examples = build(task, folder, dataset, parent, torch.device("cpu"))
    saved = torch.load(checkpoints / CHECKPOINT, map_location="cpu", weights_only=True)
    with torch.no_grad():
        for name, param in trainable(model).items():
            param.copy_(saved["adapter"][name])
    return Trained(model, tokenizer, examples, figures)


def build(
    task: FinetuneTask, folder: Path, dataset: Path, parent: Parent | None, device: torch.device
) -> tuple[Any, Any, list[Example]]:
    """The tokenizer, the base model with its adapter (seeded: every rank starts alike), and the
    dataset's examples."""
    records = read_lines(dataset)
    tokenizer, base = open_base(folder)
    examples = tokenize(records, tokenizer, task.config.max_seq_len)
    torch.manual_seed(task.config.seed)
    return tokenizer, attach_adapter(task, base, parent).to(device), examples


def resume(
    saved: bytes | None, params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer, device: torch.device
) -> int:
    """Load a checkpoint's bytes (when there is one) into the adapter and optimizer; its step (else 0)."""
    if saved is None:
        return 0
    state = torch.load(io.BytesIO(saved), map_location=device, weights_only=True)
    with torch.no_grad():
        for name, value in state["adapter"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"])


def fit(
    task: FinetuneTask,
    ctx: Steps,
    *,
    folder: Path,
    dataset: Path,
    parent: Parent | None,
    checkpoints: Path,
    progress_seconds: float,
) -> Trained:
    """Train in this process: alone, or as one rank of a distributed run. Each rank takes its share
    of every micro-batch; after an optimizer step's micro-batches one all-reduce adds up every
    rank's adapter gradients (the adapter is small: one flat buffer, which keeps micro-batches
    with fewer examples than ranks, and the EWC penalty, exact). Rank 0 reports and checkpoints."""
    config = task.config
    rank = Rank.current()
    device, dtype = device_and_dtype(task, rank.local_rank)
    tokenizer, model, examples = build(task, folder, dataset, parent, device)
    params = trainable(model)
    optimizer = torch.optim.AdamW(params.values(), lr=config.learning_rate)
    ewc = Ewc.of(task.ewc.lambda_, parent, device)

    batches_per_epoch = -(-len(examples) // config.batch_size)
    steps_per_epoch = -(-batches_per_epoch // config.grad_accum)
    total_steps = steps_per_epoch * config.epochs
    checkpoint = checkpoints / CHECKPOINT
    step = resumed_from = resume(rank.read(checkpoint), params, optimizer, device)  # rank 0's checkpoint
    if step:
        log.info("job %s resumes fine-tuning at step %d of %d", ctx.job_id, step, total_steps)

    def save() -> None:
        if not rank.lead:  # the ranks hold the same adapter: one copy, rank 0's
            return
        partial = checkpoint.with_name("partial-" + CHECKPOINT)
        adapter = {name: p.detach().cpu() for name, p in params.items()}
        torch.save({"adapter": adapter, "optimizer": optimizer.state_dict(), "step": step}, partial)
        partial.replace(checkpoint)
        ctx.checkpointed(step)

    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    scaler = torch.amp.GradScaler(enabled=dtype == torch.float16)
    me, ranks = rank.shard
    tokens = 0
    loss_value = penalty_value = 0.0
    started = time.monotonic()
    last_report = 0.0
    model.train()
    try:
        while rank.go_on(ctx, more=step < total_steps):
            epoch, in_epoch = divmod(step, steps_per_epoch)
            order = list(range(len(examples)))
            random.Random(config.seed + epoch).shuffle(order)
            first = in_epoch * config.grad_accum
            batches = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
            group = batches[first : first + config.grad_accum]
            optimizer.zero_grad(set_to_none=True)
            weight_total = sum(examples[i].weight for batch in group for i in batch)
            step_loss = step_tokens = 0.0
            for batch in group:
                if ranks == 1:
                    ctx.check()  # a rank waits for rank 0's word instead, between steps
                share = batch[me::ranks]
                if not share:
                    continue
                ids, mask, labels, weights = collate([examples[i] for i in share], tokenizer.pad_token_id, device)
                with autocast:
                    losses = example_losses(model, ids, mask, labels)
                # feedback weights: a liked example counts double, a disliked one half
                loss = (losses * weights).sum() / weight_total
                scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
                step_loss += float(loss.detach())
                step_tokens += float(mask.sum())
            step_loss, step_tokens = rank.add_gradients(list(params.values()), step_loss, step_tokens)
            tokens += int(step_tokens)
            if ewc is not None:
                penalty = ewc.penalty(params)
                scaler.scale(penalty).backward()  # type: ignore[no-untyped-call]
                penalty_value = float(penalty.detach())
            scaler.step(optimizer)
            scaler.update()
            step += 1
            loss_value = step_loss
            if step % config.checkpoint_interval == 0:
                save()
            elapsed = time.monotonic() - started
            if rank.lead and (elapsed - last_report >= progress_seconds or step == total_steps):
                last_report = elapsed
                ctx.progress(
                    step / total_steps,
                    step=step,
                    total=total_steps,
                    message=f"step {step} / {total_steps}, loss {loss_value:.4f}",
                    metrics={
                        "loss": loss_value,
                        "ewc_penalty": penalty_value,
                        "tokens_per_second": tokens / max(elapsed, 1e-9),
                        "epoch": float(epoch + 1),
                    },
                )
    except JobStopped:
        save()
        raise
    save()
    elapsed = time.monotonic() - started
    figures = Figures(
        steps=step,
        resumed_from=resumed_from,
        tokens=tokens,
        loss=loss_value,
        ewc_penalty=penalty_value,
        training_time_ms=int(elapsed * 1000),
        tokens_per_second=tokens / max(elapsed, 1e-9),
    )
    return Trained(model, tokenizer, examples, figures)


def rank_work(
    task: FinetuneTask,
    folder: Path,
    dataset: Path,
    parent: Parent | None,
    *,
    checkpoints: Path,
    progress_seconds: float,
) -> Callable[[Steps], Figures]:
    """What each rank of a distributed fine-tune runs: `fit`, handing back only its figures (the
    agent rebuilds the model from rank 0's checkpoint rather than have it pickled across)."""
    work = functools.partial(
        fit,
        task,
        folder=folder,
        dataset=dataset,
        parent=parent,
        checkpoints=checkpoints,
        progress_seconds=progress_seconds,
    )
    return functools.partial(figures_of, work)


def figures_of(work: Callable[[Steps], Trained], ctx: Steps) -> Figures:
    """The figures of a run of `work`."""
    return work(ctx).figures


def save_adapter(trained: Trained, folder: Path, fisher_samples: int) -> Path:
    """The peft adapter folder with its Fisher information beside it."""
    trained.model.save_pretrained(folder)
    device = next(trained.model.parameters()).device
    fisher = fisher_information(
        trained.model, trained.examples[:fisher_samples], trained.tokenizer.pad_token_id, device
    )
    save_file({k: v.contiguous() for k, v in fisher.items()}, folder / FISHER)
    return folder
