"""SIGTERM and SIGINT at the moments that used to be missed, a full volume, and the sweep of
temporaries: each stops the run cleanly (exit 143/130/1, nothing published, no temporaries)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

import saige_k8s
from saige_k8s.dataset.writer import DatasetWriter
from saige_k8s.experiences.demo import DemoOptions, create_database
from tests.conftest import REQUIRE_TOOLS, new_postgres_database, run_cli, wait_for

ROOT = Path(saige_k8s.__file__).resolve().parents[1]
#: libpq's connect_timeout that extract sets when the URL has none (source.CONNECT_TIMEOUT_S).
CONNECT_TIMEOUT_S = 10
EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}


def _signal_and_wait(proc: subprocess.Popen, sig: int, timeout: float) -> tuple[str, float]:
    """Send ``sig``; (its stderr, seconds until it exited)."""
    sent = time.monotonic()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=timeout)
    return err, time.monotonic() - sent


@pytest.fixture(scope="module")
def small_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("small") / "small.db"
    create_database(str(path), DemoOptions(rows=2000, seed=4))
    return path


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "SAIGE_DEBUG": ""}


def _publish_previous(db: Path, root: Path) -> dict[str, bytes]:
    result = run_cli("extract", "--db", db, "--data-root", root, "--dataset-id", "previous", "--limit", "100")
    assert result.exit_code == 0, result.stderr
    return {p.name: p.read_bytes() for p in (root / "datasets" / "previous").iterdir()}


def _assert_nothing_published(root: Path, before: dict[str, bytes]) -> None:
    datasets = root / "datasets"
    assert sorted(p.name for p in datasets.iterdir()) == ["LATEST", "previous"]  # no temporaries either
    assert (datasets / "LATEST").read_text().strip() == "previous"
    assert {p.name: p.read_bytes() for p in (datasets / "previous").iterdir()} == before


def _one_error_line(stderr: str, *words: str) -> None:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("saige-k8s: error:")]
    assert len(errors) == 1, stderr
    for word in words:
        assert word in errors[0], stderr


# The signal is sent from inside the run, at the start of the named function: a deterministic
# "later" moment (the handler used to set a flag that only the reading loop looked at).
_SELF_SIGNAL = """
import importlib, os, signal, sys
module_name, name = sys.argv[1].rsplit(":", 1)
signum = int(sys.argv[2])
owner, _, attr = name.rpartition(".")
module = importlib.import_module(module_name)
target = getattr(module, owner) if owner else module
real = getattr(target, attr)
def hooked(*args, **kwargs):
    os.kill(os.getpid(), signum)
    return real(*args, **kwargs)
setattr(target, attr, hooked)
sys.argv = ["saige-k8s", *sys.argv[3:]]
from saige_k8s.cli import main
main()
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize(
    "moment",
    [
        "saige_k8s.dataset.writer:DatasetWriter.write",  # writing Parquet
        "saige_k8s.dataset.stats:DatasetStats.as_dict",  # computing stats
        "saige_k8s.dataset.extract:_manifest",
        "saige_k8s.dataset.writer:DatasetWriter.publish",
        "saige_k8s.dataset.writer:_write_synced",  # the manifest, inside publish
        "saige_k8s.metrics:write_textfile",
    ],
)
def test_a_signal_late_in_extract_publishes_nothing(
    small_db: Path, tmp_path: Path, sig: signal.Signals, moment: str
) -> None:
    root = tmp_path / "root"
    before = _publish_previous(small_db, root)
    args = ["extract", "--db", str(small_db), "--data-root", str(root), "--dataset-id", "doomed"]
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", _SELF_SIGNAL, moment, str(int(sig)), *args],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
        check=False,
    )
    assert proc.returncode == EXIT_CODES[sig], proc.stderr
    assert time.monotonic() - started < 30
    _one_error_line(proc.stderr, "interrupted" if sig == signal.SIGINT else "SIGTERM")
    _assert_nothing_published(root, before)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("module", ["saige_k8s.console", "pyarrow"])
def test_a_signal_while_modules_load_is_one_line(
    small_db: Path, tmp_path: Path, sig: signal.Signals, module: str
) -> None:
    """pyarrow loads with the command: a signal then used to kill the process (-15) or print a
    KeyboardInterrupt traceback. The console module loads as the command line starts: a signal
    then printed a traceback and exited 1 (seen once in the random-moment trials)."""
    root = tmp_path / "root"
    hook = f"""
import os, sys
class Finder:
    def find_spec(self, name, path=None, target=None):
        if name == {module!r}:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), {int(sig)})
        return None
sys.meta_path.insert(0, Finder())
import runpy
sys.argv = ["saige-k8s", "extract", "--db", {str(small_db)!r}, "--data-root", {str(root)!r}]
runpy.run_module("saige_k8s", run_name="__main__", alter_sys=True)
"""
    proc = subprocess.run(
        [sys.executable, "-c", hook], capture_output=True, text=True, env=_env(), timeout=60, check=False
    )
    assert proc.returncode == EXIT_CODES[sig], proc.stderr
    _one_error_line(proc.stderr)
    assert not (root / "datasets" / "LATEST").exists()


def test_the_entry_point_loads_no_heavy_library_before_the_handlers() -> None:
    """The console script imports its entry module before main() installs the handlers: keep that short."""
    code = (
        "import sys, saige_k8s.__main__; "
        "print(sorted(m for m in ('numpy', 'pyarrow', 'pydantic', 'sqlalchemy', 'yaml', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), check=True)
    assert out.stdout.strip() == "[]"


def test_postgres_urls_get_a_connect_timeout_and_utf8_texts() -> None:
    from saige_k8s.experiences.source import CONNECT_TIMEOUT_S, connection_url

    url = connection_url(sa.engine.make_url("postgresql+psycopg://u@db/x"))
    assert url.query["connect_timeout"] == str(CONNECT_TIMEOUT_S) and url.query["client_encoding"] == "UTF8"
    assert (
        connection_url(sa.engine.make_url("postgresql://u@db/x?client_encoding=LATIN1")).query["client_encoding"]
        == "LATIN1"
    )
    assert connection_url(sa.engine.make_url("postgresql://u@db/x?connect_timeout=3")).query["connect_timeout"] == "3"
    assert not connection_url(sa.engine.make_url("sqlite:///x.db")).query


class _SilentServer:
    """Accepts TCP connections and never says a word (a firewall that black-holes, a hung server)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.clients: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            self.clients.append(client)

    def close(self) -> None:
        self.sock.close()
        for client in self.clients:
            client.close()


@pytest.fixture
def silent_server():
    server = _SilentServer()
    yield server
    server.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_a_connect_to_a_silent_server(tmp_path: Path, silent_server, sig: signal.Signals) -> None:
    url = f"postgresql+psycopg://saige@127.0.0.1:{silent_server.port}/saige?connect_timeout=60"
    cmd = [sys.executable, "-m", "saige_k8s", "extract", "--db", url, "--data-root", str(tmp_path / "root")]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=_env())
    try:
        assert wait_for(lambda: silent_server.clients, timeout=30), "never connected"
        time.sleep(0.5)
        err, took = _signal_and_wait(proc, sig, 20)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == EXIT_CODES[sig], err
    assert took < 5, f"exited {took:.1f} s after the signal"
    _one_error_line(err)


def test_a_silent_server_fails_after_the_connect_timeout(tmp_path: Path, silent_server) -> None:
    url = f"postgresql+psycopg://saige@127.0.0.1:{silent_server.port}/saige"
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "saige_k8s", "extract", "--db", url, "--data-root", str(tmp_path / "root")],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=CONNECT_TIMEOUT_S * 4,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    assert time.monotonic() - started < CONNECT_TIMEOUT_S * 3
    _one_error_line(proc.stderr, "cannot connect")


@pytest.mark.postgres
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_a_query_waits_on_a_lock(postgres_server: str, tmp_path: Path, sig: signal.Signals) -> None:
    name = f"locked_{sig.name.lower()}"
    url = new_postgres_database(postgres_server, name)
    create_database(url, DemoOptions(rows=500, seed=2))
    holder = sa.create_engine(url).connect()
    holder.execute(sa.text("LOCK TABLE experiences IN ACCESS EXCLUSIVE MODE"))  # held until rollback
    watcher = sa.create_engine(url, poolclass=sa.pool.NullPool)
    root = tmp_path / "root"
    cmd = [sys.executable, "-m", "saige_k8s", "extract", "--db", url, "--data-root", str(root)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=_env())
    try:

        def waiting() -> bool:
            with watcher.connect() as conn:
                query = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = :d"
                return conn.execute(sa.text(query), {"d": name}).scalar() >= 1

        assert wait_for(waiting, timeout=60, interval=0.1), "the extraction never waited on the lock"
        err, took = _signal_and_wait(proc, sig, 30)
    finally:
        proc.kill()
        proc.wait()
        holder.rollback()
        holder.close()
        watcher.dispose()
    assert proc.returncode == EXIT_CODES[sig], err
    assert took < 5, f"exited {took:.1f} s after the signal"
    _one_error_line(err, "interrupted" if sig == signal.SIGINT else "SIGTERM")
    assert "NOT_IMPLEMENTED" not in err and "query failed" not in err
    assert not (root / "datasets" / "LATEST").exists()
    assert not list((root / "datasets").glob(".tmp-*"))


# --- A full volume ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("point", "call"),
    [
        ("parquet", 1),
        ("manifest", 1),
        ("latest", 2),
        ("metrics", 1),
        ("replace-latest", 1),
    ],
)
def test_no_space_at_each_write_point_publishes_nothing(
    small_db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, point: str, call: int
) -> None:
    import pyarrow.parquet as pq

    from saige_k8s.dataset import writer

    root = tmp_path / "root"
    before = _publish_previous(small_db, root)
    calls = {"n": 0}

    def full(*args: object, **kwargs: object):
        calls["n"] += 1
        if calls["n"] >= call:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    if point == "parquet":
        real = pq.ParquetWriter.write_batch
        monkeypatch.setattr(pq.ParquetWriter, "write_batch", full)
    elif point in ("manifest", "latest"):
        real = writer._write_synced
        monkeypatch.setattr(writer, "_write_synced", full)
    elif point == "metrics":
        real = Path.write_bytes
        monkeypatch.setattr(Path, "write_bytes", full)
    else:
        real_replace = os.replace

        def replace(src: object, dst: object) -> None:
            if str(dst).endswith("LATEST"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real_replace(src, dst)

        monkeypatch.setattr(os, "replace", replace)
    result = run_cli("extract", "--db", small_db, "--data-root", root, "--dataset-id", "full")
    assert result.exit_code == 1, result.stderr
    _one_error_line(result.stderr, "No space left on device")
    _assert_nothing_published(root, before)


@pytest.fixture
def tiny_volume(tmp_path: Path):
    """A 2 MiB tmpfs: a real ENOSPC."""
    volume = tmp_path / "volume"
    volume.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(volume)], capture_output=True, text=True, check=False
    )
    if mounted.returncode != 0:
        if REQUIRE_TOOLS:
            pytest.fail(f"cannot mount a tmpfs (SAIGE_REQUIRE_TOOLS=1): {mounted.stderr.strip()}")
        pytest.skip(f"cannot mount a tmpfs (needs root): {mounted.stderr.strip()}")
    try:
        yield volume
    finally:
        subprocess.run(["umount", "-l", str(volume)], check=False)


def test_a_full_volume_fails_cleanly_wherever_the_space_runs_out(small_db: Path, tiny_volume: Path) -> None:
    root = tiny_volume / "root"
    before = _publish_previous(small_db, root)
    filler = tiny_volume / "filler"
    outcomes = set()
    # Leave less and less room: the space runs out in the Parquet files, the manifest, metrics.prom, LATEST.
    for free_kib in (0, 4, 8, 16, 32, 64, 96, 128, 192, 256, 384, 512, 1024):
        filler.unlink(missing_ok=True)
        stat = os.statvfs(tiny_volume)
        room = stat.f_bavail * stat.f_frsize - free_kib * 1024
        if room > 0:
            with open(filler, "wb") as handle:
                handle.write(b"\0" * room)
        result = run_cli("extract", "--db", small_db, "--data-root", root, "--dataset-id", f"d{free_kib}")
        datasets = root / "datasets"
        leftovers = [p.name for p in datasets.iterdir() if p.name.startswith(".")]
        assert not leftovers, (free_kib, leftovers)
        if result.exit_code == 0:
            assert (datasets / "LATEST").read_text().strip() == f"d{free_kib}"
            assert json.loads((datasets / f"d{free_kib}" / "manifest.json").read_text())["dataset_id"] == f"d{free_kib}"
            assert (datasets / f"d{free_kib}" / "metrics.prom").is_file()
            outcomes.add("published")
            shutil.rmtree(datasets / f"d{free_kib}")
            (datasets / "LATEST").write_text("previous\n")
        else:
            assert result.exit_code == 1, result.stderr
            _one_error_line(result.stderr, "No space left on device")
            _assert_nothing_published(root, before)
            outcomes.add("failed")
    filler.unlink(missing_ok=True)
    assert outcomes == {"published", "failed"}


# --- The sweep of temporaries -------------------------------------------------------------------


def test_the_sweep_keeps_a_live_runs_directory_however_old(tmp_path: Path) -> None:
    from saige_k8s.dataset.curate import OUTPUT_SCHEMA

    root = tmp_path / "root"
    live = DatasetWriter(root, "slow", OUTPUT_SCHEMA, False)
    try:
        week_ago = time.time() - 7 * 86400
        os.utime(live.tmp, (week_ago, week_ago))
        dead = root / "datasets" / ".tmp-dead-999999"  # a killed run's: its lock is free
        dead.mkdir()
        (dead / ".lock").touch()
        with DatasetWriter(root, "other", OUTPUT_SCHEMA, False) as other:
            other.abort()
        assert live.tmp.is_dir()
        assert not dead.exists()
    finally:
        live.abort()


def test_the_sweep_removes_dead_temporary_files_only(tmp_path: Path) -> None:
    from saige_k8s.temporaries import hold_lock, remove_stale_temporaries

    live, dead = tmp_path / ".x.db.1.tmp", tmp_path / ".x.db.2.tmp"
    fd = hold_lock(live)
    try:
        for path in (live, dead):
            path.write_bytes(b"SQLite format 3\0")
        Path(f"{dead}-journal").write_bytes(b"j")
        remove_stale_temporaries(tmp_path, ".x.db.*.tmp")
        assert sorted(p.name for p in tmp_path.iterdir()) == [live.name]
    finally:
        os.close(fd)


def test_a_killed_demo_db_leaves_no_file_for_if_missing(tmp_path: Path) -> None:
    out = tmp_path / "saige.db"
    cmd = [sys.executable, "-m", "saige_k8s", "demo-db", "--db", str(out), "--rows", "60000", "--if-missing"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    try:

        def started() -> bool:
            return any(p.stat().st_size > 0 for p in tmp_path.iterdir() if p.name.startswith((".saige.db", "saige.db")))

        assert wait_for(started, timeout=60, interval=0.005)
        proc.kill()
        proc.wait()
    finally:
        proc.kill()
    assert not out.exists()
    rerun = subprocess.run(
        [*cmd[:-2], "500", "--if-missing"], capture_output=True, text=True, env=_env(), check=False, timeout=120
    )
    assert rerun.returncode == 0, rerun.stderr
    with sa.create_engine(f"sqlite:///{out}").connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM experiences")).scalar() == 500
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saige.db"]


def test_train_sweeps_half_checkpoints_only_of_a_run_directory_it_holds(tmp_path: Path) -> None:
    from saige_k8s.temporaries import claim

    half = tmp_path / "checkpoints" / ".tmp-step-00000004"
    half.mkdir(parents=True)
    (half / "model.safetensors").write_bytes(b"x")
    (tmp_path / "checkpoints" / "step-00000002").mkdir()
    assert claim(tmp_path, "checkpoints/.tmp-step-*")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000002"]
    half.mkdir()
    assert not claim(tmp_path, "checkpoints/.tmp-step-*")  # another live run holds the directory
    assert half.is_dir()


@pytest.mark.parametrize(
    "trigger",
    ["Finalized()", "kept = weakref.ref(Finalized(), lambda ref: stop())"],
    ids=["__del__", "weakref-callback"],
)
def test_a_signal_inside_a_finalizer_is_not_lost(trigger: str) -> None:
    """Python prints and drops an exception raised in ``__del__`` or a weakref callback (the
    import system has some): the stop is raised again just after."""
    code = f"""
import os, signal, time, weakref
from saige_k8s import lifecycle
from saige_k8s.errors import Interrupted
lifecycle.install()
def stop():
    os.kill(os.getpid(), signal.SIGTERM)
    sum(range(1000))
class Finalized:
    def __del__(self):
        if {trigger.startswith("Finalized")!r}:
            stop()
try:
    {trigger}
    time.sleep(2)
    print("not stopped")
except Interrupted as exc:
    print(exc)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=30, check=False
    )
    assert out.stdout.strip() == "stopped by SIGTERM; partial output removed", out.stderr
    assert "Exception ignored" not in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("worker", ["none", "non-daemon"])
def test_the_exit_keeps_what_the_interpreters_own_exit_keeps(tmp_path: Path, worker: str) -> None:
    """The module teardown is skipped, not the rest: buffered output, exit callbacks (a
    temporary directory's cleanup among them) and a thread the interpreter would wait for."""
    done = tmp_path / "worker-done"
    code = f"""
import atexit, sys, tempfile, threading, time
from pathlib import Path
from saige_k8s import lifecycle
lifecycle.install()
scratch = tempfile.TemporaryDirectory(dir={str(tmp_path)!r})
print(scratch.name)
atexit.register(lambda: print("callback ran"))
if {worker!r} == "non-daemon":
    threading.Thread(target=lambda: (time.sleep(0.5), Path({str(done)!r}).write_text("done"))).start()
sys.stdout.write("buffered, no newline")
lifecycle.exit_process(3)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=30, check=False
    )
    assert out.returncode == 3, out.stderr
    scratch, rest = out.stdout.split("\n", 1)
    assert rest == "buffered, no newlinecallback ran\n"
    assert not Path(scratch).exists()
    assert done.exists() == (worker == "non-daemon")
    assert out.stderr == ""
