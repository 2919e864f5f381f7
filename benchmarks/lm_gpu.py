"""Tokens/s and MFU of the LM scorers on one device, without Ray (issue 13 §5).

    .venv/bin/python benchmarks/lm_gpu.py [--model smollm2] [--texts 512 --max-tokens 512 --batch 32]
    .venv/bin/python benchmarks/lm_gpu.py --tiny --texts 8 --max-tokens 32 --batch 4     # a CPU smoke run

Runs the `loss`+`entropy` scorer (CausalLMScorer: one forward pass) and `lm_influence` (LMInfluenceScorer:
forward, then the backward pass of activations through the head and the last 2 blocks, LoGra projection) on
BBC articles, each through its scorer's `__call__` exactly as a Ray actor calls it. `device: auto`: on a GPU
the weights are bf16 and the statistics fp32 (raysel/models.py, raysel/scorers/lm.py).

Model FLOPs per predicted token (the usual 2·params rule, embeddings excluded, plus causal attention):
    forward     2 (N_blocks + N_head) + 2 · layers · T̄ · hidden           (T̄: the mean sequence length)
    influence   forward + 2 (N_head + N_chosen) + attention of the chosen blocks   (the δ pass; LoGra forms no
                weight gradient, so the other half of a usual backward is not done, and not counted)
MFU = model FLOPs/s over the device's peak dense bf16 FLOPs/s (known GPUs below, or --peak-tflops). On a CPU
MFU is only printed with --peak-tflops. `--tiny` uses a random 2-block Llama (hidden 64) with SmolLM2's
tokenizer, to check the script quickly. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}


def tiny_model(folder: Path) -> str:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from raysel.models import resolve_causal_lm

    tokenizer = AutoTokenizer.from_pretrained(resolve_causal_lm("smollm2"), local_files_only=True)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def flops_per_token(model, mean_len: float, chosen_blocks: int | None) -> float:
    """Model FLOPs per predicted token (see the module docstring); chosen_blocks None: forward only."""
    import torch

    from raysel.scorers.lm_influence import decoder_blocks

    cfg = model.config
    blocks = decoder_blocks(model)
    per_block = [sum(m.weight.numel() for m in b.modules() if isinstance(m, torch.nn.Linear)) for b in blocks]
    head = model.get_output_embeddings().weight.numel()
    attention = 2 * mean_len * cfg.hidden_size  # per layer: QKᵀ and AV over a causal context of T̄/2, 2 FLOPs each
    forward = 2 * (sum(per_block) + head) + len(blocks) * attention
    if chosen_blocks is None:
        return forward
    return forward + 2 * (head + sum(per_block[-chosen_blocks:])) + chosen_blocks * attention


def peak_flops(device: str, given: float | None) -> float | None:
    if given:
        return given * 1e12
    if device != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name()
    return next((v * 1e12 for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def timed(scorer, batch, device: str, repeats: int) -> float:
    """Median seconds of scorer(batch) over `repeats` runs (after one warm-up run)."""
    import statistics

    import torch

    scorer(batch)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        scorer(batch)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tiny", action="store_true", help="a random 2-block Llama (a quick check of the script)")
    ap.add_argument("--texts", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's peak dense FLOPs/s, in TFLOP/s")
    args = ap.parse_args()

    import numpy as np
    import torch

    from raysel.config import ScorerConfig
    from raysel.demo import bbc_articles
    from raysel.models import pick_device
    from raysel.scorers.lm import CausalLMScorer
    from raysel.scorers.lm_influence import LMInfluenceScorer

    device = pick_device(args.device)
    work = Path(tempfile.mkdtemp(prefix="raysel-lm-gpu-"))
    model = tiny_model(work / "tiny") if args.tiny else args.model
    articles = bbc_articles()
    texts = [a["text"] for a in articles[: args.texts]]
    target = work / "target.jsonl"
    target.write_text("".join(json.dumps({"text": a["text"]}) + "\n" for a in articles if a["topic"] == "business"))
    batch = {"text": np.array(texts, dtype=object), "reason": np.array([""] * len(texts), dtype=object)}
    common = {"model": model, "max_tokens": args.max_tokens, "batch_size": args.batch, "device": device}

    lm = CausalLMScorer(ScorerConfig(name="loss", **common), outputs=("loss", "entropy"))
    tokens = int(lm(batch)["lm_tokens"].sum())
    mean_len = tokens / len(texts) + 1
    peak = peak_flops(device, args.peak_tflops)
    influence_cfg = ScorerConfig(name="lm_influence", params={"target": str(target)}, **common)
    influence = LMInfluenceScorer(influence_cfg, outputs=("lm_influence",))
    chosen = len(influence.gradients.block_indices)
    out = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "dtype": str(next(lm.model.parameters()).dtype),
        "model": model if not args.tiny else "tiny random Llama (hidden 64, 2 blocks)",
        "texts": len(texts),
        "predicted_tokens": tokens,
        "max_tokens": args.max_tokens,
        "batch": args.batch,
        "peak_tflops": None if peak is None else peak / 1e12,
    }
    for name, scorer, blocks in (("loss_entropy", lm, None), ("lm_influence", influence, chosen)):
        seconds = timed(scorer, batch, device, args.repeats)
        flops = flops_per_token(scorer.model if blocks is None else scorer.gradients.model, mean_len, blocks)
        out[name] = {
            "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1),
            "gflops_per_token": round(flops / 1e9, 4),
            "mfu": None if peak is None else round(tokens / seconds * flops / peak, 4),
        }
        if device == "cuda":
            out[name]["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            torch.cuda.reset_peak_memory_stats()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
