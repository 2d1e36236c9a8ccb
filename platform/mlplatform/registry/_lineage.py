"""Lineage of a registration: the artifact's metadata.json, explicit overrides, the environment.

Precedence, highest first: the `lineage` argument, the artifact's metadata.json, then
what the running process knows (Ray job id, node region, S3 bucket region).
"""

from __future__ import annotations

import getpass
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import fields
from datetime import datetime, timezone
from typing import Any

from mlplatform import residency
from mlplatform._internal import artifact_layout
from mlplatform.errors import ArtifactError, RegistryError

from mlplatform.registry._records import Lineage

METADATA_FILE = artifact_layout.METADATA
_FIELDS = {f.name for f in fields(Lineage)}
# Filled in by register(), never taken from the artifact or the caller.
_DERIVED = {"source_uri", "extra"}


def build(
    metadata: Mapping[str, Any] | None,
    overrides: Mapping[str, Any] | None,
    source_uri: str,
    storage_fs: Any,
    policy: Any = None,
) -> Lineage:
    """Merge metadata.json, explicit `lineage` and the environment into one Lineage.

    The classification is the artifact's (under `policy`, None means the policy default); a
    `lineage['classification']` may keep or raise it, never lower it (ResidencyError).
    """
    values: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in (metadata or {}).items():
        # Keys the registry does not know are kept, not dropped: the training side may add some.
        (values if key in _FIELDS - _DERIVED else extra)[key] = value
    overrides = _check_overrides(overrides)
    for key, value in overrides.items():
        if key == "extra":
            extra.update(value)
        else:
            values[key] = value
    values["classification"] = residency.inherit(
        policy, artifact_classification(metadata), overrides.get("classification"),
        field="lineage['classification']", source=f"the artifact {source_uri} (its {METADATA_FILE})",
    )
    for key in ("training_regions", "training_node_ids"):
        values[key] = values.get(key) or []
        if not isinstance(values[key], list) or not all(isinstance(x, str) for x in values[key]):
            raise ArtifactError(
                f"Got {values[key]!r} for lineage `{key}`; must be a list of strings, e.g. ['me-central-1']."
            )
    values["job_id"] = values.get("job_id") or current_job_id()
    values["storage_region"] = values.get("storage_region") or _storage_region(storage_fs)
    if values.get("metrics") is None:
        values["metrics"] = {}
    if not isinstance(values["metrics"], dict):
        raise ArtifactError(
            f"Got a {type(values['metrics']).__name__} for lineage `metrics`; must be a mapping "
            f"of metric name to value, e.g. {{'accuracy': 0.97}}."
        )
    lineage = Lineage(**values, source_uri=source_uri, extra=extra)
    _check_json(lineage)
    return lineage


def artifact_classification(metadata: Mapping[str, Any] | None) -> str | None:
    """What the artifact's metadata.json says its data is classified: its own `classification`,
    else its spec's (artifacts written before training recorded it resolved)."""
    metadata = metadata or {}
    spec = metadata.get("spec")
    found = metadata.get("classification") or (spec.get("classification") if isinstance(spec, Mapping) else None)
    if found is not None and not isinstance(found, str):
        raise ArtifactError(f"Got {found!r} for `classification` in {METADATA_FILE}; must be a classification name.")
    return found


def read_metadata(data: bytes, uri: str) -> dict[str, Any]:
    """Parse an artifact's metadata.json; it must be a JSON object."""
    try:
        metadata = json.loads(data)
    except ValueError as e:
        raise ArtifactError(
            f"{uri} is not valid JSON ({e}). Fix or remove it; the registry reads lineage "
            f"(spec, metrics, dataset_fingerprint, ...) from it."
        ) from None
    if not isinstance(metadata, dict):
        raise ArtifactError(
            f"{uri} holds a JSON {type(metadata).__name__}; it must be an object with keys such "
            f"as spec, metrics and dataset_fingerprint."
        )
    return metadata


def current_job_id() -> str | None:
    """The Ray job this process belongs to, found without importing Ray."""
    # `ray job submit` entrypoints get their submission id in this variable.
    config = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if config:
        try:
            submission = json.loads(config).get("metadata", {}).get("job_submission_id")
        except (ValueError, AttributeError):
            submission = None
        if submission:
            return submission
    if os.environ.get("RAY_JOB_ID"):  # set in Ray workers
        return os.environ["RAY_JOB_ID"]
    ray = sys.modules.get("ray")  # only if the caller already imported it
    if ray is not None and getattr(ray, "is_initialized", lambda: False)():
        try:
            return ray.get_runtime_context().get_job_id()
        except Exception:  # lineage is best effort; never fail a registration over it
            return None
    return None


def current_user(actor: str | None = None) -> str:
    """`actor` if given, else the OS user (uid where the user has no passwd entry)."""
    if actor:
        return actor
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid:{os.getuid()}"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _storage_region(fs: Any) -> str | None:
    region = getattr(fs, "region", None)  # S3FileSystem knows its bucket's region
    if region:
        return region
    # A local root lives on the node doing the writing; `ray start` labels it with this.
    return os.environ.get("RAY_NODE_REGION") or None


def _check_overrides(overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    if overrides is None:
        return {}
    if not isinstance(overrides, Mapping):
        raise RegistryError(
            f"Got a {type(overrides).__name__} for `lineage`; must be a mapping such as "
            f"{{'metrics': {{'accuracy': 0.97}}, 'job_id': '...'}}."
        )
    allowed = sorted((_FIELDS - _DERIVED) | {"extra"})
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise RegistryError(
            f"Got unknown key(s) {unknown} in `lineage`; allowed keys are {allowed}. Put "
            f"anything else under 'extra'."
        )
    if not isinstance(overrides.get("classification", ""), (str, type(None))):
        raise RegistryError(
            f"Got {overrides['classification']!r} for `lineage['classification']`; must be a classification "
            f"name such as 'uae-restricted', or None to keep the artifact's."
        )
    if "extra" in overrides and not isinstance(overrides["extra"], Mapping):
        raise RegistryError("`lineage['extra']` must be a mapping of names to JSON values.")
    return dict(overrides)


def _check_json(lineage: Lineage) -> None:
    for f in fields(Lineage):
        try:
            json.dumps(getattr(lineage, f.name))
        except (TypeError, ValueError) as e:
            raise RegistryError(
                f"Lineage field `{f.name}` cannot be stored as JSON ({e}); pass plain "
                f"numbers, strings, lists and mappings."
            ) from None
