"""The ``saige-k8s`` command line. Commands parse options and hand off to the library.

Exit codes: 0 success; 1 a runtime failure (database unreachable, I/O error; worth a
retry); 2 bad usage, configuration or input (retrying will not help); 130 interrupted
(Ctrl-C); 143 stopped by SIGTERM (partial output removed).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from saige_k8s import __version__, lifecycle
from saige_k8s.errors import InputError, SaigeError
from saige_k8s.experiences.schema import HARM_COMPONENTS, PRINCIPLES

DATA_ROOT_ENV = "SAIGE_DATA_ROOT"
#: experiences.filters.PRESETS's names (a test keeps them equal): importing it here would load
#: pydantic before the entry point has installed its signal handlers.
PRESET_NAMES = ("permissive", "default", "strict", "elite")
log = logging.getLogger("saige_k8s")


class _Group(click.Group):
    """Turns the project's errors into one line on stderr and their exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SaigeError as exc:
            _fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except OSError as exc:  # a full or read-only volume, wherever it is noticed
            if os.environ.get("SAIGE_DEBUG"):
                raise
            where = f": {exc.filename}" if exc.filename else ""
            _fail(f"I/O error: {exc.strerror or exc}{where}", 1)
        except click.UsageError as exc:
            where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            _fail(f"{exc.format_message()}{where}", exc.exit_code)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as exc:
            if os.environ.get("SAIGE_DEBUG"):
                raise
            _fail(f"internal error: {type(exc).__name__}: {exc} (set SAIGE_DEBUG=1 for a traceback)", 1)


def _fail(message: str, code: int) -> NoReturn:
    lifecycle.settle()
    stopped = lifecycle.exit_code()
    if stopped is not None and not lifecycle.committed():  # a failure after a signal is the signal's doing
        message = message if message.startswith(lifecycle.reason()) else f"{lifecycle.reason()}; partial output removed"
        code = stopped
    click.echo(f"saige-k8s: error: {message}", err=True)
    sys.exit(code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="saige-k8s")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors on stderr.")
def cli(verbose: int, quiet: bool) -> None:
    """SAIGE's RL-to-SFT loop: curate scored experiences into a fine-tuning dataset, then train on it.

    \b
    Quick start (no cluster, no GPU):
      saige-k8s demo-db --out saige.db --rows 5000
      saige-k8s extract --db saige.db --format mistral
    """
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@cli.command("demo-db")
@click.option(
    "--out",
    "out",
    required=True,
    metavar="PATH_OR_URL",
    help="SQLite file to (re)create, or a SQLAlchemy URL (e.g. postgresql+psycopg://…).",
)
@click.option("--rows", type=click.IntRange(min=1), default=1000, show_default=True, help="Number of experiences.")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same rows.")
@click.option("--table", default="experiences", show_default=True)
@click.option(
    "--response-median-bytes",
    type=click.IntRange(min=12),
    default=420,
    show_default=True,
    help="Median response length; lengths are log-normal up to 6 KB.",
)
@click.option(
    "--if-missing", is_flag=True, help="Do nothing when --out is an existing file (how demo pipelines create it once)."
)
def demo_db(out: str, rows: int, seed: int, table: str, response_median_bytes: int, if_missing: bool) -> None:
    """Create a synthetic SAIGE experience database (realistic scores, a few broken rows)."""
    from saige_k8s.experiences.demo import DemoOptions, create_database

    if if_missing and "://" not in out and Path(out).expanduser().is_file():
        click.echo(f"{out} exists; left as it is")
        return
    count = create_database(out, DemoOptions(rows=rows, seed=seed, response_median_bytes=response_median_bytes), table)
    click.echo(f"Wrote {count} experiences to {out} (table {table}, seed {seed})")


def _pushgateway_option(what: str, also: str):
    return click.option(
        "--pushgateway",
        envvar="SAIGE_PUSHGATEWAY_URL",
        metavar="URL",
        help=f"Push {what} here [default: $SAIGE_PUSHGATEWAY_URL]; {also}.",
    )


def _spec_option(help_text: str, required: bool = False):
    return click.option(
        "-f", "--spec", "spec_path", required=required, type=click.Path(dir_okay=False, path_type=Path), help=help_text
    )


def _threshold_options(func):  # noqa: ANN001 - a click decorator
    for component in reversed(HARM_COMPONENTS):
        func = click.option(f"--max-{component}", type=float, help=f"Keep {component} < this (NULL passes).")(func)
    for principle in reversed(PRINCIPLES):
        func = click.option(f"--min-{principle}", type=float, help=f"Keep {principle} >= this (0-10).")(func)
    return func


@cli.command()
@_spec_option("Pipeline spec (YAML); flags override its values.")
@click.option("--db", metavar="PATH_OR_URL", help="SQLite file or SQLAlchemy URL [default: $SAIGE_DB_URL].")
@click.option("--table", help="Experiences table [default: experiences].")
@click.option(
    "--preset",
    type=click.Choice(PRESET_NAMES),
    help="Filter thresholds: permissive 0.4/5.0/moderate, default 0.3/6.0/good, strict 0.25/6.5/good, "
    "elite 0.2/7.5/excellent.",
)
@click.option("--max-harm", type=float, help="Keep actual_harm < this (0-1) [default: 0.3].")
@click.option("--min-buddhist", type=float, help="Keep weighted Buddhist score >= this (0-10) [default: 6.0].")
@click.option(
    "--min-alignment",
    type=click.Choice(["excellent", "good", "moderate", "poor", "harmful"]),
    help="Keep this alignment and better [default: good].",
)
@click.option("--limit", type=click.IntRange(min=1), help="At most this many examples (in id order).")
@_threshold_options
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["tinyllama", "mistral", "llama3"]),
    help="Chat format of the text column [default: tinyllama].",
)
@click.option("--system-prompt", help="System prompt for formats with a system turn.")
@click.option("--eval-fraction", type=float, help="Share of examples held out for eval, by id hash [default: 0.05].")
@click.option(
    "--data-root",
    "--out",
    "data_root",
    type=click.Path(file_okay=False, path_type=Path),
    help=f"Shared volume root; the dataset goes to DATA_ROOT/datasets/ID [default: ${DATA_ROOT_ENV} or ./saige-data].",
)
@click.option("--dataset-id", help="Name of the dataset directory [default: UTC timestamp + random suffix].")
@click.option(
    "--csv",
    "--output",
    "csv_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the examples as CSV (the seed's output) to this file.",
)
@click.option("--strict/--no-strict", default=None, help="Fail on the first unusable row instead of counting it.")
@_pushgateway_option("dataset-quality metrics", "metrics.prom is always written into the dataset directory")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON line on stdout.")
@click.option(
    "--summary-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the JSON summary to this file (a pod's /dev/termination-log, read by the controller).",
)
@click.option(
    "--reuse-existing",
    is_flag=True,
    help="If --dataset-id names a complete dataset, report it instead of failing (a retried pod's rerun).",
)
def extract(
    spec_path: Path | None,
    db: str | None,
    table: str | None,
    fmt: str | None,
    system_prompt: str | None,
    eval_fraction: float | None,
    data_root: Path | None,
    dataset_id: str | None,
    csv_path: Path | None,
    strict: bool | None,
    pushgateway: str | None,
    as_json: bool,
    summary_file: Path | None,
    reuse_existing: bool,
    **thresholds: Any,
) -> None:
    """Curate high-quality experiences into a versioned SFT dataset (Parquet + manifest).

    Keeps rows with low harm AND high Buddhist-principle scores, renders them in a chat
    format, drops exact duplicates, splits train/eval deterministically, and publishes
    DATA_ROOT/datasets/ID atomically (LATEST points at it). Rows that cannot be used are
    counted per reason, and every filter's removals are reported.
    """
    from saige_k8s.dataset.extract import ExtractRequest, existing_dataset
    from saige_k8s.dataset.extract import extract as run_extract
    from saige_k8s.dataset.report import format_report
    from saige_k8s.spec import PipelineSpec, load_spec

    spec = load_spec(spec_path) if spec_path else PipelineSpec()
    filters = spec.extract.filters.resolve(**thresholds)
    request = ExtractRequest(
        db=db or spec.source.url,
        data_root=data_root or Path(os.environ.get(DATA_ROOT_ENV) or spec.data_root),
        table=table or spec.source.table,
        db_schema=spec.source.db_schema,
        columns=spec.source.columns,
        filters=filters,
        format=fmt or spec.extract.format,  # type: ignore[arg-type]
        system_prompt=spec.extract.system_prompt if system_prompt is None else system_prompt,
        eval_fraction=_eval_fraction(spec.extract.eval_fraction if eval_fraction is None else eval_fraction),
        dataset_id=dataset_id,
        csv_path=csv_path,
        strict=spec.extract.strict if strict is None else strict,
        progress=True,
    )
    existing = existing_dataset(request.data_root, dataset_id) if reuse_existing and dataset_id else None
    if existing is not None:
        result = existing
        log.info("dataset %s already published; reporting it", dataset_id)
    else:
        from saige_k8s import metrics

        def textfile(manifest: dict[str, Any], directory: Path) -> None:  # before the dataset is published
            registry = metrics.extraction_registry(manifest, min_examples=spec.extract.min_examples)
            metrics.write_textfile(registry, directory)

        result = run_extract(dataclasses.replace(request, before_publish=textfile))
        registry = metrics.extraction_registry(result.manifest, min_examples=spec.extract.min_examples)
        metrics.push(registry, pushgateway, metrics.EXTRACT_JOB, spec.name)
    if summary_file is not None:
        _write_summary(summary_file, result.summary)
    if as_json:
        click.echo(json.dumps(result.summary))
    else:
        click.echo(format_report(result.manifest, result.path, csv_path))


def _write_summary(path: Path, summary: dict[str, Any]) -> None:
    try:
        path.write_text(json.dumps(summary) + "\n", encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot write the summary to {path}: {exc.strerror}") from None


class _TrainDefaultOption(click.Option):
    """Fills ``{field}`` in its help with TrainSpec's default only when help is shown: importing
    the spec (pydantic) when the module loads would delay the signal handlers."""

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        if self.help and "{" in self.help:
            from saige_k8s.spec import TrainSpec

            self.help = self.help.format_map(TrainSpec().model_dump())
        return super().get_help_record(ctx)


def _train_options(func):  # noqa: ANN001 - a click decorator
    """The train flags; each overrides the spec's ``train:`` key of the same name."""
    flags = [
        (
            "--model",
            {"help": "Hugging Face model name, local directory, .gguf file, or package://PKG/FILE [default: {model}]."},
        ),
        ("--epochs", {"type": float, "help": "[default: {epochs}]"}),
        ("--batch-size", {"type": int, "help": "Per process [default: {batch_size}]."}),
        ("--gradient-accumulation", {"type": int, "help": "[default: {gradient_accumulation}]"}),
        ("--learning-rate", {"type": float, "help": "[default: {learning_rate}]"}),
        (
            "--lr-scheduler",
            {
                "type": click.Choice(["cosine", "linear", "constant", "constant_with_warmup"]),
                "help": "[default: {lr_scheduler}]",
            },
        ),
        ("--warmup-ratio", {"type": float, "help": "[default: {warmup_ratio}]"}),
        ("--weight-decay", {"type": float, "help": "[default: {weight_decay}]"}),
        (
            "--max-grad-norm",
            {"type": float, "help": "Clip gradients to this norm; 0: off [default: {max_grad_norm}]."},
        ),
        (
            "--max-seq-len",
            {
                "type": int,
                "help": "Longer examples are cut (the end-of-turn token is kept) [default: {max_seq_len}].",
            },
        ),
        ("--max-steps", {"type": int, "help": "Stop after this many optimizer steps."}),
        ("--max-eval-examples", {"type": int, "help": "Evaluate on at most this many eval examples."}),
        ("--lora-rank", {"type": int, "help": "[default: {lora_rank}]"}),
        ("--lora-alpha", {"type": int, "help": "[default: 2 × rank]"}),
        ("--lora-dropout", {"type": float, "help": "[default: {lora_dropout}]"}),
        ("--target-modules", {"help": "Comma-separated module names, or all-linear [default: per architecture]."}),
        (
            "--precision",
            {
                "type": click.Choice(["auto", "bf16", "fp16", "fp32"]),
                "help": "auto: bf16 where the GPU supports it, fp16 on other GPUs, fp32 on a CPU.",
            },
        ),
        ("--seed", {"type": int, "help": "[default: {seed}]"}),
        (
            "--save-steps",
            {
                "type": int,
                "help": "Checkpoint every N optimizer steps and on SIGTERM [default: {save_steps}].",
            },
        ),
        ("--logging-steps", {"type": int, "help": "[default: {logging_steps}]"}),
    ]
    switches = [
        ("--use-4bit", "QLoRA: load the base model in 4-bit NF4 (bitsandbytes)."),
        ("--use-8bit", "Load the base model in 8-bit (bitsandbytes)."),
        ("--gradient-checkpointing", "Trade compute for memory."),
        ("--trust-remote-code", "Run the model repository's own code (only if you trust it)."),
    ]
    for name, help_text in reversed(switches):
        func = click.option(name, is_flag=True, default=None, help=help_text)(func)
    for name, kwargs in reversed(flags):
        func = click.option(name, cls=_TrainDefaultOption, **kwargs)(func)
    return func


@cli.command()
@_spec_option("Pipeline spec (YAML); its train: block, overridden by flags.")
@click.option(
    "--dataset",
    "--data",
    "dataset",
    default="LATEST",
    show_default=True,
    metavar="DIR|ID|LATEST",
    help="Dataset directory, an id or LATEST under DATA_ROOT/datasets, or the CSV of extract --csv.",
)
@click.option(
    "--data-root",
    type=click.Path(file_okay=False, path_type=Path),
    help=f"Shared volume root [default: ${DATA_ROOT_ENV}, the spec's data_root, or ./saige-data].",
)
@click.option(
    "--output-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Run directory (adapter/, checkpoints/, tensorboard/, metrics.json); rerun to resume "
    "[default: DATA_ROOT/runs/<dataset id>-<model>].",
)
@_train_options
@_pushgateway_option("training metrics", "metrics.prom is always written into the run directory")
def train(
    spec_path: Path | None,
    dataset: str,
    data_root: Path | None,
    output_dir: Path | None,
    pushgateway: str | None,
    use_4bit: bool | None,
    use_8bit: bool | None,
    target_modules: str | None,
    **flags: Any,
) -> None:
    """LoRA/QLoRA fine-tune a causal LM on a curated dataset; writes the adapter and metrics.

    Rerunning with the same --output-dir resumes from its newest checkpoint.

    \b
    Several GPUs: the same command under a launcher, one process per GPU:
      accelerate launch --num_processes 4 -m saige_k8s train ...
      torchrun --nproc_per_node 4 -m saige_k8s train ...
    """
    if use_4bit and use_8bit:
        raise click.UsageError("--use-4bit and --use-8bit exclude each other; pick one")
    from saige_k8s.dataset.writer import resolve_dataset
    from saige_k8s.spec import PipelineSpec, load_spec, override_train
    from saige_k8s.training.loop import TrainOptions
    from saige_k8s.training.loop import train as run_train

    spec = load_spec(spec_path) if spec_path else PipelineSpec()
    if use_4bit or use_8bit:
        flags["quantization"] = "4bit" if use_4bit else "8bit"
    if target_modules:
        flags["target_modules"] = [m.strip() for m in target_modules.split(",") if m.strip()]
    train_spec = override_train(spec.train, flags)
    root = data_root or Path(os.environ.get(DATA_ROOT_ENV) or spec.data_root)
    dataset_dir = resolve_dataset(root, dataset)
    run_dir = output_dir or root / "runs" / f"{dataset_dir.name}-{_slug(train_spec.model)}"
    metrics = run_train(TrainOptions(dataset=dataset_dir, run_dir=run_dir, spec=train_spec, progress=True))
    if os.environ.get("RANK", "0") != "0":  # under a launcher, one process reports
        return
    from saige_k8s import metrics as prometheus

    registry = prometheus.training_registry(metrics)
    prometheus.write_textfile(registry, run_dir)
    prometheus.push(registry, pushgateway, prometheus.TRAIN_JOB, spec.name)
    before, after = metrics["eval_loss_before"], metrics["eval_loss"]
    evaluation = f", eval loss {before:.4f} -> {after:.4f}" if before is not None and after is not None else ""
    click.echo(
        f"Trained {metrics['steps']} steps on {metrics['train_examples']} examples "
        f"({metrics['tokens_per_second']:.0f} tokens/s{evaluation}); adapter in {run_dir / 'adapter'}"
    )


@cli.command()
@_spec_option("Pipeline spec (YAML), e.g. jobs/demo.yaml.", required=True)
@click.option(
    "--data-root",
    type=click.Path(file_okay=False, path_type=Path),
    help=f"Shared volume root [default: ${DATA_ROOT_ENV} or the spec's data_root].",
)
@_pushgateway_option(
    "every step's metrics and the pipeline's result",
    "DATA_ROOT/metrics/pipeline-NAME.prom is always written",
)
def run(spec_path: Path, data_root: Path | None, pushgateway: str | None) -> None:
    """Run the pipeline on this machine: (demo database,) extract, then train (then export).

    Each step is a subprocess running the same command a Kubernetes pod would run. After
    the run, success or failure, the pipeline's metrics are written and pushed.
    """
    from saige_k8s.runners.local import run_local
    from saige_k8s.spec import load_spec

    spec = load_spec(spec_path)
    root = data_root or Path(os.environ.get(DATA_ROOT_ENV) or spec.data_root)
    result = run_local(spec, spec_path, root, pushgateway=pushgateway)
    metrics = result.metrics
    click.echo(
        f"Pipeline {result.run_id}: dataset {result.dataset['dataset_id']} ({result.dataset['kept']} examples), "
        f"eval loss {metrics['eval_loss_before']:.4f} -> {metrics['eval_loss']:.4f}; adapter in "
        f"{result.run_dir / 'adapter'}"
    )


_NAMESPACE_DEFAULT = "the kubeconfig context's namespace, or the pod's with --in-cluster"


def _cluster_options(namespace_default: str = _NAMESPACE_DEFAULT):
    """Where the controller commands find the cluster; the same three flags on each."""

    def decorate(func):  # noqa: ANN001 - a click decorator
        func = click.option(
            "--in-cluster", is_flag=True, help="Use the pod's service account (the Helm chart's CronJob does)."
        )(func)
        func = click.option("--context", help="kubeconfig context [default: the current one].")(func)
        return click.option("-n", "--namespace", help=f"Namespace [default: {namespace_default}].")(func)

    return decorate


def _connect(namespace: str | None, context: str | None, in_cluster: bool):
    from saige_k8s.runners.kubernetes import Cluster

    return Cluster.connect(context=context, in_cluster=in_cluster, namespace=namespace)


def _say(message: str) -> None:
    click.echo(message, err=True)


_RUN_HELP = "Run id: Jobs are named RUN-STEP, and the dataset RUN [default: NAME-YYYYMMDD-HHMMSS]."


@cli.command()
@_spec_option("Pipeline spec (YAML) whose kubernetes: block says how the Jobs run.", required=True)
@_cluster_options(namespace_default="the spec's kubernetes.namespace, else " + _NAMESPACE_DEFAULT)
@click.option("--run", "run_id", help=_RUN_HELP + " Submitting an existing run resumes it; no Job is duplicated.")
@click.option(
    "--wait/--no-wait",
    default=True,
    show_default=True,
    help="Wait here for each step and start the next; --no-wait starts this controller as a Job in the "
    "cluster (as kubernetes.controller_service_account) and returns the run id.",
)
@click.option("--follow", is_flag=True, help="Stream each step's log while waiting.")
@_pushgateway_option("the run's pipeline metrics (success, duration)", "the steps push theirs from their pods")
def submit(
    spec_path: Path,
    namespace: str | None,
    context: str | None,
    in_cluster: bool,
    run_id: str | None,
    wait: bool,
    follow: bool,
    pushgateway: str | None,
) -> None:
    """Run the pipeline as Kubernetes Jobs: extract, check the dataset, train (then export).

    \b
    Exit code: 0 when every step succeeded; 2 when a step failed on its configuration or
    input (or the dataset is below extract.min_examples); 1 for other failures.
    """
    from saige_k8s.runners import controller
    from saige_k8s.runners.commands import new_run_id
    from saige_k8s.runners.jobs import Run
    from saige_k8s.spec import load_spec

    spec = load_spec(spec_path)
    run = Run(spec, run_id or new_run_id(spec.name))
    run.job_name("extract")  # a name too long is a usage error before anything is sent
    cluster = _connect(namespace or spec.kubernetes.namespace, context, in_cluster)
    _say(f"run {run.run_id} in namespace {cluster.namespace}")
    if not wait:
        job = controller.submit_detached(cluster, run, _say)
        _say(f"the controller runs in the cluster as Job {job}; follow with: saige-k8s status {run.run_id}")
        click.echo(run.run_id)
        return
    gateway = pushgateway or spec.kubernetes.pushgateway_url
    outcome = controller.submit(cluster, run, _say, follow=follow, pushgateway=gateway)
    click.echo(
        f"run {run.run_id} succeeded: dataset {outcome.dataset.get('dataset_id', run.dataset_id)} "
        f"({outcome.dataset.get('kept', '?')} examples); adapter in {run.run_dir}/adapter "
        f"on volume {spec.kubernetes.claim_name}"
    )


@cli.command()
@click.argument("run_id", metavar="[RUN]", required=False)
@_cluster_options()
@click.option("-o", "--output", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def status(run_id: str | None, namespace: str | None, context: str | None, in_cluster: bool, fmt: str) -> None:
    """Show the runs in the namespace (or one RUN) and the state of each step."""
    from dataclasses import asdict

    from saige_k8s.runners.controller import status as run_status

    rows = run_status(_connect(namespace, context, in_cluster), run_id)
    if fmt == "json":
        click.echo(json.dumps([asdict(row) for row in rows]))
        return
    if not rows:
        _say("no saige-k8s runs in this namespace" if run_id is None else f"no run {run_id!r} in this namespace")
        return
    header = ("RUN", "STEP", "STATE", "STARTED", "FINISHED", "JOB")
    table = [header, *[(r.run_id, r.step, r.state, r.started, r.finished, r.job) for r in rows]]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


@cli.command()
@click.argument("run_id", metavar="RUN")
@_cluster_options()
@click.option("--step", type=click.Choice(["collect", "extract", "train", "export"]), help="[default: the latest]")
@click.option("-f", "--follow", is_flag=True, help="Keep streaming until the step's container ends.")
def logs(
    run_id: str, namespace: str | None, context: str | None, in_cluster: bool, step: str | None, follow: bool
) -> None:
    """Print the log of a run's step (its newest pod)."""
    from saige_k8s.runners.controller import logs as run_logs

    pod, lines = run_logs(_connect(namespace, context, in_cluster), run_id, step, follow)  # type: ignore[arg-type]
    _say(f"pod {pod}:")
    for line in lines:
        click.echo(line)


@cli.command()
@click.argument("run_id", metavar="RUN")
@_cluster_options()
def cancel(run_id: str, namespace: str | None, context: str | None, in_cluster: bool) -> None:
    """Stop a run: delete its Jobs and their pods (the datasets and checkpoints on the volume stay)."""
    from saige_k8s.runners.controller import cancel as cancel_run

    for name in cancel_run(_connect(namespace, context, in_cluster), run_id):
        click.echo(f"deleted Job {name}")


@cli.command()
@_spec_option("Pipeline spec (YAML).", required=True)
@click.option("--run", "run_id", help=_RUN_HELP)
@click.option("-n", "--namespace", help="Set metadata.namespace [default: the spec's kubernetes.namespace].")
@click.option("-o", "--output", "fmt", type=click.Choice(["yaml", "json"]), default="yaml", show_default=True)
def render(spec_path: Path, run_id: str | None, namespace: str | None, fmt: str) -> None:
    """Print the run's Jobs as `submit` would create them (no cluster needed; kubectl apply -f - works)."""
    import yaml

    from saige_k8s.runners.commands import new_run_id
    from saige_k8s.runners.jobs import Run, pipeline_jobs, to_dict
    from saige_k8s.spec import load_spec

    spec = load_spec(spec_path)
    jobs = [to_dict(job) for job in pipeline_jobs(Run(spec, run_id or new_run_id(spec.name)))]
    for job in jobs:
        if namespace:
            job["metadata"]["namespace"] = namespace
    if fmt == "json":
        click.echo(json.dumps({"apiVersion": "v1", "kind": "List", "items": jobs}, indent=2))
    else:
        click.echo(yaml.safe_dump_all(jobs, sort_keys=False), nl=False)


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="[default: RUN_DIR/merged]")
def export(run_dir: Path, out: Path | None) -> None:
    """Merge a run's adapter into its base model (safetensors) and write an Ollama Modelfile.

    \b
    Then: ollama create saige-ethics -f RUN_DIR/Modelfile
    """
    from saige_k8s.training.export import MODELFILE, export_run

    merged = export_run(run_dir, out)
    click.echo(f"Merged model in {merged}; Ollama: ollama create saige-ethics -f {run_dir / MODELFILE}")


@cli.command()
@click.option("--dataset", metavar="DIR|ID|LATEST", help="Count the examples of this dataset.")
@click.option(
    "--data-root",
    type=click.Path(file_okay=False, path_type=Path),
    help=f"Shared volume root [default: ${DATA_ROOT_ENV} or ./saige-data].",
)
@click.option("--examples", type=click.IntRange(min=0), help="Or give the number of examples directly.")
@click.option("--gpu-memory-gb", type=click.FloatRange(min=0, min_open=True), help="GPU memory per GPU.")
@click.option("--json", "as_json", is_flag=True, help="Print the recommendation as JSON.")
def recommend(
    dataset: str | None, data_root: Path | None, examples: int | None, gpu_memory_gb: float | None, as_json: bool
) -> None:
    """Recommend model, epochs, LoRA rank, batch size and 4-bit from dataset size and GPU memory."""
    from saige_k8s.training.recommend import recommend as advise

    if (dataset is None) == (examples is None):
        raise click.UsageError("give exactly one of --dataset or --examples")
    if dataset is not None:
        from saige_k8s.dataset.writer import MANIFEST, resolve_dataset

        root = data_root or Path(os.environ.get(DATA_ROOT_ENV) or "./saige-data")
        path = resolve_dataset(root, dataset)
        manifest = json.loads((path / MANIFEST).read_text())
        examples = int(manifest["counts"]["train"])
        dataset_format = manifest["format"]
    advice = advise(int(examples or 0), gpu_memory_gb)
    if dataset is not None and dataset_format != advice.format:
        click.echo(
            f"note: the dataset is in {dataset_format} format; extract again with --format {advice.format} "
            f"for {advice.model}",
            err=True,
        )
    if as_json:
        click.echo(json.dumps(advice.as_dict()))
        return
    for warning in advice.warnings:
        click.echo(f"warning: {warning}", err=True)
    memory = f"{gpu_memory_gb:g} GB GPU" if gpu_memory_gb else "GPU memory not given"
    click.echo(f"For {advice.examples} examples ({memory}):")
    click.echo(f"   model {advice.model} ({'4-bit QLoRA' if advice.use_4bit else 'LoRA'}), format {advice.format}")
    click.echo(f"   epochs {advice.epochs}, batch size {advice.batch_size}, LoRA rank {advice.lora_rank}")
    click.echo(f"   about {advice.estimated_minutes_on_t4:g} min on a T4 (16 GB)")
    click.echo(f"   {advice.command(dataset or 'LATEST')}")


def _slug(model: str) -> str:
    name = Path(model).stem if model.endswith(".gguf") else model.rstrip("/").split("/")[-1]
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)[:60]


def _eval_fraction(value: float) -> float:
    if not 0.0 <= value < 1.0:
        raise click.BadParameter(f"must be in [0, 1), got {value}", param_hint="--eval-fraction")
    return value


def main() -> None:
    lifecycle.install()
    try:
        cli(prog_name="saige-k8s")
    except SystemExit as exc:
        lifecycle.exit_process(exc.code)
    except SaigeError as exc:  # a signal while click parses the command line
        lifecycle.stopped(str(exc), exc.exit_code)
    lifecycle.exit_process(0)
