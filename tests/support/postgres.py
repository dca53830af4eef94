"""The shared PostgreSQL server the tests and bench scripts make their own databases on."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def postgres_reachable() -> bool:
    from sqlalchemy import create_engine, text

    try:
        engine = create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        engine.dispose()
        return True
    except Exception:
        return False


@contextmanager
def fresh_database(prefix: str = "backdrop_test") -> Iterator[str]:
    """A new, migrated database named `prefix_<random>`; dropped (its clients dropped too)
    on the way out."""
    from sqlalchemy import create_engine, text

    from producer.db import get_engine, upgrade

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        upgrade(url)
        yield url
    finally:
        get_engine(url).dispose()
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
