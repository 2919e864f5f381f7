"""Gradient influence on a target set (TracIn, Pruthi et al. 2020; LESS, Xia et al. 2024; the reward of Quad).

For a labelled example z = (x, y), the proxy classifier's checkpoints θ_1..θ_K with learning rates η_k,
and a target set T of examples the selection should help (a file the user gives):
    g_k(z) = P ∇_θ ℓ(z; θ_k)                 per-example loss gradient on a parameter subset, projected to
                                              d dims by a seeded random matrix P (raysel/scorers/_grad.py)
    t_k    = mean over t in T of g_k(t)
    influence(z) = Σ_k η_k · cos(g_k(z), t_k)   (`similarity: cosine`, LESS)
                 = Σ_k η_k · ⟨g_k(z), t_k⟩      (`similarity: dot`, TracIn: the mean of z's influence on T)
High influence: a gradient step on z lowers the loss on the target set. Negative: it raises it (a
mislabelled row pulls against clean targets).

Cost and memory: per row, K per-example gradients (torch.func vmap over grad) and K projections, each
O(n·d) for n parameters in the subset: linear in the number of rows. Memory is one block of P
(d × 1024 floats) plus one chunk of per-example gradients (bounded by _GRAD_FLOATS), never the n × d
matrix. When the subset has no more than d parameters, the gradients are used as they are (exact inner
products; a projection would only add noise).
"""

from __future__ import annotations

import json
import logging
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from raysel.config import ScorerConfig
from raysel.errors import ConfigError
from raysel.io import fs as rfs
from raysel.models import load_encoder, pick_device, set_threads
from raysel.proxy import (
    ProxySettings,
    batch_embeddings,
    example_loss,
    label_indices,
    proxy_runs,
    read_bytes,
    require_labels,
    usable_rows,
)
from raysel.registry import register_scorer
from raysel.scorers._grad import RandomProjector, flatten_grads, per_example_grads
from raysel.scorers.vog import checkpoint_indices

log = logging.getLogger(__name__)

# Per-example gradient floats held at once (K checkpoints × rows × parameters): 64 MiB in fp32.
_GRAD_FLOATS = 1 << 24


def subset_names(checkpoint: dict, layers: str) -> list[str]:
    """The parameters differentiated: every one (`all`) or the output layer's (`last`)."""
    return sorted(checkpoint) if layers == "all" else ["b2", "w2"]


class GradientFeatures:
    """Projected per-example loss gradients of the proxy at several checkpoints.

    Args:
        checkpoints: K parameter dicts (name -> array or tensor).
        layers: "all" or "last" (see `subset_names`).
        dim: projected dimension d.
        projection: "rademacher" or "gaussian".
        seed: fixes the projection.
        device: torch device.

    Example:
        >>> feats = GradientFeatures(run.checkpoints[-3:], "all", 8192, "rademacher", 0)   # doctest: +SKIP
        >>> feats(x, y).shape          # [K, rows, d]
    """

    def __init__(self, checkpoints: list[dict], layers: str, dim: int, projection: str, seed: int, device="cpu"):
        import torch

        self.device = device
        self.params = [
            {n: torch.as_tensor(v, device=device, dtype=torch.float32) for n, v in ck.items()} for ck in checkpoints
        ]
        self.names = subset_names(self.params[0], layers)
        self.n_params = sum(int(self.params[0][n].numel()) for n in self.names)
        self.projector = (
            RandomProjector(self.n_params, dim, seed=seed, kind=projection, device=device)
            if self.n_params > dim
            else None
        )
        self.dim = dim if self.projector is not None else self.n_params

    def __call__(self, x, y) -> np.ndarray:
        """[K, rows, d] float64 for embeddings x [rows, D] and class indices y [rows] (torch tensors)."""
        import torch

        k = len(self.params)
        out = np.empty((k, len(x), self.dim))
        rows_per_chunk = max(1, _GRAD_FLOATS // (k * self.n_params))
        for s in range(0, len(x), rows_per_chunk):
            xs, ys = x[s : s + rows_per_chunk], y[s : s + rows_per_chunk]
            flat = []
            for params in self.params:
                fixed = {n: v for n, v in params.items() if n not in self.names}
                subset = {n: params[n] for n in self.names}

                def loss(sub, xi, yi, fixed=fixed):
                    return example_loss({**fixed, **sub}, xi, yi)

                flat.append(flatten_grads(per_example_grads(loss, subset, xs, ys), self.names))
            stacked = torch.cat(flat)  # one projection pass for every checkpoint: P is drawn once per chunk
            projected = self.projector(stacked) if self.projector is not None else stacked
            out[:, s : s + len(xs)] = projected.double().cpu().numpy().reshape(k, len(xs), self.dim)
        return out


def influence_scores(features: np.ndarray, target: np.ndarray, lrs: np.ndarray, similarity: str) -> np.ndarray:
    """Σ_k lrs[k] · sim(features[k, i], target[k]) per row i.

    Args:
        features: [K, N, d] projected gradients of the rows.
        target: [K, d] mean projected gradient of the target set.
        lrs: [K] learning rates of the checkpoints.
        similarity: "cosine" or "dot".
    """
    dots = np.einsum("knd,kd->kn", features, target)
    if similarity == "cosine":
        norms = np.linalg.norm(features, axis=-1) * np.linalg.norm(target, axis=-1)[:, None]
        dots = np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)
    return (np.asarray(lrs)[:, None] * dots).sum(axis=0)


def read_targets(uri: str, text_field: str, label_field: str) -> tuple[list[str], list[str], int]:
    """(texts, labels, rows skipped) of a JSONL or Parquet target file (local or s3://)."""
    if not rfs.exists(uri):
        raise ConfigError(f"params.target: the target file {uri!r} does not exist")
    if uri.endswith(".parquet"):
        import pyarrow.parquet as pq

        fs, path = rfs.resolve(uri)
        records = pq.read_table(path, filesystem=fs).to_pylist()
    else:
        records = []
        for number, line in enumerate(read_bytes(uri).decode("utf-8", errors="replace").splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    raise ConfigError(f"params.target: {uri} line {number} is not valid JSON") from None
    texts, labels, skipped = [], [], 0
    for r in records:
        text = r.get(text_field) if isinstance(r, dict) else None
        label = r.get(label_field) if isinstance(r, dict) else None
        if not isinstance(text, str) or not text.strip() or label is None:
            skipped += 1
            continue
        texts.append(text)
        labels.append(str(label))
    return texts, labels, skipped


@register_scorer("influence")
class InfluenceScorer:
    """Adds `influence` (see the module docstring). NaN where `reason` is set or the label is unknown.

    Reads `embedding`, `label` and `reason` (the scored shards, `inputs = "scored"`).

    Example:
        >>> cfg = ScorerConfig(name="influence", params={"target": "target.jsonl"})   # doctest: +SKIP
        >>> scorer = InfluenceScorer(cfg, ("influence",), InfluenceScorer.prepare(cfg, context))
        >>> scorer({"embedding": emb, "label": labels, "reason": reasons})["influence"]
    """

    inputs = "scored"

    class Params(BaseModel):
        model_config = ConfigDict(frozen=True, extra="forbid")

        target: str = Field(description="JSONL/Parquet file of target examples (text and label), local or s3://")
        text_field: str | None = Field(None, description="text column of the target file; default input.text_field")
        label_field: str | None = Field(None, description="label column of the target file; default input.label_field")
        dim: int = Field(8192, ge=1, description="projected gradient dimension")
        projection: Literal["rademacher", "gaussian"] = "rademacher"
        similarity: Literal["cosine", "dot"] = "cosine"
        layers: Literal["all", "last"] = Field("all", description="proxy parameters differentiated")
        checkpoints: int | None = Field(3, ge=1, description="evenly spaced checkpoints summed (None: every epoch)")
        seed: int = Field(0, description="seed of the random projection")
        proxy: ProxySettings = ProxySettings()

    @classmethod
    def needs_labels(cls, config: ScorerConfig) -> bool:
        """Whether this scorer, so configured, needs `input.label_field` (for a config-load cross-check)."""
        return True

    @classmethod
    def prepare(cls, config: ScorerConfig, context) -> dict:
        """Train (or load) the proxy and embed the target set."""
        params = config.typed_params()
        require_labels(context, config.name)
        run = proxy_runs(context, params.proxy, 1)[0]
        text_field = params.text_field or context.config.input.text_field
        label_field = params.label_field or context.config.input.label_field
        texts, labels, skipped = read_targets(params.target, text_field, label_field)
        known = set(run.labels)
        keep = [i for i, label in enumerate(labels) if label in known]
        if len(keep) < len(labels):
            log.warning(
                "influence: %d target rows have labels the proxy does not know; they are skipped",
                len(labels) - len(keep),
            )
        if not keep:
            raise ConfigError(
                f"params.target: no target row has both a `{text_field}` text and a `{label_field}` label among "
                f"{run.labels} ({len(texts)} rows with text and label, {skipped} without)"
            )
        embed = context.config.embed
        encoder = load_encoder(embed.model, device="auto", max_tokens=embed.max_tokens)
        emb = encoder.encode(
            [texts[i] for i in keep], normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )
        prepared = cls.prepared_from(run, params, emb, np.array([labels[i] for i in keep], dtype=object))
        prepared["targets_skipped"] = skipped + len(labels) - len(keep)
        return prepared

    @staticmethod
    def prepared_from(run, params: InfluenceScorer.Params, target_embeddings: np.ndarray, target_labels) -> dict:
        """What actors need: the checkpoints summed, their learning rates, and the embedded target set.

        The target's projected mean gradient is computed by each actor on its own device: P drawn on a GPU
        differs from P drawn on the CPU, and rows and target must meet under the same P.

        Args:
            run: a trained ProxyRun.
            params: the scorer's settings.
            target_embeddings: [T, D] embeddings of the target examples.
            target_labels: [T] their label strings (rows with labels the proxy does not know are dropped).
        """
        picked = checkpoint_indices(len(run.checkpoints), params.checkpoints)
        rows = np.arange(len(target_labels))
        y = label_indices({"label": np.asarray(target_labels, dtype=object)}, rows, run.labels)
        return {
            "labels": run.labels,
            "checkpoints": [run.checkpoints[k] for k in picked],
            "lrs": run.lrs[picked],
            "target_embedding": np.asarray(target_embeddings, dtype=np.float32)[y >= 0],
            "target_label": y[y >= 0],
        }

    def __init__(self, config: ScorerConfig, outputs: tuple[str, ...], prepared: dict | None = None) -> None:
        if not prepared:
            raise ValueError("InfluenceScorer needs `prepared`: call InfluenceScorer.prepare(config, context) first")
        import torch

        self.config = config
        self.params = config.typed_params()
        self.outputs = outputs
        set_threads(config.threads or max(1, round(config.resources.cpus)))
        self.device = pick_device(config.device)
        self.labels = list(prepared["labels"])
        self.features = GradientFeatures(
            prepared["checkpoints"],
            self.params.layers,
            self.params.dim,
            self.params.projection,
            self.params.seed,
            self.device,
        )
        self.target = self.features(
            torch.as_tensor(np.asarray(prepared["target_embedding"], dtype=np.float32), device=self.device),
            torch.as_tensor(np.asarray(prepared["target_label"], dtype=np.int64), device=self.device),
        ).mean(axis=1)
        self.lrs = np.asarray(prepared["lrs"], dtype=np.float64)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        n = len(batch["embedding"])
        score = np.full(n, np.nan, dtype=np.float32)
        rows = usable_rows(batch)
        y = label_indices(batch, rows, self.labels)
        rows, y = rows[y >= 0], y[y >= 0]
        if len(rows):
            x = torch.as_tensor(batch_embeddings(batch, rows), device=self.device)
            feats = self.features(x, torch.as_tensor(y, device=self.device))
            score[rows] = influence_scores(feats, self.target, self.lrs, self.params.similarity)
        out = dict(batch)
        out["influence"] = score
        return out
