"""Federated learning: Forseti's coordinator against Flower, centralised training, FedBuff with slow
devices, and the cost of differential privacy, on one machine in one run.

Data (bench/federated_data.py): scikit-learn's digits, 80/20 stratified split, the training rows dealt
to 10 clients by a Dirichlet(0.3) partition over labels. Model: an MLP 64-32-10, inputs / 16, the same
initial weights everywhere (torch's init under seed 0). Local training: SGD, lr 0.1, batch 32, 5
epochs per round; 30 rounds, every client in every round.

- Forseti FedAvg: `forseti.worker.federation` over a real nats-server (a coordinator and 10 agents
  in this process, each with its own connection).
- Flower FedAvg: Flower's simulation runtime (Ray), run by bench/flower_baseline.py in an environment
  with `flwr[simulation]` (`make bench-flower-env`; without it that row is left out and says so).
- Centralised: the same MLP trained on the pooled rows for as many epochs as a client trains in all
  (rounds x local epochs).
- Slow devices: each agent waits out an emulated device time per round (0.1 s; 0.5 s for 3 of the
  10, 5x slower), for synchronous FedAvg and for FedBuff (aggregate every 5 arrivals, staleness
  weighted); time until FedBuff's test accuracy first reaches FedAvg's final accuracy.
- DP: FedAvg with update clipping (L2 1.0) and Gaussian noise for a target epsilon over the 30
  rounds (delta 1e-5, Opacus' RDP accountant, no sampling amplification): final accuracy per epsilon.

Run from bench/: `python federated.py [--flower-python PATH]`; writes the `federated` section of
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
from federated_data import CLASSES, HIDDEN, PIXELS, SCALE, dirichlet_partition, load
from report import verdicts, write_section

from forseti.adapters.bus import Bus, create_bus
from forseti.adapters.bus.servers import NatsServer
from forseti.adapters.registry import create_store
from forseti.schemas.federation import FederatedModel, FederationConfig, FederationTask, LocalTraining
from forseti.worker.federation.agent import UpdateAgent
from forseti.worker.federation.coordinator import Coordinator
from forseti.worker.federation.model import LocalTrainer, accuracy, features, initial
from forseti.worker.federation.privacy import Accountant

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = [f"p{i}" for i in range(PIXELS)]
MODEL = FederatedModel(columns=COLUMNS, classes=list(range(CLASSES)), hidden=[HIDDEN], scales=[SCALE] * PIXELS)
LOCAL = LocalTraining(epochs=5, batch_size=32, learning_rate=0.1)


def rows_of(x: np.ndarray, y: np.ndarray) -> list[dict[str, Any]]:
    return [dict(zip(COLUMNS, map(float, xi), strict=True), label=int(yi)) for xi, yi in zip(x, y, strict=True)]


class Data:
    """The split and the partition."""

    def __init__(self, clients: int, alpha: float) -> None:
        x_train, x_test, y_train, y_test = load()
        self.parts = [rows_of(x_train[p], y_train[p]) for p in dirichlet_partition(y_train, clients, alpha)]
        self.pooled = rows_of(x_train, y_train)
        self.x_test, self.y_test = features(MODEL, rows_of(x_test, y_test))

    def score(self, weights: list[np.ndarray]) -> float:
        layout, _ = initial(MODEL)
        return accuracy(MODEL, layout, weights, self.x_test, self.y_test)


class Recording(Coordinator):
    """A coordinator that scores the global model on the test set after every round, with the time."""

    data: Data
    started: float
    curve: list[tuple[float, float]]

    async def _closed(self, figures: dict[str, float], *, participants: list[str]) -> None:
        self.curve.append((time.perf_counter() - self.started, self.data.score(self.layout.split(self.weights))))
        await super()._closed(figures, participants=participants)


class Device(UpdateAgent):
    """An agent on a device that needs `device_seconds` for a round's local training."""

    device_seconds = 0.0

    async def _train_and_send(self, task: FederationTask) -> None:
        await asyncio.sleep(self.device_seconds)
        await super()._train_and_send(task)


async def forseti_run(
    server: NatsServer, data: Data, name: str, *, device: list[float] | None = None, **config: Any
) -> Recording:
    """One federation over the nats-server; its coordinator (with the accuracy curve)."""
    buses: list[Bus] = []

    async def connect() -> Bus:
        bus = create_bus(server.url)
        await bus.connect()
        buses.append(bus)
        return bus

    folder = Path(tempfile.mkdtemp(prefix="forseti-fed-"))
    store = create_store(str(folder / "registry.db"))
    await store.open()
    base: dict[str, Any] = {
        "name": name,
        "model": MODEL,
        "local": LOCAL,
        "rounds": 30,
        "min_participants": len(data.parts),
        "gather_seconds": 0.0,
        "round_deadline": 120,
        "announce_every": 10_000,
    }
    cfg = FederationConfig.model_validate({**base, **config})
    coordinator = Recording(await connect(), store, cfg, data_dir=folder, owner="bench")
    coordinator.data, coordinator.curve = data, []
    agents = []
    for i, rows in enumerate(data.parts):
        agent = Device(await connect(), name, f"client-{i}", rows, seed=i)
        agent.device_seconds = device[i] if device else 0.0
        agents.append(agent)
    await coordinator.start()
    coordinator.started = time.perf_counter()
    await asyncio.gather(*(a.run() for a in agents))
    await coordinator.stop()
    for bus in buses:
        await bus.close()
    await store.close()
    return coordinator


def centralised(data: Data, epochs: int) -> float:
    """The MLP trained on the pooled rows for `epochs` epochs with the clients' optimiser."""
    layout, weights = initial(MODEL)
    x, y = features(MODEL, data.pooled)
    local = LOCAL.model_copy(update={"epochs": epochs})
    delta, _ = LocalTrainer(MODEL, x, y, seed=0).train(layout, weights, local)
    return data.score([w + d for w, d in zip(weights, delta, strict=True)])


def flower(python: Path, rounds: int, clients: int, alpha: float) -> dict[str, Any] | None:
    """Flower's FedAvg simulation in its own environment; None when that environment is missing."""
    if not python.exists():
        print(f"no Flower environment at {python} (make bench-flower-env): Flower row left out", file=sys.stderr)
        return None
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "flower.json"
        command = [str(python), "flower_baseline.py", "--rounds", str(rounds), "--clients", str(clients),
                   "--alpha", str(alpha), "--epochs", str(LOCAL.epochs), "--lr", str(LOCAL.learning_rate),
                   "--batch", str(LOCAL.batch_size), "--out", str(out)]  # fmt: skip
        subprocess.run(command, cwd=Path(__file__).parent, check=True, capture_output=True, timeout=1800)
        result: dict[str, Any] = json.loads(out.read_text())
        return result


MARKS = (1, 5, 10, 20, 30)
"""The rounds whose accuracy the report shows."""


def marks(curve: list[float]) -> str:
    """The accuracy after each of MARKS rounds that the curve has."""
    return ", ".join(f"{curve[r - 1]:.3f}" for r in MARKS if r <= len(curve))


def time_to(curve: list[tuple[float, float]], target: float) -> float | None:
    """Seconds until the accuracy first reached `target`, or None."""
    return next((t for t, acc in curve if acc >= target - 1e-9), None)


async def main(args: argparse.Namespace) -> str:
    data = Data(args.clients, args.alpha)
    rounds = args.rounds
    with NatsServer(Path(tempfile.mkdtemp(prefix="forseti-nats-"))) as server:
        fedavg = await forseti_run(server, data, "fedavg", rounds=rounds)
        slow = [0.5 if i % 3 == 0 and i < 9 else 0.1 for i in range(args.clients)]  # clients 0, 3, 6: 5x slower
        sync_slow = await forseti_run(server, data, "fedavg-slow", rounds=rounds, device=slow)
        buff = await forseti_run(
            server, data, "fedbuff-slow", strategy="fedbuff", rounds=rounds * 10, buffer_size=5, min_participants=5,
            max_staleness=20, device=slow,
        )  # fmt: skip
        dp = {}
        for eps in args.epsilons:
            run = await forseti_run(
                server, data, f"dp-{eps:g}", rounds=rounds, privacy={"clip_norm": args.clip, "target_epsilon": eps}
            )
            dp[eps] = (run.curve[-1][1], run.state.history[-1].get("epsilon", float("nan")))
        clipped = await forseti_run(server, data, "clip-only", rounds=rounds, privacy={"clip_norm": args.clip})
    pooled = centralised(data, rounds * LOCAL.epochs)
    baseline = flower(Path(args.flower_python), rounds, args.clients, args.alpha)

    final = fedavg.curve[-1][1]
    target = sync_slow.curve[-1][1]
    sync_time = sync_slow.curve[-1][0]
    buff_time = time_to(buff.curve, target)
    sizes = [len(p) for p in data.parts]
    if buff_time is not None:
        reached = f"first reaches it after {buff_time:.1f} s ({buff_time / sync_time:.2f}x)"
    else:
        best = max(a for _, a in buff.curve)
        reached = f"does not reach it in {len(buff.curve)} aggregations ({buff.curve[-1][0]:.1f} s; best {best:.4f})"
    lines = [
        "## Federated learning (bench/federated.py)",
        "",
        f"Run {date.today().isoformat()} on {platform.node()} ({platform.machine()}, 2 cores, CPU only). Digits "
        f"(scikit-learn), 80/20 stratified split, training rows dealt to {args.clients} clients by Dirichlet("
        f"{args.alpha}) over labels (rows per client: {', '.join(map(str, sizes))}); MLP 64-{HIDDEN}-10; local "
        f"SGD lr {LOCAL.learning_rate}, batch {LOCAL.batch_size}, {LOCAL.epochs} epochs a round; {rounds} rounds, "
        "every client in every round; the same initial weights everywhere. Forseti runs over a real nats-server, "
        "its coordinator and agents in one process.",
        "",
        "| run | final test accuracy | wall time |",
        "| --- | --- | --- |",
        f"| Forseti FedAvg | {final:.4f} | {fedavg.curve[-1][0]:.1f} s |",
    ]
    if baseline:
        lines.append(f"| Flower FedAvg (simulation, Ray) | {baseline['curve'][-1]:.4f} | {baseline['wall_s']:.1f} s |")
    else:
        lines.append("| Flower FedAvg | not run: no Flower environment (`make bench-flower-env`) | |")
    lines += [
        f"| centralised, pooled rows, {rounds * LOCAL.epochs} epochs | {pooled:.4f} | |",
        "",
        f"Accuracy after rounds {', '.join(map(str, MARKS))}: Forseti {marks([a for _, a in fedavg.curve])}"
        + (f"; Flower {marks(baseline['curve'])}." if baseline else "."),
        "",
        f"Slow devices (emulated device time per round: 0.1 s, 0.5 s for clients 0, 3 and 6): synchronous FedAvg "
        f"ends its {rounds} rounds at {target:.4f} after {sync_time:.1f} s; FedBuff (every 5 arrivals, staleness "
        f"weight 1/sqrt(1+s)) {reached}.",
        "",
        f"Differential privacy (clip L2 {args.clip:g}, Gaussian noise for the target epsilon over {rounds} rounds, "
        "delta 1e-5, RDP accountant without sampling amplification): with clipping alone "
        f"{clipped.curve[-1][1]:.4f}.",
        "",
        "| target epsilon | epsilon spent | final accuracy | loss against FedAvg |",
        "| --- | --- | --- | --- |",
        *[
            f"| {eps:g} | {spent:.2f} | {acc:.4f} | {100 * (final - acc):.1f} points |"
            for eps, (acc, spent) in dp.items()
        ],
        "",
        f"Why epsilon 8 costs so much here: over {rounds} rounds it takes a noise multiplier of "
        f"{Accountant.multiplier_for(8.0, 1e-5, rounds):.2f}, so the averaged update of {args.clients} clients gets "
        f"noise of std {Accountant.multiplier_for(8.0, 1e-5, rounds) / args.clients:.2f} x clip on each of its "
        f"{initial(MODEL)[0].size} coordinates, while the whole update's norm is at most the clip. The noise on the "
        "mean falls as 1 / participants: DP-FedAvg needs rounds of hundreds of agents, which 1,437 digits rows "
        "cannot make.",
    ]
    checks = []
    if baseline:
        gap = abs(final - baseline["curve"][-1]) * 100
        checks.append(("FedAvg within 1 point of Flower's FedAvg", f"{gap:.1f} points", gap <= 1.0))
    central_gap = (pooled - final) * 100
    checks.append(("FedAvg within 3 points of centralised", f"{central_gap:.1f} points", central_gap <= 3.0))
    ratio = buff_time / sync_time if buff_time else float("inf")
    checks.append(("FedBuff reaches FedAvg's accuracy in <= 0.6x its time, 30% slowed 5x",
                   f"{ratio:.2f}x" if buff_time else "not reached", ratio <= 0.6))  # fmt: skip
    if 8.0 in dp:
        loss8 = (final - dp[8.0][0]) * 100
        checks.append(("DP at epsilon 8 loses <= 5 points", f"{loss8:.1f} points", loss8 <= 5.0))
    lines += verdicts(checks)
    section = "\n".join(lines)
    write_section("federated", section)
    return section


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=0.3)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--epsilons", type=float, nargs="*", default=[1.0, 4.0, 8.0, 16.0, 64.0])
    parser.add_argument("--flower-python", default=str(ROOT / ".venv-flower" / "bin" / "python"))
    print(asyncio.run(main(parser.parse_args())))
