"""Alembic environment: the URL comes from the caller (producer.db.upgrade)."""

from alembic import context
from sqlalchemy import create_engine

from producer.models import Base

url = context.config.get_main_option("sqlalchemy.url")
if url is None:
    raise RuntimeError("no sqlalchemy.url: run migrations through producer.db.upgrade")
connectable = create_engine(url)
with connectable.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=url.startswith("sqlite"),
    )
    with context.begin_transaction():
        context.run_migrations()
connectable.dispose()
