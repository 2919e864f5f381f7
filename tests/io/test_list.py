"""Which files an input.path names: globs, suffixes, skipped and ignored files (raysel/io/fs.py, list_input)."""

import logging
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysel.config import InputConfig
from raysel.errors import InputError
from raysel.io.read import list_input


def _tree(root, names):
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text('{"text": "x"}\n')


def _rels(path) -> list[str]:
    return [f.rel for f in list_input(InputConfig(path=str(path)))]


def test_a_star_stays_within_one_folder_level(tmp_path):
    _tree(tmp_path, ["d/a.jsonl", "d/b.jsonl", "d/sub/x.jsonl", "d/sub/deeper/y.jsonl"])
    assert _rels(tmp_path / "d" / "*.jsonl") == ["a.jsonl", "b.jsonl"]
    assert _rels(tmp_path / "d" / "*" / "*.jsonl") == ["sub/x.jsonl"]
    assert _rels(tmp_path / "*" / "sub" / "*.jsonl") == ["d/sub/x.jsonl"]


def test_double_star_matches_any_depth_including_none(tmp_path):
    _tree(tmp_path, ["d/a.jsonl", "d/sub/x.jsonl", "d/sub/deeper/y.jsonl", "d/sub/deeper/y.parquet.txt"])
    assert _rels(tmp_path / "d" / "**" / "*.jsonl") == ["a.jsonl", "sub/deeper/y.jsonl", "sub/x.jsonl"]
    assert _rels(tmp_path / "d" / "**" / "deeper" / "*.jsonl") == ["sub/deeper/y.jsonl"]


def test_question_mark_and_brackets_match_one_character_of_one_level(tmp_path):
    _tree(tmp_path, ["d/a1.jsonl", "d/a2.jsonl", "d/ab.jsonl", "d/a/1.jsonl"])
    assert _rels(tmp_path / "d" / "a?.jsonl") == ["a1.jsonl", "a2.jsonl", "ab.jsonl"]
    assert _rels(tmp_path / "d" / "a[0-9].jsonl") == ["a1.jsonl", "a2.jsonl"]
    assert _rels(tmp_path / "d" / "a[!0-9].jsonl") == ["ab.jsonl"]


def test_a_glob_in_a_missing_folder_names_the_folder(tmp_path):
    with pytest.raises(InputError, match=r"folder .*nope.* does not exist"):
        list_input(InputConfig(path=str(tmp_path / "nope" / "*.jsonl")))


def test_a_missing_relative_path_says_what_it_is_relative_to(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError) as err:
        list_input(InputConfig(path="c50.jsonl"))
    assert str(err.value) == f"input.path 'c50.jsonl' does not exist (relative to {os.getcwd()})"
    with pytest.raises(InputError) as err:
        list_input(InputConfig(path=str(tmp_path / "c50.jsonl")))
    assert "relative to" not in str(err.value)


def test_upper_case_suffixes_are_read(tmp_path):
    (tmp_path / "A.JSONL").write_text('{"text": "x"}\n')
    pq.write_table(pa.table({"text": ["y"]}), tmp_path / "b.Parquet")
    files = list_input(InputConfig(path=str(tmp_path)))
    assert [(f.rel, f.format) for f in files] == [("A.JSONL", "jsonl"), ("b.Parquet", "parquet")]


def test_other_files_are_skipped_listed_and_logged(tmp_path, caplog):
    _tree(tmp_path, ["a.jsonl", "notes.txt", "table.csv", "sub/pack.tar", "sub/b.txt.gz"])
    with caplog.at_level(logging.WARNING, logger="raysel.io.read"):
        files = list_input(InputConfig(path=str(tmp_path)))
    assert [f.rel for f in files] == ["a.jsonl"]
    assert files.skipped == ("notes.txt", "sub/b.txt.gz", "sub/pack.tar", "table.csv")
    (message,) = [r.getMessage() for r in caplog.records]
    assert "skipped 4 files" in message and "notes.txt" in message
    # a file of a format other than the configured one is skipped too
    pq.write_table(pa.table({"text": ["y"]}), tmp_path / "c.parquet")
    jsonl_only = list_input(InputConfig(path=str(tmp_path), format="jsonl"))
    assert [f.rel for f in jsonl_only] == ["a.jsonl"] and "c.parquet" in jsonl_only.skipped


def test_hidden_and_underscore_files_and_folders_stay_ignored_silently(tmp_path, caplog):
    _tree(tmp_path, ["a.jsonl", "_SUCCESS", ".hidden.jsonl", "_staging-1/ledger/part-0.jsonl", ".git/x.jsonl"])
    with caplog.at_level(logging.WARNING, logger="raysel.io.read"):
        files = list_input(InputConfig(path=str(tmp_path)))
    assert [f.rel for f in files] == ["a.jsonl"] and files.skipped == ()
    assert not caplog.records


def test_a_single_file_that_is_no_input_format_is_refused_with_the_accepted_suffixes(tmp_path):
    (tmp_path / "notes.txt.gz").write_bytes(b"")
    with pytest.raises(InputError, match=r"notes\.txt\.gz.*accepted.*\.jsonl.*\.gz.*\.parquet"):
        list_input(InputConfig(path=str(tmp_path / "notes.txt.gz")))
    with pytest.raises(InputError, match="holds no"):
        list_input(InputConfig(path=str(tmp_path)))
