"""Scored-shard access by candidate: where each candidate's row lives (`ShardIndex`), its embedding column as a
matrix, and the cluster geometry (centroids, each row's cosine to its centroid) streamed from the embeddings.

`ShardIndex` maps candidate ids to (shard file, row in file) once, keeping the first occurrence of a
repeated id by (source, row), as the pipeline's duplicate quarantine does; reads then touch only the
row groups that hold the wanted rows. `cluster_geometry` streams the embeddings once to give the
policies the cluster centroids (mean member embedding, re-normalized) and each row's cosine to its
centroid.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from raysel.errors import InputError
from raysel.io import fs as rfs

# Below this many embedding floats the geometry keeps the embeddings in memory instead of reading them twice.
_KEEP_FLOATS = 1 << 26


def embedding_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """An embedding column (Ray's tensor extension type, or a plain list column) as a float32 [rows, dim] array."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if isinstance(arr, pa.ExtensionArray):
        arr = arr.storage
    if len(arr) == 0:
        return np.zeros((0, 0), dtype=np.float32)
    return np.asarray(arr.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(len(arr), -1)


@dataclass
class _Shard:
    path: str
    row_groups: np.ndarray  # first row of each row group, and the file's row count last


class ShardIndex:
    """Where each candidate's row lives in the scored shards.

    Attributes:
        shard: per candidate, the index of its shard file.
        file_row: per candidate, its row number inside that file.
        source, row: per candidate, its input file and row (to join texts back).

    Example:
        >>> index = ShardIndex.build(context.scores_uri, candidates.ids)     # doctest: +SKIP
        >>> index.read(np.array([0, 5]), columns=["id", "loss"])             # a table in that order
    """

    def __init__(self, fs: Any, shards: list[_Shard], shard: np.ndarray, file_row: np.ndarray, source, row) -> None:
        self.fs = fs
        self.shards = shards
        self.shard = shard
        self.file_row = file_row
        self.source = source
        self.row = row

    def __len__(self) -> int:
        return len(self.shard)

    @classmethod
    def build(cls, scores_uri: str, ids: np.ndarray) -> ShardIndex:
        """Index the usable rows of the shards under `scores_uri` whose id is in `ids` (one read of 4 small columns).

        Raises:
            InputError: when a candidate id is not in the shards (the shards and the candidates disagree).
        """
        import pandas as pd
        import pyarrow.parquet as pq

        fs, paths = list_shards(scores_uri)
        lookup = pd.Index(np.asarray(ids, dtype=object))
        shards, parts = [], []
        for number, path in enumerate(paths):
            pf = pq.ParquetFile(fs.open_input_file(path))
            sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
            shards.append(_Shard(path, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)))
            t = pf.read(columns=["id", "reason", "source", "row"])
            usable = np.flatnonzero(t.column("reason").to_numpy(zero_copy_only=False) == "")
            cand = lookup.get_indexer(t.column("id").to_numpy(zero_copy_only=False)[usable])
            hit = cand >= 0
            parts.append(
                pd.DataFrame(
                    {
                        "cand": cand[hit],
                        "shard": number,
                        "file_row": usable[hit],
                        "source": t.column("source").to_numpy(zero_copy_only=False)[usable[hit]],
                        "row": t.column("row").to_numpy()[usable[hit]],
                    }
                )
            )
        frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["cand"])
        frame = frame.sort_values(["cand", "source", "row"], kind="stable").drop_duplicates("cand", keep="first")
        if len(frame) != len(ids):
            missing = np.setdiff1d(np.arange(len(ids)), frame["cand"].to_numpy())
            raise InputError(
                f"{len(missing)} candidate ids (e.g. {ids[missing[0]]!r}) are not among the usable rows of the scored "
                f"shards at {scores_uri}; the shards changed under the run: rerun it"
            )
        return cls(
            fs,
            shards,
            frame["shard"].to_numpy(np.int64),
            frame["file_row"].to_numpy(np.int64),
            frame["source"].to_numpy(object),
            frame["row"].to_numpy(np.int64),
        )

    def read(self, idx: np.ndarray, columns: list[str] | None = None) -> pa.Table:
        """The shard rows of candidates `idx` (all columns by default), in the order of `idx`; reads only the
        row groups that hold them."""
        idx = np.asarray(idx, dtype=np.int64)
        return take_rows(
            self.fs,
            [self.shards[s].path for s in self.shard[idx]],
            self.file_row[idx],
            columns,
            starts={s.path: s.row_groups for s in self.shards},
        )

    def stream(self, columns: list[str]) -> Iterator[tuple[np.ndarray, pa.Table]]:
        """(candidate indices, their rows' `columns`) per shard file, every candidate once."""
        import pyarrow.parquet as pq

        order = np.lexsort((self.file_row, self.shard))
        bounds = np.searchsorted(self.shard[order], np.arange(len(self.shards) + 1))
        for s, shard in enumerate(self.shards):
            cand = order[bounds[s] : bounds[s + 1]]
            if len(cand) == 0:
                continue
            table = pq.ParquetFile(self.fs.open_input_file(shard.path)).read(columns=columns)
            yield cand, table.take(pa.array(self.file_row[cand]))


def take_rows(
    fs: Any,
    paths: list[str],
    file_rows: np.ndarray,
    columns: list[str] | None = None,
    starts: dict[str, np.ndarray] | None = None,
) -> pa.Table:
    """Row `file_rows[i]` of Parquet file `paths[i]`, for every i, in that order; reads only the row groups that
    hold them.

    Args:
        fs: the pyarrow filesystem of the files.
        paths: per wanted row, its file (as `fs` names it).
        file_rows: per wanted row, its row number inside that file.
        columns: the columns to read (all by default).
        starts: per file, the first row of each row group and the file's row count last (read from the footer
            when missing).
    """
    import pyarrow.parquet as pq

    file_rows = np.asarray(file_rows, dtype=np.int64)
    paths_arr = np.asarray(paths, dtype=object)
    tables, where = [], []
    for path in dict.fromkeys(paths_arr.tolist()):
        mine = np.flatnonzero(paths_arr == path)
        rows = file_rows[mine]
        pf = pq.ParquetFile(fs.open_input_file(path))
        first = starts.get(path) if starts else None
        if first is None:
            sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
            first = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        group_of = np.searchsorted(first, rows, side="right") - 1
        groups = np.unique(group_of)
        table = pf.read_row_groups(groups.tolist(), columns=columns)
        # rows inside the concatenation of the groups read
        offset = np.concatenate([[0], np.cumsum(first[groups + 1] - first[groups])])
        local = offset[np.searchsorted(groups, group_of)] + rows - first[group_of]
        tables.append(table.take(pa.array(local)))
        where.append(mine)
    if not tables:
        return pa.table({})
    table = pa.concat_tables(tables, promote_options="default")
    inverse = np.empty(len(file_rows), dtype=np.int64)
    inverse[np.concatenate(where)] = np.arange(len(file_rows))
    return table.take(pa.array(inverse))


def list_shards(scores_uri: str) -> tuple[Any, list[str]]:
    """(filesystem, the Parquet files under `scores_uri`, recursively, sorted)."""
    import pyarrow.fs as pafs

    fs, root = rfs.resolve(scores_uri)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return fs, sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))


def cluster_geometry(index: ShardIndex, arm_of: np.ndarray, n_arms: int) -> tuple[np.ndarray, np.ndarray]:
    """(centroids [K, dim], cosine of each candidate to its centroid).

    A centroid is the mean embedding of the cluster's candidates, re-normalized: for the spherical k-means
    clusters of pass 2 that is the centroid of the final assignment.

    Args:
        index: the candidates' shard index.
        arm_of: each candidate's arm (0..K-1).
        n_arms: K.
    """
    sums: np.ndarray | None = None
    kept: list[tuple[np.ndarray, np.ndarray]] = []
    floats = 0
    for cand, table in index.stream(["embedding"]):
        emb = embedding_matrix(table.column("embedding"))
        if sums is None:
            sums = np.zeros((n_arms, emb.shape[1]))
        np.add.at(sums, arm_of[cand], emb)
        floats += emb.size
        if floats <= _KEEP_FLOATS:
            kept.append((cand, emb))
    if sums is None:
        return np.zeros((n_arms, 0)), np.zeros(len(arm_of))
    centroids = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
    sim = np.zeros(len(arm_of))
    pairs = (
        kept
        if floats <= _KEEP_FLOATS
        else ((cand, embedding_matrix(t.column("embedding"))) for cand, t in index.stream(["embedding"]))
    )
    for cand, emb in pairs:
        norms = np.maximum(np.linalg.norm(emb, axis=1), 1e-12)
        sim[cand] = (emb * centroids[arm_of[cand]]).sum(1) / norms
    return centroids, sim
