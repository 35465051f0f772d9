"""Shared fixtures: demo databases on real SQLite and a real PostgreSQL server started here."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from saige_k8s.cli import cli
from saige_k8s.experiences.demo import DemoOptions, create_database
from tests.kube_emulator import kube  # noqa: F401 - the emulated API server fixture, for every test module

REQUIRE_TOOLS = os.environ.get("SAIGE_REQUIRE_TOOLS") == "1"
DEMO_ROWS = 4000


def need_tool(reason: str) -> None:
    """Skip for a missing external tool, except under SAIGE_REQUIRE_TOOLS=1 (CI), where it fails."""
    if REQUIRE_TOOLS:
        pytest.fail(f"required tool missing (SAIGE_REQUIRE_TOOLS=1): {reason}")
    pytest.skip(reason, allow_module_level=True)


def run_cli(*args: str, env: dict[str, str] | None = None):
    """Invoke the CLI in-process; stderr is kept apart so tests can check the one-line errors."""
    runner = CliRunner()
    return runner.invoke(cli, [str(a) for a in args], env=env, catch_exceptions=False)


@pytest.fixture(scope="session")
def demo_sqlite(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("demo") / "saige.db"
    create_database(str(path), DemoOptions(rows=DEMO_ROWS, seed=7))
    return str(path)


def _postgres_bindir() -> Path | None:
    pg_config = shutil.which("pg_config")
    candidates = []
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False).stdout.strip()
        candidates.append(out)
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for directory in candidates:
        if directory and (Path(directory) / "initdb").exists() and (Path(directory) / "pg_ctl").exists():
            return Path(directory)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A throwaway PostgreSQL cluster on a loopback port; yields its base URL (no database)."""
    bindir = _postgres_bindir()
    if bindir is None:
        need_tool("PostgreSQL server binaries (initdb, pg_ctl) not found; apt-get install postgresql")
    base = tmp_path_factory.mktemp("pg")
    data = base / "data"
    # initdb refuses to run as root: run the server as the 'postgres' system user then.
    as_user: list[str] = []
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(base, "postgres")
        base.chmod(0o755)
        for parent in base.parents:
            if parent == Path("/"):
                break
            parent.chmod(parent.stat().st_mode | 0o011)
    port = _free_port()
    subprocess.run(
        [*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
        check=True,
        capture_output=True,
    )
    options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
    subprocess.run(
        [*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(base / "log"), "-w", "start"],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run(
            [*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            check=False,
            capture_output=True,
        )


def new_postgres_database(server: str, name: str, encoding: str | None = None) -> str:
    """An empty database ``name`` on the test server (``postgres_server``), in the cluster's
    encoding (UTF8) unless given; its URL."""
    import sqlalchemy as sa

    admin = sa.create_engine(f"{server}/postgres", isolation_level="AUTOCOMMIT")
    options = f" ENCODING '{encoding}' TEMPLATE template0" if encoding else ""
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name}{options}"))
    admin.dispose()
    return f"{server}/{name}"


@pytest.fixture(scope="session")
def demo_postgres(postgres_server: str) -> str:
    url = new_postgres_database(postgres_server, "saige")
    create_database(url, DemoOptions(rows=DEMO_ROWS, seed=7))
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def demo_db(request: pytest.FixtureRequest) -> str:
    """The same demo table on each real database."""
    if request.param == "sqlite":
        return request.getfixturevalue("demo_sqlite")
    return request.getfixturevalue("demo_postgres")


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False
