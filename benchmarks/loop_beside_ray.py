"""Does a Ray cluster that is up but idle slow the plain loop? The loop of benchmarks/throughput.py, without Ray
and then with a local Ray cluster started beside it (same process, same texts).

    .venv/bin/python benchmarks/loop_beside_ray.py [--docs 1200] [--lm-docs 400] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=1200)
    parser.add_argument("--lm-docs", type=int, default=400)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()

    import throughput as tp
    import torch

    torch.set_num_threads(args.threads)
    texts = [d["text"] for d in tp.corpus(args.docs, 2000)]
    embed, lm = tp.embed_cfg(1, args.threads), tp.lm_cfg(1, args.threads)

    def both(tag: str) -> None:
        embed_s = tp.plain_embed(texts, embed)
        lm_s, tokens = tp.plain_lm(texts[: args.lm_docs], lm)
        print(f"{tag}: embedding {args.docs / embed_s:.1f} docs/s, LM {tokens / lm_s:.1f} tokens/s", flush=True)

    both("no Ray")
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    both("an idle local Ray cluster beside it")


if __name__ == "__main__":
    main()
