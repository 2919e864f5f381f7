"""AUM, the area under the margin (Pleiss et al. 2020, arXiv 2001.10528): a label-noise score.

The margin of a labelled example (x, y) after training epoch t is the assigned label's logit minus the
largest other logit, M_t(x, y) = z_y(t) − max_{i≠y} z_i(t); the paper's AUM is its mean over the epochs,
and a mislabelled example has a low (negative) AUM: the network keeps preferring the class the example
looks like to the one it is labelled with, until it memorizes it late in training.

raysel's `aum` column is the paper's AUM **negated**, so that, like `el2n`, higher means more likely
mislabelled (what a `drop_noisy` step or a policy's β pruning removes first):

    aum(x, y) = mean over replicates r, epochs t = 1..E of ( max_{i≠y} z_i^{r,t}(x) − z_y^{r,t}(x) )

where z^{r,t} is replicate r of the proxy classifier (raysel/proxy.py) after epoch t: the training
dynamics come from the checkpoints the proxy keeps after every epoch (the paper records the margin each
time the example is seen in a batch; an epoch's end is the same within one epoch's updates). Rows the
proxy did not train on (outside its sample) get the same measurement from the same checkpoints.
Quarantined rows and labels the proxy does not know are NaN.
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


def negative_margin(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """max_{i≠y} z_i − z_y per row, for logits z [N, C] and class indices y [N] (float64)."""
    z = np.asarray(z, dtype=np.float64)
    rows = np.arange(len(y))
    assigned = z[rows, y]
    others = z.copy()
    others[rows, y] = -np.inf
    return others.max(axis=1) - assigned


@register_scorer("aum")
class AUMScorer:
    """Adds `aum` (minus the area under the margin; higher = more likely mislabelled) from each row's embedding
    and label. NaN where `reason` is set or the label is unknown.

    Reads `embedding`, `label` and `reason` (the scored shards, `inputs = "scored"`).

    Example:
        >>> cfg = ScorerConfig(name="aum", params={"replicates": 1})                     # doctest: +SKIP
        >>> scorer = AUMScorer(cfg, ("aum",), AUMScorer.prepare(cfg, context))
        >>> scorer({"embedding": emb, "label": labels, "reason": reasons})["aum"]       # high: likely mislabelled
    """

    inputs = "scored"

    class Params(BaseModel):
        model_config = ConfigDict(frozen=True, extra="forbid")

        proxy: ProxySettings = ProxySettings()
        replicates: int = Field(1, ge=1, description="proxy runs averaged (the paper trains one network)")
        epochs: int | None = Field(
            None, ge=1, description="average the margins of epochs 1..epochs (default: every epoch of the proxy)"
        )

        @field_validator("epochs")
        @classmethod
        def _epochs_exist(cls, epochs: int | None, info: ValidationInfo) -> int | None:
            proxy = info.data.get("proxy")
            if epochs is not None and proxy is not None and epochs > proxy.epochs:
                raise ValueError(f"{epochs} epochs is more than the proxy trains: proxy.epochs is {proxy.epochs}")
            return epochs

    @classmethod
    def needs_labels(cls, config: ScorerConfig) -> bool:
        """Whether this scorer, so configured, needs `input.label_field` (for a config-load cross-check)."""
        return True

    @classmethod
    def prepare(cls, config: ScorerConfig, context) -> dict:
        """Train (or load) the proxy's replicates and hand each actor the checkpoints it averages over."""
        params = config.typed_params()
        require_labels(context, config.name)
        return cls.prepared_from(proxy_runs(context, params.proxy, params.replicates), params)

    @staticmethod
    def prepared_from(runs: list, params: AUMScorer.Params) -> dict:
        """What actors need, from trained proxy runs: per replicate, its checkpoints after epochs 1..epochs.

        Args:
            runs: ProxyRun replicates (raysel.proxy.train_proxy).
            params: the scorer's settings (`epochs` bounds the checkpoints averaged).
        """
        last = params.epochs or len(runs[0].checkpoints)
        return {"labels": runs[0].labels, "checkpoints": [ck for run in runs for ck in run.checkpoints[:last]]}

    def __init__(self, config: ScorerConfig, outputs: tuple[str, ...], prepared: dict | None = None) -> None:
        self.config = config
        self.outputs = outputs
        self.device, self.labels, self.checkpoints = load_proxy_params(config, prepared, "checkpoints", "AUMScorer")

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
                for params in self.checkpoints:
                    total += negative_margin(logits(params, x).cpu().numpy(), y)
            score[rows] = total / len(self.checkpoints)
        out = dict(batch)
        out["aum"] = score
        return out
