"""Shared fixtures: one local Ray cluster for the whole session, small real corpora."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The converted SmolLM2 and the tiny test LM, kept across sessions (RAYSEL_TEST_MODEL_CACHE) so CI builds them once.
MODEL_CACHE = Path(os.environ.get("RAYSEL_TEST_MODEL_CACHE", Path.home() / ".cache" / "raysel"))


# `make test` runs the suite in parallel processes (pytest-xdist, `-n 2`); PYTEST_XDIST_WORKER names this one.
WORKER = os.environ.get("PYTEST_XDIST_WORKER")
# The modules that start clusters on 127.0.0.2-4: one unit of work, one module after another on one worker
# (two clusters on the same addresses would find each other's raylets).
MULTINODE_MODULES = {"tests/test_determinism.py", "tests/test_elastic_pools.py", "tests/test_faults.py"}


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """raysel's cache (converted models, work dirs) in one place per session; the converted SmolLM2 is
    shared across sessions through RAYSEL_TEST_MODEL_CACHE so CI converts the GGUF once. Parallel workers
    share the models but keep their own work dirs and demo corpus: two processes running one pass 1 into
    one work dir would each discard the other's half-written shards as a killed run's."""
    cache = MODEL_CACHE
    if WORKER:
        cache = MODEL_CACHE / "workers" / WORKER
        cache.mkdir(parents=True, exist_ok=True)
        (MODEL_CACHE / "models").mkdir(parents=True, exist_ok=True)
        if not (cache / "models").is_symlink():
            (cache / "models").symlink_to(MODEL_CACHE / "models")
    os.environ["RAYSEL_CACHE"] = str(cache)
    yield


def pytest_collection_modifyitems(config, items):
    if WORKER:  # the longest unit first, so that the other worker's modules run beside it, not after it
        items.sort(key=lambda item: item.nodeid.split("::", 1)[0] not in MULTINODE_MODULES)


try:
    from xdist.scheduler import LoadScopeScheduling
except ImportError:  # pytest-xdist is in the `test` extra; without it the suite runs in one process
    pass
else:

    class _ModuleScheduling(LoadScopeScheduling):
        """A test module is a unit of work (its module fixtures are set up once, on one worker), and the
        multi-node modules are one unit together."""

        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "multinode" if module in MULTINODE_MODULES else module

    def pytest_xdist_make_scheduler(config, log):
        config.option.loadscopereorder = False  # in collection order: the multi-node unit first
        return _ModuleScheduling(config, log)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (SeaweedFS) on loopback, with the bucket `raysel-test`. Its endpoint and credentials
    are exported as the standard AWS_* variables, before the Ray cluster starts, so that every Ray worker
    and every `raysel` subprocess reaches it as a user's would."""
    from tests.s3_server import SeaweedS3

    server = SeaweedS3(tmp_path_factory.mktemp("s3"))
    server.start()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    yield server
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """One local Ray cluster for every test that needs one; its address is exported as RAY_ADDRESS so that
    `raysel` subprocesses join it instead of starting their own. Started after the S3 server, so its
    workers see the S3 endpoint and credentials."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    previous = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = address
    yield address
    ray.shutdown()
    if previous is None:
        os.environ.pop("RAY_ADDRESS", None)
    else:
        os.environ["RAY_ADDRESS"] = previous


def tiny_lm() -> str:
    """A 2-layer Llama with seeded random weights and SmolLM2's tokenizer, built once per machine into the test model
    cache: for the tests whose LM scores need only to exist and be deterministic (the pipeline's plumbing, faults,
    resume, determinism, policies). Loading it and scoring with it takes a small fraction of SmolLM2's time (135 M
    parameters); the tests of the LM scorers themselves, and of what the scores mean, keep SmolLM2."""
    import fcntl

    target = MODEL_CACHE / "models" / "tiny-llama-1"  # read before any fixture runs: test modules call it at import
    if (target / "_COMPLETE").exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "_COMPLETE").exists():
            import torch
            from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

            from raysel.models import resolve_causal_lm

            tok = AutoTokenizer.from_pretrained(resolve_causal_lm("smollm2"))
            torch.manual_seed(0)
            config = LlamaConfig(
                vocab_size=len(tok),
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=2,
                intermediate_size=128,
                max_position_embeddings=512,
                tie_word_embeddings=True,
                initializer_range=0.3,  # peaked predictions: entropies that differ from text to text, well above float noise
                bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id,
            )
            LlamaForCausalLM(config).save_pretrained(target)
            tok.save_pretrained(target)
            (target / "_COMPLETE").touch()
    return str(target)


def bbc_sample(n: int, seed: int = 0, max_chars: int = 300) -> list[dict]:
    """n real BBC articles (cut to max_chars), with topic labels, in a seeded order."""
    from raysel.demo import bbc_articles

    articles = bbc_articles()
    random.Random(seed).shuffle(articles)
    return [{"id": a["id"], "text": a["text"][:max_chars], "topic": a["topic"]} for a in articles[:n]]


BAD_LINES = [
    b'{"id": "b1", "text": "unterminated\n',
    b'{"id": "b2", "text": "   "}\n',
    b'{"id": "b3", "text": 17}\n',
    b'{"id": "b4", "text": "caf\xe9"}\n',
    b'{"id": "b5", "body": "no text"}\n',
    b"[1, 2, 3]\n",
]


def write_jsonl(path: Path, rows: list[dict], bad: list[bytes] = ()) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for i, r in enumerate(rows):
            f.write(json.dumps(r).encode() + b"\n")
            if bad and i % max(1, len(rows) // len(bad)) == 0 and i // max(1, len(rows) // len(bad)) < len(bad):
                f.write(bad[i // max(1, len(rows) // len(bad))])
    return path


@pytest.fixture
def small_corpus(tmp_path) -> Path:
    """40 real articles and 6 bad lines of every kind, as JSONL."""
    return write_jsonl(tmp_path / "corpus.jsonl", bbc_sample(40), BAD_LINES)


@pytest.fixture(scope="session")
def three_nodes(tmp_path_factory):
    """A real three-node Ray cluster on this machine (a head with no CPUs + two 2-CPU workers), started once for
    every multi-node test (tests/test_faults.py, tests/test_determinism.py): a start costs about a minute."""
    from tests.multinode import LocalCluster

    cluster = LocalCluster(tmp_path_factory.mktemp("cluster"), worker_cpus=(2, 2), head_cpus=0)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def three_node_clean(three_nodes, tmp_path_factory) -> Path:
    """The fault-free run on the three nodes (its output folder; its work dir, pass 1 done, is `clean-work`
    beside it): the reference of the fault tests and one side of the determinism tests."""
    from tests.multinode import FILES, ROWS_PER_FILE, finish, run_on, three_node_config

    root = tmp_path_factory.mktemp("three-nodes")
    rows = bbc_sample(FILES * ROWS_PER_FILE, seed=21, max_chars=200)
    for i in range(FILES):
        write_jsonl(root / "corpus" / f"part-{i}.jsonl", rows[i * ROWS_PER_FILE : (i + 1) * ROWS_PER_FILE])
    finish(run_on(three_nodes.address, three_node_config(root, "clean"), three_nodes.env))
    return root / "clean"
