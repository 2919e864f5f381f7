"""A real multi-node Ray cluster on this one machine: a head and worker nodes on 127.0.0.x loopback addresses.

Each node is a `ray start --block` process of its own (its raylet, object store and workers), so a test
can kill one node's raylet by PID as a lost machine would lose it. Ports are picked free, outside
10002-19999 (the range Ray's defaults use); token auth follows ~/.ray/auth_token as every Ray process does.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from tests.conftest import tiny_lm


def _free_port(host: str = "127.0.0.1") -> int:
    for _ in range(200):
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if not 10002 <= port <= 19999:
            return port
    raise RuntimeError("no free port outside 10002-19999")


class LocalCluster:
    def __init__(self, root: Path, *, worker_cpus: tuple[int, ...] = (2, 2), head_cpus: int = 0) -> None:
        self.root = root
        # Ray's sockets live under its temp dir and their paths must stay under 108 bytes: pytest's own temp dirs
        # (deeper still under pytest-xdist, .../popen-gw0/...) are too long, so Ray gets a short one of its own.
        self.ray_temp = Path(tempfile.mkdtemp(prefix="rsm", dir="/tmp"))
        self.head_ip = "127.0.0.2"
        self.port = _free_port()
        self.address = f"{self.head_ip}:{self.port}"
        self.worker_cpus = worker_cpus
        self.head_cpus = head_cpus
        self.nodes: dict[str, subprocess.Popen] = {}
        self.ray = str(Path(sys.executable).with_name("ray"))
        # Nodes and drivers must agree on auth; a driver joining by address does not turn token auth on by itself.
        self.env = {**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "token"}

    def _start_node(self, ip: str, cpus: int, head: bool) -> None:
        cmd = [
            self.ray,
            "start",
            "--block",
            f"--node-ip-address={ip}",
            f"--num-cpus={cpus}",
            f"--node-manager-port={_free_port()}",
            f"--object-manager-port={_free_port()}",
            f"--metrics-export-port={_free_port()}",
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--dashboard-agent-grpc-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}",
            "--disable-usage-stats",
            "--object-store-memory=200000000",
        ]
        if head:
            cmd += [
                "--head",
                f"--port={self.port}",
                "--include-dashboard=false",
                f"--ray-client-server-port={_free_port()}",
                f"--temp-dir={self.ray_temp}",
            ]
        else:
            cmd += [f"--address={self.address}"]
        log = open(self.root / f"node-{ip}.log", "ab")
        self.nodes[ip] = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=self.env
        )

    def start(self, timeout: float = 180, attempts: int = 3) -> None:
        """Start the head, then each worker in turn. `ray start` gives a raylet a fixed 30 s to register, which a
        loaded machine can miss: a node whose start failed is started again."""
        self.root.mkdir(parents=True, exist_ok=True)
        nodes = [(self.head_ip, self.head_cpus, True)] + [
            (f"127.0.0.{3 + i}", cpus, False) for i, cpus in enumerate(self.worker_cpus)
        ]
        for count, (ip, cpus, head) in enumerate(nodes, start=1):
            self._join(ip, cpus, head, count, timeout, attempts)

    def _join(self, ip: str, cpus: int, head: bool, count: int, timeout: float, attempts: int) -> None:
        for attempt in range(attempts):
            self._start_node(ip, cpus, head=head)
            if self._wait_nodes(count, timeout, self.nodes[ip]):
                return
            if attempt == attempts - 1:
                raise RuntimeError(f"node {ip} did not join in {attempts} tries; logs in {self.root}")

    def add_worker(self, cpus: int, timeout: float = 180, attempts: int = 3) -> str:
        """Start one more worker node, as an autoscaler adds a machine, and wait until it is alive; its address."""
        ip = f"127.0.0.{3 + len(self.worker_cpus)}"
        self.worker_cpus = (*self.worker_cpus, cpus)
        self._join(ip, cpus, False, 1 + len(self.worker_cpus), timeout, attempts)
        return ip

    def _wait_nodes(self, count: int, timeout: float, node: subprocess.Popen) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and node.poll() is None:
            try:
                probe = subprocess.run(
                    [
                        sys.executable,
                        "-c",
                        f"import ray; ray.init(address='{self.address}', logging_level='ERROR');"
                        "print(sum(n['Alive'] for n in ray.nodes()))",
                    ],
                    capture_output=True,
                    text=True,
                    env=self.env,
                    # A probe can hang in ray.init (seen with a stale cluster of a killed run on the same
                    # addresses); it is tried again, within the deadline, rather than waited on forever.
                    timeout=max(1.0, min(60.0, deadline - time.monotonic())),
                )
            except subprocess.TimeoutExpired:
                continue
            if probe.returncode == 0 and probe.stdout.strip().splitlines()[-1:] == [str(count)]:
                return True
            time.sleep(1)
        return False

    def raylet_pid(self, ip: str) -> int:
        for proc in psutil.process_iter(["name", "cmdline"]):
            cmdline = " ".join(proc.info["cmdline"] or [])
            if "raylet" in (proc.info["name"] or "") and f"--node_ip_address={ip}" in cmdline:
                return proc.pid
        raise LookupError(f"no raylet for {ip}")

    def kill_node(self, ip: str) -> None:
        """SIGKILL the node's raylet, as a lost machine would lose it; the head notices in ~15 s."""
        os.kill(self.raylet_pid(ip), signal.SIGKILL)

    def revive(self, ip: str, timeout: float = 180) -> None:
        """Start the lost node `ip` again (a replacement machine joining), and wait until every node is alive."""
        old = self.nodes[ip]
        if old.poll() is None:
            old.kill()
            old.wait(30)
        cpus = dict((f"127.0.0.{3 + i}", c) for i, c in enumerate(self.worker_cpus))[ip]
        self._start_node(ip, cpus, head=False)
        if not self._wait_nodes(1 + len(self.worker_cpus), timeout, self.nodes[ip]):
            raise RuntimeError(f"node {ip} did not rejoin; logs in {self.root}")

    def stop(self) -> None:
        for proc in self.nodes.values():
            try:
                group = os.getpgid(proc.pid)
            except ProcessLookupError:
                continue
            for p in psutil.process_iter():  # every process the node started is in its session
                try:
                    if os.getpgid(p.pid) == group or os.getsid(p.pid) == group:
                        p.kill()
                except (ProcessLookupError, psutil.Error):
                    pass
        for proc in self.nodes.values():
            proc.wait(30)
        shutil.rmtree(self.ray_temp, ignore_errors=True)


# --- runs on a cluster: the three-node corpus and config shared by the fault and determinism tests --------

FILES, ROWS_PER_FILE = 8, 20


def three_node_config(
    root: Path,
    name: str,
    select: str | None = None,
    *,
    work: Path | None = None,
    corpus: str = "corpus",
    shard_rows: int = 32,
    embed_actors: int = 1,
) -> Path:
    """The run config of the multi-node tests: a real corpus, the real encoder, the tiny LM (conftest.tiny_lm), k=3,
    stratified entropy."""
    select = select or "{budget: 0.3, policy: stratified, score: entropy, seed: 0}"
    path = root / f"{name}.yaml"
    path.write_text(
        f"input: {{path: {root / corpus}, id_field: id}}\n"
        f"output: {{path: {root / name}}}\n"
        f"embed: {{batch_size: 8, max_tokens: 16, actors: {embed_actors}}}\n"
        f"scorers: [{{name: entropy, model: {tiny_lm()}, max_tokens: 16, batch_size: 8}}]\n"
        "cluster: {k: 3}\n"
        f"select: {select}\n"
        f"work_dir: {work or root / (name + '-work')}\n"
        f"shard_rows: {shard_rows}\n"  # several shards from a small corpus, so the run can be cut between them
    )
    return path


def run_on(address: str, config: Path, env: dict | None = None) -> subprocess.Popen:
    """`raysel run CONFIG --address ADDRESS` in a process of its own, as a user would start it."""
    return subprocess.Popen(
        [sys.executable, "-m", "raysel.cli", "run", str(config), "--address", address],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env or os.environ.copy(),
    )


def finish(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=900)  # nothing hangs: a lost node is noticed, its work redone
    assert proc.returncode == 0, out[-5000:]


def selected_ids(out: Path) -> list[str]:
    import pyarrow.parquet as pq

    return sorted(pq.read_table(out / "selected").column("id").to_pylist())
