"""raysel/report.py: the report of a real run, opened in headless Chromium; its counts against the ledger."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from raysel.errors import SinkError
from raysel.report import HIST_BINS, bandit_rounds, summarize_ledger, write_report
from tests.conftest import BAD_LINES, bbc_sample, tiny_lm, write_jsonl

CHROMIUM_INSTALL = "apt-get install -y chromium chromium-driver"

# Appended to a copy of the page: after load, every image's natural size goes into a body attribute, which
# --dump-dom prints. An image whose PNG does not decode has naturalWidth 0.
_CHECK = (
    "<script>window.addEventListener('load', () => document.body.setAttribute('data-images', "
    "JSON.stringify([...document.images].map(i => [i.alt, i.naturalWidth, i.naturalHeight]))));</script>"
)


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    # Not a skip: without a browser the report's images go unchecked, and CI must say so.
    pytest.fail(f"headless Chromium is needed to check the report's images; install it: {CHROMIUM_INSTALL}")


def rendered_images(page: Path, tmp_path: Path) -> list[tuple[str, int, int]]:
    """(alt, naturalWidth, naturalHeight) of every <img> of `page`, as headless Chromium decodes them."""
    probe = tmp_path / f"probe-{page.stem}.html"
    probe.write_text(page.read_text().replace("</body>", _CHECK + "</body>"))
    proc = subprocess.run(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",  # CI runs as root
            "--disable-gpu",
            f"--user-data-dir={tmp_path / 'chromium-profile'}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            probe.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    match = re.search(r'data-images="([^"]*)"', proc.stdout)
    assert match, f"Chromium printed no image check (exit {proc.returncode}): {proc.stderr[-2000:]}"
    return [tuple(x) for x in json.loads(match.group(1).replace("&quot;", '"'))]


@pytest.fixture(scope="module")
def committed_run(ray_cluster, tmp_path_factory) -> Path:
    """A real run: 40 BBC articles with topic labels and 6 bad lines, stratified over 4 clusters."""
    from raysel.config import parse_config
    from raysel.pipeline import run

    root = tmp_path_factory.mktemp("report")
    corpus = write_jsonl(root / "corpus.jsonl", bbc_sample(40), BAD_LINES)
    cfg = parse_config(
        {
            "input": {"path": str(corpus), "id_field": "id", "label_field": "topic"},
            "output": {"path": str(root / "out")},
            "scorers": [
                {"name": "entropy", "model": tiny_lm(), "max_tokens": 16},
                {"name": "loss", "model": tiny_lm(), "max_tokens": 16},
            ],
            "cluster": {"k": 4},
            "select": {"budget": 0.5, "policy": "stratified", "score": "entropy"},
            "work_dir": str(root / "work"),
        }
    )
    run(cfg)
    return root / "out"


def _ledger(out: Path):
    return pq.read_table(out / "ledger").to_pandas()


def test_every_image_renders_in_chromium(committed_run, tmp_path):
    page = Path(write_report(str(committed_run)))
    assert page == committed_run / "report.html"
    html = page.read_text()
    assert 'src="http' not in html and "<link" not in html, "the page must not load anything from elsewhere"
    images = rendered_images(page, tmp_path)
    assert [alt for alt, _, _ in images] == ["Ledger status", "Score distributions", "Clusters", "Labels", "Time"]
    for alt, width, height in images:
        assert width > 100 and height > 100, f"image {alt!r} did not render ({width}x{height})"


def test_the_check_sees_a_broken_image(committed_run, tmp_path):
    """The Chromium check can fail: a PNG cut short does not decode, and the probe reports width 0."""
    page = Path(write_report(str(committed_run)))
    html = page.read_text()
    first = re.search(r"base64,([A-Za-z0-9+/=]+)", html)
    broken = base64.b64encode(base64.b64decode(first.group(1))[:60]).decode()
    bad = tmp_path / "broken.html"
    bad.write_text(html.replace(first.group(1), broken, 1))
    sizes = {alt: w for alt, w, _ in rendered_images(bad, tmp_path)}
    assert sizes["Ledger status"] == 0
    assert sizes["Time"] > 0


def test_summary_matches_the_ledger(committed_run):
    manifest = json.loads((committed_run / "manifest.json").read_text())
    summary = summarize_ledger(str(committed_run / "ledger"), ["entropy", "loss", "not-a-column"])
    ledger = _ledger(committed_run)
    assert summary.status == ledger["status"].value_counts().to_dict() | {
        k: 0 for k in ("selected", "rejected", "quarantined") if k not in set(ledger["status"])
    }
    usable = ledger[ledger["status"] != "quarantined"]
    chosen = ledger[ledger["status"] == "selected"]
    for c in range(manifest["clusters"]["k"]):
        assert summary.cluster_usable[c] == (usable["cluster"] == c).sum()
        assert summary.cluster_selected[c] == (chosen["cluster"] == c).sum()
    # stratified sets a quota per cluster, and fills it exactly
    assert {int(k): v for k, v in manifest["selection"]["quotas"].items()} == {
        c: int(n) for c, n in enumerate(summary.cluster_selected)
    }
    assert summary.label_usable == usable["label"].value_counts().to_dict()
    assert summary.label_selected == chosen["label"].value_counts().to_dict()
    assert set(summary.hist) == {"entropy", "loss"}
    for col, (edges, sel, rej) in summary.hist.items():
        assert len(edges) == HIST_BINS + 1 and len(sel) == len(rej) == HIST_BINS
        assert edges[0] == usable[col].min() and edges[-1] == usable[col].max()
        assert sel.sum() == chosen[col].notna().sum()
        assert rej.sum() == ledger.loc[ledger["status"] == "rejected", col].notna().sum()
        reference = np.histogram(chosen[col].dropna(), bins=edges)[0]
        np.testing.assert_array_equal(sel, reference)


def test_bandit_rounds_from_the_manifest():
    assert bandit_rounds({"policy": "stratified", "quotas": {"0": 3}}) is None
    assert bandit_rounds({"rounds": 12}) is None  # a count, not a history
    plain = bandit_rounds({"reward_history": [0.1, 0.5, 0.3]})
    np.testing.assert_allclose(plain["reward"], [0.1, 0.5, 0.3])
    np.testing.assert_allclose(plain["regret"], np.cumsum([0.4, 0.0, 0.2]))
    # arms: the best arm's mean is (0.5 + 0.3) / 2 = 0.4 (arm 1), so regret per round is 0.4 - reward
    history = [{"arm": 0, "reward": 0.1}, {"arm": 1, "reward": 0.5}, {"arm": 1, "reward": 0.3}]
    per_arm = bandit_rounds({"history": history})
    np.testing.assert_allclose(per_arm["regret"], np.cumsum([0.3, -0.1, 0.1]))
    batched = bandit_rounds({"rounds": [{"arms": [0, 1], "rewards": [0.2, 0.4]}, {"arms": [2], "rewards": [1.0]}]})
    np.testing.assert_allclose(batched["reward"], [0.3, 1.0])
    np.testing.assert_allclose(batched["regret"], [1.4, 1.4])  # best arm 2 (1.0): 0.8 + 0.6, then 0
    # raysel's bandit policy nests its history under selection.bandit
    nested = bandit_rounds({"bandit": {"reward_history": [{"round": 1, "arms": [3], "rewards": [0.5]}]}})
    np.testing.assert_allclose(nested["reward"], [0.5])
    recorded = bandit_rounds({"rewards": [1.0, 2.0], "regret": [0.5, 0.7]})
    np.testing.assert_allclose(recorded["regret"], [0.5, 0.7])
    assert "regret_recorded" in recorded


def test_bandit_plot_when_the_policy_recorded_rounds(committed_run, tmp_path):
    """A run whose manifest carries a reward history gets a Bandit figure, and it renders."""
    out = tmp_path / "bandit-run"
    shutil.copytree(committed_run, out)
    manifest = json.loads((out / "manifest.json").read_text())
    rng = np.random.default_rng(0)
    # the shape raysel's bandit policy records (selection.bandit.reward_history: arms and rewards per round)
    manifest["selection"]["bandit"] = {
        "rounds": 30,
        "examples_probed": 120,
        "reward_history": [
            {"round": t + 1, "arms": [int(a)], "rewards": [float(rng.normal(a / 4, 0.05))], "probed": 4}
            for t, a in enumerate(rng.integers(0, 4, 30))
        ],
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    page = Path(write_report(str(out)))
    images = dict((alt, w) for alt, w, _ in rendered_images(page, tmp_path))
    assert images.get("Bandit", 0) > 100


def test_no_run_no_report(tmp_path):
    with pytest.raises(SinkError, match="no committed run"):
        write_report(str(tmp_path / "nothing-here"))


def test_cli_report_and_run_write_the_page(committed_run, tmp_path):
    """`raysel report OUT` writes the page; `raysel run` writes it too, at the end of the run."""
    from typer.testing import CliRunner

    from raysel.cli import app

    out = tmp_path / "copy"
    shutil.copytree(committed_run, out)
    (out / "report.html").unlink(missing_ok=True)
    result = CliRunner().invoke(app, ["report", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "report.html").exists() and str(out / "report.html") in result.output

    manifest = json.loads((committed_run / "manifest.json").read_text())
    config = manifest["config"]
    config["output"]["path"] = str(tmp_path / "rerun")
    config_path = tmp_path / "run.yaml"
    config_path.write_text(json.dumps(config))  # JSON is YAML
    result = CliRunner().invoke(app, ["run", str(config_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "rerun" / "report.html").exists()
    assert "report:" in result.output
