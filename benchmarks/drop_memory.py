"""The driver's peak in a run with the drop steps (semdedup, drop_noisy) before `stratified`, against collecting the
same rows on the driver (what pass 3 did for semdedup before), in one fresh process: the script of
tests/select/test_stream.py::test_the_driver_does_not_hold_the_rows (synthetic scored shards, 8-dim embeddings,
k = 16), with the drop steps in the config and the distributed paths forced.

    python benchmarks/drop_memory.py [ROWS]       # default 400000; RESULTS.md §15
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.select.test_stream import MEMORY_SCRIPT, REPO  # noqa: E402

rows = int(sys.argv[1]) if len(sys.argv) > 1 else 400_000
with tempfile.TemporaryDirectory() as tmp:
    tmp_path = Path(tmp)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for f in range(10):
        with open(corpus / f"part-{f}.jsonl", "w") as out:
            out.writelines(f'{{"id": "part-{f}.jsonl-{i}", "text": "t{i}"}}\n' for i in range(rows // 10))
    config = {
        "input": {"path": str(corpus), "id_field": "id"},
        "output": {"path": str(tmp_path / "out"), "shard_rows": 50_000},
        "scorers": [{"name": "loss"}],
        "cluster": {"k": 16, "sample": 5_000},
        "select": {
            "budget": 0.1,
            "policy": "stratified",
            "score": "loss",
            "semdedup": {"threshold": 0.99},
            "drop_noisy": {"score": "loss", "fraction": 0.1},
        },
        "work_dir": str(tmp_path / "work"),
    }
    script = MEMORY_SCRIPT.format(repo=str(REPO), root=str(tmp_path), config=json.dumps(config), rows=rows)
    script = script.replace(
        "pipeline.run(config)\n",
        "result = pipeline.run(config)\nprint(json.dumps(result.manifest['selection'], default=str)[:400]); print(result.manifest['seconds'])\n",
        1,
    )
    env = {**os.environ, "RAYSEL_IN_MEMORY_ROWS": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    print(proc.stdout[-3000:])
    print(proc.stderr[-3000:] if proc.returncode else "")
