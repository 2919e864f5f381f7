"""The proxy classifier: a small softmax head on the frozen encoder's embeddings, trained by raysel.

EL2N, VoG, gradient influence and classifier entropy all need a classifier of the corpus's labels and
its training history. Fine-tuning the encoder, or an LM, on every run would cost more than the scoring
it serves; a head on the embeddings that pass 1 already stored trains in seconds on a CPU and gives each
of those scores what its paper asks for: replicate runs from different seeds (EL2N), checkpoints along
training (VoG, TracIn), per-example gradients (influence) and a softmax (entropy).

    x (embedding, 384 floats, L2-normalized)
      → h = relu(W1 x + b1)     (hidden units; `hidden: 0` drops this layer: a linear softmax model)
      → logits = W2 h + b2      (one per label)

Training: a seeded sample of the usable rows (`context.sample`, so the same corpus and seed give the
same rows), minus a seeded held-out share used only to report accuracy; plain mini-batch SGD with
momentum and a constant learning rate for `epochs` epochs; the weights after every epoch are kept as a
checkpoint, with the learning rate used during that epoch (TracIn weighs checkpoints by it). Replicate r
changes only the initialization and the batch order (seed, r); the sample and held-out rows stay fixed.
Runs are deterministic for a fixed seed (fp32 on the CPU, one fixed order of operations).

The labels are the distinct values of the label column in the sample, sorted. A row whose label is not
among them (a label too rare to be sampled, or a row added later) has no class: the label-based scores
are NaN for it; classifier entropy, which needs no label, is still computed.

Trained runs are written to `<work dir>/proxy-<hash of the settings>/replicate-<r>.npz` and reused by
later runs and by every scorer that asks for the same settings.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from raysel.errors import ConfigError
from raysel.io import fs as rfs

# Bump when training changes what a saved run holds: older runs are then retrained, not reused.
PROXY_FORMAT = 1


class ProxySettings(BaseModel):
    """How the proxy classifier is trained (`params.proxy` of the label-based scorers)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    hidden: int = Field(64, ge=0, description="hidden units; 0 = a linear softmax model on the embedding")
    epochs: int = Field(10, ge=1, description="training epochs; one checkpoint is kept after each")
    lr: float = Field(0.1, gt=0, description="SGD learning rate (constant)")
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(32, ge=1)
    sample: int = Field(20_000, ge=2, description="rows of the corpus the proxy is trained on (a seeded sample)")
    holdout: float = Field(0.1, ge=0, lt=1, description="share of the sample held out to measure accuracy")
    seed: int = 0

    def key(self) -> str:
        blob = json.dumps({"format": PROXY_FORMAT, **self.model_dump()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --- the model as pure functions of a parameter dict (what torch.func differentiates) -------------------------


def init_params(in_dim: int, n_classes: int, hidden: int, seed: int) -> dict[str, Any]:
    """Weights drawn like torch.nn.Linear's default (uniform ±1/√fan_in), from a seeded generator.

    Args:
        in_dim: embedding length.
        n_classes: number of labels.
        hidden: hidden units (0: linear model).
        seed: fixes the draw.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)

    def uniform(shape: tuple[int, ...], fan_in: int):
        bound = 1.0 / np.sqrt(fan_in)
        return (torch.rand(shape, generator=gen, dtype=torch.float32) * 2 - 1) * bound

    if hidden == 0:
        return {"w2": uniform((n_classes, in_dim), in_dim), "b2": uniform((n_classes,), in_dim)}
    return {
        "w1": uniform((hidden, in_dim), in_dim),
        "b1": uniform((hidden,), in_dim),
        "w2": uniform((n_classes, hidden), hidden),
        "b2": uniform((n_classes,), hidden),
    }


def logits(params: dict[str, Any], x: Any) -> Any:
    """Logits of one row [D] -> [C], or of a batch [B, D] -> [B, C]."""
    import torch

    h = torch.relu(x @ params["w1"].T + params["b1"]) if "w1" in params else x
    return h @ params["w2"].T + params["b2"]


def example_loss(params: dict[str, Any], x: Any, y: Any) -> Any:
    """Cross-entropy of one row x [D] with class index y (a 0-dim long tensor): the loss TracIn differentiates."""
    import torch

    # gather, not [y]: indexing by a tensor is data-dependent control flow that vmap cannot batch.
    return -torch.log_softmax(logits(params, x), dim=-1).gather(-1, y.reshape(1)).squeeze(-1)


def true_logit(params: dict[str, Any], x: Any, y: Any) -> Any:
    """The logit of class y for one row x [D]: the quantity VoG differentiates with respect to x (the paper's)."""
    return logits(params, x).gather(-1, y.reshape(1)).squeeze(-1)


def true_log_prob(params: dict[str, Any], x: Any, y: Any) -> Any:
    """log softmax(f(x))_y for one row: VoG's `of: log_prob` variant (minus the loss)."""
    import torch

    return torch.log_softmax(logits(params, x), dim=-1).gather(-1, y.reshape(1)).squeeze(-1)


def true_prob(params: dict[str, Any], x: Any, y: Any) -> Any:
    """softmax(f(x))_y for one row: VoG's `of: prob` variant."""
    import torch

    return torch.softmax(logits(params, x), dim=-1).gather(-1, y.reshape(1)).squeeze(-1)


TRUE_CLASS_OUTPUTS = {"logit": true_logit, "log_prob": true_log_prob, "prob": true_prob}


# --- a training run ------------------------------------------------------------------------------------------


@dataclass
class ProxyRun:
    """One training run of the proxy: its labels, a checkpoint after every epoch, and how it did.

    Attributes:
        labels: class names; class index i is labels[i].
        checkpoints: parameter dicts (name -> float32 array) after epochs 1..E.
        lrs: [E] the learning rate used during the epoch that ended at each checkpoint.
        holdout_accuracy: accuracy of the last checkpoint on the held-out rows (None without any).
        train_rows: rows trained on.
        seed: the seed of this run (settings.seed and the replicate index combined).
        seconds: training time.
    """

    labels: list[str]
    checkpoints: list[dict[str, np.ndarray]]
    lrs: np.ndarray
    holdout_accuracy: float | None
    train_rows: int
    seed: int
    seconds: float = 0.0

    def params(self, k: int = -1, *, device: str = "cpu", dtype: Any = None) -> dict[str, Any]:
        """Checkpoint k (default: the last) as torch tensors."""
        import torch

        return {
            n: torch.as_tensor(v, device=device, dtype=dtype or torch.float32) for n, v in self.checkpoints[k].items()
        }

    def to_bytes(self) -> bytes:
        arrays = {f"ckpt{k}/{n}": v for k, ck in enumerate(self.checkpoints) for n, v in ck.items()}
        meta = {
            "labels": self.labels,
            "holdout_accuracy": self.holdout_accuracy,
            "train_rows": self.train_rows,
            "seed": self.seed,
            "seconds": self.seconds,
            "n_checkpoints": len(self.checkpoints),
        }
        buf = io.BytesIO()
        np.savez(buf, lrs=self.lrs, meta=np.array(json.dumps(meta)), **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> ProxyRun:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            checkpoints: list[dict[str, np.ndarray]] = [{} for _ in range(meta["n_checkpoints"])]
            for name in z.files:
                if name.startswith("ckpt"):
                    k, pname = name.removeprefix("ckpt").split("/", 1)
                    checkpoints[int(k)][pname] = z[name]
            return cls(
                labels=list(meta["labels"]),
                checkpoints=checkpoints,
                lrs=z["lrs"],
                holdout_accuracy=meta["holdout_accuracy"],
                train_rows=meta["train_rows"],
                seed=meta["seed"],
                seconds=meta["seconds"],
            )


def replicate_seed(seed: int, replicate: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"proxy:{seed}:{replicate}".encode(), digest_size=4).digest(), "little")


def train_proxy(embeddings: np.ndarray, labels: np.ndarray, settings: ProxySettings, replicate: int = 0) -> ProxyRun:
    """Train one proxy run on embeddings and string labels (see the module docstring).

    Args:
        embeddings: [N, D] float array.
        labels: [N] label strings (rows labelled "" or None are left out).
        settings: how to train.
        replicate: replicate index: changes the initialization and batch order only.

    Raises:
        ConfigError: fewer than two distinct labels, or no rows to train on.
    """
    import torch

    start = time.perf_counter()
    labels = np.array(["" if v is None else str(v) for v in labels], dtype=object)
    keep = labels != ""
    x_all = np.ascontiguousarray(np.asarray(embeddings, dtype=np.float32)[keep])
    names = sorted(set(labels[keep].tolist()))
    if len(names) < 2:
        raise ConfigError(
            f"the proxy classifier needs at least two distinct labels in input.label_field; the sample has {names}"
        )
    y_all = np.searchsorted(np.array(names, dtype=object), labels[keep]).astype(np.int64)

    # The held-out split depends on settings.seed only, so every replicate sees the same training rows.
    order = np.random.default_rng(settings.seed).permutation(len(x_all))
    n_hold = int(round(settings.holdout * len(x_all))) if len(x_all) >= 10 else 0
    hold, train = order[:n_hold], order[n_hold:]
    x = torch.from_numpy(x_all[train])
    y = torch.from_numpy(y_all[train])

    seed = replicate_seed(settings.seed, replicate)
    params = init_params(x.shape[1], len(names), settings.hidden, seed)
    for p in params.values():
        p.requires_grad_(True)
    velocity = {n: torch.zeros_like(p) for n, p in params.items()}
    gen = torch.Generator().manual_seed(seed + 1)
    checkpoints, lrs = [], []
    for _ in range(settings.epochs):
        perm = torch.randperm(len(x), generator=gen)
        for s in range(0, len(x), settings.batch_size):
            idx = perm[s : s + settings.batch_size]
            loss = torch.nn.functional.cross_entropy(logits(params, x[idx]), y[idx])
            grads = torch.autograd.grad(loss, list(params.values()))
            with torch.no_grad():
                for (n, p), g in zip(params.items(), grads, strict=True):
                    if settings.weight_decay and n.startswith("w"):
                        g = g + settings.weight_decay * p
                    velocity[n].mul_(settings.momentum).add_(g)
                    p.sub_(settings.lr * velocity[n])
        checkpoints.append({n: p.detach().numpy().copy() for n, p in params.items()})
        lrs.append(settings.lr)

    accuracy = None
    if len(hold):
        with torch.no_grad():
            final = {n: torch.from_numpy(v) for n, v in checkpoints[-1].items()}
            pred = logits(final, torch.from_numpy(x_all[hold])).argmax(-1).numpy()
        accuracy = float((pred == y_all[hold]).mean())
    return ProxyRun(
        labels=names,
        checkpoints=checkpoints,
        lrs=np.array(lrs, dtype=np.float64),
        holdout_accuracy=accuracy,
        train_rows=len(train),
        seed=seed,
        seconds=round(time.perf_counter() - start, 3),
    )


def require_labels(context: Any, scorer: str) -> None:
    """Raise a ConfigError naming the fix when the run has no label column."""
    if context.config.input.label_field is None:
        raise ConfigError(
            f"scorer {scorer!r} trains a proxy classifier on the corpus's labels: set input.label_field to the "
            "column holding each row's label (e.g. label_field: topic)"
        )


def proxy_runs(context: Any, settings: ProxySettings, replicates: int = 1) -> list[ProxyRun]:
    """Replicates 0..replicates-1 of the proxy for this corpus: loaded from the work dir, else trained and saved.

    Args:
        context: the run's RunContext (its `sample` and `path`).
        settings: how to train.
        replicates: how many runs (different seeds) are needed.
    """
    base = context.path(f"proxy-{settings.key()}")
    runs: list[ProxyRun] = []
    sample: dict[str, np.ndarray] | None = None
    for r in range(replicates):
        uri = rfs.join(base, f"replicate-{r}.npz")
        if rfs.exists(uri):
            runs.append(ProxyRun.from_bytes(read_bytes(uri)))
            continue
        if sample is None:
            sample = context.sample(["embedding", "label"], settings.sample, settings.seed)
            if "label" not in sample or len(sample["label"]) == 0:
                raise ConfigError("the proxy classifier found no usable labelled rows to train on")
        run = train_proxy(sample["embedding"], sample["label"], settings, replicate=r)
        write_bytes(uri, run.to_bytes())
        runs.append(run)
    return runs


def read_bytes(uri: str) -> bytes:
    fs, path = rfs.resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write to a temporary name, then move into place: a reader never sees half a file."""
    fs, path = rfs.resolve(uri)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    tmp = f"{path}.partial-{time.time_ns()}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


# --- helpers the scorers share -------------------------------------------------------------------------------


def usable_rows(batch: dict[str, np.ndarray]) -> np.ndarray:
    """Indices of rows with no quarantine reason (every row when the batch has no `reason` column)."""
    n = len(next(iter(batch.values())))
    if "reason" not in batch:
        return np.arange(n)
    return np.flatnonzero(np.asarray(batch["reason"]) == "")


def batch_embeddings(batch: dict[str, np.ndarray], rows: np.ndarray) -> np.ndarray:
    """The `embedding` rows as one float32 [len(rows), D] array (Parquet may hand them over as an object column)."""
    if "embedding" not in batch:
        raise ConfigError("this scorer reads the `embedding` column of the scored shards; the batch has none")
    col = batch["embedding"]
    if col.dtype == object:
        return np.stack([np.asarray(col[i], dtype=np.float32) for i in rows]) if len(rows) else np.zeros((0, 0))
    return np.asarray(col[rows], dtype=np.float32)


def label_indices(batch: dict[str, np.ndarray], rows: np.ndarray, labels: list[str]) -> np.ndarray:
    """Class index of each of `rows` (-1 where the label is missing or not one the proxy knows)."""
    if "label" not in batch:
        raise ConfigError("this scorer needs the `label` column: set input.label_field in the config")
    lookup = {name: i for i, name in enumerate(labels)}
    col = batch["label"]
    return np.array([lookup.get("" if col[i] is None else str(col[i]), -1) for i in rows], dtype=np.int64)


def load_proxy_params(config: Any, prepared: dict | None, key: str, scorer: str) -> tuple[Any, list[str], list[dict]]:
    """(device, labels, parameter sets as tensors) of a proxy-based scorer's actor, from what its `prepare`
    returned under `key` (the replicates or the epoch checkpoints); threads set from the stage config."""
    if not prepared:
        raise ValueError(f"{scorer} needs `prepared`: call {scorer}.prepare(config, context) first")
    import torch

    from raysel.models import pick_device, set_threads

    set_threads(config.threads or max(1, round(config.resources.cpus)))
    device = pick_device(config.device)
    params = [
        {n: torch.as_tensor(v, device=device, dtype=torch.float32) for n, v in ck.items()} for ck in prepared[key]
    ]
    return device, list(prepared["labels"]), params
