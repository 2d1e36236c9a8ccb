"""Ray Tune's report callback for a Ray Train trial, with the trial's running spend added.

Imported only inside trials: it needs Ray Tune's session.
"""

from __future__ import annotations

import time

from ray.tune.integration.ray_train import TuneReportCallback

from mlplatform.tune.spec import COST_KEY


class CostReport(TuneReportCallback):
    """Adds `cost` (spend so far), `market` and `region` to the reports the trial sends to Tune.

    Runs in Ray Train's controller. The spend is each worker's share of its node × the node's
    catalog price over the time since the attempt began, plus earlier attempts' spend; the
    ledger, metered from Ray's own records afterwards, holds the exact figure.
    """

    def __init__(self, catalog, per_worker: dict[str, float], spent_before: float, market: str, metric: str):
        super().__init__()
        self.catalog, self.per_worker, self.market, self.metric = catalog, dict(per_worker), market, metric
        self.spent, self.last, self.rate = spent_before, time.time(), 0.0
        self.region: str | None = None

    def spent_until_now(self) -> float:
        return self.spent + self.rate * (time.time() - self.last)

    def after_report(self, run_context, metrics, checkpoint):
        now = time.time()
        self.rate = self._rate(metrics[0].get("node_ids") or [])
        self.spent += self.rate * (now - self.last)
        self.last = now
        for m in metrics:
            m[COST_KEY] = self.spent
            m["market"] = self.market
            m["region"] = self.region
        # Only reports with the searched metric reach Tune (the run's per-epoch ones): its
        # schedulers and searchers expect it in every result. The spend is counted regardless.
        if self.metric in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)

    def _rate(self, node_ids: list[str]) -> float:
        """Spend per second of the workers on `node_ids`, by the catalog."""
        import ray

        from mlplatform.cluster.inventory import from_ray_nodes
        from mlplatform.cost.catalog import share

        nodes = {n.node_id: n for n in from_ray_nodes(ray.nodes())}
        rate = 0.0
        for node_id in node_ids:
            node = nodes.get(node_id)
            if node is None:
                continue
            self.region = node.region
            rate += share(self.per_worker, node.resources) * self.catalog.price(node.region, node.group, node.market) / 3600
        return rate
