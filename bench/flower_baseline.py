"""The Flower baseline of bench/federated.py: FedAvg in Flower's simulation runtime (Ray), same data,
same partition, same model, same initial weights and same local training as Forseti's run.

Runs in an environment with `flwr[simulation]`, torch and scikit-learn (`make bench-flower-env` makes
one in .venv-flower), called by bench/federated.py as
`python bench/flower_baseline.py --rounds 30 --clients 10 --alpha 0.3 --out FILE`; writes the test
accuracy after every round and the wall time as JSON."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from federated_data import CLASSES, HIDDEN, PIXELS, SCALE, dirichlet_partition, load
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation
from torch import nn

ARGS = argparse.Namespace()


def network(seed: int) -> nn.Module:
    """Forseti's federated MLP, initialised as Forseti's coordinator does (torch's init under the seed)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(PIXELS, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))


def data() -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor]:
    x_train, x_test, y_train, y_test = load()
    parts = dirichlet_partition(y_train, ARGS.clients, ARGS.alpha)
    shards = [
        (torch.tensor(x_train[p] / SCALE, dtype=torch.float32), torch.tensor(y_train[p], dtype=torch.int64))
        for p in parts
    ]
    return shards, torch.tensor(x_test / SCALE, dtype=torch.float32), torch.tensor(y_test, dtype=torch.int64)


client = ClientApp()


@client.train()
def train(msg: Message, context: Context) -> Message:
    """One client's round: SGD over its rows, batch order seeded by its id (as Forseti's agents do)."""
    shards, _, _ = data()
    pid = int(context.node_config["partition-id"])
    x, y = shards[pid]
    model = network(0)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=ARGS.lr)
    generator = torch.Generator().manual_seed(pid)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(ARGS.epochs):
        order = torch.randperm(len(x), generator=generator)
        for at in range(0, len(x), ARGS.batch):
            batch = order[at : at + ARGS.batch]
            optimizer.zero_grad()
            loss_fn(model(x[batch]), y[batch]).backward()
            optimizer.step()
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord({"num-examples": len(x)})})
    return Message(content=content, reply_to=msg)


server = ServerApp()
CURVE: list[float] = []


@server.main()
def main(grid: Grid, context: Context) -> None:
    _, x_test, y_test = data()

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = network(0)
        model.load_state_dict(arrays.to_torch_state_dict())
        with torch.no_grad():
            accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
        if server_round > 0:
            CURVE.append(accuracy)
        return MetricRecord({"accuracy": accuracy})

    strategy = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=ARGS.clients,
        min_available_nodes=ARGS.clients,
    )
    strategy.start(
        grid=grid, initial_arrays=ArrayRecord(network(0).state_dict()), num_rounds=ARGS.rounds, evaluate_fn=evaluate
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=0.3)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", type=Path, required=True)
    parser.parse_args(namespace=ARGS)
    started = time.perf_counter()
    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=ARGS.clients,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}},
    )
    ARGS.out.write_text(json.dumps({"curve": CURVE, "wall_s": time.perf_counter() - started}))
