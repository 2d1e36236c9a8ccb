"""Cost ledger: metered usage, work lost to preemption, and jobs.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "cost_usage",
        sa.Column("cluster", sa.Text, primary_key=True),
        sa.Column("item_id", sa.Text, primary_key=True),
        sa.Column("job_id", sa.Text, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("trial", sa.Text),
        sa.Column("deployment", sa.Text),
        sa.Column("node_id", sa.Text, nullable=False),
        sa.Column("region", sa.Text, nullable=False),
        sa.Column("node_group", sa.Text, nullable=False),
        sa.Column("market", sa.Text, nullable=False),
        sa.Column("cpus", sa.Float, nullable=False),
        sa.Column("gpus", sa.Float, nullable=False),
        sa.Column("share", sa.Float, nullable=False),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("ended_at", sa.Float),
        sa.Column("seconds", sa.Float, nullable=False),
        sa.Column("price_per_hour", sa.Float, nullable=False),
        sa.Column("cost", sa.Float, nullable=False),
        sa.Column("currency", sa.Text, nullable=False),
        sa.Column("preempted", sa.Boolean, nullable=False),
    )
    op.create_index("ix_cost_usage_job", "cost_usage", ["cluster", "job_id"])
    op.create_table(
        "cost_lost",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("cluster", sa.Text, nullable=False),
        sa.Column("job_id", sa.Text, nullable=False),
        sa.Column("trial", sa.Text),
        sa.Column("steps", sa.Integer, nullable=False),
        sa.Column("seconds", sa.Float, nullable=False),
        sa.Column("cost", sa.Float, nullable=False),
        sa.Column("currency", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("at", sa.Float, nullable=False),
    )
    # A missing trial counts as one value, so the same loss recorded twice stays one row.
    op.create_index("uq_cost_lost_event", "cost_lost", ["cluster", "job_id", sa.text("coalesce(trial, '')"), "at"],
                    unique=True)
    op.create_table(
        "cost_jobs",
        sa.Column("cluster", sa.Text, primary_key=True),
        sa.Column("job_id", sa.Text, primary_key=True),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("started_at", sa.Float),
        sa.Column("ended_at", sa.Float),
        sa.Column("extra", sa.Text),
    )


def downgrade() -> None:
    op.drop_index("uq_cost_lost_event", "cost_lost")
    op.drop_index("ix_cost_usage_job", "cost_usage")
    for table in ("cost_jobs", "cost_lost", "cost_usage"):
        op.drop_table(table)
