"""Classifier entropy with the proxy, a .npz head and a torch.export program, against NumPy."""

import io

import numpy as np
import pytest
import torch

from raysel.config import ScorerConfig
from raysel.errors import ConfigError
from raysel.proxy import ProxySettings, train_proxy
from raysel.scorers.classifier_entropy import ClassifierEntropyScorer, load_classifier, softmax_entropy


def blobs(n=60, d=16, names=("a", "b", "c"), seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(names), d))
    y = rng.integers(0, len(names), n)
    x = centres[y] + 0.6 * rng.normal(size=(n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), np.array([names[i] for i in y], dtype=object)


def numpy_entropy(head, x):
    h = np.maximum(x @ head["w1"].T + head["b1"], 0) if "w1" in head else x
    z = (h @ head["w2"].T + head["b2"]).astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return -(p * np.log(p)).sum(1)


CONFIG = ScorerConfig(name="classifier_entropy")


def test_softmax_entropy_reference_values():
    assert softmax_entropy(torch.zeros(2, 7)) == pytest.approx([np.log(7)] * 2)
    assert softmax_entropy(torch.tensor([[1e4, 0.0, 0.0]])) == pytest.approx([0.0], abs=1e-12)


def test_proxy_entropy_matches_numpy_and_needs_no_label():
    x, labels = blobs()
    run = train_proxy(x, labels, ProxySettings(hidden=8, epochs=3))
    scorer = ClassifierEntropyScorer(CONFIG, ("classifier_entropy",), ClassifierEntropyScorer.prepared_from(run))
    reason = np.full(len(x), "", dtype=object)
    reason[3] = "empty text"
    out = scorer({"embedding": x, "reason": reason})  # no label column at all
    ref = numpy_entropy(run.checkpoints[-1], x)
    ok = np.arange(len(x)) != 3
    np.testing.assert_allclose(out["classifier_entropy"][ok], ref[ok], rtol=1e-5)
    assert np.isnan(out["classifier_entropy"][3])
    assert (out["classifier_entropy"][ok] <= np.log(3) + 1e-6).all()


def test_npz_head_and_export_program_give_the_same_scores(tmp_path):
    x, _ = blobs()
    rng = np.random.default_rng(1)
    head = {
        "w1": rng.normal(size=(5, 16)).astype(np.float32),
        "b1": rng.normal(size=5).astype(np.float32),
        "w2": rng.normal(size=(4, 5)).astype(np.float32),
        "b2": rng.normal(size=4).astype(np.float32),
    }
    np.savez(tmp_path / "head.npz", **head)
    module = torch.nn.Sequential(torch.nn.Linear(16, 5), torch.nn.ReLU(), torch.nn.Linear(5, 4))
    with torch.no_grad():
        for layer, (w, b) in zip([module[0], module[2]], [("w1", "b1"), ("w2", "b2")], strict=True):
            layer.weight.copy_(torch.from_numpy(head[w]))
            layer.bias.copy_(torch.from_numpy(head[b]))
    program = torch.export.export(module, (torch.zeros(2, 16),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    buf = io.BytesIO()
    torch.export.save(program, buf)
    (tmp_path / "clf.pt2").write_bytes(buf.getvalue())

    ref = numpy_entropy(head, x)
    for path in ("head.npz", "clf.pt2"):
        cfg = ScorerConfig(name="classifier_entropy", params={"classifier": str(tmp_path / path)})
        prepared = load_classifier(str(tmp_path / path), cfg.typed_params().proxy, None, cfg.name)
        got = ClassifierEntropyScorer(cfg, ("classifier_entropy",), prepared)({"embedding": x})
        np.testing.assert_allclose(got["classifier_entropy"], ref, rtol=1e-5, err_msg=path)


def test_a_saved_proxy_run_is_a_valid_classifier_file(tmp_path):
    x, labels = blobs()
    run = train_proxy(x, labels, ProxySettings(hidden=0, epochs=2))
    (tmp_path / "replicate-0.npz").write_bytes(run.to_bytes())
    prepared = load_classifier(str(tmp_path / "replicate-0.npz"), ProxySettings(), None, "classifier_entropy")
    got = ClassifierEntropyScorer(CONFIG, ("classifier_entropy",), prepared)({"embedding": x})
    np.testing.assert_allclose(got["classifier_entropy"], numpy_entropy(run.checkpoints[-1], x), rtol=1e-5)


def test_bad_classifier_files_are_config_errors(tmp_path):
    np.savez(tmp_path / "nohead.npz", weights=np.zeros(3))
    np.savez(tmp_path / "shapes.npz", w1=np.zeros((5, 16)), b1=np.zeros(5), w2=np.zeros((4, 6)), b2=np.zeros(4))
    (tmp_path / "model.onnx").write_bytes(b"x")
    cases = {
        "nohead.npz": "must hold arrays w2, b2",
        "shapes.npz": "inconsistent shapes",
        "model.onnx": "expected `proxy`",
        "missing.npz": "neither `proxy` nor an existing file",
    }
    for name, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            load_classifier(str(tmp_path / name), ProxySettings(), None, "classifier_entropy")


def test_only_the_proxy_needs_labels():
    from raysel.scorers import SCORERS

    assert ClassifierEntropyScorer.needs_labels(CONFIG)
    assert not ClassifierEntropyScorer.needs_labels(
        ScorerConfig(name="classifier_entropy", params={"classifier": "head.npz"})
    )
    for name in ("el2n", "vog"):
        assert SCORERS[name].needs_labels(ScorerConfig(name=name))
