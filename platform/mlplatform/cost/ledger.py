"""The cost ledger: every metered resource-second, work lost to preemption, and what each job was.

It lives in the metadata store (mlplatform._internal.metadata): the shared database
MLPLATFORM_METADATA_URL names (PostgreSQL, for clusters whose nodes meter side by side), else
SQLite at <MLPLATFORM_HOME>/metadata.db. An item (actor, task, replica) is metered many times
while it runs; each metering replaces its row, so the ledger always holds its latest cost. A loss
recorded twice (same cluster, job, trial and time) is kept once.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from mlplatform._internal import metadata
from mlplatform._internal.metadata import tables as t
from mlplatform.errors import CostError

DB_FILE = "metadata.db"
KINDS = ("actor", "task")
JOB_KINDS = ("train", "tune", "serve", "other")


@dataclass(frozen=True, kw_only=True)
class Usage:
    """One metered actor or task: what it held, where, for how long, at what price (a cost_usage row)."""

    cluster: str
    item_id: str
    job_id: str
    kind: str  # actor | task
    name: str
    trial: str | None = None
    deployment: str | None = None
    node_id: str
    region: str
    node_group: str
    market: str  # spot | on-demand
    cpus: float
    gpus: float
    share: float
    started_at: float  # unix seconds
    ended_at: float | None = None  # None while it runs
    seconds: float
    price_per_hour: float
    cost: float
    currency: str
    preempted: bool = False


@dataclass(frozen=True, kw_only=True)
class Lost:
    """Work lost to a preemption: steps redone from the last checkpoint, and what they cost."""

    cluster: str
    job_id: str
    trial: str | None = None
    steps: int
    seconds: float
    cost: float
    currency: str
    reason: str
    at: float  # unix seconds


@dataclass(frozen=True, kw_only=True)
class Job:
    """What a job was, for reports (a cost_jobs row)."""

    cluster: str
    job_id: str
    kind: str  # train | tune | serve | other
    name: str
    started_at: float | None = None
    ended_at: float | None = None
    extra: dict[str, Any] | None = None


_USAGE_FIELDS = tuple(f.name for f in dataclasses.fields(Usage))
_LOST_FIELDS = tuple(f.name for f in dataclasses.fields(Lost))


class Ledger:
    """Reads and writes the cost tables of one metadata store."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def __repr__(self) -> str:
        return f"Ledger({metadata.describe(self.engine)})"

    def record(self, usages: Iterable[Usage]) -> int:
        """Write usage rows in one transaction; an item already recorded has its row replaced."""
        rows = [_usage_row(u) for u in usages]
        if not rows:
            return 0
        insert = _insert(self.engine)
        stmt = insert(t.cost_usage)
        stmt = stmt.on_conflict_do_update(
            index_elements=["cluster", "item_id"],
            set_={c: stmt.excluded[c] for c in _USAGE_FIELDS if c not in ("cluster", "item_id")},
        )
        with metadata.write_transaction(self.engine) as conn:
            for row in rows:  # one statement per row: executemany with ON CONFLICT is dialect-fussy
                conn.execute(stmt, row)
        return len(rows)

    def record_lost(self, lost: Lost | Iterable[Lost]) -> int:
        """Record work lost to preemption; returns how many records were new (repeats are kept once)."""
        records = [lost] if isinstance(lost, Lost) else list(lost)
        for r in records:
            if r.steps < 0 or r.seconds < 0 or r.cost < 0:
                raise CostError(f"Got steps={r.steps}, seconds={r.seconds}, cost={r.cost} for lost work of job "
                                f"{r.job_id}; each must be >= 0.")
        # RETURNING, not rowcount: PostgreSQL reports no rowcount for an INSERT that fetches its key.
        stmt = _insert(self.engine)(t.cost_lost).on_conflict_do_nothing().returning(t.cost_lost.c.seq)
        new = 0
        with metadata.write_transaction(self.engine) as conn:
            for r in records:
                new += len(conn.execute(stmt, dataclasses.asdict(r)).all())
        return new

    def record_job(self, cluster: str, job_id: str, kind: str, name: str, started_at: float | None = None,
                   ended_at: float | None = None, extra: dict[str, Any] | None = None) -> None:
        """Say what a job is; recording it again updates it, keeping times and extra not given now."""
        import sqlalchemy as sa

        if kind not in JOB_KINDS:
            raise CostError(f"Got {kind!r} for `kind` of job {job_id}; must be one of {', '.join(JOB_KINDS)}.")
        insert = _insert(self.engine)
        stmt = insert(t.cost_jobs).values(
            cluster=cluster, job_id=job_id, kind=kind, name=name, started_at=started_at, ended_at=ended_at,
            extra=json.dumps(extra, sort_keys=True) if extra is not None else None,
        )
        jobs = t.cost_jobs
        stmt = stmt.on_conflict_do_update(
            index_elements=["cluster", "job_id"],
            set_={
                "kind": stmt.excluded.kind, "name": stmt.excluded.name,
                **{c: sa.func.coalesce(stmt.excluded[c], jobs.c[c]) for c in ("started_at", "ended_at", "extra")},
            },
        )
        with metadata.write_transaction(self.engine) as conn:
            conn.execute(stmt)

    def usages(self, cluster: str | None = None, job_id: str | None = None) -> list[Usage]:
        """Usage rows, oldest first, optionally of one cluster and/or job."""
        table = t.cost_usage
        rows = self._select(table, cluster, job_id, (table.c.started_at, table.c.item_id))
        return [Usage(**{f: r[f] for f in _USAGE_FIELDS}) for r in rows]

    def lost(self, cluster: str | None = None, job_id: str | None = None) -> list[Lost]:
        """Lost-work records in the order recorded, optionally of one cluster and/or job."""
        table = t.cost_lost
        rows = self._select(table, cluster, job_id, (table.c.seq,))
        return [Lost(**{f: r[f] for f in _LOST_FIELDS}) for r in rows]

    def jobs(self, cluster: str | None = None, job_id: str | None = None) -> list[Job]:
        """Recorded jobs, optionally of one cluster and/or job."""
        table = t.cost_jobs
        rows = self._select(table, cluster, job_id, (table.c.cluster, table.c.job_id))
        return [Job(cluster=r["cluster"], job_id=r["job_id"], kind=r["kind"], name=r["name"],
                    started_at=r["started_at"], ended_at=r["ended_at"],
                    extra=json.loads(r["extra"]) if r["extra"] else None) for r in rows]

    def _select(self, table: Any, cluster: str | None, job_id: str | None, order: tuple[Any, ...]) -> list[Any]:
        import sqlalchemy as sa

        query = sa.select(table)
        if cluster is not None:
            query = query.where(table.c.cluster == cluster)
        if job_id is not None:
            query = query.where(table.c.job_id == job_id)
        with metadata.read_transaction(self.engine) as conn:
            return [r._mapping for r in conn.execute(query.order_by(*order))]


def open_ledger(url: str | None = None) -> Ledger:
    """The ledger in the database `url` names, else MLPLATFORM_METADATA_URL's, else SQLite at
    <MLPLATFORM_HOME>/metadata.db."""
    from mlplatform._internal import storage

    url = url or metadata.configured_url() or metadata.sqlite_url(storage.home() / DB_FILE)
    return Ledger(metadata.open_store(url))


def _usage_row(u: Usage) -> dict[str, Any]:
    if u.kind not in KINDS:
        raise CostError(f"Got {u.kind!r} for `kind` of item {u.item_id}; must be one of {', '.join(KINDS)}.")
    if u.market not in ("spot", "on-demand"):
        raise CostError(f"Got {u.market!r} for `market` of item {u.item_id}; must be spot or on-demand.")
    for name in ("cpus", "gpus", "share", "seconds", "price_per_hour", "cost"):
        if getattr(u, name) < 0:
            raise CostError(f"Got {getattr(u, name)} for `{name}` of item {u.item_id}; must be >= 0.")
    return dataclasses.asdict(u)


def _insert(engine: Any) -> Any:
    if metadata.is_postgresql(engine):
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert
