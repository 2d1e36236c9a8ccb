"""The residency policy: which regions (and storage) each data classification may use.

An operator declares it once per cluster (cluster_configs/residency/*.yaml, named by the
cluster spec's `residency_policy`); every job on that cluster is placed under it. A
classification compiles to a Ray label selector on the region label (and optionally the zone
label), which is intersected with the job's own selector: narrowing is fine, contradicting the
policy is an error, never an override.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field, field_validator, model_validator

from mlplatform._internal import placement, storage
from mlplatform.config import Spec
from mlplatform.errors import ResidencyError
from mlplatform.residency.names import REGION_LABEL, ZONE_LABEL

ANY_REGION = "*"
_NAME = re.compile(r"^[a-z][a-z0-9-]{0,39}$")


class ClassificationRule(Spec):
    """Where data of one classification, and the compute that touches it, may be."""

    description: str = Field("", description="What this classification covers, for people reading the policy.")
    regions: list[str] = Field(
        min_length=1, description=f"Regions (the `{REGION_LABEL}` node label) allowed; `{ANY_REGION}` allows every region."
    )
    zones: list[str] = Field(
        default_factory=list, description=f"If set, only these zones (the `{ZONE_LABEL}` label) within the regions."
    )
    storage_prefixes: list[str] = Field(
        default_factory=list,
        description="Path or URI prefixes this data may be written under (e.g. /data/uae/, s3://uae-bucket/); empty: anywhere.",
    )
    encrypt_at_rest: bool = Field(
        False,
        description="Restricted data: its checkpoints, exported models, drift samples and registry versions are "
        "encrypted with the cluster's key (envelope encryption).",
    )

    @field_validator("regions")
    @classmethod
    def _regions(cls, v: list[str]) -> list[str]:
        if ANY_REGION in v and len(v) > 1:
            raise ValueError(f"`{ANY_REGION}` allows every region; list it alone")
        return v

    @field_validator("storage_prefixes")
    @classmethod
    def _prefixes(cls, v: list[str]) -> list[str]:
        return [storage.normal_prefix(p) for p in v]

    def any_region(self) -> bool:
        return self.regions == [ANY_REGION]


class ResidencyPolicy(Spec):
    """Data classifications and where each may live; one policy per cluster."""

    name: str = Field(description="Policy name, shown in errors and the audit trail.")
    default_classification: str = Field(description="The classification of a spec that names none.")
    classifications: dict[str, ClassificationRule] = Field(
        min_length=1, description="Classification name (e.g. uae-restricted, internal, public) → its rule."
    )

    @field_validator("classifications")
    @classmethod
    def _names(cls, v: dict[str, ClassificationRule]) -> dict[str, ClassificationRule]:
        bad = [k for k in v if not _NAME.match(k)]
        if bad:
            raise ValueError(f"classification names must be lowercase letters, digits and '-': {bad}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> ResidencyPolicy:
        if self.default_classification not in self.classifications:
            raise ValueError(
                f"default_classification {self.default_classification!r} is not one of the classifications "
                f"({', '.join(self.classifications)})"
            )
        # Each storage location belongs to one classification: overlapping prefixes would let data
        # of one classification sit where another's tooling reads and writes.
        owned = [(p, name) for name, rule in self.classifications.items() for p in rule.storage_prefixes]
        for i, (a, name_a) in enumerate(owned):
            for b, name_b in owned[i + 1:]:
                if a.startswith(b) or b.startswith(a):
                    raise ValueError(
                        f"storage prefixes overlap: {a!r} ({name_a}) and {b!r} ({name_b}); each location must "
                        "belong to one classification"
                    )
        return self

    # --- queries ---

    def rule(self, classification: str | None, field: str = "classification") -> ClassificationRule:
        """The rule of `classification` (None: the default); an unknown one is an error naming `field`."""
        name = self.resolve(classification, field)
        return self.classifications[name]

    def resolve(self, classification: str | None, field: str = "classification") -> str:
        name = classification or self.default_classification
        if name not in self.classifications:
            raise ResidencyError(
                f"Got {name!r} for `{field}`; residency policy {self.name!r} knows "
                f"{', '.join(sorted(self.classifications))}. Use one of them."
            )
        return name

    def selector(self, classification: str | None) -> placement.LabelSelector:
        """The label selector every placement of this classification's work must satisfy."""
        rule = self.rule(classification)
        conditions: dict[str, str] = {}
        if not rule.any_region():
            conditions[REGION_LABEL] = _one_of(rule.regions)
        if rule.zones:
            conditions[ZONE_LABEL] = _one_of(rule.zones)
        return placement.LabelSelector.of(conditions)

    def place(self, classification: str | None, own: dict[str, str] | None, field: str) -> dict[str, str]:
        """The selector Ray receives: the spec's own (`field`) narrowed to the classification's regions.

        Raises:
            ResidencyError: the own selector asks for a place the classification forbids.
        """
        name = self.resolve(classification)
        try:
            merged = placement.LabelSelector.of(own).intersect(self.selector(name))
        except placement.Unsatisfiable as e:
            raise ResidencyError(
                f"Got {own} for `{field}`; it contradicts residency policy {self.name!r}, under which "
                f"{name!r} work may only run in {self.where(name)} ({e}). Choose nodes inside those regions "
                f"or, if the data allows it, another classification."
            ) from None
        return merged.to_ray()

    def where(self, classification: str | None) -> str:
        rule = self.rule(classification)
        regions = "any region" if rule.any_region() else "regions " + ", ".join(rule.regions)
        return regions + (f" (zones {', '.join(rule.zones)})" if rule.zones else "")

    def allows_storage(self, classification: str | None, location: str) -> bool:
        return storage.within(location, self.rule(classification).storage_prefixes)

    def at_least_as_restrictive(self, a: str | None, b: str | None) -> bool:
        """Whether data classified `a` may go only where data classified `b` may (a ≥ b).

        By the compute it may touch: a's regions within b's (`*` is the least restrictive), and
        if b names zones, a's zones within them. Storage prefixes do not order classifications:
        the policy gives each its own, so they never nest.
        """
        ra, rb = self.rule(a), self.rule(b)
        if rb.any_region():
            regions = True
        else:
            regions = not ra.any_region() and set(ra.regions) <= set(rb.regions)
        zones = not rb.zones or (bool(ra.zones) and set(ra.zones) <= set(rb.zones))
        return regions and zones

    def check_storage(self, classification: str | None, location: str, field: str) -> None:
        """Refuse, before a byte is written, a location outside the classification's prefixes."""
        if not self.allows_storage(classification, location):
            name = self.resolve(classification)
            raise ResidencyError(
                f"Got {location!r} for `{field}`; {name!r} data may only be stored under "
                f"{', '.join(self.rule(name).storage_prefixes)} (residency policy {self.name!r}). "
                f"Write under one of them."
            )

    def check_regions(self, present: set[str]) -> None:
        """Every region the policy names exists on the cluster (a typo would allow nothing)."""
        for name, rule in self.classifications.items():
            unknown = [r for r in rule.regions if r != ANY_REGION and r not in present]
            if unknown:
                raise ResidencyError(
                    f"Residency policy {self.name!r}: classification {name!r} allows region(s) "
                    f"{', '.join(unknown)}, which no node group of this cluster is in (regions: "
                    f"{', '.join(sorted(present))}). Fix the region names in the policy."
                )

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _one_of(values: list[str]) -> str:
    return values[0] if len(values) == 1 else f"in({','.join(values)})"
