"""Registry index: models, versions, aliases and the alias history.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_MODEL = (["registry", "name"], ["registry_models.registry", "registry_models.name"])


def upgrade() -> None:
    op.create_table(
        "registry_models",
        sa.Column("registry", sa.Text, primary_key=True),
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("created_at", sa.Text, nullable=False),
    )
    op.create_table(
        "registry_versions",
        sa.Column("registry", sa.Text, primary_key=True),
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("registered_at", sa.Text, nullable=False),
        sa.Column("registered_by", sa.Text, nullable=False),
        sa.Column("encrypted", sa.Boolean, nullable=False),
        sa.Column("manifest_sha256", sa.Text, nullable=False),
        sa.ForeignKeyConstraint(*_MODEL),
    )
    op.create_table(
        "registry_aliases",
        sa.Column("registry", sa.Text, primary_key=True),
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("alias", sa.Text, primary_key=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.ForeignKeyConstraint(*_MODEL),
    )
    op.create_table(
        "registry_alias_moves",
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
        sa.ForeignKeyConstraint(*_MODEL),
    )
    op.create_index("ix_registry_alias_moves_model", "registry_alias_moves", ["registry", "name", "seq"])


def downgrade() -> None:
    op.drop_index("ix_registry_alias_moves_model", "registry_alias_moves")
    for table in ("registry_alias_moves", "registry_aliases", "registry_versions", "registry_models"):
        op.drop_table(table)
