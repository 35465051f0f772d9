"""Every way an extraction can be asked to do the impossible: one line, the right exit code,
no partial output, no secret printed, no injection."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from saige_k8s.experiences.filters import Filters
from saige_k8s.experiences.query import judge, rows_query
from saige_k8s.experiences.schema import REQUIRED_COLUMNS
from tests.conftest import _free_port, run_cli


def _one_error_line(result, code: int) -> str:
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("saige-k8s: error: ")
    assert "Traceback" not in result.output
    return lines[0]


def _datasets(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "datasets").iterdir()) if (root / "datasets").exists() else []


def test_unreachable_database_exit_1_and_no_password(tmp_path: Path) -> None:
    url = f"postgresql+psycopg://saige:s3cretpw@127.0.0.1:{_free_port()}/saige"
    result = run_cli("extract", "--db", url, "--data-root", tmp_path)
    line = _one_error_line(result, 1)
    assert "cannot connect" in line and "s3cretpw" not in result.output and "***" in line


def test_password_from_env_never_printed(tmp_path: Path) -> None:
    url = f"postgresql+psycopg://saige:envpw123@127.0.0.1:{_free_port()}/saige"
    result = run_cli("extract", "--data-root", tmp_path, env={"SAIGE_DB_URL": url})
    _one_error_line(result, 1)
    assert "envpw123" not in result.output


def test_no_database_given(tmp_path: Path) -> None:
    line = _one_error_line(run_cli("extract", "--data-root", tmp_path, env={"SAIGE_DB_URL": ""}), 2)
    assert "--db" in line and "SAIGE_DB_URL" in line


def test_missing_sqlite_file_is_not_created(tmp_path: Path) -> None:
    line = _one_error_line(run_cli("extract", "--db", tmp_path / "nope.db", "--data-root", tmp_path), 2)
    assert "not found" in line
    assert not (tmp_path / "nope.db").exists()


def test_missing_table_names_the_fix(demo_sqlite: str, tmp_path: Path) -> None:
    line = _one_error_line(
        run_cli("extract", "--db", demo_sqlite, "--table", "interactions", "--data-root", tmp_path), 2
    )
    assert "'interactions' not found" in line and "experiences" in line and "source.table" in line


def test_missing_column_names_the_mapping_key(tmp_path: Path) -> None:
    db = tmp_path / "renamed.db"
    with sqlite3.connect(db) as conn:
        conn.execute(
            "CREATE TABLE experiences (id INTEGER PRIMARY KEY, user_message TEXT, answer TEXT, "
            "actual_harm REAL, buddhist_scores TEXT, buddhist_alignment TEXT)"
        )
    line = _one_error_line(run_cli("extract", "--db", db, "--data-root", tmp_path / "out"), 2)
    assert "'response' not found" in line and "source.columns.response" in line

    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"source": {"columns": {"response": "answer"}}}))
    # Mapped, the table is usable; it is empty, so the error is now "nothing passed".
    line = _one_error_line(run_cli("extract", "-f", spec, "--db", db, "--data-root", tmp_path / "out"), 2)
    assert "no experiences passed" in line


@pytest.mark.parametrize(
    ("flag", "value", "key"),
    [
        ("--max-harm", "1.5", "max_harm"),
        ("--min-buddhist", "11", "min_buddhist"),
        ("--max-deception", "-0.1", "max_deception"),
        ("--min-karuna", "12", "min_karuna"),
    ],
)
def test_thresholds_out_of_range(demo_sqlite: str, tmp_path: Path, flag: str, value: str, key: str) -> None:
    line = _one_error_line(run_cli("extract", "--db", demo_sqlite, flag, value, "--data-root", tmp_path), 2)
    assert "--" + key.replace("_", "-") in line and value in line
    assert _datasets(tmp_path) == []


def test_eval_fraction_out_of_range(demo_sqlite: str, tmp_path: Path) -> None:
    result = run_cli("extract", "--db", demo_sqlite, "--eval-fraction", "1.5", "--data-root", tmp_path)
    assert result.exit_code == 2 and "--eval-fraction" in result.stderr


def test_nothing_passes_prints_funnel_and_filter_to_relax(demo_sqlite: str, tmp_path: Path) -> None:
    run_cli("extract", "--db", demo_sqlite, "--data-root", tmp_path, "--dataset-id", "before")
    line = _one_error_line(
        run_cli("extract", "--db", demo_sqlite, "--max-harm", "0", "--min-buddhist", "9.9", "--data-root", tmp_path), 2
    )
    assert "no experiences passed" in line and "max_harm" in line and "--max-harm" in line
    assert _datasets(tmp_path) == ["LATEST", "before"]
    assert (tmp_path / "datasets" / "LATEST").read_text().strip() == "before"


def test_output_not_writable(demo_sqlite: str, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    line = _one_error_line(run_cli("extract", "--db", demo_sqlite, "--data-root", blocker / "root"), 2)
    assert "not writable" in line


def test_strict_fails_on_first_unusable_row(demo_sqlite: str, tmp_path: Path) -> None:
    line = _one_error_line(run_cli("extract", "--db", demo_sqlite, "--strict", "--data-root", tmp_path), 2)
    assert "--strict" in line and "unusable" in line and "id " in line
    assert _datasets(tmp_path) == []


def test_bad_spec_names_the_key_path(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text("extract:\n  filters:\n    max_harm: 2\n")
    line = _one_error_line(run_cli("extract", "-f", spec, "--db", "x.db"), 2)
    assert "extract.filters.max_harm" in line and str(spec) in line
    spec.write_text("extract:\n  fromat: mistral\n")
    assert "extract.fromat: unknown key" in _one_error_line(run_cli("extract", "-f", spec, "--db", "x.db"), 2)
    spec.write_text("extract: [unclosed\n")
    assert "not valid YAML" in _one_error_line(run_cli("extract", "-f", spec, "--db", "x.db"), 2)


# --- injection -------------------------------------------------------------------------------


def test_column_mapping_cannot_inject_sql(demo_sqlite: str, tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    evil = "response FROM experiences; DROP TABLE experiences; --"
    spec.write_text(yaml.safe_dump({"source": {"columns": {"response": evil}}}))
    line = _one_error_line(run_cli("extract", "-f", spec, "--db", demo_sqlite, "--data-root", tmp_path), 2)
    assert "not found" in line and "source.columns.response" in line
    with sqlite3.connect(demo_sqlite) as conn:
        assert conn.execute("SELECT COUNT(*) FROM experiences").fetchone()[0] > 0


def test_table_name_cannot_inject_sql(demo_sqlite: str, tmp_path: Path) -> None:
    line = _one_error_line(
        run_cli(
            "extract", "--db", demo_sqlite, "--table", "experiences; DROP TABLE experiences", "--data-root", tmp_path
        ),
        2,
    )
    assert "not found" in line
    with sqlite3.connect(demo_sqlite) as conn:
        assert conn.execute("SELECT COUNT(*) FROM experiences").fetchone()[0] > 0


def test_quoted_identifiers_work_for_odd_real_names(tmp_path: Path) -> None:
    """A legitimately odd column name is quoted, not rejected."""
    db = tmp_path / "odd.db"
    with sqlite3.connect(db) as conn:
        conn.execute(
            'CREATE TABLE "my table" (id INTEGER PRIMARY KEY, user_message TEXT, "the answer" TEXT, '
            "actual_harm REAL, buddhist_scores TEXT, buddhist_alignment TEXT)"
        )
        conn.execute(
            "INSERT INTO \"my table\" VALUES (1, 'hi', 'hello there', 0.1, "
            '\'{"ahimsa": 8, "sacca": 8, "karuna": 8, "panna": 8, "upekkha": 8}\', \'good\')'
        )
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"source": {"table": "my table", "columns": {"response": "the answer"}}}))
    result = run_cli("extract", "-f", spec, "--db", db, "--data-root", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    assert '"kept": 1' in result.stdout


def test_filter_values_are_bound_parameters() -> None:
    names = (*REQUIRED_COLUMNS, "buddhist_weighted_score")
    table = sa.Table("experiences", sa.MetaData(), *(sa.Column(n) for n in names))
    mapping = {c.name: c.name for c in table.columns}
    compiled = rows_query(judge(table, mapping, Filters(max_harm=0.123456, min_buddhist=6.54321)), True).compile(
        dialect=sa.dialects.sqlite.dialect()
    )
    assert "0.123456" not in str(compiled) and "6.54321" not in str(compiled)
    assert 0.123456 in compiled.params.values() and 6.54321 in compiled.params.values()


@pytest.mark.parametrize("dataset_id", ["../escape", "/abs/path", "..", ".hidden", "a/b", "LATEST", "x" * 200])
def test_dataset_id_cannot_leave_the_data_root(demo_sqlite: str, tmp_path: Path, dataset_id: str) -> None:
    root = tmp_path / "root"
    line = _one_error_line(run_cli("extract", "--db", demo_sqlite, "--data-root", root, "--dataset-id", dataset_id), 2)
    assert "invalid dataset id" in line
    assert not (tmp_path / "escape").exists()
    assert _datasets(root) == []


def test_existing_dataset_id_is_not_overwritten(demo_sqlite: str, tmp_path: Path) -> None:
    assert run_cli("extract", "--db", demo_sqlite, "--data-root", tmp_path, "--dataset-id", "v1").exit_code == 0
    before = (tmp_path / "datasets" / "v1" / "manifest.json").read_bytes()
    line = _one_error_line(run_cli("extract", "--db", demo_sqlite, "--data-root", tmp_path, "--dataset-id", "v1"), 2)
    assert "already exists" in line
    assert (tmp_path / "datasets" / "v1" / "manifest.json").read_bytes() == before


# --- a retry cannot help: exit 2, one clear line ---------------------------------------------


@pytest.mark.parametrize("cut", [0.05, 0.5])
def test_a_truncated_sqlite_file_is_an_input_error(demo_sqlite: str, tmp_path: Path, cut: float) -> None:
    data = Path(demo_sqlite).read_bytes()
    db = tmp_path / "truncated.db"
    db.write_bytes(data[: int(len(data) * cut)])
    line = _one_error_line(run_cli("extract", "--db", db, "--data-root", tmp_path / "root"), 2)
    assert "not a SQLite database" in line
    assert _datasets(tmp_path / "root") == []


@pytest.mark.parametrize("url_form", [False, True])
def test_a_file_that_is_not_sqlite_is_an_input_error(tmp_path: Path, url_form: bool) -> None:
    db = tmp_path / "notes.db"
    db.write_text("just some text, not a database\n" * 10)
    target = f"sqlite:///{db}" if url_form else str(db)
    line = _one_error_line(run_cli("extract", "--db", target, "--data-root", tmp_path / "root"), 2)
    assert "not a SQLite database" in line and str(db) in line


def test_an_unknown_dialect_is_named(tmp_path: Path) -> None:
    line = _one_error_line(run_cli("extract", "--db", "nosuchdialect://u:hidden-pw@x/db", "--data-root", tmp_path), 2)
    assert "nosuchdialect" in line and "dialect" in line and "hidden-pw" not in line
    line = _one_error_line(run_cli("extract", "--db", "postgresql+nosuchdriver://x/db", "--data-root", tmp_path), 2)
    assert "postgresql+nosuchdriver" in line


def test_an_unknown_schema_is_named(demo_sqlite: str, tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"source": {"schema": "analytics"}}))
    line = _one_error_line(run_cli("extract", "-f", spec, "--db", demo_sqlite, "--data-root", tmp_path), 2)
    assert "schema 'analytics' not found" in line and "source.schema" in line


def test_a_spec_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_bytes(b"name: caf\xe9\n")
    line = _one_error_line(run_cli("extract", "-f", spec, "--db", "x.db"), 2)
    assert str(spec) in line and "UTF-8" in line


def test_dataset_id_with_a_trailing_newline_is_refused(demo_sqlite: str, tmp_path: Path) -> None:
    line = _one_error_line(run_cli("extract", "--db", demo_sqlite, "--data-root", tmp_path, "--dataset-id", "x\n"), 2)
    assert "invalid dataset id" in line
    assert _datasets(tmp_path) == []


def test_csv_on_a_read_only_file_system(demo_sqlite: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """EROFS: the CSV cannot be created, and not even a missing file can be removed there."""
    import errno

    import pyarrow.csv as pcsv

    read_only = tmp_path / "ro"
    read_only.mkdir()

    def refuse(*_: object, **__: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    original_unlink = Path.unlink

    def unlink(self: Path, missing_ok: bool = False) -> None:
        if self.parent == read_only:
            refuse()
        original_unlink(self, missing_ok=missing_ok)

    original_open = os.open

    def open_file(path: object, *args: object, **kwargs: object) -> int:
        if Path(str(path)).parent == read_only:  # a read-only file system creates nothing
            refuse()
        return original_open(path, *args, **kwargs)

    monkeypatch.setattr(pcsv, "CSVWriter", refuse)
    monkeypatch.setattr(Path, "unlink", unlink)
    monkeypatch.setattr(os, "open", open_file)
    root = tmp_path / "root"
    result = run_cli("extract", "--db", demo_sqlite, "--data-root", root, "--csv", read_only / "x.csv")
    line = _one_error_line(result, 2)
    assert "CSV output not writable" in line and "Read-only file system" in line
    assert not root.exists()
    assert list(read_only.iterdir()) == []


def test_demo_db_into_a_directory_is_a_usage_error(tmp_path: Path) -> None:
    line = _one_error_line(run_cli("demo-db", "--db", tmp_path, "--rows", "5"), 2)
    assert "directory" in line and str(tmp_path) in line


def test_export_of_a_path_that_does_not_exist_says_so_before_importing_torch(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-run"
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "saige_k8s", "export", str(missing)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" not in imported and "transformers" not in imported
    (line,) = [line for line in done.stderr.splitlines() if not line.startswith("import time:")]
    assert line == f"saige-k8s: error: run directory {missing} does not exist"
