"""The ``saige-k8s`` command line. Commands parse options and hand off to the library.

Exit codes: 0 success; 1 a runtime failure (database unreachable, I/O error; worth a
retry); 2 bad usage, configuration or input (retrying will not help); 3 the gate rejected
the candidate (an outcome: the champion stays); 130 interrupted (Ctrl-C); 143 stopped by
SIGTERM (partial output removed).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, NoReturn, Union, get_args, get_origin

import click

from saige_k8s import __version__, lifecycle
from saige_k8s.dataset.formats import FormatName
from saige_k8s.errors import InputError, SaigeError
from saige_k8s.experiences import is_sqlite_path
from saige_k8s.experiences.filters import PRESETS, Filters, PresetName
from saige_k8s.spec import DATA_ROOT_ENV, STEP_NAMES, StepName, TrainSpec, resolve_data_root

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
        # Our own words: nothing to scrub, and no import now (a signal may have cut one short).
        message = message if message.startswith(lifecycle.reason()) else f"{lifecycle.reason()}; partial output removed"
        code = stopped
    else:
        from saige_k8s.experiences.credentials import scrub

        # Only the first line, and never a credential, even from an error no one foresaw.
        message = scrub(message)
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
      saige-k8s demo-db --db saige.db --rows 5000
      saige-k8s extract --db saige.db --format mistral
    """
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _renamed(old: str, new: str, dest: str, **kwargs: Any):
    """A flag's old spelling, hidden: it still works, with a warning line. The new flag's
    parameter (named ``dest``) takes ``callback=_or_renamed``."""

    def remember(ctx: click.Context, param: click.Parameter, value: Any) -> None:
        if value is not None:
            click.echo(f"saige-k8s: warning: {old} is deprecated here; use {new}", err=True)
            ctx.meta[f"saige_k8s.renamed.{dest}"] = value

    return click.option(old, f"renamed_{dest}", hidden=True, expose_value=False, callback=remember, **kwargs)


def _or_renamed(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """The flag's value, else its old spelling's (given on the command line, so processed first)."""
    return value if value is not None else ctx.meta.get(f"saige_k8s.renamed.{param.name}")


@cli.command("demo-db")
@click.option(
    "--db",
    "db",
    metavar="PATH_OR_URL",
    callback=_or_renamed,
    help="SQLite file to (re)create, or a SQLAlchemy URL (e.g. postgresql+psycopg://…)  [required]",
)
@_renamed("--out", "--db", "db", metavar="PATH_OR_URL")
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
    "--if-missing", is_flag=True, help="Do nothing when --db is an existing file (how demo pipelines create it once)."
)
def demo_db(db: str | None, rows: int, seed: int, table: str, response_median_bytes: int, if_missing: bool) -> None:
    """Create a synthetic SAIGE experience database (realistic scores, a few broken rows)."""
    from saige_k8s.experiences.credentials import redact
    from saige_k8s.experiences.demo import DemoOptions, create_database

    if db is None:
        raise click.MissingParameter(param_hint="'--db'", param_type="option")
    out = db
    if if_missing and is_sqlite_path(out) and Path(out).expanduser().is_file():
        click.echo(f"{redact(out)} exists; left as it is")
        return
    count = create_database(out, DemoOptions(rows=rows, seed=seed, response_median_bytes=response_median_bytes), table)
    click.echo(f"Wrote {count} experiences to {redact(out)} (table {table}, seed {seed})")


def _data_root_option(note: str = ""):
    """--data-root, the shared volume's root, the same way on every command."""
    sentence = f" {note}" if note else ""
    return click.option(
        "--data-root",
        "data_root",
        type=click.Path(file_okay=False, path_type=Path),
        callback=_or_renamed,
        help=f"Shared volume root.{sentence} [default: ${DATA_ROOT_ENV}, the spec's data_root, or ./saige-data]",
    )


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


def _choices(annotation: Any) -> click.Choice:
    """A click choice from a Literal type, so the flags offer exactly what the spec accepts."""
    return click.Choice(list(get_args(annotation)))


def _plain_type(annotation: Any) -> Any:
    """``Annotated[float, ...] | None`` -> ``float``: the type a flag parses."""
    if get_origin(annotation) in (Union, UnionType):
        annotation = next(arg for arg in get_args(annotation) if arg is not type(None))
    return get_args(annotation)[0] if get_origin(annotation) is Annotated else annotation


def _filter_options(func):  # noqa: ANN001 - a click decorator
    """--preset and one flag per threshold of Filters, with the Filters' own help and defaults."""
    for name, field in reversed(Filters.model_fields.items()):
        if name == "principle_weights":  # a mapping: set it in the spec
            continue
        kind = _plain_type(field.annotation)
        option_type: Any = _choices(kind) if get_origin(kind) is Literal else kind
        default = f" [default: {field.default}]" if field.default is not None else ""
        help_text = f"{(field.description or '').rstrip('.')}{default}."
        func = click.option(f"--{name.replace('_', '-')}", type=option_type, help=help_text)(func)
    presets = ", ".join(
        f"{name} {v['max_harm']}/{v['min_buddhist']}/{v['min_alignment']}" for name, v in PRESETS.items()
    )
    return click.option("--preset", type=_choices(PresetName), help=f"Filter thresholds: {presets}.")(func)


@cli.command()
@_spec_option("Pipeline spec (YAML); flags override its values.")
@click.option("--db", metavar="PATH_OR_URL", help="SQLite file or SQLAlchemy URL [default: $SAIGE_DB_URL].")
@click.option("--table", help="Experiences table [default: experiences].")
@_filter_options
@click.option("--format", "fmt", type=_choices(FormatName), help="Chat format of the text column [default: tinyllama].")
@click.option("--system-prompt", help="System prompt for formats with a system turn.")
@click.option(
    "--eval-fraction",
    type=float,
    help="Share of prompts held out for eval (all answers to a prompt on one side) [default: 0.05].",
)
@_data_root_option("The dataset goes to DATA_ROOT/datasets/ID.")
@_renamed("--out", "--data-root", "data_root", type=click.Path(file_okay=False, path_type=Path))
@click.option("--dataset-id", help="Name of the dataset directory [default: UTC timestamp + random suffix].")
@click.option(
    "--csv",
    "csv_path",
    type=click.Path(dir_okay=False, path_type=Path),
    callback=_or_renamed,
    help="Also write the examples as CSV (the seed's output) to this file.",
)
@_renamed("--output", "--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--strict/--no-strict", default=None, help="Fail on the first unusable row instead of counting it.")
@click.option(
    "--kto/--no-kto",
    default=None,
    help="Also write the KTO part (kto-{train,eval}.parquet: the removed poor, harmful or too harmful answers) "
    "that train --method kto reads [default: when the spec's train.method is kto].",
)
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
    kto: bool | None,
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
        data_root=resolve_data_root(data_root, spec),
        table=table or spec.source.table,
        db_schema=spec.source.db_schema,
        columns=spec.source.columns,
        filters=filters,
        format=fmt or spec.extract.format,  # type: ignore[arg-type]  # a click choice of FormatName
        system_prompt=spec.extract.system_prompt if system_prompt is None else system_prompt,
        eval_fraction=_eval_fraction(spec.extract.eval_fraction if eval_fraction is None else eval_fraction),
        dataset_id=dataset_id,
        csv_path=csv_path,
        strict=spec.extract.strict if strict is None else strict,
        kto=spec.train.method == "kto" if kto is None else kto,
        progress=True,
        suite=[Path(p) for p in spec.evaluate.suite],
    )
    existing = existing_dataset(request.data_root, dataset_id) if reuse_existing and dataset_id else None
    if existing is not None:
        result = existing
        log.info("dataset %s already published; reporting it", dataset_id)
    else:
        from saige_k8s import metrics

        def textfile(manifest: dict[str, Any], directory: Path) -> None:  # before the dataset is published
            registry = metrics.extraction_registry(manifest, min_examples=spec.extract.min_examples)
            metrics.write_textfile(registry, directory, spec.name)

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


def _train_options(func):  # noqa: ANN001 - a click decorator
    """The train flags; each overrides the spec's ``train:`` key of the same name."""
    default = TrainSpec()
    fields = TrainSpec.model_fields
    flags: list[tuple[str, dict[str, Any]]] = [
        (
            "--model",
            {
                "help": "Hugging Face model name, local directory, .gguf file, or package://PKG/FILE "
                f"[default: {default.model}]."
            },
        ),
        (
            "--method",
            {
                "type": _choices(fields["method"].annotation),
                "help": "sft: learn the kept answers; dpo: the extraction's preference pairs; kto: kept answers "
                f"against the poor/harmful ones [default: {default.method}].",
            },
        ),
        ("--beta", {"type": float, "help": f"dpo/kto: closeness to the base model [default: {default.beta}]."}),
        ("--dpo-loss", {"type": _choices(fields["dpo_loss"].annotation), "help": f"[default: {default.dpo_loss}]"}),
        (
            "--sample-weights",
            {
                "type": _choices(_plain_type(fields["sample_weights"].annotation)),
                "help": "sft: scale each example's loss by its weighted score [default: unweighted].",
            },
        ),
        ("--epochs", {"type": float, "help": f"[default: {default.epochs}]"}),
        ("--batch-size", {"type": int, "help": f"Per process [default: {default.batch_size}]."}),
        ("--gradient-accumulation", {"type": int, "help": f"[default: {default.gradient_accumulation}]"}),
        ("--learning-rate", {"type": float, "help": f"[default: {default.learning_rate}]"}),
        (
            "--lr-scheduler",
            {
                "type": _choices(fields["lr_scheduler"].annotation),
                "help": f"[default: {default.lr_scheduler}]",
            },
        ),
        ("--warmup-ratio", {"type": float, "help": f"[default: {default.warmup_ratio}]"}),
        ("--weight-decay", {"type": float, "help": f"[default: {default.weight_decay}]"}),
        (
            "--max-grad-norm",
            {"type": float, "help": f"Clip gradients to this norm; 0: off [default: {default.max_grad_norm}]."},
        ),
        (
            "--max-seq-len",
            {
                "type": int,
                "help": f"Longer examples are cut (the end-of-turn token is kept) [default: {default.max_seq_len}].",
            },
        ),
        ("--max-steps", {"type": int, "help": "Stop after this many optimizer steps."}),
        ("--max-eval-examples", {"type": int, "help": "Evaluate on at most this many eval examples."}),
        ("--lora-rank", {"type": int, "help": f"[default: {default.lora_rank}]"}),
        ("--lora-alpha", {"type": int, "help": "[default: 2 × rank]"}),
        ("--lora-dropout", {"type": float, "help": f"[default: {default.lora_dropout}]"}),
        ("--target-modules", {"help": "Comma-separated module names, or all-linear [default: per architecture]."}),
        (
            "--precision",
            {
                "type": _choices(fields["precision"].annotation),
                "help": "auto: bf16 where the GPU supports it, fp16 on other GPUs, fp32 on a CPU.",
            },
        ),
        ("--seed", {"type": int, "help": f"[default: {default.seed}]"}),
        (
            "--save-steps",
            {
                "type": int,
                "help": f"Checkpoint every N optimizer steps and on SIGTERM [default: {default.save_steps}].",
            },
        ),
        ("--logging-steps", {"type": int, "help": f"[default: {default.logging_steps}]"}),
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
        func = click.option(name, **kwargs)(func)
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
@_data_root_option()
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
    from saige_k8s.training.quiet import expected_noise_silenced

    with expected_noise_silenced():  # from the imports on: bitsandbytes warns as it is imported
        with lifecycle.deferred():  # torch's import must not be interrupted from inside
            from saige_k8s.training.loop import TrainOptions
            from saige_k8s.training.loop import train as run_train

        spec = load_spec(spec_path) if spec_path else PipelineSpec()
        if use_4bit or use_8bit:
            flags["quantization"] = "4bit" if use_4bit else "8bit"
        if target_modules:
            flags["target_modules"] = [m.strip() for m in target_modules.split(",") if m.strip()]
        train_spec = override_train(spec.train, flags)
        root = resolve_data_root(data_root, spec)
        dataset_dir = resolve_dataset(root, dataset)
        run_dir = output_dir or root / "runs" / f"{dataset_dir.name}-{_slug(train_spec.model)}"
        metrics = run_train(TrainOptions(dataset=dataset_dir, run_dir=run_dir, spec=train_spec, progress=True))
        if os.environ.get("RANK", "0") != "0":  # under a launcher, one process reports
            return
        from saige_k8s import metrics as prometheus

        registry = prometheus.training_registry(metrics)
        prometheus.write_textfile(registry, run_dir, spec.name)
        prometheus.push(registry, pushgateway, prometheus.TRAIN_JOB, spec.name)
        click.echo(_trained(metrics, run_dir))


def _trained(metrics: dict[str, Any], run_dir: Path | str) -> str:
    """What a training run did, for ``train`` and ``run`` alike (no eval split: no eval loss)."""
    before, after = metrics.get("eval_loss_before"), metrics.get("eval_loss")
    evaluation = f", eval loss {before:.4f} -> {after:.4f}" if before is not None and after is not None else ""
    return (
        f"Trained {metrics['steps']} steps on {metrics['train_examples']} examples "
        f"({metrics['tokens_per_second']:.0f} tokens/s{evaluation}); adapter in {Path(run_dir) / 'adapter'}"
    )


@cli.command()
@_spec_option("Pipeline spec (YAML), e.g. jobs/demo.yaml.", required=True)
@_data_root_option()
@_pushgateway_option(
    "every step's metrics and the pipeline's result",
    "DATA_ROOT/metrics/pipeline-NAME.prom is always written",
)
@click.option(
    "--run",
    "run_id",
    help="Run id [default: NAME-YYYYMMDD-HHMMSS]; a stopped run's id continues it (training resumes).",
)
def run(spec_path: Path, data_root: Path | None, pushgateway: str | None, run_id: str | None) -> None:
    """Run the pipeline on this machine: (collect,) extract, then train (then export).

    Each step is a process running the same command a Kubernetes pod would run; its output
    goes to the terminal and to DATA_ROOT/pipelines/RUN/STEP.log (`saige-k8s status --local`
    and `logs --local RUN` read them). After the run, success or failure, the pipeline's
    metrics are written and pushed.
    """
    from saige_k8s.runners.local import run_local
    from saige_k8s.spec import load_spec, new_run_id

    spec = load_spec(spec_path)
    root = resolve_data_root(data_root, spec)
    run_id = run_id or new_run_id(spec.name)
    _say(f"run {run_id} in {root}")
    outcome = run_local(spec, spec_path, root, run_id, _say, pushgateway=pushgateway)
    run_dir = root / "runs" / run_id
    dataset = outcome.dataset
    trained = _trained(json.loads((run_dir / "metrics.json").read_text(encoding="utf-8")), run_dir)
    click.echo(f"Pipeline {run_id}: dataset {dataset['dataset_id']} ({dataset['kept']} examples). {trained}")


_NAMESPACE_DEFAULT = "the kubeconfig context's namespace, or the pod's with --in-cluster"


def _cluster_options(namespace_default: str = _NAMESPACE_DEFAULT):
    """Where the controller commands find the cluster; the same flags on each, as kubectl spells them."""

    def decorate(func):  # noqa: ANN001 - a click decorator
        func = click.option(
            "--in-cluster", is_flag=True, help="Use the pod's service account (the Helm chart's CronJob does)."
        )(func)
        func = click.option("--context", help="kubeconfig context [default: the current one].")(func)
        func = click.option(
            "--kubeconfig",
            metavar="FILE",
            help="kubeconfig file(s), ':'-separated [default: $KUBECONFIG, else ~/.kube/config].",
        )(func)
        return click.option("-n", "--namespace", help=f"Namespace [default: {namespace_default}].")(func)

    return decorate


def _backend_options(func):  # noqa: ANN001 - a click decorator
    """The cluster's flags, or --local / --data-root for the runs of `saige-k8s run` on this machine."""
    func = _data_root_option("Where the local runs are; implies --local.")(func)
    func = click.option("--local", is_flag=True, help="The runs of `saige-k8s run` on this machine, not a cluster's.")(
        func
    )
    return _cluster_options()(func)


def _connect(namespace: str | None, context: str | None, in_cluster: bool, kubeconfig: str | None):
    from saige_k8s.runners.kubernetes import Cluster

    if in_cluster and (context or kubeconfig):
        raise click.UsageError("--in-cluster uses the pod's service account: leave out --context and --kubeconfig")
    return Cluster.connect(context=context, in_cluster=in_cluster, namespace=namespace, kubeconfig=kubeconfig)


def _backend(options: dict[str, Any]):
    """The local runs under a data root, or the cluster's namespace."""
    if options["local"] or options["data_root"] is not None:
        from saige_k8s.runners.local import LocalBackend

        return LocalBackend(resolve_data_root(options["data_root"]))
    from saige_k8s.runners.controller import KubernetesBackend

    return KubernetesBackend(
        _connect(options["namespace"], options["context"], options["in_cluster"], options["kubeconfig"])
    )


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
@click.option(
    "--dry-run",
    is_flag=True,
    help="Print the Jobs it would create (YAML; with --no-wait, the controller's Job) and create nothing.",
)
@_pushgateway_option("the run's pipeline metrics (success, duration)", "the steps push theirs from their pods")
def submit(
    spec_path: Path,
    namespace: str | None,
    context: str | None,
    kubeconfig: str | None,
    in_cluster: bool,
    run_id: str | None,
    wait: bool,
    follow: bool,
    dry_run: bool,
    pushgateway: str | None,
) -> None:
    """Run the pipeline as Kubernetes Jobs: extract, check the dataset, train (then export).

    \b
    Exit code: 0 when every step succeeded; 2 when a step failed on its configuration or
    input (or the dataset is below extract.min_examples); 1 for other failures.
    """
    from saige_k8s.runners import controller
    from saige_k8s.runners.backend import Run
    from saige_k8s.runners.jobs import construct_controller_job, job_name, pipeline_objects, run_dir
    from saige_k8s.spec import load_spec, new_run_id

    spec = load_spec(spec_path)
    run = Run(spec, run_id or new_run_id(spec.name))
    job_name(run.run_id, "extract")  # a name too long is a usage error before anything is sent
    cluster = _connect(namespace or spec.kubernetes.namespace, context, in_cluster, kubeconfig)
    if dry_run:
        objects = pipeline_objects(run) if wait else [construct_controller_job(run)]
        for obj in objects:
            obj.metadata.namespace = cluster.namespace
        _print_objects(objects, "yaml")
        _say(f"dry run: nothing was created in namespace {cluster.namespace} (run {run.run_id})")
        return
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
        f"({outcome.dataset.get('kept', '?')} examples); adapter in {run_dir(run)}/adapter "
        f"on volume {spec.kubernetes.claim_name}"
    )


@cli.command()
@click.argument("run_id", metavar="[RUN]", required=False)
@_backend_options
@click.option(
    "-o",
    "--output",
    "fmt",
    type=click.Choice(["table", "wide", "json", "yaml"]),
    default="table",
    show_default=True,
    help="wide adds the pipeline and each step's duration; json and yaml list every field.",
)
def status(run_id: str | None, fmt: str, **where: Any) -> None:
    """Show the runs in the namespace (or under the data root, with --local) and the state of each step."""
    from dataclasses import asdict

    backend = _backend(where)
    rows = backend.status(run_id)
    if fmt in ("json", "yaml"):
        records = [asdict(row) for row in rows]
        if fmt == "json":
            click.echo(json.dumps(records))
        else:
            import yaml

            click.echo(yaml.safe_dump(records, sort_keys=False), nl=False)
        return
    if not rows:
        _say(f"no saige-k8s runs in {backend.where}" if run_id is None else f"no run {run_id!r} in {backend.where}")
        return
    header: tuple[str, ...]
    cells: list[tuple[str, ...]]
    if fmt == "wide":
        header = ("RUN", "PIPELINE", "STEP", "STATE", "STARTED", "FINISHED", "DURATION", "JOB")
        cells = [
            (r.run_id, r.pipeline, r.step, _state(r), r.started, r.finished, _duration(r.started, r.finished), r.job)
            for r in rows
        ]
    else:
        header = ("RUN", "STEP", "STATE", "STARTED", "FINISHED", "JOB")
        cells = [(r.run_id, r.step, _state(r), r.started, r.finished, r.job) for r in rows]
    _print_table(header, cells)


def _print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """Columns as kubectl prints them: no borders, a bold header on a terminal, never cut when piped."""
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold", padding=(0, 1))
    for name in header:
        table.add_column(name, no_wrap=True)
    for row in rows:
        table.add_row(*row)
    console = Console(highlight=False)
    if console.is_terminal:
        console.print(table)
        return
    # A pipe or a file: as wide as the table, no styles, no trailing blanks.
    plain = Console(highlight=False, width=Console(width=100_000).measure(table).maximum, color_system=None)
    with plain.capture() as captured:
        plain.print(table)
    for line in captured.get().splitlines():
        click.echo(line.rstrip())


def _duration(started: str, finished: str) -> str:
    """How long a step ran (or has run so far), as kubectl writes it: 45s, 5m12s, 2h3m, 3d4h."""
    import datetime

    if not started:
        return ""
    try:
        begin = datetime.datetime.fromisoformat(started)
        end = datetime.datetime.fromisoformat(finished) if finished else datetime.datetime.now(begin.tzinfo)
    except ValueError:
        return ""
    seconds = max(0, int((end - begin).total_seconds()))
    minutes, hours, days = seconds // 60, seconds // 3600, seconds // 86400
    if days:
        return f"{days}d{hours % 24}h"
    if hours:
        return f"{hours}h{minutes % 60}m"
    if minutes:
        return f"{minutes}m{seconds % 60}s"
    return f"{seconds}s"


def _state(row: Any) -> str:
    """A multi-node step's state, with each node's: ``Running [0:Running 1:Pending]``."""
    nodes = " ".join(f"{index}:{state}" for index, state in row.indexes.items())
    return f"{row.state} [{nodes}]" if nodes else row.state


@cli.command()
@click.argument("run_id", metavar="RUN")
@_backend_options
@click.option("--step", type=click.Choice(STEP_NAMES), help="[default: the latest]")
@click.option(
    "--index", type=click.IntRange(min=0), help="Node of a multi-node step (its completion index) [default: 0]."
)
@click.option("-f", "--follow", is_flag=True, help="Keep streaming until the step ends.")
def logs(run_id: str, step: StepName | None, index: int | None, follow: bool, **where: Any) -> None:
    """Print the log of a run's step (its newest pod, or its log file with --local)."""
    source, lines = _backend(where).logs(run_id, step, follow, index)
    _say(f"{'log' if where['local'] or where['data_root'] else 'pod'} {source}:")
    for line in lines:
        click.echo(line)


@cli.command()
@click.argument("run_id", metavar="RUN")
@_backend_options
def cancel(run_id: str, **where: Any) -> None:
    """Stop a run: delete its Jobs and their pods, or stop its running step with --local.

    The datasets and checkpoints on the volume stay.
    """
    local = where["local"] or where["data_root"] is not None
    for name in _backend(where).cancel(run_id):
        click.echo(f"stopped {name}" if local else f"deleted Job {name}")


@cli.command()
@_spec_option("Pipeline spec (YAML).", required=True)
@click.option("--run", "run_id", help=_RUN_HELP)
@click.option("-n", "--namespace", help="Set metadata.namespace [default: the spec's kubernetes.namespace].")
@click.option("-o", "--output", "fmt", type=click.Choice(["yaml", "json"]), default="yaml", show_default=True)
def render(spec_path: Path, run_id: str | None, namespace: str | None, fmt: str) -> None:
    """Print the run's Jobs as `submit` would create them (no cluster needed; kubectl apply -f - works).

    A multi-node step's Job is followed by its headless Service.
    """
    from saige_k8s.runners.backend import Run
    from saige_k8s.runners.jobs import pipeline_objects
    from saige_k8s.spec import load_spec, new_run_id

    spec = load_spec(spec_path)
    jobs = pipeline_objects(Run(spec, run_id or new_run_id(spec.name)))
    for job in jobs:
        if namespace:
            job.metadata.namespace = namespace
    _print_objects(jobs, fmt)


def _print_objects(objects: list[Any], fmt: str) -> None:
    """Typed objects as kubectl prints them: YAML documents, or a JSON List (kubectl apply -f - reads both)."""
    import yaml

    from saige_k8s.runners.jobs import to_dict

    items = [to_dict(obj) for obj in objects]
    if fmt == "json":
        click.echo(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}, indent=2))
    else:
        click.echo(yaml.safe_dump_all(items, sort_keys=False), nl=False)


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@_spec_option("Pipeline spec (YAML): its name (the champion's), evaluate: block and data_root.")
@_data_root_option("The champion is DATA_ROOT/models/NAME/CHAMPION.")
@click.option(
    "--suite",
    "suites",
    multiple=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="More scenario files, appended to the shipped suite (repeatable).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON line on stdout.")
@click.option(
    "--summary-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the JSON summary here (a pod's /dev/termination-log, read by the controller).",
)
@_pushgateway_option("evaluation metrics", "eval.prom is always written into the run directory")
def evaluate(
    run_dir: Path,
    spec_path: Path | None,
    data_root: Path | None,
    suites: tuple[Path, ...],
    as_json: bool,
    summary_file: Path | None,
    pushgateway: str | None,
) -> None:
    """Compare a trained run with the champion, item by item, and promote it or reject it.

    Both score the dataset's held-out preference pairs and the shipped scenario suite (per
    principle and harm component); the paired differences go through the spec's gate.
    Writes RUN_DIR/eval.json; a promoted run becomes DATA_ROOT/models/NAME/CHAMPION.

    \b
    Exit code: 0 promoted; 3 rejected (an outcome: the champion stays); 2 bad input; 1 failure.
    """
    from saige_k8s import metrics
    from saige_k8s.errors import CandidateRejected
    from saige_k8s.spec import PipelineSpec, load_spec
    from saige_k8s.training.quiet import expected_noise_silenced

    spec = load_spec(spec_path) if spec_path else PipelineSpec()
    settings = spec.evaluate.model_copy(update={"suite": [*spec.evaluate.suite, *map(str, suites)]})
    root = resolve_data_root(data_root, spec)
    with expected_noise_silenced():
        with lifecycle.deferred():
            from saige_k8s.training.evaluate import champion_since, evaluate_run, summary

        result = evaluate_run(run_dir, root, spec.name, settings)
    registry = metrics.evaluation_registry(result, champion_since=champion_since(root, spec.name))
    metrics.write_textfile(registry, run_dir, spec.name, "eval.prom")
    metrics.push(registry, pushgateway, metrics.EVALUATE_JOB, spec.name)
    line = summary(result)
    if summary_file is not None:
        _write_summary(summary_file, line)
    if as_json:
        click.echo(json.dumps(line))
    else:
        overall = result["comparison"]["overall"]
        click.echo(
            f"{result['candidate']} {result['verdict']} against {result['baseline'] or 'the base model'}: "
            f"win rate {overall['candidate_win_rate']:.2f} vs {overall['baseline_win_rate']:.2f} "
            f"on {overall['n']} items"
        )
        for reason in result["reasons"]:
            click.echo(f"  {reason}")
    if result["verdict"] != "promoted":
        raise CandidateRejected(
            f"candidate {result['candidate']} rejected; the champion stays (see {run_dir}/eval.json)"
        )


@cli.command()
@_spec_option("Pipeline spec (YAML): whose champion [default: pipeline saige].")
@_data_root_option()
@click.option("-o", "--output", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def models(spec_path: Path | None, data_root: Path | None, fmt: str) -> None:
    """The champion and every verdict so far (evaluations and human overrides), oldest first."""
    store, _ = _champion_store(spec_path, data_root)
    history = store.history()
    if fmt == "json":
        click.echo(json.dumps({"champion": store.champion(), "history": history}))
        return
    click.echo(f"champion: {store.champion() or '(none yet)'}")
    for entry in history:
        reason = (entry.get("reasons") or [""])[0]
        click.echo(
            f"{entry.get('time', '')}  {entry.get('verdict', ''):<9} {entry.get('run_id', '')}  {reason}".rstrip()
        )


@cli.command()
@click.argument("run_id", metavar="RUN")
@_spec_option("Pipeline spec (YAML): whose champion [default: pipeline saige].")
@_data_root_option()
@click.option("--reason", default="", help="Why, for the history.")
def promote(run_id: str, spec_path: Path | None, data_root: Path | None, reason: str) -> None:
    """Make RUN the champion by hand (recorded in the history as a human override)."""
    store, root = _champion_store(spec_path, data_root)
    adapter = root / "runs" / run_id / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise InputError(f"run {run_id} has no adapter at {adapter}")
    store.promote(run_id, reasons=[reason] if reason else ["promoted by hand"], by="human")
    _publish_champion(root, store.pipeline)
    click.echo(f"{run_id} is the champion of pipeline {store.pipeline}")


@cli.command()
@_spec_option("Pipeline spec (YAML): whose champion [default: pipeline saige].")
@_data_root_option()
@click.option("--reason", default="", help="Why, for the history.")
def rollback(spec_path: Path | None, data_root: Path | None, reason: str) -> None:
    """Restore the champion before the current one (recorded in the history)."""
    store, root = _champion_store(spec_path, data_root)
    restored = store.rollback(reasons=[reason] if reason else [])
    _publish_champion(root, store.pipeline)
    click.echo(f"{restored} is the champion of pipeline {store.pipeline} again")


def _publish_champion(root: Path, pipeline: str) -> None:
    """The serving directory (models/PIPELINE/serving) follows every change of champion."""
    from saige_k8s.training.serving import publish

    publish(root, pipeline)


def _champion_store(spec_path: Path | None, data_root: Path | None):
    from saige_k8s.evaluation.champion import ChampionStore
    from saige_k8s.spec import PipelineSpec, load_spec

    spec = load_spec(spec_path) if spec_path else PipelineSpec()
    root = resolve_data_root(data_root, spec)
    return ChampionStore(root, spec.name), root


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="[default: RUN_DIR/merged]")
@click.option("--force", is_flag=True, help="Export a run the gate rejected (its eval.json says so).")
@click.option("--gguf", is_flag=True, help="Also write RUN_DIR/gguf/: merged, base and LoRA GGUF.")
@click.option("--quantize", type=click.Choice(["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0"]), help="Quantise the GGUF.")
@click.option(
    "--dtype",
    type=click.Choice(["auto", "float16", "bfloat16", "float32"]),
    default="auto",
    show_default=True,
    help="Merged model dtype (auto: the base's; float16 for a GGUF base).",
)
@click.option("--cloudflare", is_flag=True, help="Check Workers AI's limits; write RUN_DIR/cloudflare/.")
def export(
    run_dir: Path, out: Path | None, force: bool, gguf: bool, quantize: str | None, dtype: str, cloudflare: bool
) -> None:
    """Make a run servable: portable adapter, merged model (safetensors), optional GGUF, Ollama Modelfiles.

    \b
    Then: ollama create saige-ethics -f RUN_DIR/Modelfile
          vllm serve BASE --enable-lora --lora-modules saige=RUN_DIR/adapter
    """
    if not run_dir.is_dir():  # before seconds of torch imports
        raise InputError(
            f"run directory {run_dir} does not exist" if not run_dir.exists() else f"{run_dir} is not a directory"
        )
    from saige_k8s.training.quiet import expected_noise_silenced

    with expected_noise_silenced():
        with lifecycle.deferred():
            from saige_k8s.training.export import export_run

        done = export_run(run_dir, out, force=force, gguf=gguf, quantize=quantize, dtype=dtype, cloudflare=cloudflare)
    click.echo(f"Merged model in {done.merged}")
    for path in done.gguf.values():
        click.echo(f"GGUF: {path}")
    if done.cloudflare is not None:
        click.echo(f"Workers AI adapter in {done.cloudflare}")
    if done.serving is not None:
        click.echo(f"Champion serving directory: {done.serving}")
    click.echo("Ollama: " + "; ".join(f"ollama create saige-ethics -f {m}" for m in done.modelfiles))


@cli.command()
@click.option("--dataset", metavar="DIR|ID|LATEST", help="Count the examples of this dataset.")
@_data_root_option()
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

        root = resolve_data_root(data_root)
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
        from saige_k8s import console

        console.bars_only_on_a_terminal()  # before anything imports tqdm
        cli(prog_name="saige-k8s")
    except SystemExit as exc:
        lifecycle.exit_process(exc.code)
    except SaigeError as exc:  # a signal while the command line loads or click parses it
        lifecycle.stopped(str(exc), exc.exit_code)
    lifecycle.exit_process(0)
