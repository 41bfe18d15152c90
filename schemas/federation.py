"""Federated learning on `forseti.federation.<name>.*`: a coordinator and the agents that teach its model.

Two forms share one protocol. In the *updates* form (Flower's) an agent pulls the global weights
(`pull`), trains on its own rows and sends back the change (`update`); the coordinator aggregates a
round's changes (FedAvg, FedProx, FedAdam) or every K arrivals (FedBuff). In the *experience* form
(the seed's) a short-lived agent exports its trajectories before it ends (`experience`); the
coordinator keeps those at or above a quality threshold, consolidates a model on them every N
agents and gives new agents a warm start (`warmstart`). The coordinator announces each round on
`rounds`, so waiting agents pull at once. Every request is answered; what is refused says why.
"""

from __future__ import annotations

from typing import Annotated, Literal, Self

from pydantic import Field, StringConstraints, model_validator

from .base import FiniteFloat, Id, LongText, MetricMap, ShortText, Strict, Tags
from .errors import ErrorCode

Strategy = Literal["fedavg", "fedprox", "fedadam", "fedbuff"]
Form = Literal["updates", "experience"]
Encoding = Literal["f32", "ring64"]
Column = Annotated[str, StringConstraints(min_length=1, max_length=128)]
MAX_TENSOR_BYTES = 8 * 1024 * 1024
"""The largest weights payload a message carries (base64 of the raw bytes; NATS' default message limit is
1 MiB, so the default server takes models up to about 700 KiB of float32)."""


class Tensors(Strict):
    """A model's parameters (or a change to them), in the order the model lists them."""

    names: list[ShortText] = Field(max_length=1024)
    """Parameter names (`0.weight`, `0.bias`, ...)."""
    shapes: list[list[Annotated[int, Field(ge=0, le=1 << 24)]]] = Field(max_length=1024)
    """Each parameter's shape."""
    encoding: Encoding = "f32"
    """`f32`: little-endian float32; `ring64`: little-endian uint64, fixed-point values under pairwise masks
    (secure aggregation), meaningful only summed over a round."""
    data: Annotated[str, StringConstraints(max_length=MAX_TENSOR_BYTES * 4 // 3 + 4)]
    """The parameters' bytes one after another, base64."""

    @model_validator(mode="after")
    def _aligned(self) -> Self:
        if len(self.names) != len(self.shapes):
            raise ValueError(f"{len(self.names)} names for {len(self.shapes)} shapes")
        return self


class FederatedModel(Strict):
    """The model a federation trains: a multilayer perceptron on numeric columns."""

    model_type: Literal["classifier"] = "classifier"
    """What it predicts (classifiers only for now)."""
    columns: list[Column] = Field(min_length=1, max_length=4096)
    """Numeric input columns, in order."""
    target: Column = "label"
    """The column agents' rows give the class in."""
    classes: list[int | ShortText] = Field(min_length=2, max_length=1000)
    """The classes, in the order of the outputs."""
    hidden: list[Annotated[int, Field(ge=1, le=4096)]] = Field(default_factory=lambda: [32], max_length=8)
    """Hidden layer widths."""
    means: list[FiniteFloat] | None = None
    """Per-column value subtracted before the network (agreed in advance: no agent's data is pooled to
    compute it); None: 0."""
    scales: list[Annotated[float, Field(gt=0)]] | None = None
    """Per-column divisor after the mean; None: 1."""
    seed: int = 0
    """Seed of the initial weights."""

    @model_validator(mode="after")
    def _per_column(self) -> Self:
        for name in ("means", "scales"):
            values = getattr(self, name)
            if values is not None and len(values) != len(self.columns):
                raise ValueError(f"{name} has {len(values)} values for {len(self.columns)} columns")
        return self


class LocalTraining(Strict):
    """How agents train on their own rows each round."""

    epochs: int = Field(default=1, ge=1, le=100)
    """Passes over the agent's rows."""
    batch_size: int = Field(default=32, ge=1, le=65_536)
    """Rows per step."""
    learning_rate: float = Field(default=0.05, gt=0, le=10)
    """SGD step size."""
    proximal_mu: float = Field(default=0.0, ge=0, le=100)
    """FedProx's proximal term (mu/2 * |w - w_global|^2); 0 for the other strategies."""


class ServerOptimizer(Strict):
    """How the coordinator applies an aggregated change (FedAdam's and FedBuff's server step)."""

    learning_rate: float | None = Field(default=None, gt=0, le=100)
    """Server step size [Flower's defaults: 0.1 for FedAdam, 1 (the mean as it is) for the others]."""
    beta1: float = Field(default=0.9, ge=0, lt=1)
    """FedAdam: first-moment decay."""
    beta2: float = Field(default=0.99, ge=0, lt=1)
    """FedAdam: second-moment decay."""
    tau: float = Field(default=1e-9, gt=0)
    """FedAdam: adaptivity (added to the root of the second moment)."""


class Privacy(Strict):
    """Central differential privacy and secure aggregation (both off by default)."""

    clip_norm: float | None = Field(default=None, gt=0)
    """Clip each update to this L2 norm before aggregating (required with noise)."""
    noise_multiplier: float | None = Field(default=None, ge=0)
    """Gaussian noise on each round's sum, std = noise_multiplier * clip_norm; the mean is then taken
    over the round's participants with equal weights."""
    target_epsilon: float | None = Field(default=None, gt=0)
    """Instead of noise_multiplier: the epsilon to spend over all rounds (the multiplier is derived)."""
    delta: float = Field(default=1e-5, gt=0, lt=1)
    """The delta the epsilon is reported at."""
    secure_aggregation: bool = False
    """Agents mask their updates pairwise so the coordinator only learns each round's sum."""

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        noisy = self.noise_multiplier is not None or self.target_epsilon is not None
        if noisy and self.clip_norm is None:
            raise ValueError("differential privacy needs clip_norm (noise is scaled to it)")
        if self.noise_multiplier is not None and self.target_epsilon is not None:
            raise ValueError("give noise_multiplier or target_epsilon, not both")
        if self.secure_aggregation and self.clip_norm is None:
            raise ValueError("secure aggregation needs clip_norm: agents clip, as the coordinator cannot see updates")
        return self

    @property
    def noisy(self) -> bool:
        """Whether rounds add Gaussian noise."""
        return bool(self.noise_multiplier) or self.target_epsilon is not None


class ExperienceOptions(Strict):
    """The experience form: trajectories in, a route model out (after the seed's coordinator)."""

    quality_threshold: float = Field(default=0.4, ge=0, le=1)
    """Trajectories below this quality are counted and dropped."""
    consolidation_interval: int = Field(default=50, ge=1, le=100_000)
    """Consolidate (train the route model) every this many contributing agents."""
    embedding_dim: int = Field(ge=1, le=4096)
    """Length of every trajectory's embedding."""
    routes: list[ShortText] = Field(min_length=2, max_length=1000)
    """The routes the model learns to choose from an embedding."""
    epochs: int = Field(default=30, ge=1, le=1000)
    """Passes over the accepted trajectories at each consolidation."""
    buffer: int = Field(default=50_000, ge=1, le=1_000_000)
    """Accepted trajectories kept (the oldest go first)."""


class FederationConfig(Strict):
    """A federation: what `forseti coordinator` runs, stored with its state in the registry."""

    name: Id
    """The federation's name: its channels are `forseti.federation.<name>.*`."""
    form: Form = "updates"
    """`updates` (agents send weight changes) or `experience` (agents send trajectories)."""
    model: FederatedModel | None = None
    """The model of an updates federation (an experience federation's comes from `experience`)."""
    model_name: Id | None = None
    """The registry name of the consolidated versions [the federation's name]."""
    strategy: Strategy = "fedavg"
    """How updates are combined."""
    rounds: int = Field(default=30, ge=1, le=100_000)
    """Rounds (FedBuff: aggregations) before the federation is done."""
    min_participants: int = Field(default=2, ge=1, le=10_000)
    """A round opens once this many agents are waiting, and counts once this many reported."""
    max_participants: int = Field(default=100, ge=1, le=10_000)
    """Agents taken into one round at most."""
    gather_seconds: float = Field(default=0.5, ge=0, le=3600)
    """After `min_participants` are waiting, how long to wait for more before opening a round."""
    round_deadline: float = Field(default=60.0, gt=0, le=86_400)
    """Seconds a round waits for its participants; who has not reported by then is left out."""
    local: LocalTraining = Field(default_factory=LocalTraining)
    """Agents' local training."""
    server: ServerOptimizer = Field(default_factory=ServerOptimizer)
    """The server step of FedAdam and FedBuff."""
    buffer_size: int = Field(default=5, ge=1, le=10_000)
    """FedBuff: aggregate every this many updates."""
    max_staleness: int = Field(default=10, ge=0, le=10_000)
    """FedBuff: updates trained on a global model more than this many versions old are refused."""
    max_update_norm: float = Field(default=1000.0, gt=0)
    """Updates whose L2 norm exceeds this are refused as absurd."""
    privacy: Privacy = Field(default_factory=Privacy)
    """Differential privacy and secure aggregation."""
    experience: ExperienceOptions | None = None
    """The experience form's options."""
    device_tags: Tags = Field(default_factory=list)
    """Announce consolidated versions for devices with these tags."""
    announce_every: int = Field(default=1, ge=1, le=100_000)
    """Register and announce a version every this many rounds (and after the last)."""

    @model_validator(mode="after")
    def _complete(self) -> Self:
        if self.form == "updates" and self.model is None:
            raise ValueError("an updates federation needs `model`")
        if self.form == "experience" and self.experience is None:
            raise ValueError("an experience federation needs `experience`")
        if self.min_participants > self.max_participants:
            raise ValueError("min_participants is above max_participants")
        if self.privacy.secure_aggregation and self.strategy == "fedbuff":
            raise ValueError("secure aggregation needs synchronous rounds (the masks cancel within a round)")
        if self.privacy.secure_aggregation and self.min_participants < 2:
            raise ValueError("secure aggregation needs min_participants >= 2 (one agent's sum is its update)")
        return self


class FederationPull(Strict):
    """`forseti.federation.pull.v1`: an agent asks what to do now (request to `.pull`)."""

    agent_id: Id
    """The agent, unique across the federation."""
    examples: int = Field(default=0, ge=0)
    """Rows the agent trains on (FedAvg weights by them)."""
    public_key: Annotated[str, StringConstraints(max_length=64)] | None = None
    """The agent's X25519 public key (base64), for secure aggregation's pairwise masks."""


class Peer(Strict):
    """Another participant of a round, as secure aggregation needs it."""

    agent_id: Id
    """Its id."""
    public_key: Annotated[str, StringConstraints(max_length=64)]
    """Its X25519 public key (base64)."""


class FederationTask(Strict):
    """`forseti.federation.task.v1`: what the agent is to do (reply to a pull)."""

    federation: Id
    """The federation."""
    status: Literal["train", "wait", "done"]
    """`train`: train on `weights` and send an update; `wait`: pull again when a round opens (or after
    `retry_after`); `done`: the federation has finished."""
    round: int = Field(default=0, ge=0)
    """The round to train for (FedBuff: the global version the weights are)."""
    attempt: int = Field(default=1, ge=1)
    """A secure round is tried again with fewer participants when one drops out: masks differ per attempt."""
    weights: Tensors | None = None
    """The global model to start from."""
    model: FederatedModel | None = None
    """The model's shape, to build it."""
    local: LocalTraining | None = None
    """How to train."""
    clip_norm: float | None = None
    """Clip the update to this L2 norm before sending (secure aggregation: the coordinator cannot)."""
    peers: list[Peer] = Field(default_factory=list, max_length=10_000)
    """Secure aggregation: every participant of this attempt (the agent itself included), in order."""
    weighted: bool = True
    """Secure aggregation: multiply the clipped update by the agent's example count before masking
    (FedAvg's weights); False under differential privacy, whose mean gives every agent equal weight."""
    deadline_seconds: float = Field(default=0.0, ge=0)
    """Seconds left before the round closes."""
    retry_after: float = Field(default=1.0, ge=0)
    """With `wait`: pull again after this many seconds at the latest."""


class FederationUpdate(Strict):
    """`forseti.federation.update.v1`: an agent's change to the global weights (request to `.update`)."""

    agent_id: Id
    """The agent."""
    round: int = Field(ge=0)
    """The round it trained for (FedBuff: the global version it started from)."""
    attempt: int = Field(default=1, ge=1)
    """The attempt of a secure round it masked for."""
    examples: int = Field(ge=1)
    """Rows it trained on."""
    delta: Tensors
    """Its weights minus the global weights it started from."""
    metrics: MetricMap = Field(default_factory=dict)
    """Its local figures (loss, accuracy on its rows)."""


class Trajectory(Strict):
    """One trajectory an experience agent collected (the seed's TrajectoryExport)."""

    embedding: list[FiniteFloat] = Field(min_length=1, max_length=4096)
    """The query's embedding."""
    quality: FiniteFloat = Field(ge=0, le=1)
    """How well it went, 0-1."""
    route: ShortText | None = None
    """The model route taken, if any."""
    context: list[ShortText] = Field(default_factory=list, max_length=64)
    """Context identifiers."""
    timestamp: int = Field(default=0, ge=0)
    """When (ms since the epoch)."""


class AgentStats(Strict):
    """An experience agent's own figures (the seed's AgentExportStats)."""

    total_trajectories: int = Field(default=0, ge=0)
    """Trajectories it processed."""
    avg_quality: FiniteFloat = 0.0
    """Their mean quality."""
    patterns_learned: int = Field(default=0, ge=0)
    """Patterns it learned locally."""


class ExperienceExport(Strict):
    """`forseti.federation.experience.v1`: what an ending agent learned (request to `.experience`)."""

    agent_id: Id
    """The agent; one export counts per agent id."""
    trajectories: list[Trajectory] = Field(max_length=100_000)
    """Its trajectories."""
    stats: AgentStats = Field(default_factory=AgentStats)
    """Its figures."""
    session_duration_ms: int = Field(default=0, ge=0)
    """How long it lived."""
    timestamp: int = Field(default=0, ge=0)
    """When it exported (ms since the epoch)."""


class FederationReceipt(Strict):
    """`forseti.federation.receipt.v1`: what became of a contribution (reply to an update or an export)."""

    accepted: bool
    """True when it counts."""
    duplicate: bool = False
    """True when it was counted before (a redelivery): nothing changed."""
    code: ErrorCode | None = None
    """Why it was refused."""
    reason: LongText = ""
    """Why, in words."""
    accepted_trajectories: int = Field(default=0, ge=0)
    """Experience: trajectories kept."""
    rejected_trajectories: int = Field(default=0, ge=0)
    """Experience: trajectories below the quality threshold."""
    consolidated: bool = False
    """Experience: this export completed an interval and the model was consolidated."""
    round: int = Field(default=0, ge=0)
    """The round (or global version) the federation is at after it."""
    finished: bool = False
    """True when the federation has run all its rounds: the agent can stop."""


class WarmStartQuery(Strict):
    """`forseti.federation.warmstart.query.v1`: a new agent asks for what the federation learned."""

    agent_id: Id
    """The agent."""


class RoutePattern(Strict):
    """What the federation learned about one route: where its good trajectories lie."""

    route: ShortText
    """The route."""
    centroid: list[FiniteFloat]
    """Quality-weighted mean embedding of its accepted trajectories."""
    avg_quality: FiniteFloat
    """Their mean quality."""
    count: int = Field(ge=0)
    """How many."""


class WarmStart(Strict):
    """`forseti.federation.warmstart.v1`: the consolidated state a new agent starts from (reply)."""

    federation: Id
    """The federation."""
    round: int = Field(ge=0)
    """Consolidations so far (0: none yet)."""
    model_version: ShortText | None = None
    """The registered version the weights are (None before the first consolidation)."""
    weights: Tensors | None = None
    """The route model (embedding in, route probabilities out)."""
    patterns: list[RoutePattern] = Field(default_factory=list)
    """Per-route patterns."""
    total_agents: int = Field(default=0, ge=0)
    """Agents that contributed."""
    total_trajectories: int = Field(default=0, ge=0)
    """Trajectories accepted."""
    avg_quality: FiniteFloat = 0.0
    """Mean quality of the accepted trajectories."""
    quality_threshold: FiniteFloat = 0.0
    """The threshold in force."""


class FederationRound(Strict):
    """`forseti.federation.round.v1`: a round opened or closed (broadcast on `.rounds`)."""

    federation: Id
    """The federation."""
    round: int = Field(ge=0)
    """The round."""
    attempt: int = Field(default=1, ge=1)
    """Its attempt (secure rounds retried without an agent that dropped out)."""
    state: Literal["open", "closed", "failed", "done"]
    """`open`: participants pull their work; `closed`: aggregated; `failed`: too few reported, the round
    is run again; `done`: the federation finished."""
    participants: list[Id] = Field(default_factory=list, max_length=10_000)
    """Who is in it (open) or who counted (closed)."""
    metrics: MetricMap = Field(default_factory=dict)
    """Figures of a closed round (participants' loss, epsilon spent, ...)."""


class FederationError(Strict):
    """`forseti.federation.error.v1`: why a request was not answered (reply)."""

    code: ErrorCode
    """What kind of refusal."""
    reason: LongText
    """Why, in words."""
