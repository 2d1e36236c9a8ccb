"""Users and roles: users, their role grants, and their hashed tokens.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_USER = (["name"], ["access_users.name"])


def upgrade() -> None:
    op.create_table(
        "access_users",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("created_at", sa.Text, nullable=False),
        sa.Column("created_by", sa.Text, nullable=False),
    )
    op.create_table(
        "access_grants",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("resource", sa.Text, primary_key=True),
        sa.Column("role", sa.Text, nullable=False),
        sa.ForeignKeyConstraint(*_USER, ondelete="CASCADE"),
    )
    op.create_table(
        "access_tokens",
        sa.Column("token_id", sa.Text, primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("salt", sa.Text, nullable=False),
        sa.Column("sha256", sa.Text, nullable=False),
        sa.Column("created_at", sa.Text, nullable=False),
        sa.ForeignKeyConstraint(*_USER, ondelete="CASCADE"),
    )
    op.create_index("ix_access_tokens_name", "access_tokens", ["name"])


def downgrade() -> None:
    op.drop_index("ix_access_tokens_name", "access_tokens")
    op.drop_table("access_tokens")
    op.drop_table("access_grants")
    op.drop_table("access_users")
