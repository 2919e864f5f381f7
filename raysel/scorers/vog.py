"""Variance of Gradients (Agarwal, D'souza & Hooker, CVPR 2022; stress-tested in arXiv 2311.16298).

For a labelled example (x, y) and K checkpoints θ_1..θ_K of the proxy classifier's training run:
    S_k   = ∂ logit_y(x; θ_k) / ∂x               the input gradient of the true-class logit (x: the embedding)
    V_p   = sqrt(1/K Σ_k (S_k,p − mean_k S_k,p)²)  per embedding dimension p (the paper's eq. 2)
    raw   = mean_p V_p                             (`vog_raw`)
    vog   = (raw − μ_y) / σ_y                      z-scored within the class y (`vog`)
The input is the sentence embedding, so there is no average over tokens: one vector per example.
The class mean and standard deviation μ_y, σ_y come from the proxy's training sample (the same for every
batch and actor, so a score does not depend on which rows it was batched with).
High VoG: the model's explanation of the example keeps changing during training (hard, atypical,
mislabelled). With `proxy.hidden: 0` the input gradient is the row W_y for every example of a class and
VoG carries no information, so VoG asks for a hidden layer.

`of` picks the true-class output differentiated: `logit` (default, the paper's definition), `log_prob`
(log softmax_y) or `prob` (softmax_y). On a head over frozen embeddings the logit's input gradient,
W1ᵀ·diag(relu'(W1 x + b1))·W2[y], differs between the examples of a class only through their ReLU
pattern, so its variance across checkpoints mostly tracks how the whole class's weights move; the
log-probability's gradient also carries the example's own predicted distribution. See
benchmarks/RESULTS.md (section 5) for what each finds on real data.
"""

from __future__ import annotations

import json
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from raysel.config import ScorerConfig
from raysel.io import fs as rfs
from raysel.proxy import (
    TRUE_CLASS_OUTPUTS,
    ProxySettings,
    batch_embeddings,
    label_indices,
    load_proxy_params,
    proxy_runs,
    require_labels,
    usable_rows,
)
from raysel.registry import register_scorer
from raysel.scorers._grad import class_stats, class_zscore, input_grads, vog_raw

# Rows per input-gradient pass: K × rows × D floats stay small whatever the sample size.
_CHUNK = 2048


def checkpoint_indices(n_checkpoints: int, wanted: int | None) -> list[int]:
    """`wanted` evenly spaced checkpoint indices, the last one always included (all of them for None)."""
    if wanted is None or wanted >= n_checkpoints:
        return list(range(n_checkpoints))
    return sorted({int(round(i)) for i in np.linspace(n_checkpoints - 1, 0, wanted)})


def raw_vog(checkpoints: list[dict], x, y, of: str = "logit", chunk: int = _CHUNK) -> np.ndarray:
    """VoG before class normalization for rows x [N, D] (torch) with class indices y [N] (torch long).

    Args:
        checkpoints: parameter dicts (torch tensors) at the K checkpoints.
        x: embeddings.
        y: class indices.
        of: the true-class output differentiated: "logit" (the paper), "log_prob" or "prob".
        chunk: rows per pass.
    """
    fn = TRUE_CLASS_OUTPUTS[of]
    out = np.empty(len(x))
    for s in range(0, len(x), chunk):
        grads = np.stack(
            [input_grads(fn, p, x[s : s + chunk], y[s : s + chunk]).double().cpu().numpy() for p in checkpoints]
        )
        out[s : s + chunk] = vog_raw(grads)
    return out


@register_scorer("vog")
class VoGScorer:
    """Adds `vog` (class-normalized) and `vog_raw`. NaN where `reason` is set or the label is unknown.

    Reads `embedding`, `label` and `reason` (the scored shards, `inputs = "scored"`).

    Example:
        >>> cfg = ScorerConfig(name="vog")                                        # doctest: +SKIP
        >>> scorer = VoGScorer(cfg, ("vog",), VoGScorer.prepare(cfg, context))
        >>> scorer({"embedding": emb, "label": labels, "reason": reasons})["vog"]
    """

    inputs = "scored"

    class Params(BaseModel):
        model_config = ConfigDict(frozen=True, extra="forbid")

        of: Literal["logit", "log_prob", "prob"] = Field(
            "logit", description="the true-class output whose input gradient is taken (the paper: the logit)"
        )
        checkpoints: int | None = Field(
            None, ge=2, description="evenly spaced checkpoints used (the last included); default: every epoch"
        )
        proxy: ProxySettings = ProxySettings()

        @field_validator("proxy")
        @classmethod
        def _needs_hidden_layer(cls, proxy: ProxySettings) -> ProxySettings:
            if proxy.hidden == 0:
                raise ValueError(
                    "hidden: 0 gives VoG nothing to measure (with a linear model every example of a class has the "
                    "same input gradient); use hidden >= 1"
                )
            if proxy.epochs < 2:
                raise ValueError("epochs: VoG needs at least 2 checkpoints (one per epoch)")
            return proxy

    @classmethod
    def needs_labels(cls, config: ScorerConfig) -> bool:
        """Whether this scorer, so configured, needs `input.label_field` (for a config-load cross-check)."""
        return True

    @classmethod
    def prepare(cls, config: ScorerConfig, context) -> dict:
        """Train (or load) the proxy; measure the class means and deviations of raw VoG on its sample."""
        params = config.typed_params()
        require_labels(context, config.name)
        run = proxy_runs(context, params.proxy, 1)[0]
        picked = checkpoint_indices(len(run.checkpoints), params.checkpoints)
        stats_uri = context.path(
            f"proxy-{params.proxy.key()}", f"vog-stats-{params.of}-{'-'.join(map(str, picked))}.json"
        )
        if rfs.exists(stats_uri):
            stats = json.loads(rfs.read_text(stats_uri))
            return {
                "labels": run.labels,
                "checkpoints": [run.checkpoints[k] for k in picked],
                "class_mean": np.array(stats["mean"], dtype=np.float64),
                "class_std": np.array(stats["std"], dtype=np.float64),
            }
        sample = context.sample(["embedding", "label"], params.proxy.sample, params.proxy.seed)
        prepared = cls.prepared_from(run, params, sample["embedding"], sample["label"])
        stats = {"mean": prepared["class_mean"].tolist(), "std": prepared["class_std"].tolist()}
        rfs.write_text(stats_uri, json.dumps(stats))
        return prepared

    @staticmethod
    def prepared_from(run, params: VoGScorer.Params, embeddings: np.ndarray, labels: np.ndarray) -> dict:
        """What actors need: the checkpoints used, and raw VoG's per-class mean and deviation on a sample.

        Args:
            run: a trained ProxyRun.
            params: the scorer's settings.
            embeddings: [N, D] the sample the class statistics are measured on (the proxy's own sample).
            labels: [N] its label strings.
        """
        import torch

        picked = checkpoint_indices(len(run.checkpoints), params.checkpoints)
        sample = {"embedding": embeddings, "label": labels}
        rows = np.arange(len(labels))
        y = label_indices(sample, rows, run.labels)
        x = torch.as_tensor(batch_embeddings(sample, rows[y >= 0]))
        raw = raw_vog([run.params(k) for k in picked], x, torch.as_tensor(y[y >= 0]), params.of)
        mean, std = class_stats(raw, y[y >= 0], len(run.labels))
        return {
            "labels": run.labels,
            "checkpoints": [run.checkpoints[k] for k in picked],
            "class_mean": mean,
            "class_std": std,
        }

    def __init__(self, config: ScorerConfig, outputs: tuple[str, ...], prepared: dict | None = None) -> None:
        self.config = config
        self.outputs = outputs
        self.device, self.labels, self.checkpoints = load_proxy_params(config, prepared, "checkpoints", "VoGScorer")
        self.of = config.typed_params().of
        self.class_mean = np.asarray(prepared["class_mean"], dtype=np.float64)
        self.class_std = np.asarray(prepared["class_std"], dtype=np.float64)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        n = len(batch["embedding"])
        raw = np.full(n, np.nan, dtype=np.float32)
        z = np.full(n, np.nan, dtype=np.float32)
        rows = usable_rows(batch)
        y = label_indices(batch, rows, self.labels)
        rows, y = rows[y >= 0], y[y >= 0]
        if len(rows):
            x = torch.as_tensor(batch_embeddings(batch, rows), device=self.device)
            r = raw_vog(self.checkpoints, x, torch.as_tensor(y, device=self.device), self.of)
            raw[rows] = r
            z[rows] = class_zscore(r, y, self.class_mean, self.class_std)
        out = dict(batch)
        out["vog"], out["vog_raw"] = z, raw
        return out
