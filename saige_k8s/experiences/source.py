"""Where experiences come from: a database URL, checked against the real table, read as Arrow.

SQLAlchemy names the database, reflects the table, quotes identifiers and compiles the
queries; ADBC drivers run them and hand back Arrow record batches, so no row ever becomes a
Python object on the way to Parquet.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import sqlalchemy as sa
from sqlalchemy.engine import URL

from saige_k8s import lifecycle
from saige_k8s.errors import ConfigError, InputError, RuntimeFailure, SaigeError
from saige_k8s.experiences.credentials import parse_url, redact, scrub
from saige_k8s.experiences.filters import Filters
from saige_k8s.experiences.query import Judgement, judge
from saige_k8s.experiences.schema import COLUMNS, REQUIRED_COLUMNS

DB_URL_ENV = "SAIGE_DB_URL"
_BATCH_ROWS = 16_384
#: libpq's ``connect_timeout`` when the URL sets none (its own default is to wait forever); a
#: ``statement_timeout`` goes into the URL too: ``?options=-c%20statement_timeout%3D600s``.
CONNECT_TIMEOUT_S = 10


def resolve_url(db: str | None) -> URL:
    """``db`` as given (URL or bare SQLite path), else ``$SAIGE_DB_URL``."""
    raw = db if db else os.environ.get(DB_URL_ENV)
    if not raw:
        raise ConfigError(f"no database given: pass --db PATH_OR_URL or set {DB_URL_ENV}")
    if "://" not in raw:
        path = Path(raw).expanduser()
        if not path.is_file() and "=" in raw:
            raise ConfigError(
                "the database is neither a file nor a SQLAlchemy URL (a libpq connection string "
                "is not accepted: pass a URL such as postgresql+psycopg://HOST/DB; value not shown)"
            )
        if not path.is_file():
            raise InputError(f"database file not found: {redact(str(path))}")
        url = URL.create("sqlite", database=str(path.resolve()))
    else:
        url = parse_url(raw)
        check_dialect(url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        _check_sqlite_file(Path(url.database))
    return url


def check_dialect(url: URL) -> None:
    """An unknown dialect or a missing driver is a configuration error, named without the URL."""
    try:
        url.get_dialect().import_dbapi()
    except sa.exc.NoSuchModuleError:
        raise ConfigError(
            f"unknown database dialect {url.drivername!r}: no SQLAlchemy dialect of that name is installed"
        ) from None
    except ImportError as exc:
        raise ConfigError(f"the {url.drivername!r} database driver is not installed (no module {exc.name!r})") from None


def _engine(url: URL) -> sa.Engine:
    check_dialect(url)
    try:
        return sa.create_engine(connection_url(url), poolclass=sa.pool.NullPool)
    except (sa.exc.ArgumentError, TypeError, ValueError) as exc:  # e.g. a user and password on a SQLite URL
        raise ConfigError(f"database URL {redact(url)} cannot be used: {scrub(str(exc), url)}") from None


_SQLITE_HEADER = b"SQLite format 3\x00"


def _check_sqlite_file(path: Path) -> None:
    """A file that is not SQLite fails the same way on every retry: say so before connecting."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(_SQLITE_HEADER))
    except FileNotFoundError:
        raise InputError(f"database file not found: {redact(str(path))}") from None
    except OSError as exc:
        raise InputError(f"cannot read database file {redact(str(path))}: {exc.strerror}") from None
    if head and head != _SQLITE_HEADER:  # an empty file is an empty SQLite database
        raise InputError(f"not a SQLite database: {redact(str(path))}")


#: Driver messages of a damaged SQLite file (SQLITE_NOTADB, SQLITE_CORRUPT): a retry cannot help.
_SQLITE_DAMAGED = ("file is not a database", "database disk image is malformed")


def _failure(what: str, url: URL, exc: BaseException) -> SaigeError:
    """A driver error as the project's error: input (exit 2) for a damaged SQLite file, else runtime (exit 1).

    After SIGTERM/SIGINT the error is the cancel's doing: the stop is reported instead.
    """
    lifecycle.check_stop()
    text = str(getattr(exc, "orig", None) or exc)
    if url.get_backend_name() == "sqlite" and any(m in text for m in _SQLITE_DAMAGED):
        return InputError(f"not a SQLite database, or a damaged one: {redact(url)} ({scrub(text, url)})")
    return RuntimeFailure(f"{what} {redact(url)}: {scrub(text, url)}")


def connection_url(url: URL) -> URL:
    """The URL to connect with: a PostgreSQL connect gives up after CONNECT_TIMEOUT_S, and texts
    arrive as UTF-8 whatever the database's encoding (unless the URL sets another). A SQL_ASCII
    database's texts come as they are stored, which psycopg, and so SQLAlchemy, cannot read."""
    if url.get_backend_name() != "postgresql":
        return url
    defaults = {"connect_timeout": str(CONNECT_TIMEOUT_S), "client_encoding": "UTF8"}
    return url.update_query_dict({k: v for k, v in defaults.items() if k not in url.query})


@contextmanager
def _cancellable(conn: sa.Connection) -> Iterator[None]:
    """A stop cancels the statement running on ``conn`` (psycopg's cancel, sqlite3's interrupt)."""
    driver = conn.connection.driver_connection
    cancel = next((getattr(driver, n) for n in ("cancel_safe", "cancel", "interrupt") if hasattr(driver, n)), None)
    if cancel is None:
        yield
        return
    with lifecycle.cancel_on_stop(cancel):
        yield


@dataclass(frozen=True)
class SourceTable:
    """A reflected experiences table and the physical column behind each logical one."""

    url: URL
    table: sa.Table
    mapping: dict[str, str | None]
    #: About how many rows the table holds, from the database's own bookkeeping (no scan), if it knows.
    estimated_rows: int | None = None
    #: Every text value arrives as valid UTF-8, by the database's guarantee (``_utf8_guaranteed``).
    utf8_guaranteed: bool = False

    @property
    def dialect(self) -> str:
        return self.url.get_backend_name()

    def judge(self, filters: Filters) -> Judgement:
        return judge(self.table, self.mapping, filters)

    @property
    def id_is_integer(self) -> bool:
        id_column = self.mapping["id"]
        assert id_column is not None  # the id is a required column: open_source maps it or fails
        column = self.table.c[id_column]
        return isinstance(column.type, sa.Integer)

    @property
    def brief_removed(self) -> bool:
        """Whether the rows a filter surely removes can come with their response cut short
        (``query.brief_response``): it must be PostgreSQL text, valid UTF-8 by the database's guarantee."""
        response = self.mapping["response"]
        assert response is not None  # a required column
        column_type = self.table.c[response].type
        return self.dialect == "postgresql" and self.utf8_guaranteed and isinstance(column_type, sa.String)


def open_source(url: URL, table: str, columns: Mapping[str, str], schema: str | None = None) -> SourceTable:
    """Reflect ``table`` and check the column mapping against it."""
    unknown = sorted(set(columns) - set(COLUMNS))
    if unknown:
        raise ConfigError(f"source.columns: unknown key(s) {unknown}; valid keys are {list(COLUMNS)}")
    engine = _engine(url)
    try:
        with engine.connect() as conn, _cancellable(conn):
            inspector = sa.inspect(conn)
            schemas = sorted(inspector.get_schema_names()) if schema is not None else []
            if schema is not None and schema not in schemas:
                raise InputError(
                    f"schema {schema!r} not found in {redact(url)} (schemas: {', '.join(schemas) or 'none'}); "
                    "set source.schema in the spec"
                )
            if not inspector.has_table(table, schema=schema):
                found = sorted(inspector.get_table_names(schema=schema))
                raise InputError(
                    f"table {table!r} not found in {redact(url)} (tables: {', '.join(found) or 'none'}); "
                    "set source.table in the spec or pass --table"
                )
            reflected = sa.Table(table, sa.MetaData(), schema=schema, autoload_with=conn)
            estimated = estimate_rows(conn, reflected)
            utf8 = _utf8_guaranteed(conn)
    except sa.exc.OperationalError as exc:
        raise _failure("cannot connect to", url, exc) from None
    except sa.exc.SQLAlchemyError as exc:
        raise _failure("cannot read", url, exc) from None
    finally:
        engine.dispose()
    present = {c.name for c in reflected.columns}
    mapping: dict[str, str | None] = {}
    for logical in COLUMNS:
        physical = columns.get(logical, logical)
        if physical in present:
            mapping[logical] = physical
        elif logical in REQUIRED_COLUMNS or logical in columns:
            raise InputError(
                f"column {physical!r} not found in table {table!r} (columns: {', '.join(sorted(present))}); "
                f"map it with source.columns.{logical} in the spec"
            )
        else:
            mapping[logical] = None
    return SourceTable(url, reflected, mapping, estimated, utf8)


def _utf8_guaranteed(conn: sa.Connection) -> bool:
    """Texts reach a UTF8 client as valid UTF-8: PostgreSQL converts them from the database's
    encoding, and from SQL_ASCII (any bytes) refuses to send bytes that are not UTF-8."""
    return conn.dialect.name == "postgresql" and conn.execute(sa.text("SHOW client_encoding")).scalar() == "UTF8"


def estimate_rows(conn: sa.Connection, table: sa.Table) -> int | None:
    """A progress bar's total, never a count: counting would read the whole table once more.

    SQLite: the span of rowids (an index lookup at each end; deleted rows make it larger).
    PostgreSQL: the planner's ``reltuples``, as of the last VACUUM or ANALYZE (-1: never).
    Anything else, or a table without rowids, or a view: unknown.
    """
    dialect = conn.dialect.name
    name = conn.dialect.identifier_preparer.format_table(table)
    try:
        if dialect == "sqlite":
            # One aggregate per statement: SQLite answers a lone min() or max() from the b-tree's end.
            low, high = (conn.execute(sa.text(f"SELECT {end}(rowid) FROM {name}")).scalar() for end in ("min", "max"))
            return None if low is None or high is None else int(high) - int(low) + 1
        if dialect == "postgresql":
            estimate = conn.execute(
                sa.text("SELECT reltuples FROM pg_class WHERE oid = to_regclass(:name)"), {"name": name}
            ).scalar()
            return int(estimate) if estimate is not None and estimate >= 0 else None
    except sa.exc.SQLAlchemyError:  # the last statement on this connection: nothing else is lost
        return None
    return None


ADBC_BACKENDS = ("sqlite", "postgresql")


def _adbc_connect(url: URL):
    if lifecycle.installed():
        _leave_sigint_to_us()
    if url.get_backend_name() == "sqlite":
        import adbc_driver_sqlite.dbapi as sqlite_driver

        return sqlite_driver.connect(url.database or ":memory:")
    import adbc_driver_postgresql.dbapi as postgresql_driver

    libpq_url = connection_url(url).set(drivername="postgresql")
    return postgresql_driver.connect(libpq_url.render_as_string(hide_password=False))


def _leave_sigint_to_us() -> None:
    """ADBC swaps in its own SIGINT handler around each call: it cancels, then raises the
    driver's error (NOT_IMPLEMENTED on SQLite) and the signal never reaches ours. Ours cancels
    on SIGINT and SIGTERM alike (``cancel_on_stop``) and reports the stop."""
    from adbc_driver_manager import dbapi

    dbapi._blocking_call = lambda func, args, kwargs, cancel: func(*args, **kwargs)


def _compile(statement: sa.Select, url: URL) -> tuple[str, list]:
    """SQL text in the ADBC driver's placeholder style, with its bound values in order."""
    dialect_cls = sa.dialects.registry.load(url.get_backend_name())
    dialect = dialect_cls(paramstyle="qmark" if url.get_backend_name() == "sqlite" else "numeric_dollar")
    compiled = statement.compile(dialect=dialect, compile_kwargs={"render_postcompile": True})
    names = compiled.positiontup or []
    return str(compiled), [compiled.params[name] for name in names]


@contextmanager
def stream(url: URL, statement: sa.Select, adbc: bool = True) -> Iterator[Iterator[pa.RecordBatch]]:
    """Run ``statement`` and stream its result as Arrow record batches.

    SQLite and PostgreSQL go through ADBC (columnar end to end); any other SQLAlchemy
    database, or ``adbc=False``, through SQLAlchemy's server-side cursor in chunks.
    """
    if adbc and url.get_backend_name() in ADBC_BACKENDS:
        with _stream_adbc(url, statement) as batches:
            yield batches
    else:
        with _stream_sqlalchemy(url, statement) as batches:
            yield batches


_PG_TYPES = {float: "double precision", int: "bigint", str: "text", bool: "boolean"}


def _session_parameters(cursor, sql: str, params: list) -> tuple[str, list]:  # noqa: ANN001 - ADBC cursor
    """Pass ``$n`` values as session settings, bound, and read them back in the query.

    ADBC's PostgreSQL driver streams a result through COPY only for a query without
    parameters; with parameters it buffers the whole result in memory. The values still
    travel as bound parameters (of ``set_config``), never as SQL text; each is read back in
    an uncorrelated scalar subquery, which PostgreSQL evaluates once per query, not per row.
    All are set by one statement: a round trip each cost 30 ms for the default filters' values.
    """
    if params:
        numbers = range(1, len(params) + 1)
        calls = ", ".join(f"set_config(${2 * n - 1}, ${2 * n}, false)" for n in numbers)
        settings = [v for n, value in zip(numbers, params, strict=True) for v in (f"saige.p{n}", str(value))]
        cursor.execute(f"SELECT {calls}", settings)
        cursor.fetchall()
    kinds = {number: _PG_TYPES[type(value)] for number, value in enumerate(params, start=1)}
    sql = re.sub(r"\$(\d+)\b", lambda m: f"(SELECT CAST(current_setting('saige.p{m[1]}') AS {kinds[int(m[1])]}))", sql)
    return sql, []


@contextmanager
def _stream_adbc(url: URL, statement: sa.Select) -> Iterator[Iterator[pa.RecordBatch]]:
    sql, params = _compile(statement, url)
    try:
        conn = _adbc_connect(url)
    except Exception as exc:  # noqa: BLE001 - ADBC drivers raise their own DB-API error classes
        raise _failure("cannot connect to", url, exc) from None
    try:
        cursor = conn.cursor()
        if url.get_backend_name() == "sqlite":
            cursor.adbc_statement.set_options(**{"adbc.sqlite.query.batch_rows": str(_BATCH_ROWS)})
        with lifecycle.cancel_on_stop(cursor.adbc_cancel):
            try:
                if url.get_backend_name() == "postgresql" and params:
                    sql, params = _session_parameters(cursor, sql, params)
                cursor.execute(sql, params or None)
                reader = cursor.fetch_record_batch()
            except Exception as exc:  # noqa: BLE001
                raise _failure("query failed on", url, exc) from None
            with _read_ahead(_guarded(reader, url), cursor.adbc_cancel) as batches:
                yield batches
    finally:
        conn.close()


#: Batches the reading thread may hold ready: memory stays a few batches whatever the table.
_READ_AHEAD = 2


class _Failed(NamedTuple):
    error: BaseException


@contextmanager
def _read_ahead(batches: Iterator[pa.RecordBatch], cancel: Callable[[], object]) -> Iterator[Iterator[pa.RecordBatch]]:
    """The batches, read on a thread of their own: the driver reads the next ones (without
    the GIL) while the caller works on this one. A caller that leaves early cancels the
    query and waits for the thread, so the connection is never closed under a read."""
    ready: queue.Queue[pa.RecordBatch | _Failed | None] = queue.Queue(maxsize=_READ_AHEAD)
    leaving = threading.Event()

    def hand_over(item: pa.RecordBatch | _Failed | None) -> bool:
        while not leaving.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            for batch in batches:
                if not hand_over(batch):
                    return
        except BaseException as exc:  # noqa: BLE001 - raised again on the caller's thread
            hand_over(_Failed(exc))
            return
        hand_over(None)

    def handed() -> Iterator[pa.RecordBatch]:
        while (item := ready.get()) is not None:
            if isinstance(item, _Failed):
                raise item.error
            yield item

    thread = threading.Thread(target=read, name="reader", daemon=True)
    thread.start()
    try:
        yield handed()
    finally:
        leaving.set()
        if thread.is_alive():
            with contextlib.suppress(Exception):
                cancel()
            thread.join()


def _guarded(batches: Iterable[pa.RecordBatch], url: URL) -> Iterator[pa.RecordBatch]:
    """Driver errors while reading become the project's errors, credentials scrubbed."""
    iterator = iter(batches)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except Exception as exc:  # noqa: BLE001
            raise _failure("reading failed from", url, exc) from None
        yield batch


def _sqlite_text(raw: bytes) -> str | bytes:
    """SQLite TEXT holding bytes that are not UTF-8 stays bytes, for the Arrow stage to count."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw


def _arrow_column(values: Sequence[object]) -> pa.Array:
    """One column of driver values; a column of mixed kinds (SQLite's are dynamically typed) as text or bytes."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        pass
    if any(isinstance(v, bytes | bytearray | memoryview) for v in values):
        return pa.array(
            [v if v is None or isinstance(v, bytes | bytearray | memoryview) else str(v).encode() for v in values],
            pa.binary(),
        )
    return pa.array([None if v is None else str(v) for v in values], pa.string())


@contextmanager
def _stream_sqlalchemy(url: URL, statement: sa.Select) -> Iterator[Iterator[pa.RecordBatch]]:
    engine = _engine(url)
    if url.get_backend_name() == "sqlite":
        # sqlite3 would raise for the whole query on one such value.
        sa.event.listen(engine, "connect", lambda dbapi_conn, _: setattr(dbapi_conn, "text_factory", _sqlite_text))
    try:
        with engine.connect() as conn, _cancellable(conn):
            try:
                result = conn.execution_options(stream_results=True, yield_per=_BATCH_ROWS).execute(statement)
            except sa.exc.SQLAlchemyError as exc:
                raise _failure("query failed on", url, exc) from None
            names = list(result.keys())
            yield _guarded(
                (
                    pa.RecordBatch.from_arrays([_arrow_column(c) for c in zip(*part, strict=True)], names=names)
                    for part in result.partitions()
                ),
                url,
            )
    except sa.exc.OperationalError as exc:
        raise _failure("cannot connect to", url, exc) from None
    finally:
        engine.dispose()
