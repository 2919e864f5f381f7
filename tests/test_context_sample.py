"""`sample_rows` (pass 2's k-means sample, `RunContext.sample`): the smallest seeded id hashes of the usable rows,
found in Ray tasks, the same as hashing every row on the driver whatever the shards' layout."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysel.cluster import sample_keys
from raysel.context import sample_rows

ROWS = 3_000


def corpus(rng: np.random.Generator, quarantined: float) -> pa.Table:
    ids = np.array([f"doc-{i}" for i in range(ROWS)])
    reason = np.where(rng.random(ROWS) < quarantined, "empty_text", "")
    emb = rng.normal(size=(ROWS, 4)).astype(np.float32)
    return pa.table({"id": ids, "reason": reason, "embedding": list(emb), "n": np.arange(ROWS)})


def write(table: pa.Table, folder, shard_rows: int, order: np.ndarray) -> str:
    folder.mkdir()
    table = table.take(order)
    for j, start in enumerate(range(0, len(table), shard_rows)):
        pq.write_table(table.slice(start, shard_rows), folder / f"{j:05d}.parquet")
    return str(folder)


def reference(table: pa.Table, size: int, seed: int) -> np.ndarray:
    """Every row hashed on the driver, the smallest `size` usable keys: the ids in key order."""
    usable = table.filter(pa.compute.equal(table["reason"], ""))
    ids = usable["id"].to_numpy(zero_copy_only=False)
    keys = sample_keys(ids, seed)
    return ids[np.argsort(keys, kind="stable")[:size]]


@pytest.mark.parametrize(
    "size, quarantined",
    [
        (300, 0.0),  # the first bound passes enough rows
        (300, 0.7),  # most rows quarantined: the first pass keeps too few and the bound rises
        (5_000, 0.2),  # more than the usable rows: all of them
    ],
)
def test_the_sample_is_the_smallest_keys_whatever_the_layout(ray_cluster, tmp_path, size, quarantined):
    rng = np.random.default_rng(7)
    table = corpus(rng, quarantined)
    expected = reference(table, size, seed=3)
    assert len(expected) == min(size, int(np.sum(table["reason"].to_numpy(zero_copy_only=False) == "")))
    layouts = [(700, np.arange(ROWS)), (128, rng.permutation(ROWS))]  # other shard sizes, other row order
    for n, (shard_rows, order) in enumerate(layouts):
        got = sample_rows(write(table, tmp_path / f"layout-{n}", shard_rows, order), ["embedding", "n"], size, seed=3)
        np.testing.assert_array_equal(got["id"], expected)
        assert got["embedding"].shape == (len(expected), 4)  # a list column comes back as a 2-D array
        rows = got["n"]
        np.testing.assert_array_equal(
            got["embedding"], np.stack(table["embedding"].to_numpy(zero_copy_only=False))[rows]
        )
        assert (got["reason"] == "").all()


def test_another_seed_is_another_sample(ray_cluster, tmp_path):
    table = corpus(np.random.default_rng(1), 0.0)
    uri = write(table, tmp_path / "shards", 500, np.arange(ROWS))
    a, b = (sample_rows(uri, [], 200, seed=s)["id"] for s in (0, 1))
    assert len(a) == len(b) == 200 and set(a) != set(b)


def test_no_usable_row_is_an_empty_sample(ray_cluster, tmp_path):
    table = corpus(np.random.default_rng(2), 1.0)
    assert sample_rows(write(table, tmp_path / "shards", 500, np.arange(ROWS)), ["embedding"], 100, seed=0) == {}
