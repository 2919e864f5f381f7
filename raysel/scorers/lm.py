"""Cheap scores from one causal-LM forward pass: mean predictive entropy and mean token NLL.

For a text of tokens x_1..x_n (a BOS token x_0 prepended, so every text token is predicted):
    loss    = mean_t  -log p(x_t | x_<t)                      (perplexity = exp(loss))
    entropy = mean_t  H(p(. | x_<t)) = -sum_v p_v log p_v    over the same positions t = 1..n
    el2n_lm = mean_t  ‖p(. | x_<t) − onehot(x_t)‖₂           EL2N (Paul et al. 2021) for unlabelled text:
                                                           the next token is the label; 0..√2 per token
Texts longer than `max_tokens` (BOS included) are cut; `lm_tokens` and `lm_cut` say so.
"""

from __future__ import annotations

import numpy as np

from raysel.config import ScorerConfig
from raysel.models import load_causal_lm, pick_device, set_threads
from raysel.registry import register_scorer


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


def token_stats(logits, input_ids, attention_mask):
    """Per-sequence (mean entropy, mean NLL, number of predicted tokens) of a padded batch.

    Position t's logits predict token t+1; a position counts when token t+1 is real (mask 1).
    Args:
        logits: float tensor [B, T, V].
        input_ids: long tensor [B, T].
        attention_mask: {0,1} tensor [B, T], right padding.
    """
    import torch

    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    target = input_ids[:, 1:]
    mask = attention_mask[:, 1:].to(logp.dtype)
    nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    n = mask.sum(-1)
    denom = n.clamp(min=1)
    mean_entropy = (entropy * mask).sum(-1) / denom
    mean_nll = (nll * mask).sum(-1) / denom
    nan = torch.full_like(mean_nll, float("nan"))
    return torch.where(n > 0, mean_entropy, nan), torch.where(n > 0, mean_nll, nan), n.long()


def token_el2n(logits, input_ids, attention_mask):
    """Per-sequence mean over predicted tokens of ‖softmax(logits_t) − onehot(x_{t+1})‖₂ (NaN with no token).

    Args:
        logits: float tensor [B, T, V].
        input_ids: long tensor [B, T].
        attention_mask: {0,1} tensor [B, T], right padding.
    """
    import torch

    p = torch.softmax(logits[:, :-1].float(), dim=-1)
    target = input_ids[:, 1:]
    mask = attention_mask[:, 1:].to(p.dtype)
    # ‖p − e_y‖² = Σ p² − 2 p_y + 1: no one-hot tensor of the vocabulary's size.
    sq = (p * p).sum(-1) - 2 * p.gather(-1, target.unsqueeze(-1)).squeeze(-1) + 1
    per_token = sq.clamp(min=0).sqrt()
    n = mask.sum(-1)
    mean = (per_token * mask).sum(-1) / n.clamp(min=1)
    return torch.where(n > 0, mean, torch.full_like(mean, float("nan")))


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
            logits = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)).logits
            ids_dev, mask_dev = input_ids.to(self.device), mask.to(self.device)
            ent, nll, n = token_stats(logits, ids_dev, mask_dev)
            el = token_el2n(logits, ids_dev, mask_dev).cpu().numpy() if "el2n_lm" in self.outputs else None
        return ent.float().cpu().numpy(), nll.float().cpu().numpy(), n.cpu().numpy(), el
