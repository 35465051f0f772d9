"""A credential in any form SQLAlchemy or libpq accepts never reaches output, and what is
rendered (Jobs) refuses it: a unique secret is planted in each form and looked for everywhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from sqlalchemy.engine import make_url

from saige_k8s.errors import ConfigError
from saige_k8s.experiences.credentials import redact, refuse_credentials, scrub
from saige_k8s.runners.jobs import Run, construct_controller_job, construct_step_job, pipeline_jobs
from saige_k8s.spec import parse_spec
from tests.conftest import _free_port, run_cli

SECRET = "PLANTED-7c1e5d"


def _forms(prefix: str) -> dict[str, str]:
    """Query and connection-string credentials on ``prefix`` (a URL without a query)."""
    return {
        "query password": f"{prefix}?password={SECRET}",
        "query passfile": f"{prefix}?passfile=/run/{SECRET}/pgpass",
        "query sslkey": f"{prefix}?sslkey=/keys/{SECRET}.key",
        "query sslpassword": f"{prefix}?sslpassword={SECRET}",
        "encoded key": f"{prefix}?pass%77ord={SECRET}",
        "conninfo in dbname": f"{prefix}?dbname=host%3D127.0.0.1%20port%3D1%20password%3D{SECRET}",
        "url in dbname": f"{prefix}?dbname=postgresql://u:{SECRET}@127.0.0.1:1/db",
    }


#: Every form, on a URL that names no usable server.
URLS = {
    "userinfo password": f"postgresql+psycopg://saige:{SECRET}@db.example/saige",
    "password with a slash": f"postgresql://saige:x/{SECRET}@db.example/saige",
    **_forms("postgresql+psycopg://saige@db.example/saige"),
    "conninfo in the database": f"postgresql:///dbname%3Dsaige%20password%3D{SECRET}",
    "unparsable port": f"postgresql://saige:{SECRET}@db.example:5x32/saige",
    "libpq conninfo": f"host=db.example dbname=saige password={SECRET}",
}


def _everything(result, *roots: Path) -> str:
    texts = [result.stdout, result.stderr]
    for root in roots:
        texts += [p.read_bytes().decode("utf-8", "replace") for p in root.rglob("*") if p.is_file()]
    return "\n".join(texts)


# --- what is shown ------------------------------------------------------------------------------


@pytest.mark.parametrize("form", list(_forms("")))
def test_a_working_extract_shows_no_credential(demo_sqlite: str, tmp_path: Path, form: str) -> None:
    """SQLite ignores the query (with a warning): the run succeeds, so manifest and metrics are written."""
    url = _forms(f"sqlite:///{demo_sqlite}")[form]
    root = tmp_path / "root"
    result = run_cli("extract", "--db", url, "--data-root", root, "--dataset-id", "d1", "--csv", tmp_path / "x.csv")
    assert result.exit_code == 0, result.output
    manifest = json.loads((root / "datasets" / "d1" / "manifest.json").read_text())
    assert manifest["source"]["url"].startswith("sqlite:///") and "***" in manifest["source"]["url"]
    assert (root / "datasets" / "d1" / "metrics.prom").is_file()
    assert SECRET not in _everything(result, root)
    result = run_cli("extract", "--data-root", root, "--json", env={"SAIGE_DB_URL": url})
    assert result.exit_code == 0, result.output
    assert SECRET not in _everything(result, root)


@pytest.mark.parametrize("form", list(URLS))
def test_errors_show_no_credential(tmp_path: Path, form: str) -> None:
    url = URLS[form].replace("db.example", f"127.0.0.1:{_free_port()}", 1) if "5x32" not in URLS[form] else URLS[form]
    for result in (
        run_cli("extract", "--db", url, "--data-root", tmp_path),
        run_cli("extract", "--data-root", tmp_path, env={"SAIGE_DB_URL": url}),
    ):
        assert result.exit_code in (1, 2), result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("saige-k8s: error: "), result.stderr
        assert "internal error" not in lines[0]
        assert SECRET not in result.output


def test_an_unparsable_url_is_a_usage_error_that_does_not_show_it(tmp_path: Path) -> None:
    result = run_cli("extract", "--db", URLS["unparsable port"], "--data-root", tmp_path)
    assert result.exit_code == 2, result.output
    assert "value not shown" in result.stderr and SECRET not in result.output


@pytest.mark.parametrize("form", list(_forms("")))
def test_demo_db_does_not_print_the_credential(tmp_path: Path, form: str) -> None:
    url = _forms(f"sqlite:///{tmp_path / 'demo.db'}")[form]
    result = run_cli("demo-db", "--db", url, "--rows", "20")
    assert result.exit_code == 0, result.output
    assert "Wrote 20 experiences" in result.stdout and SECRET not in result.output


def test_demo_db_to_an_unreachable_server_shows_no_credential() -> None:
    result = run_cli("demo-db", "--db", f"postgresql+psycopg://u:{SECRET}@127.0.0.1:{_free_port()}/db?sslpassword=x")
    assert result.exit_code == 1, result.output
    assert "cannot" in result.stderr and SECRET not in result.output


def test_redact_and_scrub_hide_every_form() -> None:
    for form, url in URLS.items():
        assert SECRET not in redact(url), form
    url = make_url(URLS["query sslpassword"])
    assert scrub(f"SSL error: bad key for {SECRET}\nsecond line", url) == "SSL error: bad key for ***"
    # Credential-shaped text is scrubbed even when the URL is not known (errors no one foresaw).
    assert SECRET not in scrub(f'missing "=" after "host=h password={SECRET}" in connection info string')
    assert SECRET not in scrub(f"could not open postgresql://u:{SECRET}@h/db")
    assert redact("postgresql+psycopg://saige@db.example/saige?sslmode=require") == (
        "postgresql+psycopg://saige@db.example/saige?sslmode=require"
    )


# --- what is rendered ---------------------------------------------------------------------------


@pytest.mark.parametrize("form", list(URLS))
def test_render_refuses_every_credential_form(tmp_path: Path, form: str) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": "s", "source": {"url": URLS[form]}}))
    for fmt in ("yaml", "json"):
        result = run_cli("render", "-f", spec, "--run", "r1", "-o", fmt)
        assert result.exit_code == 2, (form, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "source.url" in lines[0], result.stderr
        assert SECRET not in result.output
    run = Run(parse_spec({"source": {"url": URLS[form]}}), "r1")
    for build in (pipeline_jobs, construct_controller_job, lambda run: construct_step_job(run, "extract")):
        with pytest.raises(ConfigError) as caught:
            build(run)
        assert SECRET not in str(caught.value)


def test_render_keeps_a_url_without_credentials(tmp_path: Path) -> None:
    url = "postgresql+psycopg://saige@db.example:5432/saige?sslmode=verify-full&sslrootcert=/etc/ca.pem"
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": "s", "source": {"url": url}}))
    result = run_cli("render", "-f", spec, "--run", "r1")
    assert result.exit_code == 0, result.output
    assert url in result.stdout


@pytest.mark.parametrize(
    "raw", [f"postgresql://h/db?x=1\npassword={SECRET}", f"/data/a.db\x00{SECRET}", "nosuch:::://", "://h/db"]
)
def test_refuse_fails_closed_on_what_it_cannot_read(raw: str) -> None:
    with pytest.raises(ConfigError) as caught:
        refuse_credentials(raw, "source.url", "the Jobs", "use a Secret")
    assert SECRET not in str(caught.value)
