"""How the input's listing reaches the pipeline: the reuse key (score_key) and the manifest (_manifest)."""

import os
from collections import Counter

import numpy as np

import raysel.pipeline as pipeline
from raysel.config import parse_config
from raysel.io.read import list_input


def _config(path) -> object:
    return parse_config(
        {"input": {"path": str(path)}, "output": {"path": "/unused"}, "select": {"budget": 1, "policy": "random"}}
    )


def test_the_reuse_key_changes_when_a_file_changes_in_the_middle_at_the_same_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "model_fingerprint", lambda name, kind: f"{name}-{kind}")  # no model loads
    path = tmp_path / "c.jsonl"
    path.write_bytes(b"".join(b'{"text": "row %07d"}\n' % i for i in range(150_000)))  # ~3 MiB
    config = _config(path)
    before = pipeline.score_key(config, list_input(config.input))
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2 - 3] ^= 1  # a digit of a row in the middle
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert pipeline.score_key(config, list_input(config.input)) != before


def test_the_manifest_says_how_files_were_fingerprinted_and_which_were_skipped(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    for i in range(105):
        (tmp_path / f"note{i:03d}.txt").write_text("not a corpus file")
    config = _config(tmp_path)
    files = list_input(config.input)
    summary = {  # what summarize_ledger gives for a ledger of one selected row
        "rows": 1,
        "status": Counter({"selected": 1}),
        "reasons": Counter(),
        "flags": Counter(),
        "sizes": np.array([1]),
        "unscored": Counter(),
    }
    manifest = pipeline._manifest(config, files, summary, {}, {}, 1, np.zeros((1, 4)), {})
    assert manifest["input"]["fingerprint"] == {"sha256": 1}
    skipped = manifest["input"]["skipped_files"]
    assert skipped["count"] == 105 and len(skipped["names"]) == 100 and skipped["names"][0] == "note000.txt"


def test_the_reuse_key_changes_when_a_scorers_target_file_is_rewritten_under_its_name(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "c.jsonl").write_text('{"text": "x"}\n')
    target = tmp_path / "target.jsonl"
    target.write_text('{"text": "business news"}\n')
    config = parse_config(
        {
            "input": {"path": str(tmp_path / "corpus")},
            "output": {"path": "/unused"},
            "scorers": [{"name": "lm_influence", "params": {"target": str(target)}}],
            "select": {"budget": 1, "policy": "random"},
        }
    )
    files = list_input(config.input)
    before = pipeline.score_key(config, files)
    assert pipeline.score_key(config, files) == before
    target.write_text('{"text": "sports news"}\n')  # same name, other texts: pass 1's scores are stale
    assert pipeline.score_key(config, files) != before
