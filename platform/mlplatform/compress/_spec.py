"""CompressSpec: what a user writes to prune and/or distill a registered classifier."""

from __future__ import annotations

from pydantic import Field, field_validator

from mlplatform.config import Spec


class GateSpec(Spec):
    """What a compressed model must keep of its teacher on the held-out data."""

    max_accuracy_drop: float = Field(
        0.01, ge=0, le=1, description="Most held-out accuracy may fall below the teacher's (0.01 = 1 point)."
    )
    min_top1_agreement: float = Field(
        0.97, ge=0, le=1, description="Least share of held-out rows whose top-1 class equals the teacher's."
    )


class PruneSpec(Spec):
    """Structured pruning of hidden neurons (ranked by weight norm, physically removed), then fine-tuning."""

    enabled: bool = Field(True, description="false skips pruning.")
    keep_ratio: float = Field(
        0.25, gt=0, le=1, description="Share of each hidden layer's neurons kept (0.25 = 75% structured sparsity)."
    )
    norm: int = Field(2, ge=1, le=2, description="Neuron importance: L1 (1) or L2 (2) norm of its incoming weights.")
    epochs: int = Field(5, ge=0, le=1000, description="Fine-tuning epochs on the training data after pruning.")
    lr: float = Field(0.005, gt=0, description="Adam learning rate for fine-tuning.")
    alpha: float = Field(
        0.7, ge=0, le=1,
        description="Share of the teacher's soft targets in the fine-tuning loss (0: labels only); keeping the "
        "teacher's answers is what the agreement gate asks.",
    )
    temperature: float = Field(4.0, gt=0, description="Softmax temperature of the teacher's soft targets.")
    name: str | None = Field(None, description="Model name to register under; default: `<teacher>-pruned`.")


class DistillSpec(Spec):
    """A smaller student MLP trained on the teacher's soft targets plus the labels."""

    enabled: bool = Field(True, description="false skips distillation.")
    hidden: list[int] = Field(
        default_factory=lambda: [32], min_length=1, description="The student's hidden layer widths, e.g. [32]."
    )
    temperature: float = Field(4.0, gt=0, description="Softmax temperature of the soft targets (both sides).")
    alpha: float = Field(
        0.7, ge=0, le=1, description="Loss = alpha * T² * KL(teacher || student) + (1 - alpha) * cross-entropy."
    )
    epochs: int = Field(40, ge=1, le=10000, description="Training epochs of the student.")
    lr: float = Field(0.01, gt=0, description="Adam learning rate of the student.")
    name: str | None = Field(None, description="Model name to register under; default: `<teacher>-distilled`.")

    @field_validator("hidden")
    @classmethod
    def _widths(cls, v: list[int]) -> list[int]:
        if any(h < 1 for h in v):
            raise ValueError("every hidden width must be >= 1")
        return v


class CompressSpec(Spec):
    """Prune and/or distill a registered digits-style MLP classifier; gate and register each result."""

    prune: PruneSpec = Field(default_factory=PruneSpec, description="Structured pruning + fine-tuning.")
    distill: DistillSpec = Field(default_factory=DistillSpec, description="Distillation into a smaller student.")
    gate: GateSpec = Field(default_factory=GateSpec, description="Thresholds each result must meet against the teacher.")
    register_failed: bool = Field(
        False,
        description="Register a result that fails its gate too (its lineage records the failure); default: "
        "a failing result is reported and not registered.",
    )
    batch_size: int = Field(64, ge=1, le=65536, description="Mini-batch size of fine-tuning and distillation.")
    seed: int = Field(0, description="Seed of shuffling and the student's initialisation (results repeat).")
    holdout_path: str | None = Field(
        None,
        description="Held-out Parquet file for the gate; default: the validation data named in the teacher's metadata.",
    )
    max_holdout_rows: int = Field(5000, ge=1, description="Most held-out rows the gate evaluates.")
    label_selector: dict[str, str] = Field(
        default_factory=lambda: {"ray.io/node-group": "cpu"},
        description="Nodes the compression task may run on; narrowed to the teacher's classification's regions.",
    )
    num_cpus: float = Field(1, gt=0, le=64, description="CPUs the compression task reserves (it uses as many threads).")

    @field_validator("distill")
    @classmethod
    def _any(cls, v: DistillSpec, info) -> DistillSpec:
        prune = info.data.get("prune")
        if prune is not None and not prune.enabled and not v.enabled:
            raise ValueError("both `prune.enabled` and `distill.enabled` are false; enable at least one")
        return v
