"""Work lost to preemption: optimizer steps trained twice, read from each run's step log.

Rank 0 of every Ray Train run appends "step pid unix_time" per optimizer step to
<run dir>/steps.log (mlplatform.train.loop). A step number that appears again was redone
after a restart from an older checkpoint: that is the work a preemption (or a crash) cost.
Its price is the run's metered cost per logged step, so the figure reconciles with the ledger.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable

from mlplatform.cost.ledger import Lost, Usage


def redone_steps(step_log: str) -> tuple[int, int]:
    """(steps logged, steps logged more than once beyond their first time) of one step log."""
    if not os.path.isfile(step_log):
        return 0, 0
    counts: Counter[int] = Counter()
    with open(step_log) as f:
        for line in f:
            parts = line.split()
            if parts and parts[0].isdigit():
                counts[int(parts[0])] += 1
    return sum(counts.values()), sum(c - 1 for c in counts.values())


def from_step_logs(cluster: str, job_id: str, step_logs: dict[str | None, str], usages: Iterable[Usage]) -> list[Lost]:
    """One Lost record per run that redid steps.

    `step_logs` maps a trial id to its run's step log; the key None stands for the job's only
    run (a training job), which is charged with all of `usages`.
    """
    rows = list(usages)
    out = []
    for trial, step_log in sorted(step_logs.items(), key=lambda kv: kv[0] or ""):
        mine = [u for u in rows if trial is None or u.trial == trial]
        logged, redone = redone_steps(step_log)
        if not redone or not mine:
            continue
        cost = sum(u.cost for u in mine)
        seconds = sum(u.seconds for u in mine if u.kind == "actor" and u.cpus)
        out.append(Lost(
            cluster=cluster, job_id=job_id, trial=trial, steps=redone, seconds=seconds * redone / logged,
            cost=cost * redone / logged, currency=mine[0].currency, reason="steps redone after a restart",
            at=max(u.ended_at or u.started_at for u in mine),
        ))
    return out
