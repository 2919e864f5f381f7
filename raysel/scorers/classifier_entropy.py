"""Classifier entropy (arXiv 2311.16302): the entropy of a classifier's softmax over the labels.

    classifier_entropy(x) = −Σ_c p_c log p_c,   p = softmax(f(x))    (nats; between 0 and log C)

f reads the row's embedding (the run's `embed.model` output) and is one of:
    `classifier: proxy`       raysel's proxy head (raysel/proxy.py), trained on the corpus's labels; the
                              last checkpoint is used. Needs `input.label_field`.
    `classifier: PATH.npz`    head weights: `w2` [C, H], `b2` [C] and, for a hidden ReLU layer, `w1` [H, D],
                              `b1` [H] (logits = w2·relu(w1·x + b1) + b2); a proxy run's own
                              `replicate-<r>.npz` also works.
    `classifier: PATH.pt2`    a `torch.export` program mapping embeddings [N, D] to logits [N, C], exported
                              with a dynamic batch dimension.
Paths may be local or s3://. No label is needed to score, so rows with unknown labels are scored too.
High entropy: the classifier cannot tell which label the example has (ambiguous, off-topic, or near a
boundary).
"""

from __future__ import annotations

import io

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from raysel.config import ScorerConfig
from raysel.errors import ConfigError
from raysel.io import fs as rfs
from raysel.models import pick_device, set_threads
from raysel.proxy import (
    ProxyRun,
    ProxySettings,
    batch_embeddings,
    logits,
    proxy_runs,
    read_bytes,
    require_labels,
    usable_rows,
)
from raysel.registry import register_scorer


def softmax_entropy(logit_rows) -> np.ndarray:
    """Entropy in nats of softmax over the last axis, for a torch tensor of logits [N, C] (float64 result)."""
    import torch

    logp = torch.log_softmax(logit_rows.double(), dim=-1)
    return (-(logp.exp() * logp).sum(-1)).cpu().numpy()


def _head_from_npz(data: bytes, where: str) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        if "meta" in z.files:
            return ProxyRun.from_bytes(data).checkpoints[-1]
        head = {n: np.asarray(z[n], dtype=np.float32) for n in ("w1", "b1", "w2", "b2") if n in z.files}
    if "w2" not in head or "b2" not in head or (("w1" in head) != ("b1" in head)):
        raise ConfigError(f"params.classifier: {where} must hold arrays w2, b2 (and w1, b1 for a hidden layer)")
    hidden_out = head["w1"].shape[0] if "w1" in head else None
    if (
        head["w2"].ndim != 2
        or head["b2"].shape != (head["w2"].shape[0],)
        or (hidden_out is not None and (head["w2"].shape[1] != hidden_out or head["b1"].shape != (hidden_out,)))
    ):
        raise ConfigError(
            f"params.classifier: {where} has inconsistent shapes "
            f"{ {n: list(v.shape) for n, v in head.items()} }; expected w1 [H, D], b1 [H], w2 [C, H], b2 [C]"
        )
    return head


@register_scorer("classifier_entropy")
class ClassifierEntropyScorer:
    """Adds `classifier_entropy` (see the module docstring). NaN where `reason` is set.

    Reads `embedding` and `reason` (the scored shards, `inputs = "scored"`).

    Example:
        >>> cfg = ScorerConfig(name="classifier_entropy", params={"classifier": "head.npz"})   # doctest: +SKIP
        >>> scorer = ClassifierEntropyScorer(cfg, ("classifier_entropy",), ClassifierEntropyScorer.prepare(cfg, ctx))
        >>> scorer({"embedding": emb, "reason": reasons})["classifier_entropy"]
    """

    inputs = "scored"

    class Params(BaseModel):
        model_config = ConfigDict(frozen=True, extra="forbid")

        classifier: str = Field("proxy", description="`proxy`, or a .npz head / .pt2 torch.export program path")
        proxy: ProxySettings = ProxySettings()

    @classmethod
    def needs_labels(cls, config: ScorerConfig) -> bool:
        """Whether this scorer, so configured, needs `input.label_field` (for a config-load cross-check)."""
        return config.typed_params().classifier == "proxy"

    @classmethod
    def prepare(cls, config: ScorerConfig, context) -> dict:
        """Train (or load) the proxy, or read the user's classifier file; hand its weights to every actor."""
        params = config.typed_params()
        return load_classifier(params.classifier, params.proxy, context, config.name)

    @staticmethod
    def prepared_from(run) -> dict:
        """What actors need to score with a trained proxy run (its last checkpoint)."""
        return {"kind": "head", "head": run.checkpoints[-1], "labels": run.labels}

    def __init__(self, config: ScorerConfig, outputs: tuple[str, ...], prepared: dict | None = None) -> None:
        if not prepared:
            raise ValueError(
                "ClassifierEntropyScorer needs `prepared`: call ClassifierEntropyScorer.prepare(config, context)"
            )
        import torch

        self.config = config
        self.outputs = outputs
        set_threads(config.threads or max(1, round(config.resources.cpus)))
        self.device = pick_device(config.device)
        if prepared["kind"] == "head":
            head = {
                n: torch.as_tensor(v, device=self.device, dtype=torch.float32) for n, v in prepared["head"].items()
            }
            self.model = lambda x: logits(head, x)
        else:
            program = torch.export.load(io.BytesIO(prepared["program"]))
            self.model = program.module().to(self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        n = len(batch["embedding"])
        score = np.full(n, np.nan, dtype=np.float32)
        rows = usable_rows(batch)
        if len(rows):
            x = torch.as_tensor(batch_embeddings(batch, rows), device=self.device)
            with torch.no_grad():
                out_logits = self.model(x)
            if out_logits.ndim != 2 or out_logits.shape[0] != len(rows):
                raise ConfigError(
                    f"params.classifier: the classifier returned shape {list(out_logits.shape)} for {len(rows)} "
                    "embeddings; it must return logits [N, C]"
                )
            score[rows] = softmax_entropy(out_logits)
        out = dict(batch)
        out["classifier_entropy"] = score
        return out


def load_classifier(classifier: str, proxy: ProxySettings, context, name: str) -> dict:
    """What actors need to rebuild the classifier: {"kind": "head", "head": arrays} or {"kind": "program", ...}."""
    if classifier == "proxy":
        require_labels(context, name)
        return ClassifierEntropyScorer.prepared_from(proxy_runs(context, proxy, 1)[0])
    if not rfs.exists(classifier):
        raise ConfigError(f"params.classifier: {classifier!r} is neither `proxy` nor an existing file")
    data = read_bytes(classifier)
    if classifier.endswith(".npz"):
        return {"kind": "head", "head": _head_from_npz(data, classifier)}
    if classifier.endswith(".pt2"):
        return {"kind": "program", "program": data}
    raise ConfigError(
        f"params.classifier: {classifier!r}: expected `proxy`, a .npz head (w1, b1, w2, b2) or a .pt2 "
        "torch.export program"
    )
