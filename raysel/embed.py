"""The embedding stage: mean-pooled, L2-normalized sentence embeddings from an encoder."""

from __future__ import annotations

import numpy as np

from raysel.config import EmbedConfig
from raysel.models import load_encoder, set_threads


class Embedder:
    """Adds `embedding` (float32 [N, dim], zeros for quarantined rows) and `embed_cut` (text cut at max_tokens).

    Reads `text` and `reason`. Texts are sorted by length inside the batch (sentence-transformers'
    `encode` does this) so that padding stays small; hand it batches several times `batch_size`.

    Example:
        >>> embedder = Embedder(EmbedConfig())                                   # doctest: +SKIP
        >>> embedder({"text": np.array(["hello"], dtype=object), "reason": np.array([""], dtype=object)})
    """

    def __init__(self, config: EmbedConfig) -> None:
        self.config = config
        set_threads(config.threads or max(1, round(config.resources.cpus)))
        self.model = load_encoder(config.model, device=config.device, max_tokens=config.max_tokens)
        self.dim = (
            self.model.get_embedding_dimension()
            if hasattr(self.model, "get_embedding_dimension")
            else (self.model.get_sentence_embedding_dimension())
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["text"])
        embedding = np.zeros((n, self.dim), dtype=np.float32)
        cut = np.zeros(n, dtype=bool)
        usable = np.flatnonzero(batch["reason"] == "")
        if len(usable):
            texts = [batch["text"][i] for i in usable]
            embedding[usable] = self.model.encode(
                texts,
                batch_size=self.config.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
            limit = self.config.max_tokens
            lengths = self.model.tokenizer(texts, add_special_tokens=True, truncation=True, max_length=limit + 1)[
                "input_ids"
            ]
            cut[usable] = [len(ids) > self.config.max_tokens for ids in lengths]
        out = dict(batch)
        out["embedding"], out["embed_cut"] = embedding, cut
        return out
