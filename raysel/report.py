"""The run report: OUT/report.html, one self-contained page of plots about a committed run.

    raysel report OUT          (also written at the end of every `raysel run`)

It reads OUT/manifest.json and streams OUT/ledger/*.parquet (a few columns at a time, so a ledger
of millions of rows fits), draws PNGs with matplotlib's Agg renderer and embeds them as base64
`data:` URIs: the page opens from disk, from object storage or an e-mail, without a server.

Plots, each drawn only when the run has what it needs:
    ledger status     rows selected / rejected / quarantined, and the top quarantine reasons
    scores            one histogram per score column, selected and rejected rows stacked
    clusters          usable rows per cluster vs the rows the policy kept (and its quota, when the
                      policy set `selection.quotas`), and each cluster's share of the selection
                      against its share of the corpus
    labels            share of the corpus vs share of the selection per label (`input.label_field`)
    bandit            reward per round and cumulative regret, when the policy recorded its rounds
    time              seconds per pass
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from raysel.errors import SinkError
from raysel.io import fs as rfs

STATUSES = ("selected", "rejected", "quarantined")
HIST_BINS = 40
MAX_BARS = 60  # clusters or labels drawn one bar each; beyond this, the largest ones
_COLORS = {"selected": "#2b7bba", "rejected": "#b9c4cf", "quarantined": "#d9534f", "quota": "#e08a1e"}


@dataclass
class LedgerSummary:
    """What the report needs from a ledger, gathered in two streaming passes.

    Attributes:
        status: rows per status.
        cluster_usable: usable (not quarantined) rows per cluster id.
        cluster_selected: selected rows per cluster id.
        label_usable: usable rows per label (empty when the run has no label column).
        label_selected: selected rows per label.
        hist: per score column, (bin edges, counts of selected rows, counts of rejected rows).
    """

    status: dict[str, int] = field(default_factory=dict)
    cluster_usable: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    cluster_selected: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    label_usable: dict[str, int] = field(default_factory=dict)
    label_selected: dict[str, int] = field(default_factory=dict)
    hist: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)


@dataclass
class Figure:
    title: str
    caption: str
    png: bytes


def write_report(out: str) -> str:
    """Write OUT/report.html for the committed run in `out` (a local path or s3://) and return its uri.

    Args:
        out: the run's output folder, as given in `output.path`.

    Raises:
        SinkError: `out` holds no committed run (no manifest.json or ledger).
    """
    manifest = read_manifest(out)
    summary = summarize_ledger(rfs.join(out, "ledger"), score_columns(manifest))
    page = render_html(out, manifest, summary, build_figures(manifest, summary))
    uri = rfs.join(out, "report.html")
    rfs.write_text(uri, page)
    return uri


def read_manifest(out: str) -> dict[str, Any]:
    uri = rfs.join(out, "manifest.json")
    if not rfs.exists(uri):
        raise SinkError(f"{out} holds no committed run (no manifest.json); run `raysel run CONFIG` first")
    return json.loads(rfs.read_text(uri))


def score_columns(manifest: dict[str, Any]) -> list[str]:
    """The run's score columns: its scorers', then the input's `score_fields` (scores other tools computed)."""
    config = manifest.get("config", {})
    return [s["name"] for s in config.get("scorers", [])] + list(config.get("input", {}).get("score_fields", []))


# --- the ledger, streamed ------------------------------------------------------------------------------------


def _ledger_batches(ledger_uri: str, columns: list[str]):
    import pyarrow.dataset as pads

    fs, path = rfs.resolve(ledger_uri)
    if not rfs.exists(ledger_uri):
        raise SinkError(f"{ledger_uri} does not exist: the run's output is incomplete; run it again")
    dataset = pads.dataset(path, filesystem=fs, format="parquet")
    present = [c for c in columns if c in dataset.schema.names]
    yield from dataset.to_batches(columns=present, batch_size=262_144)


def summarize_ledger(ledger_uri: str, scores: list[str]) -> LedgerSummary:
    """Counts per status, cluster and label, and score histograms, in two passes over a few columns.

    Args:
        ledger_uri: the OUT/ledger folder.
        scores: the score columns to histogram (columns absent from the ledger are skipped).
    """
    s = LedgerSummary(status={k: 0 for k in STATUSES})
    lo = {c: math.inf for c in scores}
    hi = {c: -math.inf for c in scores}
    usable_parts: list[np.ndarray] = []
    selected_parts: list[np.ndarray] = []
    for batch in _ledger_batches(ledger_uri, ["status", "cluster", "label", *scores]):
        cols = {name: batch.column(i) for i, name in enumerate(batch.schema.names)}
        status = cols["status"].to_numpy(zero_copy_only=False)
        for name, n in zip(*np.unique(status, return_counts=True), strict=True):
            s.status[str(name)] = s.status.get(str(name), 0) + int(n)
        usable = status != "quarantined"
        chosen = status == "selected"
        if "cluster" in cols:
            cluster = cols["cluster"].to_numpy(zero_copy_only=False).astype(np.int64)
            usable_parts.append(cluster[usable & (cluster >= 0)])
            selected_parts.append(cluster[chosen & (cluster >= 0)])
        if "label" in cols:
            labels = np.array([str(v) for v in cols["label"].to_pylist()], dtype=object)
            for mask, into in ((usable, s.label_usable), (chosen, s.label_selected)):
                for name, n in zip(*np.unique(labels[mask], return_counts=True), strict=True):
                    into[name] = into.get(name, 0) + int(n)
        for c in scores:
            if c in cols:
                v = cols[c].to_numpy(zero_copy_only=False).astype(np.float64)
                v = v[np.isfinite(v)]
                if len(v):
                    lo[c], hi[c] = min(lo[c], float(v.min())), max(hi[c], float(v.max()))
    k = max((int(p.max()) + 1 for p in usable_parts if len(p)), default=0)
    s.cluster_usable = sum((np.bincount(p, minlength=k) for p in usable_parts), np.zeros(k, np.int64))
    s.cluster_selected = sum((np.bincount(p, minlength=k) for p in selected_parts), np.zeros(k, np.int64))

    edges = {c: _edges(lo[c], hi[c]) for c in scores if math.isfinite(lo[c])}
    if edges:
        counts = {c: (np.zeros(HIST_BINS, np.int64), np.zeros(HIST_BINS, np.int64)) for c in edges}
        for batch in _ledger_batches(ledger_uri, ["status", *edges]):
            cols = {name: batch.column(i) for i, name in enumerate(batch.schema.names)}
            status = cols["status"].to_numpy(zero_copy_only=False)
            for c, e in edges.items():
                v = cols[c].to_numpy(zero_copy_only=False).astype(np.float64)
                for which, mask in enumerate((status == "selected", status == "rejected")):
                    x = v[mask & np.isfinite(v)]
                    counts[c][which][:] += np.histogram(x, bins=e)[0]
        s.hist = {c: (edges[c], *counts[c]) for c in edges}
    return s


def _edges(lo: float, hi: float) -> np.ndarray:
    if hi <= lo:  # one distinct value: a narrow bin around it
        lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, HIST_BINS + 1)


# --- the bandit's rounds, when the policy recorded them -------------------------------------------------------


def bandit_rounds(selection: dict[str, Any]) -> dict[str, np.ndarray] | None:
    """Per-round rewards and cumulative regret from the manifest's `selection` info, or None without rounds.

    Reads `selection.bandit.reward_history` (raysel's bandit policy: one dict per round with `arms` and their
    `rewards`), and also accepts, under `reward_history`, `rewards`, `history` or `rounds` (in `selection` or
    `selection.bandit`), a list of numbers (one reward per round) or of dicts with `reward` and `arm`. A
    round's reward is the mean over the arms it played. A recorded `regret` list wins over the estimate.

    The estimate, when the policy recorded none: every pull's gap to the best arm's mean reward over the
    run (each arm's pulls averaged), summed per round and accumulated. It is what a reader can compute
    from the history alone; a flattening curve means the bandit settled on the arms it found best.
    """
    scopes = [selection, selection.get("bandit") if isinstance(selection.get("bandit"), dict) else {}]
    history, scope = None, selection
    for candidate in scopes[::-1]:
        for key in ("reward_history", "rewards", "history", "rounds"):
            value = candidate.get(key)
            if isinstance(value, list) and value:
                history, scope = value, candidate
                break
        if history is not None:
            break
    if history is None:
        return None
    rounds: list[list[tuple[Any, float]]] = []  # per round, its (arm, reward) pulls
    for item in history:
        if isinstance(item, int | float) and not isinstance(item, bool):
            rounds.append([(None, float(item))])
        elif isinstance(item, dict) and isinstance(item.get("reward"), int | float):
            rounds.append([(item.get("arm"), float(item["reward"]))])
        elif isinstance(item, dict) and isinstance(item.get("rewards"), list) and item["rewards"]:
            arms = item.get("arms") if isinstance(item.get("arms"), list) else [None] * len(item["rewards"])
            rounds.append([(a, float(r)) for a, r in zip(arms, item["rewards"], strict=False)])
    rounds = [r for r in rounds if r]
    if not rounds:
        return None
    reward = np.array([np.mean([x for _, x in pulls]) for pulls in rounds], dtype=np.float64)
    out = {"reward": reward}
    recorded = scope.get("regret")
    if isinstance(recorded, list) and len(recorded) == len(reward):
        out["regret"] = np.asarray(recorded, dtype=np.float64)
        out["regret_recorded"] = np.ones(1)
        return out
    pulls = [p for r in rounds for p in r]
    if all(a is not None for a, _ in pulls):
        by_arm: dict[Any, list[float]] = {}
        for a, x in pulls:
            by_arm.setdefault(a, []).append(x)
        best = max(float(np.mean(v)) for v in by_arm.values())
        out["regret"] = np.cumsum([sum(best - x for _, x in r) for r in rounds])
    else:
        out["regret"] = np.cumsum(reward.max() - reward)
    return out


# --- figures -------------------------------------------------------------------------------------------------


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _figure(width: float = 8.0, height: float = 3.6) -> Any:
    # matplotlib.figure.Figure draws with Agg when saved and touches no pyplot global state (no display needed).
    from matplotlib.figure import Figure as MplFigure

    return MplFigure(figsize=(width, height), layout="constrained")


def _short(text: str, n: int = 70) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def build_figures(manifest: dict[str, Any], s: LedgerSummary) -> list[Figure]:
    """Every plot the run's data supports, in reading order.

    Args:
        manifest: the run's manifest.json.
        s: the ledger summary from `summarize_ledger`.
    """
    figures = [_status_figure(manifest, s)]
    if s.hist:
        figures.append(_score_figure(manifest, s))
    if len(s.cluster_usable):
        figures.append(_cluster_figure(manifest, s))
    if s.label_usable:
        figures.append(_label_figure(s))
    rounds = bandit_rounds(manifest.get("selection") or {})
    if rounds is not None:
        figures.append(_bandit_figure(rounds, (manifest.get("selection") or {}).get("bandit") or {}))
    if manifest.get("seconds"):
        figures.append(_time_figure(manifest))
    return figures


def _status_figure(manifest: dict[str, Any], s: LedgerSummary) -> Figure:
    reasons = list((manifest.get("quarantine_reasons") or {}).items())[:10]
    fig = _figure(10, 3.2 if not reasons else max(3.2, 0.35 * len(reasons) + 1.2))
    axes = fig.subplots(1, 2, width_ratios=[1, 1.5]) if reasons else [fig.subplots()]
    names = [k for k in STATUSES if k in s.status] + [k for k in s.status if k not in STATUSES]
    counts = [s.status[k] for k in names]
    bars = axes[0].bar(names, counts, color=[_COLORS.get(k, "#777") for k in names])
    axes[0].bar_label(bars, labels=[f"{c:,}" for c in counts])
    axes[0].set_ylabel("rows")
    axes[0].set_title("rows per ledger status")
    axes[0].margins(y=0.15)
    if reasons:
        ax = axes[1]
        labels = [_short(r, 60) for r, _ in reasons][::-1]
        values = [n for _, n in reasons][::-1]
        bars = ax.barh(range(len(values)), values, color=_COLORS["quarantined"])
        ax.set_yticks(range(len(values)), labels, fontsize=8)
        ax.bar_label(bars, labels=[f"{v:,}" for v in values], fontsize=8)
        ax.set_xlabel("rows")
        ax.set_title("top quarantine reasons")
        ax.margins(x=0.15)
    total = sum(counts)
    caption = ", ".join(f"{k}: {v:,} ({v / total:.1%})" for k, v in zip(names, counts, strict=True)) if total else ""
    return Figure("Ledger status", caption, _png(fig))


def _score_figure(manifest: dict[str, Any], s: LedgerSummary) -> Figure:
    cols = list(s.hist)
    ncols = min(3, len(cols))
    nrows = math.ceil(len(cols) / ncols)
    fig = _figure(4.2 * ncols, 3.0 * nrows)
    axes = np.atleast_1d(fig.subplots(nrows, ncols)).ravel()
    ranked_by = (manifest.get("config", {}).get("select") or {}).get("score")
    for ax, c in zip(axes, cols, strict=False):
        edges, sel, rej = s.hist[c]
        width = np.diff(edges)
        ax.bar(edges[:-1], rej, width=width, align="edge", color=_COLORS["rejected"], label="rejected")
        ax.bar(edges[:-1], sel, width=width, align="edge", bottom=rej, color=_COLORS["selected"], label="selected")
        ax.set_title(c + ("  (the policy ranks by it)" if c == ranked_by else ""), fontsize=10)
        ax.set_ylabel("rows")
        ax.legend(fontsize=8)
    for ax in axes[len(cols) :]:
        ax.set_visible(False)
    caption = "One histogram per score over the usable rows; the selected rows are stacked on the rejected ones."
    unscored = {c: n for c, n in (manifest.get("scores") or {}).get("unscored", {}).items() if n and c in cols}
    if unscored:  # NaN: no value to draw; the policies rank these rows last
        caption += " Not drawn, as unscored: " + ", ".join(f"{c} {n:,} rows" for c, n in unscored.items()) + "."
    return Figure("Score distributions", caption, _png(fig))


def _top(values: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n largest values, largest first (ties: lower index first)."""
    return np.argsort(-values, kind="stable")[:n]


def _cluster_figure(manifest: dict[str, Any], s: LedgerSummary) -> Figure:
    usable, chosen = s.cluster_usable, s.cluster_selected
    quotas_raw = (manifest.get("selection") or {}).get("quotas")
    quotas = None
    if isinstance(quotas_raw, dict) and quotas_raw:
        quotas = np.zeros(len(usable), np.int64)
        for c, q in quotas_raw.items():
            if 0 <= int(c) < len(usable):
                quotas[int(c)] = int(q)
    order = _top(usable.astype(np.float64), MAX_BARS)
    fig = _figure(11, 3.8)
    ax, ax2 = fig.subplots(1, 2, width_ratios=[2, 1])
    x = np.arange(len(order))
    ax.bar(x, usable[order], color=_COLORS["rejected"], label="usable rows")
    ax.bar(x, chosen[order], color=_COLORS["selected"], label="selected")
    if quotas is not None:
        ax.scatter(
            x, quotas[order], marker="_", s=120, color=_COLORS["quota"], label="budget allocated (quota)", zorder=3
        )
    if len(order) <= 30:
        ax.set_xticks(x, [str(c) for c in order], fontsize=8)
    ax.set_xlabel(
        "cluster (largest first)" + (f"; the {MAX_BARS} largest of {len(usable)}" if len(usable) > MAX_BARS else "")
    )
    ax.set_ylabel("rows")
    ax.set_title("cluster sizes vs budget allocated")
    ax.legend(fontsize=8)

    total_u, total_s = max(usable.sum(), 1), max(chosen.sum(), 1)
    share_u, share_s = usable / total_u, chosen / total_s
    ax2.scatter(share_u, share_s, s=14, color=_COLORS["selected"])
    top = max(float(share_u.max(initial=0)), float(share_s.max(initial=0))) * 1.05 or 1.0
    ax2.plot([0, top], [0, top], ls="--", lw=1, color="#555", label="same share as in the corpus")
    ax2.set_xlim(0, top)
    ax2.set_ylim(0, top)
    ax2.set_xlabel("share of the usable rows")
    ax2.set_ylabel("share of the selection")
    ax2.set_title("composition by cluster")
    ax2.legend(fontsize=8)
    k = int((manifest.get("clusters") or {}).get("k", len(usable)))
    empty = int((usable == 0).sum()) + max(0, k - len(usable))
    caption = (
        f"{k} clusters ({empty} without usable rows). Left: rows per cluster and how many the policy kept"
        + (" against the quota it set" if quotas is not None else "")
        + ". Right: a point above the diagonal is a cluster the selection over-represents."
    )
    return Figure("Clusters", caption, _png(fig))


def _label_figure(s: LedgerSummary) -> Figure:
    labels = sorted(s.label_usable, key=lambda k: (-s.label_usable[k], k))[:MAX_BARS]
    total_u = max(sum(s.label_usable.values()), 1)
    total_s = max(sum(s.label_selected.values()), 1)
    share_u = np.array([s.label_usable[k] / total_u for k in labels])
    share_s = np.array([s.label_selected.get(k, 0) / total_s for k in labels])
    fig = _figure(max(6.0, 0.45 * len(labels) + 2), 3.6)
    ax = fig.subplots()
    x = np.arange(len(labels))
    ax.bar(x - 0.2, share_u, width=0.4, color=_COLORS["rejected"], label="usable rows")
    ax.bar(x + 0.2, share_s, width=0.4, color=_COLORS["selected"], label="selected rows")
    ax.set_xticks(
        x,
        [_short(k, 20) for k in labels],
        rotation=45 if len(labels) > 6 else 0,
        ha="right" if len(labels) > 6 else "center",
        fontsize=8,
    )
    ax.set_ylabel("share")
    ax.set_title("composition by label")
    ax.legend(fontsize=8)
    missing = [k for k in s.label_usable if s.label_selected.get(k, 0) == 0]
    caption = f"{len(s.label_usable)} labels" + (
        f"; {len(missing)} with no selected row ({', '.join(_short(m, 30) for m in sorted(missing)[:5])}"
        + ("…" if len(missing) > 5 else "")
        + ")"
        if missing
        else "; every label is in the selection"
    )
    return Figure("Labels", caption, _png(fig))


def _bandit_figure(rounds: dict[str, np.ndarray], info: dict[str, Any]) -> Figure:
    r = rounds["reward"]
    x = np.arange(1, len(r) + 1)
    fig = _figure(10, 3.4)
    ax, ax2 = fig.subplots(1, 2)
    ax.plot(x, r, marker=".", lw=1, color=_COLORS["selected"], label="reward")
    window = max(1, len(r) // 10)
    ax.plot(
        x, np.convolve(r, np.ones(window) / window, mode="same"), color=_COLORS["quota"], label=f"mean of {window}"
    )
    ax.set_xlabel("round")
    ax.set_ylabel("reward")
    ax.set_title("bandit reward per round")
    ax.legend(fontsize=8)
    recorded = "regret_recorded" in rounds
    ax2.plot(x, rounds["regret"], color=_COLORS["quarantined"])
    ax2.set_xlabel("round")
    ax2.set_ylabel("cumulative regret")
    ax2.set_title("regret (recorded by the policy)" if recorded else "regret (estimated vs the best arm's mean)")
    caption = f"{len(r)} rounds; mean reward {r.mean():.4g}, last tenth {r[-max(1, len(r) // 10) :].mean():.4g}."
    if isinstance(info.get("examples_probed"), int):
        caption += f" The expensive scorer touched {info['examples_probed']:,} rows"
        if isinstance(info.get("probed_fraction"), int | float):
            caption += f" ({info['probed_fraction']:.1%} of the corpus)"
        caption += "."
    return Figure("Bandit", caption, _png(fig))


def _time_figure(manifest: dict[str, Any]) -> Figure:
    seconds = {k: float(v) for k, v in manifest["seconds"].items() if isinstance(v, int | float)}
    fig = _figure(7, 0.45 * len(seconds) + 1.2)
    ax = fig.subplots()
    names = list(seconds)[::-1]
    bars = ax.barh(names, [seconds[n] for n in names], color=_COLORS["selected"])
    ax.bar_label(bars, labels=[f"{seconds[n]:.1f} s" for n in names], fontsize=8)
    ax.set_xlabel("seconds")
    ax.set_title("time per pass")
    ax.margins(x=0.15)
    total = sum(seconds.values())
    return Figure("Time", f"{total:.1f} s in all.", _png(fig))


# --- the page ------------------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9em; } td, th { padding: 2px 10px; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; } tr:nth-child(even) { background: #f5f7f9; }
img { max-width: 100%; height: auto; } .caption { color: #555; font-size: 0.9em; }
pre { background: #f5f7f9; padding: 1em; overflow-x: auto; font-size: 0.8em; }
"""


def _table(rows: list[tuple[str, Any]]) -> str:
    cells = []
    for k, v in rows:
        num = isinstance(v, int | float) and not isinstance(v, bool)
        text = f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)
        cells.append(f"<tr><th>{html.escape(k)}</th><td{' class=n' if num else ''}>{html.escape(text)}</td></tr>")
    return "<table>" + "".join(cells) + "</table>"


def render_html(out: str, manifest: dict[str, Any], s: LedgerSummary, figures: list[Figure]) -> str:
    """The report page: a summary table, then each figure as an embedded PNG with its caption.

    Args:
        out: the run's output folder (shown in the title).
        manifest: the run's manifest.json.
        s: the ledger summary.
        figures: the figures from `build_figures`.
    """
    cfg = manifest.get("config", {})
    sel = manifest.get("selection") or {}
    created = manifest.get("created_unix")
    rows: list[tuple[str, Any]] = [
        ("output", out),
        ("committed", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created)) if created else "?"),
        ("input", (cfg.get("input") or {}).get("path", "?")),
        ("rows read", (manifest.get("input") or {}).get("rows", sum(s.status.values()))),
        *[(k, v) for k, v in (manifest.get("counts") or s.status).items()],
        ("policy", sel.get("policy", (cfg.get("select") or {}).get("policy", "?"))),
        ("budget", f"{(cfg.get('select') or {}).get('budget', '?')} -> {sel.get('budget_rows', '?')} rows"),
        ("clusters (k)", (manifest.get("clusters") or {}).get("k", "?")),
        ("scores reused", ((manifest.get("reuse") or {}).get("scores") or {}).get("reused", "?")),
    ]
    rows += [(f"rows cut: {k}", v) for k, v in (manifest.get("truncated") or {}).items()]
    extra = {k: v for k, v in sel.items() if isinstance(v, int | float | str) and k not in ("policy", "budget_rows")}
    rows += [(f"selection: {k}", v) for k, v in extra.items()]
    nested = {k: v for k, v in (sel.get("bandit") or {}).items() if isinstance(v, int | float | str) and v != ""}
    rows += [(f"bandit: {k}", v) for k, v in nested.items()]
    body = [f"<h1>raysel run report</h1>{_table(rows)}"]
    for f in figures:
        data = base64.b64encode(f.png).decode("ascii")
        body.append(
            f"<h2>{html.escape(f.title)}</h2>"
            f'<img alt="{html.escape(f.title)}" src="data:image/png;base64,{data}">'
            f'<p class="caption">{html.escape(f.caption)}</p>'
        )
    versions = ", ".join(f"{k} {v}" for k, v in (manifest.get("versions") or {}).items())
    body.append(
        "<h2>Configuration</h2><details><summary>resolved config</summary>"
        f"<pre>{html.escape(json.dumps(cfg, indent=2))}</pre></details>"
        f'<p class="caption">raysel {html.escape(str(manifest.get("raysel_version", "?")))}; '
        f"{html.escape(versions)}</p>"
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>raysel report: {html.escape(out)}</title><style>{_CSS}</style></head>"
        f"<body>{''.join(body)}</body></html>\n"
    )
