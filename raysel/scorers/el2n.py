"""EL2N (Paul, Ganguli & Dziugaite 2021, "Deep Learning on a Data Diet"; also arXiv 2311.16302).

For a labelled example (x, y):
    el2n(x, y) = mean over replicates r of ‖softmax(f_r(x)) − onehot(y)‖₂
where f_r is replicate r of the proxy classifier (raysel/proxy.py: a different seed per replicate) after
`epoch` epochs: the paper scores early in training, averaging over several independent runs.
High EL2N: the model cannot fit the label (hard, atypical, or mislabelled); low: easy.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from raysel.config import ScorerConfig
from raysel.proxy import (
    ProxySettings,
    batch_embeddings,
    label_indices,
    load_proxy_params,
    logits,
    proxy_runs,
    require_labels,
    usable_rows,
)
from raysel.registry import register_scorer
from raysel.scorers._grad import el2n


@register_scorer("el2n")
class EL2NScorer:
    """Adds `el2n` from the embedding and label of each row. NaN where `reason` is set or the label is unknown.

    Reads `embedding`, `label` and `reason` (the scored shards, `inputs = "scored"`).

    Example:
        >>> cfg = ScorerConfig(name="el2n")                                       # doctest: +SKIP
        >>> scorer = EL2NScorer(cfg, ("el2n",), EL2NScorer.prepare(cfg, context))
        >>> scorer({"embedding": emb, "label": labels, "reason": reasons})["el2n"]
    """

    inputs = "scored"

    class Params(BaseModel):
        model_config = ConfigDict(frozen=True, extra="forbid")

        proxy: ProxySettings = ProxySettings()
        replicates: int = Field(5, ge=1, description="independent proxy runs averaged (the paper averages 5-10)")
        epoch: int = Field(2, ge=1, description="score with the checkpoint after this many epochs (early training)")

        @field_validator("epoch")
        @classmethod
        def _epoch_exists(cls, epoch: int, info: ValidationInfo) -> int:
            proxy = info.data.get("proxy")
            if proxy is not None and epoch > proxy.epochs:
                raise ValueError(f"epoch {epoch} is after the last one: proxy.epochs is {proxy.epochs}")
            return epoch

    @classmethod
    def needs_labels(cls, config: ScorerConfig) -> bool:
        """Whether this scorer, so configured, needs `input.label_field` (for a config-load cross-check)."""
        return True

    @classmethod
    def prepare(cls, config: ScorerConfig, context) -> dict:
        """Train (or load) the proxy's replicates and hand each actor the checkpoint it scores with."""
        params = config.typed_params()
        require_labels(context, config.name)
        return cls.prepared_from(proxy_runs(context, params.proxy, params.replicates), params)

    @staticmethod
    def prepared_from(runs: list, params: EL2NScorer.Params) -> dict:
        """What actors need, from trained proxy runs (one per replicate).

        Args:
            runs: ProxyRun replicates (raysel.proxy.train_proxy).
            params: the scorer's settings (`epoch` picks the checkpoint).
        """
        return {
            "labels": runs[0].labels,
            "replicates": [run.checkpoints[params.epoch - 1] for run in runs],
            "holdout_accuracy": [run.holdout_accuracy for run in runs],
        }

    def __init__(self, config: ScorerConfig, outputs: tuple[str, ...], prepared: dict | None = None) -> None:
        self.config = config
        self.outputs = outputs
        self.device, self.labels, self.models = load_proxy_params(config, prepared, "replicates", "EL2NScorer")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        n = len(batch["embedding"])
        score = np.full(n, np.nan, dtype=np.float32)
        rows = usable_rows(batch)
        y = label_indices(batch, rows, self.labels)
        rows, y = rows[y >= 0], y[y >= 0]
        if len(rows):
            x = torch.as_tensor(batch_embeddings(batch, rows), device=self.device)
            total = np.zeros(len(rows))
            with torch.no_grad():
                for params in self.models:
                    probs = torch.softmax(logits(params, x), dim=-1).double().cpu().numpy()
                    total += el2n(probs, y)
            score[rows] = total / len(self.models)
        out = dict(batch)
        out["el2n"] = score
        return out
