"""Plain mistakes get one `error:` line that names the field or file and the fix, exit code 2, never a
traceback; internal failures name the pass, the run and how to continue, exit code 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from raysel.config import parse_config
from raysel.errors import ConfigError
from tests.conftest import BAD_LINES, bbc_sample, write_jsonl


def _raw(**parts) -> dict:
    raw = {"input": {"path": "corpus.jsonl"}, "output": {"path": "out"}, "select": {"budget": 0.5}}
    for key, value in parts.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw


def raysel(*args, cwd=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "raysel.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        timeout=timeout,
    )


@pytest.mark.parametrize("value", [True, False, "yes", "on"])
def test_a_bool_budget_is_refused_not_read_as_every_row(value):
    import yaml

    budget = yaml.safe_load(value) if isinstance(value, str) else value
    with pytest.raises(ConfigError, match="select.budget: must be a fraction in \\(0, 1\\] or a row count"):
        parse_config(_raw(select={"budget": budget}))


@pytest.mark.parametrize(
    "input_path, output_path",
    [
        ("data", "data/out"),
        ("data/", "data/runs/out"),
        ("data/*.jsonl", "data/out"),
        ("data/**/*.jsonl", "data/sub/out"),
        ("s3://bucket/corpus", "s3://bucket/corpus/out"),
    ],
)
def test_an_output_inside_the_input_folder_is_refused(input_path, output_path):
    with pytest.raises(ConfigError, match="output.path: .* is inside the input folder .* put it outside the input"):
        parse_config(_raw(input={"path": input_path}, output={"path": output_path}))


def test_a_work_dir_inside_the_input_folder_is_refused():
    with pytest.raises(ConfigError, match="work_dir: .* is inside the input folder"):
        parse_config(_raw(input={"path": "data"}, work_dir="data/.work"))


@pytest.mark.parametrize(
    "input_path, output_path",
    [("data/corpus.jsonl", "data/out"), ("data", "data-out"), ("s3://bucket/corpus", "s3://bucket/corpus-out")],
)
def test_an_output_beside_the_input_is_accepted(input_path, output_path):
    parse_config(_raw(input={"path": input_path}, output={"path": output_path}))


@pytest.mark.parametrize(
    "override, message",
    [
        ("scorers.7.batch_size=8", "index 7 is out of range (the list has 2 items: 0..1)"),
        ("scorers.x.batch_size=8", "'x' is not a list index"),
        ("scorers.5=loss", "index 5 is out of range"),
        ("select.budget=[0.1", "the value is not valid YAML"),
    ],
)
def test_a_bad_set_override_is_one_error_line(tmp_path, override, message):
    config = tmp_path / "run.yaml"
    config.write_text(yaml_config(tmp_path))
    proc = raysel("validate", config, "--set", override)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: --set") and message in proc.stderr and "Traceback" not in proc.stderr


def yaml_config(root: Path, output: str | None = None, corpus: str = "corpus.jsonl") -> str:
    return (
        f"input: {{path: {root / corpus}, id_field: id}}\n"
        f"output: {{path: {output or root / 'out'}}}\n"
        "embed: {batch_size: 8, max_tokens: 16}\n"
        "scorers: [entropy, loss]\n"
        "cluster: {k: 2}\n"
        "select: {budget: 0.5, policy: random}\n"
        f"work_dir: {root / 'work'}\n"
    )


def test_an_output_path_that_is_a_file_is_refused_before_any_work(tmp_path):
    write_jsonl(tmp_path / "corpus.jsonl", bbc_sample(4))
    (tmp_path / "out.txt").write_text("not a folder")
    config = tmp_path / "run.yaml"
    config.write_text(yaml_config(tmp_path, output=str(tmp_path / "out.txt")))
    proc = raysel("run", config)
    assert proc.returncode == 2 and "is a file, not a folder" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "work").exists()  # refused before pass 1


def test_run_help_says_how_relative_paths_resolve_and_who_owns_the_output():
    proc = raysel("run", "--help")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    assert "Relative paths (input.path, output.path, work_dir) are resolved from the current directory" in text
    assert "--overwrite keeps the old result until the new one commits" in text


def test_an_input_with_no_usable_row_commits_its_ledger_and_says_why(tmp_path, ray_cluster):
    with open(tmp_path / "corpus.jsonl", "wb") as f:
        f.writelines(BAD_LINES)
    config = tmp_path / "run.yaml"
    config.write_text(yaml_config(tmp_path))
    proc = raysel("run", config)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "error: no usable row in the 6 rows read" in proc.stderr and "Traceback" not in proc.stderr
    ledger_dir = tmp_path / "out" / "ledger"
    assert f"ledger, committed at {ledger_dir}" in " ".join(proc.stderr.split())
    ledger = pq.read_table(ledger_dir).to_pylist()
    assert len(ledger) == len(BAD_LINES) and {r["status"] for r in ledger} == {"quarantined"}
    assert all(r["reason"] for r in ledger)
    assert (tmp_path / "out" / "_SUCCESS").exists() and not (tmp_path / "out" / "_lock.json").exists()
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"] == {"selected": 0, "rejected": 0, "quarantined": len(BAD_LINES)}


def test_an_internal_failure_names_the_pass_the_run_and_how_to_continue(tmp_path, ray_cluster):
    write_jsonl(tmp_path / "corpus.jsonl", bbc_sample(12, seed=4))
    config = tmp_path / "run.yaml"
    config.write_text(yaml_config(tmp_path))
    first = raysel("run", config)
    assert first.returncode == 0, first.stderr[-3000:]
    # The cached centroids are damaged (a full disk, a bad copy): the cluster pass cannot read them.
    for centroids in (tmp_path / "work").rglob("centroids-*.npy"):
        centroids.write_bytes(b"\x93NUMPY damaged")
    proc = raysel("run", config, "--set", "select.budget=0.25", "--overwrite")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.startswith("error: the cluster pass failed: ") and "Traceback" not in proc.stderr
    assert "the committed result there is untouched; rerun with --overwrite" in proc.stderr
    assert "RAYSEL_DEBUG=1" in proc.stderr
    lock = tmp_path / "out" / "_lock.json"
    assert (tmp_path / "out" / "_SUCCESS").exists() and not lock.exists()  # old result kept, folder given up
