"""TrainSpec: everything a user writes to describe one training run.

Checks that need nothing but the spec itself (batch arithmetic, stage/option
combinations DeepSpeed rejects, spot policy contradictions) live here as validators,
so `mlplatform validate` and `mlplatform train plan` catch them. Checks that look at
files, imports or the cluster live in `preflight.py`.
"""

from __future__ import annotations

import re
from enum import Enum
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from mlplatform.config import Spec

GROUP_LABEL = "ray.io/node-group"
MARKET_LABEL = "ray.io/market-type"

_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# "package.module:factory" (dotted module path, then one attribute name).
_IMPORT_REF = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")
BUILTIN_MODELS = ("digits_mlp", "gpt")
BUILTIN_DATASETS = ("digits", "tiny_corpus")


def _fail(title: str, problems: list[tuple[tuple[str, ...], Any, str]]) -> None:
    """Raise one ValidationError with a problem per field, so each names its own field and line."""
    raise ValidationError.from_exception_data(
        title,
        [
            InitErrorDetails(type=PydanticCustomError("value_error", "{msg}", {"msg": msg}), loc=loc, input=value)
            for loc, value, msg in problems
        ],
    )


class Task(str, Enum):
    """What the model learns: the loss and the held-out metric follow from it."""

    CLASSIFICATION = "classification"
    REGRESSION = "regression"
    CAUSAL_LM = "causal_lm"


class Precision(str, Enum):
    """Training precision; `auto` picks bf16 where the hardware has it, else fp16 on GPUs, else fp32."""

    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"
    AUTO = "auto"


class ModelSpec(Spec):
    """Which network to train."""

    ref: str = Field(
        description=(
            "`builtin:digits_mlp`, `builtin:gpt`, or `package.module:factory` where factory(**kwargs) "
            "returns a torch.nn.Module."
        )
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments for the model factory (e.g. hidden sizes)."
    )

    @field_validator("ref")
    @classmethod
    def _ref(cls, v: str) -> str:
        if v.startswith("builtin:"):
            name = v.removeprefix("builtin:")
            if name not in BUILTIN_MODELS:
                raise ValueError(
                    f"unknown built-in model; use one of {', '.join('builtin:' + m for m in BUILTIN_MODELS)} "
                    "or `package.module:factory`"
                )
        elif not _IMPORT_REF.match(v):
            raise ValueError("must be `builtin:<name>` or an import path `package.module:factory`")
        return v


class DatasetSpec(Spec):
    """Where the training data is and which columns mean what."""

    path: str = Field(
        description=(
            "Parquet file, directory of Parquet files, or pyarrow-filesystem URI (s3://, gs://, file://); "
            "or `builtin:digits` / `builtin:tiny_corpus`, written to Parquet under the storage path."
        )
    )
    validation_path: str | None = Field(
        None, description="Held-out Parquet data; when absent, `validation_fraction` of `path` is held out."
    )
    validation_fraction: float = Field(
        0.2, gt=0, lt=1, description="Share of rows held out for evaluation when `validation_path` is absent."
    )
    label_column: str = Field("label", description="Target column (classification and regression tasks).")
    feature_columns: list[str] | None = Field(
        None, description="Numeric input columns; default: every column except the label."
    )
    text_column: str = Field("text", description="Text column (causal_lm task).")
    seq_len: int = Field(64, ge=8, le=65536, description="Tokens per training sequence (causal_lm task).")

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        if v.startswith("builtin:") and v.removeprefix("builtin:") not in BUILTIN_DATASETS:
            raise ValueError(f"unknown built-in dataset; use one of {', '.join('builtin:' + d for d in BUILTIN_DATASETS)}")
        if not v.strip():
            raise ValueError("must be a Parquet path, URI or `builtin:<name>`")
        return v


class OptimizerSpec(Spec):
    """The optimizer, used as DeepSpeed's client optimizer (plain torch, nothing to compile)."""

    name: Literal["adamw", "adam", "sgd"] = Field("adamw", description="`adamw`, `adam` or `sgd` (torch.optim).")
    lr: float = Field(1e-3, gt=0, le=10, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, le=1, description="Decoupled weight decay (adamw) or L2 (adam, sgd).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam(W) betas.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    grad_clip: float | None = Field(1.0, gt=0, description="Clip the global gradient norm to this; null disables.")


class ScheduleSpec(Spec):
    """Learning-rate schedule over the optimizer steps of the whole run."""

    name: Literal["constant", "linear", "cosine"] = Field(
        "cosine", description="`constant`, `linear` (decay to min) or `cosine` (decay to min)."
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up from 0 over this many optimizer steps.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Final LR as a fraction of the peak LR.")


class PlacementSpec(Spec):
    """Which nodes the workers may run on."""

    label_selector: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Ray label selector every worker's node must satisfy, e.g. {ray.io/node-group: cpu}; "
            "values may use `!v`, `in(a,b)`, `!in(a,b)`."
        ),
    )
    allow_spot: bool = Field(
        True, description="false adds `ray.io/market-type: !spot` so no worker lands on a spot node."
    )

    @model_validator(mode="after")
    def _spot(self) -> PlacementSpec:
        want = self.label_selector.get(MARKET_LABEL, "")
        if not self.allow_spot and want and "spot" in want and not want.startswith("!"):
            _fail("PlacementSpec", [(
                ("label_selector",), self.label_selector,
                f"asks for `{MARKET_LABEL}: {want}` while allow_spot is false; drop one of the two",
            )])
        return self

    def selector(self) -> dict[str, str]:
        """The label selector Ray receives (with the spot exclusion folded in)."""
        out = dict(self.label_selector)
        if not self.allow_spot and MARKET_LABEL not in out:
            out[MARKET_LABEL] = "!spot"
        return out


class CheckpointSpec(Spec):
    """How often DeepSpeed's sharded checkpoints are reported to Ray Train, and how many are kept."""

    every_n_steps: int = Field(50, ge=1, description="Report a checkpoint every N optimizer steps (and at the end).")
    keep_last: int = Field(2, ge=1, description="Keep only the newest K checkpoints (CheckpointConfig.num_to_keep).")


class TrainSpec(Spec):
    """One training run: model, data, batch arithmetic, ZeRO/precision, placement, checkpoints."""

    name: str = Field(description="Run name; checkpoints and the artifact go to <storage_path>/<name>.")
    model: ModelSpec = Field(description="The network to train.")
    dataset: DatasetSpec = Field(description="The data to train on.")
    task: Task = Field(description="`classification`, `regression` or `causal_lm`.")
    epochs: int | None = Field(None, ge=1, le=100000, description="Passes over the training data.")
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many optimizer steps (whichever of epochs/max_steps ends first)."
    )
    global_batch_size: int = Field(
        ge=1, description="Samples per optimizer step over all workers = micro_batch_size × num_workers × grad_accum_steps."
    )
    micro_batch_size: int = Field(ge=1, description="Samples per forward/backward pass on one worker.")
    grad_accum_steps: int | None = Field(
        None, ge=1, description="Micro batches accumulated per optimizer step; default: derived from the batch sizes."
    )
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec, description="Optimizer settings.")
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec, description="Learning-rate schedule.")
    zero_stage: Literal[0, 1, 2, 3, "auto"] = Field(
        "auto", description="DeepSpeed ZeRO stage 0, 1, 2, 3, or `auto` (lowest stage whose memory estimate fits)."
    )
    precision: Precision = Field(Precision.AUTO, description="`bf16`, `fp16`, `fp32` or `auto`.")
    offload_optimizer: bool = Field(
        False, description="Keep optimizer states in host memory (GPU only; ZeRO stage 1-3)."
    )
    offload_params: bool = Field(False, description="Keep parameters in host memory (GPU only; ZeRO stage 3).")
    activation_checkpointing: bool = Field(
        False, description="Recompute activations in backward to save memory (models that support it)."
    )
    num_workers: int = Field(2, ge=1, le=4096, description="Ray Train workers (data-parallel ranks).")
    use_gpu: bool = Field(False, description="One GPU per worker with NCCL; false trains on CPUs with gloo.")
    resources_per_worker: dict[str, float] = Field(
        default_factory=lambda: {"CPU": 1.0},
        description="Ray resources each worker reserves, e.g. {CPU: 4, GPU: 1, memory: 8e9}.",
    )
    accelerator_type: str | None = Field(
        None, description="GPU model the plan assumes for `auto` precision and memory (e.g. A100, T4, H100)."
    )
    memory_per_worker_gb: float | None = Field(
        None, gt=0, description="Memory budget per worker for `auto` stage; default: the accelerator's or host's."
    )
    placement: PlacementSpec = Field(default_factory=PlacementSpec, description="Node placement.")
    classification: str | None = Field(
        None,
        description="Data classification under the cluster's residency policy (e.g. uae-restricted); absent: the "
        "policy's default. Workers are placed only in the regions it allows.",
    )
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec, description="Checkpoint cadence and retention.")
    storage_path: str = Field(
        "/tmp/mlplatform/runs",
        description=(
            "Local directory or pyarrow-filesystem URI for checkpoints and the artifact; "
            "must be shared by every node (NFS, S3) when nodes are on different machines."
        ),
    )
    start: Literal["now", "off-peak"] = Field(
        "now",
        description="`now`, or `off-peak`: wait for the price catalog's off-peak window before any worker starts.",
    )
    max_failures: int = Field(3, ge=-1, description="Worker-group restarts from the last checkpoint (-1: unlimited).")
    seed: int = Field(0, ge=0, description="Seed for weights, data order and dropout.")
    log_every_n_steps: int = Field(10, ge=1, description="Report loss/throughput/memory every N optimizer steps.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _RUN_NAME.match(v):
            raise ValueError("must be 1-64 characters of letters, digits, '.', '_' or '-', starting with a letter or digit")
        return v

    @field_validator("resources_per_worker")
    @classmethod
    def _resources(cls, v: dict[str, float]) -> dict[str, float]:
        bad = [k for k, x in v.items() if x < 0]
        if bad:
            raise ValueError(f"resource amounts must be >= 0; fix {', '.join(bad)}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> TrainSpec:
        problems: list[tuple[tuple[str, ...], Any, str]] = []

        def bad(loc: str, msg: str) -> None:
            parts = tuple(loc.split("."))
            value: Any = self
            for part in parts:
                value = getattr(value, part)
            problems.append((parts, value.value if isinstance(value, Enum) else value, msg))

        if self.epochs is None and self.max_steps is None:
            bad("epochs", "set `epochs` or `max_steps` (or both: training stops at whichever ends first)")
        per_pass = self.micro_batch_size * self.num_workers
        accum = self.grad_accum_steps or 1
        unit = per_pass * accum
        if self.global_batch_size % unit:
            nearest = unit * max(1, round(self.global_batch_size / unit))
            bad(
                "global_batch_size",
                f"must be divisible by micro_batch_size × num_workers × grad_accum_steps = "
                f"{self.micro_batch_size} × {self.num_workers} × {accum} = {unit}; use a multiple of {unit}, e.g. {nearest}",
            )
        elif self.grad_accum_steps is not None and self.global_batch_size != unit:
            bad(
                "grad_accum_steps",
                f"gives micro_batch_size × num_workers × grad_accum_steps = {unit} samples per step, not "
                f"global_batch_size {self.global_batch_size}; set it to {self.global_batch_size // per_pass} or drop it",
            )
        if self.offload_params and self.zero_stage not in (3, "auto"):
            bad("offload_params", f"needs zero_stage 3 (got {self.zero_stage}); set zero_stage: 3 or offload_params: false")
        if self.offload_optimizer and self.zero_stage == 0:
            bad("offload_optimizer", "needs zero_stage 1, 2 or 3 (got 0); raise zero_stage or set offload_optimizer: false")
        if not self.use_gpu:
            if self.precision == Precision.FP16:
                bad("precision", "fp16 needs a GPU (DeepSpeed's CPU accelerator has no fp16); use bf16 or fp32 on CPUs")
            for field in ("offload_optimizer", "offload_params"):
                if getattr(self, field):
                    bad(field, "moves states from GPU to host memory; with use_gpu: false they are in host memory already, so set it to false")
            if self.accelerator_type:
                bad("accelerator_type", "describes a GPU; drop it or set use_gpu: true")
        if self.use_gpu and self.resources_per_worker.get("GPU", 1) <= 0:
            bad("resources_per_worker", "gives workers no GPU while use_gpu is true; set GPU >= 1 or use_gpu: false")
        if self.task == Task.CAUSAL_LM and self.model.ref == "builtin:digits_mlp":
            bad("model.ref", "is a classifier; use builtin:gpt for task causal_lm")
        if self.task != Task.CAUSAL_LM and self.model.ref == "builtin:gpt":
            bad("task", "does not fit builtin:gpt, a language model; use task: causal_lm")
        if self.activation_checkpointing and self.model.ref == "builtin:digits_mlp":
            bad("activation_checkpointing", "is not supported by builtin:digits_mlp; set it to false")
        if problems:
            _fail("TrainSpec", problems)
        return self

    @property
    def accum_steps(self) -> int:
        """Micro batches per optimizer step on each worker."""
        return self.global_batch_size // (self.micro_batch_size * self.num_workers)

    @property
    def cpus_per_worker(self) -> float:
        return float(self.resources_per_worker.get("CPU", 1.0))

    @property
    def gpus_per_worker(self) -> float:
        return float(self.resources_per_worker.get("GPU", 1.0 if self.use_gpu else 0.0))
