"""What a coordinator sends: versions (registered, exported to ONNX, announced), round broadcasts, the
progress stream of `forseti.jobs.federation-<name>`, dead letters, and its Prometheus series."""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge

from forseti.adapters.artifacts import share
from forseti.adapters.bus import Bus
from forseti.adapters.encryption import Keyring
from forseti.adapters.objects import ObjectStore
from forseti.adapters.registry import ModelRecord, RegistryStore
from forseti.adapters.signing import Signer, seal
from forseti.schemas.catalog import DEADLETTER, MODELS, federation_channel, jobs_channel
from forseti.schemas.deadletter import DeadLetter
from forseti.schemas.envelope import encode
from forseti.schemas.errors import ErrorCode
from forseti.schemas.federation import FederatedModel, FederationConfig, FederationRound
from forseti.schemas.jobs import JobCompleted, JobProgress, JobState, TrainingMetrics, TrainingResult
from forseti.schemas.tasks import TaskKind

from ..engine.models import announcements, describe
from .model import export_onnx
from .state import FederationState
from .tensors import Layout, Params


class CoordinatorMetrics:
    """The coordinator's Prometheus series."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.registry = registry or CollectorRegistry()
        self.contributions = Counter(
            "forseti_federation_contributions",
            "Contributions by outcome (accepted, duplicate, late, refused_<check>).",
            ["federation", "outcome"],
            registry=self.registry,
        )
        self.round = Gauge("forseti_federation_round", "Rounds completed.", ["federation"], registry=self.registry)
        self.epsilon = Gauge(
            "forseti_federation_epsilon", "Differential privacy spent so far.", ["federation"], registry=self.registry
        )


def finite(figures: dict[str, float]) -> dict[str, float]:
    """The figures that events and the registry can carry (no NaN, no infinity)."""
    return {k: v for k, v in figures.items() if np.isfinite(v)}


@dataclass
class Outbox:
    """Where one federation's events and versions go."""

    bus: Bus
    store: RegistryStore
    config: FederationConfig
    folder: Path
    """Where exported versions are written."""
    owner: str
    """The coordinator, as dead-letter records name it."""
    objects: ObjectStore | None = None
    signer: Signer | None = None
    keyring: Keyring | None = None

    @property
    def job_id(self) -> str:
        """The id the progress stream goes out under."""
        return f"federation-{self.config.name}"

    async def announce(
        self, state: FederationState, model: FederatedModel, layout: Layout, weights: Params, figures: dict[str, float]
    ) -> None:
        """Register the global model as a version (child of the last one), export it to ONNX and announce it."""
        name = self.config.model_name or self.config.name
        model_id = f"{name}-r{state.round}-{secrets.token_hex(4)}"
        path = await asyncio.to_thread(export_onnx, model, layout, weights, self.folder / model_id / "model.onnx")
        record = await self.store.add_model(
            ModelRecord(
                id=model_id,
                name=name,
                model_type=model.model_type,
                export_path=str(path),
                export_format="onnx",
                metrics=finite(figures),
                parent_id=state.versions[-1] if state.versions else None,
                job_id=self.job_id,
                device_tags=list(self.config.device_tags),
            )
        )
        artifacts = describe([("onnx", None, path)], record.id)
        for artifact in artifacts:
            await self.store.add_artifact(artifact)
        for event in announcements(record, artifacts):
            shared = await share(self.bus, event, objects=self.objects, keyring=self.keyring)
            await self.bus.publish(MODELS, seal(encode(shared, subject=record.id), self.signer))
        state.versions.append(record.id)

    async def broadcast(self, event: FederationRound) -> None:
        """Tell the agents a round opened, closed or failed."""
        await self.bus.publish(federation_channel(self.config.name, "rounds"), encode(event, subject=self.config.name))

    async def progress(self, state: FederationState, message: str, figures: dict[str, float] | None = None) -> None:
        """A `job.progress` event: rounds done of rounds (an experience federation has no end: fraction 0)."""
        updates = self.config.form == "updates"
        event = JobProgress(
            job_id=self.job_id,
            kind=TaskKind.TRAINING,
            state=JobState.RUNNING,
            fraction=min(1.0, state.round / self.config.rounds) if updates else 0.0,
            step=state.round,
            total=self.config.rounds if updates else None,
            message=message,
            metrics=finite(figures or {}),
        )
        await self.bus.publish(jobs_channel(self.job_id), encode(event, subject=self.job_id))

    async def completed(self, state: FederationState, figures: dict[str, float]) -> None:
        """The federation's terminal job event, so a progress follower (`forseti watch`) ends with it."""
        model = await self.store.get_model(state.versions[-1])
        assert model is not None  # announced just before
        elapsed = int((time.time() - state.started_at) * 1000)
        rest = finite(figures)
        result = TrainingResult(
            model_id=model.id,
            export_path=model.export_path,
            metrics=TrainingMetrics(
                final_loss=rest.pop("loss", None),
                total_epochs=state.round,
                training_time_ms=elapsed,
                custom_metrics=rest,
            ),
        )
        event = JobCompleted(job_id=self.job_id, kind=TaskKind.TRAINING, result=result, duration_ms=elapsed)
        await self.bus.publish(jobs_channel(self.job_id), encode(event, subject=self.job_id))

    async def dead_letter(self, raw: bytes, verb: str, code: ErrorCode, reason: str) -> None:
        """A `forseti.deadletter.v1` record of a refused request, holding its bytes (the first MiB)."""
        record = DeadLetter(
            reason=code,
            detail=reason[:4096],
            channel=federation_channel(self.config.name, verb),
            worker=f"coordinator/{self.owner}",
            original_b64=base64.b64encode(raw[: 1 << 20]).decode(),
            original_size=len(raw),
        )
        await self.bus.publish(DEADLETTER, encode(record))
