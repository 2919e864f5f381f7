"""A run's configuration: frozen pydantic models, loaded from YAML, with errors that name the field.

    input:   {path: corpus.jsonl, text_field: text, id_field: id}
    output:  {path: out/run1}
    embed:   {model: minilm, batch_size: 64}
    scorers: [entropy, loss]
    cluster: {k: 64, sample: 100000, seed: 0}
    select:  {budget: 0.25, policy: stratified, score: entropy, order: desc, seed: 0}

Relative paths are taken relative to the current directory (the job's working dir under `ray job submit`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from raysel.errors import ConfigError
from raysel.registry import POLICIES, SCORERS, Registry, UnknownName


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Resources(_Frozen):
    """What one actor of a stage reserves from Ray."""

    cpus: float = Field(1.0, ge=0)
    gpus: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _reserves_something(self) -> Resources:
        if self.cpus == 0 and self.gpus == 0:
            raise ValueError("an actor must reserve some `cpus` or `gpus`; both are 0")
        return self


class ActorRange(_Frozen):
    """An elastic actor pool, `actors: {min: 1, max: 64}`: it starts once `min` actors run and grows towards `max`
    while work queues up and the cluster has room (a node an autoscaler adds): Ray Data's
    `ActorPoolStrategy(min_size=, max_size=)`."""

    min: int
    max: int

    @model_validator(mode="after")
    def _ordered(self) -> ActorRange:
        _check_range(self.min, self.max)
        return self


def _check_range(low: int, high: int) -> None:
    if low < 1:
        raise ValueError(f"min must be >= 1 (a pool starts with at least one actor), got {low}")
    if low > high:
        raise ValueError(f"min ({low}) must be <= max ({high})")


_ACTORS_FORMS = "a pool size N >= 1 (`actors: 4`) or an elastic pool {min: M, max: N} with 1 <= M <= N"


def _actors(value: Any) -> int | ActorRange:
    """`actors: N` (a fixed pool, kept an int) or `actors: {min: M, max: N}`; one error line for anything else."""
    if isinstance(value, ActorRange):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ValueError(f"a pool needs at least one actor, got {value}; write {_ACTORS_FORMS}")
        return value
    if isinstance(value, dict):
        if set(value) != {"min", "max"} or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value.values()
        ):
            raise ValueError(f"an elastic pool is {{min: M, max: N}} with two integers, got {value!r}")
        _check_range(value["min"], value["max"])
        return ActorRange(min=value["min"], max=value["max"])
    raise ValueError(f"must be {_ACTORS_FORMS}, got {value!r}")


Actors = Annotated[int | ActorRange, BeforeValidator(_actors)]


class StageConfig(_Frozen):
    """How a model stage runs: batch size, actor pool size, what each actor reserves, torch threads."""

    batch_size: int = Field(64, gt=0, description="rows per model forward pass")
    actors: Actors = Field(
        1, description="the actor pool: N actors, or {min: M, max: N} to grow from M to N as the cluster allows"
    )
    resources: Resources = Resources()
    threads: int | None = Field(
        None, ge=1, description="torch threads per actor; default: the CPUs the actor reserves (Ray's rule)"
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @property
    def pool_size(self) -> tuple[int, int]:
        """(min, max) actors of the pool; equal for a fixed pool."""
        if isinstance(self.actors, ActorRange):
            return self.actors.min, self.actors.max
        return self.actors, self.actors

    @model_validator(mode="after")
    def _cuda_needs_gpus(self) -> StageConfig:
        if self.device == "cuda" and self.resources.gpus == 0:
            raise ValueError("device: cuda needs `resources.gpus` > 0, or Ray will not give the actor a GPU")
        return self


class InputConfig(_Frozen):
    path: str = Field(
        description="a .jsonl/.json/.ndjson (also .gz/.zst/.bz2) or .parquet file, a folder, or a glob "
        "(`*` within one folder level, `**` any depth); local or s3://; docs/formats.md"
    )
    format: Literal["auto", "jsonl", "parquet"] = "auto"
    text_field: str = "text"
    id_field: str | None = Field(None, description="column holding a stable id; default: hash of file + row")
    label_field: str | None = None
    labels: list[str] | None = Field(
        None, description="the label set; a row whose label is outside it is quarantined (needs label_field)"
    )
    max_chars: int = Field(
        200_000, gt=0, description="texts longer than this are cut before tokenizing; the ledger flags them"
    )
    score_fields: list[str] = Field(
        default_factory=list,
        description="numeric input columns that other tools computed, used as scores like raysel's own "
        "(select.score, ledger, report); a missing or non-numeric value is unscored (NaN); docs/formats.md",
    )

    @model_validator(mode="after")
    def _labels_need_field(self) -> InputConfig:
        if self.labels is not None and self.label_field is None:
            raise ValueError("labels: a label set needs `label_field` naming the column that holds the labels")
        return self

    @model_validator(mode="after")
    def _score_fields(self) -> InputConfig:
        seen: set[str] = set()
        roles = {self.text_field: "text_field", self.id_field: "id_field", self.label_field: "label_field"}
        for i, name in enumerate(self.score_fields):
            where = f"score_fields[{i}]"
            if not name.strip():
                raise ValueError(f"{where}: a score field needs a name")
            if name in seen:
                raise ValueError(f"{where}: {name!r} is listed twice")
            if name in roles:
                raise ValueError(
                    f"{where}: {name!r} is also the {roles[name]}; a column is a score or a {roles[name]}"
                )
            if name in RESERVED_COLUMNS or name.startswith("__"):
                raise ValueError(
                    f"{where}: {name!r} is the name of a column raysel writes (ledger, scored shards); "
                    f"score fields must not be named {sorted(RESERVED_COLUMNS)} or start with `__`"
                )
            seen.add(name)
        return self


# The columns raysel itself puts in the scored shards and the ledger (reader, embedder, LM scorers' flags, vog,
# cluster assignment, selection; `__*` are the selected-join columns): an input score field may not take one's name.
RESERVED_COLUMNS = frozenset(
    {"id", "text", "label", "source", "row", "reason", "text_cut", "embedding", "embed_cut"}
    | {"lm_tokens", "lm_cut", "vog_raw", "cluster", "centroid_sim", "status"}
)


class OutputConfig(_Frozen):
    """Where the result goes, and the form of OUT/selected (README: the output)."""

    path: str
    overwrite: bool = False
    format: Literal["parquet", "jsonl", "jsonl.gz", "jsonl.zst"] = Field(
        "parquet", description="the selected records' format; JSONL writes each record from its original line"
    )
    annotate: bool = Field(True, description="add raysel's columns (id, cluster, scores) to the selected records")
    prefix: str = Field("", description="put before raysel's column names (e.g. raysel_) so none replaces a field")
    shard_rows: int | None = Field(None, gt=0, description="rows per selected shard (the last may be smaller)")
    shard_bytes: int | None = Field(
        None, gt=0, description="about this many (uncompressed) bytes per shard; default 128 MiB, if no shard_rows"
    )

    @model_validator(mode="after")
    def _one_shard_size(self) -> OutputConfig:
        if self.shard_rows is not None and self.shard_bytes is not None:
            raise ValueError("give one of shard_rows or shard_bytes, not both")
        return self


class EmbedConfig(StageConfig):
    model: str = Field("minilm", description="`minilm` (packaged all-MiniLM-L6-v2) or a local model folder")
    max_tokens: int = Field(128, gt=0)


class ScorerConfig(StageConfig):
    name: str
    model: str = Field("smollm2", description="`smollm2` (packaged SmolLM2-135M) or a local model folder")
    max_tokens: int = Field(128, gt=1)
    batch_size: int = Field(16, gt=0)
    params: dict[str, Any] = Field(default_factory=dict, description="scorer-specific settings (its `Params`)")

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        _known_name(SCORERS, name)
        return name

    @model_validator(mode="after")
    def _params(self) -> ScorerConfig:
        object.__setattr__(self, "params", _validate_params(SCORERS[self.name], self.params, f"scorer {self.name!r}"))
        return self

    def typed_params(self) -> Any:
        """The params as the scorer's own `Params` model (defaults filled in)."""
        return _params_model(SCORERS[self.name]).model_validate(self.params)

    def stage_key(self) -> tuple:
        """Scorers that agree on everything but their name share one actor pool (one model pass)."""
        return tuple(sorted((k, repr(v)) for k, v in self.model_dump().items() if k != "name"))


def _expand_scorer_names(scorers: Any) -> Any:
    """The `scorers: [entropy, loss]` shorthand: a bare name stands for {name: that name}."""
    if isinstance(scorers, list):
        return [{"name": s} if isinstance(s, str) else s for s in scorers]
    return scorers


ScorerList = Annotated[list[ScorerConfig], BeforeValidator(_expand_scorer_names)]


class ClusterConfig(_Frozen):
    k: int = Field(64, ge=1, description="number of k-means clusters (capped at the number of usable rows)")
    sample: int = Field(100_000, ge=1, description="embeddings k-means trains on")
    niter: int = Field(20, ge=1)
    seed: int = 0


class SemDedupConfig(_Frozen):
    """`select.semdedup`: before the policy, drop rows whose cosine to a better-scored row of their cluster exceeds
    `threshold` (raysel/select/semdedup.py)."""

    threshold: float = Field(0.95, gt=-1, le=1, description="cosine above which a row is a near-duplicate")


class DropNoisyConfig(_Frozen):
    """`select.drop_noisy`: before the policy, drop the rows most likely mislabelled: the `fraction` of the candidate
    rows with the noisiest `score` (an exact global cut), or every row at or beyond `threshold`
    (raysel/select/noisy.py). `order: desc` (the default) takes the highest scores as the noisiest (el2n, loss);
    `asc` the lowest (aum: a negative margin marks a label the model keeps contradicting). Unscored rows stay."""

    score: str = Field(description="the noise score column (a scorer's, or an input score field)")
    fraction: float | None = Field(None, gt=0, lt=1, description="drop this fraction of the candidate rows")
    threshold: float | None = Field(None, description="drop every row whose score is at or beyond this")
    order: Literal["asc", "desc"] = Field("desc", description="desc: the highest scores are the noisiest")

    @model_validator(mode="after")
    def _one_rule(self) -> DropNoisyConfig:
        if (self.fraction is None) == (self.threshold is None):
            raise ValueError("set exactly one of `fraction` (e.g. 0.1) or `threshold`")
        return self


class SelectConfig(_Frozen):
    budget: float | int = Field(
        description="a fraction of the usable rows in (0, 1], or a row count >= 1 (write 1.0 for all rows)"
    )
    policy: str = "stratified"
    score: str | None = Field("entropy", description="the score column the policy ranks by")
    order: Literal["asc", "desc"] = Field("desc", description="desc keeps the highest scores")
    threshold: float | None = Field(None, description="`threshold` policy: keep rows whose score passes this")
    seed: int = 0
    params: dict[str, Any] = Field(default_factory=dict, description="policy-specific settings (its `Params`)")
    semdedup: SemDedupConfig | None = Field(None, description="drop near-duplicates inside clusters first")
    drop_noisy: DropNoisyConfig | None = Field(None, description="drop the rows most likely mislabelled first")

    @field_validator("budget", mode="before")
    @classmethod
    def _budget_not_bool(cls, budget: Any) -> Any:
        # Before pydantic's coercion, which reads YAML `true`/`yes`/`on` as 1.0: every row.
        if isinstance(budget, bool):
            raise ValueError(f"must be a fraction in (0, 1] or a row count, got {budget!r} (YAML reads yes/on as true)")
        return budget

    @field_validator("budget")
    @classmethod
    def _budget(cls, budget: float | int) -> float | int:
        if isinstance(budget, float) and not 0 < budget <= 1:
            raise ValueError(f"a fractional budget must be in (0, 1], got {budget}; write a row count as an integer")
        if isinstance(budget, int) and budget < 1:
            raise ValueError(f"a row-count budget must be >= 1, got {budget}")
        return budget

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, policy: str) -> str:
        _known_name(POLICIES, policy)
        return policy

    @model_validator(mode="after")
    def _params(self) -> SelectConfig:
        object.__setattr__(
            self, "params", _validate_params(POLICIES[self.policy], self.params, f"policy {self.policy!r}")
        )
        return self

    def typed_params(self) -> Any:
        return _params_model(POLICIES[self.policy]).model_validate(self.params)


def _known_name(registry: Registry, name: str) -> None:
    try:
        registry[name]
    except UnknownName as err:
        raise ValueError(str(err)) from None  # pydantic reports a ValueError with the field's path


class NoParams(_Frozen):
    """A scorer or policy without settings of its own."""


def _params_model(cls: type) -> type[BaseModel]:
    return getattr(cls, "Params", NoParams)


def _validate_params(cls: type, params: dict[str, Any], what: str) -> dict[str, Any]:
    """Check `params` against the class's `Params` model; errors name the param (params.<name>: ...)."""
    try:
        return _params_model(cls).model_validate(params).model_dump()
    except ValidationError as err:
        problems = "; ".join(
            f"params.{'.'.join(str(p) for p in e['loc'])}: {e['msg'].removeprefix('Value error, ')}"
            for e in err.errors()
        )
        raise ValueError(f"{what}: {problems}") from None


class RayConfig(_Frozen):
    address: str | None = Field(None, description="Ray cluster address; default: RAY_ADDRESS, else a local cluster")


class RunConfig(_Frozen):
    """Everything one selection run needs. Load it with `load_config`."""

    input: InputConfig
    output: OutputConfig
    embed: EmbedConfig = EmbedConfig()
    scorers: ScorerList = Field(default_factory=lambda: [ScorerConfig(name="entropy"), ScorerConfig(name="loss")])
    cluster: ClusterConfig = ClusterConfig()
    select: SelectConfig
    work_dir: str | None = Field(None, description="where scores and clusters are kept for reuse; default: cache")
    shard_rows: int = Field(
        2048,
        gt=0,
        description="rows per scored shard in the work dir: an interrupted run loses at most the "
        "shards being written, and resumes from the rest",
    )
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        names = [s.name for s in self.scorers]
        if len(set(names)) != len(names):
            raise ValueError(f"scorers: each scorer may appear once, got {names}")
        for i, s in enumerate(self.scorers):
            needs_labels = getattr(SCORERS[s.name], "needs_labels", None)
            if needs_labels is not None and needs_labels(s) and self.input.label_field is None:
                raise ValueError(
                    f"scorers[{i}] ({s.name}): trains on labels; set input.label_field to the column holding them"
                )
        for i, field in enumerate(self.input.score_fields):
            if field in names:
                raise ValueError(
                    f"input.score_fields[{i}]: {field!r} is also a scorer in `scorers`; both would be the column "
                    f"{field!r}: drop the scorer or leave the field out"
                )
        if POLICIES[self.select.policy].needs_score:
            columns = self.score_columns
            if self.select.score is None:
                raise ValueError(
                    f"select.score: policy {self.select.policy!r} ranks by a score; name one of {columns}"
                )
            if self.select.score not in columns:
                raise ValueError(
                    f"select.score: {self.select.score!r} is not computed; add it to `scorers` or "
                    f"`input.score_fields`, or choose from {columns}"
                )
        noisy = self.select.drop_noisy
        if noisy is not None and noisy.score not in self.score_columns:
            raise ValueError(
                f"select.drop_noisy.score: {noisy.score!r} is not computed; add it to `scorers` or "
                f"`input.score_fields`, or choose from {self.score_columns}"
            )
        if self.select.policy == "threshold" and self.select.threshold is None:
            raise ValueError("select.threshold: the `threshold` policy needs a threshold value")
        for what, path in (("output.path", self.output.path), ("work_dir", self.work_dir)):
            if path is not None and _is_within(path, input_root(self.input.path)):
                raise ValueError(
                    f"{what}: {path!r} is inside the input folder {input_root(self.input.path)!r}, so the next run "
                    f"would read this run's Parquet files as corpus; put it outside the input"
                )
        return self

    @property
    def score_columns(self) -> list[str]:
        """Every score a policy can rank by: the scorers' columns, then the input's `score_fields`."""
        return [s.name for s in self.scorers] + list(self.input.score_fields)

    def resolved_work_dir(self) -> str:
        return self.work_dir or str(cache_dir() / "work")


def input_root(path: str) -> str:
    """The folder an input path reads from: a glob's folder before its first wildcard, else the path itself."""
    parts = path.split("/")
    for i, part in enumerate(parts):
        if any(ch in part for ch in "*?["):
            return "/".join(parts[:i]) or "."
    return path


def _is_within(path: str, folder: str) -> bool:
    """Lexically, is `path` the folder or under it? (s3:// URIs compared as strings; local paths made absolute)."""
    if path.startswith("s3://") or folder.startswith("s3://"):
        path, folder = path.rstrip("/") + "/", folder.rstrip("/") + "/"
        return path.startswith(folder)
    path, folder = os.path.abspath(os.path.expanduser(path)), os.path.abspath(os.path.expanduser(folder))
    return os.path.commonpath([path, folder]) == folder


def cache_dir() -> Path:
    """raysel's cache root: $RAYSEL_CACHE, else $XDG_CACHE_HOME/raysel, else ~/.cache/raysel."""
    if os.environ.get("RAYSEL_CACHE"):
        return Path(os.environ["RAYSEL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "raysel"


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "config"
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"  {path}: {msg}")
    return "invalid config:\n" + "\n".join(lines)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `dotted.key=value` overrides (values parsed as YAML; list items by index: `scorers.0.batch_size=8`).

    Raises ConfigError naming the override for a bad key, a list index that is not a number or out of range,
    or a value that is not YAML."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected dotted.key=value, e.g. --set select.budget=0.1")
        node: Any = raw
        parts = key.split(".")
        for part in parts[:-1]:
            if isinstance(node, list):
                index = _list_index(item, part, node)
                if isinstance(node[index], str):  # `scorers: [entropy]` shorthand: expand to set a field
                    node[index] = {"name": node[index]}
                node = node[index]
            else:
                node = node.setdefault(part, {})
            if not isinstance(node, dict | list):
                raise ConfigError(f"--set {item!r}: {part!r} is not a section")
        last = parts[-1]
        try:
            parsed = yaml.safe_load(value) if value != "" else None
        except yaml.YAMLError as err:
            problem = str(err).splitlines()[0]
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({problem}); quote it") from None
        if isinstance(node, list):
            node[_list_index(item, last, node)] = parsed
        else:
            node[last] = parsed
    return raw


def _list_index(item: str, part: str, node: list) -> int:
    try:
        index = int(part)
    except ValueError:
        raise ConfigError(f"--set {item!r}: {part!r} is not a list index (the list has {len(node)} items)") from None
    if not -len(node) <= index < len(node):
        raise ConfigError(
            f"--set {item!r}: index {index} is out of range (the list has {len(node)} items: 0..{len(node) - 1})"
        )
    return index


def parse_config(raw: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config, apply `--set` overrides, validate. Raises ConfigError naming each bad field."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigError(f"cannot read config {path}: {err.strerror}") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping (input:, output:, select: ...)")
    return parse_config(apply_overrides(raw, overrides or []))
