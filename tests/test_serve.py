"""The scoring service: config and request checks without Ray, scores against a slow reference, and a real
`raysel serve` (its own local Ray cluster, loopback, a free port) answering good and bad requests over HTTP."""

from __future__ import annotations

import functools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml

from raysel.config import ScorerConfig
from raysel.errors import ConfigError
from raysel.scorers import SCORERS
from raysel.serve import (
    RequestError,
    ScoringService,
    ServeConfig,
    auth_token,
    check_bearer,
    deployment_options,
    load_serve_config,
    parse_request,
    parse_serve_config,
)

BIN = Path(sys.executable).parent
SENTENCES = [
    "The cat sat on the mat.",
    "Interest rates rose again this quarter, the central bank said on Tuesday, as inflation stayed well above target.",
    "mat the on sat cat The.",
    "A new vaccine trial has begun in three countries.",
    "Shares in the company fell sharply after the profit warning.",
    "The orchestra played Beethoven's fifth symphony to a full house.",
]
CONFIG = {
    "scorers": [
        {"name": "entropy", "max_tokens": 16, "batch_size": 8},
        {"name": "loss", "max_tokens": 16, "batch_size": 8, "actors": 3},  # `actors` means nothing in a replica
    ],
    "embed": {"model": "minilm", "max_tokens": 32, "batch_size": 8},
    "limits": {"max_texts": 4, "max_chars": 300, "max_body_bytes": 4096, "read_timeout_s": 2},
    "batching": {"max_texts": 16, "wait_s": 0.05},
    "replicas": {"min": 1, "max": 1},
    "auth_token_env": "RAYSEL_TEST_SERVE_TOKEN",
}
TOKEN = "test-token-" + "0123456789abcdef" * 2  # what the server fixture's environment holds


# --- config and requests, no Ray -----------------------------------------------------------------------------


def test_serve_config_defaults_and_served_names():
    cfg = ServeConfig()
    assert cfg.served == ["entropy", "loss", "embedding"]
    assert parse_serve_config({"embed": None, "scorers": ["loss"]}).served == ["loss"]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"scorers": ["nope"]}, "scorers.0.name: unknown scorer 'nope'"),
        ({"scorers": ["loss", "loss"]}, "each scorer may appear once"),
        ({"scorers": [], "embed": None}, "nothing to serve"),
        ({"replicas": {"min": 3, "max": 1}}, "replicas: min (3) must be <= max (1)"),
        ({"replicas": {"min": 1, "max": 2, "initial": 5}}, "initial (5) must lie between"),
        ({"limits": {"max_texts": 64}, "batching": {"max_texts": 8}}, "one request must fit in one model pass"),
        ({"limits": {"max_chars": 0}}, "limits.max_chars"),
        ({"limits": {"read_timeout_s": 0}}, "limits.read_timeout_s"),
        (
            {"auth_token_env": "s3cr3t token"},
            "auth_token_env: 's3cr3t token' is not an environment variable name",
        ),
        ({"modle": "/etc/passwd"}, "modle: Extra inputs are not permitted"),
    ],
)
def test_bad_serve_configs_name_the_field(raw, message):
    with pytest.raises(ConfigError, match="invalid serve config") as err:
        parse_serve_config(raw)
    assert message in str(err.value)


def test_a_corpus_level_scorer_cannot_be_served(monkeypatch):
    class CorpusScorer:
        inputs = "scored"

    monkeypatch.setitem(SCORERS, "corpus_only", CorpusScorer)
    with pytest.raises(ConfigError, match="'corpus_only' reads the scored shards"):
        parse_serve_config({"scorers": ["corpus_only"]})


def test_load_serve_config_from_yaml(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    assert load_serve_config(path).limits.max_texts == 4
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_serve_config(path)
    with pytest.raises(ConfigError, match="cannot read serve config"):
        load_serve_config(tmp_path / "missing.yaml")


def test_deployment_options_carry_autoscaling_and_resources():
    cfg = parse_serve_config(
        {"replicas": {"min": 0, "max": 4, "initial": 1, "target_ongoing_requests": 3, "resources": {"gpus": 1}}}
    )
    opts = deployment_options(cfg)
    assert opts["autoscaling_config"] == {
        "min_replicas": 0,
        "max_replicas": 4,
        "target_ongoing_requests": 3,
        "initial_replicas": 1,
    }
    assert opts["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1.0}


SMALL = parse_serve_config(CONFIG)


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"\xff\xfe", 400, "not valid JSON"),
        (b"[1, 2]", 422, "must be a JSON object"),
        (b'{"scorers": ["loss"]}', 422, 'needs "texts"'),
        (b'{"texts": "one"}', 422, '"texts" must be a list of strings, got a string'),
        (b'{"texts": ["a", 7]}', 422, '"texts[1]" must be a string, got a number'),
        (b'{"texts": []}', 422, '"texts" is empty'),
        (b'{"texts": ["ok", "\\ud800"]}', 422, '"texts[1]" is not valid Unicode'),
        (b'{"texts": ["a"], "scorers": "loss"}', 422, '"scorers" must be a list'),
        (b'{"texts": ["a"], "scorers": []}', 422, '"scorers" is empty'),
        (b'{"texts": ["a"], "model": "/etc/passwd"}', 422, "unknown field(s) ['model']"),
        (b'{"texts": ["a"], "scorers": ["/etc/passwd"]}', 400, "unknown scorer '/etc/passwd'"),
        (b'{"texts": ["a"], "scorers": ["vog"]}', 400, "this service serves ['entropy', 'loss', 'embedding']"),
        (b'{"texts": ["a", "b", "c", "d", "e"]}', 413, "the limit is 4 per request"),
        (json.dumps({"texts": ["x" * 301]}).encode(), 413, '"texts[0]" has 301 characters; the limit is 300'),
        (b" " * 5000, 413, "the body has 5000 bytes; the limit is 4096"),
        (b"[" * 4000, 400, "nests arrays or objects too deeply"),  # json.loads: RecursionError, not ValueError
        (b'{"texts": [' + b'{"a": [' * 580, 400, "nests arrays or objects too deeply"),
    ],
)
def test_parse_request_refuses_bad_requests(body, status, message):
    with pytest.raises(RequestError) as err:
        parse_request(body, SMALL)
    assert err.value.status == status
    assert message in err.value.message


def test_auth_token_comes_from_the_named_variable(monkeypatch):
    assert auth_token(SMALL.model_copy(update={"auth_token_env": None})) is None
    monkeypatch.delenv("RAYSEL_TEST_SERVE_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="RAYSEL_TEST_SERVE_TOKEN is not set"):
        auth_token(SMALL)
    monkeypatch.setenv("RAYSEL_TEST_SERVE_TOKEN", "two words")
    with pytest.raises(ConfigError, match="visible ASCII characters, without spaces"):
        auth_token(SMALL)
    monkeypatch.setenv("RAYSEL_TEST_SERVE_TOKEN", TOKEN)
    assert auth_token(SMALL) == TOKEN.encode()


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (None, "send `Authorization: Bearer <token>`"),
        ("", "send `Authorization: Bearer <token>`"),
        ("Bearer", "send `Authorization: Bearer <token>`"),
        (f"Basic {TOKEN}", "send `Authorization: Bearer <token>`"),
        ("Bearer wrong", "not this service's"),
        (f"Bearer {TOKEN}x", "not this service's"),
        (f"Bearer {TOKEN[:-1]}", "not this service's"),
        ("Bearer caf\xe9", "not this service's"),
    ],
)
def test_check_bearer_refuses_a_missing_or_wrong_token(header, message):
    with pytest.raises(RequestError) as err:
        check_bearer(header, TOKEN.encode())
    assert err.value.status == 401
    assert message in err.value.message
    assert err.value.headers["WWW-Authenticate"].startswith("Bearer")


def test_check_bearer_accepts_the_token():
    check_bearer(f"Bearer {TOKEN}", TOKEN.encode())
    check_bearer(f"bearer  {TOKEN} ", TOKEN.encode())  # the scheme is case-insensitive (RFC 7235)
    check_bearer(None, None)  # no token configured: open


def test_parse_request_defaults_and_dedupes_scorers():
    assert parse_request(b'{"texts": ["a"]}', SMALL) == (["a"], ["entropy", "loss", "embedding"])
    assert parse_request(b'{"texts": ["a", ""], "scorers": ["loss", "loss"]}', SMALL) == (["a", ""], ["loss"])
    assert parse_request(json.dumps({"texts": ["x" * 300]}).encode(), SMALL)[0] == ["x" * 300]


# --- the scoring core against a slow reference ---------------------------------------------------------------


@pytest.fixture(scope="module")
def service():
    return ScoringService(SMALL, threads=2)


@functools.cache
def _smollm2():
    from raysel.models import load_causal_lm

    return load_causal_lm("smollm2", device="cpu")


def reference_scores(text: str, max_tokens: int) -> tuple[float, float]:
    """(mean entropy, mean NLL) of one text, token by token, from SmolLM2 with no padding and no batching."""
    import torch

    model, tok = _smollm2()
    ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"][: max_tokens - 1]
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    entropies, nlls = [], []
    for t in range(1, len(ids)):
        p = torch.softmax(logits[t - 1], dim=-1)
        entropies.append(float(-(p * torch.log(p.clamp_min(1e-300))).sum()))
        nlls.append(float(-torch.log(p[ids[t]])))
    return float(np.mean(entropies)), float(np.mean(nlls))


def test_entropy_and_loss_share_one_model_pass(service):
    assert [outputs for _, outputs in service.stages] == [("entropy", "loss")]


def test_service_scores_match_a_token_by_token_reference(service):
    results = service.score(SENTENCES[:3], ["entropy", "loss"])
    for text, result in zip(SENTENCES[:3], results, strict=True):
        entropy, loss = reference_scores(text, max_tokens=16)
        assert result["scores"]["entropy"] == pytest.approx(entropy, abs=2e-3)
        assert result["scores"]["loss"] == pytest.approx(loss, abs=2e-3)
    assert results[0]["scores"]["loss"] < results[2]["scores"]["loss"]  # grammatical beats shuffled words
    assert results[1]["truncated"] and not results[0]["truncated"]  # 16 tokens cut the long sentence


def test_service_embedding_matches_the_encoder(service):
    from raysel.models import load_encoder

    got = np.array(service.score(SENTENCES[:2], ["embedding"])[1]["scores"]["embedding"])
    want = load_encoder("minilm", device="cpu", max_tokens=32).encode([SENTENCES[1]], normalize_embeddings=True)[0]
    assert got.shape == (384,)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_a_text_scores_the_same_alone_and_in_a_batch(service):
    texts = SENTENCES[:4]  # a short, a long (cut) and two mid-length texts: padding differs in the batch
    alone = [service.score([t], ["entropy", "loss"])[0]["scores"] for t in texts]
    together = [r["scores"] for r in service.score(texts, ["entropy", "loss"])]
    for a, b in zip(alone, together, strict=True):
        assert a["entropy"] == pytest.approx(b["entropy"], abs=1e-4)
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)


def test_empty_texts_get_null_scores_and_a_reason(service):
    results = service.score(["  ", SENTENCES[0]], ["loss", "embedding"])
    assert results[0] == {"scores": {"loss": None, "embedding": None}, "truncated": False, "reason": "empty text"}
    assert results[1]["reason"] == "" and isinstance(results[1]["scores"]["loss"], float)


# --- a real `raysel serve` over HTTP -------------------------------------------------------------------------


def free_port() -> int:
    while True:
        port = random.randint(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue


def stop_tree(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM `raysel serve` (it shuts Serve and its Ray cluster down), then SIGKILL whatever is left of it."""
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(family, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


def http(
    url: str, body: bytes | None = None, method: str | None = None, token: str | None = TOKEN
) -> tuple[int, dict]:
    """(status, JSON body) of one request, sent with `Authorization: Bearer <token>` unless `token` is None."""
    status, _, got = http_full(url, body, method, token)
    return status, got


def http_full(
    url: str, body: bytes | None = None, method: str | None = None, token: str | None = TOKEN
) -> tuple[int, dict, dict]:
    """(status, headers, JSON body) of one request."""
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    req = urllib.request.Request(
        url, data=body, method=method or ("POST" if body is not None else "GET"), headers=headers
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), json.loads(err.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`raysel serve` on loopback and a free port, with its own local Ray cluster; stopped even when tests fail."""
    tmp = tmp_path_factory.mktemp("serve")
    (tmp / "serve.yaml").write_text(yaml.safe_dump(CONFIG))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own cluster, not a test session's
    env["RAYSEL_TEST_SERVE_TOKEN"] = TOKEN
    env["RAY_agent_register_timeout_ms"] = "180000"  # a busy machine can start Ray's agent slowly
    log = open(tmp / "serve.log", "w")
    # fmt: off
    proc = subprocess.Popen(
        [str(BIN / "raysel"), "serve", "--config", str(tmp / "serve.yaml"), "--host", "127.0.0.1",
         "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    # fmt: on
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"raysel serve exited with {proc.returncode}:\n{(tmp / 'serve.log').read_text()}")
            try:
                if http(url + "/healthz", token=None)[0] == 200:
                    break
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"raysel serve was not healthy in 180 s:\n{(tmp / 'serve.log').read_text()}")
            time.sleep(1)
        yield url
    finally:
        stop_tree(proc, grace_s=30)
        log.close()


def score(url: str, payload: dict) -> tuple[int, dict]:
    return http(url + "/v1/score", json.dumps(payload).encode())


def test_healthz_lists_the_served_scorers(server):
    assert http(server + "/healthz", token=None) == (
        200,
        {"status": "ok", "scorers": ["entropy", "loss", "embedding"]},
    )


@pytest.mark.parametrize("token", [None, "wrong", TOKEN[:-1], TOKEN + "x"])
@pytest.mark.parametrize(("path", "body"), [("/v1/score", b'{"texts": ["a"]}'), ("/v1/models/load", b"{}")])
def test_requests_without_the_token_get_401(server, token, path, body):
    """Every path but /healthz needs the token, unknown ones too (a client without it learns nothing)."""
    status, headers, got = http_full(server + path, body, token=token)
    assert status == 401
    assert headers["www-authenticate"].startswith("Bearer")
    assert "results" not in got and "token" in got["error"]


def test_a_deeply_nested_body_gets_400_over_http(server):
    status, got = http(server + "/v1/score", b"[" * 4000)
    assert status == 400
    assert "nests arrays or objects too deeply" in got["error"]


def half_sent_body(url: str, token: str | None = TOKEN, wait_s: float = 60) -> tuple[float, bytes]:
    """POST with `Content-Length: 200` but only 20 bytes of body, then wait: (seconds until the answer, answer)."""
    host, port = url.removeprefix("http://").split(":")
    head = f"POST /v1/score HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: 200\r\n"
    if token is not None:
        head += f"Authorization: Bearer {token}\r\n"
    with socket.create_connection((host, int(port)), timeout=wait_s) as sock:
        sock.sendall(head.encode() + b"\r\n" + b'{"texts": ["half a b')
        start = time.monotonic()
        answer = b""
        try:
            while b"\r\n\r\n" not in answer:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
        except TimeoutError:
            pass
        return time.monotonic() - start, answer


def test_a_half_sent_body_gets_408_after_the_read_timeout(server):
    """limits.read_timeout_s is 2 s here: the request is answered then, not held for as long as the client likes."""
    waited, answer = half_sent_body(server)
    assert answer.startswith(b"HTTP/1.1 408"), (waited, answer[:300])
    assert 1.5 < waited < 15, waited
    assert score(server, {"texts": [SENTENCES[0]], "scorers": ["loss"]})[0] == 200  # and the replica still serves


def test_score_over_http_equals_the_scoring_core(server, service):
    status, body = score(server, {"texts": SENTENCES[:3] + [""], "scorers": ["entropy", "loss"]})
    assert status == 200
    assert body["scorers"] == ["entropy", "loss"]
    want = service.score(SENTENCES[:3] + [""], ["entropy", "loss"])
    assert [r["reason"] for r in body["results"]] == ["", "", "", "empty text"]
    for got, ref in zip(body["results"], want, strict=True):
        assert got["truncated"] == ref["truncated"]
        for name in ("entropy", "loss"):
            assert got["scores"][name] == pytest.approx(ref["scores"][name], abs=1e-4, nan_ok=False)


def test_a_request_gets_only_the_scorers_it_asks_for(server):
    status, body = score(server, {"texts": [SENTENCES[0]], "scorers": ["embedding"]})
    assert status == 200
    assert list(body["results"][0]["scores"]) == ["embedding"]
    assert np.linalg.norm(body["results"][0]["scores"]["embedding"]) == pytest.approx(1.0, abs=1e-4)


def test_concurrent_requests_are_batched_and_answered_each_with_its_own_texts(server, service):
    """16 requests at once (serve.batch gathers them into shared model passes): each answer is its own."""
    requests = [[SENTENCES[i % 6], SENTENCES[(i + 1) % 6]][: 1 + i % 2] for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda texts: score(server, {"texts": texts, "scorers": ["loss"]}), requests))
    alone = {t: service.score([t], ["loss"])[0]["scores"]["loss"] for t in SENTENCES}
    for texts, (status, body) in zip(requests, answers, strict=True):
        assert status == 200
        assert [r["scores"]["loss"] for r in body["results"]] == pytest.approx([alone[t] for t in texts], abs=1e-4)


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b'{"texts": ["a"', 400, "not valid JSON"),
        (b'{"texts": ["a"], "scorers": ["perplexity"]}', 400, "this service serves ['entropy', 'loss', 'embedding']"),
        (b'{"texts": ["a"], "model": "/etc/passwd"}', 422, "unknown field(s) ['model']"),
        (b'{"texts": [1, 2]}', 422, '"texts[0]" must be a string'),
        (b'{"texts": ["a"], "scorers": [["loss"]]}', 422, '"scorers" must be a list of scorer names'),
        (b'{"texts": ["a", "b", "c", "d", "e"]}', 413, "the limit is 4 per request"),
        (json.dumps({"texts": ["a", "y" * 301]}).encode(), 413, '"texts[1]" has 301 characters'),
        (b'{"texts": ["' + b"z" * 8000 + b'"]}', 413, "the limit is 4096"),
    ],
)
def test_bad_requests_get_4xx_over_http(server, body, status, message):
    got_status, got = http(server + "/v1/score", body)
    assert got_status == status
    assert message in got["error"]


def test_wrong_method_and_unknown_path(server):
    assert http(server + "/v1/score")[0] == 405
    assert http(server + "/healthz", b"{}")[0] == 405
    status, body = http(server + "/v1/models/load", b'{"path": "/etc/passwd"}')
    assert status == 404 and "no route" in body["error"]


def test_the_service_still_scores_after_bad_requests(server):
    assert score(server, {"texts": [SENTENCES[0]], "scorers": ["loss"]})[0] == 200


def test_scorer_config_is_the_run_configs_own():
    """A serve config's scorer sections are run-config `ScorerConfig`s: a section copied from a run config works."""
    assert parse_serve_config(CONFIG).scorers[1] == ScorerConfig(name="loss", max_tokens=16, batch_size=8, actors=3)


def test_raysel_serve_refuses_a_bad_config_before_starting_ray(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("replicas: {min: 3, max: 1}\n")
    result = subprocess.run(
        [str(BIN / "raysel"), "serve", "--config", str(path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert "invalid serve config" in result.stderr and "replicas: min (3) must be <= max (1)" in result.stderr


def test_raysel_serve_refuses_an_unset_token_variable_before_starting_ray(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("auth_token_env: RAYSEL_TEST_UNSET_TOKEN\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAYSEL_TEST_UNSET_TOKEN")}
    result = subprocess.run(
        [str(BIN / "raysel"), "serve", "--config", str(path)], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 2
    assert "auth_token_env names RAYSEL_TEST_UNSET_TOKEN, but RAYSEL_TEST_UNSET_TOKEN is not set" in result.stderr
