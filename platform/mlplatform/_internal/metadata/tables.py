"""The metadata store's tables. Changing one means a new migration in migrations/versions/.

Registry rows are keyed by the registry root's URI as well as the model name, so one shared
database (PostgreSQL) can hold several registries without their models colliding.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

registry_models = sa.Table(
    "registry_models", metadata,
    sa.Column("registry", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("created_at", sa.Text, nullable=False),
)

registry_versions = sa.Table(
    "registry_versions", metadata,
    sa.Column("registry", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("registered_at", sa.Text, nullable=False),
    sa.Column("registered_by", sa.Text, nullable=False),
    sa.Column("encrypted", sa.Boolean, nullable=False),
    # The manifest's hash: what makes a manifest changed in the artifact store detectable.
    sa.Column("manifest_sha256", sa.Text, nullable=False),
    sa.ForeignKeyConstraint(["registry", "name"], ["registry_models.registry", "registry_models.name"]),
)

registry_aliases = sa.Table(
    "registry_aliases", metadata,
    sa.Column("registry", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("alias", sa.Text, primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.ForeignKeyConstraint(["registry", "name"], ["registry_models.registry", "registry_models.name"]),
)

# Append-only: the audit trail of every alias move; `seq` orders it.
registry_alias_moves = sa.Table(
    "registry_alias_moves", metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("registry", sa.Text, nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("alias", sa.Text, nullable=False),
    sa.Column("from_version", sa.Integer),
    sa.Column("to_version", sa.Integer, nullable=False),
    sa.Column("actor", sa.Text, nullable=False),
    sa.Column("at", sa.Text, nullable=False),
    sa.Column("action", sa.Text, nullable=False),
    sa.Column("reason", sa.Text),
    sa.Column("source_alias", sa.Text),
    sa.ForeignKeyConstraint(["registry", "name"], ["registry_models.registry", "registry_models.name"]),
    sa.Index("ix_registry_alias_moves_model", "registry", "name", "seq"),
)
