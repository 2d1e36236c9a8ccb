"""`python -m mlplatform.observability render` writes the shipped dashboard and Prometheus config;
`python -m mlplatform.observability check FILE` checks any dashboard JSON's expressions."""

from __future__ import annotations

import sys
from pathlib import Path

from mlplatform.observability import dashboard, prometheus
from mlplatform.observability.check import DashboardError, check_dashboard

SHIPPED = Path(__file__).resolve().parents[3] / "cluster_configs/observability"


def main(argv: list[str]) -> int:
    if argv == ["render"]:
        print(dashboard.write(SHIPPED / "grafana-dashboard.json"))
        print(prometheus.write(SHIPPED / "prometheus.yml"))
        return 0
    if argv[:1] == ["check"] and len(argv) == 2:
        try:
            n = check_dashboard(argv[1])
        except DashboardError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"{argv[1]}: {n} expressions, every metric exported by the platform or Ray")
        return 0
    print("usage: python -m mlplatform.observability render | check FILE", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
