"""Selection that pays off on labelled data (issue 14): the policies for labelled corpora against random.

    .venv/bin/python benchmarks/labelled.py                      # the whole table (RESULTS.md §18)
    .venv/bin/python benchmarks/labelled.py --tiny               # a minute: 2 seeds, 400 rows per corpus
    .venv/bin/python benchmarks/labelled.py --corpora bbc --noise 0.2 --seeds 3

Corpora: BBC news (5 topics), WordNet glosses (45 lexicographer files), Debian fortunes (43 files as labels),
each clean and with 20 % of its train labels flipped at random (seeded; the test split keeps its true labels).
WordNet and fortunes are seeded samples of `--max-rows` rows (default 3,000), as `raysel eval`'s
`corpus.max_rows` takes them. Split: a stratified 20 % hold-out per label (raysel.eval.prepare_splits).

What runs per corpus, with raysel's own parts, in this process (a `raysel eval` run per policy, budget and
seed costs 15-30 s of Ray start-up and passes on this machine, ~600 runs; the selection below is the same code
on the same columns):
- embeddings: raysel's Embedder (packaged all-MiniLM-L6-v2, 128 tokens), cached;
- scores: the proxy classifier (raysel/proxy.py, defaults) trained on the train split's embeddings and its
  (possibly noisy) labels; `el2n` (5 replicates, epoch 2), `aum` (replicate 0, all 10 epochs) and
  `classifier_entropy` (replicate 0, last epoch) from raysel's scorer classes;
- clusters: raysel's k-means (k = 16 BBC, 32 otherwise), seeded by the seed, as `raysel eval` does;
- selection: each policy's `plan` over the candidate columns (ArrayBlocks) and its `apply`, the path
  `raysel run` takes on Ray; d2's per-group ranks from the function its Ray tasks call (d2_ranks);
- downstream: raysel.eval's `logreg` (MiniLM embeddings) and `tfidf` (TF-IDF + logistic regression, which
  never sees the embeddings), fitted on the selected rows with their (noisy) labels, scored on the test split.

The weak-label setting of arXiv 2311.16302 (`--weak`): a clean 10 % of the train split, the rest a pool
labelled by a logistic regression trained on the clean 10 %; select from the pool by classifier entropy and
by EL2N (10 % hard / 90 % easy; EL2N over 5 proxy replicates trained on the pool's weak labels), add the
selection to the clean set, and compare the error against adding a random sample of the same size.

Writes OUT/results.jsonl (one line per corpus, model, policy, budget, seed), OUT/tables.md (mean ± std,
the paired comparison with random, the goals) and OUT/weak.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np

from raysel.cluster import assign, train_centroids
from raysel.config import ClusterConfig, ScorerConfig, SelectConfig
from raysel.eval import (
    TFIDF,
    DownstreamConfig,
    EvalConfig,
    embed_test_split,
    logreg_predict,
    parse_eval_config,
    prepare_splits,
    tfidf_predict,
)
from raysel.proxy import ProxySettings, logits, train_proxy
from raysel.scorers.aum import AUMScorer
from raysel.scorers.classifier_entropy import softmax_entropy
from raysel.scorers.el2n import EL2NScorer
from raysel.select import POLICIES, budget_rows
from raysel.select.d2 import RANK, D2Params, d2_ranks
from raysel.select.plan import ArrayBlocks, CutService, SelectionStats

POLICIES_LABELLED = {
    "stratified-label-el2n-high": {"policy": "stratified", "score": "el2n", "params": {"balance": "label"}},
    "ccs-aum": {"policy": "ccs", "score": "aum", "params": {"beta": 0.1}},
    "ccs-aum-label": {"policy": "ccs", "score": "aum", "params": {"beta": 0.1, "balance": "label"}},
    "ccs-aum-label-b20": {"policy": "ccs", "score": "aum", "params": {"beta": 0.2, "balance": "label"}},
    "ccs-el2n-label": {"policy": "ccs", "score": "el2n", "params": {"beta": 0.1, "balance": "label"}},
    "d2-el2n-label": {"policy": "d2", "score": "el2n", "params": {"balance": "label"}},
    "hard-easy-el2n": {"policy": "hard_easy", "score": "el2n", "params": {"hard_fraction": 0.1}},
}
K = {"bbc": 16}
MODELS = ("logreg", "tfidf")


def corpus_config(name: str, args, noise: float = 0.0) -> EvalConfig:
    """`raysel eval`'s view of the corpus: BBC whole (unless --tiny), the others a seeded sample of --max-rows."""
    corpus = {"path": name, "label_noise": noise}
    if name != "bbc" or args.tiny:
        corpus["max_rows"] = args.max_rows
    raw = {"corpus": corpus, "output": str(Path(args.work) / "unused"), "work_dir": args.work, "scorers": []}
    return parse_eval_config(raw)


def load(name: str, args, noise: float = 0.0):
    """(ids, texts, true labels, train labels (noisy), train embeddings, test split, test embeddings), the train
    rows sorted by id as a policy's candidates are."""
    config = corpus_config(name, args)
    _, train, test = prepare_splits(config)
    noisy = prepare_splits(corpus_config(name, args, noise))[1].labels if noise else train.labels
    order = np.argsort(train.ids.astype(str), kind="stable")
    ids, texts, clean, labels = train.ids[order], train.texts[order], train.labels[order], noisy[order]
    x = embed_test_split(config, type(train)(ids, texts, clean)).astype(np.float32)
    return ids, texts, clean, labels, x, test, embed_test_split(config, test).astype(np.float32)


def proxy_scores(x: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """el2n, aum and classifier_entropy of every row, from proxies trained on (x, labels)."""
    el2n_cfg = ScorerConfig(name="el2n", params={"replicates": 5, "epoch": 2})
    settings = ProxySettings()
    runs = [train_proxy(x, labels, settings, r) for r in range(5)]
    batch = {"embedding": x, "label": labels}
    el2n = EL2NScorer(el2n_cfg, ("el2n",), EL2NScorer.prepared_from(runs, el2n_cfg.typed_params()))(batch)["el2n"]
    aum_cfg = ScorerConfig(name="aum")
    aum = AUMScorer(aum_cfg, ("aum",), AUMScorer.prepared_from(runs[:1], aum_cfg.typed_params()))(batch)["aum"]
    import torch

    with torch.no_grad():
        entropy = softmax_entropy(logits(runs[0].params(), torch.from_numpy(x)))
    return {"el2n": el2n.astype(np.float64), "aum": aum.astype(np.float64), "classifier_entropy": entropy}


def select(settings: dict, batch: dict[str, np.ndarray], x: np.ndarray, budget: float, seed: int) -> np.ndarray:
    """A policy's plan over the candidate columns and its apply, block by block; the kept mask."""
    config = SelectConfig(budget=budget, seed=seed, **settings)
    policy = POLICIES[config.policy](config)
    n = len(batch["id"])
    if config.policy == "d2":
        p: D2Params = config.typed_params()
        groups = batch["cluster"] if p.balance == "cluster" else batch["label"]
        ranks = np.full(n, np.nan)
        for g in np.unique(groups):
            m = np.flatnonzero(groups == g)
            ranks[m] = d2_ranks(x[m], batch[config.score][m], batch["id"][m], p, config.order, seed)
        batch = {**batch, RANK: ranks}
    clusters, sizes = np.unique(batch["cluster"], return_counts=True)
    labels, lsizes = np.unique(batch["label"], return_counts=True)
    stats = SelectionStats(
        n,
        dict(zip(clusters.tolist(), sizes.tolist(), strict=True)),
        label_sizes=dict(zip(labels.tolist(), lsizes.tolist(), strict=True)),
    )
    plan = policy.plan(stats, budget_rows(budget, n), CutService(ArrayBlocks(batch, blocks=4)))
    kept = np.zeros(n, dtype=bool)
    for idx in np.array_split(np.arange(n), 4):
        kept[idx], _ = policy.apply({c: v[idx] for c, v in batch.items()}, plan)
    return kept


class FastTfidf:
    """`tfidf_predict` without re-tokenizing for every selection: the term counts of every train and test text
    once (the same analyzer, every term), then per selection the vocabulary (terms in >= min_df selected texts,
    alphabetical as scikit-learn orders them), idf and sublinear tf of those columns. The same matrices, so the
    same fit (checked against tfidf_predict in `Downstream.accuracy` on the first selections)."""

    def __init__(self, texts: np.ndarray, test_texts: np.ndarray) -> None:
        from sklearn.feature_extraction.text import CountVectorizer

        counter = CountVectorizer(ngram_range=TFIDF["ngram_range"])
        self.counts = counter.fit_transform(list(texts)).tocsr()
        self.test_counts = counter.transform(list(test_texts)).tocsr()

    def matrices(self, rows: np.ndarray):
        from sklearn.preprocessing import normalize

        c = self.counts[rows]
        df = np.asarray((c > 0).sum(axis=0)).ravel()
        vocab = np.flatnonzero(df >= TFIDF["min_df"])
        idf = np.log((1 + len(rows)) / (1 + df[vocab])) + 1

        def weigh(m):
            m = m[:, vocab].astype(np.float64)
            m.data = 1 + np.log(m.data)
            return normalize(m.multiply(idf).tocsr())

        return weigh(c), weigh(self.test_counts)


class Downstream:
    """Both downstream models on a corpus, a fit per distinct selection (cached by the selected ids)."""

    def __init__(self, x_train, texts, x_test, test_texts, test_labels) -> None:
        self.x, self.texts, self.x_test = x_train, texts, x_test
        self.test_texts, self.test_labels = test_texts, test_labels
        self.config = DownstreamConfig()
        self.cache: dict[tuple, float] = {}
        self.tfidf = FastTfidf(texts, test_texts)
        self.checked = 0

    def accuracy(self, model: str, rows: np.ndarray, labels: np.ndarray) -> float:
        key = (model, hashlib.sha1(rows.tobytes() + "|".join(labels[rows]).encode()).hexdigest())
        if key not in self.cache:
            if model == "logreg":
                pred = logreg_predict(self.x[rows], labels[rows], self.x_test, self.config, 0)
            else:
                x, x_test = self.tfidf.matrices(rows)
                pred = logreg_predict(x, labels[rows], x_test, self.config, 0)
                if self.checked < 2:  # the fast matrices give tfidf_predict's own predictions
                    slow = tfidf_predict(self.texts[rows], labels[rows], self.test_texts, self.config, 0)
                    assert np.array_equal(pred, slow), "FastTfidf disagrees with raysel.eval.tfidf_predict"
                    self.checked += 1
            self.cache[key] = float(np.mean(pred == self.test_labels))
        return self.cache[key]


def run_corpus(name: str, noise: float, args, out) -> None:
    ids, texts, clean, labels, x, test, x_test = load(name, args, noise)
    corpus = f"{name}{'-noisy' if noise else ''}"
    start = time.perf_counter()
    scores = proxy_scores(x, labels)
    print(
        f"{corpus}: {len(ids)} train, {len(test)} test, {len(set(clean))} labels; scores in "
        f"{time.perf_counter() - start:.0f} s",
        flush=True,
    )
    down = Downstream(x, texts, x_test, test.texts, test.labels)
    flipped = labels != clean
    for seed in range(args.seeds):
        centroids = train_centroids(x, ClusterConfig(k=K.get(name, 32), seed=seed))
        cluster, _ = assign(x, centroids)
        batch = {"id": ids, "cluster": cluster.astype(np.int64), "label": labels, **scores}
        arms = {"random": {"policy": "random"}, **POLICIES_LABELLED}
        for arm, settings in arms.items():
            for budget in args.budgets:
                kept = select(settings, batch, x, budget, seed)
                for model in MODELS:
                    acc = down.accuracy(model, np.flatnonzero(kept), labels)
                    row = {"corpus": corpus, "model": model, "policy": arm, "budget": budget, "seed": seed}
                    row |= {"rows": int(kept.sum()), "accuracy": acc, "flipped_kept": float(flipped[kept].mean())}
                    out.write(json.dumps(row) + "\n")
        for model in MODELS:
            acc = down.accuracy(model, np.arange(len(ids)), labels)
            out.write(
                json.dumps(
                    {
                        "corpus": corpus,
                        "model": model,
                        "policy": "full",
                        "budget": 1.0,
                        "seed": seed,
                        "rows": len(ids),
                        "accuracy": acc,
                        "flipped_kept": float(flipped.mean()),
                    }
                )
                + "\n"
            )
        out.flush()
        print(f"  {corpus} seed {seed} done at {time.perf_counter() - start:.0f} s", flush=True)


def run_weak(name: str, args, out) -> None:
    """arXiv 2311.16302's setting (module docstring), logreg downstream."""
    ids, texts, clean, _, x, test, x_test = load(name, args)
    down = DownstreamConfig()
    for seed in range(args.seeds):
        rng = np.random.default_rng([seed, 2311])
        is_clean = np.zeros(len(ids), dtype=bool)
        is_clean[rng.choice(len(ids), size=max(len(set(clean)), len(ids) // 10), replace=False)] = True
        weak = logreg_predict(x[is_clean], clean[is_clean], x, down, 0)  # the weak classifier's labels
        labels = np.where(is_clean, clean, weak)
        pool = np.flatnonzero(~is_clean)
        scores = proxy_scores(x[pool], labels[pool])
        from sklearn.linear_model import LogisticRegression

        weak_model = LogisticRegression(C=down.C, max_iter=down.max_iter).fit(x[is_clean], clean[is_clean])
        p = weak_model.predict_proba(x[pool])
        scores["weak_entropy"] = -(p * np.log(np.clip(p, 1e-12, 1))).sum(1)
        batch = {"id": ids[pool], "cluster": np.zeros(len(pool), dtype=np.int64), "label": labels[pool], **scores}
        arms = {
            "random": {"policy": "random"},
            "hard-easy-entropy": {"policy": "hard_easy", "score": "weak_entropy", "params": {"hard_fraction": 0.1}},
            "hard-easy-el2n": {"policy": "hard_easy", "score": "el2n", "params": {"hard_fraction": 0.1}},
            "ccs-aum-label": POLICIES_LABELLED["ccs-aum-label"],
        }
        base = float(np.mean(logreg_predict(x[is_clean], clean[is_clean], x_test, down, 0) == test.labels))
        for arm, settings in arms.items():
            for budget in args.budgets:
                kept = pool[select(settings, batch, x[pool], budget, seed)]
                rows = np.concatenate([np.flatnonzero(is_clean), kept])
                acc = float(np.mean(logreg_predict(x[rows], labels[rows], x_test, down, 0) == test.labels))
                row = {"corpus": name, "setting": "weak", "policy": arm, "budget": budget, "seed": seed}
                row |= {"rows": int(len(rows)), "accuracy": acc, "clean_only": base}
                row |= {"weak_label_error": float(np.mean(labels[kept] != clean[kept]))}
                out.write(json.dumps(row) + "\n")
        out.flush()
        print(f"  weak {name} seed {seed} done", flush=True)


# --- tables ----------------------------------------------------------------------------------------------------


def tables(rows: list[dict]) -> str:
    from scipy import stats as st

    lines = []
    main = [r for r in rows if "model" in r]
    corpora = list(dict.fromkeys(r["corpus"] for r in main))
    budgets = sorted({r["budget"] for r in main if r["policy"] != "full"})
    policies = list(dict.fromkeys(r["policy"] for r in main if r["policy"] != "full"))
    acc = {}
    for r in main:
        acc.setdefault((r["corpus"], r["model"], r["policy"], r["budget"]), {})[r["seed"]] = 100 * r["accuracy"]
    goal_rows = []
    for model in MODELS:
        for corpus in corpora:
            full = acc.get((corpus, model, "full", 1.0))
            if not full:
                continue
            f = np.mean(list(full.values()))
            lines += [f"### {corpus}, downstream `{model}` (full data: {f:.2f})", ""]
            lines += ["| policy | " + " | ".join(f"{100 * b:g} %" for b in budgets) + " |"]
            lines += ["|---" * (len(budgets) + 1) + "|"]
            for p in policies:
                cells = []
                for b in budgets:
                    v = acc.get((corpus, model, p, b))
                    rnd = acc.get((corpus, model, "random", b))
                    if not v:
                        cells.append("")
                        continue
                    a = np.array([v[s] for s in sorted(v)])
                    cell = f"{a.mean():.2f} ± {a.std(ddof=1) if len(a) > 1 else 0:.2f}"
                    if p != "random" and rnd:
                        common = sorted(set(v) & set(rnd))
                        d = np.array([v[s] - rnd[s] for s in common])
                        pval = (
                            st.ttest_rel([v[s] for s in common], [rnd[s] for s in common]).pvalue
                            if len(d) > 1 and d.std() > 0
                            else float("nan")
                        )
                        cell += f" ({d.mean():+.2f}, p {pval:.2g})"
                        r_arr = np.array([rnd[s] for s in common])
                        goal_rows.append(
                            {
                                "model": model,
                                "corpus": corpus,
                                "policy": p,
                                "budget": b,
                                "diff": d.mean(),
                                "random_std": r_arr.std(ddof=1) if len(r_arr) > 1 else 0.0,
                                "vs_full": a.mean() - f,
                            }
                        )
                    cells.append(cell)
                lines.append(f"| {p} | " + " | ".join(cells) + " |")
            lines.append("")
    lines += [
        "### Goals per policy (issue 14)",
        "",
        "never below random by more than random's std (any corpus, budget) · ≥ +2 pt at 25 % (corpora) · "
        "within 0.5 pt of full at 50 % (corpora)",
        "",
        "| model | policy | never below random − its std? (the worst cell) | corpora ≥ +2 pt at 25 % | corpora within 0.5 pt of full at 50 % |",
        "|---|---|---|---|---|",
    ]
    for model in MODELS:
        for p in [q for q in policies if q != "random"]:
            g = [r for r in goal_rows if r["model"] == model and r["policy"] == p]
            if not g:
                continue
            worst = min(g, key=lambda r: r["diff"] + r["random_std"])
            never_below = all(r["diff"] >= -r["random_std"] for r in g)
            plus2 = [r["corpus"] for r in g if r["budget"] == 0.25 and r["diff"] >= 2]
            near = [r["corpus"] for r in g if r["budget"] == 0.5 and r["vs_full"] >= -0.5]
            lines.append(
                f"| {model} | {p} | {'yes' if never_below else 'no'}: worst {worst['diff']:+.2f} vs std "
                f"{worst['random_std']:.2f} ({worst['corpus']}, {100 * worst['budget']:g} %) | {len(plus2)}: "
                f"{', '.join(plus2) or '-'} | {len(near)}: {', '.join(near) or '-'} |"
            )
    return "\n".join(lines) + "\n"


def weak_tables(rows: list[dict]) -> str:
    weak = [r for r in rows if r.get("setting") == "weak"]
    if not weak:
        return ""
    lines = [
        "Test error in % of a logreg fitted on the clean 10 % plus the selection (mean ± std over seeds; in brackets"
        " the paired difference in error against random: + is worse), and how many of the selected pool rows carry"
        " a wrong weak label.",
        "",
        "| corpus | policy | "
        + " | ".join(f"{100 * b:g} % of pool" for b in sorted({r["budget"] for r in weak}))
        + " |",
    ]
    lines.append("|---|---" + "|---" * len({r["budget"] for r in weak}) + "|")
    for corpus in dict.fromkeys(r["corpus"] for r in weak):
        for p in dict.fromkeys(r["policy"] for r in weak):
            cells = []
            for b in sorted({r["budget"] for r in weak}):
                these = {r["seed"]: r for r in weak if r["corpus"] == corpus and r["policy"] == p and r["budget"] == b}
                rnd = {
                    r["seed"]: r
                    for r in weak
                    if r["corpus"] == corpus and r["policy"] == "random" and r["budget"] == b
                }
                err = np.array([100 * (1 - these[s]["accuracy"]) for s in sorted(these)])
                cell = f"{err.mean():.2f} ± {err.std(ddof=1) if len(err) > 1 else 0:.2f}"
                if p != "random":
                    d = np.array(
                        [100 * (rnd[s]["accuracy"] - these[s]["accuracy"]) for s in sorted(these) if s in rnd]
                    )
                    cell += f" ({d.mean():+.2f})"
                wrong = np.mean([these[s]["weak_label_error"] for s in these])
                cells.append(cell + f", {100 * wrong:.0f} % wrong labels")
            lines.append(f"| {corpus} | {p} | " + " | ".join(cells) + " |")
        base = np.mean(
            [100 * (1 - r["clean_only"]) for r in weak if r["corpus"] == corpus and r["policy"] == "random"]
        )
        lines.append(f"| {corpus} | clean 10 % only | {base:.2f} |" + " |" * (len({r["budget"] for r in weak}) - 1))
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpora", default="bbc,wordnet,fortunes")
    ap.add_argument("--noise", default="0,0.2")
    ap.add_argument("--budgets", default="0.1,0.25,0.5")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--max-rows", type=int, default=3000)
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "raysel" / "labelled"))
    ap.add_argument("--out", default="benchmarks/out/labelled")
    ap.add_argument("--weak", action="store_true", help="also the weak-label setting of arXiv 2311.16302")
    ap.add_argument("--only-tables", action="store_true", help="rewrite the tables from OUT/results.jsonl")
    ap.add_argument("--tiny", action="store_true", help="2 seeds, 400 rows per corpus: a check of the script")
    args = ap.parse_args()
    args.budgets = [float(b) for b in args.budgets.split(",")]
    if args.tiny:
        args.seeds, args.max_rows = 2, 400
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = out_dir / "results.jsonl"
    if not args.only_tables:
        with results.open("a") as out:
            for name in args.corpora.split(","):
                if args.weak:
                    run_weak(name, args, out)
                for noise in (float(v) for v in args.noise.split(",") if v):
                    run_corpus(name, noise, args, out)
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    (out_dir / "tables.md").write_text(tables(rows))
    (out_dir / "weak.md").write_text(weak_tables(rows))
    print((out_dir / "tables.md").read_text())
    print((out_dir / "weak.md").read_text())


if __name__ == "__main__":
    main()
