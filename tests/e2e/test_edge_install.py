"""`pip install .[edge]` (forseti-worker) into a clean virtual environment: the agent imports and its
command runs, neither torch nor the other training libraries came with it, and the build is quiet."""

from __future__ import annotations

import shutil
import subprocess
import venv
from pathlib import Path

from .test_cli import REPO

PROBE = """
import importlib.util
import forseti.worker.services.edge, forseti.adapters.inference
heavy = [m for m in ("torch", "transformers", "peft", "stable_baselines3") if importlib.util.find_spec(m)]
print("heavy:", heavy)
"""


def test_forseti_edge_installs_into_a_clean_venv_without_torch(tmp_path: Path) -> None:
    venv.create(tmp_path / "venv", with_pip=True)
    python = str(tmp_path / "venv" / "bin" / "python")
    # a copy of the sources, so the build writes nothing into the checkout under test
    source = tmp_path / "src"
    shutil.copytree(
        REPO, source, ignore=shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__", "node_modules")
    )
    installed = subprocess.run(
        [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", f"{source}[edge]"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert installed.returncode == 0, installed.stderr[-4000:]
    # the build said nothing: setuptools warned 52 lines about schemas/json, a data folder it took for
    # an unlisted package (pip's own notes about this machine's index configuration aside)
    said = [line for line in installed.stderr.splitlines() if line.strip() and "WARNING: Location" not in line]
    assert not said, "\n".join(said[:20])
    probe = subprocess.run([python, "-c", PROBE], capture_output=True, text=True, check=False)
    assert probe.stdout.strip() == "heavy: []", probe.stdout + probe.stderr
    helped = subprocess.run(
        [str(tmp_path / "venv" / "bin" / "forseti"), "edge", "--help"], capture_output=True, text=True, check=False
    )
    assert helped.returncode == 0 and "--device-id" in helped.stdout, helped.stderr
