"""Database URLs and the credentials they can carry: one way to show them, one way to refuse them.

SQLAlchemy and libpq accept a secret in several places: the userinfo password, query keys
(``password``, ``passfile``, ``sslkey``, ``sslpassword``; other drivers' ``pwd``, tokens,
``odbc_connect``), and libpq connection strings or URIs nested in the database name or a
query value (``dbname=x password=y``). Everything shown (messages, manifests, CLI output)
goes through :func:`redact` or :func:`scrub`; everything stored in a manifest that others
can read (Jobs, the chart's ConfigMap) goes through :func:`refuse_credentials`.
"""

from __future__ import annotations

import re
from urllib.parse import quote, quote_plus

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from saige_k8s.errors import ConfigError

HIDDEN = "***"
#: A query key or connection-string keyword naming a secret (matched case-insensitively, anywhere in the name).
_SECRET_WORD = r"pass|pwd|secret|token|key|credential|odbc_connect"
_SECRET_KEY = re.compile(_SECRET_WORD, re.IGNORECASE)
#: ``keyword = value`` in a libpq connection string, an ODBC string or a query.
_ASSIGNMENT = re.compile(
    rf"(?i)((?:{_SECRET_WORD})[\w.-]*\s*=\s*)('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|[^\s&;,'\")]*[^\s&;,'\"):])"
)
_USERINFO = re.compile(r"(://[^:/@\s]*):[^@\s]+@")
#: SQLAlchemy's URL grammar reads only the first line of a query: the rest could hide anything.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class UnreadableURL(ConfigError):
    """A URL SQLAlchemy cannot parse; the message never shows the value."""


def parse_url(raw: str, where: str = "database URL") -> URL:
    """``raw`` as a SQLAlchemy URL, or a ConfigError that does not show it (fail closed)."""
    if _CONTROL.search(raw):
        raise UnreadableURL(f"{where} contains a line break or control character (value not shown)")
    try:
        return make_url(raw)
    except (ArgumentError, ValueError, TypeError):  # a bad port is a ValueError
        raise UnreadableURL(f"{where} is not a valid SQLAlchemy URL (value not shown)") from None


def _hides_secret(value: str) -> bool:
    """A component that is itself a connection string or URL carrying a credential."""
    if _ASSIGNMENT.search(value) or _CONTROL.search(value):
        return True
    if "://" in value:
        try:
            return bool(credentials_in(parse_url(value)))
        except ConfigError:
            return True
    return False


def _query_items(url: URL) -> list[tuple[str, str]]:
    return [
        (key, item) for key, value in url.query.items() for item in (value if isinstance(value, tuple) else (value,))
    ]


def credentials_in(url: URL) -> list[str]:
    """Where ``url`` carries a credential, e.g. ``["password", "query password"]``; empty when it carries none."""
    found = ["password"] if url.password else []
    for name in ("username", "host", "database"):
        value = getattr(url, name)
        if value and _hides_secret(value):
            found.append(f"a connection string in the {name}")
    for key, value in _query_items(url):
        if _SECRET_KEY.search(key):
            found.append(f"query {key}")
        elif _hides_secret(value):
            found.append(f"a connection string in query {key}")
    return found


def secret_values(url: URL) -> list[str]:
    """Every secret string in ``url``, longest first, as given and as URL-encoded."""
    values = [str(url.password)] if url.password else []
    values += [v for name in ("username", "host", "database") if (v := getattr(url, name)) and _hides_secret(v)]
    values += [v for k, v in _query_items(url) if v and (_SECRET_KEY.search(k) or _hides_secret(v))]
    encoded = {form for v in values for form in (v, quote(v, safe=""), quote_plus(v))}
    return sorted(encoded, key=len, reverse=True)


def _redacted_url(url: URL) -> URL:
    hidden: dict[str, object] = {}
    for name in ("username", "host", "database"):
        value = getattr(url, name)
        if value and _hides_secret(value):
            hidden[name] = HIDDEN
    if url.password:
        hidden["password"] = HIDDEN
    query = {
        key: tuple(HIDDEN if _SECRET_KEY.search(key) or _hides_secret(v) else v for v in values)
        if isinstance(values, tuple)
        else (HIDDEN if _SECRET_KEY.search(key) or _hides_secret(values) else values)
        for key, values in url.query.items()
    }
    return url.set(**hidden, query=query)  # type: ignore[arg-type]


def redact(url: URL | str | None) -> str:
    """How a database URL (or SQLite path) is shown anywhere: every credential as ``***``."""
    if url is None:
        return "(none)"
    if isinstance(url, str):
        if "://" not in url:
            return HIDDEN if _hides_secret(url) else url
        try:
            url = parse_url(url)
        except ConfigError:
            return "(an unparsable URL, not shown)"
    text = _redacted_url(url).render_as_string(hide_password=False)
    return text.replace(quote_plus(HIDDEN), HIDDEN).replace(quote(HIDDEN, safe=""), HIDDEN)


def scrub(message: str, url: URL | None = None) -> str:
    """A driver's error text cut to its first line, with ``url``'s secrets and any credential-shaped text removed."""
    first = (message.strip().splitlines() or [""])[0]
    if url is not None:
        for value in secret_values(url):
            first = first.replace(value, HIDDEN)
    first = _USERINFO.sub(rf"\1:{HIDDEN}@", first)
    return _ASSIGNMENT.sub(rf"\1{HIDDEN}", first)


def refuse_credentials(raw: str | None, where: str, stored_in: str, instead: str) -> None:
    """Refuse a database URL or path that carries a credential (or cannot be read) before it is stored.

    ``stored_in`` says where the value would be kept; ``instead`` how to pass the secret.
    """
    if not raw:
        return
    if "://" not in raw:
        found = ["a connection string"] if _hides_secret(raw) else []
    else:
        try:
            url = parse_url(raw, where)
        except UnreadableURL as exc:
            raise ConfigError(f"{exc}; it would be stored in {stored_in}, so it is refused") from None
        found = credentials_in(url)
    if found:
        raise ConfigError(
            f"{where} carries a credential ({', '.join(found)}), which would be stored in {stored_in}: {instead}"
        )
