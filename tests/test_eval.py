"""raysel/eval.py: a tiny real eval (60 BBC articles, 2 budgets, 2 seeds) checked against an independent refit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from raysel.errors import ConfigError
from raysel.eval import macro_f1, parse_eval_config, run_eval, stratified_holdout
from raysel.select import budget_rows
from tests.conftest import bbc_sample, write_jsonl

BUDGETS = [0.25, 0.5]
SEEDS = 2


def tiny_raw(root: Path) -> dict:
    corpus = write_jsonl(root / "corpus.jsonl", bbc_sample(60))
    return {
        "corpus": {"path": str(corpus), "label_field": "topic", "id_field": "id"},
        "test": {"fraction": 0.25, "seed": 0},
        "output": str(root / "eval"),
        "work_dir": str(root / "work"),
        "scorers": [{"name": "entropy", "max_tokens": 16}, {"name": "loss", "max_tokens": 16}],
        "cluster": {"k": 3},
        "policies": [{"select": {"policy": "topk", "score": "entropy", "order": "desc"}}],
        "budgets": BUDGETS,
        "seeds": SEEDS,
    }


@pytest.fixture(scope="module")
def tiny_eval(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    raw = tiny_raw(root)
    lines: list[str] = []
    result = run_eval(parse_eval_config(raw), log=lines.append)
    return root, raw, result, lines


def _split_sizes(raw: dict) -> tuple[int, int]:
    from raysel.eval import prepare_splits

    _, train, test = prepare_splits(parse_eval_config(raw))
    return len(train), len(test)


def test_every_policy_budget_and_seed_is_measured(tiny_eval):
    root, raw, result, lines = tiny_eval
    n_train, n_test = _split_sizes(raw)
    assert n_train + n_test == 60 and n_test == sum(round(0.25 * n) for n in _topic_counts(raw))
    rows = result.results.to_pylist()
    assert lines[0].startswith(f"eval: {n_train} train rows, {n_test} test rows, 5 labels")
    keys = {(r["policy"], r["budget"], r["seed"]) for r in rows}
    expected = {(p, b, s) for p in ("random", "topk-entropy-high") for b in BUDGETS for s in range(SEEDS)}
    assert keys == expected | {("full", 1.0, s) for s in range(SEEDS)}
    for r in rows:
        assert r["train_rows"] == (n_train if r["policy"] == "full" else budget_rows(r["budget"], n_train))
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["macro_f1"] <= 1.0
    # each selection is a committed pipeline run of its own, with a report
    run_dir = root / "eval" / "runs" / "topk-entropy-high" / "budget-0.5" / "seed-1"
    assert (run_dir / "_SUCCESS").exists()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["config"]["select"] == manifest["config"]["select"] | {"budget": 0.5, "seed": 1, "policy": "topk"}
    assert manifest["config"]["cluster"]["seed"] == 1
    # the scores were computed once: every run after the first reused them
    reused = [
        json.loads(p.read_text())["reuse"]["scores"]["reused"] for p in (root / "eval" / "runs").rglob("manifest.json")
    ]
    assert len(reused) == 2 * len(BUDGETS) * SEEDS and sum(reused) == len(reused) - 1


def _topic_counts(raw: dict) -> list[int]:
    from collections import Counter

    rows = [json.loads(line) for line in Path(raw["corpus"]["path"]).read_text().splitlines()]
    return list(Counter(r["topic"] for r in rows).values())


def test_accuracy_equals_an_independent_refit(tiny_eval):
    """Refit from the selected rows' files and a fresh encoder: the same accuracy (to one test row)."""
    from sentence_transformers import SentenceTransformer
    from sklearn.linear_model import LogisticRegression

    from raysel.eval import prepare_splits
    from raysel.models import resolve_encoder

    root, raw, result, _ = tiny_eval
    _, _, test = prepare_splits(parse_eval_config(raw))
    encoder = SentenceTransformer(str(resolve_encoder("minilm")), device="cpu", local_files_only=True)
    encoder.max_seq_length = 128
    for policy, budget in (("topk-entropy-high", 0.5), ("random", 0.25)):
        chosen = pq.read_table(root / "eval" / "runs" / policy / f"budget-{budget}" / "seed-0" / "selected")
        x = encoder.encode(chosen.column("text").to_pylist(), normalize_embeddings=True)
        y = np.array(chosen.column("label").to_pylist())  # the train split names it `label`
        x_test = encoder.encode(list(test.texts), normalize_embeddings=True)
        if len(set(y)) > 1:
            predicted = LogisticRegression(C=10.0, max_iter=2000).fit(x, y).predict(x_test)
        else:
            predicted = np.full(len(x_test), y[0])
        reference = float(np.mean(predicted == test.labels.astype(str)))
        measured = next(
            r["accuracy"]
            for r in result.results.to_pylist()
            if (r["policy"], r["budget"], r["seed"]) == (policy, budget, 0)
        )
        assert abs(measured - reference) <= 1 / len(test) + 1e-9, (policy, budget, measured, reference)


def test_summary_is_the_mean_and_std_over_seeds(tiny_eval):
    _, _, result, _ = tiny_eval
    df = result.results.to_pandas()
    ref = df.groupby(["policy", "budget"])["accuracy"].agg(["mean", "std"])
    for r in result.summary.to_pylist():
        assert r["seeds"] == SEEDS
        assert r["accuracy_mean"] == pytest.approx(ref.loc[(r["policy"], r["budget"]), "mean"])
        assert r["accuracy_std"] == pytest.approx(ref.loc[(r["policy"], r["budget"]), "std"])


def test_writes_table_markdown_and_plot(tiny_eval):
    import matplotlib.image

    root, raw, result, _ = tiny_eval
    n_train, n_test = _split_sizes(raw)
    out = root / "eval"
    assert pq.read_table(out / "results.parquet").num_rows == result.results.num_rows
    assert pq.read_table(out / "summary.parquet").num_rows == 2 * len(BUDGETS) + 1
    md = (out / "results.md").read_text()
    assert "| policy | 25 % | 50 % |" in md and f"full ({n_train} rows)" in md
    full = next(r for r in result.summary.to_pylist() if r["policy"] == "full")
    assert f"{100 * full['accuracy_mean']:.2f} ± {100 * full['accuracy_std']:.2f}" in md
    image = matplotlib.image.imread(out / "accuracy_vs_budget.png")
    assert image.shape[0] > 200 and image.shape[1] > 300
    assert image[..., :3].std() > 0.05  # not a blank canvas
    assert json.loads((out / "eval.json").read_text())["n_test"] == n_test


def test_a_second_eval_reuses_every_selection(tiny_eval):
    _, raw, result, _ = tiny_eval
    lines: list[str] = []
    again = run_eval(parse_eval_config(raw), log=lines.append)
    selections = [line for line in lines if "budget" in line]
    assert len(selections) == 2 * len(BUDGETS) * SEEDS and all("reused" in line for line in selections)
    assert again.results.column("accuracy").to_pylist() == result.results.column("accuracy").to_pylist()


def test_cli_eval_with_the_finetuned_classifier(tiny_eval, tmp_path):
    """`raysel eval` with the fine-tuned MiniLM downstream (2 steps: the path, not the quality)."""
    from typer.testing import CliRunner

    from raysel.cli import app

    _, raw, _, _ = tiny_eval
    n_train, _ = _split_sizes(raw)
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "ft"
    sets = [f"output={out}", "downstream.model=finetune", "downstream.steps=2", "downstream.max_tokens=16"]
    sets += ["budgets=[0.5]", "seeds=1"]
    result = CliRunner().invoke(app, ["eval", str(config), *[a for s in sets for a in ("--set", s)]])
    assert result.exit_code == 0, result.output
    rows = pq.read_table(out / "results.parquet").to_pylist()
    half = budget_rows(0.5, n_train)
    assert {(r["policy"], r["train_rows"]) for r in rows} == {
        ("random", half),
        ("topk-entropy-high", half),
        ("full", n_train),
    }
    assert f"results: {out}/results.md" in result.output


def test_finetuning_learns_two_topics():
    """50 steps of fine-tuning separate sport from business far better than chance."""
    from raysel.eval import DownstreamConfig, finetune_predict

    rows = [r for r in bbc_sample(200, seed=1) if r["topic"] in ("sport", "business")][:60]
    train, test = rows[:40], rows[40:]
    config = DownstreamConfig(model="finetune", steps=30, batch_size=8, max_tokens=32)
    predicted = finetune_predict(
        [r["text"] for r in train],
        np.array([r["topic"] for r in train], dtype=object),
        np.array([r["text"] for r in test], dtype=object),
        config,
        seed=0,
        classes=["business", "sport"],
    )
    accuracy = np.mean(predicted == np.array([r["topic"] for r in test]))
    assert accuracy >= 0.8, accuracy


def test_stratified_holdout():
    labels = np.array(["a"] * 10 + ["b"] * 5 + ["c"], dtype=object)
    mask = stratified_holdout(labels, 0.2, seed=7)
    assert (mask[labels == "a"].sum(), mask[labels == "b"].sum(), mask[labels == "c"].sum()) == (2, 1, 0)
    np.testing.assert_array_equal(mask, stratified_holdout(labels, 0.2, seed=7))
    assert any(not np.array_equal(mask, stratified_holdout(labels, 0.2, seed=s)) for s in range(20))


def test_macro_f1_equals_sklearn():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    classes = ["a", "b", "c", "d"]
    for _ in range(20):
        y = rng.choice(classes[:3], 30).astype(object)  # "d" never occurs: skipped when never predicted
        p = rng.choice(classes, 30).astype(object)
        present = sorted(set(y) | set(p))
        assert macro_f1(y, p, classes) == pytest.approx(f1_score(y, p, labels=present, average="macro"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"policies": [{"select": {"policy": "topk", "score": "entropy", "budget": 0.1}}]}, "select.budget"),
        ({"policies": [{"select": {"policy": "topk", "score": "perplexity"}}]}, "policies[0]"),
        ({"policies": [{"name": "full", "select": {"policy": "random"}}]}, "`full`"),
        ({"policies": [{"select": {"policy": "topk"}}, {"select": {"policy": "topk"}}]}, "names must be distinct"),
        ({"budgets": [0.1, 1.5]}, "budgets"),
        ({"seeds": 0}, "seeds"),
        ({"downstream": {"model": "svm"}}, "downstream.model"),
    ],
)
def test_config_errors_name_the_field(tmp_path, change, message):
    raw = {"corpus": {"path": "x.jsonl"}, "output": str(tmp_path / "o")} | change
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_eval_config(raw)


def test_label_noise_flips_the_share_asked_to_another_label_seeded():
    from raysel.eval import flip_labels

    labels = np.array(["a"] * 50 + ["b"] * 30 + ["c"] * 20, dtype=object)
    noisy = flip_labels(labels, 0.2, seed=3)
    assert (noisy != labels).sum() == 20 and set(noisy) == {"a", "b", "c"}
    np.testing.assert_array_equal(noisy, flip_labels(labels, 0.2, seed=3))
    assert not np.array_equal(noisy, flip_labels(labels, 0.2, seed=4))


def test_noisy_corpus_flips_train_labels_only(tmp_path):
    from raysel.eval import prepare_splits

    raw = {"corpus": {"path": str(write_jsonl(tmp_path / "c.jsonl", bbc_sample(100))), "label_field": "topic"}}
    raw |= {"output": str(tmp_path / "o"), "work_dir": str(tmp_path / "w"), "test": {"fraction": 0.2}}
    _, clean_train, clean_test = prepare_splits(parse_eval_config(raw))
    raw["corpus"]["label_noise"] = 0.2
    _, train, test = prepare_splits(parse_eval_config(raw))
    np.testing.assert_array_equal(train.ids, clean_train.ids)
    assert (train.labels != clean_train.labels).sum() == round(0.2 * len(train))
    np.testing.assert_array_equal(test.labels, clean_test.labels)


def test_tfidf_downstream_learns_topics_from_words():
    from raysel.eval import DownstreamConfig, tfidf_predict

    rows = bbc_sample(300, seed=2)
    train, test = rows[:200], rows[200:]
    predicted = tfidf_predict(
        [r["text"] for r in train],
        np.array([r["topic"] for r in train], dtype=object),
        np.array([r["text"] for r in test], dtype=object),
        DownstreamConfig(model="tfidf"),
        seed=0,
    )
    assert np.mean(predicted == np.array([r["topic"] for r in test])) >= 0.85


@pytest.mark.skipif(not Path("/usr/share/games/fortunes").is_dir(), reason="Debian fortunes not installed")
def test_the_fortunes_corpus_is_labelled_by_file():
    from raysel.eval import _read_rows

    rows = _read_rows("fortunes", parse_eval_config({"corpus": {"path": "fortunes"}, "output": "o"}).corpus)
    assert len(rows) > 10_000 and len({r["label"] for r in rows}) == 43
    assert all(r["text"] and not r["text"].endswith("%") for r in rows)
