"""Throughput of the embedding and LM-scoring stages inside the Ray Data pipeline vs the plain loop.

The roofline for one machine is the best single-process loop over the same model on the same cores:
sentence-transformers' own `encode` (it sorts texts by length to cut padding) for the encoder, and
the scorer class called directly in-process (length-sorted batches, no Ray) for the causal LM. The
pipeline is raysel's pass 1 restricted to one stage: a Ray Data read of a JSONL file through
`CorpusReader`, then the stage's actor pool, on a local cluster with the same CPU count.

    python benchmarks/throughput.py [--docs 1000] [--lm-docs 300] [--threads 2] [--pools 1x2 2x1] [--repeats 3]

Prints a Markdown table; `--out FILE` appends it with the command to a results file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def corpus(n: int, max_chars: int) -> list[dict]:
    from raysel.demo import bbc_articles

    articles = bbc_articles()
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(articles))[:n]
    return [{"id": articles[i]["id"], "text": articles[i]["text"][:max_chars]} for i in idx]


def plain_embed(texts: list[str], cfg) -> float:
    from raysel.models import load_encoder

    model = load_encoder(cfg.model, max_tokens=cfg.max_tokens)
    model.encode(texts[:8], batch_size=cfg.batch_size)  # warm-up: first-call allocations
    start = time.perf_counter()
    model.encode(texts, batch_size=cfg.batch_size, normalize_embeddings=True, show_progress_bar=False)
    return time.perf_counter() - start


def plain_lm(texts: list[str], cfg) -> tuple[float, int]:
    from raysel.scorers.lm import CausalLMScorer

    scorer = CausalLMScorer(cfg, outputs=("entropy", "loss"))
    scorer({"text": np.array(texts[:2], dtype=object), "reason": np.array(["", ""], dtype=object)})
    start = time.perf_counter()
    out = scorer({"text": np.array(texts, dtype=object), "reason": np.array([""] * len(texts), dtype=object)})
    return time.perf_counter() - start, int(out["lm_tokens"].sum())


def embed_cfg(actors: int, threads: int):
    """The embedding stage measured here: MiniLM, texts cut at 128 tokens, forward batches of 64."""
    from raysel.config import EmbedConfig, Resources

    return EmbedConfig(batch_size=64, max_tokens=128, actors=actors, threads=threads, resources=Resources(cpus=1))


def lm_cfg(actors: int, threads: int):
    """The LM stage measured here: SmolLM2-135M entropy + loss, texts cut at 64 tokens, forward batches of 16."""
    from raysel.config import Resources, ScorerConfig

    return ScorerConfig(
        name="entropy", batch_size=16, max_tokens=64, actors=actors, threads=threads, resources=Resources(cpus=1)
    )


def emit(table: str, out: str | None) -> None:
    """Print the Markdown table; with `out`, append it to that file under the command that produced it."""
    print(table)
    if out:
        with open(out, "a") as f:
            f.write(f"\n`python benchmarks/{Path(sys.argv[0]).name} {' '.join(sys.argv[1:])}`\n\n{table}\n")


def timed(cls: type) -> type:
    """The stage class, with each call's start and end time (wall clock) added as two columns."""

    class Timed(cls):
        def __call__(self, batch):
            start = time.time()
            out = super().__call__(batch)
            n = len(batch["text"])
            out["_call_start"], out["_call_end"] = np.full(n, start), np.full(n, time.time())
            return out

    Timed.__name__ = Timed.__qualname__ = cls.__name__
    return Timed


def pipeline_stage(path: Path, stage: str, cfg, input_cfg) -> tuple[float, int, float]:
    """Seconds, LM tokens and the actors' busy fraction of read → one actor-pool stage → consume, from the
    pool's first call start to its last call end: actor start-up and model load are excluded (as they are for
    the loop); everything between calls (block transfer, scheduling, reading, the driver) is included. Busy =
    the actors' summed call time over actors × that window: what is not busy is idle waiting, mostly at the
    end, when one actor runs the last call and its peers have none left."""

    from raysel._internal.ray_stage import init_ray, map_stages
    from raysel.embed import Embedder
    from raysel.io.read import list_input
    from raysel.pipeline import read_corpus
    from raysel.scorers.lm import CausalLMScorer

    init_ray(None)  # raysel's Ray Data settings (block size, timeouts), as a run has them
    ds = read_corpus(list_input(input_cfg.model_copy(update={"path": str(path)})), input_cfg)
    if stage == "embed":
        stages = [(timed(Embedder), cfg, {"config": cfg})]
    else:
        stages = [(timed(CausalLMScorer), cfg, {"config": cfg, "outputs": ("entropy", "loss")})]
    ds = map_stages(ds, stages)  # pass 1's own blocks, pool and reservations
    calls, tokens = set(), 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        calls |= set(zip(batch["_call_start"].tolist(), batch["_call_end"].tolist(), strict=True))
        tokens += int(batch["lm_tokens"].sum()) if "lm_tokens" in batch else 0
    first, last = min(start for start, _ in calls), max(end for _, end in calls)
    busy = sum(end - start for start, end in calls) / (cfg.actors * (last - first))
    return last - first, tokens, busy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=1000, help="texts for the embedding stage")
    parser.add_argument("--lm-docs", type=int, default=300, help="texts for the LM stage")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of the plain loop")
    parser.add_argument(
        "--pools",
        nargs="+",
        default=[f"1x{os.cpu_count()}", f"{os.cpu_count()}x1"],
        help="pipeline pool shapes to measure, ACTORSxTHREADS each (default: one actor with every core's "
        "thread, and one single-thread actor per core)",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="rounds of loop-then-pipelines; the table gives medians"
    )
    parser.add_argument("--out", help="append the Markdown table to this file")
    args = parser.parse_args()
    pools = [tuple(int(x) for x in p.split("x")) for p in args.pools]

    import ray
    import torch

    from raysel.config import InputConfig

    torch.set_num_threads(args.threads)
    # Per round: the loops alone (no Ray running), then every pool shape on a fresh local cluster. Rounds
    # alternate so that a slow spell of a shared host hits loop and pipeline alike; each ratio is taken
    # within its round.
    loop_rates, pipe_rates = {"embed": [], "lm": []}, {}
    with tempfile.TemporaryDirectory() as tmp:
        docs = corpus(args.docs, 2000)
        path = Path(tmp) / "bench.jsonl"
        path.write_text("".join(json.dumps(d) + "\n" for d in docs))
        lm_path = Path(tmp) / "bench_lm.jsonl"
        lm_path.write_text("".join(json.dumps(d) + "\n" for d in docs[: args.lm_docs]))
        input_cfg = InputConfig(path=str(path), id_field="id")
        texts = [d["text"] for d in docs]
        for round_ in range(args.repeats):
            loop_rates["embed"].append(args.docs / plain_embed(texts, embed_cfg(1, args.threads)))
            seconds, tokens = plain_lm(texts[: args.lm_docs], lm_cfg(1, args.threads))
            loop_rates["lm"].append(tokens / seconds)
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR", log_to_driver=False)
            from ray.data import DataContext

            DataContext.get_current().enable_progress_bars = False
            for actors, threads in pools:
                seconds, _, busy = pipeline_stage(path, "embed", embed_cfg(actors, threads), input_cfg)
                pipe_rates.setdefault(("embed", actors, threads), []).append((args.docs / seconds, busy))
                seconds, tokens, busy = pipeline_stage(lm_path, "lm", lm_cfg(actors, threads), input_cfg)
                pipe_rates.setdefault(("lm", actors, threads), []).append((tokens / seconds, busy))
            ray.shutdown()
            print(f"round {round_ + 1}/{args.repeats}: loop {loop_rates}, pipeline {pipe_rates}", flush=True)

    names = {
        "embed": ("embedding (MiniLM, 128 tok)", "docs/s"),
        "lm": ("LM entropy+loss (SmolLM2-135M, 64 tok)", "tokens/s"),
    }
    lines = [
        f"| stage | plain loop ({args.threads} threads) | pipeline pool | pipeline | actors busy | pipeline / loop, "
        f"median (min-max over {args.repeats} rounds) |  ({os.cpu_count()} cores)",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for (stage, actors, threads), measured in pipe_rates.items():
        name, unit = names[stage]
        rates, busy = np.array(measured).T
        ratios = rates / np.array(loop_rates[stage])
        lines.append(
            f"| {name} | {np.median(loop_rates[stage]):.1f} {unit} | {actors} actor(s) × {threads} thread(s) "
            f"| {np.median(rates):.1f} {unit} | {np.median(busy):.1%} | **{np.median(ratios):.3f}** "
            f"({ratios.min():.3f}-{ratios.max():.3f}) |"
        )
    emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
