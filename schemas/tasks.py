"""Task payloads: the `data` of `forseti.task.<kind>.v1`, after the seed's ForsetiRequest."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints, model_validator

from .base import FiniteFloat, Id, Name, ShortText, Strict, Tags

LearningRate = Annotated[float, Field(gt=0, lt=10)]
Uri = Annotated[str, StringConstraints(min_length=1, max_length=2048)]
ColumnName = Annotated[str, StringConstraints(min_length=1, max_length=128)]
Cell = str | FiniteFloat | int | bool | None
Row = dict[ColumnName, Cell]


class TaskKind(StrEnum):
    """The four kinds of work, one task channel each."""

    TRAINING = "training"
    RL = "rl"
    FINETUNE = "finetune"
    INFERENCE = "inference"


class TaskBase(Strict):
    """Fields every task carries (the seed's ForsetiRequest header)."""

    request_id: Id | None = None
    """The job id: client-chosen so resubmissions are idempotent; a uuid when omitted."""
    user_id: ShortText | None = None
    """Who asked, for the registry and audit."""
    device_id: ShortText | None = None
    """The device the result is meant for, if any."""
    device_tags: Tags = Field(default_factory=list)
    """Tags of the devices the result is meant for, when it is not for one device: an edge agent
    started with one of them takes it."""
    max_duration: float | None = Field(default=None, gt=0, le=30 * 86_400)
    """Seconds the job may take from its first start, across attempts, before it is stopped and
    failed as `timeout`; it can only lower the worker's own `max_duration`."""
    max_memory_mb: int | None = Field(default=None, ge=1, le=2**24)
    """MiB the job may take; it can only lower the worker's own `max_job_memory_mb`."""
    max_threads: int | None = Field(default=None, ge=1, le=1024)
    """CPU threads the job's training may use; it can only lower the worker's own `job_threads`."""


class EarlyStopping(Strict):
    """Stop when a validation metric stops improving."""

    metric: ShortText = "val_loss"
    """The validation metric to watch."""
    patience: int = Field(default=5, ge=1, le=10_000)
    """Epochs without improvement before stopping."""
    min_delta: float = Field(default=0.0, ge=0)
    """The smallest change that counts as an improvement."""


class SearchSpace(Strict):
    """Hyperparameter search: trials over the listed values, the best kept by the validation metric."""

    method: Literal["grid", "random"] = "grid"
    """grid tries combinations in order (up to max_trials); random draws max_trials distinct ones."""
    learning_rate: list[LearningRate] = Field(default_factory=list, max_length=64)
    """Learning rates to try; the config's own when empty."""
    batch_size: list[Annotated[int, Field(ge=1, le=1_000_000)]] = Field(default_factory=list, max_length=64)
    """Batch sizes to try; the config's own when empty."""
    hidden: list[list[Annotated[int, Field(ge=1, le=65_536)]]] = Field(default_factory=list, max_length=64)
    """Hidden layer sizes to try; the config's own when empty."""
    max_trials: int = Field(default=8, ge=1, le=256)
    """Trials to run at most."""
    seed: int = Field(default=0, ge=0, le=2**32 - 1)
    """Seed of the random draw."""


class Distribution(Strict):
    """How a job's training is spread over ranks: torch.distributed data parallelism, each rank a
    process training an equal share of every batch."""

    distributed: bool = False
    """Data-parallel training over `world_size` ranks."""
    world_size: int = Field(default=1, ge=1, le=64)
    """Ranks of a distributed run, each taking an equal share of every batch."""
    workers: int = Field(default=1, ge=1, le=64)
    """Workers (hosts) the ranks are spread over, `world_size / workers` ranks on each: the job's own
    worker, and `workers - 1` others that join it over the bus."""
    max_restarts: int = Field(default=3, ge=0, le=100)
    """A distributed run: times the group is started again from the last checkpoint after a rank dies."""
    rendezvous_timeout: float = Field(default=120.0, ge=1, le=3600)
    """A distributed run: seconds its ranks may take to find each other before the job fails with
    `rendezvous_timeout`."""

    @model_validator(mode="after")
    def _spread(self) -> Distribution:
        if (self.world_size > 1 or self.workers > 1) and not self.distributed:
            raise ValueError("world_size > 1 and workers > 1 need distributed: true")
        if self.world_size % self.workers:
            raise ValueError(f"world_size {self.world_size} does not divide over {self.workers} workers")
        return self

    @property
    def ranks(self) -> int:
        """Processes the run trains on, on every worker together: 1 unless distributed."""
        return self.world_size if self.distributed else 1


class TrainingConfig(Distribution):
    """Supervised training settings (the seed's TrainingConfig)."""

    epochs: int = Field(default=10, ge=1, le=100_000)
    """Passes over the training data."""
    batch_size: int = Field(default=32, ge=1, le=1_000_000)
    """Samples per optimizer step."""
    learning_rate: LearningRate = 1e-3
    """Optimizer step size."""
    optimizer: Literal["adam", "adamw", "sgd", "rmsprop"] = "adam"
    """Which optimizer."""
    loss_function: ShortText | None = None
    """Loss name; the model type's usual loss when omitted."""
    metrics: list[ShortText] = Field(default_factory=list, max_length=32)
    """Metrics to report each epoch."""
    num_gpus: int = Field(default=0, ge=0, le=64)
    """GPUs to use on each worker; 0 trains on the CPU."""
    early_stopping: EarlyStopping | None = None
    """Stop early when validation stops improving."""
    lr_scheduler: Literal["step", "cosine", "plateau"] | None = None
    """Learning-rate schedule."""
    checkpoint_interval: int = Field(default=1, ge=1, le=1_000_000)
    """Epochs between checkpoints."""
    hidden: list[Annotated[int, Field(ge=1, le=65_536)]] = Field(default_factory=lambda: [64, 64], max_length=16)
    """Hidden layer sizes of the network."""
    grad_clip: float | None = Field(default=None, gt=0, le=1e6)
    """Clip the gradient norm to this, when set."""
    seed: int = Field(default=0, ge=0, le=2**32 - 1)
    """Seed for initialisation, data splits and batch order."""
    window: int = Field(default=24, ge=1, le=100_000)
    """Forecaster: past values the model sees."""
    horizon: int = Field(default=1, ge=1, le=10_000)
    """Forecaster: future values it predicts at once."""
    season: int = Field(default=1, ge=1, le=100_000)
    """Forecaster: the seasonal period of the naive forecast that MASE compares against."""
    anomaly_quantile: float = Field(default=0.99, gt=0, lt=1)
    """Autoencoder: the quantile of validation reconstruction errors above which a row is flagged."""
    search: SearchSpace | None = None
    """Hyperparameter search; one run with the config as given when omitted."""
    quantize_int8: bool = False
    """Also export a dynamically int8-quantised ONNX (for devices), its change against the float model measured."""

    @model_validator(mode="after")
    def _gpus(self) -> TrainingConfig:
        if self.distributed and self.num_gpus and self.world_size // self.workers > self.num_gpus:
            per_worker = self.world_size // self.workers
            raise ValueError(f"{per_worker} ranks on each worker need as many GPUs, not num_gpus {self.num_gpus}")
        return self

    @property
    def ranks(self) -> int:
        """Processes the run trains on, on every worker together: 1 unless distributed; then
        `world_size`, or `num_gpus` when world_size is left at 1."""
        if not self.distributed:
            return 1
        return self.num_gpus if self.world_size == 1 and self.num_gpus > 1 else self.world_size


class DataSource(Strict):
    """Where training or inference rows come from: a file under the data root, or inline rows."""

    uri: Uri | None = None
    """A `file://` URI relative to, and confined to, the worker's data root."""
    rows: list[Row] | None = Field(default=None, max_length=100_000)
    """Inline rows, column name to value."""
    target: ColumnName | None = None
    """The column to predict: a forecaster's series; for an autoencoder an optional 0/1 anomaly label,
    kept out of training and used to score the test rows."""

    @model_validator(mode="after")
    def _one_source(self) -> DataSource:
        if (self.uri is None) == (self.rows is None):
            raise ValueError("give exactly one of 'uri' or 'rows'")
        return self


class Gate(Strict):
    """An evaluation gate: the new version takes `alias` only when it beats the version holding it
    (champion against challenger, on the same held-out rows) by `margin`."""

    alias: Id
    """The alias the new version is for (`production`); with no version holding it yet, it takes it."""
    dataset: DataSource
    """Held-out rows, with the target column, that neither version was trained on."""
    metric: Literal["accuracy", "mae", "rmse"] = "accuracy"
    """How the two are compared: accuracy (classifiers; higher wins), mae or rmse (regressors; lower wins)."""
    margin: float = Field(default=0.0, ge=0.0, le=1e9)
    """How much better the challenger must score: strictly more than the champion plus this (accuracy),
    or less than the champion minus it (mae, rmse); 0 asks only for no worse."""


class TrainingTask(TaskBase):
    """`forseti.task.training.v1`: train a supervised model."""

    framework: Literal["pytorch"] = "pytorch"
    """The training framework."""
    model_type: Literal["classifier", "regressor", "autoencoder", "forecaster"]
    """What to train."""
    name: Name | None = None
    """Registry name of the model; derived from the job when omitted."""
    config: TrainingConfig = Field(default_factory=TrainingConfig)
    """Training settings."""
    data_sources: list[DataSource] = Field(min_length=1, max_length=16)
    """Training data."""
    gate: Gate | None = None
    """Promote the new version to an alias only when it wins on held-out data (None: register it,
    announce it, move no alias)."""


class RLConfig(Strict):
    """RL settings (the seed's RLConfig)."""

    total_timesteps: int = Field(default=100_000, ge=1, le=10**9)
    """Environment steps to train for (at most 10^9: days of CPU even for the smallest policy; the
    worker's `max_duration` bounds the time)."""
    num_envs: int = Field(default=1, ge=1, le=256)
    """Parallel environments (at most 256)."""
    gamma: float = Field(default=0.99, gt=0, le=1)
    """Discount factor."""
    learning_rate: LearningRate = 3e-4
    """Optimizer step size."""
    n_steps: int = Field(default=2048, ge=1, le=1_000_000)
    """Rollout length per env for on-policy algorithms."""
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    """Random seed for reproducible runs."""
    checkpoint_interval: int = Field(default=10_000, ge=1, le=10**9)
    """Timesteps between checkpoints."""
    quantize_int8: bool = False
    """Also export a dynamically int8-quantised policy ONNX (for devices), its action agreement with the
    float policy measured."""


class PolicyConfig(Strict):
    """The policy network."""

    net_arch: list[Annotated[int, Field(ge=1, le=65_536)]] = Field(default_factory=lambda: [64, 64], max_length=16)
    """Hidden layer sizes."""
    activation: Literal["tanh", "relu", "elu", "gelu"] = "tanh"
    """Hidden activation."""


class EvaluationConfig(Strict):
    """Evaluation after training."""

    episodes: int = Field(default=10, ge=0, le=10_000)
    """Deterministic evaluation episodes."""


class PolicyGate(Strict):
    """An evaluation gate for policies: the new policy takes `alias` only when its mean return over the
    job's evaluation episodes beats the champion's (the alias's policy, acting on the same seeded
    episodes) by `margin`."""

    alias: Id
    """The alias the new policy is for (`production`); with no policy holding it yet, it takes it."""
    margin: float = Field(default=0.0, ge=0.0, le=1e9)
    """How much more mean return the challenger needs (0: no less than the champion)."""


class RLTask(TaskBase):
    """`forseti.task.rl.v1`: train an RL policy."""

    algorithm: Literal["ppo", "sac", "dqn", "a2c"]
    """The stable-baselines3 algorithm."""
    environment: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_./:-]{1,128}$")]
    """A registered gymnasium environment id."""
    executor: Id | Annotated[list[Id], Field(min_length=1, max_length=32)] | None = None
    """Null runs the env inside the worker; an executor id runs it remotely over the bus; a list of
    ids spreads `config.num_envs` over one session on each (an id named twice: two sessions on its
    replicas, on two different ones where it has them), stepped together."""
    name: Name | None = None
    """Registry name of the agent."""
    config: RLConfig = Field(default_factory=RLConfig)
    """RL settings."""
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    """Policy network."""
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    """Evaluation after training."""
    gate: PolicyGate | None = None
    """Promote the new policy to an alias only when it beats the alias's policy on the same episodes."""

    @model_validator(mode="after")
    def _gate_has_episodes(self) -> RLTask:
        if self.gate is not None and (self.evaluation.episodes == 0 or self.config.seed is None):
            raise ValueError(
                "a gate compares policies on the same seeded episodes: set evaluation.episodes and config.seed"
            )
        return self


class LoraConfig(Strict):
    """LoRA adapter shape."""

    r: int = Field(default=16, ge=1, le=1024)
    """Adapter rank."""
    alpha: float = Field(default=32.0, gt=0, le=65_536)
    """Scaling numerator (scale = alpha / r)."""
    dropout: float = Field(default=0.05, ge=0, lt=1)
    """Dropout on the adapter input."""
    target_modules: list[ShortText] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1, max_length=64)
    """Module names that get adapters."""


class EwcConfig(Strict):
    """Elastic weight consolidation against forgetting."""

    lambda_: float = Field(default=0.0, ge=0, le=1e9, alias="lambda")
    """Penalty strength; 0 turns EWC off."""
    fisher_samples: int = Field(default=64, ge=1, le=1_000_000)
    """Examples used to estimate the Fisher information."""


class FinetuneConfig(Distribution):
    """Fine-tuning loop settings."""

    epochs: int = Field(default=1, ge=1, le=1000)
    """Passes over the dataset."""
    batch_size: int = Field(default=4, ge=1, le=4096)
    """Sequences per micro-batch."""
    learning_rate: LearningRate = 2e-4
    """Optimizer step size."""
    grad_accum: int = Field(default=1, ge=1, le=4096)
    """Micro-batches per optimizer step."""
    max_seq_len: int = Field(default=512, ge=8, le=131_072)
    """Tokens per sequence after truncation."""
    checkpoint_interval: int = Field(default=50, ge=1, le=1_000_000)
    """Optimizer steps between checkpoints."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Compute precision: auto is bf16 (or fp16) on CUDA and fp32 on CPU; half precision needs CUDA."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train: auto takes CUDA when present."""
    seed: int = Field(default=0, ge=0, le=2**32 - 1)
    """Seed for adapter initialisation and data order."""


class ExportConfig(Strict):
    """What a fine-tune exports."""

    gguf: list[Literal["f32", "f16", "q8_0", "q4_0", "q4_k_m"]] = Field(default_factory=list, max_length=5)
    """Merged-model GGUF types to write."""
    adapter_gguf: bool = False
    """Also write the adapter as a GGUF LoRA (with an F32 GGUF of the base model to apply it to)."""
    check_prompts: int = Field(default=4, ge=1, le=256)
    """Dataset examples the parity check evaluates each GGUF on."""


class FinetuneTask(TaskBase):
    """`forseti.task.finetune.v1`: fine-tune an LLM with LoRA."""

    base_model: Uri
    """A local Hugging Face model folder under the data root, or a registry id."""
    dataset: Uri
    """A JSONL file under the data root."""
    name: Name
    """Adapter name; versions are kept per name."""
    lora: LoraConfig = Field(default_factory=LoraConfig)
    """Adapter shape."""
    ewc: EwcConfig = Field(default_factory=EwcConfig)
    """Forgetting protection."""
    config: FinetuneConfig = Field(default_factory=FinetuneConfig)
    """Loop settings."""
    export: ExportConfig = Field(default_factory=ExportConfig)
    """Exports."""


class InferenceConfig(Strict):
    """Inference settings."""

    batch_size: int = Field(default=1024, ge=1, le=1_000_000)
    """Rows per batch."""


class InferenceTask(TaskBase):
    """`forseti.task.inference.v1`: run a registered model on rows."""

    model_id: Id
    """The registry id of the model."""
    inputs: list[Row] | None = Field(default=None, max_length=100_000)
    """Rows to predict on."""
    uri: Uri | None = None
    """A file under the data root, instead of inline rows."""
    config: InferenceConfig = Field(default_factory=InferenceConfig)
    """Inference settings."""

    @model_validator(mode="after")
    def _one_input(self) -> InferenceTask:
        if (self.inputs is None) == (self.uri is None):
            raise ValueError("give exactly one of 'inputs' or 'uri'")
        return self


Task = TrainingTask | RLTask | FinetuneTask | InferenceTask

TASK_MODELS: dict[TaskKind, type[TaskBase]] = {
    TaskKind.TRAINING: TrainingTask,
    TaskKind.RL: RLTask,
    TaskKind.FINETUNE: FinetuneTask,
    TaskKind.INFERENCE: InferenceTask,
}
"""The payload model of each task kind."""


def task_type(kind: TaskKind) -> str:
    """The CloudEvents type of a task kind."""
    return f"forseti.task.{kind.value}.v1"


def task_channel(kind: TaskKind) -> str:
    """The channel a task kind is published on."""
    return f"forseti.tasks.{kind.value}"


def dump_task(task: TaskBase) -> dict[str, Any]:
    """A task as JSON-ready data, with wire aliases such as `lambda`."""
    return task.model_dump(mode="json", by_alias=True, exclude_none=True)
