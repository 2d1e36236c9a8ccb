"""Names the residency pieces share, in a module that imports nothing: the runtime guard reads
them in every Ray worker process, where importing pydantic and the policy model would cost time."""

POLICY_ENV = "MLPLATFORM_RESIDENCY_POLICY"
# Which cluster this process works for: set on every node by `cluster up`, and by connect().
CLUSTER_ENV = "MLPLATFORM_CLUSTER"
KV_NAMESPACE = "mlplatform"
KV_KEY = "residency/policy"
REGION_LABEL = "ray.io/availability-region"
ZONE_LABEL = "ray.io/availability-zone"
