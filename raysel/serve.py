"""The online scoring service: Ray Serve in front of the batch pipeline's own scorer classes.

    POST /v1/score   {"texts": ["...", ...], "scorers": ["entropy", "loss"]}     (`scorers` optional: all served)
         200         {"scorers": ["entropy", "loss"],
                      "results": [{"scores": {"entropy": 3.1, "loss": 4.2}, "truncated": false, "reason": ""}, ...]}
    GET  /healthz    200 {"status": "ok", "scorers": [...]}

Scores come from the same classes the batch pipeline runs (`raysel.scorers.SCORERS`, e.g. `CausalLMScorer`
for `entropy`/`loss`, and `raysel.embed.Embedder` for `embedding`), built from the same `ScorerConfig` /
`EmbedConfig` sections a run config holds, so a text scores the same online as in a batch run with the
same settings. A score is `null` for an empty text (`reason` says so); `truncated` is true when the text
was longer than a scorer's `max_tokens`.

Bad requests get a status and a message that says what to change:
    400  the body is not JSON (or nests too deeply to parse), or it names a scorer the service does not serve
         (the message lists those it does)
    401  `auth_token_env` is set and the request has no `Authorization: Bearer <token>` with that token
    408  the body did not arrive within `limits.read_timeout_s`
    413  the body, one text, or the number of texts is over the service's limits
    422  the body has the wrong shape: not an object, an unknown field, `texts` not a list of strings...
    404 / 405  an unknown path / the wrong method
A request carries only texts and scorer names: the models and files the service loads are fixed by its
config when it starts, and no request can change them.

Layers, so that everything but the HTTP wrapper runs without Ray:
    ServeConfig      the service's settings (YAML); `load_serve_config`
    parse_request    bytes -> (texts, scorers), or RequestError(status, message)
    ScoringService   the models, loaded once; `score(texts, scorers)` -> one result per text
    ScoreIngress     the Ray Serve deployment: routing, body limits, `serve.batch` across requests
    build_app        a Serve application builder (`import_path: raysel.serve:build_app` in a RayService)
    serve_forever    what `raysel serve` runs
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import os
import re
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import Field, ValidationError, field_validator, model_validator
from ray import serve

from raysel.config import EmbedConfig, Resources, ScorerConfig, ScorerList, _format_errors, _Frozen
from raysel.errors import ConfigError, RayselError

APP_NAME = "raysel"
EMBEDDING = "embedding"


# --- configuration -------------------------------------------------------------------------------------------


class Limits(_Frozen):
    """What one request may carry; anything larger is refused with 413 before a model sees it."""

    max_texts: int = Field(32, gt=0, description="texts per request")
    max_chars: int = Field(20_000, gt=0, description="characters per text")
    max_body_bytes: int = Field(4 << 20, gt=0, description="bytes per request body")
    read_timeout_s: float = Field(
        10, gt=0, le=600, description="seconds the whole body may take to arrive; a slower one gets 408"
    )


class Batching(_Frozen):
    """How `serve.batch` gathers concurrent requests into one model pass."""

    max_texts: int = Field(32, gt=0, description="texts per model pass, summed over the gathered requests")
    wait_s: float = Field(0.01, ge=0, le=10, description="how long the first request waits for others to join")


class Replicas(_Frozen):
    """Replica autoscaling and what each replica reserves (Serve's `autoscaling_config`, `ray_actor_options`)."""

    min: int = Field(1, ge=0, description="replicas kept when idle (0 scales to zero)")
    max: int = Field(2, ge=1)
    initial: int | None = Field(None, ge=0, description="replicas at start; default: `min`")
    target_ongoing_requests: float = Field(4, gt=0, description="requests per replica the autoscaler aims for")
    max_ongoing_requests: int = Field(32, gt=0, description="requests a replica holds at once")
    max_queued_requests: int = Field(256, ge=1, description="requests waiting for a replica; more get 503")
    resources: Resources = Resources(cpus=1.0, gpus=0.0)

    @model_validator(mode="after")
    def _bounds(self) -> Replicas:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must be <= max ({self.max})")
        if self.initial is not None and not self.min <= self.initial <= self.max:
            raise ValueError(f"initial ({self.initial}) must lie between min ({self.min}) and max ({self.max})")
        return self


class ServeConfig(_Frozen):
    """The scoring service's settings. `scorers` and `embed` take the same sections as a run config.

    Example:
        >>> cfg = ServeConfig.model_validate({"scorers": ["entropy", "loss"], "limits": {"max_texts": 8}})
        >>> cfg.served
        ['entropy', 'loss', 'embedding']
    """

    scorers: ScorerList = Field(default_factory=lambda: [ScorerConfig(name="entropy"), ScorerConfig(name="loss")])
    embed: EmbedConfig | None = Field(EmbedConfig(), description="serves `embedding` when set; null turns it off")
    limits: Limits = Limits()
    batching: Batching = Batching()
    replicas: Replicas = Replicas()
    auth_token_env: str | None = Field(
        None,
        description="the environment variable that holds a bearer token every request but GET /healthz must "
        "send (`Authorization: Bearer <token>`); unset: no authentication",
    )

    @field_validator("auth_token_env")
    @classmethod
    def _env_name(cls, name: str | None) -> str | None:
        if name is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"{name!r} is not an environment variable name: give the variable's name, not a token")
        return name

    @field_validator("scorers")
    @classmethod
    def _servable(cls, scorers: list[ScorerConfig]) -> list[ScorerConfig]:
        from raysel.scorers import SCORERS

        names = [s.name for s in scorers]
        if len(set(names)) != len(names):
            raise ValueError(f"each scorer may appear once, got {names}")
        for s in scorers:
            if getattr(SCORERS[s.name], "inputs", "text") != "text":
                raise ValueError(
                    f"scorer {s.name!r} reads the scored shards of a whole corpus (inputs = "
                    f"{SCORERS[s.name].inputs!r}), not one text; it runs only in `raysel run`"
                )
        return scorers

    @model_validator(mode="after")
    def _cross_checks(self) -> ServeConfig:
        if not self.served:
            raise ValueError("nothing to serve: list some `scorers` or set `embed`")
        if self.limits.max_texts > self.batching.max_texts:
            raise ValueError(
                f"limits.max_texts ({self.limits.max_texts}) must be <= batching.max_texts "
                f"({self.batching.max_texts}): one request must fit in one model pass"
            )
        return self

    @property
    def served(self) -> list[str]:
        """The names a request may ask for."""
        return [s.name for s in self.scorers] + ([EMBEDDING] if self.embed is not None else [])


def parse_serve_config(raw: dict[str, Any] | None) -> ServeConfig:
    """Validate a service config given as a mapping. Raises ConfigError naming each bad field."""
    try:
        return ServeConfig.model_validate(raw or {})
    except ValidationError as err:
        raise ConfigError(_format_errors(err).replace("invalid config", "invalid serve config")) from None


def load_serve_config(path: str | Path | None) -> ServeConfig:
    """Read a service config from YAML (None: the defaults). Raises ConfigError naming each bad field."""
    if path is None:
        return parse_serve_config({})
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise ConfigError(f"cannot read serve config {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping (scorers:, embed:, limits:, ...)")
    return parse_serve_config(raw)


# --- requests ------------------------------------------------------------------------------------------------


class RequestError(RayselError):
    """A request the service refuses: `status` is the HTTP status, the message says what to change."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


_REQUEST_FIELDS = ("texts", "scorers")


def parse_request(body: bytes, config: ServeConfig) -> tuple[list[str], list[str]]:
    """The texts and scorer names of a `POST /v1/score` body, checked against the service's limits.

    Args:
        body: the raw request body.
        config: the service's config (its limits and the scorers it serves).

    Returns:
        (texts, scorers); `scorers` defaults to every served name, duplicates dropped, order kept.

    Raises:
        RequestError: 400 for a body that is not JSON or an unknown scorer, 413 for too much, 422 for a wrong shape.
    """
    limits = config.limits
    if len(body) > limits.max_body_bytes:
        raise RequestError(413, f"the body has {len(body)} bytes; the limit is {limits.max_body_bytes}")
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise RequestError(400, f'the body is not valid JSON ({err}); send {{"texts": [...]}}') from None
    except RecursionError:  # the parser recurses once per nested array/object
        raise RequestError(
            400, 'the body nests arrays or objects too deeply to parse; send {"texts": [...]}'
        ) from None
    if not isinstance(payload, dict):
        raise RequestError(422, f'the body must be a JSON object like {{"texts": [...]}}, got {_kind(payload)}')
    unknown = sorted(set(payload) - set(_REQUEST_FIELDS))
    if unknown:
        raise RequestError(
            422,
            f"unknown field(s) {unknown}: a request carries only {list(_REQUEST_FIELDS)}; "
            "the models are fixed by the service's config",
        )
    if "texts" not in payload:
        raise RequestError(422, 'the body needs "texts": a list of strings')
    texts = payload["texts"]
    if not isinstance(texts, list):
        raise RequestError(422, f'"texts" must be a list of strings, got {_kind(texts)}')
    if not texts:
        raise RequestError(422, '"texts" is empty; send at least one text')
    if len(texts) > limits.max_texts:
        raise RequestError(
            413, f'"texts" has {len(texts)} items; the limit is {limits.max_texts} per request: split the request'
        )
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise RequestError(422, f'"texts[{i}]" must be a string, got {_kind(text)}')
        if len(text) > limits.max_chars:
            raise RequestError(413, f'"texts[{i}]" has {len(text)} characters; the limit is {limits.max_chars}')
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise RequestError(422, f'"texts[{i}]" is not valid Unicode (a lone surrogate escape)') from None
    scorers = payload.get("scorers", config.served)
    if not isinstance(scorers, list) or not all(isinstance(s, str) for s in scorers):
        raise RequestError(422, f'"scorers" must be a list of scorer names, got {_kind(scorers)}')
    if not scorers:
        raise RequestError(422, f'"scorers" is empty; leave it out for all of {config.served}')
    for name in scorers:
        if name not in config.served:
            raise RequestError(400, f"unknown scorer {name!r}: this service serves {config.served}")
    return texts, list(dict.fromkeys(scorers))


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, int | float) else type(value).__name__
    )


def auth_token(config: ServeConfig) -> bytes | None:
    """The bearer token every request but `GET /healthz` must carry: the value of `config.auth_token_env`.

    Raises:
        ConfigError: the variable is named but unset, empty, or not a token (visible ASCII, no spaces).
    """
    name = config.auth_token_env
    if name is None:
        return None
    token = os.environ.get(name, "")
    if not token:
        raise ConfigError(f"auth_token_env names {name}, but {name} is not set (or empty) in this environment")
    if not re.fullmatch(r"[\x21-\x7e]+", token):
        raise ConfigError(f"{name} must hold a token of visible ASCII characters, without spaces")
    return token.encode("ascii")


def check_bearer(authorization: str | None, token: bytes | None) -> None:
    """Refuse a request (401) whose `Authorization` header does not carry `token`; nothing when `token` is None.

    The token is compared in constant time (`hmac.compare_digest`), so the time taken says nothing about it.
    """
    if token is None:
        return
    scheme, _, given = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise RequestError(
            401, "this service needs a token: send `Authorization: Bearer <token>`", {"WWW-Authenticate": "Bearer"}
        )
    if not hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"), token):
        raise RequestError(
            401, "the bearer token is not this service's", {"WWW-Authenticate": 'Bearer error="invalid_token"'}
        )


# --- scoring (no Ray) ----------------------------------------------------------------------------------------


class ScoringService:
    """The configured models, loaded once, scoring lists of texts with the batch pipeline's stage classes.

    Scorers that share a model and settings share one pass (the pipeline's `scorer_stages` grouping), and a
    stage runs only when a request asks for one of its outputs.

    Args:
        config: the service config; every model it names is loaded here, and no other.
        threads: torch threads; default: the CPUs a replica reserves (at least 1).

    Example:
        >>> service = ScoringService(ServeConfig(scorers=["loss"], embed=None))     # doctest: +SKIP
        >>> service.score(["The cat sat on the mat."], ["loss"])[0]["scores"]["loss"]
        3.9
    """

    def __init__(self, config: ServeConfig, *, threads: int | None = None) -> None:
        from raysel.embed import Embedder
        from raysel.pipeline import scorer_stages

        self.config = config
        threads = threads or max(1, round(config.replicas.resources.cpus))
        # In a replica, `actors` and `resources` of a scorer section mean nothing (the replica's own govern);
        # normalising them lets scorers that differ only there share one model, as in the pipeline.
        replica = {"actors": 1, "resources": config.replicas.resources}
        scorers = [s.model_copy(update={**replica, "threads": s.threads or threads}) for s in config.scorers]
        self.stages = [
            (cls(config=cfg, outputs=outputs), outputs) for cls, cfg, outputs in scorer_stages(scorers, "text")
        ]
        self.embedder = None
        if config.embed is not None:
            embed = config.embed if config.embed.threads else config.embed.model_copy(update={"threads": threads})
            self.embedder = Embedder(embed)

    def score(self, texts: list[str], scorers: list[str]) -> list[dict[str, Any]]:
        """One result per text: {"scores": {name: float | list | None}, "truncated": bool, "reason": str}.

        Args:
            texts: the texts, already within the service's limits.
            scorers: served names to compute (see `ServeConfig.served`).
        """
        n = len(texts)
        reason = np.array(["" if t.strip() else "empty text" for t in texts], dtype=object)
        batch = {"text": np.array(texts, dtype=object), "reason": reason}
        wanted = set(scorers)
        columns: dict[str, np.ndarray] = {}
        truncated = np.zeros(n, dtype=bool)
        for stage, outputs in self.stages:
            if wanted.isdisjoint(outputs):
                continue
            out = stage(dict(batch))
            columns.update({name: out[name] for name in outputs if name in wanted})
            for flag in ("lm_cut", "embed_cut"):
                if flag in out:
                    truncated |= out[flag].astype(bool)
        if EMBEDDING in wanted and self.embedder is not None:
            out = self.embedder(dict(batch))
            columns[EMBEDDING] = out["embedding"]
            truncated |= out["embed_cut"].astype(bool)
        results = []
        for i in range(n):
            scores = {}
            for name in scorers:
                if reason[i]:
                    scores[name] = None
                elif name == EMBEDDING:
                    scores[name] = [float(x) for x in columns[name][i]]
                else:
                    value = float(columns[name][i])
                    scores[name] = None if math.isnan(value) else value
            results.append({"scores": scores, "truncated": bool(truncated[i]), "reason": reason[i]})
        return results


# --- the Serve deployment ------------------------------------------------------------------------------------


def _count_texts(items: list[tuple[list[str], list[str]]]) -> int:
    return sum(len(texts) for texts, _ in items)


class ScoreIngress:
    """The HTTP face of `ScoringService` on Ray Serve: routing, limits, and batching across requests.

    `serve.batch` gathers concurrent requests up to `batching.max_texts` texts (counted by `_count_texts`)
    and runs them as one model pass; the pass runs on a worker thread so that the event loop keeps
    answering health checks and refusing bad requests while a model is busy.

    Args:
        config: the service config as a plain mapping (validated again here, in the replica).
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = parse_serve_config(config)
        self.token = auth_token(self.config)  # from the replica's environment; a missing one fails the deploy
        self.service = ScoringService(self.config)
        self.score_batch.set_max_batch_size(self.config.batching.max_texts)
        self.score_batch.set_batch_wait_timeout_s(self.config.batching.wait_s)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raysel-score")

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        path = request.url.path.rstrip("/") or "/"
        try:
            if path == "/healthz":  # open, for load balancers and probes: it says only what is served
                _require_method(request, "GET")
                return JSONResponse({"status": "ok", "scorers": self.config.served})
            check_bearer(request.headers.get("authorization"), self.token)  # before the body is read
            if path == "/v1/score":
                _require_method(request, "POST")
                texts, scorers = parse_request(await self._read_body(request), self.config)
                results = await self.score_batch((texts, scorers))
                return JSONResponse({"scorers": scorers, "results": results})
            raise RequestError(404, f"no route {path}; use POST /v1/score or GET /healthz")
        except RequestError as err:
            return JSONResponse({"error": err.message}, status_code=err.status, headers=err.headers)

    async def _read_body(self, request: Any) -> bytes:
        """The body, refused with 413 as soon as it passes the byte limit (before it is all read), and with 408
        when it has not all arrived within `limits.read_timeout_s` (a client that sends half a body and waits
        would otherwise hold the request, and a slot of `max_ongoing_requests`, for as long as it likes)."""
        limit, timeout = self.config.limits.max_body_bytes, self.config.limits.read_timeout_s
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestError(413, f"the body has {declared} bytes; the limit is {limit}")

        async def read() -> bytes:
            body = bytearray()
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise RequestError(413, f"the body has more than {limit} bytes; the limit is {limit}")
            return bytes(body)

        try:
            return await asyncio.wait_for(read(), timeout)
        except asyncio.TimeoutError:
            raise RequestError(
                408,
                f"the body did not arrive within {timeout:g} s (limits.read_timeout_s); send it whole",
                {"Connection": "close"},
            ) from None

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01, batch_size_fn=_count_texts)
    async def score_batch(self, items: list[tuple[list[str], list[str]]]) -> list[list[dict[str, Any]]]:
        texts = [t for ts, _ in items for t in ts]
        names = list(dict.fromkeys(n for _, ns in items for n in ns))
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(self.pool, self.service.score, texts, names)
        out, start = [], 0
        for ts, ns in items:
            mine = results[start : start + len(ts)]
            start += len(ts)
            out.append([{**r, "scores": {n: r["scores"][n] for n in ns}} for r in mine])
        return out


def _require_method(request: Any, method: str) -> None:
    if request.method != method:
        raise RequestError(405, f"{request.url.path} takes {method}, not {request.method}", {"Allow": method})


def deployment_options(config: ServeConfig) -> dict[str, Any]:
    """Serve deployment options (autoscaling, resources, queue bounds) from the service config."""
    r = config.replicas
    autoscaling = {
        "min_replicas": r.min,
        "max_replicas": r.max,
        "target_ongoing_requests": r.target_ongoing_requests,
    }
    if r.initial is not None:
        autoscaling["initial_replicas"] = r.initial
    return {
        "name": "ScoreIngress",
        "autoscaling_config": autoscaling,
        "max_ongoing_requests": r.max_ongoing_requests,
        "max_queued_requests": r.max_queued_requests,
        "ray_actor_options": {"num_cpus": r.resources.cpus, "num_gpus": r.resources.gpus},
    }


def app_for(config: ServeConfig) -> Any:
    """The Serve application (not started) for a validated config."""
    return serve.deployment(ScoreIngress, **deployment_options(config)).bind(config.model_dump(mode="json"))


def build_app(args: dict[str, Any]) -> Any:
    """Serve application builder: `import_path: raysel.serve:build_app` in a Serve config or RayService.

    Args:
        args: either {"config": "/path/to/serve.yaml"} or the service config itself, inline
            ({"scorers": [...], "limits": {...}, ...}); empty means the defaults.
    """
    args = dict(args or {})
    if set(args) == {"config"} and isinstance(args["config"], str):
        return app_for(load_serve_config(args["config"]))
    return app_for(parse_serve_config(args))


def serve_forever(
    config_path: str | Path | None, *, host: str = "127.0.0.1", port: int = 8000, address: str | None = None
) -> None:
    """Start the service and block until SIGINT/SIGTERM/SIGHUP (what `raysel serve` runs).

    It joins only the cluster `address` (else RAY_ADDRESS) names; with neither it starts a new local Ray cluster
    for the service (never one `ray start` left running on the machine) and ends all of it on exit. On a cluster
    it joined it deletes only its own application on exit: Serve and whatever else runs there stay.

    Args:
        config_path: a serve config YAML; None for the defaults.
        host: the interface Serve's HTTP proxy listens on: loopback by default; 0.0.0.0 exposes it beyond this
            machine (set `auth_token_env` then).
        port: the HTTP port.
        address: a Ray cluster address ("host:port", or "auto" for the `ray start` cluster on this machine);
            default: RAY_ADDRESS, else a new local cluster.
    """
    from raysel._internal.ray_stage import end_local_cluster, init_ray

    config = load_serve_config(config_path)
    if not (address or os.environ.get("RAY_ADDRESS")):
        auth_token(config)  # a local cluster's replicas get this environment: fail now, not in the deploy
    # No dashboard on a cluster of its own (Serve does not need it) on a shared machine.
    started = init_ray(address, include_dashboard=False)
    if started:
        print("raysel serve: started a local Ray cluster for this service; it ends when the service does", flush=True)
    else:
        import ray

        where = ray.get_runtime_context().gcs_address
        print(
            f"raysel serve: joined the Ray cluster at {where}; on exit only the {APP_NAME!r} app is deleted",
            flush=True,
        )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(app_for(config), name=APP_NAME, route_prefix="/")
        print(f"raysel serve: http://{host}:{port}/v1/score  (serving {config.served}; Ctrl-C stops)", flush=True)
        stop.wait()
    finally:
        if started:
            serve.shutdown()
            end_local_cluster()
        else:
            serve.delete(APP_NAME)
