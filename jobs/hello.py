"""Report the node labels of the nodes this job's tasks ran on, one task per node group.

    ray job submit --working-dir . -- python jobs/hello.py
"""

import json

from mlplatform.cluster import connect
from mlplatform.cluster.probe import probe_node_groups

if __name__ == "__main__":
    connect()
    results = probe_node_groups()
    for r in results:
        labels = r["labels"]
        print(
            f"task for group {r['asked_for_group']:<6} ran on {r['node_name']:<8} "
            f"group={labels.get('ray.io/node-group')} region={labels.get('ray.io/availability-region')} "
            f"zone={labels.get('ray.io/availability-zone')} market={labels.get('ray.io/market-type')}"
        )
    print("HELLO_RESULT " + json.dumps(results, sort_keys=True))
