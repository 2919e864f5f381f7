"""The Quad experiment in miniature (issue 13 §4): which selection of a pretraining pool trains the best LM?

    apt-get install -y fortunes fortunes-min wordnet-base          # the packaged texts (as benchmarks/quality.py)
    PYTHONPATH=. .venv/bin/python benchmarks/pretrain.py            # the issue's scale: ~21,000 texts, 2 seeds
    PYTHONPATH=. .venv/bin/python benchmarks/pretrain.py --small    # a check of the script in ~5 minutes

1. The pool (OUT/data/pool.jsonl, `label` = the source): BBC news paragraphs (every article but the target's),
   WordNet glosses and Debian fortunes, plus realistic junk: word-shuffled copies of pool texts, repeated
   boilerplate (cookie banners, newsletter footers, copyright lines with a varying number) and cut
   fragments (a few words cut out of a text). The target (OUT/data/target.jsonl): 200 BBC business articles,
   none of them in the pool. The eval holds 5 % of the pool out (stratified by source): the pool hold-out.
2. The proxy LM (OUT/proxy-lm): the eval's own small LM (same tokenizer, same width), trained on a seeded
   10 % sample of the train pool for the same token budget as an arm, saved as a model folder. It is the
   scoring model of both `loss` (perplexity filtering with a small reference model, as arXiv 2405.20541) and
   `lm_influence` (LESS-style gradient cosine to the target). Scoring the pool with the small LM being
   trained, not with a larger one, is what Quad does; SmolLM2-135M (the default scorer model) would cost
   ~10 texts/s on these 2 cores, ~35 minutes per 20,000 texts for `lm_influence` alone.
3. `raysel eval raysel/configs/eval-lm.yaml` (paths under OUT): arms random, perplexity-low (topk `loss`
   asc), influence-topk (topk `lm_influence` desc, every train text scored), bandit-influence (the bandit
   policy probing with `lm_influence`, at most 10 % of the pool; run only if the policy accepts the probe
   scorer: a one-line message says why not otherwise), and full. Then the perplexity middle band (the budget
   rows nearest the median `loss`, 2405.20541's "medium"), which no raysel policy does, is selected here
   from the scored shards and trained the same way; it joins the eval's table and plot.
Every arm trains the same small LM for the same number of tokens, per seed; the tables report the target
loss, the pool hold-out loss, training tokens/s, the influence evaluations each arm spent and the wall
seconds of each pass. Writes OUT/summary.json and OUT/eval/results.md; prints the summary.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "raysel" / "configs" / "eval-lm.yaml"
BOILERPLATE = [
    "We use cookies to improve your experience on our site. By continuing to browse you agree to our use of "
    "cookies. Find out more in our cookie policy.",
    "Sign up for our newsletter to get the latest news delivered to your inbox every morning. You can "
    "unsubscribe at any time.",
    "Copyright {n} All rights reserved. This material may not be published, broadcast, rewritten or redistributed.",
    "Click here to read more. Share this article on Facebook, Twitter and email. Page {n} of 12.",
    "Advertisement. Continue reading the main story below. Most popular stories right now.",
]


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n|\n", text) if len(p.split()) >= 8]


def build_pool(data: Path, n_pool: int, n_target: int, seed: int) -> dict:
    """Write data/pool.jsonl and data/target.jsonl; return the pool's composition."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from quality import fortunes_corpus, wordnet_corpus

    from raysel.demo import bbc_articles

    rng = random.Random(seed)
    articles = bbc_articles()
    rng.shuffle(articles)
    target = [a for a in articles if a["topic"] == "business"][:n_target]
    taken = {a["id"] for a in target}
    bbc = [
        {"id": f"{a['id']}-p{i}", "text": p, "label": f"bbc-{a['topic']}"}
        for a in articles
        if a["id"] not in taken
        for i, p in enumerate(_paragraphs(a["text"]))
    ]
    wordnet = [json.loads(x) for x in wordnet_corpus().read_text().splitlines()]
    wordnet = [{"id": f"wordnet-{r['id']}", "text": r["text"], "label": "wordnet"} for r in wordnet]
    wordnet = [r for r in wordnet if len(r["text"].split()) >= 5]
    fortunes = [json.loads(x) for x in fortunes_corpus().read_text().splitlines()]
    fortunes = [{"id": f"fortune-{r['id']}", "text": r["text"], "label": "fortune"} for r in fortunes]
    shares = {"bbc": 0.43, "wordnet": 0.19, "fortune": 0.14, "shuffled": 0.1, "boilerplate": 0.07, "fragment": 0.07}
    want = {k: int(round(v * n_pool)) for k, v in shares.items()}
    want["bbc"] += n_pool - sum(want.values())
    real = rng.sample(bbc, min(want["bbc"], len(bbc)))
    real += rng.sample(wordnet, want["wordnet"]) + rng.sample(fortunes, min(want["fortune"], len(fortunes)))
    junk = []
    for i in range(want["shuffled"]):
        words = rng.choice(real)["text"].split()
        rng.shuffle(words)
        junk.append({"id": f"junk-shuffled-{i}", "text": " ".join(words), "label": "junk-shuffled"})
    for i in range(want["boilerplate"]):
        text = rng.choice(BOILERPLATE).format(n=rng.randint(1998, 2025))
        junk.append({"id": f"junk-boilerplate-{i}", "text": text, "label": "junk-boilerplate"})
    for i in range(want["fragment"]):
        words = rng.choice(real)["text"].split()
        start = rng.randrange(max(1, len(words) - 3))
        cut = " ".join(words[start : start + rng.randint(2, 6)])
        junk.append(
            {"id": f"junk-fragment-{i}", "text": cut[: max(3, len(cut) - rng.randint(0, 3))], "label": "junk-fragment"}
        )
    pool = real + junk
    rng.shuffle(pool)
    data.mkdir(parents=True, exist_ok=True)
    for name, rows in (("pool.jsonl", pool), ("target.jsonl", target)):
        tmp = data / f"{name}.partial"
        tmp.write_text(
            "".join(
                json.dumps({"id": r["id"], "text": r["text"], "label": r.get("label", "target")}) + "\n" for r in rows
            )
        )
        tmp.rename(data / name)
    composition: dict[str, int] = {}
    for r in pool:
        composition[r["label"]] = composition.get(r["label"], 0) + 1
    return {"pool": len(pool), "target": len(target), "by_source": dict(sorted(composition.items()))}


def eval_config(out: Path, args):
    """eval-lm.yaml with every path under `out` and the command line's scale."""
    import yaml

    from raysel.eval import parse_eval_config

    raw = yaml.safe_load(CONFIG.read_text())
    text = json.dumps(raw).replace("out/pretrain", str(out))
    raw = json.loads(text)
    raw["work_dir"] = str(out / "work")
    raw["budgets"], raw["seeds"] = args.budgets, args.seeds
    lm = raw["downstream"]["lm"]
    if args.tokens:
        lm["tokens"] = args.tokens
    if args.small:
        lm |= {"hidden": 64, "layers": 1, "heads": 2, "vocab_size": 1000, "tokenizer_rows": 500, "eval_rows": 200}
        raw["cluster"]["k"] = 8
    if args.k:
        raw["cluster"]["k"] = args.k
    for key in ("hidden", "layers", "seq_len", "vocab_size"):
        if getattr(args, key):
            lm[key] = getattr(args, key)
    return parse_eval_config(raw), raw


def bandit_policy(raw: dict) -> dict:
    """The bandit arm: clusters probed with `lm_influence` (the exhaustive arm's scorer), ≤ 10 % of the pool."""
    influence = next(s for s in raw["scorers"] if s["name"] == "lm_influence")
    return {
        "name": "bandit-influence",
        "select": {
            "policy": "bandit",
            "score": "loss",
            "order": "asc",
            "params": {"probe_scorer": influence, "probe_order": "desc", "probe_budget": 0.1},
        },
    }


def train_proxy(config, folder: Path, seed: int, tokens: int) -> dict:
    """The eval's small LM (its tokenizer and shape) trained for `tokens` on a seeded 10 % sample of the train
    pool, saved where the scorers read it."""
    from raysel.eval import _small_lm, prepare_splits

    if (folder / "config.json").exists():
        return json.loads((folder / "proxy.json").read_text())
    _, train, test = prepare_splits(config)
    lm = config.downstream.lm.model_copy(update={"tokens": tokens})
    config = config.model_copy(update={"downstream": config.downstream.model_copy(update={"lm": lm})})
    small = _small_lm(config, train, test)
    sample = random.Random(seed).sample(list(train.texts), max(1, len(train) // 10))
    model, stats = small.train(sample, seed)
    info = small.measure(model) | stats | {"texts": len(sample)}
    small.save(model, folder)
    (folder / "proxy.json").write_text(json.dumps(info))
    return info


def middle_band_ids(scores_uri: str, ids: np.ndarray, budget: float) -> np.ndarray:
    """The `budget` rows whose `loss` is nearest the median (2405.20541's medium perplexity band)."""
    import pyarrow.dataset as pads

    from raysel.io import fs as rfs
    from raysel.select import budget_rows

    fs, path = rfs.resolve(scores_uri)
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=["id", "loss"])
    loss = dict(zip(table.column("id").to_pylist(), table.column("loss").to_pylist(), strict=True))
    values = np.array([loss.get(i, np.nan) for i in ids], dtype=np.float64)
    usable = np.isfinite(values)
    median = np.median(values[usable])
    distance = np.where(usable, np.abs(values - median), np.inf)
    n = budget_rows(budget, int(usable.sum()))
    return np.sort(ids[np.argsort(distance, kind="stable")[:n]])


def selected_ids(eval_out: Path, policy: str, budget: float, seed: int = 0) -> np.ndarray:
    """The ids a pipeline arm selected (its ledger's `selected` rows)."""
    import pyarrow.dataset as pads

    ledger = pads.dataset(
        eval_out / "runs" / policy / f"budget-{budget}" / f"seed-{seed}" / "ledger", format="parquet"
    )
    table = ledger.to_table(columns=["id", "status"])
    status = table.column("status").to_numpy(zero_copy_only=False)
    return table.column("id").to_numpy(zero_copy_only=False)[status == "selected"]


def mix(ids, label_of: dict) -> dict[str, float]:
    """Share of each source in a selection, largest first."""
    counts: dict[str, int] = {}
    for i in ids:
        counts[label_of[i]] = counts.get(label_of[i], 0) + 1
    return {k: round(v / max(1, len(ids)), 3) for k, v in sorted(counts.items(), key=lambda kv: -kv[1])}


def manifests(eval_out: Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for p in sorted((eval_out / "runs").rglob("manifest.json")):
        out.setdefault(p.parts[-4], []).append(json.loads(p.read_text()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "pretrain")
    ap.add_argument("--pool", type=int, default=21_000, help="pool texts (5 % are held out: the pool hold-out)")
    ap.add_argument("--target", type=int, default=200)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.25])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=None, help="training tokens per arm (default: the config's)")
    ap.add_argument("--proxy-tokens", dest="proxy_tokens", type=int, default=60_000, help="the proxy LM's tokens")
    ap.add_argument("--k", type=int, default=None, help="clusters (default: the config's)")
    ap.add_argument("--small", action="store_true", help="a quick check: 2,000 texts, a tinier LM, 1 seed")
    ap.add_argument("--hidden", type=int, default=None, help="the small LM's width (default: the config's)")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--seq-len", dest="seq_len", type=int, default=None)
    ap.add_argument("--vocab-size", dest="vocab_size", type=int, default=None)
    ap.add_argument("--no-bandit", action="store_true")
    ap.add_argument("--skip-eval", action="store_true", help="reuse OUT/eval/results.parquet (redo the rest only)")
    args = ap.parse_args()
    if args.small:
        args.pool, args.seeds, args.tokens = min(args.pool, 2000), 1, args.tokens or 20_000

    from raysel._internal.ray_stage import init_ray
    from raysel.errors import RayselError
    from raysel.eval import LM_METRICS, _small_lm, prepare_splits, run_eval, write_results

    started = time.perf_counter()
    out = args.out.resolve()
    data = out / "data"
    composition = build_pool(data, args.pool, args.target, seed=0)
    print(f"pool: {composition}", flush=True)
    config, raw = eval_config(out, args)
    proxy = train_proxy(config, out / "proxy-lm", seed=1234, tokens=args.proxy_tokens)
    print(f"proxy LM: {proxy}", flush=True)

    for attempt in range(4):  # a busy host can miss Ray's 30-second node start-up wait: try again
        try:
            init_ray(config.ray.address)
            break
        except Exception as err:  # Ray raises a bare Exception for it
            if attempt == 3 or "timed out during startup" not in str(err):
                raise
            print(f"Ray did not start ({err}); trying again", flush=True)
    notes = []
    if not args.no_bandit and not args.skip_eval:
        # Preflight: the bandit arm's first selection. A refusal (e.g. a probe scorer the policy does not run
        # yet) drops the arm with its message; a success is reused by the eval (same config, committed).
        from raysel.eval import PolicySpec, _selected_ids
        from raysel.io import fs as rfs

        bandit = PolicySpec(**bandit_policy(raw))
        train_uri, _, _ = prepare_splits(config)
        run_out = rfs.join(config.output, "runs", "bandit-influence", f"budget-{args.budgets[0]}", "seed-0")
        try:
            _selected_ids(config.run_config(bandit, args.budgets[0], 0, train_path=train_uri, output=run_out))
            config = config.model_copy(update={"policies": [*config.policies, bandit]})
        except RayselError as err:
            notes.append(f"bandit-influence not run: the bandit policy refused lm_influence as its probe: {err}")
            print(notes[-1], flush=True)
    if args.skip_eval:
        import pyarrow.parquet as pq

        result = type("Reused", (), {"results": pq.read_table(out / "eval" / "results.parquet")})()
    else:
        result = run_eval(config)

    # The perplexity middle band: selected here from the scored shards, trained like every arm.
    _, train, test = prepare_splits(config)
    small = _small_lm(config, train, test)
    label_of = dict(zip(train.ids.tolist(), train.labels.tolist(), strict=True))
    text_of = dict(zip(train.ids.tolist(), train.texts.tolist(), strict=True))
    first = next(iter(manifests(out / "eval").values()))[0]
    scores_uri = first["reuse"]["scores"]["uri"]
    rows = result.results.to_pylist()
    usable = np.array(sorted(r for r in train.ids.tolist()), dtype=object)
    mixes = {}
    for budget in args.budgets:
        chosen = middle_band_ids(scores_uri, usable, budget)
        mixes[f"perplexity-middle@{budget}"] = mix(chosen, label_of)
        for policy in sorted(p.name for p in (out / "eval" / "runs").iterdir()):  # the pipeline's arms
            mixes[f"{policy}@{budget}"] = mix(selected_ids(out / "eval", policy, budget), label_of)
        for seed in config.seed_list:
            start = time.perf_counter()
            measured = small.train_and_measure([text_of[i] for i in chosen], seed)
            rows.append(
                {
                    "policy": "perplexity-middle",
                    "budget": float(budget),
                    "seed": int(seed),
                    "train_rows": int(len(chosen)),
                    "labels_covered": len({label_of[i] for i in chosen}),
                    **{m.name: measured[m.name] for m in LM_METRICS},
                    "select_seconds": 0.0,
                    "train_seconds": round(time.perf_counter() - start, 3),
                }
            )
            print(f"  perplexity-middle budget {budget} seed {seed}: target_loss {measured['target_loss']:.4f}")
    order = ["random", "perplexity-low", "perplexity-middle", "influence-topk", "bandit-influence", "full"]
    rows.sort(key=lambda r: (order.index(r["policy"]) if r["policy"] in order else 99, r["budget"], r["seed"]))
    classes = sorted(set(train.labels.tolist()) | set(test.labels.tolist()))
    result = write_results(config, rows, n_train=len(train), n_test=len(test), classes=classes)

    summary = summarize_arms(out, result, len(usable), args.budgets)
    summary |= {"composition": composition, "proxy_lm": proxy, "notes": notes, "selection_mix": mixes}
    summary["texts_per_s"] = scorer_rates(config, list(train.texts[:512]))
    summary["wall_seconds"] = round(time.perf_counter() - started, 1)
    summary["goals"] = check_goals(summary["arms"], args.budgets)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: summary[k] for k in ("arms", "goals", "notes", "wall_seconds")}, indent=2))
    print((out / "eval" / "results.md").read_text())


def summarize_arms(out: Path, result, n_train: int, budgets: list[float]) -> dict:
    """Per arm and budget: mean target / hold-out loss over seeds, influence evaluations, seconds per pass."""
    by_policy = manifests(out / "eval")
    arms = []
    for r in result.summary.to_pylist():
        ms = [m for m in by_policy.get(r["policy"], []) if m["config"]["select"]["budget"] == r["budget"]]
        influence = 0
        if r["policy"] == "influence-topk":
            influence = n_train  # every train text scored once in pass 1
        elif r["policy"] == "bandit-influence" and ms:
            influence = int(np.mean([m["selection"]["bandit"]["examples_probed"] for m in ms]))
        seconds = {}
        for key in ("score", "cluster", "select", "write"):
            values = [m["seconds"].get(key) for m in ms if key in m.get("seconds", {})]
            if values:
                seconds[key] = round(float(np.median(values)), 2)
        arms.append(
            {
                "policy": r["policy"],
                "budget": r["budget"],
                "rows": r["train_rows"],
                "target_loss": round(r["target_loss_mean"], 4),
                "target_loss_std": round(r["target_loss_std"], 4),
                "holdout_loss": round(r["holdout_loss_mean"], 4),
                "holdout_loss_std": round(r["holdout_loss_std"], 4),
                "tokens_per_s": round(r["tokens_per_s_mean"]),
                "influence_evaluations": influence,
                "seconds_per_pass": seconds,
            }
        )
    computed = [m for ms in by_policy.values() for m in ms if not m["reuse"]["scores"].get("reused", True)]
    pass1 = computed[0]["seconds"].get("score") if computed else None
    return {"arms": arms, "pass1_score_seconds": pass1}


def scorer_rates(config, texts: list[str]) -> dict:
    """Texts/s of `loss` and `lm_influence` with the proxy LM, in this process (what pass 1 runs per actor)."""
    from raysel.scorers.lm import CausalLMScorer
    from raysel.scorers.lm_influence import LMInfluenceScorer

    batch = {"text": np.array(texts, dtype=object), "reason": np.array([""] * len(texts), dtype=object)}
    rates = {}
    for scorer_cfg in config.scorers:
        cls = LMInfluenceScorer if scorer_cfg.name == "lm_influence" else CausalLMScorer
        scorer = cls(scorer_cfg.model_copy(update={"threads": 2}), outputs=(scorer_cfg.name,))
        start = time.perf_counter()
        scorer(batch)
        rates[scorer_cfg.name] = round(len(texts) / (time.perf_counter() - start), 1)
    return rates


def check_goals(arms: list[dict], budgets: list[float]) -> list[dict]:
    """Per budget: influence-topk vs random and the perplexity arms; the bandit's share of the improvement."""
    out = []
    for b in budgets:
        at = {a["policy"]: a for a in arms if a["budget"] == b}
        rand, inf = at.get("random"), at.get("influence-topk")
        if not rand or not inf:
            continue
        g = {"budget": b, "influence_minus_random": round(inf["target_loss"] - rand["target_loss"], 4)}
        for p in ("perplexity-low", "perplexity-middle"):
            if p in at:
                g[f"influence_minus_{p}"] = round(inf["target_loss"] - at[p]["target_loss"], 4)
        g["influence_beats_random_and_perplexity"] = all(
            v < 0 for k, v in g.items() if k.startswith("influence_minus")
        )
        if "bandit-influence" in at:
            gain = rand["target_loss"] - inf["target_loss"]
            bandit_gain = rand["target_loss"] - at["bandit-influence"]["target_loss"]
            g["bandit_share_of_improvement"] = round(bandit_gain / gain, 3) if gain > 0 else None
            g["bandit_influence_share_of_pool"] = at["bandit-influence"]["influence_evaluations"]
        out.append(g)
    return out


if __name__ == "__main__":
    main()
