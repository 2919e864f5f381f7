"""EL2N: the labelled scorer against a NumPy forward pass, and the LM's per-token variant against a loop."""

import numpy as np
import pytest
import torch

from raysel.config import ScorerConfig
from raysel.proxy import ProxySettings, train_proxy
from raysel.scorers.el2n import EL2NScorer
from raysel.scorers.lm import CausalLMScorer, token_el2n


def blobs(n=80, d=16, names=("a", "b", "c"), seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(names), d))
    y = rng.integers(0, len(names), n)
    x = centres[y] + 0.6 * rng.normal(size=(n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), np.array([names[i] for i in y], dtype=object)


def numpy_probs(ck, x):
    h = np.maximum(x @ ck["w1"].T.astype(np.float64) + ck["b1"], 0) if "w1" in ck else x
    z = h @ ck["w2"].T.astype(np.float64) + ck["b2"]
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


CONFIG = ScorerConfig(name="el2n", params={"replicates": 3, "epoch": 2, "proxy": {"hidden": 8, "epochs": 3}})


@pytest.fixture(scope="module")
def trained():
    x, labels = blobs()
    params = CONFIG.typed_params()
    runs = [train_proxy(x, labels, params.proxy, r) for r in range(params.replicates)]
    return x, labels, runs


def test_el2n_is_the_mean_over_replicates_of_a_numpy_reference(trained):
    x, labels, runs = trained
    prepared = EL2NScorer.prepared_from(runs, CONFIG.typed_params())
    batch = {"embedding": x, "label": labels, "reason": np.full(len(x), "", dtype=object)}
    out = EL2NScorer(CONFIG, ("el2n",), prepared)(batch)
    y = np.searchsorted(np.array(runs[0].labels, dtype=object), labels)
    ref = np.mean(
        [
            [np.linalg.norm(numpy_probs(run.checkpoints[1], x)[i] - np.eye(3)[y[i]]) for i in range(len(x))]
            for run in runs
        ],
        axis=0,
    )
    np.testing.assert_allclose(out["el2n"], ref, rtol=1e-5)
    assert set(batch) < set(out) and out["embedding"] is batch["embedding"]  # input columns kept, not copied


def test_quarantined_and_unknown_labels_are_nan_and_the_rest_unchanged(trained):
    x, labels, runs = trained
    scorer = EL2NScorer(CONFIG, ("el2n",), EL2NScorer.prepared_from(runs, CONFIG.typed_params()))
    base = scorer({"embedding": x[:4], "label": labels[:4], "reason": np.full(4, "", dtype=object)})["el2n"]
    batch = {
        "embedding": x[:4],
        "label": np.array([labels[0], "never-seen", labels[2], labels[3]], dtype=object),
        "reason": np.array(["", "", "", "empty text"], dtype=object),
    }
    got = scorer(batch)["el2n"]
    assert np.isnan(got[1]) and np.isnan(got[3])
    np.testing.assert_allclose(got[[0, 2]], base[[0, 2]], rtol=1e-6)


def test_el2n_is_deterministic_for_a_fixed_seed(trained):
    x, labels, runs = trained
    params = CONFIG.typed_params()
    again = [train_proxy(x, labels, params.proxy, r) for r in range(params.replicates)]
    batch = {"embedding": x, "label": labels}
    a = EL2NScorer(CONFIG, ("el2n",), EL2NScorer.prepared_from(runs, params))(batch)["el2n"]
    b = EL2NScorer(CONFIG, ("el2n",), EL2NScorer.prepared_from(again, params))(batch)["el2n"]
    np.testing.assert_array_equal(a, b)
    other = ProxySettings(hidden=8, epochs=3, seed=1)
    c_runs = [train_proxy(x, labels, other, r) for r in range(params.replicates)]
    c = EL2NScorer(CONFIG, ("el2n",), EL2NScorer.prepared_from(c_runs, params))(batch)["el2n"]
    assert not np.allclose(a, c)


def test_el2n_needs_prepared_and_validates_epoch():
    with pytest.raises(ValueError, match="prepare"):
        EL2NScorer(CONFIG, ("el2n",), None)
    with pytest.raises(ValueError, match=r"params\.epoch: epoch 4 is after the last one"):
        ScorerConfig(name="el2n", params={"epoch": 4, "proxy": {"epochs": 3}})


# --- el2n_lm: the unlabelled-text variant in raysel/scorers/lm.py --------------------------------------------


def _token_reference(logits, ids, mask):
    out = []
    for b in range(logits.shape[0]):
        per_token = []
        for t in range(logits.shape[1] - 1):
            if mask[b, t + 1] == 0:
                continue
            z = logits[b, t].astype(np.float64)
            p = np.exp(z - z.max())
            p /= p.sum()
            per_token.append(np.linalg.norm(p - np.eye(len(p))[ids[b, t + 1]]))
        out.append(np.mean(per_token) if per_token else np.nan)
    return np.array(out)


def test_token_el2n_matches_a_loop_with_padding():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=g) * 3
    ids = torch.randint(0, 11, (3, 6), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    got = token_el2n(logits, ids, mask).numpy()
    ref = _token_reference(logits.numpy(), ids.numpy(), mask.numpy())
    np.testing.assert_allclose(got[:2], ref[:2], rtol=1e-5)
    assert np.isnan(got[2]) and np.isnan(ref[2])


def test_token_el2n_of_uniform_and_one_hot_predictions():
    v = 50
    uniform = token_el2n(torch.zeros(1, 4, v), torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4))
    assert uniform.item() == pytest.approx(np.sqrt((v - 1) / v), rel=1e-6)
    ids = torch.tensor([[0, 3, 7, 2]])
    confident = torch.full((1, 4, v), -1e4)
    confident[0, torch.arange(3), ids[0, 1:]] = 1e4  # every next token predicted with certainty
    assert token_el2n(confident, ids, torch.ones(1, 4)).item() == pytest.approx(0.0, abs=1e-6)


def test_el2n_lm_from_the_real_model_ranks_shuffled_words_higher():
    scorer = CausalLMScorer(ScorerConfig(name="el2n_lm", max_tokens=32, batch_size=4), outputs=("el2n_lm", "loss"))
    good = "The children walked to school in the morning and met their friends at the gate."
    words = good.split()
    shuffled = " ".join(words[i] for i in np.random.default_rng(0).permutation(len(words)))
    out = scorer(
        {"text": np.array([good, shuffled, ""], dtype=object), "reason": np.array(["", "", "empty"], dtype=object)}
    )
    assert 0 < out["el2n_lm"][0] < out["el2n_lm"][1] < np.sqrt(2)
    assert np.isnan(out["el2n_lm"][2])
    assert "entropy" not in out  # only the outputs asked for
