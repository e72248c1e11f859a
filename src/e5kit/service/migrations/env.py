"""Alembic environment: run on the connection e5kit.service.db.migrate hands over."""

from alembic import context

from e5kit.service.db import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through e5kit.service.db.migrate, not the alembic command: every "
                       "`e5kit serve --database-url`, `e5kit accounts` and `e5kit keys` command runs it on opening the database")
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
