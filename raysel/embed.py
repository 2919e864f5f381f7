"""The embedding stage: mean-pooled, L2-normalized sentence embeddings from an encoder."""

from __future__ import annotations

import numpy as np

from raysel.config import EmbedConfig
from raysel.models import load_encoder, set_threads


class Embedder:
    """Adds `embedding` (float32 [N, dim], zeros for quarantined rows) and `embed_cut` (text cut at max_tokens).

    Reads `text` and `reason`. Texts are sorted by length inside the batch (sentence-transformers'
    `encode` does this) so that padding stays small; hand it batches several times `batch_size`.

    Each text is tokenized once, one token past `max_tokens`: a row that fills that width was cut, and
    it is shortened to what truncating at `max_tokens` gives before the forward pass. The embeddings
    equal sentence-transformers' `encode` at `max_tokens`, without its second tokenization for the flag.

    Example:
        >>> embedder = Embedder(EmbedConfig())                                   # doctest: +SKIP
        >>> embedder({"text": np.array(["hello"], dtype=object), "reason": np.array([""], dtype=object)})
    """

    def __init__(self, config: EmbedConfig) -> None:
        self.config = config
        set_threads(config.threads or max(1, round(config.resources.cpus)))
        self.model = load_encoder(config.model, device=config.device, max_tokens=config.max_tokens + 1)
        self.dim = (
            self.model.get_embedding_dimension()
            if hasattr(self.model, "get_embedding_dimension")
            else (self.model.get_sentence_embedding_dimension())
        )
        # sentence-transformers 6 names it `preprocess`; before 6, `tokenize`
        self._preprocess = getattr(self.model, "preprocess", None) or self.model.tokenize
        self._tail = _special_tokens_after_text(self.model.tokenizer)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["text"])
        embedding = np.zeros((n, self.dim), dtype=np.float32)
        cut = np.zeros(n, dtype=bool)
        usable = np.flatnonzero(batch["reason"] == "")
        if len(usable):
            embedding[usable], cut[usable] = self._encode([batch["text"][i] for i in usable])
        out = dict(batch)
        out["embedding"], out["embed_cut"] = embedding, cut
        return out

    def _encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        import torch

        limit, keep = self.config.max_tokens, self.config.max_tokens - self._tail
        embedding = np.empty((len(texts), self.dim), dtype=np.float32)
        cut = np.zeros(len(texts), dtype=bool)
        order = np.argsort([-len(t) for t in texts], kind="stable")
        for start in range(0, len(texts), self.config.batch_size):
            rows = order[start : start + self.config.batch_size]
            features = self._preprocess([texts[i] for i in rows])
            long = features["attention_mask"].sum(dim=1) > limit
            if long.any():  # drop the last text token, keep the trailing special tokens: truncation at `limit`
                for key, value in features.items():
                    if isinstance(value, torch.Tensor) and value.dim() == 2:
                        value[long, keep:limit] = value[long, keep + 1 : limit + 1]
                        features[key] = value[:, :limit]
            features = {k: v.to(self.model.device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}
            with torch.inference_mode():
                pooled = self.model(features)["sentence_embedding"]
            embedding[rows] = torch.nn.functional.normalize(pooled.float(), dim=-1).cpu().numpy()
            cut[rows] = long.cpu().numpy()
        return embedding, cut


def _special_tokens_after_text(tokenizer) -> int:
    """How many special tokens the tokenizer appends after the text ([SEP] for BERT: 1)."""
    probe = "hello world"
    with_special = tokenizer(probe)["input_ids"]
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(bare) + 1):
        if with_special[start : start + len(bare)] == bare:
            return len(with_special) - start - len(bare)
    return 0
