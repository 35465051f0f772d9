"""The ``saige-k8s`` command line. Commands parse options and hand off to the library.

Exit codes: 0 success; 1 a runtime failure (database unreachable, I/O error; worth a
retry); 2 bad usage, configuration or input (retrying will not help); 130 interrupted
(Ctrl-C); 143 stopped by SIGTERM (partial output removed).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from saige_k8s import __version__
from saige_k8s.errors import SaigeError
from saige_k8s.experiences.filters import PRESETS
from saige_k8s.experiences.schema import HARM_COMPONENTS, PRINCIPLES
from saige_k8s.lifecycle import install_sigterm_handler

DATA_ROOT_ENV = "SAIGE_DATA_ROOT"
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
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as exc:
            if os.environ.get("SAIGE_DEBUG"):
                raise
            _fail(f"internal error: {type(exc).__name__}: {exc} (set SAIGE_DEBUG=1 for a traceback)", 1)


def _fail(message: str, code: int) -> NoReturn:
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
    install_sigterm_handler()


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
def demo_db(out: str, rows: int, seed: int, table: str, response_median_bytes: int) -> None:
    """Create a synthetic SAIGE experience database (realistic scores, a few broken rows)."""
    from saige_k8s.experiences.demo import DemoOptions, create_database

    count = create_database(out, DemoOptions(rows=rows, seed=seed, response_median_bytes=response_median_bytes), table)
    click.echo(f"Wrote {count} experiences to {out} (table {table}, seed {seed})")


def _threshold_options(func):  # noqa: ANN001 - a click decorator
    for component in reversed(HARM_COMPONENTS):
        func = click.option(f"--max-{component}", type=float, help=f"Keep {component} < this (NULL passes).")(func)
    for principle in reversed(PRINCIPLES):
        func = click.option(f"--min-{principle}", type=float, help=f"Keep {principle} >= this (0-10).")(func)
    return func


@cli.command()
@click.option(
    "-f",
    "--spec",
    "spec_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Pipeline spec (YAML); flags override its values.",
)
@click.option("--db", metavar="PATH_OR_URL", help="SQLite file or SQLAlchemy URL [default: $SAIGE_DB_URL].")
@click.option("--table", help="Experiences table [default: experiences].")
@click.option(
    "--preset",
    type=click.Choice(list(PRESETS)),
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
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON line on stdout.")
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
    as_json: bool,
    **thresholds: Any,
) -> None:
    """Curate high-quality experiences into a versioned SFT dataset (Parquet + manifest).

    Keeps rows with low harm AND high Buddhist-principle scores, renders them in a chat
    format, drops exact duplicates, splits train/eval deterministically, and publishes
    DATA_ROOT/datasets/ID atomically (LATEST points at it). Rows that cannot be used are
    counted per reason, and every filter's removals are reported.
    """
    from saige_k8s.dataset.extract import ExtractRequest
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
    result = run_extract(request)
    if as_json:
        click.echo(json.dumps(result.summary))
    else:
        click.echo(format_report(result.manifest, result.path, csv_path))


def _eval_fraction(value: float) -> float:
    if not 0.0 <= value < 1.0:
        raise click.BadParameter(f"must be in [0, 1), got {value}", param_hint="--eval-fraction")
    return value


def main() -> None:
    cli(prog_name="saige-k8s")
