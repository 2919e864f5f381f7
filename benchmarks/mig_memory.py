"""The driver's memory per row of the in-memory `mig` policy (pass 3 on the driver), to size RAYSEL_MAX_MIG_ROWS.

Each size runs in a fresh driver process with its own local Ray cluster. Pass 1 is skipped: the script writes the
scored shards a run would (ids, provenance, a `loss` score, 32-dim embeddings; pass 1's key, so the run reuses
them), then runs the whole pipeline with `select.policy: mig` and samples the driver's RSS every 10 ms. The peak
over the baseline (Ray and the libraries loaded) at two sizes gives the bytes per row (the slope) and the fixed
part. The embeddings MIG streams for the label geometry are held up to 64M floats (probe._KEEP_FLOATS, 256 MB),
whatever the dimension: past that, a fixed cost, not a per-row one.

    python benchmarks/mig_memory.py [--sizes 100000 300000] [--k 64]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import json, os, sys, threading, time
sys.path.insert(0, {repo!r})
import numpy as np, psutil, pyarrow as pa, pyarrow.parquet as pq, ray
from raysel.config import parse_config
from raysel.io.read import list_input
from raysel import pipeline
ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
root, n, files_n = {root!r}, {rows}, 10
corpus = os.path.join(root, "corpus")
os.makedirs(corpus, exist_ok=True)
for f in range(files_n):
    with open(os.path.join(corpus, f"part-{{f}}.jsonl"), "w") as out:
        out.writelines(f'{{{{"id": "part-{{f}}.jsonl-{{i}}", "text": "t{{i}}"}}}}\\n' for i in range(n // files_n))
config = parse_config({{
    "input": {{"path": corpus, "id_field": "id"}},
    "output": {{"path": os.path.join(root, "out"), "shard_rows": 50_000}},
    "scorers": [{{"name": "loss"}}],
    "cluster": {{"k": {k}, "sample": 20_000}},
    "select": {{"budget": 0.1, "policy": "mig", "score": "loss"}},
    "work_dir": os.path.join(root, "work"),
}})
files = list_input(config.input)
key = pipeline.score_key(config, files)
scores = os.path.join(config.resolved_work_dir(), key, "scores")
os.makedirs(scores, exist_ok=True)
rng = np.random.default_rng(0)
per = n // files_n
for f in range(files_n):
    rel, idx = files[f].rel, np.arange(per)
    pq.write_table(pa.table({{
        "id": [f"{{rel}}-{{i}}" for i in idx], "source": [rel] * per, "row": idx, "reason": [""] * per,
        "text_cut": np.zeros(per, bool), "embed_cut": np.zeros(per, bool), "lm_cut": np.zeros(per, bool),
        "loss": rng.random(per), "embedding": list(rng.normal(size=(per, 32)).astype(np.float32)),
    }}), os.path.join(scores, f"part-{{f}}.parquet"))
open(os.path.join(config.resolved_work_dir(), key, "_SUCCESS"), "w").close()
proc = psutil.Process()
peak = [0]
def sample():
    while True:
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.01)
import faiss, torch, transformers  # noqa: F401  the manifest's version lookups: fixed costs, before the baseline
ray.data.range(10).materialize()
threading.Thread(target=sample, daemon=True).start()
time.sleep(0.2)
base = proc.memory_info().rss
start = time.perf_counter()
result = pipeline.run(config)
print(json.dumps({{"rows": n, "peak_over_base_mib": (peak[0] - base) / 2**20, "seconds": time.perf_counter() - start,
                  "select_s": result.manifest["seconds"]["select"], "selected": result.counts["selected"]}}))
"""


def measure(rows: int, k: int) -> dict:
    with tempfile.TemporaryDirectory() as root:
        script = SCRIPT.format(repo=str(REPO), root=root, rows=rows, k=k)
        env = {**os.environ, "RAYSEL_MAX_DRIVER_ROWS": str(10**9), "RAYSEL_MAX_MIG_ROWS": str(10**9)}
        env.pop("RAY_ADDRESS", None)
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[100_000, 300_000])
    parser.add_argument("--k", type=int, default=64)
    args = parser.parse_args()
    small, large = (measure(n, args.k) for n in args.sizes)
    for m in (small, large):
        print(json.dumps(m))
    per_row = (large["peak_over_base_mib"] - small["peak_over_base_mib"]) * 2**20 / (large["rows"] - small["rows"])
    fixed = small["peak_over_base_mib"] - per_row * small["rows"] / 2**20
    print(json.dumps({"bytes_per_row": round(per_row), "fixed_mib": round(fixed, 1)}))


if __name__ == "__main__":
    main()
