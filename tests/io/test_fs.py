import os

from raysel.io import fs as rfs


def test_settings_digest_follows_the_content_of_named_files(tmp_path):
    target = tmp_path / "target.jsonl"
    target.write_text('{"text": "a"}\n')
    settings = {"params": {"target": str(target), "dim": 8}, "name": "influence"}
    first = rfs.settings_digest(settings)
    assert rfs.settings_digest(settings) == first
    target.write_text('{"text": "b"}\n')  # same name, same size, new content
    assert rfs.settings_digest(settings) != first
    assert rfs.settings_digest({**settings, "name": "el2n"}) != rfs.settings_digest(settings)
    assert rfs.settings_digest({"model": "minilm"}) == rfs.settings_digest({"model": "minilm"})


def test_fingerprint_sees_the_head_and_tail_of_large_files(tmp_path):
    big = tmp_path / "big.bin"
    data = bytearray(3 * rfs.FINGERPRINT_BYTES)
    big.write_bytes(bytes(data))
    before = rfs.fingerprint(str(big))
    data[-1] = 1
    big.write_bytes(bytes(data))
    assert rfs.fingerprint(str(big)) != before


def _edit_in_the_middle_keeping_size_and_mtime(path):
    """One byte changed in the middle of a file; size and modification time restored as they were."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def test_fingerprint_sees_an_edit_in_the_middle_of_a_file_under_the_full_hash_limit(tmp_path):
    big = tmp_path / "big.jsonl"
    big.write_bytes(b"".join(b'{"text": "row %07d"}\n' % i for i in range(200_000)))  # ~4 MiB
    assert big.stat().st_size > 3 * rfs.FINGERPRINT_BYTES
    before = rfs.fingerprint(str(big))
    _edit_in_the_middle_keeping_size_and_mtime(big)
    assert rfs.fingerprint(str(big)) != before
    assert rfs.fingerprint_method(str(big), big.stat().st_size, big.stat().st_mtime_ns) == "sha256"


def test_fingerprint_above_the_full_hash_limit_follows_mtime_size_and_samples(tmp_path, monkeypatch):
    monkeypatch.setattr(rfs, "FULL_HASH_BYTES", 2 * rfs.FINGERPRINT_BYTES)
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(3 * rfs.FINGERPRINT_BYTES))
    st = big.stat()
    assert rfs.fingerprint_method(str(big), st.st_size, st.st_mtime_ns) == "mtime+size+sampled"
    before = rfs.fingerprint(str(big))
    assert rfs.fingerprint(str(big)) == before
    os.utime(big, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a rewrite moves the modification time
    assert rfs.fingerprint(str(big)) != before


def test_fingerprint_method_of_objects_in_a_store():
    assert rfs.fingerprint_method("s3://b/a.jsonl", 10, 1_700_000_000_000_000_000) == "mtime+size+sampled"
    assert rfs.fingerprint_method("s3://b/a.jsonl", 10, 0) == "size+sampled"
