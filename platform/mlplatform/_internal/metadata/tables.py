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

# --- cost ledger (mlplatform.cost.ledger) ---

# One row per metered actor or task (or Serve replica): re-metering the same item replaces its row.
cost_usage = sa.Table(
    "cost_usage", metadata,
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
    sa.Index("ix_cost_usage_job", "cluster", "job_id"),
)

# Work lost to preemption. Unique on (cluster, job_id, trial, at) with a missing trial counted as
# one value (an expression index), so recording the same loss twice keeps one row.
cost_lost = sa.Table(
    "cost_lost", metadata,
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
sa.Index("uq_cost_lost_event", cost_lost.c.cluster, cost_lost.c.job_id,
         sa.func.coalesce(cost_lost.c.trial, ""), cost_lost.c.at, unique=True)

# What each job was (train, tune, serve), for reports.
cost_jobs = sa.Table(
    "cost_jobs", metadata,
    sa.Column("cluster", sa.Text, primary_key=True),
    sa.Column("job_id", sa.Text, primary_key=True),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("started_at", sa.Float),
    sa.Column("ended_at", sa.Float),
    sa.Column("extra", sa.Text),  # JSON object
)

# --- users and roles (mlplatform.access) ---

access_users = sa.Table(
    "access_users", metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("created_at", sa.Text, nullable=False),
    sa.Column("created_by", sa.Text, nullable=False),
)

# One role per (user, resource); resource "*" is global. Roles are ordered, so one row says it all.
access_grants = sa.Table(
    "access_grants", metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("resource", sa.Text, primary_key=True),
    sa.Column("role", sa.Text, nullable=False),
    sa.ForeignKeyConstraint(["name"], ["access_users.name"], ondelete="CASCADE"),
)

# A user may hold several tokens (the operator gets one per platform home); only hashes are kept.
access_tokens = sa.Table(
    "access_tokens", metadata,
    sa.Column("token_id", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("salt", sa.Text, nullable=False),
    sa.Column("sha256", sa.Text, nullable=False),
    sa.Column("created_at", sa.Text, nullable=False),
    sa.ForeignKeyConstraint(["name"], ["access_users.name"], ondelete="CASCADE"),
    sa.Index("ix_access_tokens_name", "name"),
)
