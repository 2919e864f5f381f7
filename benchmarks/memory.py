"""Peak driver memory and time of pass 1, and of the whole run, at 10k, 100k and 1M rows.

The driver only plans and watches the stream; rows, texts and embeddings stay in the workers and
the object store. To make 1M rows feasible on 2 CPU cores, this runs pass 1 with tiny
randomly-initialised local models (a 2-layer BERT encoder and a 2-layer Llama with the real
tokenizers): the driver's memory does not depend on the models' size, only the run time does.
The rows are short synthetic texts made from real BBC sentences, repeated and perturbed.

    python benchmarks/memory.py [--sizes 10000 100000 1000000] [--policy stratified|random|bandit] [--k 64] [--out RESULTS.md]

With `--no-lm` the rows carry a synthetic `quality` field (input.score_fields), so that the scored policies
(`stratified`, `topk`) have a score to rank by without the LM stage. The work dir of each size is kept under
--root, so a second invocation with another policy or k reuses pass 1.

Each size runs in a fresh driver process (its own `ray.init`), so its peak RSS (ru_maxrss) is its own:
first pass 1 alone (its peak must not grow with the corpus), then the whole run (`raysel.pipeline.run`,
which reuses pass 1 from the work dir) for the time and driver memory of clustering, selection and writing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from throughput import emit  # noqa: E402

ROWS_PER_FILE = 100_000
# The LM stage's 49k-token vocabulary makes even a 2-layer LM slow (~55 rows/s here: a softmax over 49k
# logits per token); `--no-lm` measures the same driver with the embedding stage alone (~1,000 rows/s),
# which is what reaches 1M rows on 2 cores. The flag reaches the per-size process through this variable.
LM_ENV = "RAYSEL_BENCH_LM"


def make_tiny_models(root: Path) -> tuple[Path, Path]:
    """A 2-layer BERT (sentence-transformers mean pooling) and a 2-layer Llama, random weights, real tokenizers."""
    from transformers import AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    from raysel.models import resolve_causal_lm, resolve_encoder

    enc_dir, lm_dir = root / "tiny-encoder", root / "tiny-lm"
    if not (enc_dir / "config.json").exists():
        tok = AutoTokenizer.from_pretrained(resolve_encoder("minilm"))
        BertModel(
            BertConfig(
                vocab_size=tok.vocab_size,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
                max_position_embeddings=512,
            )
        ).save_pretrained(enc_dir)
        tok.save_pretrained(enc_dir)
    if not (lm_dir / "config.json").exists():
        tok = AutoTokenizer.from_pretrained(resolve_causal_lm("smollm2"))
        LlamaForCausalLM(
            LlamaConfig(
                vocab_size=len(tok),
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=2,
                intermediate_size=64,
                max_position_embeddings=512,
            )
        ).save_pretrained(lm_dir)
        tok.save_pretrained(lm_dir)
    return enc_dir, lm_dir


def make_corpus(root: Path, rows: int) -> Path:
    from raysel.demo import bbc_articles

    folder = root / f"corpus-{rows}"
    if folder.exists():
        return folder
    sentences = [s.strip() for a in bbc_articles() for s in re.split(r"(?<=[.!?])\s+", a["text"]) if len(s) > 30]
    rng = random.Random(0)
    folder.mkdir(parents=True)
    for start in range(0, rows, ROWS_PER_FILE):
        with open(folder / f"part-{start // ROWS_PER_FILE:04d}.jsonl", "w") as f:
            for _ in range(start, min(rows, start + ROWS_PER_FILE)):
                words = rng.choice(sentences).split()
                j = rng.randrange(len(words))
                words[j] = f"{words[j]}{rng.randrange(1000)}"  # perturbed: no two rows alike
                f.write(json.dumps({"text": " ".join(words[:24]), "quality": round(rng.random(), 6)}) + "\n")
    return folder


def bench_config(corpus: Path, enc: Path, lm: Path, work: Path, policy: str, k: int, with_lm: bool):
    from raysel.config import parse_config

    lm_stage = {"name": "entropy", "model": str(lm), "batch_size": 128, "max_tokens": 32}
    score = "entropy" if with_lm else "quality"
    # bandit: a cheap probe (the tiny LM's loss) on at most 8 rows × 16 clusters × 8 rounds, so that the table
    # shows what the planned bandit costs the driver, not what an expensive scorer costs the probe actors.
    probe = {"name": "loss", "model": str(lm), "batch_size": 64, "max_tokens": 32}
    bandit = {"params": {"probe_scorer": probe, "per_arm": 8, "arms_per_round": 16, "max_rounds": 8}}
    extra = bandit if policy == "bandit" else {}
    return parse_config(
        {
            "input": {"path": str(corpus), **({} if with_lm else {"score_fields": ["quality"]})},
            "output": {"path": str(work / f"out-{policy}-{k}"), "overwrite": True},
            "embed": {"model": str(enc), "batch_size": 256, "max_tokens": 32},
            "scorers": [lm_stage] if with_lm else [],
            "cluster": {"k": k},
            "select": {"budget": 0.1, "policy": policy, **({} if policy == "random" else {"score": score}), **extra},
            "work_dir": str(work),
        }
    )


def synthesize_pass1(cfg, template_scores: Path) -> int:
    """Pass 1's output for `cfg`'s corpus made from a real pass 1 over its first file (`template_scores`), so that
    passes 2-4 can be measured at 10M rows without the ~50 minutes pass 1 takes there on 2 cores. Each file's shards
    copy the template's schema, embeddings (in a seeded permutation per file) and flags; id, source and row are the
    file's own, and `quality` is read from the file, so the write pass joins the selected rows back to real records.
    Returns the rows written (0 when the work dir already holds this key's pass 1)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.json as pj
    import pyarrow.parquet as pq

    from raysel.io.read import list_input, stable_id
    from raysel.pipeline import score_key

    files = list_input(cfg.input)
    base = Path(cfg.resolved_work_dir()) / score_key(cfg, files)
    if (base / "_SUCCESS").exists():
        return 0
    template = pq.read_table(template_scores)
    template = template.take(pc.sort_indices(template, [("row", "ascending")]))
    assert template.num_rows == ROWS_PER_FILE and set(pc.unique(template["source"]).to_pylist()) == {"part-0000.jsonl"}
    out = base / "scores"
    out.mkdir(parents=True, exist_ok=True)
    rows = 0
    for n, f in enumerate(files):
        quality = pj.read_json(f.uri).column("quality")
        table = template.slice(0, len(quality))
        perm = np.random.default_rng(n).permutation(table.num_rows)
        own = {
            "embedding": table["embedding"].take(perm),
            "quality": quality,
            "id": [stable_id(f.rel, r) for r in range(table.num_rows)],
            "source": [f.rel] * table.num_rows,
        }
        for name, values in own.items():  # in the template's types, so every shard has pass 1's schema
            field = template.schema.field(name)
            table = table.set_column(table.schema.get_field_index(name), field, pa.array(values, field.type))
        for start in range(0, table.num_rows, cfg.shard_rows):  # pass 1's shard size
            pq.write_table(table.slice(start, cfg.shard_rows), out / f"{n:05d}_{start // cfg.shard_rows:06d}.parquet")
        rows += table.num_rows
    (base / "meta.json").write_text(json.dumps({"synthetic_from": str(template_scores)}))
    (base / "_SUCCESS").write_text("")
    return rows


def status_mib(field: str) -> float:
    """A memory line of /proc/self/status (VmRSS: now, VmHWM: this process image's peak) in MiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(f"{field}:")) / 1024


def pass1_template(root: Path, enc: Path, lm: Path) -> Path:
    """The work-dir folder of the real pass 1 over the first ROWS_PER_FILE rows (embedding stage only)."""
    from raysel.io.read import list_input
    from raysel.pipeline import score_key

    cfg = bench_config(
        make_corpus(root, ROWS_PER_FILE), enc, lm, root / f"work-{ROWS_PER_FILE}-nolm", "random", 64, False
    )
    return Path(cfg.resolved_work_dir()) / score_key(cfg, list_input(cfg.input))


@contextlib.contextmanager
def phase_peaks(every_s: float = 0.2):
    """{"rss" | "anon": {pass: the driver's highest sampled VmRSS / RssAnon (MiB) during it}}: which pass the
    whole run's peak comes from, and how much of it is the driver's own memory. RSS also counts the pages of
    Ray's object store (shared memory) the driver has mapped to read a block, and those stay counted while
    the store keeps them mapped; RssAnon is the process's private memory alone."""
    import threading

    from raysel import pipeline

    peaks: dict[str, dict[str, float]] = {"rss": {}, "anon": {}}
    phase = ["start"]
    timed = pipeline._timed

    @contextlib.contextmanager
    def tracked(timings, name):
        phase[0] = name
        with timed(timings, name):
            yield
        phase[0] = f"after {name}"

    def sample(stop: threading.Event) -> None:
        while not stop.wait(every_s):
            for kind, field in (("rss", "VmRSS"), ("anon", "RssAnon")):
                peaks[kind][phase[0]] = round(max(status_mib(field), peaks[kind].get(phase[0], 0.0)), 1)

    stop = threading.Event()
    thread = threading.Thread(target=sample, args=(stop,), daemon=True)
    pipeline._timed = tracked
    thread.start()
    try:
        yield peaks
    finally:
        stop.set()
        thread.join()
        pipeline._timed = timed


def measure(corpus: Path, enc: Path, lm: Path, work: Path, policy: str, k: int) -> dict:
    """Runs in a fresh process: pass 1 alone, then the whole run (pass 1 reused); seconds and driver peak RSS."""
    import resource

    from raysel._internal.ray_stage import init_ray
    from raysel.io.read import list_input
    from raysel.pipeline import run, score_pass

    with_lm = os.environ.get(LM_ENV, "1") == "1"
    cfg = bench_config(corpus, enc, lm, work, policy, k, with_lm)
    files = list_input(cfg.input)
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    init_ray(None)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False

    def peak_mib() -> float:
        # VmHWM is this process image's own peak; ru_maxrss carries over the parent's RSS at fork across exec
        # (Linux keeps it in the signal struct), which a parent that built large synthetic shards would inflate.
        try:
            return round(status_mib("VmHWM"), 1)
        except (OSError, StopIteration):
            return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)

    rss_before = peak_mib()
    start = time.perf_counter()
    _, _, info = score_pass(cfg, files)
    seconds = time.perf_counter() - start
    pass1_peak = peak_mib()
    # The whole run: pass 1 is found in the work dir and reused, so its seconds are the other passes'.
    with phase_peaks() as peaks:
        result = run(cfg)
    passes = result.manifest["seconds"]
    return {
        "seconds": round(seconds, 1),
        "rows": info["scored_rows"],
        "peak_rss_mib": pass1_peak,
        "rss_at_start_mib": rss_before,
        "later_passes_seconds": {k: v for k, v in passes.items() if k != "score"},
        "run_peak_rss_mib": peak_mib(),
        "phase_peak_rss_mib": peaks["rss"],
        "phase_peak_anon_mib": peaks["anon"],
        "run_peak_anon_mib": max(peaks["anon"].values(), default=float("nan")),
        "selected": result.manifest["counts"]["selected"],
        "select_passes": result.manifest.get("selection", {}).get("passes"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--root", default=str(Path(tempfile.gettempdir()) / "raysel-memory-bench"))
    parser.add_argument("--out", help="append the Markdown table to this file")
    parser.add_argument("--no-lm", action="store_true", help="pass 1 with the embedding stage only (faster)")
    parser.add_argument("--policy", default="random", help="the selection policy (random, stratified, topk, ...)")
    parser.add_argument("--k", type=int, default=64, help="clusters")
    parser.add_argument(
        "--synthetic-pass1",
        action="store_true",
        help="above 100k rows, make pass 1's shards from a real pass 1 over the first file (with --no-lm; "
        "see synthesize_pass1): passes 2-4 at 10M rows without pass 1's ~50 minutes",
    )
    parser.add_argument("--_one", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._one:
        corpus, enc, lm, work = map(Path, args._one)
        print(json.dumps(measure(corpus, enc, lm, work, args.policy, args.k)))
        return

    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    enc, lm = make_tiny_models(root)
    results = []
    template = None
    for size in args.sizes:
        corpus = make_corpus(root, size)
        work = root / f"work-{size}-{'lm' if not args.no_lm else 'nolm'}"
        if args.synthetic_pass1 and size > ROWS_PER_FILE:
            if not args.no_lm:
                parser.error("--synthetic-pass1 needs --no-lm (the template's columns are the embedding stage's)")
            template = template or pass1_template(root, enc, lm)
            if not (template / "_SUCCESS").exists():
                parser.error(f"--synthetic-pass1: no real pass 1 at {ROWS_PER_FILE:,} rows yet; run that size first")
            start = time.perf_counter()
            made = synthesize_pass1(
                bench_config(corpus, enc, lm, work, args.policy, args.k, False), template / "scores"
            )
            print(f"{size}: synthetic pass 1, {made:,} rows in {time.perf_counter() - start:.0f} s", flush=True)
        proc = subprocess.run(
            [sys.executable, __file__, "--_one", str(corpus), str(enc), str(lm), str(work)]
            + ["--policy", args.policy, "--k", str(args.k)],
            env={**os.environ, LM_ENV: "0" if args.no_lm else "1"},
            capture_output=True,
            text=True,
        )
        if proc.returncode:
            sys.exit(f"{size} rows: the run failed:\n{proc.stderr[-5000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append((size, result))
        print(size, result, flush=True)
    lines = [
        f"policy `{args.policy}`, k = {args.k}:",
        "",
        "| rows | pass 1 seconds | pass 1 rows/s | driver RSS after ray.init (MiB) | driver peak, pass 1 (MiB) "
        "| passes 2-4 seconds (cluster / select / write) | driver peak, whole run (MiB) "
        "| driver private peak, whole run (RssAnon, MiB) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for size, r in results:
        later = r["later_passes_seconds"]
        lines.append(
            f"| {size:,} | {r['seconds'] if r['rows'] else 'reused'} "
            f"| {r['rows'] / r['seconds'] if r['rows'] else float('nan'):.0f} | {r['rss_at_start_mib']} "
            f"| {r['peak_rss_mib']} | {later['cluster']:.1f} / {later['select']:.1f} / {later['write']:.1f} "
            f"| {r['run_peak_rss_mib']} | {r['run_peak_anon_mib']} |"
        )
    emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
