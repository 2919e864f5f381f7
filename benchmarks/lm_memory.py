"""Peak memory of the LM scorers' statistics (NLL, entropy) on CPU, before and after chunking (issue 13 §5).

    .venv/bin/python benchmarks/lm_memory.py [--batch 8 --tokens 256] [--smollm2]

For each vocabulary (49,152 as SmolLM2's; 128,256 as a 1B Llama 3's) a tiny random Llama (hidden 64, 2
blocks, untied head) scores the same random batch two ways:
  before  the whole-batch formula raysel had: model(x).logits [B, T, V] fp32, its log-softmax, its exp
          and their product (tests/scorers/test_lm.py keeps it as the reference);
  after   raysel.scorers.lm.lm_stats: the last hidden states, the LM head on a chunk of positions at a time.
Peak memory is the process's peak resident set (VmHWM, reset through /proc/self/clear_refs before each
measurement) minus its resident set just before; the model and the batch are loaded before either.
`--smollm2` adds the real SmolLM2-135M (fp32 on CPU). The two results must agree to float tolerance.
Prints a JSON summary (and a Markdown table).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_bytes(fn):
    """(result, peak extra resident bytes while fn ran, seconds)."""
    import gc

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    before = _status("VmRSS")
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    return result, _status("VmHWM") - before, seconds


def old_stats(model, ids, mask):
    import torch

    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    m = mask[:, 1:].float()
    n = m.sum(-1).clamp(min=1)
    return (entropy * m).sum(-1) / n, (nll * m).sum(-1) / n


def tiny_llama(vocab: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


def measure(name: str, model, batch: int, tokens: int) -> dict:
    import torch

    from raysel.scorers.lm import CHUNK_BYTES, chunk_positions, lm_stats

    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, tokens), generator=g)
    mask = torch.ones(batch, tokens, dtype=torch.long)
    mask[batch // 2 :, tokens // 2 :] = 0  # half the rows half padded
    with torch.inference_mode():
        lm_stats(model, ids[:1, :8], mask[:1, :8])  # warm-up: lazy inits out of the measurement
        (old_ent, old_nll), old_peak, old_s = peak_bytes(lambda: old_stats(model, ids, mask))
        new, new_peak, new_s = peak_bytes(lambda: lm_stats(model, ids, mask))
    return {
        "model": name,
        "vocab": vocab,
        "batch": batch,
        "tokens": tokens,
        "one_logits_tensor_mb": round(4 * batch * tokens * vocab / 2**20, 1),
        "chunk_positions": chunk_positions(batch, vocab, CHUNK_BYTES),
        "before_peak_mb": round(old_peak / 2**20, 1),
        "after_peak_mb": round(new_peak / 2**20, 1),
        "before_s": round(old_s, 2),
        "after_s": round(new_s, 2),
        "max_abs_diff_nll": float((new.nll - old_nll).abs().max()),
        "max_abs_diff_entropy": float((new.entropy - old_ent).abs().max()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--smollm2", action="store_true", help="also the real SmolLM2-135M (49,152 tokens)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    rows = []
    for vocab in (49_152, 128_256):
        rows.append(measure(f"tiny random Llama, V={vocab}", tiny_llama(vocab), args.batch, args.tokens))
    if args.smollm2:
        from raysel.models import load_causal_lm

        model, _ = load_causal_lm("smollm2", device="cpu")
        rows.append(measure("SmolLM2-135M (fp32)", model, args.batch, args.tokens))
    print(json.dumps(rows, indent=2))
    print("\n| model | B × T | one [B,T,V] fp32 tensor | peak before | peak after | s before | s after | max |Δ nll| |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['batch']} × {r['tokens']} | {r['one_logits_tensor_mb']:,.0f} MB | "
            f"{r['before_peak_mb']:,.0f} MB | {r['after_peak_mb']:,.0f} MB | {r['before_s']} | {r['after_s']} | "
            f"{r['max_abs_diff_nll']:.1e} |"
        )


if __name__ == "__main__":
    main()
