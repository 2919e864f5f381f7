"""The four proxy-based scorers (and el2n_lm) selected in a config and run by `raysel.pipeline.run` on Ray."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from raysel.config import parse_config
from raysel.errors import ConfigError
from raysel.pipeline import run
from tests.conftest import BAD_LINES, bbc_sample, write_jsonl

PROXY = {"hidden": 16, "epochs": 4}
# Default reservations on purpose: four pools scaled to fill the 2-CPU cluster. The scored-shard pass must
# still read its shards (it once waited forever here on a read task that wanted a whole CPU).


def _config(root, corpus, target, label_field="topic", work="work", lm=True):
    scorers = [
        {"name": "el2n", "params": {"replicates": 2, "proxy": PROXY}},
        {"name": "vog", "params": {"proxy": PROXY}},
        {
            "name": "influence",
            "params": {"target": str(target), "dim": 512, "proxy": PROXY},
            "batch_size": 8,
        },
        {"name": "classifier_entropy", "params": {"proxy": PROXY}},
    ]
    if lm:
        scorers.append({"name": "el2n_lm", "max_tokens": 16, "batch_size": 8})
    return parse_config(
        {
            "input": {"path": str(corpus), "id_field": "id", "label_field": label_field},
            "output": {"path": str(root / "out"), "overwrite": True},
            "embed": {"batch_size": 16, "max_tokens": 32},
            "scorers": scorers,
            "cluster": {"k": 3, "seed": 0},
            "select": {"budget": 0.5, "policy": "topk", "score": "el2n", "seed": 0},
            "work_dir": str(root / work),
        }
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("proxy-scorers")
    rows = bbc_sample(50, seed=3)
    path = write_jsonl(root / "corpus.jsonl", rows[:40], BAD_LINES[:2])
    target = root / "target.jsonl"
    target.write_text("\n".join(json.dumps({"text": r["text"], "topic": r["topic"]}) for r in rows[40:]) + "\n")
    return root, path, target


def test_pipeline_writes_every_scorer_into_the_ledger(corpus, ray_cluster):
    root, path, target = corpus
    result = run(_config(root, path, target))
    ledger = pq.read_table(root / "out" / "ledger").to_pandas()
    assert len(ledger) == 42  # 40 articles and 2 broken lines, every one accounted for
    usable = ledger[ledger.status != "quarantined"]
    quarantined = ledger[ledger.status == "quarantined"]
    assert len(usable) == 40 and len(quarantined) == 2
    for column in ("el2n", "vog", "vog_raw", "influence", "classifier_entropy", "el2n_lm"):
        assert column in ledger.columns, column
        assert usable[column].notna().all(), column
        assert quarantined[column].isna().all(), column
        assert usable[column].std() > 0, column  # a real score, not a constant
    assert ((usable.el2n >= 0) & (usable.el2n <= np.sqrt(2))).all()
    assert (usable.classifier_entropy <= np.log(usable.label.nunique()) + 1e-6).all()
    # topk by el2n keeps the 20 highest
    chosen = usable[usable.status == "selected"]
    assert len(chosen) == 20 and chosen.el2n.min() >= usable[usable.status == "rejected"].el2n.max()
    # the proxy was trained once per settings and kept in the work dir for reuse
    scores_key = result.manifest["reuse"]["scores"]["key"]
    proxies = list((root / "work" / scores_key).glob("proxy-*/replicate-*.npz"))
    assert len(proxies) == 2  # el2n's 2 replicates; vog, influence and entropy share replicate 0


def test_label_scorers_without_a_label_field_say_what_to_set(corpus, ray_cluster):
    root, path, target = corpus
    with pytest.raises(ConfigError, match="set input.label_field"):
        run(_config(root, path, target, label_field=None, work="work-nolabel", lm=False))
