"""raysel's Embedder called in-process vs sentence-transformers' `encode` on the same texts and threads.

The Embedder also computes `embed_cut` (was the text cut at max_tokens?) from the one tokenization it
runs; `encode` computes embeddings only. Rounds alternate the two, after a warm-up call each.

    .venv/bin/python benchmarks/embedder_vs_encode.py [--docs 600] [--threads 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=600)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import torch
    from throughput import corpus, embed_cfg

    from raysel.embed import Embedder
    from raysel.models import load_encoder

    torch.set_num_threads(args.threads)
    texts = [d["text"] for d in corpus(args.docs, 2000)]
    cfg = embed_cfg(1, args.threads)
    encoder, embedder = load_encoder(cfg.model, max_tokens=cfg.max_tokens), Embedder(cfg)
    batch = {"text": np.array(texts, dtype=object), "reason": np.array([""] * len(texts), dtype=object)}
    encoder.encode(texts[:8])
    embedder({k: v[:8] for k, v in batch.items()})
    ratios = []
    for round_ in range(args.rounds):
        start = time.perf_counter()
        encoder.encode(texts, batch_size=cfg.batch_size, normalize_embeddings=True, show_progress_bar=False)
        encode_s = time.perf_counter() - start
        start = time.perf_counter()
        embedder(batch)
        embedder_s = time.perf_counter() - start
        ratios.append(encode_s / embedder_s)
        print(
            f"round {round_ + 1}: encode {args.docs / encode_s:.1f} docs/s, Embedder {args.docs / embedder_s:.1f} "
            f"docs/s, Embedder / encode {encode_s / embedder_s:.3f}",
            flush=True,
        )
    print(
        f"Embedder / encode over {args.rounds} rounds: median {np.median(ratios):.3f}, "
        f"min {min(ratios):.3f}, max {max(ratios):.3f}"
    )


if __name__ == "__main__":
    main()
