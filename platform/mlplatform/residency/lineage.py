"""Classified data: where it may be written, and how its classification follows lineage.

A model trained on restricted data is restricted, and so is everything made from it (its
registered versions, ONNX exports, checkpoints): a derived thing keeps its source's
classification or a more restrictive one, never a lower one.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

from mlplatform._internal import storage
from mlplatform.errors import ResidencyError
from mlplatform.residency.policy import ResidencyPolicy


def confined(policy: ResidencyPolicy | None, classification: str | None,
             field: str = "classification") -> ContextManager[object]:
    """For the block, every write through the storage layer refuses a location outside the
    classification's storage prefixes (None: the policy default). No policy: no confinement.

    Raises:
        ResidencyError: the classification is unknown to the policy (naming `field`).
    """
    if policy is None:
        return contextlib.nullcontext()
    name = policy.resolve(classification, field)
    reason = f"{name!r} data under residency policy {policy.name!r}"
    return storage.confine(policy.rule(name).storage_prefixes, reason)


def inherit(policy: ResidencyPolicy | None, had: str | None, asked: str | None, *, field: str,
            source: str) -> str | None:
    """The classification of something made from `source` (classified `had`) when `asked` for one.

    `asked` None keeps `had`. Under a policy both resolve (None: the policy default) and `asked`
    must be at least as restrictive as `had`. Without a policy nothing orders classifications,
    so a classified source keeps exactly its own.

    Raises:
        ResidencyError: `asked` (the value of `field`) would lower the classification, or a name is unknown.
    """
    if policy is None:
        if had is not None and asked is not None and asked != had:
            raise ResidencyError(
                f"Got {asked!r} for `{field}`; {source} is classified {had!r}, and with no residency policy "
                f"on this cluster nothing says whether {asked!r} is as restrictive, so it keeps {had!r}. "
                f"Omit `{field}` (or pass {had!r})."
            )
        return asked or had
    had = policy.resolve(had, f"classification of {source}")
    if asked is None:
        return had
    asked = policy.resolve(asked, field)
    if not policy.at_least_as_restrictive(asked, had):
        allowed = [c for c in policy.classifications if policy.at_least_as_restrictive(c, had)]
        raise ResidencyError(
            f"Got {asked!r} for `{field}`; {source} is classified {had!r} ({policy.where(had)}), and "
            f"{asked!r} ({policy.where(asked)}) is less restrictive under residency policy {policy.name!r}. "
            f"A classification follows lineage and is never lowered: omit `{field}` or pass one of "
            f"{', '.join(allowed)}."
        )
    return asked
