"""The `lm` downstream of `raysel eval`: a small causal LM trained from scratch on each selection.

Every arm trains the same model for the same number of tokens, so arms compare at equal compute:
    tokenizer  a byte-level BPE (`tokenizers`), trained once on a seeded sample of the train split and
               cached in the work dir (every arm shares it, so losses are in the same units);
    model      a Llama (transformers' LlamaConfig) of `layers` blocks of width `hidden`, tied embeddings,
               seeded initialisation;
    data       the selection's texts, each followed by the end-of-text token, shuffled (seeded) and
               packed into rows of `seq_len` tokens; the selection is repeated, reshuffled, when it has
               fewer than `tokens` tokens, and cut when it has more;
    training   AdamW (β 0.9/0.95, weight decay 0.1), linear warm-up then cosine decay to 10 %, gradient
               clipping at 1, `tokens` / (`batch_size` × `seq_len`) steps.
Measured after training, in nats per predicted token (token-weighted over texts; each text prefixed by
the end-of-text token, as it follows one in training, and cut to `seq_len` tokens):
    target_loss   on the target texts (`target`: the file of texts the selection should help);
    holdout_loss  on the eval's test split, a held-out sample of the pool;
and tokens_per_s of training.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from raysel.errors import InputError

EOS, PAD = "<|endoftext|>", "<pad>"


class LMDownstream(BaseModel):
    """`downstream.lm`: the small LM trained on each selection (see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    target: str | None = Field(None, description="file of target texts (JSONL / Parquet `target_field`, or lines)")
    target_field: str = "text"
    tokens: int = Field(200_000, ge=1, description="training tokens per arm, whatever the selection's size")
    seq_len: int = Field(128, ge=8, description="tokens per training row (and per measured text)")
    batch_size: int = Field(16, ge=1)
    hidden: int = Field(128, ge=8)
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    lr: float = Field(2e-3, gt=0)
    warmup: float = Field(0.05, ge=0, lt=1, description="share of the steps spent warming up")
    vocab_size: int = Field(4096, ge=300, description="BPE vocabulary (256 bytes + merges + 2 specials)")
    tokenizer_rows: int = Field(2000, ge=10, description="train-split rows sampled to train the tokenizer")
    eval_rows: int | None = Field(1000, ge=1, description="at most this many target / holdout texts (seeded)")
    threads: int | None = Field(None, ge=1, description="torch threads (default: torch's own)")


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """A byte-level BPE trained on `texts` (deterministic for the same texts and size)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def cached_tokenizer(texts: list[str], vocab_size: int, folder: Path) -> Any:
    """`train_tokenizer`, once per sample and size: kept in `folder` as lm-tokenizer-<hash>.json."""
    from tokenizers import Tokenizer

    digest = hashlib.sha256(json.dumps([vocab_size, texts]).encode()).hexdigest()[:16]
    path = folder / f"lm-tokenizer-{digest}.json"
    if path.exists():
        return Tokenizer.from_file(str(path))
    tok = train_tokenizer(texts, vocab_size)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    tok.save(str(tmp))
    tmp.rename(path)
    return tok


def _sample(texts: list[str], n: int | None, seed: int) -> list[str]:
    if n is None or len(texts) <= n:
        return list(texts)
    keep = np.sort(np.random.default_rng(seed).choice(len(texts), n, replace=False))
    return [texts[i] for i in keep]


class SmallLM:
    """Trains and measures the small LM for one eval: the tokenizer and the measured texts are fixed here.

    Args:
        config: the `downstream.lm` settings.
        pool_texts: the train split's texts (the tokenizer's sample is drawn from them).
        target_texts: the target set.
        holdout_texts: the held-out sample of the pool.
        cache: folder for the tokenizer.

    Example:
        >>> lm = SmallLM(LMDownstream(tokens=20_000), pool, target, holdout, Path("work"))   # doctest: +SKIP
        >>> lm.measure(lm.train(selected_texts, seed=0))   # {"target_loss": ..., "holdout_loss": ..., ...}
    """

    def __init__(
        self,
        config: LMDownstream,
        pool_texts: list[str],
        target_texts: list[str],
        holdout_texts: list[str],
        cache: Path,
    ) -> None:
        self.config = config
        self.tokenizer = cached_tokenizer(_sample(pool_texts, config.tokenizer_rows, 0), config.vocab_size, cache)
        self.eos, self.pad = self.tokenizer.token_to_id(EOS), self.tokenizer.token_to_id(PAD)
        self.target = self._eval_ids(_sample(target_texts, config.eval_rows, 1))
        self.holdout = self._eval_ids(_sample(holdout_texts, config.eval_rows, 2))

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def _eval_ids(self, texts: list[str]) -> list[list[int]]:
        seqs = [[self.eos, *ids][: self.config.seq_len] for ids in self.encode(texts)]
        return [s for s in seqs if len(s) > 1]

    def new_model(self, seed: int) -> Any:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        c = self.config
        torch.manual_seed(seed)
        cfg = LlamaConfig(
            vocab_size=self.tokenizer.get_vocab_size(),
            hidden_size=c.hidden,
            intermediate_size=4 * c.hidden,
            num_hidden_layers=c.layers,
            num_attention_heads=c.heads,
            num_key_value_heads=c.heads,
            max_position_embeddings=c.seq_len,
            tie_word_embeddings=True,
            bos_token_id=self.eos,
            eos_token_id=self.eos,
            pad_token_id=self.pad,
        )
        return LlamaForCausalLM(cfg)

    def packed_rows(self, texts: list[str], seed: int) -> np.ndarray:
        """[steps × batch_size, seq_len] token ids: the texts shuffled, packed, repeated to the token budget."""
        c = self.config
        docs = [np.array([*ids, self.eos], dtype=np.int64) for ids in self.encode(texts) if ids]
        if not docs:
            raise InputError("downstream lm: the selection has no text with a token to train on")
        steps = max(1, math.ceil(c.tokens / (c.batch_size * c.seq_len)))
        need = steps * c.batch_size * c.seq_len
        rng = np.random.default_rng(seed)
        parts, have = [], 0
        while have < need:  # one shuffled pass over the selection after another
            for i in rng.permutation(len(docs)):
                parts.append(docs[i])
                have += len(docs[i])
                if have >= need:
                    break
        return np.concatenate(parts)[:need].reshape(steps * c.batch_size, c.seq_len)

    def train(self, texts: list[str], seed: int, *, model: Any = None) -> tuple[Any, dict[str, float]]:
        """(trained model, {train_tokens, steps, train_seconds, tokens_per_s}); a given `model` is trained further."""
        import torch

        c = self.config
        if c.threads:
            torch.set_num_threads(c.threads)
        rows = torch.from_numpy(self.packed_rows(texts, seed))
        model = model if model is not None else self.new_model(seed)
        model.train()
        steps = len(rows) // c.batch_size
        warm = max(1, int(c.warmup * steps))

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

        optimizer = torch.optim.AdamW(model.parameters(), lr=c.lr, betas=(0.9, 0.95), weight_decay=0.1)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        start = time.perf_counter()
        for step in range(steps):
            batch = rows[step * c.batch_size : (step + 1) * c.batch_size]
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
        seconds = time.perf_counter() - start
        model.eval()
        tokens = int(rows.numel())
        return model, {
            "train_tokens": tokens,
            "steps": steps,
            "train_seconds": seconds,
            "tokens_per_s": tokens / seconds,
        }

    def loss_on(self, model: Any, seqs: list[list[int]], batch_size: int = 32) -> float:
        """Mean next-token NLL (nats) over every predicted token of `seqs`."""
        import torch

        from raysel.scorers.lm import lm_stats, pad_batch

        total, count = 0.0, 0
        order = np.argsort([len(s) for s in seqs], kind="stable")
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                ids, mask = pad_batch([seqs[j] for j in order[start : start + batch_size]], self.pad)
                s = lm_stats(model, ids, mask)
                total += float((s.nll.double() * s.tokens).sum())
                count += int(s.tokens.sum())
        return total / max(count, 1)

    def measure(self, model: Any) -> dict[str, float]:
        return {"target_loss": self.loss_on(model, self.target), "holdout_loss": self.loss_on(model, self.holdout)}

    def train_and_measure(self, texts: list[str], seed: int) -> dict[str, float]:
        """{target_loss, holdout_loss, tokens_per_s, train_tokens, steps, train_seconds} of one selection."""
        model, stats = self.train(texts, seed)
        return self.measure(model) | stats

    def save(self, model: Any, folder: str | Path) -> str:
        """A local model folder any raysel LM scorer loads (`model: FOLDER`): the end-of-text token is its BOS."""
        from transformers import PreTrainedTokenizerFast

        fast = PreTrainedTokenizerFast(tokenizer_object=self.tokenizer, bos_token=EOS, eos_token=EOS, pad_token=PAD)
        model.save_pretrained(folder)
        fast.save_pretrained(folder)
        return str(folder)
