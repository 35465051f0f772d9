"""Benchmark of ``saige-k8s extract`` against a naive baseline and the ADBC limit.

What it measures, on the synthetic SAIGE ``experiences`` table (``saige-k8s demo-db``, seed 0),
each measurement in its own subprocess so that its peak RSS is its own:

(a) ``saige-k8s extract --json --format tinyllama`` end to end (the CLI: interpreter start,
    reflection, the one scan, rendering, dedup, split, pairs, Parquet, manifest),
    default filters and eval fraction, a fresh data root each run;
(b) a naive seed-style baseline: the DB-API driver (``sqlite3``, or ``psycopg`` with a named
    server-side cursor), the filter in SQL, then a per-row Python loop (``json.loads`` of the
    scores and the context, an f-string for the TinyLlama chat text, ``csv.writer``);
(c) the limit: ADBC, ``SELECT * ... WHERE <same filter>``, ``fetch_record_batch()`` streamed
    straight into a zstd ``ParquetWriter``; nothing else is done to the rows;
(d) the same read as (a): extract's own one statement (every row, with its verdict and the
    columns the funnel, the pairs and the KTO part need), through extract's own reader,
    straight into Parquet. (a) / (d) is what the Arrow stage costs; (d) / (c) is what reading
    every row, not only the kept ones, costs: pairs and the KTO part need the removed rows.

(a) writes preference pairs, as the command always does. The three run interleaved, round by
round. For each: wall seconds (median of ``--repeats`` runs, measured around the subprocess),
CPU seconds (user + system of the subprocess, median; the figure other work on a shared
machine disturbs least), scanned rows/s (rows in the table / median wall seconds), peak RSS in MB (the largest of the
runs; from ``/usr/bin/time -f %M`` where available, else by polling with psutil) and the
rows each wrote. SQLite always; PostgreSQL 15 (a throwaway cluster started here, loaded with
the same rows) unless ``--no-postgres``. Then one run of (a) at ``--rss-rows`` on SQLite, to
show that its memory does not grow with the table. Reports go to stdout as markdown, progress
to stderr.

Run (from the repository root, with the project's virtualenv)::

    .venv/bin/python tests/benchmarks/bench_extract.py                 # 1M rows; RSS at 10M
    .venv/bin/python tests/benchmarks/bench_extract.py --rows 20000 --rss-rows 40000
    .venv/bin/python tests/benchmarks/bench_extract.py --rows 1000000 --rss-rows 0 --workdir /tmp/bench
    .venv/bin/python tests/benchmarks/bench_extract.py --pairs --rows 200000 --workdir /tmp/bench   # pairs off/on
    .venv/bin/python tests/benchmarks/bench_extract.py --busy-core --rss-rows 0   # also with one core kept busy
    python3 -m venv /tmp/xv && /tmp/xv/bin/pip install -c images/constraints.txt -e '.[extract]'
    .venv/bin/python tests/benchmarks/bench_extract.py --python /tmp/xv/bin/python   # the extract image's packages

A demo database takes ~20 s and ~1 GB per million rows on SQLite; with ``--workdir`` the
SQLite files are kept and reused by later runs when their row count matches. The internal
modes ``_baseline`` and ``_adbc`` are the subprocesses of (b) and (c).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import os
import platform
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SEED = 0
TABLE = "experiences"
MIN_AVG_RESPONSE_BYTES = 500
PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_USER = "postgres"
GNU_TIME = Path("/usr/bin/time")
#: Rows per round trip of the baseline's PostgreSQL server-side cursor.
PG_ITERSIZE = 10_000
ADBC_SQLITE_BATCH_ROWS = 65_536
#: The interpreter of every measured process (``--python``).
PYTHON = sys.executable

# The seed's default filters, as the baseline and the limit write them.
WHERE = "actual_harm < 0.3 AND buddhist_weighted_score >= 6.0 AND buddhist_alignment IN ('good', 'excellent')"
BASELINE_SQL = (
    "SELECT id, user_message, context, response, actual_harm, buddhist_scores, "
    f"buddhist_weighted_score, buddhist_alignment FROM {TABLE} WHERE {WHERE}"
)
LIMIT_SQL = f"SELECT * FROM {TABLE} WHERE {WHERE}"
SYSTEM_PROMPT = (
    "You are an AI assistant practicing ethical communication. "
    "You respond with wisdom, compassion, and truthfulness while minimizing harm."
)
PRINCIPLES = ("ahimsa", "sacca", "karuna", "panna", "upekkha")

METHOD_A = "(a) saige-k8s extract"
METHOD_B = "(b) naive baseline"
METHOD_C = "(c) ADBC → Parquet limit"
METHOD_D = "(d) (a)'s own read → Parquet"


# --------------------------------------------------------------------------- subprocess workers


def baseline_worker(dialect: str, target: str, out: str) -> None:
    """(b): what a straightforward script does: rows as Python tuples, one f-string each, CSV out."""
    if dialect == "sqlite":
        conn = sqlite3.connect(target)
        rows = conn.execute(BASELINE_SQL)
    else:
        import psycopg

        conn = psycopg.connect(target)
        rows = conn.cursor(name="baseline")  # server-side: the result is not held in memory
        rows.itersize = PG_ITERSIZE
        rows.execute(BASELINE_SQL)
    written = 0
    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "text", "actual_harm", "buddhist_weighted_score", "buddhist_alignment", *PRINCIPLES])
        for id_, user, context, response, harm, scores_json, weighted, alignment in rows:
            try:
                scores = json.loads(scores_json)
            except (TypeError, ValueError):
                continue
            context_block = ""
            if context:
                try:
                    ctx = json.loads(context)
                except ValueError:
                    ctx = None
                if isinstance(ctx, dict):
                    context_block = (
                        f"\n\n[Context: Person is {ctx.get('emotional_state', 'unknown')}, "
                        f"vulnerability level: {ctx.get('vulnerability', 'unknown')}]"
                    )
                else:
                    context_block = f"\n\n[Context: {context}]"
            text = (
                f"<|system|>\n{SYSTEM_PROMPT}</s>\n<|user|>\n{user}{context_block}</s>\n<|assistant|>\n{response}</s>"
            )
            writer.writerow([id_, text, harm, weighted, alignment, *(scores.get(p) for p in PRINCIPLES)])
            written += 1
    conn.close()
    print(json.dumps({"rows_out": written}))


def adbc_worker(dialect: str, target: str, out: str) -> None:
    """(c): the database's rows as Arrow batches, straight into Parquet; no per-row work at all."""
    import pyarrow.parquet as pq

    if dialect == "sqlite":
        import adbc_driver_sqlite.dbapi as driver
    else:
        import adbc_driver_postgresql.dbapi as driver
    written = 0
    with driver.connect(target) as conn, conn.cursor() as cursor:
        if dialect == "sqlite":
            cursor.adbc_statement.set_options(**{"adbc.sqlite.query.batch_rows": str(ADBC_SQLITE_BATCH_ROWS)})
        cursor.execute(LIMIT_SQL)
        reader = cursor.fetch_record_batch()
        with pq.ParquetWriter(out, reader.schema, compression="zstd") as writer:
            for batch in reader:
                writer.write_batch(batch)
                written += batch.num_rows
    print(json.dumps({"rows_out": written}))


def pairs_worker(pairs: str, target: str, out: str) -> None:
    """(a) in-process with preference pairs on or off (the CLI always writes them): what pairs cost."""
    from saige_k8s.dataset.extract import ExtractRequest, extract

    result = extract(ExtractRequest(db=target, data_root=Path(out), eval_fraction=0.05, pairs=pairs == "on"))
    manifest = result.manifest
    print(json.dumps({"rows_out": manifest["counts"]["kept"], "pairs": manifest["pairs"]}))


def scan_worker(dialect: str, target: str, out: str) -> None:
    """(d): extract's own statement and reader, nothing done to the rows but writing them."""
    import pyarrow.parquet as pq

    from saige_k8s.experiences.filters import Filters
    from saige_k8s.experiences.query import rows_query
    from saige_k8s.experiences.source import open_source, resolve_url, stream

    url = resolve_url(target)
    source = open_source(url, TABLE, {})
    written = 0
    query = rows_query(source.judge(Filters()), source.id_is_integer, brief_removed=source.brief_removed)
    with stream(url, query) as batches:
        writer = None
        for batch in batches:
            writer = writer or pq.ParquetWriter(out, batch.schema, compression="zstd")
            writer.write_batch(batch)
            written += batch.num_rows
        if writer is not None:
            writer.close()
    print(json.dumps({"rows_out": written}))


WORKERS = {"_baseline": baseline_worker, "_adbc": adbc_worker, "_scan": scan_worker, "_pairs": pairs_worker}


def bench_pairs(db: str, rows: int, scratch: Path, repeats: int) -> str:
    """Extraction with pairs off, then on (alternating runs), on SQLite: the cost of pairs."""
    walls: dict[str, list[float]] = {"off": [], "on": []}
    out: dict[str, dict] = {}
    for i in range(1, repeats + 1):
        for mode in ("off", "on"):
            root = scratch / f"pairs-{mode}-{i}"
            shutil.rmtree(root, ignore_errors=True)
            cmd = [PYTHON, str(Path(__file__).resolve()), "_pairs", mode, db, str(root)]
            run = measure(cmd, root.with_suffix(".log"))
            walls[mode].append(run.wall_s)
            out[mode] = json.loads(run.stdout.strip().splitlines()[-1]) | {"rss": run.peak_rss_mb}
            log(f"  pairs {mode} run {i}: {run.wall_s:.2f} s, {run.peak_rss_mb:.0f} MB, {out[mode]}")
            shutil.rmtree(root, ignore_errors=True)
    lines = [
        "| pairs | rows | median wall s | peak RSS MB | examples | pairs (train/eval) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for mode in ("off", "on"):
        pairs = out[mode]["pairs"]
        lines.append(
            f"| {mode} | {rows:,} | {statistics.median(walls[mode]):.2f} | {out[mode]['rss']:.0f} | "
            f"{out[mode]['rows_out']:,} | {pairs['train']:,} / {pairs['eval']:,} |"
        )
    ratio = statistics.median(walls["on"]) / statistics.median(walls["off"])
    return "\n".join(lines) + f"\n\npairs on / off: {ratio:.2f}× the wall time"


# --------------------------------------------------------------------------- measuring


@dataclass
class Run:
    wall_s: float
    peak_rss_mb: float
    stdout: str
    #: User + system CPU seconds of the measured process (and its children): less sensitive
    #: than wall time to other work on a shared machine.
    cpu_s: float = float("nan")


@dataclass
class Result:
    database: str
    method: str
    rows: int
    runs: list[Run] = field(default_factory=list)
    rows_out: int | None = None
    #: (a) only: the manifest's duration_seconds per run (the extraction without process start).
    inner_s: list[float] = field(default_factory=list)

    @property
    def wall_s(self) -> float:
        return statistics.median(r.wall_s for r in self.runs)

    @property
    def peak_rss_mb(self) -> float:
        return max(r.peak_rss_mb for r in self.runs)

    @property
    def cpu_s(self) -> float:
        return statistics.median(r.cpu_s for r in self.runs)

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.wall_s


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def measure(cmd: Sequence[str], log_path: Path) -> Run:
    """Run ``cmd`` to completion; its wall time, CPU time and peak RSS (its own, not this process's)."""
    with open(log_path, "w") as stderr:
        if GNU_TIME.exists():
            usage_file = log_path.with_suffix(".usage")
            started = time.perf_counter()
            proc = subprocess.run(
                [str(GNU_TIME), "-f", "%M %U %S", "-o", str(usage_file), *cmd],
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                check=False,
            )
            wall = time.perf_counter() - started
            stdout, code = proc.stdout, proc.returncode
            fields = usage_file.read_text().splitlines()[-1].split() if usage_file.exists() else []
            try:
                peak_kb, cpu = float(fields[0]), float(fields[1]) + float(fields[2])
            except (IndexError, ValueError):
                peak_kb = cpu = float("nan")
        else:
            stdout, code, wall, peak_kb, cpu = _measure_psutil(cmd, stderr)
    if code != 0:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"command failed with exit code {code}: {' '.join(cmd)}\n{tail}")
    return Run(wall, peak_kb / 1024, stdout, cpu)


def _measure_psutil(cmd: Sequence[str], stderr) -> tuple[str, int, float, float, float]:
    import psutil

    with tempfile.TemporaryFile("w+") as out:
        started = time.perf_counter()
        before = os.times()
        proc = psutil.Popen(list(cmd), stdout=out, stderr=stderr, text=True)
        peak = 0
        while proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                tree = [proc, *proc.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree))
            time.sleep(0.02)
        wall = time.perf_counter() - started
        after = os.times()
        cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
        out.seek(0)
        return out.read(), proc.returncode, wall, peak / 1024, cpu


@contextlib.contextmanager
def busy_core(enabled: bool) -> Iterator[None]:
    """A second process that keeps one core busy while the block runs (``--busy-core``)."""
    if not enabled:
        yield
        return
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    log(f"busy-core: process {spinner.pid} keeps one core busy")
    try:
        yield
    finally:
        spinner.kill()
        spinner.wait()


def saige_cli() -> list[str]:
    script = Path(PYTHON).with_name("saige-k8s")
    return [str(script)] if script.exists() else [PYTHON, "-m", "saige_k8s"]


def bench_saige(database: str, db: str, rows: int, scratch: Path, repeats: int, keep: bool, first: int = 1) -> Result:
    """``repeats`` runs of (a), numbered from ``first`` (each run's own log and data root)."""
    result = Result(database, METHOD_A, rows)
    for i in range(first, first + repeats):
        data_root = scratch / f"a-{database}-{rows}-{i}"
        shutil.rmtree(data_root, ignore_errors=True)
        cmd = [*saige_cli(), "extract", "--db", db, "--data-root", str(data_root), "--json", "--format", "tinyllama"]
        run = measure(cmd, scratch / f"a-{database}-{rows}-{i}.log")
        summary = json.loads(run.stdout.strip().splitlines()[-1])
        manifest = json.loads((data_root / "datasets" / summary["dataset_id"] / "manifest.json").read_text())
        if summary["scanned"] != rows:
            raise RuntimeError(f"saige-k8s extract scanned {summary['scanned']} rows, the table has {rows}")
        result.runs.append(run)
        result.rows_out = summary["kept"]
        result.inner_s.append(manifest["duration_seconds"])
        log(f"  {METHOD_A} run {i}: {run.wall_s:.2f} s, {run.peak_rss_mb:.0f} MB, kept {summary['kept']}")
        if not keep:
            shutil.rmtree(data_root, ignore_errors=True)
    return result


def bench_worker(
    mode: str,
    method: str,
    database: str,
    dialect: str,
    target: str,
    rows: int,
    scratch: Path,
    repeats: int,
    keep: bool,
    suffix: str,
    first: int = 1,
) -> Result:
    result = Result(database, method, rows)
    for i in range(first, first + repeats):
        out = scratch / f"{mode.strip('_')}-{database}-{rows}-{i}.{suffix}"
        cmd = [PYTHON, str(Path(__file__).resolve()), mode, dialect, target, str(out)]
        run = measure(cmd, out.with_suffix(".log"))
        result.runs.append(run)
        result.rows_out = json.loads(run.stdout.strip().splitlines()[-1])["rows_out"]
        log(f"  {method} run {i}: {run.wall_s:.2f} s, {run.peak_rss_mb:.0f} MB, wrote {result.rows_out}")
        if not keep:
            out.unlink(missing_ok=True)
    return result


# --------------------------------------------------------------------------- databases


def sqlite_count(path: Path) -> int | None:
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            return conn.execute(f"SELECT COUNT(*) FROM {TABLE}").fetchone()[0]
    except sqlite3.Error:
        return None


def ensure_sqlite(workdir: Path, rows: int) -> Path:
    """The demo database with ``rows`` rows: reused when the file in ``workdir`` already has them."""
    from saige_k8s.experiences.demo import DemoOptions, create_database

    path = workdir / f"experiences-{rows}-seed{SEED}.db"
    if path.exists() and sqlite_count(path) == rows:
        log(f"reusing {path} ({rows} rows)")
    else:
        log(f"creating {path} ({rows} rows)")
        started = time.perf_counter()
        create_database(str(path), DemoOptions(rows=rows, seed=SEED))
        log(f"  created in {time.perf_counter() - started:.1f} s, {path.stat().st_size / 1e6:.0f} MB")
    with contextlib.closing(sqlite3.connect(path)) as conn:
        check_response_size("sqlite", conn.execute(f"SELECT AVG(LENGTH(response)) FROM {TABLE}").fetchone()[0])
    return path


def check_response_size(database: str, average: float) -> None:
    log(f"{database}: average response {average:.0f} bytes")
    if average < MIN_AVG_RESPONSE_BYTES:
        raise SystemExit(
            f"{database}: average response is {average:.0f} bytes, below {MIN_AVG_RESPONSE_BYTES}; "
            "the benchmark would flatter every method"
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def postgres_cluster() -> Iterator[tuple[str, int]]:
    """A throwaway PostgreSQL 15 cluster on 127.0.0.1; yields (base URL without driver, port).

    initdb refuses to run as root, so as root the cluster belongs to the ``postgres`` system
    user; it lives in its own temporary directory (reachable by that user) and is removed after.
    """
    as_root = os.geteuid() == 0
    prefix = ["runuser", "-u", PG_USER, "--"] if as_root else []
    base = Path(tempfile.mkdtemp(prefix="saige-bench-pg-"))
    data = base / "data"
    if as_root:
        shutil.chown(base, PG_USER, PG_USER)
    port = free_port()

    def pg(*cmd: str) -> None:
        proc = subprocess.run([*prefix, *cmd], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            server_log = (base / "log").read_text()[-2000:] if (base / "log").exists() else ""
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}{server_log}")

    try:
        pg(str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--encoding=UTF8", "--locale=C")
        # fsync etc. off: a throwaway cluster; max_wal_size avoids checkpoints while loading.
        options = (
            f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
            "-c full_page_writes=off -c max_wal_size=8GB"
        )
        pg(str(PG_BIN / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(base / "log"), "-w", "start")
        log(f"postgres 15 started on 127.0.0.1:{port} ({data})")
        yield f"postgres@127.0.0.1:{port}/postgres", port
    finally:
        if (data / "postmaster.pid").exists():  # also after a start that timed out
            subprocess.run(
                [*prefix, str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                check=False,
                capture_output=True,
            )
            log("postgres stopped")
        shutil.rmtree(base, ignore_errors=True)


def load_postgres(base: str, rows: int) -> None:
    """The same demo rows (same seed) in PostgreSQL, written by ``create_database``, then VACUUM
    and ANALYZE: a table as a production one stands, and autovacuum's pass over a freshly
    loaded table (seconds of CPU) does not land in the middle of the measurements.

    ``create_database`` regenerates the rows and inserts them with executemany: about 30 s
    per million rows on the machine this was written on, so there is no need for a faster
    path (such as COPY from the SQLite file).
    """
    import psycopg

    from saige_k8s.experiences.demo import DemoOptions, create_database

    started = time.perf_counter()
    create_database(f"postgresql+psycopg://{base}", DemoOptions(rows=rows, seed=SEED))
    with psycopg.connect(f"postgresql://{base}", autocommit=True) as conn:
        conn.execute(f"VACUUM (ANALYZE) {TABLE}")
        count = conn.execute(f"SELECT COUNT(*) FROM {TABLE}").fetchone()[0]
        average = conn.execute(f"SELECT AVG(LENGTH(response)) FROM {TABLE}").fetchone()[0]
    if count != rows:
        raise RuntimeError(f"postgres has {count} rows after loading, expected {rows}")
    log(f"postgresql: loaded {rows} rows in {time.perf_counter() - started:.1f} s (create_database + VACUUM, ANALYZE)")
    check_response_size("postgresql", float(average))


# --------------------------------------------------------------------------- report


def code_version() -> tuple[str, str]:
    """(saige-k8s version and git revision, a hash of the package's sources) of what is measured."""
    import saige_k8s

    package = Path(saige_k8s.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    proc = subprocess.run(
        ["git", "-C", str(package.parent), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    )
    revision = proc.stdout.strip() if proc.returncode == 0 else "not a git checkout"
    return f"saige-k8s {saige_k8s.__version__}, git {revision}", digest.hexdigest()[:12]


def compile_package() -> None:
    """Byte-compile the package the measured interpreter imports, as pip does at install: an
    editable checkout under ``PYTHONDONTWRITEBYTECODE`` would otherwise compile its modules in
    every run (about 60 ms)."""
    compile_it = (
        "import compileall, os, saige_k8s; compileall.compile_dir(os.path.dirname(saige_k8s.__file__), quiet=1)"
    )
    subprocess.run([PYTHON, "-c", compile_it], check=True)


def environment() -> str:
    """The measured processes' interpreter, and whether it has pandas: pyarrow imports it on its first
    conversion from Python objects when installed (the dev extra has it; the extract image has not)."""
    probe = "import importlib.util; print('with' if importlib.util.find_spec('pandas') else 'without')"
    proc = subprocess.run([PYTHON, "-c", probe], capture_output=True, text=True, check=True)
    return f"{PYTHON} ({proc.stdout.strip()} pandas)"


def machine() -> str:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    memory = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        kb = int(Path("/proc/meminfo").read_text().split("\n", 1)[0].split()[1])
        memory = f", {kb / 1024 / 1024:.0f} GiB RAM"
    return (
        f"nproc {nproc}, CPU {model}{memory}; {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}"
    )


def markdown(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    align = ["---" if i < 2 else "---:" for i in range(len(headers))]  # text columns left, numbers right
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def results_table(results: list, wall_header: str) -> str:
    """The benchmark's result rows as a markdown table."""
    return markdown(
        ["database", "method", "rows", wall_header, "CPU s", "scanned rows/s", "peak RSS MB", "rows out"],
        [
            [
                r.database,
                r.method,
                f"{r.rows:,}",
                f"{r.wall_s:.2f}",
                f"{r.cpu_s:.2f}",
                f"{r.rows_per_s:,.0f}",
                f"{r.peak_rss_mb:,.0f}",
                f"{r.rows_out:,}",
            ]
            for r in results
        ],
    )


def report(
    results: list[Result], rss: list[Result], repeats: int, code: tuple[str, str], code_after: str, busy: bool
) -> str:
    out = [f"Machine: {machine()}", f"Code: {code[0]}, sources {code[1]}", f"Interpreter: {environment()}"]
    if busy:
        out.append("Lines marked 'busy core': a second process kept one core busy while they were measured.")
    if code_after != code[1]:
        out.append(
            f"WARNING: the package's sources changed during the run ({code[1]} -> {code_after}); "
            "the lines below may measure different code."
        )
    out.append("")
    out.append(
        f"Median of {repeats} runs per line; peak RSS is the largest of them; "
        "scanned rows/s = rows in the table / median wall s."
    )
    out.append("")
    out.append(results_table(results, "median wall s"))
    out.append("")
    for database in dict.fromkeys(r.database for r in results):
        by = {r.method: r for r in results if r.database == database}
        a, b, c, d = by[METHOD_A], by[METHOD_B], by[METHOD_C], by[METHOD_D]
        out.append(
            f"- {database}: (a) vs (b) = {b.wall_s / a.wall_s:.2f} (b's wall / a's wall; above 1, (a) is faster; "
            f"{a.wall_s:.2f} s vs {b.wall_s:.2f} s). (a) vs (c) = {a.wall_s / c.wall_s:.2f} (a's wall / c's wall: "
            f"(a) takes this many times the limit's time; {a.wall_s:.2f} s vs {c.wall_s:.2f} s). "
            f"In CPU seconds: b/a = {b.cpu_s / a.cpu_s:.2f}, a/c = {a.cpu_s / c.cpu_s:.2f} "
            f"({a.cpu_s:.2f}, {b.cpu_s:.2f}, {c.cpu_s:.2f} CPU-s). "
            f"(a) in-process, from the manifest's duration_seconds (median): {statistics.median(a.inner_s):.2f} s. "
            f"(a)'s own read, (d): a/d = {a.wall_s / d.wall_s:.2f} wall, {a.cpu_s / d.cpu_s:.2f} CPU "
            f"(the Arrow stage); d/c = {d.wall_s / c.wall_s:.2f} wall, {d.cpu_s / c.cpu_s:.2f} CPU "
            "(reading every row, for the funnel, pairs and KTO part, against the kept rows only)."
        )
    if rss:
        out.append("")
        out.append("Peak RSS of (a) against table size (SQLite):")
        out.append("")
        out.append(results_table(rss, "wall s"))
    return "\n".join(out)


# --------------------------------------------------------------------------- main


def bench_database(
    database: str,
    extract_db: str,
    dialect: str,
    driver_target: str,
    adbc_target: str,
    rows: int,
    scratch: Path,
    repeats: int,
    keep: bool,
    busy: bool = False,
) -> list[Result]:
    """(a), (b) and (c), interleaved round by round, so that a change of load elsewhere hits all three alike."""
    label = f"{database}, busy core" if busy else database
    log(f"{label}: {rows} rows, {repeats} runs per method")
    results = [Result(label, method, rows) for method in (METHOD_A, METHOD_B, METHOD_C, METHOD_D)]
    with busy_core(busy):
        for i in range(1, repeats + 1):
            rounds = [
                bench_saige(label, extract_db, rows, scratch, 1, keep, i),
                bench_worker("_baseline", METHOD_B, label, dialect, driver_target, rows, scratch, 1, keep, "csv", i),
                bench_worker("_adbc", METHOD_C, label, dialect, adbc_target, rows, scratch, 1, keep, "parquet", i),
                bench_worker("_scan", METHOD_D, label, dialect, extract_db, rows, scratch, 1, keep, "parquet", i),
            ]
            for total, one in zip(results, rounds, strict=True):
                total.runs += one.runs
                total.inner_s += one.inner_s
                total.rows_out = one.rows_out
    return results


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="Table size for the comparison (default 1M).")
    parser.add_argument(
        "--rss-rows",
        type=int,
        default=10_000_000,
        help="Table size for the memory check of (a) on SQLite; 0 skips it (default 10M).",
    )
    parser.add_argument("--repeats", type=int, default=3, help="Runs per method; the median is reported (default 3).")
    parser.add_argument("--no-postgres", action="store_true", help="SQLite only.")
    parser.add_argument(
        "--workdir",
        type=Path,
        help="Keep the SQLite demo databases here and reuse them (default: a temporary directory).",
    )
    parser.add_argument("--keep", action="store_true", help="Keep the outputs (datasets, CSV, Parquet, logs).")
    parser.add_argument(
        "--pairs", action="store_true", help="Only (a) with preference pairs off and on, SQLite (the cost of pairs)."
    )
    parser.add_argument(
        "--busy-core",
        action="store_true",
        help="Measure each database twice: as it is, then with a second process keeping one core busy.",
    )
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="Interpreter of the measured processes (default: this one), e.g. a virtualenv with only "
        "`pip install -e '.[extract]'`, the extract image's packages.",
    )
    args = parser.parse_args(argv)
    if args.rows < 1 or args.rss_rows < 0 or args.repeats < 1:
        parser.error("--rows and --repeats must be >= 1, --rss-rows >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    global PYTHON  # noqa: PLW0603 - one setting for every measured process
    args = parse_args(argv)
    PYTHON = args.python
    if args.workdir:
        workdir = args.workdir.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        workdir = Path(tempfile.mkdtemp(prefix="saige-bench-"))
    scratch = workdir / f"out-{time.strftime('%Y%m%dT%H%M%S')}"
    scratch.mkdir()
    code = code_version()
    log(f"work dir {workdir}; {machine()}; {code[0]}, sources {code[1]}")
    compile_package()
    results: list[Result] = []
    rss: list[Result] = []
    if args.pairs:
        try:
            print(bench_pairs(str(ensure_sqlite(workdir, args.rows)), args.rows, scratch, args.repeats))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return
    try:
        loads = (False, True) if args.busy_core else (False,)
        sqlite_path = ensure_sqlite(workdir, args.rows)
        for busy in loads:
            target = str(sqlite_path)
            results += bench_database(
                "sqlite", target, "sqlite", target, target, args.rows, scratch, args.repeats, args.keep, busy
            )
        if not args.no_postgres:
            with postgres_cluster() as (base, _port):
                load_postgres(base, args.rows)
                for busy in loads:
                    results += bench_database(
                        "postgresql",
                        f"postgresql+psycopg://{base}",
                        "postgresql",
                        f"postgresql://{base}",
                        f"postgresql://{base}",
                        args.rows,
                        scratch,
                        args.repeats,
                        args.keep,
                        busy,
                    )
        if args.rss_rows:
            a_rows = next(r for r in results if r.database == "sqlite" and r.method == METHOD_A)
            rss.append(Result("sqlite", METHOD_A + " (1 run)", args.rows, a_rows.runs[:1], a_rows.rows_out))
            if args.rss_rows != args.rows:
                big = ensure_sqlite(workdir, args.rss_rows)
                result = bench_saige("sqlite", str(big), args.rss_rows, scratch, 1, args.keep)
                result.method += " (1 run)"
                rss.append(result)
    finally:
        if args.keep:
            log(f"outputs kept in {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
            if not args.workdir:
                shutil.rmtree(workdir, ignore_errors=True)
    print(report(results, rss, args.repeats, code, code_version()[1], args.busy_core))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in WORKERS:
        WORKERS[sys.argv[1]](*sys.argv[2:5])
    else:
        main()
