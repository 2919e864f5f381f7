"""Influence of a text on a target set, from the causal LM's own gradients (LESS; LoGra projections).

For a text z of tokens x_1..x_n (a BOS token prepended, as in raysel/scorers/lm.py), the loss is the mean
next-token NLL L(z) = mean_t −log p(x_t | x_<t), and its gradient is taken with respect to every
nn.Linear weight (and bias) of the chosen transformer blocks. Projected to d dimensions per text by the
Kronecker-factored seeded projection of raysel/scorers/_logra.py (exact: no approximation beyond the
projection itself, and no per-text full gradient in memory):
    g(z) = P ∇_θ L(z)                                  [d]
For the target set T (a file of texts the selection should help):
    cosine (default, LESS, Xia et al. 2024):   lm_influence(z) = cos(g(z), mean_{t∈T} g(t)/‖g(t)‖)
    dot:                                       lm_influence(z) = ⟨g(z), mean_{t∈T} g(t)⟩
With `precondition: true`, every g is first whitened, ψ = (F + λI)^{-1/2} g, with F the empirical Fisher
(Gauss-Newton for the softmax's NLL with the model's own targets replaced by the data's) of projected
gradients fitted once on the target texts plus a seeded sample of `fisher_texts`, and λ = damping × F's mean
non-zero eigenvalue; then `dot` is the influence function ⟨g(z), (F + λI)⁻¹ mean g(t)⟩ and `cosine` the
cosine in that metric. Higher: a gradient step on z lowers the target's loss more (pulls the model
towards the target).

The target's reference direction (and the whitening) is computed once per machine and kept in raysel's
cache dir, keyed by the target file's content, the model's fingerprint and every setting that changes it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import random
import time
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from raysel.config import ScorerConfig, cache_dir
from raysel.errors import ConfigError
from raysel.io import fs as rfs
from raysel.models import load_causal_lm, model_fingerprint, pick_device, set_threads
from raysel.registry import register_scorer
from raysel.scorers._logra import KroneckerProjector, Whitening
from raysel.scorers.lm import CHUNK_BYTES, pad_batch

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when what the cache holds, or how it is computed, changes


class LastBlocks(BaseModel):
    """`layers: {last: N}`: the last N transformer blocks."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    last: int = Field(ge=1)


def read_texts(uri: str, text_field: str = "text", *, what: str = "params.target") -> list[str]:
    """The non-blank texts of a file: Parquet (column `text_field`), JSONL (.jsonl/.json/.ndjson, also .gz/.zst/
    .bz2; field `text_field`), anything else one text per line. Local or s3://.

    Args:
        uri: the file.
        text_field: the column / JSON field holding the text.
        what: the config field named in errors.
    """
    from raysel.io.read import file_format, open_jsonl

    if not rfs.is_file(uri):
        raise ConfigError(f"{what}: the file {uri!r} does not exist")
    fmt, _ = file_format(uri)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        fs, path = rfs.resolve(uri)
        table = pq.read_table(path, filesystem=fs)
        if text_field not in table.column_names:
            raise ConfigError(f"{what}: {uri} has no column {text_field!r} (it has {table.column_names})")
        values = table.column(text_field).to_pylist()
    elif fmt == "jsonl":
        with open_jsonl(uri) as stream:
            lines = stream.read().decode("utf-8", errors="replace").splitlines()
        values = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise ConfigError(f"{what}: {uri} line {number} is not valid JSON") from None
            values.append(record.get(text_field) if isinstance(record, dict) else None)
    else:
        fs, path = rfs.resolve(uri)
        with fs.open_input_stream(path) as stream:
            values = stream.read().decode("utf-8", errors="replace").splitlines()
    texts = [v for v in values if isinstance(v, str) and v.strip()]
    if not texts:
        raise ConfigError(f"{what}: {uri} holds no non-blank text (field {text_field!r})")
    if len(texts) < len(values):
        log.warning("%s: %d of %d rows of %s have no text; skipped", what, len(values) - len(texts), len(values), uri)
    return texts


def decoder_blocks(model: Any) -> Any:
    """The model's list of transformer blocks: the nn.ModuleList of `config.num_hidden_layers` entries."""
    import torch

    n = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    matching = [m for m in lists if len(m) == n] or sorted(lists, key=len, reverse=True)[:1]
    if not matching:
        raise ConfigError("params.layers: the model has no list of transformer blocks to pick from")
    return matching[0]


def pick_blocks(layers: Any, n_blocks: int) -> list[int]:
    """Sorted block indices for `layers`: "all", {last: N} (LastBlocks) or a list of indices."""
    if layers == "all":
        return list(range(n_blocks))
    if isinstance(layers, LastBlocks):
        if layers.last > n_blocks:
            raise ConfigError(f"params.layers: last: {layers.last}, but the model has {n_blocks} blocks")
        return list(range(n_blocks - layers.last, n_blocks))
    bad = [i for i in layers if i >= n_blocks]
    if bad:
        raise ConfigError(
            f"params.layers: block indices {bad} do not exist; the model has {n_blocks} (0..{n_blocks - 1})"
        )
    return sorted(layers)


def linear_layers(model: Any, blocks: Any, indices: list[int]) -> dict[str, Any]:
    """name -> nn.Linear of every linear layer inside the chosen blocks, in the model's order."""
    import torch

    chosen = {id(blocks[i]) for i in indices}
    out: dict[str, Any] = {}
    for name, module in model.named_modules():
        if id(module) in chosen:
            for sub, layer in module.named_modules():
                if isinstance(layer, torch.nn.Linear):
                    out[f"{name}.{sub}"] = layer
    if not out:
        raise ConfigError(f"params.layers: blocks {indices} hold no nn.Linear layer")
    return out


class LMGradients:
    """Per-text projected gradients of a causal LM's mean next-token loss (see the module docstring).

    Args:
        model: a transformers causal LM (eval mode); its parameters are frozen here.
        tokenizer: its tokenizer.
        layers: "all", LastBlocks or a list of block indices.
        dim: projected dimension asked for (`self.dim` is what the layers' split gives, ≤ dim).
        seed: fixes the projection.
        max_tokens: tokens per text, the BOS token included; longer texts are cut.
        batch_size: texts per forward+backward pass.
        chunk_bytes: float32 logits per chunk of positions (raysel/scorers/lm.py).

    Example:
        >>> grads = LMGradients(model, tokenizer, layers=LastBlocks(last=2), dim=8192, seed=0)   # doctest: +SKIP
        >>> feats, tokens = grads(["one text", "another text"])       # [2, grads.dim], [2]
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        layers: Any,
        dim: int,
        seed: int,
        max_tokens: int = 128,
        batch_size: int = 16,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> None:
        for p in model.parameters():
            p.requires_grad_(False)  # δ flows through activations only: no weight gradient is ever formed
        self.model, self.tokenizer = model, tokenizer
        self.max_tokens, self.batch_size, self.chunk_bytes = max_tokens, batch_size, chunk_bytes
        blocks = decoder_blocks(model)
        indices = pick_blocks(layers, len(blocks))
        self.block_indices = indices
        self.first_block = blocks[indices[0]]
        self.device = next(model.parameters()).device
        self.projector = KroneckerProjector(
            linear_layers(model, blocks, indices), dim=dim, seed=seed, device=self.device
        )
        self.dim = self.projector.dim
        self.prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.prefix or 0)

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids per text: the prefix token, then at most max_tokens − 1 text tokens (as lm.py cuts)."""
        limit = self.max_tokens - (self.prefix is not None)
        encoded = self.tokenizer(list(texts), add_special_tokens=False, truncation=False)["input_ids"]
        return [([self.prefix] if self.prefix is not None else []) + e[:limit] for e in encoded]

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """([n, dim] float32 projected gradients, [n] predicted tokens); a text with none gets zeros."""
        ids = self.encode(texts)
        feats = np.zeros((len(ids), self.dim), dtype=np.float32)
        tokens = np.array([max(0, len(s) - 1) for s in ids], dtype=np.int32)
        order = np.argsort([len(s) for s in ids], kind="stable")  # similar lengths together: less padding
        for start in range(0, len(order), self.batch_size):
            chunk = [j for j in order[start : start + self.batch_size] if tokens[j] > 0]
            if chunk:
                feats[chunk] = self._batch([ids[j] for j in chunk])
        return feats, tokens

    @contextmanager
    def _leaf_at_first_block(self):
        """Make the first chosen block's input a leaf that needs a gradient: the blocks below build no graph."""

        def pre_hook(module, args, kwargs):
            if args:
                return (args[0].detach().requires_grad_(True), *args[1:]), kwargs
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = kwargs["hidden_states"].detach().requires_grad_(True)
            return args, kwargs

        handle = self.first_block.register_forward_pre_hook(pre_hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def _nll_sums(self, input_ids, mask, targets):
        """[B] summed next-token NLL per text (fp32). The LM head runs on a chunk of positions at a time under
        activation checkpointing: no [B, T, V] logits (or their softmax) are kept for the backward pass."""
        import torch
        from torch.utils.checkpoint import checkpoint

        from raysel.scorers.lm import chunk_positions, split_head

        parts = split_head(self.model)
        if parts is None:  # logits rescaled after the head: the whole forward, as transformers computes it
            logits = self.model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
            return _chunk_nll(lambda h: h, logits, targets)
        body, head = parts
        hidden = body(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state
        step = chunk_positions(input_ids.shape[0], self.model.config.vocab_size, self.chunk_bytes)
        total = hidden.new_zeros(input_ids.shape[0], dtype=torch.float32)
        for start in range(0, input_ids.shape[1] - 1, step):
            stop = min(input_ids.shape[1] - 1, start + step)
            total = total + checkpoint(
                _chunk_nll, head, hidden[:, start:stop], targets[:, start:stop], use_reentrant=False
            )
        return total

    def _batch(self, seqs: list[list[int]]) -> np.ndarray:
        import torch

        input_ids, mask = pad_batch(seqs, self.pad)
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        # Position t predicts token t+1; the last position and padding predict nothing (ignored).
        targets = torch.full_like(input_ids, -100)
        targets[:, :-1] = torch.where(mask[:, 1:] > 0, input_ids[:, 1:], -100)
        counts = (targets >= 0).sum(1).clamp(min=1).to(torch.float32)
        with torch.enable_grad(), self.projector.capture(mask), self._leaf_at_first_block():
            nll_sum = self._nll_sums(input_ids, mask, targets)
            # Σ of per-text means: each text's δ is that of its own mean loss, whatever shares its batch.
            (nll_sum / counts).sum().backward()
            feats = self.projector.features()
        return feats.detach().cpu().numpy()


def _chunk_nll(head, hidden, targets):
    """[B] summed NLL of one chunk of positions: float32 log-softmax of head(hidden) [B, c, V] at `targets`."""
    import torch

    logits = head(hidden).float()
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    return nll.view(targets.shape).sum(1)


class TargetReference:
    """The target side of the score: the reference direction, and the whitening when preconditioned.

    Args:
        direction: [d] the mean (normalised, for cosine) target gradient, whitened if `whitening` is set.
        whitening: a fitted `Whitening`, or None.
        score: "cosine" or "dot".
    """

    def __init__(self, direction: np.ndarray, whitening: Whitening | None, score: str) -> None:
        self.direction, self.whitening, self.score_kind = np.asarray(direction, dtype=np.float64), whitening, score

    @classmethod
    def fit(
        cls, target: np.ndarray, *, score: str, fisher: np.ndarray | None = None, damping: float | None = None
    ) -> TargetReference:
        """From the target's projected gradients [T, d]; `fisher` [N, d] (target rows included) fits F when given."""
        whitening = Whitening(fisher, damping) if fisher is not None else None
        t = whitening(target) if whitening is not None else np.asarray(target, dtype=np.float64)
        if score == "cosine":
            norms = np.linalg.norm(t, axis=1)
            t = t[norms > 0] / norms[norms > 0, None]
        if not len(t):
            raise ConfigError("params.target: every target text has a zero gradient (no token to predict?)")
        return cls(t.mean(axis=0), whitening, score)

    def __call__(self, feats: np.ndarray) -> np.ndarray:
        """[n] scores of projected gradients [n, d] (NaN for a zero gradient under cosine)."""
        psi = self.whitening(feats) if self.whitening is not None else np.asarray(feats, dtype=np.float64)
        dots = psi @ self.direction
        if self.score_kind == "dot":
            return dots
        norms = np.linalg.norm(psi, axis=1) * np.linalg.norm(self.direction)
        return np.divide(dots, norms, out=np.full_like(dots, np.nan), where=norms > 0)

    def state(self) -> dict[str, np.ndarray]:
        state = {"direction": self.direction, "score": np.array(self.score_kind)}
        if self.whitening is not None:
            state.update({f"whitening_{k}": v for k, v in self.whitening.state().items()})
        return state

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> TargetReference:
        w = {k.removeprefix("whitening_"): state[k] for k in state if k.startswith("whitening_")}
        return cls(state["direction"], Whitening.from_state(w) if w else None, str(state["score"]))


@register_scorer("lm_influence")
class LMInfluenceScorer:
    """Adds `lm_influence`: how much a gradient step on the text pulls the LM towards the target set.

    Reads `text` and `reason`; rows with a reason, or with no token to predict, get NaN. Runs in pass 1
    (`inputs = "text"`) beside `loss`; the target's reference is computed once per machine and cached.

    Example:
        >>> cfg = ScorerConfig(name="lm_influence", max_tokens=256, params={"target": "target.jsonl"})   # doctest: +SKIP
        >>> scorer = LMInfluenceScorer(cfg, outputs=("lm_influence",))
        >>> scorer({"text": np.array(["Shares rose."], dtype=object), "reason": np.array([""], dtype=object)})
    """

    inputs = "text"

    class Params(BaseModel):
        model_config = ConfigDict(frozen=True, extra="forbid")

        target: str = Field(
            description="file of target texts: JSONL / Parquet (`text_field`) or plain lines; s3:// too"
        )
        text_field: str = Field("text", description="field / column of the text in the target and fisher files")
        layers: Literal["all"] | LastBlocks | list[int] = Field(
            LastBlocks(last=2), description="transformer blocks whose nn.Linear weights are differentiated"
        )
        dim: int = Field(8192, ge=1, description="projected gradient dimension (split over the linear layers)")
        score: Literal["cosine", "dot"] = "cosine"
        precondition: bool = Field(False, description="whiten by a damped Fisher in the projected space")
        damping: float = Field(0.1, gt=0, description="λ relative to the Fisher's mean non-zero eigenvalue")
        fisher_texts: str | None = Field(None, description="texts whose seeded sample joins the target to fit F")
        fisher_rows: int = Field(256, ge=1, description="rows sampled from fisher_texts")
        seed: int = Field(0, description="seed of the projection and of the fisher sample")

        @field_validator("layers")
        @classmethod
        def _indices(cls, layers: Any) -> Any:
            if isinstance(layers, list):
                if not layers:
                    raise ValueError("give at least one block index, or `all`, or {last: N}")
                if any(i < 0 for i in layers) or len(set(layers)) < len(layers):
                    raise ValueError(f"block indices must be distinct and >= 0, got {layers}")
            return layers

        @model_validator(mode="after")
        def _fisher_needs_precondition(self) -> Any:
            if self.fisher_texts is not None and not self.precondition:
                raise ValueError("fisher_texts is only used with `precondition: true`")
            return self

    def __init__(self, config: ScorerConfig, outputs: tuple[str, ...], prepared: dict | None = None) -> None:
        self.config = config
        self.params = config.typed_params()
        self.outputs = outputs
        set_threads(config.threads or max(1, round(config.resources.cpus)))
        self.device = pick_device(config.device)
        model, tokenizer = load_causal_lm(config.model, device=self.device)
        self.gradients = LMGradients(
            model,
            tokenizer,
            layers=self.params.layers,
            dim=self.params.dim,
            seed=self.params.seed,
            max_tokens=config.max_tokens,
            batch_size=config.batch_size,
        )
        self.reference = self._reference()

    def cache_key(self) -> str:
        """What the target reference depends on: the files' content, the model, every setting that shapes it."""
        p = self.params
        settings = {
            "format": CACHE_FORMAT,
            "model": self.config.model,
            "model_fingerprint": model_fingerprint(self.config.model, "causal_lm"),
            "dtype": str(next(self.gradients.model.parameters()).dtype),
            "max_tokens": self.config.max_tokens,
            # the files count by content, not by name: a copy of the target elsewhere reuses the entry
            "params": p.model_dump(mode="json", exclude={"target", "fisher_texts"}),
            "target": rfs.fingerprint(p.target) if rfs.is_file(p.target) else None,
            "fisher": rfs.fingerprint(p.fisher_texts) if p.fisher_texts and rfs.is_file(p.fisher_texts) else None,
        }
        return rfs.settings_digest(settings)

    def _reference(self) -> TargetReference:
        path = cache_dir() / "lm_influence" / f"{self.cache_key()}.npz"
        if path.exists():
            return TargetReference.from_state(dict(np.load(path)))
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.parent / f".{path.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one actor per machine computes it; the others wait and read it
            if path.exists():
                return TargetReference.from_state(dict(np.load(path)))
            reference = self.fit_reference()
            tmp = path.with_name(f"{path.stem}.partial-{os.getpid()}-{time.time_ns()}.npz")
            np.savez(tmp, **reference.state())
            os.replace(tmp, path)
        return reference

    def fit_reference(self) -> TargetReference:
        """Compute the target's reference from its texts (and the fisher sample), without the cache."""
        p = self.params
        started = time.perf_counter()
        target_texts = read_texts(p.target, p.text_field, what="params.target")
        target, _ = self.gradients(target_texts)
        fisher = None
        if p.precondition:
            extra: list[str] = []
            if p.fisher_texts:
                pool = read_texts(p.fisher_texts, p.text_field, what="params.fisher_texts")
                rows = sorted(random.Random(p.seed).sample(range(len(pool)), min(p.fisher_rows, len(pool))))
                extra = [pool[i] for i in rows]
            fisher = np.concatenate([target, self.gradients(extra)[0]]) if extra else target
        reference = TargetReference.fit(target, score=p.score, fisher=fisher, damping=p.damping)
        log.info(
            "lm_influence: target reference from %d texts (%d fisher rows), d = %d, in %.1f s",
            len(target_texts),
            0 if fisher is None else len(fisher),
            self.gradients.dim,
            time.perf_counter() - started,
        )
        return reference

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["text"])
        score = np.full(n, np.nan, dtype=np.float32)
        usable = np.flatnonzero(batch["reason"] == "")
        if len(usable):
            feats, tokens = self.gradients([batch["text"][i] for i in usable])
            values = self.reference(feats)
            values[tokens == 0] = np.nan
            score[usable] = values
        out = dict(batch)
        out["lm_influence"] = score
        return out


__all__ = ["LMGradients", "LMInfluenceScorer", "LastBlocks", "TargetReference", "read_texts"]
