"""The source side: the experiences table, its filters, and where it is read from."""


def is_sqlite_path(target: str | None) -> bool:
    """A bare path names a SQLite file; anything else is a SQLAlchemy URL."""
    return bool(target) and "://" not in (target or "")
