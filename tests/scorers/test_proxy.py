"""The proxy classifier (raysel/proxy.py): deterministic training, its file format, the shared batch helpers."""

import numpy as np
import pytest

from raysel.errors import ConfigError
from raysel.proxy import (
    ProxyRun,
    ProxySettings,
    batch_embeddings,
    label_indices,
    read_bytes,
    train_proxy,
    usable_rows,
    write_bytes,
)


def blobs(n=90, d=16, names=("a", "b", "c"), seed=0):
    """Unit vectors around one centre per label: separable, like topic embeddings."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(names), d))
    y = rng.integers(0, len(names), n)
    x = centres[y] + 0.6 * rng.normal(size=(n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), np.array([names[i] for i in y], dtype=object)


SETTINGS = ProxySettings(hidden=8, epochs=4, lr=0.2, batch_size=16)


def test_training_is_deterministic_for_a_seed_and_replicates_differ():
    x, labels = blobs()
    a = train_proxy(x, labels, SETTINGS, replicate=0)
    b = train_proxy(x, labels, SETTINGS, replicate=0)
    c = train_proxy(x, labels, SETTINGS, replicate=1)
    assert len(a.checkpoints) == SETTINGS.epochs and list(a.lrs) == [SETTINGS.lr] * SETTINGS.epochs
    for ka, kb, kc in zip(a.checkpoints, b.checkpoints, c.checkpoints, strict=True):
        for n in ka:
            np.testing.assert_array_equal(ka[n], kb[n])
            assert not np.array_equal(ka[n], kc[n])
    assert a.holdout_accuracy == b.holdout_accuracy


def test_proxy_learns_separable_labels_and_sorts_them():
    x, labels = blobs(n=300)
    run = train_proxy(x, labels, ProxySettings(hidden=16, epochs=10), replicate=0)
    assert run.labels == ["a", "b", "c"]
    assert run.holdout_accuracy >= 0.9
    assert run.train_rows == 270  # 10 % held out


def test_unlabelled_rows_are_left_out_and_one_label_is_an_error():
    x, labels = blobs(n=60)
    labels = labels.copy()
    labels[:5] = ""
    labels[5] = None
    run = train_proxy(x, labels, SETTINGS)
    assert run.train_rows + round(0.1 * 54) == 54
    with pytest.raises(ConfigError, match="two distinct labels"):
        train_proxy(x, np.array(["a"] * 60, dtype=object), SETTINGS)


def test_linear_proxy_has_only_an_output_layer():
    x, labels = blobs()
    run = train_proxy(x, labels, ProxySettings(hidden=0, epochs=2))
    assert sorted(run.checkpoints[0]) == ["b2", "w2"]
    assert run.checkpoints[0]["w2"].shape == (3, 16)


def test_run_round_trips_through_bytes_and_files(tmp_path):
    x, labels = blobs()
    run = train_proxy(x, labels, SETTINGS)
    uri = str(tmp_path / "proxy" / "replicate-0.npz")
    write_bytes(uri, run.to_bytes())
    back = ProxyRun.from_bytes(read_bytes(uri))
    assert back.labels == run.labels and back.seed == run.seed and back.holdout_accuracy == run.holdout_accuracy
    np.testing.assert_array_equal(back.lrs, run.lrs)
    for ka, kb in zip(run.checkpoints, back.checkpoints, strict=True):
        assert sorted(ka) == sorted(kb)
        for n in ka:
            np.testing.assert_array_equal(ka[n], kb[n])
    assert [p.name for p in (tmp_path / "proxy").iterdir()] == ["replicate-0.npz"]  # no temporary file left


def test_settings_key_changes_with_any_setting():
    assert ProxySettings().key() == ProxySettings().key()
    assert ProxySettings().key() != ProxySettings(hidden=65).key()
    assert ProxySettings().key() != ProxySettings(seed=1).key()


def test_batch_helpers():
    emb = np.empty(3, dtype=object)
    for i in range(3):
        emb[i] = np.full(4, i, dtype=np.float32)
    batch = {
        "embedding": emb,
        "label": np.array(["b", None, "zzz"], dtype=object),
        "reason": np.array(["", "", "bad"], dtype=object),
    }
    rows = usable_rows(batch)
    assert rows.tolist() == [0, 1]
    assert batch_embeddings(batch, rows).tolist() == [[0.0] * 4, [1.0] * 4]
    assert label_indices(batch, np.arange(3), ["a", "b"]).tolist() == [1, -1, -1]
    assert usable_rows({"embedding": np.zeros((2, 4))}).tolist() == [0, 1]  # no reason column: all usable
    with pytest.raises(ConfigError, match="label_field"):
        label_indices({"embedding": emb}, rows, ["a"])
