"""Selection quality on real labelled corpora: every policy at every budget vs random and full data.

    .venv/bin/python benchmarks/quality.py bbc                 # raysel/configs/eval-bbc.yaml (LM scores)
    .venv/bin/python benchmarks/quality.py bbc-labels          # eval-bbc-labels.yaml (EL2N, classifier entropy)
    .venv/bin/python benchmarks/quality.py fortunes            # Debian fortunes + fortunes-min, 40 categories
    .venv/bin/python benchmarks/quality.py wordnet             # Debian wordnet-base glosses, 45 lexicographer files

Each corpus is an eval config in raysel/configs/eval-<name>.yaml; this script builds the corpora that
come from Debian packages as JSONL in raysel's cache (apt-get install fortunes fortunes-min wordnet-base),
runs `raysel.eval.run_eval`, and prints OUT/results.md. For the BBC evals it also copies the
accuracy-vs-budget plot to docs/img/accuracy-vs-budget-<name>.png (the README shows one). Extra arguments
are `--set` overrides.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

from raysel.config import cache_dir
from raysel.errors import InputError

REPO = Path(__file__).resolve().parents[1]
FORTUNES = Path("/usr/share/games/fortunes")
WORDNET = Path("/usr/share/wordnet")
# The lexicographer files of WordNet 3.0, in lex_filenum order (wndb(5WN) and lexnames(5WN)).
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
    "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
    "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
    "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
    "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()


def fortunes_corpus() -> Path:
    """Every fortune of the installed packages as {id, text, label = its file's name}."""
    if not FORTUNES.is_dir():
        raise InputError("no fortunes here: apt-get install -y fortunes fortunes-min")
    out = cache_dir() / "corpora" / "fortunes.jsonl"
    rows = []
    for f in sorted(p for p in FORTUNES.iterdir() if p.is_file() and not p.suffix and not p.is_symlink()):
        text = f.read_bytes().decode("utf-8", errors="replace")
        for i, chunk in enumerate(text.split("\n%\n")):
            chunk = chunk.strip().removesuffix("%").strip()
            if chunk:
                rows.append({"id": f"{f.name}-{i}", "text": chunk, "label": f.name})
    return _write(out, rows)


def wordnet_corpus() -> Path:
    """Every synset's gloss as {id, text, label = its lexicographer file, e.g. noun.animal}."""
    if not (WORDNET / "data.noun").exists():
        raise InputError("no WordNet here: apt-get install -y wordnet-base")
    out = cache_dir() / "corpora" / "wordnet.jsonl"
    rows = []
    for pos in ("noun", "verb", "adj", "adv"):
        for line in (WORDNET / f"data.{pos}").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("  ") or "|" not in line:  # the license header
                continue
            fields, gloss = line.split("|", 1)
            offset, lex_filenum = fields.split()[:2]
            rows.append({"id": f"{pos}-{offset}", "text": gloss.strip(), "label": LEXNAMES[int(lex_filenum)]})
    return _write(out, rows)


def _write(out: Path, rows: list[dict]) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".partial")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.rename(out)
    return out


CORPORA = {"bbc": None, "bbc-labels": None, "fortunes": fortunes_corpus, "wordnet": wordnet_corpus}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", choices=sorted(CORPORA))
    parser.add_argument("--set", "-s", action="append", default=[], help="eval config override, dotted.key=value")
    args = parser.parse_args()

    from raysel.eval import load_eval_config, run_eval

    overrides = list(args.set)
    if CORPORA[args.corpus] is not None:
        overrides.insert(0, f"corpus.path={CORPORA[args.corpus]()}")
    config = load_eval_config(REPO / "raysel" / "configs" / f"eval-{args.corpus}.yaml", overrides)
    start = time.perf_counter()
    result = run_eval(config, log=lambda line: print(line, flush=True))
    seconds = time.perf_counter() - start
    print(f"\n{args.corpus}: {seconds:.0f} s on {platform.processor() or platform.machine()}\n")
    print((Path(result.output) / "results.md").read_text())
    if args.corpus.startswith("bbc"):
        target = REPO / "docs" / "img" / f"accuracy-vs-budget-{args.corpus}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(result.output) / "accuracy_vs_budget.png", target)
        print(f"plot: {target}")


if __name__ == "__main__":
    main()
