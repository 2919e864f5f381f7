"""Block sizing in front of actor pools (raysel/_internal/ray_stage.py), on the shared local cluster."""

import os
import time

import numpy as np

from raysel._internal.ray_stage import fit_cpus, map_stages
from raysel.config import InputConfig, Resources, StageConfig
from raysel.io.read import list_input
from raysel.pipeline import read_corpus
from tests.conftest import bbc_sample, write_jsonl


def test_a_small_corpus_is_spread_over_every_actor_of_a_pool(tmp_path, ray_cluster):
    """300 short texts fit one 1 MiB block, and an actor call takes whole blocks: uncut, one actor scores all."""

    class WhoScored:  # defined here, so Ray ships it by value to the actors
        def __init__(self, config):
            pass

        def __call__(self, batch):
            time.sleep(0.5)  # calls long against dispatch and actor start-up, as model calls are
            out = dict(batch)
            out["pid"] = np.full(len(batch["id"]), os.getpid())
            return out

    texts = bbc_sample(300, seed=3, max_chars=300)
    path = write_jsonl(tmp_path / "corpus.jsonl", texts)
    input_cfg = InputConfig(path=str(path), id_field="id")
    stage = StageConfig(batch_size=8, actors=2, resources=Resources(cpus=0.5))
    ds = map_stages(read_corpus(list_input(input_cfg), input_cfg), [(WhoScored, stage, {"config": stage})])
    rows = ds.select_columns(["id", "pid"]).to_pandas()

    assert sorted(rows["id"]) == sorted(r["id"] for r in texts)
    per_actor = rows.groupby("pid").size()
    assert len(per_actor) == 2 and per_actor.min() >= 300 // 4, per_actor.to_dict()


def test_cpus_are_fitted_to_the_pools_at_their_minimum_size():
    """The actors that must start before the stream flows; an elastic pool grows inside Ray Data's budget."""
    fixed = StageConfig(actors=2, resources=Resources(cpus=1))
    elastic = StageConfig(actors={"min": 1, "max": 64}, resources=Resources(cpus=1))
    assert fit_cpus([fixed, elastic], total_cpus=8) == [1.0, 1.0]  # 3 CPUs wanted at the start, not 66
    assert fit_cpus([fixed, elastic], total_cpus=2) == [0.417, 0.417]  # 3 actors in 2 - IO_HEADROOM CPUs


def test_an_elastic_pool_grows_while_its_calls_queue_up(tmp_path, ray_cluster):
    """`actors: {min: 1, max: 3}`: one actor to start with; calls queued behind it add actors while CPUs are free."""

    class WhoScored:
        def __init__(self, config):
            pass

        def __call__(self, batch):
            time.sleep(0.3)
            out = dict(batch)
            out["pid"] = np.full(len(batch["id"]), os.getpid())
            return out

    texts = bbc_sample(240, seed=4, max_chars=200)
    path = write_jsonl(tmp_path / "corpus.jsonl", texts)
    input_cfg = InputConfig(path=str(path), id_field="id")
    stage = StageConfig(batch_size=2, actors={"min": 1, "max": 3}, resources=Resources(cpus=0.25))
    ds = map_stages(read_corpus(list_input(input_cfg), input_cfg), [(WhoScored, stage, {"config": stage})])
    rows = ds.select_columns(["id", "pid"]).to_pandas()

    assert sorted(rows["id"]) == sorted(r["id"] for r in texts)
    assert 2 <= rows["pid"].nunique() <= 3, rows.groupby("pid").size().to_dict()
