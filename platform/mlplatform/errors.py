"""One exception tree for everything the platform reports to a user.

Every message says what is wrong, why, and how to fix it, naming the field or flag.
Subclasses keep the single-message constructor so that they pickle across Ray
process boundaries unchanged.
"""

from __future__ import annotations


class PlatformError(Exception):
    """Base of every error the platform raises on purpose."""


class SpecError(PlatformError):
    """A user-written spec (YAML or flags) is invalid."""


class ClusterError(PlatformError):
    """A local cluster could not be started, found, reached or stopped."""


class ClusterNotRunning(ClusterError):
    """No running cluster matches what was asked for."""


class ClusterAlreadyRunning(ClusterError):
    """`up` was asked for a cluster that is already running."""


class ClusterBusy(ClusterError):
    """Another `up` or `down` of the same cluster holds its lock."""


class PortInUse(ClusterError):
    """A port the cluster needs is held by another process."""


class NodeStartError(ClusterError):
    """A Ray node failed to start; everything started before it was stopped."""


# --- model registry (mlplatform.registry) ---


class RegistryError(PlatformError):
    """A model registry operation could not be done as asked."""


class InvalidName(RegistryError):
    """A model name, alias or version reference is malformed or could escape the registry root."""


class ModelNotFound(RegistryError):
    """No model with that name is registered under the registry root."""


class VersionNotFound(RegistryError):
    """The model exists but has no such version."""


class AliasNotFound(RegistryError):
    """The model has no such alias, or the alias has no earlier target to roll back to."""


class ArtifactError(RegistryError):
    """The artifact directory to register is missing, empty or has an unreadable metadata file."""


class RegistryNotWritable(RegistryError):
    """The registry root cannot be created or written; nothing was written."""


class RegistryLockTimeout(RegistryError):
    """Another process held the model's index lock for longer than the timeout."""


class IntegrityError(RegistryError):
    """Stored files differ from the version's manifest (modified, missing, extra or truncated)."""


class EncryptionKeyError(RegistryError):
    """An encrypted version was loaded without a key, with the wrong key, or the key is malformed."""


# --- training (mlplatform.train) ---


class TrainError(PlatformError):
    """A training run could not be planned, started or finished."""


class PlanError(TrainError):
    """No DeepSpeed plan satisfies the spec on the hardware the planner assumes."""


class PreflightError(TrainError):
    """A check made before any worker starts failed: data, storage or cluster capacity."""


class TrainingFailed(TrainError):
    """The run failed after Ray Train used up its restarts; checkpoints written so far are kept."""


class TrainArtifactError(TrainError):
    """A training artifact directory is incomplete or its weights do not fit its model reference."""


# --- export (mlplatform.export) ---


class ExportError(PlatformError):
    """A model could not be exported to ONNX, quantized, gated or benchmarked; nothing was registered."""


class OnnxModelError(ExportError):
    """An ONNX file is corrupt, truncated or cannot be loaded by ONNX Runtime."""


class InputSignatureError(ExportError):
    """The artifact's metadata has no usable input signature (input name, dtype and shape)."""


class HoldoutDataError(ExportError):
    """The held-out data for the accuracy gate is missing, unreadable or does not fit the model."""


class CompressError(PlatformError):
    """A model could not be pruned or distilled, or the result failed its gate; nothing was registered."""


# --- serve ---


class ServeError(PlatformError):
    """A Serve application could not be built, deployed or managed as asked."""


class ModelNotDeployable(ServeError):
    """The registered version lacks the variant asked for, or its export gate failed for it."""


class PlacementError(ServeError):
    """No live node satisfies a deployment's label selector and CPU request; nothing was deployed."""


class ApiKeyError(ServeError):
    """An API key could not be created, found or revoked (unknown app or key id, unreadable key file)."""


# --- residency ---


class ResidencyError(PlatformError):
    """Work or data would leave the regions its classification allows; the message names what and where."""


# --- cost (mlplatform.cost) ---


class CostError(PlatformError):
    """A price, a ledger record or a cost report cannot be given as asked (missing price, bad grouping)."""
