"""AUM (raysel/scorers/aum.py): against a loop over rows, checkpoints and classes; and it finds flipped labels."""

import numpy as np
import pytest

from raysel.config import ScorerConfig
from raysel.proxy import train_proxy
from raysel.scorers.aum import AUMScorer

CONFIG = ScorerConfig(name="aum", params={"replicates": 2, "proxy": {"hidden": 8, "epochs": 4}})


def blobs(n=200, d=16, classes=4, seed=0, flip=0.0):
    """Separable clusters; `flip` of the labels replaced by another class (which rows: the returned mask)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, d)) * 1.5
    y = rng.integers(0, classes, n)
    x = centres[y] + 0.5 * rng.normal(size=(n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    flipped = rng.random(n) < flip
    noisy = np.where(flipped, (y + rng.integers(1, classes, n)) % classes, y)
    return x.astype(np.float32), np.array([f"c{i}" for i in noisy], dtype=object), flipped


def slow_aum(runs, x, labels, epochs):
    """By hand: for every row, every replicate and epoch, the largest other logit minus the assigned one."""
    out = []
    for i in range(len(x)):
        y = runs[0].labels.index(labels[i])
        margins = []
        for run in runs:
            for ck in run.checkpoints[:epochs]:
                h = x[i].astype(np.float64)
                if "w1" in ck:
                    h = np.maximum(ck["w1"].astype(np.float64) @ h + ck["b1"], 0)
                z = ck["w2"].astype(np.float64) @ h + ck["b2"]
                margins.append(max(z[c] for c in range(len(z)) if c != y) - z[y])
        out.append(np.mean(margins))
    return np.array(out)


@pytest.fixture(scope="module")
def noisy():
    x, labels, flipped = blobs(flip=0.1)
    params = CONFIG.typed_params()
    return x, labels, flipped, [train_proxy(x, labels, params.proxy, r) for r in range(params.replicates)]


@pytest.mark.parametrize("epochs", [None, 2])
def test_aum_matches_a_loop_over_rows_checkpoints_and_classes(noisy, epochs):
    x, labels, _, runs = noisy
    config = ScorerConfig(name="aum", params={**CONFIG.params, "epochs": epochs})
    prepared = AUMScorer.prepared_from(runs, config.typed_params())
    out = AUMScorer(config, ("aum",), prepared)({"embedding": x, "label": labels})
    np.testing.assert_allclose(out["aum"], slow_aum(runs, x, labels, epochs or 4), rtol=1e-4, atol=1e-5)


def test_flipped_labels_have_the_highest_aum(noisy):
    x, labels, flipped, runs = noisy
    score = AUMScorer(CONFIG, ("aum",), AUMScorer.prepared_from(runs, CONFIG.typed_params()))(
        {"embedding": x, "label": labels}
    )["aum"]
    top = np.argsort(-score)[: flipped.sum()]
    assert flipped[top].mean() >= 0.8  # the highest scores are (mostly) the flipped rows
    assert score[flipped].mean() > 0 > score[~flipped].mean()  # negative margin where the label is wrong


def test_quarantined_and_unknown_labels_are_nan(noisy):
    x, labels, _, runs = noisy
    scorer = AUMScorer(CONFIG, ("aum",), AUMScorer.prepared_from(runs, CONFIG.typed_params()))
    batch = {
        "embedding": x[:3],
        "label": np.array([labels[0], "never-seen", labels[2]], dtype=object),
        "reason": np.array(["", "", "empty text"], dtype=object),
    }
    got = scorer(batch)["aum"]
    assert np.isfinite(got[0]) and np.isnan(got[1]) and np.isnan(got[2])


def test_aum_needs_prepared_and_validates_epochs():
    with pytest.raises(ValueError, match="prepare"):
        AUMScorer(CONFIG, ("aum",), None)
    with pytest.raises(ValueError, match=r"params\.epochs: 5 epochs is more than the proxy trains"):
        ScorerConfig(name="aum", params={"epochs": 5, "proxy": {"epochs": 4}})
