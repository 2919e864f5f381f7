"""The Ray clusters raysel runs on (`raysel._internal.ray_stage.init_ray`, `raysel serve`), on a machine where other
clusters run: raysel joins only the cluster it is told about, ends all of a local cluster it started on every exit
it can observe, ends at its next start what a killed predecessor left, and never ends what it did not start.

Real processes throughout: drivers in subprocesses, a real `ray start --head`, a real `raysel serve`. Every test
has a Ray temp dir of its own (RAY_TMPDIR: the `ray start` head's address file and every local cluster's session
dir are there), so it never sees, joins or ends another engineer's cluster on this machine; the tests that kill
drivers also have a raysel cache of their own (the registry of the local clusters raysel started).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from tests.test_job_submit import free_ports, kill_tree

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent

# A driver as `raysel run` is one: init_ray(address) and then work (here: sleep). It prints one JSON line.
DRIVER = """
import json, sys, time
import ray
from raysel._internal.ray_stage import init_ray
started = init_ray(sys.argv[1] or None)
node = ray._private.worker._global_node
print(json.dumps({"started": started, "gcs": ray.get_runtime_context().gcs_address,
                  "session": node.get_session_dir_path()}), flush=True)
time.sleep(600)
"""


@pytest.fixture
def ray_home():
    """(environment, root): a Ray temp dir and raysel cache of this test's own, no RAY_ADDRESS; every process
    left under the root is ended afterwards, whatever the test did."""
    root = tempfile.mkdtemp(prefix="rsl", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        RAY_TMPDIR=root,
        RAYSEL_CACHE=str(Path(root) / "cache"),
        RAY_USAGE_STATS_ENABLED="0",
        RAY_agent_register_timeout_ms="180000",  # a busy machine can start Ray's agents slowly
    )
    try:
        yield env, Path(root)
    finally:
        left = processes_under(root)
        for proc in left:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(left, timeout=10)
        shutil.rmtree(root, ignore_errors=True)


def processes_under(path: str | Path) -> list[psutil.Process]:
    """Live processes whose command line names `path`, or Ray's renamed ones (`ray::...`) with a file open under it.
    (Ray's agents and workers rename themselves: their command line no longer names their session.)"""
    path = str(path)
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if proc.pid == os.getpid():
            continue
        cmdline = proc.info["cmdline"] or []
        try:
            if any(path in arg for arg in cmdline) or (
                cmdline and cmdline[0].startswith("ray::") and any(f.path.startswith(path) for f in proc.open_files())
            ):
                if proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
        except psutil.Error:
            continue
    return found


def names(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            out.append(p.cmdline()[0].rsplit("/", 1)[-1])
        except (psutil.Error, IndexError):
            pass
    return sorted(out)


def wait_until(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        time.sleep(0.5)
    return value


class Driver:
    """`DRIVER` in a subprocess; `info` is what it printed once init_ray returned."""

    def __init__(self, env: dict, root: Path, address: str = "") -> None:
        self.log = open(root / f"driver-{time.monotonic_ns()}.log", "w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", DRIVER, address], env=env, stdout=subprocess.PIPE, stderr=self.log, text=True
        )
        line = self.proc.stdout.readline()  # init_ray on a busy 2-core machine: tens of seconds
        if not line:
            self.proc.wait(30)
            self.log.seek(0)
            raise RuntimeError(f"the driver exited with {self.proc.returncode}:\n{self.log.read()[-3000:]}")
        self.info = json.loads(line)
        self.session = self.info["session"]

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def close(self) -> None:
        end(self.proc)
        self.log.close()


def end(proc: subprocess.Popen, timeout_s: float = 90) -> int:
    """SIGTERM `proc` and wait for it (SIGKILL if it does not exit); its return code. Not its children: what
    a process leaves behind is what these tests look at (the fixture ends it all afterwards)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
    return proc.returncode


# --- a local cluster raysel started ends with it -------------------------------------------------------------


def test_a_killed_drivers_cluster_is_ended_at_the_next_start_and_an_observed_exit_ends_all_of_it(ray_home):
    env, root = ray_home
    first = Driver(env, root)
    try:
        # Ray's agents come up after init returns; wait for them, so the kill below leaves what it leaves.
        wait_until(
            lambda: {"ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= set(names(processes_under(first.session))),
            120,
            "the local cluster's dashboard and runtime-env agents run",
        )
        first.proc.kill()  # SIGKILL: nothing of the driver runs, no atexit, no handler
        first.proc.wait(30)
        # Ray's reaper ends the GCS, raylet and dashboard a moment later; its agents stay, for good.
        wait_until(lambda: "gcs_server" not in names(processes_under(first.session)), 60, "the GCS is ended")
        time.sleep(5)
        left = processes_under(first.session)
        assert "ray::DashboardAgent" in names(left), f"Ray now ends its agents itself? left: {names(left)}"
    finally:
        first.close()

    second = Driver(env, root)  # the next start ends what the killed one left, and nothing else
    try:
        assert second.info["started"] is True
        assert processes_under(first.session) == [], names(processes_under(first.session))
        assert second.proc.poll() is None and "raylet" in names(processes_under(second.session))
        assert "left by the local Ray cluster of a killed raysel" in second.stderr()
        wait_until(
            lambda: "ray::DashboardAgent" in names(processes_under(second.session)), 120, "the second's agents run"
        )
        second.proc.send_signal(signal.SIGHUP)  # its terminal went away: an exit raysel observes
        assert second.proc.wait(60) == 128 + signal.SIGHUP
        wait_until(lambda: not processes_under(second.session), 30, "every process of the second cluster is ended")
        assert list((root / "cache" / "local-ray").glob("*.json")) == []  # nothing left to reap
    finally:
        second.close()


def test_sigterm_ends_all_of_the_local_cluster(ray_home):
    env, root = ray_home
    driver = Driver(env, root)
    try:
        assert driver.info["started"] is True
        wait_until(lambda: "ray::DashboardAgent" in names(processes_under(driver.session)), 120, "the agents run")
        driver.proc.send_signal(signal.SIGTERM)
        assert driver.proc.wait(60) == 128 + signal.SIGTERM
        wait_until(lambda: not processes_under(driver.session), 30, "every process of the cluster is ended")
    finally:
        driver.close()


# --- a cluster raysel did not start --------------------------------------------------------------------------


@pytest.fixture
def ray_start_head(ray_home):
    """`ray start --head` in this test's Ray temp dir, as a user starts one on their machine: it records its
    address there (`ray_current_cluster`), where `ray.init(address=None)` would find and join it."""
    env, root = ray_home
    # Token auth, as Ray 2.60 turns on by itself once ~/.ray/auth_token exists; explicit here, so that every
    # process of the test (the head, drivers joining it by address, raysel's own clusters) has the same token.
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    gcs, client, agent, agent_grpc, runtime_env, metrics, node_mgr, obj_mgr = free_ports(8)
    # fmt: off
    cmd = [
        str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2", "--include-dashboard", "false",
        "--port", str(gcs), "--ray-client-server-port", str(client),
        "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
        "--runtime-env-agent-port", str(runtime_env), "--metrics-export-port", str(metrics),
        "--node-manager-port", str(node_mgr), "--object-manager-port", str(obj_mgr), "--disable-usage-stats",
    ]
    # fmt: on
    log = open(root / "head.log", "w")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    recorded = root / "ray" / "ray_current_cluster"
    try:
        wait_until(lambda: recorded.exists() or head.poll() is not None, 180, "ray start records its address")
        assert head.poll() is None, (root / "head.log").read_text()
        address = recorded.read_text().strip()
        assert address.endswith(f":{gcs}")
        session = (root / "ray" / "session_latest").resolve()
        yield (
            env,
            root,
            address,
            lambda: head.poll() is None and {"gcs_server", "raylet"} <= set(names(processes_under(session))),
        )
    finally:
        kill_tree(head.pid, grace_s=20, marker=str(root))
        log.close()


def test_init_ray_joins_a_ray_start_cluster_only_when_told(ray_start_head):
    env, root, address, head_runs = ray_start_head
    mine = Driver(env, root)  # no address, no RAY_ADDRESS: a new local cluster, not the head's
    try:
        assert mine.info["started"] is True
        assert mine.info["gcs"] != address
        assert "not joining the one `ray start` recorded on this machine" in mine.stderr()
    finally:
        mine.close()
    joined = Driver(env, root, address="auto")  # told: `auto` is the `ray start` cluster of this machine
    try:
        assert joined.info["started"] is False
        assert joined.info["gcs"] == address
        end(joined.proc)
        time.sleep(3)
        assert head_runs()  # a driver that joined leaves the cluster as it found it
    finally:
        joined.close()


OTHER_APP = """
import sys
from ray import serve
import ray
ray.init(address=sys.argv[1], logging_level="ERROR")

@serve.deployment(ray_actor_options={"num_cpus": 0})
class Other:
    async def __call__(self, request):
        return "other"

serve.start(http_options={"host": "127.0.0.1", "port": int(sys.argv[2])})
serve.run(Other.bind(), name="other", route_prefix="/other")
"""


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()
    except OSError:
        return 0, b""


def start_raysel_serve(env: dict, root: Path, config: Path, port: int, *args: str) -> tuple[subprocess.Popen, Path]:
    """`raysel serve` on loopback and `port`, once it answers /healthz; (process, its log)."""
    log_path = root / f"serve-{port}.log"
    log = open(log_path, "w")
    cmd = [str(BIN / "raysel"), "serve", "--config", str(config), "--host", "127.0.0.1", "--port", str(port), *args]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    deadline = time.monotonic() + 240
    while get(f"http://127.0.0.1:{port}/healthz")[0] != 200:
        if proc.poll() is not None or time.monotonic() > deadline:
            end(proc)
            raise AssertionError(f"raysel serve was not healthy on {port}:\n{log_path.read_text()[-4000:]}")
        time.sleep(1)
    return proc, log_path


def test_raysel_serve_never_ends_what_it_did_not_start(ray_start_head):
    """A `ray start` cluster runs Serve with another app. `raysel serve` without an address runs on a cluster of
    its own (before: it joined the head, and at exit shut Serve down there, the other app with it); with
    `--address` it joins the head, and at exit deletes only its own app."""
    env, root, address, head_runs = ray_start_head
    head_port, own_port = free_ports(2)
    deployed = subprocess.run(
        [sys.executable, "-c", OTHER_APP, address, str(head_port)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert deployed.returncode == 0, deployed.stderr[-3000:]
    other = f"http://127.0.0.1:{head_port}/other"
    assert get(other) == (200, b"other")
    config = root / "serve.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "scorers": [],
                "embed": {"model": "minilm", "max_tokens": 32, "batch_size": 8},
                "replicas": {"min": 1, "max": 1, "resources": {"cpus": 0.5}},
            }
        )
    )
    sessions_before = set((root / "ray").glob("session_2*"))

    proc, log = start_raysel_serve(env, root, config, own_port)  # no --address, no RAY_ADDRESS
    try:
        assert "started a local Ray cluster for this service" in log.read_text()
        own_sessions = set((root / "ray").glob("session_2*")) - sessions_before
        assert len(own_sessions) == 1
        assert get(f"http://127.0.0.1:{own_port}/other")[0] == 404  # its own Serve, not the head's
        assert get(f"http://127.0.0.1:{head_port}/healthz")[0] == 404  # and nothing of it on the head
    finally:
        rc = end(proc)
    assert rc == 0, log.read_text()[-3000:]
    own = own_sessions.pop()
    wait_until(lambda: not processes_under(own), 30, f"its own cluster ends whole: {names(processes_under(own))}")
    assert get(other) == (200, b"other") and head_runs()

    proc, log = start_raysel_serve(env, root, config, head_port, "--address", address)
    try:
        assert f"joined the Ray cluster at {address}" in log.read_text()
        assert get(other) == (200, b"other")
    finally:
        rc = end(proc)
    assert rc == 0, log.read_text()[-3000:]
    assert get(f"http://127.0.0.1:{head_port}/healthz")[0] == 404  # its app is gone from the head ...
    assert get(other) == (200, b"other") and head_runs()  # ... and nothing else
