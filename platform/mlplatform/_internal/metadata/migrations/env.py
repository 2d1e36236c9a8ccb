"""Alembic environment: always run by mlplatform._internal.metadata on a connection it opened.

`alembic` on the command line is not how migrations run; `mlplatform db upgrade` (or simply
opening the store) does, under a lock, so no database URL lives in an ini file.
"""

from alembic import context

from mlplatform._internal.metadata.tables import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
