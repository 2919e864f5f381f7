"""Cheap scores from one causal-LM forward pass: mean predictive entropy and mean token NLL.

For a text of tokens x_1..x_n (a BOS token x_0 prepended, so every text token is predicted):
    loss    = mean_t  -log p(x_t | x_<t)                      (perplexity = exp(loss))
    entropy = mean_t  H(p(. | x_<t)) = -sum_v p_v log p_v    over the same positions t = 1..n
    el2n_lm = mean_t  ‖p(. | x_<t) − onehot(x_t)‖₂           EL2N (Paul et al. 2021) for unlabelled text:
                                                           the next token is the label; 0..√2 per token
Texts longer than `max_tokens` (BOS included) are cut; `lm_tokens` and `lm_cut` say so.

Memory: the model's last hidden states [batch, tokens, hidden] are kept, and the LM head is applied to a
chunk of positions at a time, so the float32 logits (and their log-softmax) never exist for the whole
batch: a [batch, tokens, vocabulary] tensor is 6 GB at 64 × 512 tokens and SmolLM2's 49 k vocabulary.
A chunk holds about `chunk_bytes` of float32 logits whatever the batch, length and vocabulary. On a GPU
the weights are bf16 (raysel/models.py) and every statistic is computed and summed in float32.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from raysel.config import ScorerConfig
from raysel.models import load_causal_lm, pick_device, set_threads
from raysel.registry import register_scorer

CHUNK_BYTES = 64 * 2**20  # float32 logits per chunk of positions (a few such tensors are alive at once)


def pad_batch(seqs: list[list[int]], pad: int):
    """(input_ids, attention_mask) as [len(seqs), longest] long tensors, right-padded with `pad`."""
    import torch

    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return input_ids, mask


def chunk_positions(batch: int, vocab: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """How many positions of a batch fit `chunk_bytes` of float32 logits (at least one)."""
    return max(1, chunk_bytes // (4 * batch * vocab))


class TokenStats(NamedTuple):
    """Per sequence: mean entropy, mean NLL, mean EL2N (None unless asked for) and predicted-token count."""

    entropy: Any
    nll: Any
    el2n: Any
    tokens: Any


def chunked_stats(logits_at, input_ids, attention_mask, *, vocab: int, el2n: bool = False, chunk_bytes=CHUNK_BYTES):
    """TokenStats of a padded batch, from the logits of one chunk of positions at a time.

    Position t's logits predict token t+1; a position counts when token t+1 is real (mask 1).
    Args:
        logits_at: (start, stop) -> logits [B, stop - start, V] of positions start..stop-1.
        input_ids: long tensor [B, T].
        attention_mask: {0,1} tensor [B, T], right padding.
        vocab: V, to size the chunks.
        el2n: also compute the mean EL2N.
        chunk_bytes: float32 logits per chunk.
    """
    import torch

    b, t = input_ids.shape
    step = chunk_positions(b, vocab, chunk_bytes)
    zeros = torch.zeros(b, dtype=torch.float32, device=input_ids.device)
    ent_sum, nll_sum, el2n_sum = zeros.clone(), zeros.clone(), zeros.clone()
    for start in range(0, t - 1, step):
        stop = min(t - 1, start + step)
        logp = torch.log_softmax(logits_at(start, stop).float(), dim=-1)
        target = input_ids[:, start + 1 : stop + 1].unsqueeze(-1)
        mask = attention_mask[:, start + 1 : stop + 1].to(torch.float32)
        logp_y = logp.gather(-1, target).squeeze(-1)
        nll_sum += (-logp_y * mask).sum(-1)
        p = logp.exp()
        if el2n:
            # ‖p − e_y‖² = Σ p² − 2 p_y + 1: no one-hot tensor of the vocabulary's size.
            sq = (p * p).sum(-1) - 2 * logp_y.exp() + 1
            el2n_sum += (sq.clamp(min=0).sqrt() * mask).sum(-1)
        p.mul_(logp)  # in place: one chunk-sized tensor fewer at the peak
        ent_sum += (-p.sum(-1) * mask).sum(-1)
        del logp, p
    n = attention_mask[:, 1:].sum(-1)
    denom = n.clamp(min=1).to(torch.float32)
    nan = torch.full_like(denom, float("nan"))

    def mean(total):
        return torch.where(n > 0, total / denom, nan)

    return TokenStats(mean(ent_sum), mean(nll_sum), mean(el2n_sum) if el2n else None, n.long())


def token_stats(logits, input_ids, attention_mask, *, chunk_bytes: int = CHUNK_BYTES):
    """Per-sequence (mean entropy, mean NLL, number of predicted tokens) of a padded batch's logits [B, T, V]."""
    s = chunked_stats(
        lambda a, b: logits[:, a:b], input_ids, attention_mask, vocab=logits.shape[-1], chunk_bytes=chunk_bytes
    )
    return s.entropy, s.nll, s.tokens


def token_el2n(logits, input_ids, attention_mask, *, chunk_bytes: int = CHUNK_BYTES):
    """Per-sequence mean over predicted tokens of ‖softmax(logits_t) − onehot(x_{t+1})‖₂ (NaN with no token)."""
    return chunked_stats(
        lambda a, b: logits[:, a:b],
        input_ids,
        attention_mask,
        vocab=logits.shape[-1],
        el2n=True,
        chunk_bytes=chunk_bytes,
    ).el2n


def split_head(model: Any) -> tuple[Any, Any] | None:
    """(body, head) with model(x).logits == head(body(x).last_hidden_state), or None for a model whose logits
    are rescaled or capped after the head (those run whole: correct, but without the memory saving)."""
    head = model.get_output_embeddings()
    body = getattr(model, getattr(model, "base_model_prefix", ""), None)
    cfg = model.config
    rescaled = any(
        getattr(cfg, k, None) not in (None, 1, 1.0)
        for k in ("final_logit_softcapping", "logit_scale", "logits_scaling")
    )
    if head is None or body is None or body is model or rescaled:
        return None
    return body, head


def lm_stats(model: Any, input_ids, attention_mask, *, el2n: bool = False, chunk_bytes: int = CHUNK_BYTES):
    """TokenStats of a padded batch under a causal LM, its LM head applied chunk by chunk (call under no_grad)."""
    parts = split_head(model)
    vocab = model.config.vocab_size
    if parts is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return chunked_stats(
            lambda a, b: logits[:, a:b],
            input_ids,
            attention_mask,
            vocab=logits.shape[-1],
            el2n=el2n,
            chunk_bytes=chunk_bytes,
        )
    body, head = parts
    hidden = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    return chunked_stats(
        lambda a, b: head(hidden[:, a:b]), input_ids, attention_mask, vocab=vocab, el2n=el2n, chunk_bytes=chunk_bytes
    )


@register_scorer("entropy", "loss", "el2n_lm")
class CausalLMScorer:
    """Adds `entropy`, `loss` and/or `el2n_lm` (see the module docstring), plus `lm_tokens` and `lm_cut`.

    Reads `text` and `reason`; rows with a reason are skipped (NaN scores).

    Example:
        >>> scorer = CausalLMScorer(ScorerConfig(name="loss"), outputs=("loss",))   # doctest: +SKIP
        >>> scorer({"text": np.array(["The cat sat."], dtype=object), "reason": np.array([""], dtype=object)})
    """

    def __init__(self, config: ScorerConfig, outputs: tuple[str, ...], prepared: dict | None = None) -> None:
        self.config = config
        self.outputs = outputs
        set_threads(config.threads or max(1, round(config.resources.cpus)))
        self.device = pick_device(config.device)
        self.model, self.tokenizer = load_causal_lm(config.model, device=self.device)
        tok = self.tokenizer
        self.prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else (self.prefix or 0)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["text"])
        entropy = np.full(n, np.nan, dtype=np.float32)
        loss = np.full(n, np.nan, dtype=np.float32)
        el2n = np.full(n, np.nan, dtype=np.float32)
        tokens = np.zeros(n, dtype=np.int32)
        cut = np.zeros(n, dtype=bool)
        usable = np.flatnonzero(batch["reason"] == "")
        if len(usable):
            limit = self.config.max_tokens - (self.prefix is not None)
            encoded = self.tokenizer([batch["text"][i] for i in usable], add_special_tokens=False, truncation=False)[
                "input_ids"
            ]
            ids = [([self.prefix] if self.prefix is not None else []) + e[:limit] for e in encoded]
            cut[usable] = [len(e) > limit for e in encoded]
            order = np.argsort([len(x) for x in ids], kind="stable")  # similar lengths together: less padding
            for start in range(0, len(order), self.config.batch_size):
                chunk = order[start : start + self.config.batch_size]
                ent, nll, count, el = self._forward([ids[j] for j in chunk])
                rows = usable[chunk]
                entropy[rows], loss[rows], tokens[rows] = ent, nll, count
                if el is not None:
                    el2n[rows] = el
        out = dict(batch)
        if "entropy" in self.outputs:
            out["entropy"] = entropy
        if "loss" in self.outputs:
            out["loss"] = loss
        if "el2n_lm" in self.outputs:
            out["el2n_lm"] = el2n
        out["lm_tokens"], out["lm_cut"] = tokens, cut
        return out

    def _forward(self, seqs: list[list[int]]):
        import torch

        input_ids, mask = pad_batch(seqs, self.pad)
        with torch.inference_mode():
            s = lm_stats(self.model, input_ids.to(self.device), mask.to(self.device), el2n="el2n_lm" in self.outputs)
        el = s.el2n.cpu().numpy() if s.el2n is not None else None
        return s.entropy.cpu().numpy(), s.nll.cpu().numpy(), s.tokens.cpu().numpy(), el
