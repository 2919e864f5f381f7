"""lm_influence against a slow reference: per-text autograd of the full weight gradient, dense Kronecker matrix."""

import json

import numpy as np
import pytest
import torch

from raysel.config import ScorerConfig
from raysel.errors import ConfigError
from raysel.scorers._logra import KroneckerProjector, kron_dims
from raysel.scorers.lm_influence import LMInfluenceScorer, read_texts

WORDS = (
    "the a of to and in on for with market shares profit bank company growth film music star award game "
    "team match goal player election minister party vote government phone software computer network users "
    "rose fell said will was is are new year first last people world record"
).split()

POOL = [
    "the market rose and shares of the bank fell",
    "the team won the match with a late goal",
    "the minister said the election will be in the new year",
    "the film star won an award for music",
    "users of the new phone software said the network fell",
    "profit",
    "the company said growth was a record in the first year and shares rose for the bank and the market",
]
TARGET = ["shares of the company rose", "the bank said profit fell", "market growth was a record"]
FISHER = ["the game was new", "people of the world vote", "the party said the government will fall", "a goal"]


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A random 2-block Llama (hidden 32, with biases so the bias column is tested) and a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-llama")
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_bias=True,
        mlp_bias=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYSEL_CACHE", str(tmp_path / "cache"))  # a fresh reference cache per test
    target = tmp_path / "target.jsonl"
    target.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(TARGET)))
    fisher = tmp_path / "fisher.txt"
    fisher.write_text("\n".join(FISHER) + "\n")
    return target, fisher


def _scorer(model, target, *, max_tokens=12, batch_size=3, **params):
    params = {"target": str(target), "dim": 64, "layers": "all", **params}
    cfg = ScorerConfig(name="lm_influence", model=model, max_tokens=max_tokens, batch_size=batch_size, params=params)
    return LMInfluenceScorer(cfg, outputs=("lm_influence",))


def _batch(texts):
    return {"text": np.array(texts, dtype=object), "reason": np.array([""] * len(texts), dtype=object)}


def reference_features(scorer, texts):
    """Per text alone (no padding): autograd of its mean NLL w.r.t. every chosen weight and bias, flattened
    as [W | b] row by row, times the explicit dense Kronecker matrix of that layer's factors."""
    grads = scorer.gradients
    proj = grads.projector
    out = []
    for ids in grads.encode(texts):
        params = []
        for module in proj.layers.values():
            module.weight.requires_grad_(True)
            params.append(module.weight)
            if module.bias is not None:
                module.bias.requires_grad_(True)
                params.append(module.bias)
        x = torch.tensor([ids])
        logits = grads.model(input_ids=x, use_cache=False).logits[0, :-1]
        loss = torch.nn.functional.cross_entropy(logits.double(), x[0, 1:])
        flat = iter(torch.autograd.grad(loss, params))
        parts = []
        for name, module in proj.layers.items():
            g = next(flat)
            if module.bias is not None:
                g = torch.cat([g, next(flat)[:, None]], dim=1)
            parts.append(g.reshape(-1).double() @ proj.dense_matrix(name).double())
        for p in params:
            p.requires_grad_(False)
        out.append(torch.cat(parts).numpy())
    return np.stack(out)


def reference_scores(pool, target, fisher, score, damping):
    """Dense: F = GᵀG/N, (F + λI)^{-1/2} by eigh, λ = damping × mean non-zero eigenvalue; then LESS / dot."""
    if fisher is not None:
        f = fisher.T @ fisher / len(fisher)
        w, v = np.linalg.eigh(f)
        rank = np.linalg.matrix_rank(fisher)
        lam = damping * np.trace(f) / rank
        m = v @ np.diag((np.clip(w, 0, None) + lam) ** -0.5) @ v.T
        pool, target = pool @ m, target @ m
    if score == "dot":
        return pool @ target.mean(0)
    t = (target / np.linalg.norm(target, axis=1, keepdims=True)).mean(0)
    return pool @ t / (np.linalg.norm(pool, axis=1) * np.linalg.norm(t))


def test_features_equal_per_text_autograd_through_a_dense_kronecker_projection(tiny_lm, files):
    scorer = _scorer(tiny_lm, files[0])
    assert scorer.gradients.dim == 64 and len(scorer.gradients.projector.names) == 14  # 7 linears × 2 blocks
    feats, tokens = scorer.gradients(POOL)  # batches of 3 with padding, sorted by length
    ref = reference_features(scorer, POOL)
    assert tokens.tolist() == [min(len(t.split()), 11) for t in POOL]
    np.testing.assert_allclose(feats, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    # the LM head one position at a time (checkpointed chunks): the same gradients
    scorer.gradients.chunk_bytes = 1
    np.testing.assert_allclose(scorer.gradients(POOL)[0], ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize(
    ("score", "precondition"), [("cosine", False), ("dot", False), ("cosine", True), ("dot", True)]
)
def test_scores_equal_the_dense_reference(tiny_lm, files, score, precondition):
    target, fisher_file = files
    params = {"score": score}
    if precondition:
        params.update(precondition=True, damping=0.3, fisher_texts=str(fisher_file), fisher_rows=100)
    scorer = _scorer(tiny_lm, target, **params)
    out = scorer(_batch(POOL))["lm_influence"]
    pool_ref, target_ref = reference_features(scorer, POOL), reference_features(scorer, TARGET)
    fisher_ref = np.concatenate([target_ref, reference_features(scorer, FISHER)]) if precondition else None
    expected = reference_scores(pool_ref, target_ref, fisher_ref, score, 0.3)
    np.testing.assert_allclose(out, expected, rtol=2e-4, atol=2e-5 * np.abs(expected).max())
    assert out.dtype == np.float32 and np.isfinite(out).all()
    if score == "cosine":
        assert np.all(np.abs(out) <= 1 + 1e-6)


def test_padding_and_truncation_do_not_change_a_score(tiny_lm, files):
    scorer = _scorer(tiny_lm, files[0], max_tokens=8, batch_size=8)
    short, long = POOL[0], POOL[-1]  # the long one has more than 7 words: cut to 7 predicted tokens
    together = scorer(_batch([long, short, POOL[2]]))["lm_influence"]
    alone = scorer(_batch([short]))["lm_influence"]
    assert alone[0] == pytest.approx(together[1], rel=1e-5, abs=1e-6)
    longer = scorer(_batch([long + " the market fell", short]))["lm_influence"]  # words past the cut
    assert longer[0] == pytest.approx(together[0], rel=1e-5, abs=1e-6)
    assert longer[1] == pytest.approx(together[1], rel=1e-5, abs=1e-6)


def test_rows_with_a_reason_or_no_token_are_nan_and_the_input_is_kept(tiny_lm, files):
    scorer = _scorer(tiny_lm, files[0])
    batch = {
        "text": np.array(["the bank", "", "   "], dtype=object),
        "reason": np.array(["", "", "empty"], dtype=object),
    }
    out = scorer(batch)["lm_influence"]
    assert np.isfinite(out[0]) and np.isnan(out[1]) and np.isnan(out[2])
    assert batch["text"][0] == "the bank" and "lm_influence" not in batch


def test_same_seed_same_projection_on_any_layer_order():
    layers = {f"block.{i}": torch.nn.Linear(16, 8 + i) for i in range(3)}
    a = KroneckerProjector(layers, dim=48, seed=7)
    b = KroneckerProjector(dict(reversed(list(layers.items()))), dim=48, seed=7)
    c = KroneckerProjector(layers, dim=48, seed=8)
    for name in layers:
        assert torch.equal(a.factors[name][0], b.factors[name][0]) and torch.equal(
            a.factors[name][1], b.factors[name][1]
        )
        assert not torch.equal(a.factors[name][0], c.factors[name][0])
    # The factors are N(0, 1/k): the Kronecker projection preserves squared norms in expectation.
    rows = torch.kron(torch.randn(200, 30) / 30**0.5, torch.randn(100, 20) / 20**0.5)  # [20000, 600]
    u = torch.randn(20000, dtype=torch.float64)
    assert (u @ rows.double()).square().sum().item() / u.square().sum().item() == pytest.approx(1.0, abs=0.25)


def test_kron_dims_fill_the_dimension_without_passing_it():
    dims = kron_dims([(577, 576), (577, 192), (1537, 576)], 8192)
    assert sum(a * b for a, b in dims) <= 8192 and sum(a * b for a, b in dims) > 8192 - 60
    assert kron_dims([(3, 2)], 100) == [(3, 2)]  # capped by the layer itself
    with pytest.raises(ValueError, match="smaller than the number of linear layers"):
        kron_dims([(4, 4)] * 5, 4)


def test_the_reference_is_cached_by_file_content(tiny_lm, files, monkeypatch):
    target = files[0]
    first = _scorer(tiny_lm, target)(_batch(POOL))["lm_influence"]

    def no_fit(self):
        raise AssertionError("the cached reference should have been used")

    monkeypatch.setattr(LMInfluenceScorer, "fit_reference", no_fit)
    np.testing.assert_array_equal(_scorer(tiny_lm, target)(_batch(POOL))["lm_influence"], first)
    target.write_text(json.dumps({"text": "the team won the game"}) + "\n")  # same name, new content
    with pytest.raises(AssertionError, match="cached reference"):
        _scorer(tiny_lm, target)


def test_target_files_of_every_format(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["one", "", "two"]}), tmp_path / "t.parquet")
    (tmp_path / "t.txt").write_text("one\n\n two \n")
    (tmp_path / "t.jsonl").write_text('{"text": "one"}\n{"text": 3}\n\n{"text": "two"}\n')
    assert read_texts(str(tmp_path / "t.parquet"), "body") == ["one", "two"]
    assert read_texts(str(tmp_path / "t.txt")) == ["one", " two "]
    assert read_texts(str(tmp_path / "t.jsonl")) == ["one", "two"]
    with pytest.raises(ConfigError, match="does not exist"):
        read_texts(str(tmp_path / "missing.jsonl"))


def test_bad_settings_fail_at_config_load_or_construction(tiny_lm, files):
    with pytest.raises(ValueError, match="params.target"):
        ScorerConfig(name="lm_influence", params={})
    with pytest.raises(ValueError, match="precondition: true"):
        ScorerConfig(name="lm_influence", params={"target": "t.jsonl", "fisher_texts": "f.txt"})
    with pytest.raises(ValueError, match="distinct"):
        ScorerConfig(name="lm_influence", params={"target": "t.jsonl", "layers": [1, 1]})
    with pytest.raises(ConfigError, match="the model has 2 blocks"):
        _scorer(tiny_lm, files[0], layers={"last": 3})
    with pytest.raises(ConfigError, match="do not exist"):
        _scorer(tiny_lm, files[0], layers=[0, 5])


def _auc(scores, positive):
    pos, neg = scores[positive], scores[~positive]
    return (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()


def test_real_model_ranks_business_articles_above_the_other_topics(tmp_path):
    """SmolLM2-135M at the defaults (last 2 blocks, d = 8192, cosine): target = 20 business articles, pool = 8
    articles of each of the 5 topics, none in the target. Measured here: ROC AUC business vs rest 0.766 plain,
    0.820 preconditioned on target + 20 other articles (λ = 0.1); on a 200-article pool: benchmarks/RESULTS.md."""
    from raysel.scorers.lm_influence import TargetReference
    from tests.conftest import bbc_sample

    articles = bbc_sample(400, seed=1, max_chars=400)
    target = [a for a in articles if a["topic"] == "business"][:20]
    taken = {a["id"] for a in target}
    pool, per_topic = [], {}
    for a in articles:
        if a["id"] not in taken and per_topic.get(a["topic"], 0) < 8:
            per_topic[a["topic"]] = per_topic.get(a["topic"], 0) + 1
            pool.append(a)
    taken |= {a["id"] for a in pool}
    fisher = [a["text"] for a in articles if a["id"] not in taken][:20]
    path = tmp_path / "business.jsonl"
    path.write_text("".join(json.dumps(a) + "\n" for a in target))
    cfg = ScorerConfig(name="lm_influence", max_tokens=64, batch_size=10, params={"target": str(path)})
    scorer = LMInfluenceScorer(cfg, outputs=("lm_influence",))
    business = np.array([a["topic"] == "business" for a in pool])
    feats, _ = scorer.gradients([a["text"] for a in pool])
    plain = _auc(scorer.reference(feats), business)  # what scorer(batch) returns for these rows
    t_feats = scorer.gradients([a["text"] for a in target])[0]
    whitened = TargetReference.fit(
        t_feats, score="cosine", fisher=np.concatenate([t_feats, scorer.gradients(fisher)[0]]), damping=0.1
    )
    preconditioned = _auc(whitened(feats), business)
    assert plain > 0.7, f"ROC AUC business vs rest {plain:.3f}"
    assert preconditioned > 0.75, f"ROC AUC business vs rest, preconditioned {preconditioned:.3f}"
