"""Data residency: policy, classification, placement, audit.

The operator declares a policy per cluster (cluster_configs/residency/*.yaml, named by the
cluster spec); each spec names its data's classification; the platform compiles the two into
every placement it makes and checks it before submission (`mlplatform residency check`).
"""

from mlplatform.residency.active import (
    CLUSTER_ENV,
    KV_KEY,
    POLICY_ENV,
    record,
    current,
    encode,
    for_cluster_spec,
    load,
    publish,
)
from mlplatform.residency.policy import ANY_REGION, REGION_LABEL, ClassificationRule, ResidencyPolicy

__all__ = [
    "ANY_REGION",
    "CLUSTER_ENV",
    "ClassificationRule",
    "KV_KEY",
    "POLICY_ENV",
    "REGION_LABEL",
    "ResidencyPolicy",
    "current",
    "encode",
    "for_cluster_spec",
    "load",
    "publish",
    "record",
]
