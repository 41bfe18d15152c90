"""Edge benchmark: what a device pays to run Forseti's edge agent.

1. Installed size: a clean virtual environment with `forseti[edge]` (no torch) against this one (all
   extras); the clean one must import the agent and must not have torch.
2. In that clean environment, in a fresh process: RSS before and after loading a PPO policy (64x64
   MLP on CartPole), its cold load time, and `OnnxPolicy.act` p50 / p99 for one observation on one
   core. SB3's `model.predict` on the same policy is measured here for comparison.
3. Over a real nats-server: `forseti.edge.act.v1` request-reply p50 / p99 through the agent, and the
   longest pause between answers while a new version is announced and swapped in.
4. int8 policies: a PPO (CartPole) and a SAC (Pendulum) policy exported float and int8, their action
   agreement, returns over the same episodes, act latency and file sizes.

    python bench/edge.py [--no-write] [--skip-venv]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from jobs import request_latencies
from report import write_section
from stable_baselines3 import PPO, SAC

from forseti.adapters.artifacts import share
from forseti.adapters.bus import create_bus
from forseti.adapters.bus.servers import NatsServer
from forseti.adapters.exporters import sha256_of
from forseti.adapters.exporters.policy import export_policy
from forseti.adapters.inference import OnnxPolicy
from forseti.envs.local_policy import act_locally
from forseti.schemas.catalog import MODELS, edge_channel
from forseti.schemas.envelope import decode, encode
from forseti.schemas.inference import ActReply, ActRequest
from forseti.schemas.models import ModelAvailable
from forseti.worker.engine.loop import run as run_loop
from forseti.worker.services.edge import EdgeAgent

REPO = Path(__file__).resolve().parents[1]
PROBE = """
import json, resource, sys, time
import numpy as np, psutil
process = psutil.Process()
before = process.memory_info().rss
started = time.perf_counter()
from forseti.adapters.inference import OnnxPolicy
policy = OnnxPolicy(__import__("pathlib").Path(sys.argv[1]), threads=1)
load = time.perf_counter() - started
after = process.memory_info().rss
observation = np.zeros((1, 4), dtype=np.float32)
for _ in range(1000):
    policy.act(observation)
times = []
for _ in range(20000):
    t = time.perf_counter(); policy.act(observation); times.append(time.perf_counter() - t)
times.sort()
raw = []
feed = {"observation": observation}
for _ in range(20000):
    t = time.perf_counter(); policy.session.run(None, feed); raw.append(time.perf_counter() - t)
raw.sort()
print(json.dumps({"raw_p50_us": raw[len(raw) // 2] * 1e6, "raw_p99_us": raw[int(len(raw) * 0.99)] * 1e6,
                  "rss_before_mb": before / 2**20, "rss_after_mb": after / 2**20, "load_s": load,
                  "p50_us": times[len(times) // 2] * 1e6, "p99_us": times[int(len(times) * 0.99)] * 1e6,
                  "torch": "torch" in sys.modules}))
"""


def site_size(python: Path) -> float:
    """MB of the environment's site-packages."""
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return sum(p.stat().st_size for p in Path(site).rglob("*") if p.is_file()) / 2**20


def edge_venv(folder: Path) -> Path:
    """A clean venv with `forseti[edge]` (and psutil for the probe); its python."""
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    python = folder / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", f"{REPO}[edge]", "psutil"], check=True, cwd=REPO)
    return python


def train_policy(folder: Path, seed: int) -> Path:
    """A PPO policy (64x64) on CartPole, exported as the RL handler exports it; the ONNX path."""
    model = PPO("MlpPolicy", "CartPole-v1", n_steps=256, seed=seed, policy_kwargs={"net_arch": [64, 64]})
    model.learn(1024)
    export_policy(model, folder, algorithm="ppo", environment="CartPole-v1", seed=seed)
    return folder / "policy.onnx"


def int8_policy(folder: Path, algorithm: str, environment: str, steps: int, episodes: int = 20) -> dict[str, Any]:
    """A policy trained for `steps`, exported float and int8: agreement, returns over the same seeded
    episodes, act p50 and file sizes of both."""
    algo = PPO if algorithm == "ppo" else SAC
    model = algo("MlpPolicy", environment, seed=0, policy_kwargs={"net_arch": [64, 64]})
    model.learn(steps)
    export = export_policy(model, folder, algorithm=algorithm, environment=environment, int8=True)
    assert export.int8_path is not None
    row: dict[str, Any] = {"algorithm": algorithm, "environment": environment, "steps": steps, **export.int8_figures}
    for label, path in (("float", export.onnx_path), ("int8", export.int8_path)):
        policy = OnnxPolicy(path, threads=1)
        row[f"{label}_reward"] = float(np.mean(act_locally(gym.make(environment), policy, episodes=episodes, seed=7)))
        observation = np.zeros((1, *policy.observation_shape), dtype=np.float32)
        times = []
        for _ in range(5000):
            started = time.perf_counter()
            policy.act(observation)
            times.append(time.perf_counter() - started)
        row[f"{label}_p50_us"] = sorted(times)[len(times) // 2] * 1e6
        row[f"{label}_kb"] = path.stat().st_size / 1024
    return row


def sb3_predict() -> dict[str, float]:
    """SB3's predict p50 / p99 for one observation, for comparison."""
    model = PPO("MlpPolicy", "CartPole-v1", n_steps=256, seed=0, policy_kwargs={"net_arch": [64, 64]})
    observation = np.zeros(4, dtype=np.float32)
    for _ in range(200):
        model.predict(observation, deterministic=True)
    times = []
    for _ in range(5000):
        started = time.perf_counter()
        model.predict(observation, deterministic=True)
        times.append(time.perf_counter() - started)
    times.sort()
    return {"p50_us": times[len(times) // 2] * 1e6, "p99_us": times[int(len(times) * 0.99)] * 1e6}


def announcement(onnx: Path, model_id: str, version: str) -> ModelAvailable:
    """The model.available a worker would publish for `onnx`."""
    return ModelAvailable(
        model_id=model_id,
        name="bench-policy",
        version=version,
        format="onnx",
        uri=onnx.resolve().as_uri(),
        sha256=sha256_of(onnx),
        size_bytes=onnx.stat().st_size,
        kind="policy",
        created_at="2026-11-22T00:00:00Z",
        device_id="bench-device",
    )


async def over_nats(folder: Path, first: Path, second: Path, requests: int = 3000) -> dict[str, float]:
    """Request-reply through the agent, and the longest pause while a second version swaps in."""
    with NatsServer(folder / "nats") as server:
        worker, device, client = (create_bus(server.url) for _ in range(3))
        for bus in (worker, device, client):
            await bus.connect()
        agent = EdgeAgent(device, device_id="bench-device", data_dir=folder / "device")
        await agent.start()
        assert await agent.load(await share(worker, announcement(first, "bench-v1", "1")))
        ask = encode(ActRequest(observations=[[0.0, 0.0, 0.0, 0.0]], name="bench-policy"))
        channel = edge_channel("bench-device")
        latencies = await request_latencies(client, channel, ask, requests)

        # a steady stream of requests while the second version is announced, fetched and swapped in
        gaps: list[float] = []
        served: set[str] = set()
        swap = asyncio.create_task(
            worker.publish(MODELS, encode(await share(worker, announcement(second, "bench-v2", "2"))))
        )
        last = time.perf_counter()
        deadline = last + 10
        while len(gaps) < 500 or ("bench-v2" not in served and time.perf_counter() < deadline):
            reply: Any = decode(await client.request(channel, ask, timeout=10)).data
            assert isinstance(reply, ActReply)
            served.add(reply.model_id)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
        await swap
        await agent.stop()
        for bus in (worker, device, client):
            await bus.close()
    return {
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
        "swap_max_gap_ms": max(gaps) * 1000,
        "swap_requests": len(gaps),
        "swapped": float("bench-v2" in served),
    }


def main() -> None:
    """Measure, print and record."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    parser.add_argument("--skip-venv", action="store_true", help="measure the probe in this environment instead")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        first, second = train_policy(folder / "v1", 0), train_policy(folder / "v2", 1)
        if args.skip_venv:
            python, edge_size = Path(sys.executable), float("nan")
        else:
            python = edge_venv(folder / "venv")
            edge_size = site_size(python)
        full_size = site_size(Path(sys.executable))
        probe = json.loads(
            subprocess.run([str(python), "-c", PROBE, str(first)], capture_output=True, text=True, check=True).stdout
        )
        sb3 = sb3_predict()
        nats = run_loop(over_nats(folder, first, second))
        int8 = [
            int8_policy(folder / "int8-ppo", "ppo", "CartPole-v1", 50_000),
            int8_policy(folder / "int8-sac", "sac", "Pendulum-v1", 8_000),
        ]
    print(json.dumps({"edge_mb": edge_size, "full_mb": full_size, "probe": probe, "sb3": sb3, "nats": nats}, indent=1))
    print(json.dumps(int8, indent=1))
    section = "\n".join(
        [
            "## Edge (`bench/edge.py`)",
            "",
            f"Measured {time.strftime('%Y-%m-%d')} on {platform.processor() or platform.machine()}, CPU; a PPO policy "
            "(MLP 64x64) on CartPole, exported as the RL handler exports it.",
            "",
            "| measurement | figure | baseline |",
            "| --- | --- | --- |",
            f"| installed size, clean venv with `forseti[edge]` (site-packages) | {edge_size:,.0f} MB | "
            f"this venv, all extras: {full_size:,.0f} MB |",
            f"| torch importable in the edge venv | {'yes' if probe['torch'] else 'no'} | |",
            f"| RSS of a fresh edge process before / after loading the policy | {probe['rss_before_mb']:.0f} / "
            f"{probe['rss_after_mb']:.0f} MB | |",
            f"| cold load (import onnxruntime, read the file, build the session) | {probe['load_s'] * 1000:.0f} ms | |",
            f"| `OnnxPolicy.act`, one observation, one core: p50 / p99 | "
            f"{probe['p50_us']:.1f} / {probe['p99_us']:.1f} us | "
            f"SB3 `model.predict`: {sb3['p50_us']:.0f} / {sb3['p99_us']:.0f} us |",
            f"| the bare onnxruntime `session.run` inside it: p50 / p99 | "
            f"{probe['raw_p50_us']:.1f} / {probe['raw_p99_us']:.1f} us | |",
            f"| `forseti.edge.act.v1` request-reply over nats-server: p50 / p99 | {nats['p50_ms']:.3f} / "
            f"{nats['p99_ms']:.3f} ms | |",
            f"| longest pause between answers while v2 is announced, fetched and swapped in "
            f"({nats['swap_requests']} requests, swapped: {'yes' if nats['swapped'] else 'no'}) | "
            f"{nats['swap_max_gap_ms']:.2f} ms | the steady p99 above |",
            "",
            "The swap loads the new version beside the serving one (fetch, sha256, onnxruntime session) and switches "
            "with one assignment; the pause is what the client saw between two answers.",
            "",
            "### int8 policies (`config.quantize_int8`)",
            "",
            "Trained here (MLP 64x64, seed 0), exported float and dynamically int8-quantised as the RL handler "
            "does; returns over the same 20 seeded episodes acted by each ONNX file (`act_locally`); agreement on "
            "the export's 1,000 random observations (discrete: the same action; continuous: within 1% of the "
            "action range).",
            "",
            "| policy | action agreement | max abs diff | return float / int8 | act p50 float / int8 "
            "| file float / int8 |",
            "| --- | --- | --- | --- | --- | --- |",
            *(
                f"| {r['algorithm'].upper()} {r['environment']}, {r['steps']:,} steps "
                f"| {r['int8_action_agreement']:.1%} | "
                f"{r['int8_max_abs_diff']:.3g} | {r['float_reward']:.1f} / {r['int8_reward']:.1f} | "
                f"{r['float_p50_us']:.1f} / {r['int8_p50_us']:.1f} us | {r['float_kb']:.0f} / {r['int8_kb']:.0f} KB |"
                for r in int8
            ),
            "",
            "On networks this small int8 buys a smaller file, not speed: quantising the activations on every call "
            "costs more than the int8 matrix products save. The reward column is the figure to judge a quantised "
            "policy by; random observations from the space are not the states a trained policy visits.",
        ]
    )
    print(section)
    if not args.no_write:
        write_section("edge", section)


if __name__ == "__main__":
    main()
