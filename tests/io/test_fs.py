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
