"""`lm_influence` on SmolLM2-135M (CPU): speed against `loss` and a naive baseline, and quality on BBC topics.

    .venv/bin/python benchmarks/lm_influence.py --out /tmp/raysel-bench-lm-influence

Speed (one process, the same texts, batch size, token limit and torch threads for every contender, in
alternating rounds so that a slow spell of the host hits all of them; medians reported):
  * tokens/s of the `loss` scorer (one forward pass, inference mode) and of `lm_influence` at its defaults
    (last 2 blocks, d = 8192, cosine), each through its scorer's `__call__` on a plain dict;
  * examples/s of `lm_influence` against the naive way: per-example gradients of the same linear weights by
    `torch.func.vmap(grad(...))` (right padding, loss masked: exact under causal attention), then one dense
    Gaussian [n_params, d] projection matrix. That matrix is n_params × d floats: at the defaults (7.1 M
    weights × 8192) 232 GB, so the naive run uses the last block only and d = 128 (3.5 M × 128 = 1.8 GB), and
    `lm_influence` is timed at that setting too.

Quality: target = 20 business articles; pool = `--per-topic` articles of each of the 5 topics, none in the
target; fisher sample = 100 other articles. For each `--layers` setting the projected gradients of target,
pool and fisher rows are computed once (LMGradients, the scorer's core) and scored every way: cosine / dot,
plain / preconditioned (damping 0.01, 0.1, 1, fitted on the target alone or on target + fisher sample).
Reports the median score per topic and the ROC AUC of business vs the rest.

Prints a JSON summary and writes it to OUT/summary.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def articles_split(seed: int, per_topic: int, n_target: int, n_fisher: int, max_chars: int):
    """(target business articles, pool of per_topic articles per topic, fisher sample), disjoint, seeded."""
    import random

    from raysel.demo import bbc_articles

    articles = bbc_articles()
    random.Random(seed).shuffle(articles)
    for a in articles:
        a["text"] = a["text"][:max_chars]
    target = [a for a in articles if a["topic"] == "business"][:n_target]
    taken = {a["id"] for a in target}
    pool, per = [], {}
    for a in articles:
        if a["id"] not in taken and per.get(a["topic"], 0) < per_topic:
            per[a["topic"]] = per.get(a["topic"], 0) + 1
            pool.append(a)
    taken |= {a["id"] for a in pool}
    fisher = [a for a in articles if a["id"] not in taken][:n_fisher]
    return target, pool, fisher


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    pos, neg = scores[positive], scores[~positive]
    return float((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean())


def batch_of(texts: list[str]) -> dict[str, np.ndarray]:
    return {"text": np.array(texts, dtype=object), "reason": np.array([""] * len(texts), dtype=object)}


class NaiveGradients:
    """Per-example gradients of the chosen linear weights by torch.func, then a dense Gaussian projection."""

    def __init__(self, model, tokenizer, *, blocks: list[int], dim: int, seed: int, max_tokens: int):
        import torch

        from raysel.scorers.lm_influence import LMGradients

        self.helper = LMGradients(model, tokenizer, layers=blocks, dim=dim, seed=seed, max_tokens=max_tokens)
        names = {id(m): n for n, m in model.named_modules()}
        self.names = [f"{names[id(m)]}.weight" for m in self.helper.projector.layers.values()]
        params = dict(model.named_parameters())
        self.subset = {n: params[n].detach() for n in self.names}
        self.n_params = sum(p.numel() for p in self.subset.values())
        gen = torch.Generator().manual_seed(seed)
        self.matrix = torch.randn(self.n_params, dim, generator=gen) / dim**0.5  # the dense projection
        self.model, self.dim = model, dim

    def __call__(self, texts: list[str], batch_size: int) -> np.ndarray:
        import torch
        from torch.func import functional_call, grad, vmap

        model = self.model

        def loss(sub, ids, mask):
            # No attention mask: with right padding a causal model's real tokens never see the pads.
            logits = functional_call(model, sub, (), {"input_ids": ids[None], "use_cache": False}).logits[0, :-1]
            nll = torch.nn.functional.cross_entropy(logits, ids[1:], reduction="none")
            m = mask[1:].to(nll.dtype)
            return (nll * m).sum() / m.sum().clamp(min=1)

        seqs = self.helper.encode(texts)
        out = []
        for s in range(0, len(seqs), batch_size):
            chunk = seqs[s : s + batch_size]
            width = max(len(x) for x in chunk)
            ids = torch.full((len(chunk), width), self.helper.pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, x in enumerate(chunk):
                ids[i, : len(x)] = torch.tensor(x)
                mask[i, : len(x)] = 1
            grads = vmap(grad(loss), in_dims=(None, 0, 0))(self.subset, ids, mask)
            flat = torch.cat([grads[n].reshape(len(chunk), -1) for n in self.names], dim=1)
            out.append((flat @ self.matrix).numpy())
        return np.concatenate(out)


def speed(args) -> dict:
    import warnings

    import torch

    from raysel.config import ScorerConfig
    from raysel.models import load_causal_lm
    from raysel.scorers.lm import CausalLMScorer
    from raysel.scorers.lm_influence import LMGradients, LMInfluenceScorer

    warnings.filterwarnings("ignore", message=".*batching rule.*")  # vmap's SDPA-backward fallback
    torch.set_num_threads(args.threads)
    target, pool, _ = articles_split(args.seed, 40, 20, 0, 2000)
    texts = [a["text"] for a in pool[: args.texts]]
    args.out.mkdir(parents=True, exist_ok=True)
    target_file = args.out / "target.jsonl"
    target_file.write_text("".join(json.dumps(a) + "\n" for a in target))

    common = {"max_tokens": args.max_tokens, "batch_size": args.batch_size, "threads": args.threads}
    loss = CausalLMScorer(ScorerConfig(name="loss", **common), outputs=("loss",))
    started = time.perf_counter()
    infl = LMInfluenceScorer(
        ScorerConfig(name="lm_influence", params={"target": str(target_file)}, **common), outputs=("lm_influence",)
    )
    construct_s = time.perf_counter() - started
    model, tok = load_causal_lm("smollm2", device="cpu")
    small = LMGradients(
        model, tok, layers=[29], dim=128, seed=0, max_tokens=args.max_tokens, batch_size=args.batch_size
    )
    naive = NaiveGradients(model, tok, blocks=[29], dim=128, seed=0, max_tokens=args.max_tokens)
    n_tokens = sum(len(s) for s in infl.gradients.encode(texts))  # BOS included, cut at max_tokens

    contenders = {
        "loss": lambda: loss(batch_of(texts)),
        "lm_influence": lambda: infl(batch_of(texts)),
        "lm_influence_last1_d128": lambda: small(texts),
        "naive_last1_d128": lambda: naive(texts, args.batch_size),
    }
    # Warm-up on two texts: first-call allocations, thread pools.
    loss(batch_of(texts[:2]))
    infl(batch_of(texts[:2]))
    small(texts[:2])
    naive(texts[:2], 2)
    names = list(contenders)
    wall: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # a rotating order within each round
            t, c = time.perf_counter(), time.process_time()
            contenders[name]()
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)

    def ratio(a: str, b: str, clock: dict[str, list[float]]) -> float:
        """Median over rounds of clock[a] / clock[b]: both sides of a ratio ran within the same round."""
        return round(statistics.median(x / y for x, y in zip(clock[a], clock[b], strict=True)), 3)

    med = {k: statistics.median(v) for k, v in wall.items()}
    result = {
        "texts": len(texts),
        "tokens": n_tokens,
        "max_tokens": args.max_tokens,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "rounds": args.rounds,
        "wall_s": {k: [round(x, 2) for x in v] for k, v in wall.items()},
        "cpu_s": {k: [round(x, 2) for x in v] for k, v in cpu.items()},
        "tokens_per_s (median wall)": {k: round(n_tokens / v, 1) for k, v in med.items()},
        "examples_per_s (median wall)": {k: round(len(texts) / v, 2) for k, v in med.items()},
        "lm_influence / loss tokens/s, median per-round ratio (wall)": ratio("loss", "lm_influence", wall),
        "lm_influence / loss tokens/s, median per-round ratio (cpu)": ratio("loss", "lm_influence", cpu),
        "lm_influence / naive examples/s at last1 d128 (wall)": ratio(
            "naive_last1_d128", "lm_influence_last1_d128", wall
        ),
        "lm_influence / naive examples/s at last1 d128 (cpu)": ratio(
            "naive_last1_d128", "lm_influence_last1_d128", cpu
        ),
        "lm_influence_dim": infl.gradients.dim,
        "lm_influence_layers": len(infl.gradients.projector.names),
        "naive_params": naive.n_params,
        "naive_matrix_gib": round(naive.n_params * 128 * 4 / 2**30, 2),
        "default_dense_matrix_gib": round(
            sum(m.weight.numel() for m in infl.gradients.projector.layers.values()) * 8192 * 4 / 2**30, 1
        ),
        "lm_influence_construct_s (load + 20 target texts)": round(construct_s, 1),
    }
    return result


def quality(args) -> dict:
    import torch

    from raysel.models import load_causal_lm
    from raysel.scorers.lm_influence import LastBlocks, LMGradients, TargetReference

    torch.set_num_threads(args.threads)
    target, pool, fisher = articles_split(args.seed, args.per_topic, 20, 100, args.quality_chars)
    model, tok = load_causal_lm("smollm2", device="cpu")
    topics = np.array([a["topic"] for a in pool])
    business = topics == "business"
    out: dict = {
        "pool": len(pool),
        "target": len(target),
        "fisher_sample": len(fisher),
        "max_tokens": args.quality_tokens,
    }
    for setting in args.layers:
        layers = "all" if setting == "all" else LastBlocks(last=int(setting.removeprefix("last")))
        grads = LMGradients(model, tok, layers=layers, dim=8192, seed=0, max_tokens=args.quality_tokens, batch_size=16)
        started = time.perf_counter()
        t_feats, _ = grads([a["text"] for a in target])
        p_feats, _ = grads([a["text"] for a in pool])
        f_feats, _ = grads([a["text"] for a in fisher])
        seconds = round(time.perf_counter() - started, 1)
        row: dict = {"dim": grads.dim, "linear_layers": len(grads.projector.names), "seconds": seconds}
        variants = {}
        for score in ("cosine", "dot"):
            variants[score] = TargetReference.fit(t_feats, score=score)(p_feats)
            for damping in (0.01, 0.1, 1.0):
                variants[f"{score}+F(target) λ={damping}"] = TargetReference.fit(
                    t_feats, score=score, fisher=t_feats, damping=damping
                )(p_feats)
                variants[f"{score}+F(target+100) λ={damping}"] = TargetReference.fit(
                    t_feats, score=score, fisher=np.concatenate([t_feats, f_feats]), damping=damping
                )(p_feats)
        row["auc_business_vs_rest"] = {k: round(roc_auc(v, business), 3) for k, v in variants.items()}
        for key in ("cosine", "cosine+F(target+100) λ=0.1"):
            row[f"median_per_topic[{key}]"] = {
                t: round(float(np.median(variants[key][topics == t])), 4) for t in sorted(set(topics))
            }
        out[setting] = row
        print(setting, json.dumps(row), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/raysel-bench-lm-influence"))
    parser.add_argument("--part", choices=["speed", "quality", "all"], default="all")
    parser.add_argument("--texts", type=int, default=16, help="texts timed per call (speed)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--per-topic", type=int, default=40, help="pool articles per topic (quality)")
    parser.add_argument("--quality-tokens", type=int, default=64)
    parser.add_argument("--quality-chars", type=int, default=400)
    parser.add_argument("--layers", nargs="+", default=["last2"], help="block settings: lastN or all (quality)")
    args = parser.parse_args()
    summary: dict = {"command": " ".join(sys.argv)}
    if args.part in ("speed", "all"):
        summary["speed"] = speed(args)
        print(json.dumps(summary["speed"], indent=2), flush=True)
    if args.part in ("quality", "all"):
        summary["quality"] = quality(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
