"""Ray Train's preemption watcher, placed where the run's residency allows.

Ray Train 2.60 starts one `PreemptionWatcher` actor per worker group to turn node drains
(a spot node's notice: `ray drain-node --reason PREEMPTION --deadline-remaining-seconds N`)
into `ray.train.get_preemption_info()` on the workers, and counts the restart that follows
against `FailureConfig.max_preemption_failures` instead of `max_failures`. Its own watcher is
an actor with no selector that Ray may place in any region, which the residency guard
refuses. This callback starts the same watcher pinned to the controller's node (the driver's,
which preflight checked), and the trainer switches Ray's own off.
"""

from __future__ import annotations

from ray.train.v2._internal.callbacks.preemption_callback import PreemptionCallback
from ray.train.v2._internal.execution.preemption import PreemptionWatcher


class PinnedPreemptionCallback(PreemptionCallback):
    """PreemptionCallback whose watcher runs on the controller's own node."""

    def after_worker_group_start(self, worker_group) -> None:
        import ray

        self._stop_watcher()
        node_to_ranks: dict[str, list[int]] = {}
        workers_by_rank = {}
        for w in worker_group.get_workers():
            rank = w.distributed_context.world_rank
            node_to_ranks.setdefault(w.metadata.node_id, []).append(rank)
            workers_by_rank[rank] = w.actor
        here = ray.get_runtime_context().get_node_id()
        watcher = ray.remote(num_cpus=0, max_restarts=-1)(PreemptionWatcher)
        self._watcher = watcher.options(label_selector={ray._raylet.RAY_NODE_ID_KEY: here}).remote(
            node_to_ranks=node_to_ranks,
            poll_interval_s=self._poll_interval_s,
            worker_actors_by_rank=workers_by_rank,
        )

