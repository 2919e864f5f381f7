"""Compressed JSONL (gzip, zstd, bz2): listed, streamed, and cut-off or damaged streams quarantined."""

import bz2
import json
import random
import string
import zlib

import numpy as np
import pyarrow as pa
import pytest

from raysel.config import InputConfig
from raysel.errors import InputError
from raysel.io.read import CorpusReader, check_input, list_input

CODECS = {"gz": "gzip", "zst": "zstd", "bz2": "bz2"}


def _body(n: int) -> bytes:
    """n JSONL rows of seeded random words: text that compresses about as well as prose (3-4x)."""
    rng = random.Random(0)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(5000)]
    return b"".join(
        json.dumps({"id": f"r{i}", "text": f"row {i} " + " ".join(rng.choices(words, k=12))}).encode() + b"\n"
        for i in range(n)
    )


def _compress(data: bytes, codec: str) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.CompressedOutputStream(sink, codec) as out:
        out.write(data)
    return sink.getvalue().to_pybytes()


def _read(files, cfg, **kw) -> dict:
    batch = {
        "uri": np.array([f.uri for f in files], dtype=object),
        "rel": np.array([f.rel for f in files], dtype=object),
    }
    batches = list(CorpusReader(cfg, **kw)(batch))
    if batches and isinstance(batches[0], pa.Table):
        return pa.concat_tables(batches).to_pylist()
    return {k: np.concatenate([b[k] for b in batches]).tolist() for k in batches[0]}


def test_compressed_jsonl_in_every_variant_is_listed_and_read(tmp_path):
    names = ["a.jsonl.gz", "b.json.zst", "c.ndjson.bz2", "d.JSONL.GZ", "e.jsonl.zst", "f.json.bz2", "g.ndjson.gz"]
    for name in names:
        (tmp_path / name).write_bytes(_compress(_body(3), CODECS[name.rsplit(".", 1)[1].lower()]))
    # a gzip file of several members (cat a.gz b.gz, bgzip) is read through
    (tmp_path / "h.jsonl.gz").write_bytes(_compress(_body(3)[:120], "gzip") + _compress(_body(3)[120:], "gzip"))
    names.append("h.jsonl.gz")
    files = list_input(InputConfig(path=str(tmp_path)))
    assert [f.rel for f in files] == names and files.skipped == ()
    assert [f.compression for f in files] == ["gzip", "zstd", "bz2", "gzip", "zstd", "bz2", "gzip", "gzip"]
    out = _read(files, InputConfig(path=str(tmp_path), id_field="id"))
    assert out["reason"] == [""] * 24
    assert out["source"] == [n for n in names for _ in range(3)] and out["row"] == [0, 1, 2] * 8
    assert out["id"][-3:] == ["r0", "r1", "r2"]
    assert out["id"][:3] == ["r0", "r1", "r2"] and out["text"][0].startswith("row 0 ")
    # a glob and a single file name them too
    # globs match case-sensitively, as the shell does (the suffix alone decides the format, in any case)
    assert [f.rel for f in list_input(InputConfig(path=str(tmp_path / "*.gz")))] == [
        "a.jsonl.gz",
        "g.ndjson.gz",
        "h.jsonl.gz",
    ]
    assert [f.rel for f in list_input(InputConfig(path=str(tmp_path / "b.json.zst")))] == ["b.json.zst"]


def test_selected_rows_are_joined_back_from_compressed_files(tmp_path):
    (tmp_path / "a.jsonl.zst").write_bytes(_compress(_body(10), "zstd"))
    files = list_input(InputConfig(path=str(tmp_path)))
    records = _read(files, InputConfig(path=str(tmp_path)), keep_rows={"a.jsonl.zst": [3, 8]})
    assert [(r["id"], r["__row"]) for r in records] == [("r3", 3), ("r8", 8)]


def _good_lines_before_the_cut(blob: bytes, codec: str) -> int:
    """Complete lines a decompressor gets out of a cut-off stream (stdlib; zstd has none: None)."""
    if codec == "gzip":
        return zlib.decompressobj(wbits=31).decompress(blob).count(b"\n")
    if codec == "bz2":
        return bz2.BZ2Decompressor().decompress(blob).count(b"\n")
    return None


def _compress_checked(data: bytes, codec: str) -> bytes:
    """As the usual tools write it: pyarrow writes zstd without the content checksum the zstd CLI adds,
    and without one most damage to a zstd stream cannot be noticed at all."""
    if codec != "zstd":
        return _compress(data, codec)
    import zstandard  # a test dependency: frames with the content checksum, as the zstd CLI writes them

    return zstandard.ZstdCompressor(write_checksum=True).compress(data)


def _write(tmp_path, codec: str, name: str, blob: bytes) -> str:
    path = tmp_path / f"{name}.jsonl.{[s for s, c in CODECS.items() if c == codec][0]}"
    path.write_bytes(blob)
    return str(path)


@pytest.mark.parametrize("codec", ["gzip", "zstd", "bz2"])
def test_a_cut_off_stream_keeps_every_row_before_the_cut_and_quarantines_the_rest(tmp_path, codec):
    n = 30_000  # ~3 MiB of text: the cut lies well past the first reads
    blob = _compress(_body(n), codec)
    path = _write(tmp_path, codec, "cut", blob[: len(blob) // 2])
    out = _read(list_input(InputConfig(path=path)), InputConfig(path=path, id_field="id"))
    kept = len(out["row"]) - 1
    assert out["row"][kept] == -1 and out["reason"][kept].startswith(f"compressed stream broken after line {kept}: ")
    # every row before the break is a good one, in order: none lost, no half-line passed on as a row
    assert out["row"][:kept] == list(range(kept)) and set(out["reason"][:kept]) == {""}
    assert out["id"][:kept] == [f"r{i}" for i in range(kept)]
    assert 0 < kept < n
    if (available := _good_lines_before_the_cut(blob[: len(blob) // 2], codec)) is not None:
        assert 0 <= available - kept < 1_000, (available, kept)  # at most one small read is lost at the cut


@pytest.mark.parametrize("codec", ["gzip", "zstd", "bz2"])
def test_a_damaged_stream_keeps_the_rows_before_the_damage_and_ends_in_a_break(tmp_path, codec):
    data = _body(30_000)
    blob = _compress_checked(data, codec)
    half = len(blob) // 2
    cut = _read(list_input(InputConfig(path=(p := _write(tmp_path, codec, "cut", blob[:half])))), InputConfig(path=p))
    intact = len(cut["row"]) - 1  # the rows wholly before the damage
    path = _write(tmp_path, codec, "damaged", blob[:half] + bytes(64) + blob[half + 64 :])
    out = _read(list_input(InputConfig(path=path)), InputConfig(path=path, id_field="id"))
    assert out["row"][-1] == -1 and out["reason"][-1].startswith("compressed stream broken after line ")
    assert int(out["reason"][-1].split("after line ")[1].split(":")[0]) >= out["row"][-2] + 1
    # kept: the rows before the damage, but for the last small read (a bz2 block is never half decoded,
    # so a cut or damaged bz2 file keeps the rows of its whole blocks before the break)
    lost = 1_000
    assert intact > lost
    assert out["row"][: intact - lost] == list(range(intact - lost))
    assert set(out["reason"][: intact - lost]) == {""}
    assert out["id"][: intact - lost] == [f"r{i}" for i in range(intact - lost)]


def test_a_compressed_file_cut_off_at_the_very_end_keeps_its_rows(tmp_path):
    path = tmp_path / "c.jsonl.gz"
    path.write_bytes(_compress(_body(5_000), "gzip")[:-4])  # only the gzip trailer is missing
    out = _read(list_input(InputConfig(path=str(path))), InputConfig(path=str(path)))
    assert out["row"][-1] == -1 and "compressed stream broken after line" in out["reason"][-1]
    kept = len(out["row"]) - 1
    assert out["row"][:-1] == list(range(kept)) and kept > 5_000 - 1_100  # all but the last small read


def test_check_input_peeks_into_compressed_files(tmp_path):
    path = tmp_path / "c.JSONL.GZ"
    path.write_bytes(_compress(b'{"body": "x"}\n', "gzip"))
    files = list_input(InputConfig(path=str(path)))
    check_input(files, InputConfig(path=str(path), text_field="body"))
    with pytest.raises(InputError, match=r"no input file has the text field 'text' \(columns seen: \['body'\]\)"):
        check_input(files, InputConfig(path=str(path)))
